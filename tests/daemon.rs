//! `deployd run` as systemd runs it: a real child process, a real `NOTIFY_SOCKET` datagram
//! socket bound by the test, real signals, real trigger files, a real S3 server.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::time::{Duration, Instant};

use common::daemon::{Daemon, Notify, Options};
use common::{Host, app, moto, proxy};

/// `deployd run` with `NOTIFY_SOCKET` pointing at a socket file bound by the test.
fn start(host: &Host) -> Daemon {
    Daemon::start(host, Options::default().notify(Notify::Path))
}

/// A host whose environment file names `key`, where `app(version)` was uploaded.
fn published_host(key: &str, version: &str) -> Host {
    let host = Host::new();
    host.upload(key, &app(version).gz(), "0123456789abcdef");
    host.write_deployment_env(key);
    host
}

fn attempts(host: &Host) -> Vec<serde_json::Value> {
    host.state()["history"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn notify_sequence_is_ready_reloading_ready_stopping() {
    let host = published_host("web/v1.tar.gz", "v1");
    let mut d = start(&host);
    let first = d.ready();
    assert!(
        first.iter().any(|m| m.starts_with("STATUS=verifying")),
        "{first:?}"
    );
    let ready = first.last().unwrap();
    assert!(
        ready.contains("STATUS=serving "),
        "READY carries what serves: {ready}"
    );
    assert!(host.current().is_some());

    d.signal(libc::SIGHUP);
    let reload = d.ready_within(Duration::from_secs(10));
    let reloading = reload
        .iter()
        .position(|m| m.starts_with("RELOADING=1\nMONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 with MONOTONIC_USEC first: {reload:?}"));
    assert_eq!(reloading, 0, "{reload:?}");
    let usec: u64 = reload[0]
        .split("MONOTONIC_USEC=")
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now = ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1000;
    assert!(
        now >= usec && now - usec < 10_000_000,
        "MONOTONIC_USEC {usec} vs now {now}"
    );

    d.signal(libc::SIGTERM);
    d.until(Duration::from_secs(10), |m| m.starts_with("STOPPING=1"));
    let (code, _) = d.wait_exit(Duration::from_secs(10));
    assert_eq!(code, 0);
}

#[test]
fn abstract_socket_and_watchdog_pings() {
    let host = published_host("web/v1.tar.gz", "v1");
    let d = Daemon::start(
        &host,
        Options::default()
            .notify(Notify::Abstract)
            .env("WATCHDOG_USEC", "300000"),
    );
    d.ready();
    let start = Instant::now();
    for _ in 0..3 {
        d.until(Duration::from_secs(5), |m| m == "WATCHDOG=1");
    }
    // Three pings at half of 300 ms arrive well within a second.
    assert!(
        start.elapsed() < Duration::from_millis(1200),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn trigger_files_redeploy_and_hostile_ones_are_rejected() {
    let host = published_host("web/v1.tar.gz", "v1");
    host.upload("web/v2.tar.gz", &app("v2").gz(), "2222222222222222");
    host.upload("web/v3.tar.gz", &app("v3").gz(), "3333333333333333");
    let mut d = start(&host);
    d.ready();
    let triggers = host.dir.path().join("run/triggers");

    // `deployd trigger` drops a file; the daemon deploys the key it names.
    let dropped = Instant::now();
    host.trigger("web/v2.tar.gz", &["--reason", "test"]).ok();
    let mut started = None;
    d.wait_for(Duration::from_secs(15), "v2 to serve", || {
        if started.is_none()
            && std::fs::read_to_string(host.dir.path().join("run/status.json"))
                .is_ok_and(|s| s.contains("web/v2.tar.gz"))
        {
            started = Some(dropped.elapsed());
        }
        host.state()["current"]["key"] == "web/v2.tar.gz"
    });
    eprintln!("file drop -> deployment start: {:?}", started.unwrap());

    // Hostile files: each is moved aside with a note, and the daemon stays up.
    std::fs::write(triggers.join("bad.toml"), "this is = = not toml").unwrap();
    std::fs::write(triggers.join("unknown.toml"), "colour = \"blue\"\n").unwrap();
    std::fs::write(triggers.join("huge.toml"), vec![b'#'; 100 << 10]).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", triggers.join("link.toml")).unwrap();
    let owned = triggers.join(".owned.tmp");
    std::fs::write(&owned, "").unwrap();
    std::os::unix::fs::chown(&owned, Some(12345), Some(12345)).unwrap();
    std::fs::rename(&owned, triggers.join("owned.toml")).unwrap();
    let rejected = triggers.join("rejected");
    d.wait_for(Duration::from_secs(10), "five rejections", || {
        std::fs::read_dir(&rejected)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "error"))
                    .count()
            })
            .unwrap_or(0)
            == 5
    });
    let note = std::fs::read_to_string(rejected.join("owned.toml.error")).unwrap();
    assert!(note.contains("12345"), "{note}");
    assert!(d.is_running(), "daemon still running");

    host.trigger("web/v3.tar.gz", &[]).ok();
    d.wait_for(Duration::from_secs(15), "v3 to serve", || {
        host.state()["current"]["key"] == "web/v3.tar.gz"
    });
    assert_eq!(host.served_version(), "v3");
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

#[test]
fn a_storm_of_sighups_causes_at_most_two_deployments() {
    let host = published_host("web/v1.tar.gz", "v1");
    let d = start(&host);
    d.ready();
    let before = attempts(&host).len();
    let start = Instant::now();
    for _ in 0..1000 {
        d.signal(libc::SIGHUP);
    }
    assert!(start.elapsed() < Duration::from_secs(1));
    // Let every queued deployment finish: READY=1 follows the last one.
    d.ready_within(Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(2));
    let after = attempts(&host);
    let storm: Vec<_> = after[..after.len() - before]
        .iter()
        .filter(|a| a["trigger"] == "SIGHUP")
        .collect();
    assert!(
        (1..=2).contains(&storm.len()),
        "{} deployments: {storm:?}",
        storm.len()
    );
}

#[test]
fn sigterm_mid_download_exits_in_time_and_restart_reconciles() {
    let slow = proxy::start(
        &moto().endpoint,
        proxy::Behaviour::Throttle {
            bytes_per_second: 2 << 20,
        },
    );
    let host = published_host("web/v1.tar.gz", "v1");
    host.write_config("", "[daemon]\nstop_timeout = \"5s\"\n");
    host.route_s3_through(&slow.endpoint);
    let noise = common::noise(7, 12 << 20);
    let big = app("big").file("./noise.bin", 0o644, &noise).gz();
    host.upload("web/big.tar.gz", &big, "bbbbbbbbbbbbbbbb");

    let mut d = start(&host);
    d.ready();
    let v1 = host.current().unwrap();
    host.trigger("web/big.tar.gz", &[]).ok();
    d.wait_for(
        Duration::from_secs(15),
        "the download to be under way",
        || {
            std::fs::read_to_string(host.dir.path().join("run/status.json")).is_ok_and(|s| {
                let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
                v["stage"] == "fetching" && v["bytes_done"].as_u64().unwrap_or(0) > (1 << 20)
            })
        },
    );
    d.signal(libc::SIGTERM);
    let (code, took) = d.wait_exit(Duration::from_secs(7));
    assert_eq!(code, 0, "{}", d.log());
    assert!(took < Duration::from_secs(5), "stopped in {took:?}");
    eprintln!("SIGTERM mid-download -> exit in {took:?}");
    assert_eq!(
        host.current().as_deref(),
        Some(v1.as_str()),
        "current untouched"
    );
    assert_eq!(
        host.staging_entries(),
        0,
        "the abandoned download left no staging"
    );

    // Simulate a crash's leftovers, then restart: reconcile cleans and corrects.
    std::fs::create_dir_all(host.state_dir().join("staging/12345-debris/a")).unwrap();
    let mut state = host.state();
    state["current"]["id"] = "nonsense".into();
    std::fs::write(host.state_dir().join("state.json"), state.to_string()).unwrap();
    let d = start(&host);
    d.ready();
    assert_eq!(host.staging_entries(), 0);
    assert_eq!(host.current().as_deref(), Some(v1.as_str()));
    assert_eq!(host.state()["current"]["id"], v1.as_str());
    assert!(d.log().contains("state.json disagreed"), "{}", d.log());
}

#[test]
fn a_body_that_breaks_off_is_resumed_with_a_range_request() {
    let cutter = proxy::start(
        &moto().endpoint,
        proxy::Behaviour::CutAfter { bytes: 1 << 20 },
    );
    let host = Host::new();
    host.route_s3_through(&cutter.endpoint);
    let noise = common::noise(3, 4 << 20);
    let body = app("resumed").file("./noise.bin", 0o644, &noise).gz();
    let sha = host.upload("web/r.tar.gz", &body, "cccccccccccccccc");
    let run = host.deploy("web/r.tar.gz", &[]);
    run.ok();
    assert_eq!(cutter.cuts(), 1);
    assert!(
        run.stderr.contains("resuming with a range request"),
        "{}",
        run.stderr
    );
    // The second GET asks only for what the first one did not deliver.
    let gets: Vec<_> = cutter
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains("/web/r.tar.gz"))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:#?}");
    assert_eq!(gets[0].header("range"), None, "{gets:#?}");
    let offset: u64 = gets[1]
        .header("range")
        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .unwrap_or_else(|| panic!("an open-ended Range on the retry: {gets:#?}"));
    assert!(offset > 0 && offset < 1 << 20, "{offset}");
    assert_eq!(gets[1].status, Some(206), "{gets:#?}");
    assert_eq!(host.manifest()["sha256"], sha);
    assert_eq!(
        std::fs::read(host.current_dir().join("noise.bin")).unwrap(),
        noise
    );
}

#[test]
fn status_wait_follows_the_daemons_first_deployment() {
    let host = Host::new();
    host.write_deployment_env("web/missing.tar.gz");
    let d = start(&host);
    let run = host.run(&["status", "--wait", "--timeout", "30s"]);
    assert_eq!(
        run.code, 66,
        "the failed first deployment's code: {}\n{}",
        run.stdout, run.stderr
    );
    d.ready();
    drop(d);

    let host = published_host("web/v1.tar.gz", "v1");
    let _d = start(&host);
    let run = host.run(&["status", "--wait", "--timeout", "30s"]);
    run.ok();
    assert!(run.stdout.contains("serving"), "{}", run.stdout);
}

#[test]
fn an_invalid_config_on_sighup_is_refused_and_the_old_one_kept() {
    let host = published_host("web/v1.tar.gz", "v1");
    host.upload("web/v2.tar.gz", &app("v2").gz(), "2222222222222222");
    let d = start(&host);
    d.ready();
    let good = std::fs::read_to_string(&host.config).unwrap();
    std::fs::write(&host.config, format!("{good}\n[nonsense]\nx = 1\n")).unwrap();
    d.signal(libc::SIGHUP);
    let msgs = d.ready_within(Duration::from_secs(10));
    assert!(
        msgs.iter().any(|m| m.contains("config reload failed")),
        "{msgs:?}"
    );
    assert!(d.log().contains("keeping the running one"), "{}", d.log());
    // The running config (with its S3 endpoint and state dir) still works.
    std::fs::write(&host.config, &good).unwrap();
    host.trigger("web/v2.tar.gz", &[]).ok();
    d.wait_for(Duration::from_secs(15), "v2 to serve", || {
        host.state()["current"]["key"] == "web/v2.tar.gz"
    });
}
