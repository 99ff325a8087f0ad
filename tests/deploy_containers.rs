//! The whole pipeline with containers: `deployd deploy` fetching a release from S3 and running
//! it on the real Docker engine, and every way a release can go wrong after activation.
//! Runs whenever the engine answers; mandatory when `CI` is set.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use common::docker::{App, Variant, engine, http_get};
use common::{Host, tar_gz_dir};

fn served(app: &App) -> String {
    let (status, body) = http_get(app.port, "/version");
    assert_eq!(status, 200, "{body}");
    body.trim().to_string()
}

#[test]
fn deploy_builds_runs_rolls_back_and_refuses_bad_releases() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if rt.block_on(engine()).is_none() {
        return;
    }
    let app = App::new("e2e");
    let mut host = Host::new();
    host.app = app.project.clone();
    host.write_config(
        "",
        "[containers]\nenabled = true\nhealth_timeout = \"8s\"\nhealth_grace = \"1s\"\n",
    );
    host.write_env(&format!("HOST_PORT={}\n", app.port));
    let publish = |name: &str, v: &Variant| {
        let dir = app.release(name, v);
        let key = format!("web/{name}.tar.gz");
        host.s3.publish(
            &host.bucket,
            &key,
            &tar_gz_dir(&dir),
            &format!("{name}{name}abcdef0123"),
        );
        key
    };

    let v1 = publish("v1", &Variant::new("v1"));
    host.deploy(&v1, &[]).ok();
    assert_eq!(served(&app), "v1");
    let r1 = host.current().unwrap();

    let v2 = publish("v2", &Variant::new("v2"));
    let run = host.deploy(&v2, &[]);
    run.ok();
    assert_eq!(served(&app), "v2");
    assert!(
        run.stderr.contains("cache_hits="),
        "build reports cache hits:\n{}",
        run.stderr
    );
    let r2 = host.current().unwrap();

    // Unhealthy: the new container never passes its healthcheck; v2 comes back.
    let mut sick = Variant::new("v3");
    sick.health_path = "/no-such-file".into();
    let v3 = publish("v3", &sick);
    let run = host.deploy(&v3, &[]);
    run.fails_with(75, "rolled back");
    assert_eq!(host.current().as_deref(), Some(r2.as_str()));
    assert_eq!(served(&app), "v2");
    assert_eq!(host.state()["last_attempt"]["outcome"], "rolled-back");
    assert_eq!(
        host.state()["previous_good"]["id"],
        r1.as_str(),
        "the rollback restored the records too"
    );

    // A broken Dockerfile: nothing is stopped, v2 keeps serving.
    let mut broken = Variant::new("v4");
    broken.extra_dockerfile = "RUN exit 3\n".into();
    let v4 = publish("v4", &broken);
    let run = host.deploy(&v4, &[]);
    assert_eq!(run.code, 65, "{}", run.stderr);
    assert_eq!(host.current().as_deref(), Some(r2.as_str()));
    assert_eq!(served(&app), "v2");

    // An unsupported compose key is refused before any build.
    let mut odd = Variant::new("v5");
    odd.extra_service_yaml = "    privileged: true\n".into();
    let v5 = publish("v5", &odd);
    let images_before = app.image_tags();
    let run = host.deploy(&v5, &[]);
    run.fails_with(65, "privileged");
    assert!(run.error_line().contains("backend"), "{}", run.error_line());
    assert_eq!(app.image_tags(), images_before, "nothing was built");
    assert_eq!(served(&app), "v2");
    // v1, v2 and the rolled-back v3 (kept for inspection until retention); v4 and v5 left nothing.
    assert_eq!(
        host.releases().len(),
        3,
        "refused releases leave no tree behind"
    );

    // On demand: back to v1, containers included.
    host.run(&["rollback"]).ok();
    assert_eq!(host.current().as_deref(), Some(r1.as_str()));
    assert_eq!(served(&app), "v1");

    // clear-cache through the command: the serving release keeps serving, the next build is cold.
    let run = host.run(&["clear-cache"]);
    run.ok();
    assert!(
        run.stdout.contains("the next build starts without cache"),
        "{}",
        run.stdout
    );
    assert_eq!(served(&app), "v1");
    let run = host.deploy(&v2, &["--force"]);
    run.ok();
    assert!(
        run.stderr.contains("cache_hits=0"),
        "a cold build after clear-cache:\n{}",
        run.stderr
    );
    assert_eq!(served(&app), "v2");
}

/// When the new release is unhealthy and the previous release cannot be started again
/// either, deployd says so: the attempt failed, nothing claims the previous release serves.
#[test]
fn a_rollback_that_fails_too_is_reported_as_a_failure() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if rt.block_on(engine()).is_none() {
        return;
    }
    let app = App::new("rbfail");
    let mut host = Host::new();
    host.app = app.project.clone();
    host.write_config(
        "",
        "[containers]\nenabled = true\nhealth_timeout = \"6s\"\nhealth_grace = \"1s\"\n",
    );
    host.write_env(&format!("HOST_PORT={}\n", app.port));
    let publish = |name: &str, v: &Variant| {
        let key = format!("web/{name}.tar.gz");
        let body = tar_gz_dir(&app.release(name, v));
        host.s3.publish(
            &host.bucket,
            &key,
            &body,
            &format!("{name}{name}abcdef0123"),
        );
        key
    };
    let v1 = publish("v1", &Variant::new("v1"));
    host.deploy(&v1, &[]).ok();
    assert_eq!(served(&app), "v1");
    let r1 = host.current().unwrap();
    // The previous release's image is gone: restarting it will fail.
    let tag = format!("{}:{r1}", app.image_repo("backend"));
    common::docker::sh(&format!("docker rmi {tag}"));

    let mut sick = Variant::new("v2");
    sick.health_path = "/no-such-file".into();
    let v2 = publish("v2", &sick);
    let run = host.deploy(&v2, &[]);
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert_ne!(run.code, 75, "not a rollback that worked: {}", run.stderr);
    let line = run.error_line();
    assert!(line.contains("failed too"), "{line}");
    assert!(!line.contains("serving again"), "{line}");
    let state = host.state();
    assert_eq!(state["last_attempt"]["outcome"], "failed", "{state}");
    let status = host.run(&["status", "--json"]);
    assert!(
        status.stdout.contains("failed too"),
        "status tells the truth:\n{}",
        status.stdout
    );
}
