//! A Docker engine that fails: it answers 500, restarts in the middle of a build or of a
//! health wait, or its socket is missing at boot. The engine is shared on the test machines
//! and must not be stopped, so the failures come from a proxy on a unix socket in front of it
//! (the deployd child gets `DOCKER_HOST=unix://<proxy>`): the real engine does the work, the
//! proxy answers 500 or closes every connection and refuses new ones for a while, as an
//! engine restarting does. Every time: the right exit code, the previous release's containers
//! keep serving, and the error says the engine failed rather than that the release was
//! unhealthy. Runs whenever the engine answers; mandatory when `CI` is set.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::docker::{App, Variant, engine, http_get};
use common::proxy::{self, Behaviour, Fault, Proxy};
use common::{Host, Run, tar_gz_dir};

/// The engine's own socket.
fn engine_socket() -> PathBuf {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock"))
}

fn served(app: &App) -> String {
    let (status, body) = http_get(app.port, "/version");
    assert_eq!(status, 200, "{body}");
    body.trim().to_string()
}

/// A host with containers on, serving v1 of `app` (deployed straight through the engine's
/// own socket), with v2 published; `extra` goes into `[containers]`.
fn serving_v1(name: &str, extra: &str) -> Option<(App, Host, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(engine())?;
    let app = App::new(name);
    let mut host = Host::new();
    host.app = app.project.clone();
    host.write_config(
        "",
        &format!(
            "[containers]\nenabled = true\nhealth_timeout = \"20s\"\nhealth_grace = \"1s\"\n{extra}\n"
        ),
    );
    host.write_env(&format!("HOST_PORT={}\n", app.port));
    for v in ["v1", "v2"] {
        let body = tar_gz_dir(&app.release(v, &Variant::new(v)));
        let commit = format!("{v}{v}abcdef0123");
        host.s3
            .publish(&host.bucket, &format!("web/{v}.tar.gz"), &body, &commit);
    }
    host.deploy("web/v1.tar.gz", &[]).ok();
    assert_eq!(served(&app), "v1");
    let r1 = host.current().unwrap();
    Some((app, host, r1))
}

/// A proxy in front of the engine with `behaviour`, its socket in the host's directory.
fn engine_proxy(host: &Host, behaviour: Behaviour) -> Proxy {
    proxy::start_unix(
        &engine_socket(),
        &host.dir.path().join("docker.sock"),
        behaviour,
    )
}

/// `deployd deploy` of v2 with the engine at `socket`.
fn deploy_v2(host: &Host, socket: &Path) -> (Run, Duration) {
    let start = Instant::now();
    let mut cmd = host.command(&["deploy", "--bucket", &host.bucket, "--key", "web/v2.tar.gz"]);
    cmd.env("DOCKER_HOST", format!("unix://{}", socket.display()));
    (Run::from(cmd.output().unwrap()), start.elapsed())
}

/// After a failed v2: v1 serves, from `current` to its containers.
#[track_caller]
fn v1_still_serves(app: &App, host: &Host, r1: &str) {
    assert_eq!(host.current().as_deref(), Some(r1));
    assert_eq!(host.staging_entries(), 0);
    assert_eq!(served(app), "v1");
}

#[test]
fn an_engine_answering_500_is_reported_as_an_engine_failure_and_rolled_back() {
    let Some((app, host, r1)) = serving_v1("e500", "") else {
        return;
    };
    let proxy = engine_proxy(
        &host,
        Behaviour::Faulty {
            method: "POST",
            path: "/containers/create",
            from: 0,
            count: 1,
            fault: Fault::Status(500),
        },
    );
    let (run, _) = deploy_v2(&host, Path::new(&proxy.endpoint));
    run.fails_with(
        69,
        "the Docker engine failed while starting service `backend`",
    );
    let line = run.error_line();
    assert!(line.contains("creating container"), "{line}");
    assert!(line.contains("rolled back to"), "{line}");
    assert!(!line.contains("healthy"), "not a health failure: {line}");
    assert_eq!(proxy.faults(), 1);
    v1_still_serves(&app, &host, &r1);
    let state = host.state();
    assert_eq!(state["last_attempt"]["outcome"], "rolled-back", "{state}");
    assert_eq!(state["last_attempt"]["exit_code"], 69, "{state}");
}

#[test]
fn an_engine_restarting_mid_build_fails_with_69_and_the_previous_release_keeps_serving() {
    let Some((app, host, r1)) = serving_v1("restart-build", "") else {
        return;
    };
    let proxy = engine_proxy(
        &host,
        Behaviour::Faulty {
            method: "POST",
            path: "/build",
            from: 0,
            count: 1,
            fault: Fault::Outage {
                bytes: 200,
                secs: 3,
            },
        },
    );
    let (run, _) = deploy_v2(&host, Path::new(&proxy.endpoint));
    // Whether the cut lands in the request or in the progress stream decides between "call
    // failed" and "stopped answering"; both are engine failures naming the build.
    run.fails_with(69, "while building image");
    assert!(
        run.error_line().contains("Docker engine"),
        "an engine failure, not the release's: {}",
        run.error_line()
    );
    v1_still_serves(&app, &host, &r1);
    assert_eq!(
        host.releases(),
        vec![r1.clone()],
        "the unbuilt release was removed"
    );
    host.assert_failed_intact(&r1, 69);
}

#[test]
fn an_engine_restarting_during_the_health_wait_is_waited_for() {
    let Some((app, host, _)) = serving_v1("restart-health", "") else {
        return;
    };
    let proxy = engine_proxy(
        &host,
        Behaviour::Faulty {
            method: "POST",
            path: "/start",
            from: 0,
            count: 1,
            fault: Fault::Outage {
                bytes: u64::MAX,
                secs: 3,
            },
        },
    );
    let (run, _) = deploy_v2(&host, Path::new(&proxy.endpoint));
    run.ok();
    assert!(
        run.stderr.contains("did not answer; asking again"),
        "{}",
        run.stderr
    );
    assert_eq!(proxy.faults(), 1);
    assert_eq!(served(&app), "v2");
}

#[test]
fn a_socket_missing_at_boot_is_waited_for() {
    let Some((app, host, _)) = serving_v1("late-socket", "engine_wait = \"60s\"") else {
        return;
    };
    let socket = host.dir.path().join("late.sock");
    let (late, path) = (engine_socket(), socket.clone());
    let appears = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        proxy::start_unix(&late, &path, Behaviour::PassThrough)
    });
    let (run, took) = deploy_v2(&host, &socket);
    let _proxy = appears.join().unwrap();
    run.ok();
    assert!(run.stderr.contains("waiting for docker"), "{}", run.stderr);
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert_eq!(served(&app), "v2");
}

#[test]
fn an_engine_that_never_answers_fails_with_69_within_engine_wait() {
    let Some((app, host, r1)) = serving_v1("no-socket", "engine_wait = \"2s\"") else {
        return;
    };
    let (run, took) = deploy_v2(&host, &host.dir.path().join("nothing.sock"));
    run.fails_with(69, "the Docker engine did not answer");
    assert!(took < Duration::from_secs(15), "{took:?}");
    v1_still_serves(&app, &host, &r1);
    host.assert_failed_intact(&r1, 69);
}
