//! A fleet on one machine: `FLEET_AGENTS` (default 50) `deployd run` processes, each with its
//! own state directory and its own request-counting proxy in front of one moto_server, all
//! following one release pointer with a 1 s poll interval. v1, v2 and v3 are published in
//! quick succession while a legacy mutable key is rewritten in place.
//!
//! Asserts: every agent converges on v3's SHA-256; no agent ever installed a release whose
//! files differ from what its manifest's SHA-256 says was published; an idle poll costs one
//! request (a 304). Prints requests per idle poll and convergence time.
//!
//! Ignored by default (it starts 50 processes); run it with `bench/fleet.sh`.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, Options};
use common::proxy::{self, Behaviour, Proxy};
use common::{Host, app, moto, poll, sha256_hex};

/// One `deployd run`, with its own proxy in front of moto to count what it asks.
struct Agent {
    host: Host,
    proxy: Proxy,
    daemon: Daemon,
}

impl Agent {
    fn start(bucket: &str, interval: &str) -> Agent {
        let proxy = proxy::start(&moto().endpoint, Behaviour::PassThrough);
        let host = Host::in_bucket(
            bucket,
            &format!(
                "bucket = \"{bucket}\"\npointer_key = \"web/prod/current.json\"\nwait_for_artifact = \"30s\""
            ),
            &format!("[report]\nec2_tags = false\n\n[triggers]\npoll_interval = \"{interval}\"\n"),
        );
        host.route_s3_through(&proxy.endpoint);
        let daemon = Daemon::start(&host, Options::default());
        Agent {
            host,
            proxy,
            daemon,
        }
    }

    fn current_sha(&self) -> Option<String> {
        let state = self.host.try_state()?;
        state["current"]["sha256"].as_str().map(str::to_string)
    }

    /// Requests forwarded so far, and how many of them were answered 304.
    fn requests(&self) -> (u64, u64) {
        let requests = self.proxy.requests();
        let not_modified = requests.iter().filter(|r| r.status == Some(304)).count();
        (requests.len() as u64, not_modified as u64)
    }
}

/// Publishes v1, v2 or v3 with `--pointer`: the app and a 256 KiB payload of one byte.
fn publish(ci: &Host, version: &str, commit: &str) -> String {
    let body = app(version)
        .file("./payload.bin", 0o644, &payload(version))
        .gz();
    let name = format!("{version}.tar.gz");
    let args = ["--commit", commit, "--pointer"];
    ci.publish_bytes(&name, &body, "prod", &args).sha256
}

fn payload(version: &str) -> Vec<u8> {
    vec![version.as_bytes()[1]; 256 << 10]
}

fn wait_all(agents: &[Agent], sha: &str, limit: Duration) -> Duration {
    let behind = || {
        agents
            .iter()
            .filter(|a| a.current_sha().as_deref() != Some(sha))
    };
    poll(limit, Duration::from_millis(100), || {
        behind().next().is_none()
    })
    .unwrap_or_else(|| {
        let late: Vec<_> = behind().collect();
        panic!(
            "{} agents did not reach {sha} within {limit:?}; the log of one of them:\n{}",
            late.len(),
            late[0].daemon.log()
        )
    })
}

#[test]
#[ignore = "starts a fleet of deployd processes; run bench/fleet.sh"]
fn fleet_converges_on_the_newest_release() {
    let n: usize = std::env::var("FLEET_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let poll = std::env::var("FLEET_POLL").unwrap_or_else(|_| "1s".into());
    let poll_s = humantime::parse_duration(&poll).unwrap().as_secs_f64();
    // The CI machine: it publishes into its bucket, which every agent follows.
    let ci = Host::with(true, "", "");

    let commits = [
        "1111111111111111111111111111111111111111",
        "2222222222222222222222222222222222222222",
        "3333333333333333333333333333333333333333",
    ];
    let mut published: BTreeMap<String, String> = BTreeMap::new(); // sha -> VERSION
    let sha1 = publish(&ci, "v1", commits[0]);
    published.insert(sha1.clone(), "v1".into());

    let started = Instant::now();
    let mut agents: Vec<Agent> = (0..n).map(|_| Agent::start(&ci.bucket, &poll)).collect();
    let first = wait_all(&agents, &sha1, Duration::from_secs(120));
    println!(
        "fleet: {n} agents started and serving v1 after {first:.2?} (spawn included: {:.2?})",
        started.elapsed()
    );

    // Idle: nothing changes; count what the polls cost.
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<(u64, u64)> = agents.iter().map(Agent::requests).collect();
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let (mut reqs, mut nms) = (0u64, 0u64);
    for (a, (r0, n0)) in agents.iter().zip(&before) {
        let (r, n) = a.requests();
        reqs += r - r0;
        nms += n - n0;
    }
    // Polls happen every interval plus up to 25% jitter: 1.125 intervals on average.
    let polls = nms.max(1) as f64;
    let per_poll = reqs as f64 / polls;
    println!(
        "fleet: idle {window:?}: {reqs} requests, {nms} answered 304, {:.3} requests per idle poll, {:.2} polls per agent per second (interval {poll})",
        per_poll,
        polls / n as f64 / window.as_secs_f64()
    );
    assert!(nms > 0, "agents polled while idle");
    assert!(
        (per_poll - 1.0).abs() < 0.05,
        "an idle poll is one conditional GET: {reqs} requests for {nms} 304s"
    );
    let expected_polls = n as f64 * window.as_secs_f64() / (poll_s * 1.125);
    assert!(
        polls > expected_polls * 0.6 && polls < expected_polls * 1.4,
        "{polls} polls, expected about {expected_polls:.0}"
    );

    // v1 -> v2 -> v3 in quick succession, with the legacy mutable key rewritten meanwhile.
    let legacy = "web/pr-51/web-deployment.tar.gz";
    let clock = Instant::now();
    for (i, (version, commit)) in [("v2", commits[1]), ("v3", commits[2])]
        .into_iter()
        .enumerate()
    {
        let junk = app(&format!("legacy-{i}")).gz();
        ci.s3
            .put(&ci.bucket, legacy, &junk, &[("sha256", &sha256_hex(&junk))]);
        let sha = publish(&ci, version, commit);
        published.insert(sha, version.into());
        std::thread::sleep(Duration::from_millis(300));
    }
    let sha3 = published
        .iter()
        .find(|(_, v)| v.as_str() == "v3")
        .map(|(s, _)| s.clone())
        .unwrap();
    let converged = wait_all(&agents, &sha3, Duration::from_secs(120));
    println!(
        "fleet: all {n} agents on v3 {:.2?} after the v2 publish started ({converged:.2?} after v3 landed)",
        clock.elapsed()
    );

    // Every release any agent installed is one that was published, with that release's files.
    let mut installed = 0;
    for a in &agents {
        let releases = a.host.state_dir().join("releases");
        for entry in std::fs::read_dir(&releases).unwrap().flatten() {
            let m: serde_json::Value = serde_json::from_slice(
                &std::fs::read(entry.path().join(".deployd-release.json")).unwrap(),
            )
            .unwrap();
            let sha = m["sha256"].as_str().unwrap();
            let version = published.get(sha).unwrap_or_else(|| {
                panic!(
                    "{} installed an unpublished artifact {sha}",
                    a.host.dir.path().display()
                )
            });
            assert_eq!(
                std::fs::read_to_string(entry.path().join("VERSION")).unwrap(),
                *version,
                "{}: files differ from the manifest's SHA-256",
                entry.path().display()
            );
            assert_eq!(
                std::fs::read(entry.path().join("payload.bin")).unwrap(),
                payload(version)
            );
            installed += 1;
        }
        for attempt in a.host.state()["history"].as_array().into_iter().flatten() {
            assert_ne!(
                attempt["key"].as_str(),
                Some(legacy),
                "no agent looked at the legacy key"
            );
        }
    }
    println!(
        "fleet: {installed} releases installed across {n} agents, all matching their manifests"
    );

    for a in &agents {
        a.daemon.signal(libc::SIGTERM);
    }
    for a in &mut agents {
        let (code, _) = a.daemon.wait_exit(Duration::from_secs(60));
        assert_eq!(code, 0, "{}", a.daemon.log());
    }
}

/// EC2 (query API: `POST /`) and S3 requests among those a proxy forwarded.
fn split(requests: &[proxy::Request]) -> (u64, u64) {
    let ec2 = requests
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/")
        .count() as u64;
    (requests.len() as u64 - ec2, ec2)
}

/// The rollout measurement: `FLEET_AGENTS` (50) agents, each an EC2 instance on moto with its
/// own IMDSv2 server and one proxy in front of moto for both its S3 and its EC2 traffic,
/// polling every `FLEET_POLL` (5 s). Prints the S3 and EC2 requests per agent per idle hour
/// (from a `FLEET_IDLE` window, 30 s) and the time from `publish --pointer --percent 100` to
/// `fleet status --wait` returning 0.
#[test]
#[ignore = "starts a fleet of deployd processes; run bench/fleet.sh"]
fn fleet_rollout_time_and_idle_cost() {
    let n: usize = std::env::var("FLEET_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let poll_every = std::env::var("FLEET_POLL").unwrap_or_else(|_| "5s".into());
    let idle_poll = std::env::var("FLEET_IDLE_POLL").unwrap_or_else(|_| "0s".into());
    let idle =
        humantime::parse_duration(&std::env::var("FLEET_IDLE").unwrap_or_else(|_| "30s".into()))
            .unwrap();
    let ec2 = common::ec2::Ec2::new();
    let ci = Host::with(
        true,
        "",
        &format!("[report]\nec2_endpoint_url = \"{}\"\n", moto().endpoint),
    );
    let c1 = "1111111111111111111111111111111111111111";
    let c2 = "2222222222222222222222222222222222222222";
    let sha1 = publish(&ci, "v1", c1);

    struct Member {
        host: Host,
        proxy: Proxy,
        daemon: Daemon,
        _imds: common::imds::Imds,
    }
    let members: Vec<Member> = (0..n)
        .map(|_| {
            let id = ec2.run_instance();
            let server = common::imds::start("123456789012", "us-east-1", &id);
            let proxy = proxy::start(&moto().endpoint, Behaviour::PassThrough);
            let mut host = Host::in_bucket(
                &ci.bucket,
                &format!(
                    "bucket = \"{}\"\npointer_key = \"web/prod/current.json\"\nwait_for_artifact = \"30s\"",
                    ci.bucket
                ),
                &format!(
                    "[report]\nec2_endpoint_url = \"{}\"\n\n[triggers]\npoll_interval = \"{poll_every}\"\nidle_poll_interval = \"{idle_poll}\"\n",
                    moto().endpoint
                ),
            );
            host.imds = Some(server.endpoint.clone());
            let text = std::fs::read_to_string(&host.config).unwrap();
            std::fs::write(
                &host.config,
                text.replacen("app = \"web\"\n", "app = \"web\"\nenvironment = \"prod\"\n", 1),
            )
            .unwrap();
            // S3 and EC2 both go through the proxy (moto serves both on one port).
            host.route_s3_through(&proxy.endpoint);
            let daemon = Daemon::start(&host, Options::default());
            Member {
                host,
                proxy,
                daemon,
                _imds: server,
            }
        })
        .collect();
    let serving = |m: &Member, sha: &str| {
        m.host
            .try_state()
            .and_then(|s| s["current"]["sha256"].as_str().map(str::to_string))
            .as_deref()
            == Some(sha)
    };
    let up = poll(Duration::from_secs(180), Duration::from_millis(200), || {
        members.iter().all(|m| serving(m, &sha1))
    });
    assert!(up.is_some(), "{}", members[0].daemon.log());
    let fleet_wait = |commit: &str| {
        ci.run(&[
            "fleet",
            "status",
            "--app",
            "web",
            "--environment",
            "prod",
            "--bucket",
            &ci.bucket,
            "--wait",
            "--sha",
            commit,
            "--interval",
            "1s",
            "--timeout",
            "5m",
        ])
    };
    fleet_wait(c1).ok();

    // Idle: nothing changes. Each agent's first poll queues one deployment (it closes the
    // window between the startup deployment and the poller); that is start-up, so the window
    // opens after it.
    // With FLEET_IDLE_POLL, the window also opens after the polls have stretched to it.
    let every = humantime::parse_duration(&poll_every).unwrap();
    let stretched = humantime::parse_duration(&idle_poll).unwrap();
    let mut settle = every;
    let mut step = every;
    while step < stretched {
        step = (step * 2).min(stretched);
        if step < stretched {
            settle += step;
        }
    }
    std::thread::sleep(settle + settle / 4 + Duration::from_secs(5));
    let before: Vec<(u64, u64)> = members.iter().map(|m| split(&m.proxy.requests())).collect();
    std::thread::sleep(idle);
    let (mut s3, mut ec2_calls) = (0u64, 0u64);
    for (m, (s0, e0)) in members.iter().zip(&before) {
        let (s, e) = split(&m.proxy.requests());
        s3 += s - s0;
        ec2_calls += e - e0;
    }
    let per_hour = |count: u64| count as f64 / n as f64 * 3600.0 / idle.as_secs_f64();
    println!(
        "rollout bench: idle {idle:?} with a {poll_every} poll (idle_poll_interval {idle_poll}): {s3} S3 and {ec2_calls} EC2 requests from {n} agents = {:.0} S3 and {:.0} EC2 per agent per idle hour",
        per_hour(s3),
        per_hour(ec2_calls)
    );
    assert_eq!(ec2_calls, 0, "an idle agent makes no EC2 request");

    // publish --percent 100, then fleet status --wait.
    let before: Vec<(u64, u64)> = members.iter().map(|m| split(&m.proxy.requests())).collect();
    let clock = Instant::now();
    let body = app("v2").file("./payload.bin", 0o644, &payload("v2")).gz();
    ci.publish_bytes(
        "v2.tar.gz",
        &body,
        "prod",
        &["--commit", c2, "--pointer", "--percent", "100"],
    );
    let published = clock.elapsed();
    fleet_wait(c2).ok();
    let converged = clock.elapsed();
    let (mut s3, mut ec2_calls) = (0u64, 0u64);
    for (m, (s0, e0)) in members.iter().zip(&before) {
        let (s, e) = split(&m.proxy.requests());
        s3 += s - s0;
        ec2_calls += e - e0;
    }
    println!(
        "rollout bench: {n} agents, {poll_every} poll (idle_poll_interval {idle_poll}): publish --percent 100 took {published:.2?}; fleet status --wait returned 0 {converged:.2?} after the publish began; the rollout cost {:.1} S3 and {:.1} EC2 requests per agent",
        s3 as f64 / n as f64,
        ec2_calls as f64 / n as f64
    );
    assert!(members.iter().all(|m| serving(m, &sha256_hex(&body))));
}
