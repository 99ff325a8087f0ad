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

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::proxy::{self, Behaviour, Proxy};
use common::{S3, app, moto, sha256_hex, unique};

struct Agent {
    dir: PathBuf,
    child: Child,
    proxy: Proxy,
}

impl Agent {
    fn current_sha(&self) -> Option<String> {
        let text = std::fs::read(self.dir.join("state/state.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
        v["current"]["sha256"].as_str().map(str::to_string)
    }

    /// Requests forwarded so far, and how many of them were answered 304.
    fn requests(&self) -> (u64, u64) {
        let requests = self.proxy.requests();
        let not_modified = requests.iter().filter(|r| r.status == Some(304)).count();
        (requests.len() as u64, not_modified as u64)
    }
}

fn start_agent(root: &Path, i: usize, bucket: &str, poll: &str) -> Agent {
    let dir = root.join(format!("agent-{i:02}"));
    std::fs::create_dir_all(&dir).unwrap();
    let proxy = proxy::start(&moto().endpoint, Behaviour::PassThrough);
    let d = dir.display();
    let config = format!(
        "app = \"web\"\nstate_dir = \"{d}/state\"\nruntime_dir = \"{d}/run\"\nenvironment_file = \"{d}/environment\"\n\n\
         [source]\nbucket = \"{bucket}\"\npointer_key = \"web/prod/current.json\"\nwait_for_artifact = \"30s\"\n\n\
         [s3]\nendpoint_url = \"{}\"\n\n[containers]\nenabled = false\n\n[report]\nec2_tags = false\n\n\
         [triggers]\npoll_interval = \"{poll}\"\n",
        proxy.endpoint
    );
    std::fs::write(dir.join("deployd.toml"), config).unwrap();
    let log = std::fs::File::create(dir.join("deployd.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_deployd"))
        .arg("run")
        .env("DEPLOYD_CONFIG", dir.join("deployd.toml"))
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "info")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_S3")
        .env_remove("DEPLOYMENT_BUCKET")
        .env_remove("DEPLOYMENT_KEY")
        .env_remove("DEPLOYMENT_POINTER")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Agent { dir, child, proxy }
}

fn publish(root: &Path, bucket: &str, version: &str, commit: &str) -> String {
    let body = app(version)
        .file(
            "./payload.bin",
            0o644,
            &vec![version.as_bytes()[1]; 256 << 10],
        )
        .gz();
    let file = root.join(format!("{version}.tar.gz"));
    std::fs::write(&file, &body).unwrap();
    let config = root.join("ci.toml");
    std::fs::write(
        &config,
        format!("[s3]\nendpoint_url = \"{}\"\n", moto().endpoint),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_deployd"))
        .args(["publish", file.to_str().unwrap(), "--bucket", bucket])
        .args([
            "--app",
            "web",
            "--environment",
            "prod",
            "--commit",
            commit,
            "--pointer",
        ])
        .env("DEPLOYD_CONFIG", &config)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("GITHUB_OUTPUT")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "publish {version}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    sha256_hex(&body)
}

fn wait_all(agents: &[Agent], sha: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let behind = agents
            .iter()
            .filter(|a| a.current_sha().as_deref() != Some(sha))
            .count();
        if behind == 0 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{behind} agents did not reach {sha} within {limit:?} (logs under {})",
            agents[0].dir.parent().unwrap().display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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
    let s3 = S3::new();
    let bucket = unique("fleet");
    s3.create_bucket(&bucket, true);
    let root = tempfile::tempdir().unwrap();

    let commits = [
        "1111111111111111111111111111111111111111",
        "2222222222222222222222222222222222222222",
        "3333333333333333333333333333333333333333",
    ];
    let mut published: BTreeMap<String, String> = BTreeMap::new(); // sha -> VERSION
    let sha1 = publish(root.path(), &bucket, "v1", commits[0]);
    published.insert(sha1.clone(), "v1".into());

    let started = Instant::now();
    let mut agents: Vec<Agent> = (0..n)
        .map(|i| start_agent(root.path(), i, &bucket, &poll))
        .collect();
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
        s3.put(&bucket, legacy, &junk, &[("sha256", &sha256_hex(&junk))]);
        let sha = publish(root.path(), &bucket, version, commit);
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
        let releases = a.dir.join("state/releases");
        for entry in std::fs::read_dir(&releases).unwrap().flatten() {
            let m: serde_json::Value = serde_json::from_slice(
                &std::fs::read(entry.path().join(".deployd-release.json")).unwrap(),
            )
            .unwrap();
            let sha = m["sha256"].as_str().unwrap();
            let version = published.get(sha).unwrap_or_else(|| {
                panic!(
                    "{} installed an unpublished artifact {sha}",
                    a.dir.display()
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
                vec![version.as_bytes()[1]; 256 << 10]
            );
            installed += 1;
        }
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.dir.join("state/state.json")).unwrap())
                .unwrap();
        for attempt in state["history"].as_array().into_iter().flatten() {
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

    for a in &mut agents {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(a.child.id() as i32, libc::SIGTERM) };
    }
    for a in &mut agents {
        let status = a.child.wait().unwrap();
        assert!(status.success(), "{} exited with {status}", a.dir.display());
    }
}
