//! Fleet rollouts: ten `deployd run` agents, each with its own EC2 instance on moto, its own
//! IMDSv2 server and state directory, following one signed release pointer with a 1 s poll;
//! CI publishes in waves (`publish --percent`, `rollout`), watches with `fleet status --wait`
//! and reverts a bad release with `--revert-on-failure`.
//!
//! Which agents a wave takes is computed here independently from the documented function
//! (SHA-256 of the instance id, a newline and the release's SHA-256; first 8 bytes, big-endian,
//! mod 10000, below percent × 100), so the test checks that exactly those agents moved. moto
//! hands out new instance ids on every run, so the release is salted (one extra file) until
//! its 30% wave holds between 1 and 6 of the ten agents and its 20% wave at least one: a wave
//! of nobody or everybody would prove nothing.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::time::Duration;

use common::daemon::{Daemon, Options};
use common::ec2::Ec2;
use common::keys::{Keys, ci_keys};
use common::signed::{C1, C2, C3, POINTER};

const C4: &str = "4444444444444444444444444444444444444444";
use common::{Host, Run, Tarball, app, imds, moto, poll, sha256_hex, write_file};
use sha2::{Digest, Sha256};

/// One instance: its agent, its IMDS and its id.
struct Agent {
    id: String,
    host: Host,
    daemon: Daemon,
    _imds: imds::Imds,
}

impl Agent {
    fn start(ci: &Host, keys: &Keys, id: &str) -> Agent {
        let server = imds::start("123456789012", "us-east-1", id);
        let mut host = Host::in_bucket(&ci.bucket, "", "");
        host.imds = Some(server.endpoint.clone());
        common::signed::trust(
            &host,
            &[keys],
            &format!("bucket = \"{}\"\npointer_key = \"{POINTER}\"\n", ci.bucket),
            &format!(
                "[report]\nec2_endpoint_url = \"{}\"\n\n[triggers]\npoll_interval = \"1s\"\n",
                moto().endpoint
            ),
        );
        let text = std::fs::read_to_string(&host.config).unwrap();
        std::fs::write(
            &host.config,
            text.replacen(
                "app = \"web\"\n",
                "app = \"web\"\nenvironment = \"prod\"\n",
                1,
            ),
        )
        .unwrap();
        let daemon = Daemon::start(&host, Options::default());
        Agent {
            id: id.to_string(),
            host,
            daemon,
            _imds: server,
        }
    }

    fn serving(&self) -> Option<String> {
        let state = self.host.try_state()?;
        state["current"]["sha256"].as_str().map(str::to_string)
    }
}

/// The documented wave function, written out again.
fn in_wave(member: &str, sha: &str, percent: u64) -> bool {
    let d = Sha256::digest(format!("{member}\n{sha}").as_bytes());
    let slot = u64::from_be_bytes(d[..8].try_into().unwrap()) % 10_000;
    slot < percent * 100
}

/// `app(version)` with a salt file, so its SHA-256 (and its waves) can be varied.
fn salted(version: &str, salt: u32) -> Tarball {
    app(version).file("./salt", 0o644, salt.to_string().as_bytes())
}

/// The first salt whose `percent` wave over `ids` holds a count `ok` accepts.
fn pick(
    ids: &[&str],
    percent: u64,
    ok: impl Fn(usize) -> bool,
    body: impl Fn(u32) -> Vec<u8>,
) -> Vec<u8> {
    (0..1000)
        .map(&body)
        .find(|b| {
            let sha = sha256_hex(b);
            ok(ids.iter().filter(|id| in_wave(id, &sha, percent)).count())
        })
        .unwrap()
}

/// `deployd publish` of `body`, signed, moving the pointer to it at `percent`.
fn publish(ci: &Host, keys: &Keys, name: &str, body: &[u8], commit: &str, percent: u8) -> String {
    let file = write_file(ci, name, body);
    let percent = percent.to_string();
    let run = ci_run(
        ci,
        keys,
        &[
            "publish",
            file.to_str().unwrap(),
            "--bucket",
            &ci.bucket,
            "--app",
            "web",
            "--environment",
            "prod",
            "--commit",
            commit,
            "--sign",
            keys.secret.to_str().unwrap(),
            "--pointer",
            "--percent",
            &percent,
        ],
    );
    Host::published_key(&run)
}

fn ci_run(ci: &Host, keys: &Keys, args: &[&str]) -> Run {
    let mut cmd = ci.command(args);
    cmd.env_remove("DEPLOYD_SIGN_PASSWORD")
        .env_remove("GITHUB_OUTPUT");
    for (k, v) in keys.env() {
        cmd.env(k, v);
    }
    Run::from(cmd.output().unwrap())
}

/// `deployd rollout` of web/prod in the CI host's bucket, then EXTRA.
fn rollout_args<'a>(ci: &'a Host, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "rollout",
        "--bucket",
        &ci.bucket,
        "--app",
        "web",
        "--environment",
        "prod",
    ];
    args.extend_from_slice(extra);
    args
}

/// `deployd fleet status --bucket … --wait --sha COMMIT EXTRA` with a 1 s interval.
fn fleet_wait(ci: &Host, keys: &Keys, commit: &str, extra: &[&str]) -> Run {
    let mut args = vec![
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
        "90s",
    ];
    args.extend_from_slice(extra);
    ci_run(ci, keys, &args)
}

#[track_caller]
fn wait_serving(agents: &[&Agent], sha: &str) {
    let done = poll(Duration::from_secs(90), Duration::from_millis(100), || {
        agents.iter().all(|a| a.serving().as_deref() == Some(sha))
    });
    if done.is_none() {
        let late = agents
            .iter()
            .find(|a| a.serving().as_deref() != Some(sha))
            .unwrap();
        panic!("{} does not serve {sha}:\n{}", late.id, late.daemon.log());
    }
}

fn pointer(ci: &Host) -> serde_json::Value {
    serde_json::from_slice(&ci.s3.get(&ci.bucket, POINTER)).unwrap()
}

#[test]
fn waves_grow_converge_and_a_bad_release_is_reverted() {
    let Some(keys) = ci_keys("fleet", None) else {
        return;
    };
    let ec2 = Ec2::new();
    let ci = Host::with(
        false,
        "",
        &format!("[report]\nec2_endpoint_url = \"{}\"\n", moto().endpoint),
    );

    // v1 everywhere.
    let v1 = app("v1").gz();
    let sha1 = sha256_hex(&v1);
    publish(&ci, &keys, "v1.tar.gz", &v1, C1, 100);
    let ids: Vec<String> = (0..10).map(|_| ec2.run_instance()).collect();
    let mut agents: Vec<Agent> = ids.iter().map(|id| Agent::start(&ci, &keys, id)).collect();
    wait_serving(&agents.iter().collect::<Vec<_>>(), &sha1);
    let run = fleet_wait(&ci, &keys, C1, &[]);
    run.ok();
    assert!(
        run.stdout.contains("10 instance(s) of web/prod"),
        "{}",
        run.stdout
    );
    let tags = ec2.tags(&ids[0]);
    assert_eq!(tags["deployd:app"], "web");
    assert_eq!(tags["deployd:environment"], "prod");
    assert_eq!(tags["deployd:target"], C1);

    // v2 to a 30% wave: exactly the predicted agents move, the rest stay on v1.
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let v2 = pick(
        &id_refs,
        30,
        |n| (1..=6).contains(&n),
        |s| salted("v2", s).gz(),
    );
    let sha2 = sha256_hex(&v2);
    let v2_key = publish(&ci, &keys, "v2.tar.gz", &v2, C2, 30);
    assert_eq!(pointer(&ci)["percent"], 30);
    let (inside, outside): (Vec<&Agent>, Vec<&Agent>) =
        agents.iter().partition(|a| in_wave(&a.id, &sha2, 30));
    let run = fleet_wait(&ci, &keys, C2, &["--json"]);
    run.ok();
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["tally"]["wave"], inside.len(), "{report}");
    wait_serving(&inside, &sha2);
    std::thread::sleep(Duration::from_secs(2));
    for a in &outside {
        assert_eq!(
            a.serving().as_deref(),
            Some(sha1.as_str()),
            "{} left v1",
            a.id
        );
    }
    eprintln!("30% wave: {} of 10 agents", inside.len());

    // Instances booted in the middle of the wave follow their own membership.
    let (mut new_in, mut new_out) = (None, None);
    while new_in.is_none() || new_out.is_none() {
        let id = ec2.run_instance();
        let slot = if in_wave(&id, &sha2, 30) {
            &mut new_in
        } else {
            &mut new_out
        };
        // Instances not taken stay untagged, so the fleet never sees them.
        if slot.is_none() {
            *slot = Some(id);
        }
    }
    let late_in = Agent::start(&ci, &keys, new_in.as_deref().unwrap());
    let late_out = Agent::start(&ci, &keys, new_out.as_deref().unwrap());
    wait_serving(&[&late_in], &sha2);
    wait_serving(&[&late_out], &sha1);
    agents.push(late_in);
    agents.push(late_out);

    // rollout --percent 100: everyone, and fleet status --wait says so.
    let sign = keys.secret.to_str().unwrap();
    ci_run(
        &ci,
        &keys,
        &rollout_args(&ci, &["--percent", "100", "--sign", sign]),
    )
    .ok();
    fleet_wait(&ci, &keys, C2, &[]).ok();
    wait_serving(&agents.iter().collect::<Vec<_>>(), &sha2);

    // A release every agent refuses (a link out of the release), to a 20% wave: the wait
    // fails, the pointer goes back to v2 and the whole fleet serves it.
    let all: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    let v3 = pick(
        &all,
        20,
        |n| n >= 1,
        |s| salted("v3", s).symlink("./escape", "../../../../etc").gz(),
    );
    publish(&ci, &keys, "v3.tar.gz", &v3, C3, 20);
    let run = fleet_wait(
        &ci,
        &keys,
        C3,
        &[
            "--revert-on-failure",
            "--sign",
            keys.secret.to_str().unwrap(),
        ],
    );
    run.fails_with(65, "failed or rolled back commit");
    assert!(run.error_line().contains(&v2_key), "{}", run.error_line());
    assert!(
        run.stdout.contains("reverted the pointer to"),
        "{}",
        run.stdout
    );
    let p = pointer(&ci);
    assert_eq!(p["key"], v2_key.as_str(), "{p}");
    assert!(
        p["statement"].as_str().unwrap().contains("\"reverts\""),
        "{p}"
    );
    wait_serving(&agents.iter().collect::<Vec<_>>(), &sha2);
    let failed: Vec<&Agent> = agents
        .iter()
        .filter(|a| in_wave(&a.id, &sha256_hex(&v3), 20))
        .collect();
    for a in &failed {
        let history = a.host.state()["history"].to_string();
        assert!(history.contains("failed"), "{}: {history}", a.id);
        let poll_ok = poll(Duration::from_secs(10), Duration::from_millis(100), || {
            ec2.tags(&a.id).get("deployd:status").map(String::as_str) == Some("serving")
        });
        assert!(poll_ok.is_some(), "{} tags {:?}", a.id, ec2.tags(&a.id));
    }

    // v4, good, everywhere; then `rollout --revert`: hosts that accepted v4 go back to v2,
    // below their high-water mark, because the signed pointer says it reverts v4.
    let v4 = app("v4").gz();
    publish(&ci, &keys, "v4.tar.gz", &v4, C4, 100);
    wait_serving(&agents.iter().collect::<Vec<_>>(), &sha256_hex(&v4));
    let run = ci_run(
        &ci,
        &keys,
        &rollout_args(&ci, &["--revert", "--sign", sign]),
    );
    run.ok();
    assert!(run.stdout.contains(&v2_key), "{}", run.stdout);
    fleet_wait(&ci, &keys, C2, &[]).ok();
    wait_serving(&agents.iter().collect::<Vec<_>>(), &sha2);

    for a in &agents {
        a.daemon.signal(libc::SIGTERM);
    }
    for a in &mut agents {
        assert_eq!(
            a.daemon.wait_exit(Duration::from_secs(30)).0,
            0,
            "{}",
            a.daemon.log()
        );
    }
}

/// The CI commands on their own: unsigned waves, the refusals and the exit codes.
#[test]
fn unsigned_waves_and_what_ci_refuses() {
    let ci = Host::with(
        false,
        "",
        &format!("[report]\nec2_endpoint_url = \"{}\"\n", moto().endpoint),
    );
    let file = |v: &str| write_file(&ci, &format!("{v}.tar.gz"), &app(v).gz());
    let publish = |v: &str, commit: &str, percent: &str| {
        ci.publish(
            &file(v),
            "prod",
            &["--commit", commit, "--pointer", "--percent", percent],
            &[],
        )
    };
    // A wave needs a release for the rest of the fleet.
    publish("v1", C1, "30").fails_with(64, "--percent 30 needs a release");
    let v1 = Host::published_key(&publish("v1", C1, "100"));
    let v2 = Host::published_key(&publish("v2", C2, "30"));
    let p = pointer(&ci);
    assert_eq!(
        (p["key"].as_str(), p["percent"].as_u64()),
        (Some(v2.as_str()), Some(30))
    );
    assert_eq!(p["previous"]["key"], v1.as_str(), "{p}");
    assert_eq!(p["previous"]["commit"], C1, "{p}");

    let rollout = |extra: &[&str]| ci.run(&rollout_args(&ci, extra));
    rollout(&["--percent", "60"]).ok();
    assert_eq!(pointer(&ci)["percent"], 60);
    rollout(&[]).fails_with(64, "");
    rollout(&["--percent", "101"]).fails_with(64, "");
    rollout(&["--revert"]).ok();
    let p = pointer(&ci);
    assert_eq!(p["key"], v1.as_str(), "{p}");
    assert!(
        p.get("percent").is_none() && p.get("previous").is_none(),
        "{p}"
    );
    rollout(&["--revert"]).fails_with(65, "no previous release");
    rollout(&["--percent", "50"]).fails_with(64, "no previous release");

    // No instance carries the tags: the table is empty, and a wait never passes.
    ci.publish(&file("s1"), "staging", &["--commit", C1, "--pointer"], &[])
        .ok();
    let run = ci.run(&[
        "fleet",
        "status",
        "--app",
        "web",
        "--environment",
        "staging",
    ]);
    run.ok();
    assert!(
        run.stdout.contains("0 instance(s) of web/staging"),
        "{}",
        run.stdout
    );
    let run = ci.run(&[
        "fleet",
        "status",
        "--app",
        "web",
        "--environment",
        "staging",
        "--bucket",
        &ci.bucket,
        "--wait",
        "--timeout",
        "2s",
        "--interval",
        "1s",
    ]);
    run.fails_with(75, "did not converge");
    let run = ci.run(&[
        "fleet",
        "status",
        "--app",
        "web",
        "--environment",
        "prod",
        "--wait",
    ]);
    assert_eq!(run.code, 64, "{}", run.stderr);
}
