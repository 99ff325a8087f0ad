//! `scripts/demo`, run as a new user would run it, with its output checked: the container
//! path (v1 deployed, v2 rebuilt with cache hits, v3 unhealthy and rolled back, v2 serving at
//! the end) whenever a Docker engine answers, and mandatory when `CI` is set; and the
//! files-only path it falls back to where no engine answers.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::docker::{engine_answers, sh};

/// Runs the demo with the binary under test; returns its exit code and output (stdout and
/// stderr, interleaved as a terminal would show them).
fn run_demo(env: &[(&str, &str)]) -> (i32, String) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg("exec ./scripts/demo 2>&1")
        .current_dir(repo)
        .env("DEPLOYD_BIN", env!("CARGO_BIN_EXE_deployd"))
        .env("RUST_LOG", "info")
        .env_remove("DEPLOYD_CONFIG")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run scripts/demo");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The text after the `== title` line that starts with `title`, up to the next `==` line.
fn section<'a>(output: &'a str, title: &str) -> &'a str {
    let start = output
        .find(&format!("== {title}"))
        .unwrap_or_else(|| panic!("no `== {title}` section in:\n{output}"));
    let rest = &output[start..];
    let body = &rest[rest.find('\n').map_or(rest.len(), |i| i + 1)..];
    &body[..body.find("\n== ").unwrap_or(body.len())]
}

#[test]
fn the_demo_builds_caches_rolls_back_and_ends_with_v2_serving() {
    if !engine_answers() {
        return;
    }
    let (code, out) = run_demo(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("== no containers"), "{out}");

    let v1 = section(&out, "v1: deployd deploy");
    assert!(v1.contains("-> demo web v1"), "{v1}");

    let v2 = section(&out, "v2:");
    let hits: u64 = v2
        .lines()
        .find_map(|l| l.strip_prefix("v2 build: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `v2 build: N steps from cache` line:\n{v2}"));
    assert!(hits > 0, "the code change reused cached layers:\n{v2}");
    assert!(v2.contains("-> demo web v2"), "{v2}");

    let v3 = section(&out, "v3:");
    assert!(
        v3.contains("v3: deployd deploy exited 75 (rolled back: v2 serves again)"),
        "{v3}"
    );
    assert!(v3.contains("was rolled back to"), "deployd said so:\n{v3}");
    assert!(
        v3.trim_end().ends_with("-> demo web v2"),
        "v2 serves after the rollback:\n{v3}"
    );

    let releases = section(&out, "deployd releases");
    let serving = releases
        .lines()
        .find(|l| l.contains(" serving "))
        .unwrap_or_else(|| panic!("{releases}"));
    assert!(serving.contains("2222222b"), "{releases}");
    assert!(
        releases
            .lines()
            .any(|l| l.contains(" rolled back ") && l.contains("3333333c")),
        "{releases}"
    );
    let status = section(&out, "deployd status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("serving") && l.contains("commit 2222222b")),
        "{status}"
    );

    // The demo leaves none of its containers or images behind.
    let app = out
        .split_whitespace()
        .find(|w| w.starts_with("deployd-demo-") && w[13..].chars().all(|c| c.is_ascii_digit()))
        .unwrap_or_else(|| panic!("the demo's app name:\n{out}"));
    let left = sh(&format!(
        "docker ps -aq --filter label=com.docker.compose.project={app}; docker images -q --filter label=deployd.project={app}"
    ));
    assert_eq!(
        left.trim(),
        "",
        "the demo removed its containers and images"
    );
}

#[test]
fn without_an_engine_the_demo_deploys_files_and_says_why() {
    let (code, out) = run_demo(&[("DOCKER_HOST", "unix:///nonexistent/docker.sock")]);
    assert_eq!(code, 0, "{out}");
    let why = out
        .lines()
        .find(|l| l.starts_with("== no containers: "))
        .unwrap_or_else(|| panic!("the demo says why it skips containers:\n{out}"));
    assert!(why.contains("no Docker engine answers"), "{why}");
    assert!(out.contains("deployed release "), "{out}");
    assert!(
        out.contains("nothing changed"),
        "the redeploy is a no-op:\n{out}"
    );
    assert!(out.contains("exit code 65 (65: bad data)"), "{out}");
    let status = section(&out, "deployd status");
    assert!(status.contains("commit 622d2103"), "{status}");
}
