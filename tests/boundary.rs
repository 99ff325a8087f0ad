//! The boundary between an app's containers and the host: each probe either is refused (before
//! anything is built) or is contained, on the real Docker engine where the probe needs one.
//!
//! - release binds are read-only and resolved with no symlink component before every create and
//!   start, so a container cannot plant `data -> /` for the engine to follow on a restart;
//! - volume and network names: no `host`, `none`, `container:*`, paths; only the app's own
//!   unless listed in `[containers] allowed_external`, whether the file says `external: true`
//!   or only sets `name:`; an object of another project whose name starts like the app's is not
//!   used either;
//! - every container runs with `no-new-privileges`, a pids limit and dropped capabilities;
//! - built images are tagged only under the app's own repositories;
//! - `privileged`, `cap_add`, devices, host namespaces, `docker.sock` and binds outside the
//!   release stay refused.
//!
//! Engine tests run whenever the engine answers, and fail (not skip) when `CI` is set and it does
//! not.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::docker::{App, BASE_IMAGE, ENGINE_LOCK, deploy, deploy_with, engine, settings, sh};
use deployd::config::ContainersConfig;
use deployd::containers::{ContainerError, Engine, Project, ReleaseRef};
use deployd::error::ExitCode;

fn rel<'a>(id: &'a str, dir: &'a Path) -> ReleaseRef<'a> {
    ReleaseRef {
        id,
        dir,
        commit: None,
    }
}

/// Load a compose file (one service `web` plus `extra` top-level YAML) in a fresh release.
fn load_with(
    service: &str,
    top: &str,
    s: &ContainersConfig,
) -> (tempfile::TempDir, Result<Project, ContainerError>) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r1");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(
        dir.join("docker-compose.yml"),
        format!("services:\n  web:\n    image: {BASE_IMAGE}\n{service}{top}"),
    )
    .unwrap();
    let result = Engine::load_project("app", &rel("r1", &dir), &BTreeMap::new(), s);
    (root, result)
}

/// The security refusal of a compose fragment: `<key>: <why>`.
fn forbidden(service: &str, top: &str, s: &ContainersConfig) -> String {
    match load_with(service, top, s).1 {
        Err(e @ ContainerError::Forbidden { .. }) => {
            assert_eq!(e.exit_code(), 65);
            let ContainerError::Forbidden { key, why, .. } = e else {
                unreachable!()
            };
            format!("{key}: {why}")
        }
        other => panic!("{service}{top} was not refused for security: {other:?}"),
    }
}

#[test]
fn names_that_leave_the_app_are_refused() {
    let s = ContainersConfig::default();
    // (b) another container's network namespace; (c) the host's.
    let got = forbidden(
        "",
        "networks:\n  default:\n    name: \"container:db\"\n",
        &s,
    );
    assert!(
        got.contains("another container's network namespace"),
        "{got}"
    );
    let got = forbidden("", "networks:\n  default:\n    name: host\n", &s);
    assert!(got.contains("host's network namespace"), "{got}");
    let got = forbidden("", "networks:\n  default:\n    driver: host\n", &s);
    assert!(got.contains("host's network namespace"), "{got}");
    let got = forbidden("", "networks:\n  lan:\n    driver: macvlan\n", &s);
    assert!(got.contains("physical network"), "{got}");
    // (d) other projects' volumes and networks: `external: true` or `name:` alone.
    let mount = "    volumes:\n      - data:/data\n";
    for top in [
        "volumes:\n  data:\n    external: true\n",
        "volumes:\n  data:\n    name: otherapp_data\n",
        "volumes:\n  data:\n    external:\n      name: otherapp_data\n",
    ] {
        let got = forbidden(mount, top, &s);
        assert!(got.contains("allowed_external"), "{top}: {got}");
    }
    let got = forbidden(
        "",
        "networks:\n  default:\n    name: otherapp_default\n    external: true\n",
        &s,
    );
    assert!(got.contains("networks.default"), "{got}");
    let got = forbidden(mount, "volumes:\n  data:\n    name: /etc\n", &s);
    assert!(got.contains("not a plain name"), "{got}");
    let got = forbidden(
        mount,
        "volumes:\n  data:\n    driver_opts: {type: none, o: bind, device: /}\n",
        &s,
    );
    assert!(got.contains("any host path"), "{got}");
    // Listed by the operator: allowed, and marked so.
    let allowed = ContainersConfig {
        allowed_external: vec!["otherapp_data".into()],
        ..ContainersConfig::default()
    };
    let (_, p) = load_with(
        mount,
        "volumes:\n  data:\n    name: otherapp_data\n",
        &allowed,
    );
    let v = &p.unwrap().volumes[0];
    assert!(v.allowed_external && v.engine_name == "otherapp_data");
    // The app's own names pass.
    let (_, p) = load_with(mount, "volumes:\n  data:\n    name: app_data\n", &s);
    assert_eq!(p.unwrap().volumes[0].engine_name, "app_data");
}

#[test]
fn host_access_stays_refused() {
    let s = ContainersConfig::default();
    for (service, key) in [
        ("    privileged: true\n", "privileged"),
        ("    cap_add: [SYS_ADMIN]\n", "cap_add"),
        ("    devices: [\"/dev/sda:/dev/sda\"]\n", "devices"),
        ("    network_mode: host\n", "network_mode"),
        ("    network_mode: \"container:db\"\n", "network_mode"),
        ("    pid: host\n", "pid"),
        ("    ipc: host\n", "ipc"),
        ("    userns_mode: host\n", "userns_mode"),
        ("    volumes_from: [other]\n", "volumes_from"),
        (
            "    security_opt: [\"seccomp:unconfined\"]\n",
            "security_opt",
        ),
        (
            "    volumes: [\"/var/run/docker.sock:/var/run/docker.sock\"]\n",
            "volumes",
        ),
        ("    volumes: [\"/etc:/host-etc:ro\"]\n", "volumes"),
        ("    volumes: [\"../:/up\"]\n", "volumes"),
        ("    volumes: [\"~/.aws:/root/.aws\"]\n", "volumes"),
        ("    volumes: [\"./data:/data:rshared\"]\n", "volumes"),
        ("    tmpfs: [\"/dev/shm2:dev,suid\"]\n", "tmpfs"),
    ] {
        let got = forbidden(service, "", &s);
        assert!(got.starts_with(&format!("{key}: ")), "{service}: {got}");
    }
    let got = forbidden(
        "    volumes: [\"/var/run/docker.sock:/var/run/docker.sock\"]\n",
        "",
        &s,
    );
    assert!(got.contains("Docker socket"), "{got}");
}

#[test]
fn a_symlink_inside_the_release_is_never_a_bind_source() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r1");
    std::fs::create_dir_all(dir.join("real")).unwrap();
    std::os::unix::fs::symlink("real", dir.join("link")).unwrap();
    std::os::unix::fs::symlink("/", dir.join("rootlink")).unwrap();
    for source in ["./link", "./link/", "./rootlink"] {
        std::fs::write(
            dir.join("docker-compose.yml"),
            format!("services:\n  web:\n    image: x\n    volumes: [\"{source}:/data:ro\"]\n"),
        )
        .unwrap();
        let err = Engine::load_project("app", &rel("r1", &dir), &BTreeMap::new(), &settings())
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ContainerError::Forbidden { .. })
                && (msg.contains("symlink") || msg.contains("outside the release")),
            "{source}: {msg}"
        );
    }
    // A missing source is named, with what to do instead.
    std::fs::write(
        dir.join("docker-compose.yml"),
        "services:\n  web:\n    image: x\n    volumes: [\"./uploads:/uploads\"]\n",
    )
    .unwrap();
    let err = Engine::load_project("app", &rel("r1", &dir), &BTreeMap::new(), &settings())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not exist in the release") && err.contains("named volume"),
        "{err}"
    );
    eprintln!(
        "bind sources resolved with {}",
        deployd::containers::bind_resolver()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_symlink_never_reaches_the_host_root() {
    let Some(engine) = engine().await else { return };
    let _lock = ENGINE_LOCK.read().await;
    let app = App::new("plant");
    // (a): the release mounted at /app, its `data` directory at /host; the container tries to
    // replace `data` with a link to `/` and is restarted by the engine.
    let compose = format!(
        r#"
services:
  planter:
    image: {BASE_IMAGE}
    restart: always
    volumes:
      - ./:/app
      - ./data:/host
    command: sh -c 'rm -rf /app/data 2>&1; ln -s / /app/data 2>&1; sleep 3600'
"#
    );
    let dir = app.write_release("r1", &compose, &[("data/marker", "release data\n")]);
    deploy(&engine, &app, &rel("r1", &dir), None).await.unwrap();
    let logs = sh(&format!("docker logs {} 2>&1", app.container("planter")));
    assert!(logs.contains("Read-only file system"), "{logs}");
    assert!(dir.join("data").is_dir() && !dir.join("data").is_symlink());
    sh(&format!("docker restart -t 1 {}", app.container("planter")));
    assert_eq!(
        app.exec("planter", "cat /host/marker"),
        (0, "release data\n".into())
    );
    assert_ne!(
        app.exec("planter", "ls /host/etc/hostname").0,
        0,
        "host root is mounted"
    );
    let canonical = dir.canonicalize().unwrap();
    let mounts = app.inspect(
        "planter",
        "{{range .Mounts}}{{.Source}} {{.Destination}} {{.RW}}|{{end}}",
    );
    assert!(
        mounts.contains(&format!("{} /host false", canonical.join("data").display())),
        "{mounts}"
    );

    // Something on the host plants the link between validation and start: the check before
    // create refuses it, and no container is created.
    let d2 = app.write_release(
        "r2",
        &compose.replace("sleep 3600", "sleep 3601"),
        &[("data/marker", "x\n")],
    );
    let project = app.load(&rel("r2", &d2));
    std::fs::remove_dir_all(d2.join("data")).unwrap();
    std::os::unix::fs::symlink("/", d2.join("data")).unwrap();
    engine
        .build(&project, &rel("r2", &d2), None, false)
        .await
        .unwrap();
    let err = engine
        .up(
            &project,
            &rel("r2", &d2),
            Some((&app.load(&rel("r1", &dir)), &rel("r1", &dir))),
            &settings(),
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("symlink") && msg.contains("rolled back to r1"),
        "{msg}"
    );
    assert_eq!(
        app.inspect("planter", "{{index .Config.Labels \"deployd.release\"}}"),
        "r1"
    );
    assert_eq!(
        app.exec("planter", "cat /host/marker"),
        (0, "release data\n".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_container_is_hardened() {
    let Some(engine) = engine().await else { return };
    let _lock = ENGINE_LOCK.read().await;
    let app = App::new("harden");
    let compose = format!(
        "services:\n  web:\n    image: {BASE_IMAGE}\n    command: sleep 3600\n    pids_limit: 100000\n"
    );
    let dir = app.write_release("r1", &compose, &[]);
    deploy(&engine, &app, &rel("r1", &dir), None).await.unwrap();
    assert_eq!(
        app.inspect("web", "{{.HostConfig.PidsLimit}} {{json .HostConfig.SecurityOpt}} {{json .HostConfig.CapDrop}}"),
        "4096 [\"no-new-privileges\"] [\"AUDIT_WRITE\",\"MKNOD\",\"NET_RAW\",\"SETFCAP\"]"
    );
    let (_, status) = app.exec("web", "grep -E '^(NoNewPrivs|CapBnd)' /proc/self/status");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:\t"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    for (cap, bit) in [
        ("NET_RAW", 13),
        ("MKNOD", 27),
        ("AUDIT_WRITE", 29),
        ("SETFCAP", 31),
    ] {
        assert_eq!(
            bounding & (1 << bit),
            0,
            "{cap} is still in the bounding set"
        );
    }
    assert_ne!(bounding & 1, 0, "CHOWN (Docker default) kept");

    // Configurable: every capability dropped, a lower pids limit.
    let strict = ContainersConfig {
        cap_drop: vec!["ALL".into()],
        pids_limit: 64,
        ..settings()
    };
    deploy_with(&engine, &app, &rel("r1", &dir), None, &strict)
        .await
        .unwrap();
    assert_eq!(
        app.inspect(
            "web",
            "{{.HostConfig.PidsLimit}} {{json .HostConfig.CapDrop}}"
        ),
        "64 [\"ALL\"]"
    );
    let (_, status) = app.exec("web", "grep CapBnd /proc/self/status");
    assert!(status.contains("CapBnd:\t0000000000000000"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_of_other_projects_are_not_used() {
    let Some(engine) = engine().await else { return };
    let _lock = ENGINE_LOCK.read().await;
    let app = App::new("vols");
    let p = &app.project;
    // Another project's volume whose name starts like this app's: `<project>-admin_data`.
    let lookalike = format!("{p}-admin_data");
    let other = format!("otherapp-{}_shared", std::process::id());
    sh(&format!(
        "docker volume create --label com.docker.compose.project={p}-admin {lookalike} >/dev/null && docker volume create {other} >/dev/null"
    ));
    let cleanup = scopeguard(format!(
        "docker rm -f -v $(docker ps -aq --filter volume={other}) ; docker volume rm -f {lookalike} {other}"
    ));
    let compose = |volume: &str| {
        format!(
            "services:\n  web:\n    image: {BASE_IMAGE}\n    command: sleep 3600\n    volumes:\n      - data:/data\nvolumes:\n  data:\n{volume}"
        )
    };
    let dir = app.write_release("r1", &compose(&format!("    name: {lookalike}\n")), &[]);
    let err = deploy(&engine, &app, &rel("r1", &dir), None)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&lookalike) && msg.contains(&format!("project {p}-admin")),
        "{msg}"
    );
    assert!(app.containers().is_empty(), "nothing mounted it");

    // Listed in allowed_external: mounted.
    let allowed = ContainersConfig {
        allowed_external: vec![other.clone()],
        ..settings()
    };
    let dir = app.write_release(
        "r2",
        &compose(&format!("    external: true\n    name: {other}\n")),
        &[],
    );
    deploy_with(&engine, &app, &rel("r2", &dir), None, &allowed)
        .await
        .unwrap();
    assert_eq!(app.inspect("web", "{{(index .Mounts 0).Name}}"), other);
    drop(cleanup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_images_stay_under_the_apps_repositories() {
    let Some(engine) = engine().await else { return };
    let _lock = ENGINE_LOCK.read().await;
    let app = App::new("imgname");
    let foreign = format!("dprobe{}/web:latest", std::process::id());
    let compose = format!(
        "services:\n  web:\n    build: .\n    image: {foreign}\n    command: sleep 3600\n  worker:\n    image: {foreign}\n    command: sleep 3600\n"
    );
    let dir = app.write_release(
        "r1",
        &compose,
        &[(
            "Dockerfile",
            &format!("FROM {BASE_IMAGE}\nRUN echo built > /built\n"),
        )],
    );
    deploy(&engine, &app, &rel("r1", &dir), None).await.unwrap();
    assert!(
        std::process::Command::new("docker")
            .args(["image", "inspect", &foreign])
            .output()
            .unwrap()
            .stdout
            .starts_with(b"[]"),
        "{foreign} was tagged"
    );
    let own = app.image_repo("web");
    assert!(
        app.image_tags().contains(&format!("{own}:latest")),
        "{:?}",
        app.image_tags()
    );
    assert_eq!(app.inspect("web", "{{.Config.Image}}"), format!("{own}:r1"));
    // The service that ran the built image by its name follows it.
    assert_eq!(app.exec("worker", "cat /built"), (0, "built\n".into()));
}

/// Runs a shell command when dropped (cleanup that also happens when an assertion fails).
fn scopeguard(cmd: String) -> impl Drop {
    struct Guard(String);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = std::process::Command::new("sh")
                .arg("-c")
                .arg(&self.0)
                .output();
        }
    }
    Guard(cmd)
}
