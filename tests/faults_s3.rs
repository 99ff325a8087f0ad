//! A flaky S3, through the fault-injecting proxy in front of moto: 503 `SlowDown` bursts,
//! connections reset before and during an answer, bodies that stall or are shorter or longer
//! than their `Content-Length`. Transient faults are retried or resumed; a stall is detected
//! by `[s3] read_timeout`; past the attempts or `[s3] download_deadline` the deployment fails
//! with 69, and nothing partial is ever activated.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::time::{Duration, Instant};

use common::proxy::{self, Behaviour, Fault, Proxy};
use common::{Host, Run, app, moto};

/// A host serving v1, with v2 (≈1 MiB, so bodies come in many pieces) uploaded and its S3
/// traffic routed through a proxy whose GETs of v2 meet `fault` from the `from`th one on,
/// `count` times; `s3` lines go into `[s3]`.
fn flaky(fault: Fault, from: usize, count: usize, s3: &str) -> (Host, Proxy, String) {
    let host = Host::new();
    host.upload("web/v1.tar.gz", &app("v1").gz(), "1111111111111111");
    host.deploy("web/v1.tar.gz", &[]).ok();
    let r1 = host.current().unwrap();
    let noise = common::noise(13, 1 << 20);
    let v2 = app("v2").file("./noise.bin", 0o644, &noise).gz();
    host.upload("web/v2.tar.gz", &v2, "2222222222222222");
    let proxy = proxy::start(
        &moto().endpoint,
        Behaviour::Faulty {
            method: "GET",
            path: "v2.tar.gz",
            from,
            count,
            fault,
        },
    );
    host.set_s3(s3);
    host.route_s3_through(&proxy.endpoint);
    (host, proxy, r1)
}

fn deploy_v2(host: &Host) -> (Run, Duration) {
    let start = Instant::now();
    let run = host.deploy("web/v2.tar.gz", &[]);
    (run, start.elapsed())
}

#[track_caller]
fn assert_v2_serves(host: &Host, run: &Run) {
    run.ok();
    assert_eq!(host.served_version(), "v2");
    assert_eq!(host.staging_entries(), 0);
    assert_eq!(host.state()["last_attempt"]["outcome"], "deployed");
}

/// The GETs of v2 the proxy saw: (Range header, status).
fn gets(proxy: &Proxy) -> Vec<(Option<String>, Option<u16>)> {
    proxy
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains("v2.tar.gz"))
        .map(|r| (r.header("range").map(str::to_string), r.status))
        .collect()
}

#[test]
fn a_burst_of_503_slowdown_is_retried_with_backoff() {
    let (host, proxy, _) = flaky(Fault::Status(503), 0, 3, "");
    let (run, _) = deploy_v2(&host);
    assert_v2_serves(&host, &run);
    let gets = gets(&proxy);
    assert_eq!(proxy.faults(), 3);
    assert_eq!(
        gets.iter().map(|g| g.1).collect::<Vec<_>>(),
        [Some(503), Some(503), Some(503), Some(200)],
        "{gets:?}"
    );
}

#[test]
fn slowdown_past_the_attempts_fails_with_69_and_leaves_the_host_as_it_was() {
    let (host, proxy, r1) = flaky(Fault::Status(503), 0, 100, "attempts = 3");
    let (run, took) = deploy_v2(&host);
    run.fails_with(69, "s3://");
    assert!(
        run.error_line().contains("v2.tar.gz"),
        "{}",
        run.error_line()
    );
    assert_eq!(proxy.faults(), 3, "exactly [s3] attempts tries");
    assert!(took < Duration::from_secs(20), "gave up in {took:?}");
    host.assert_failed_intact(&r1, 69);
    assert_eq!(host.served_version(), "v1");
}

#[test]
fn a_connection_reset_before_the_answer_is_retried() {
    let (host, proxy, _) = flaky(Fault::Reset, 0, 2, "");
    let (run, _) = deploy_v2(&host);
    assert_v2_serves(&host, &run);
    assert_eq!(proxy.faults(), 2);
}

#[test]
fn a_connection_reset_mid_body_is_resumed_from_where_it_broke() {
    let (host, proxy, _) = flaky(Fault::ResetAfter { bytes: 200 << 10 }, 0, 1, "");
    let (run, _) = deploy_v2(&host);
    assert_v2_serves(&host, &run);
    let gets = gets(&proxy);
    assert_eq!(gets.len(), 2, "{gets:?}");
    let range = gets[1]
        .0
        .clone()
        .expect("the second GET is a range request");
    let offset: u64 = range
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(offset > 0 && offset < 200 << 10, "{range}");
}

#[test]
fn a_stalled_body_is_detected_by_the_read_timeout_and_resumed() {
    let (host, proxy, _) = flaky(
        Fault::Stall {
            bytes: 100 << 10,
            secs: 60,
        },
        0,
        1,
        "read_timeout = \"1s\"",
    );
    let (run, took) = deploy_v2(&host);
    assert_v2_serves(&host, &run);
    assert!(took < Duration::from_secs(15), "a 60 s stall took {took:?}");
    assert!(run.stderr.contains("read_timeout"), "{}", run.stderr);
    let gets = gets(&proxy);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(gets[1].0.is_some(), "resumed with a range: {gets:?}");
}

#[test]
fn a_body_shorter_than_its_content_length_announces_is_complete_when_every_byte_came() {
    // The header announces 4 KiB more than the object; the connection closes after the last
    // real byte. Every byte of the verified size arrived and the digest matches: deployed,
    // with no second request.
    let (host, proxy, _) = flaky(Fault::WrongLength { delta: 4096 }, 0, 1, "");
    let (run, _) = deploy_v2(&host);
    assert_v2_serves(&host, &run);
    assert_eq!(gets(&proxy).len(), 1, "{:?}", gets(&proxy));
}

#[test]
fn a_body_longer_than_its_content_length_announces_is_resumed() {
    // The header announces 4 KiB less than the object: the client stops there, early.
    let (host, proxy, _) = flaky(Fault::WrongLength { delta: -4096 }, 0, 1, "");
    let (run, _) = deploy_v2(&host);
    assert_v2_serves(&host, &run);
    let gets = gets(&proxy);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(gets[1].0.is_some(), "{gets:?}");
}

#[test]
fn stalls_past_the_download_deadline_fail_with_69() {
    let (host, _proxy, r1) = flaky(
        Fault::Stall {
            bytes: 100 << 10,
            secs: 60,
        },
        0,
        100,
        "read_timeout = \"1s\"\ndownload_deadline = \"3s\"",
    );
    let (run, took) = deploy_v2(&host);
    run.fails_with(69, "download_deadline");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    host.assert_failed_intact(&r1, 69);
}
