//! Crash consistency: `deployd deploy` and `deployd run` killed with SIGKILL (the OOM killer,
//! a power cut) at random moments spread over resolve, fetch, unpack and activate, again and
//! again on one host. After every kill: `current`, when it exists, names a complete release
//! whose files match its manifest; every directory under `releases/` is complete; `state.json`
//! parses. After every recovery run (a one-shot `deploy` or the daemon, in turn): no staging
//! debris, no temporary files, and `state.json` agrees with `current`.
//!
//! `DEPLOYD_CRASH_KILLS` sets the number of kills: 100 by default (about 80 s here, for CI);
//! the full run is `DEPLOYD_CRASH_KILLS=500 cargo test --test crash -- --nocapture`, which
//! prints where the kills landed. `DEPLOYD_CRASH_SEED` changes the random points.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Host, Tarball};

const VERSIONS: [&str; 3] = ["v1", "v2", "v3"];

/// An artifact with a few hundred small files and some incompressible bytes, so that fetch
/// and unpack take long enough to be killed in.
fn artifact(version: &str, seed: u64) -> Vec<u8> {
    let mut t = Tarball::new()
        .dir("./", 0o755)
        .file("./VERSION", 0o644, version.as_bytes())
        .file("./big.bin", 0o644, &common::noise(seed, 3 << 20));
    for i in 0..400 {
        let body = format!("{version} file {i}\n").repeat(1 + i % 7);
        t = t.file(
            &format!("./src/m{}/f{i}.txt", i % 20),
            0o644,
            body.as_bytes(),
        );
    }
    t.gz()
}

/// Regular files (but the manifest) and their bytes under `dir`.
fn count_files(dir: &Path) -> (u64, u64) {
    let mut out = (0, 0);
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            let (f, b) = count_files(&e.path());
            out = (out.0 + f, out.1 + b);
        } else if t.is_file() && e.file_name() != ".deployd-release.json" {
            out = (out.0 + 1, out.1 + e.metadata().unwrap().len());
        }
    }
    out
}

/// A release directory is complete: a manifest, and the files and bytes it lists, with the
/// version its commit says.
#[track_caller]
fn assert_complete(release: &Path, commits: &BTreeMap<String, String>, when: &str) {
    let manifest = std::fs::read(release.join(".deployd-release.json"))
        .unwrap_or_else(|e| panic!("{when}: {} has no manifest: {e}", release.display()));
    let m: serde_json::Value = serde_json::from_slice(&manifest)
        .unwrap_or_else(|e| panic!("{when}: {} manifest is corrupt: {e}", release.display()));
    let (files, bytes) = count_files(release);
    assert_eq!(
        (files, bytes),
        (
            m["unpacked"]["files"].as_u64().unwrap(),
            m["unpacked"]["bytes"].as_u64().unwrap()
        ),
        "{when}: {} does not match its manifest",
        release.display()
    );
    let version = std::fs::read_to_string(release.join("VERSION")).unwrap();
    let commit = m["metadata"]["commit-sha"].as_str().unwrap();
    assert_eq!(commits[&version], commit, "{when}: {}", release.display());
}

/// The invariants that hold at any moment, a kill included.
#[track_caller]
fn assert_consistent(host: &Host, commits: &BTreeMap<String, String>, when: &str) {
    let state = host.state_dir();
    for id in host.releases() {
        assert_complete(&state.join("releases").join(&id), commits, when);
    }
    if std::fs::symlink_metadata(state.join("current")).is_ok() {
        let id = host
            .current()
            .unwrap_or_else(|| panic!("{when}: current is unreadable"));
        assert!(
            host.releases().contains(&id),
            "{when}: current names {id}, which is not a release"
        );
    }
    if let Ok(bytes) = std::fs::read(state.join("state.json")) {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .unwrap_or_else(|e| panic!("{when}: state.json is corrupt: {e}"));
    }
}

/// What a completed run must leave: no debris, and state.json agreeing with `current`.
#[track_caller]
fn assert_recovered(host: &Host, when: &str) {
    let state = host.state_dir();
    assert_eq!(host.staging_entries(), 0, "{when}: staging debris");
    let temporaries: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(temporaries.is_empty(), "{when}: {temporaries:?}");
    assert_eq!(
        host.state()["current"]["id"].as_str(),
        host.current().as_deref(),
        "{when}: state.json disagrees with current"
    );
}

/// The stage `status.json` shows, for the record of where kills landed (`idle` or an earlier
/// run's stage: the process was still starting: config, S3 client, lock, reconcile).
fn stage(host: &Host) -> String {
    std::fs::read(host.dir.path().join("run/status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["stage"].as_str().map(str::to_string))
        .unwrap_or_else(|| "(none yet)".into())
}

#[test]
fn sigkill_at_random_points_never_leaves_a_partial_release() {
    let kills: usize = std::env::var("DEPLOYD_CRASH_KILLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let host = Host::new();
    let mut commits = BTreeMap::new();
    for (i, v) in VERSIONS.iter().enumerate() {
        let commit = format!("{}", i + 1).repeat(16);
        host.upload(&format!("web/{v}.tar.gz"), &artifact(v, i as u64), &commit);
        commits.insert(v.to_string(), commit);
    }
    // How long one deployment takes here: kills are spread over that span and a bit more.
    let start = Instant::now();
    host.deploy("web/v1.tar.gz", &[]).ok();
    let span = start.elapsed().mul_f64(1.2);
    eprintln!("one deployment: {:?}", start.elapsed());

    let mut rng = fastrand::Rng::with_seed(
        std::env::var("DEPLOYD_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(13),
    );
    let mut landed: BTreeMap<String, usize> = BTreeMap::new();
    let mut exited_first = 0;
    for kill in 0..kills {
        let serving = std::fs::read_to_string(host.current_dir().join("VERSION")).ok();
        let version = *VERSIONS
            .iter()
            .filter(|v| Some(**v) != serving.as_deref())
            .nth(rng.usize(..2))
            .unwrap();
        let key = format!("web/{version}.tar.gz");
        let daemon = kill % 2 == 1;
        let mut cmd = if daemon {
            host.write_deployment_env(&key);
            host.command(&["run"])
        } else {
            host.command(&["deploy", "--bucket", &host.bucket, "--key", &key])
        };
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(span.mul_f64(rng.f64()));
        landed
            .entry(stage(&host))
            .and_modify(|n| *n += 1)
            .or_insert(1);
        if child.try_wait().unwrap().is_some() {
            exited_first += 1;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let what = if daemon { "run" } else { "deploy" };
        assert_consistent(
            &host,
            &commits,
            &format!("after kill {kill} ({what} of {version})"),
        );

        // Every tenth kill, a run to completion (deploy and daemon in turn) must recover.
        if kill % 10 == 9 {
            let when = format!("recovery after kill {kill}");
            if kill % 20 == 19 {
                host.write_deployment_env(&key);
                let mut d = common::daemon::Daemon::start(&host, Default::default());
                // This daemon's own first deployment, not one a killed daemon recorded.
                d.wait_for(Duration::from_secs(30), &when, || {
                    d.log().contains("deployment finished")
                });
                assert_eq!(d.stop(Duration::from_secs(10)), 0, "{}", d.log());
            } else {
                let run = host.deploy(&key, &["--force"]);
                run.ok();
            }
            assert_recovered(&host, &when);
            assert_consistent(&host, &commits, &when);
        }
    }
    eprintln!(
        "{kills} kills, {exited_first} after the process had already exited; stage at the kill: {landed:?}"
    );
    assert!(
        exited_first < kills / 4,
        "most kills must land mid-deployment, not after it ({exited_first} of {kills})"
    );
}
