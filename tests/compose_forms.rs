//! The compose forms people write, applied on the real Docker engine: each group is deployed
//! and the created containers are inspected (and probed from inside) for what the file said.
//!
//! Tests run whenever the engine answers, and fail (not skip) when `CI` is set and it does not.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::path::Path;

use common::docker::{
    App, BASE_IMAGE, ENGINE_LOCK, deploy, deploy_with, engine, free_port, http_get, settings, sh,
};
use deployd::config::ContainersConfig;
use deployd::containers::{ReleaseRef, UpAction};

fn rel<'a>(id: &'a str, dir: &'a Path) -> ReleaseRef<'a> {
    ReleaseRef {
        id,
        dir,
        commit: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_options_reach_the_container() {
    let Some(engine) = engine().await else { return };
    let _lock = ENGINE_LOCK.read().await;
    let app = App::new("runopts");
    let port = free_port();
    let compose = format!(
        r#"
x-defaults: &defaults
  image: {BASE_IMAGE}
  init: true
  logging:
    driver: json-file
    options:
      max-size: 1m
      max-file: "2"
services:
  web:
    <<: *defaults
    container_name: legacy_web
    command: httpd -f -p 8080 -h /www
    volumes:
      - ./www:/www
    user: "1000:1000"
    hostname: web.internal
    working_dir: /www
    tty: true
    stdin_open: true
    stop_signal: SIGINT
    stop_grace_period: 3s
    expose: ["9000", "9100-9101/udp"]
    ports:
      - "127.0.0.1:{port}-{last}:8080"
      - "127.0.0.1::8081-8082"
    extra_hosts:
      - "db.legacy:10.1.2.3"
      - "gateway.internal=host-gateway"
    tmpfs:
      - /run/app:size=1m
    ulimits:
      nofile: {{soft: 1024, hard: 2048}}
    mem_limit: 64m
    cpus: 0.5
    pids_limit: 64
    shm_size: 8m
    cap_drop: [CHOWN]
    platform: linux/amd64
    healthcheck:
      test: ["CMD-SHELL", "wget -q -O- http://127.0.0.1:8080/ >/dev/null"]
      interval: 1s
      start_period: 5s
      start_interval: 500ms
      retries: 3
  client:
    <<: *defaults
    command: sleep 3600
    deploy:
      resources:
        limits: {{cpus: "0.25", memory: 32M}}
    depends_on:
      web:
        condition: service_healthy
"#,
        last = port + 5
    );
    let dir = app.write_release("r1", &compose, &[("www/index.html", "served\n")]);
    let (_, up) = deploy(&engine, &app, &rel("r1", &dir), None).await.unwrap();
    assert_eq!(
        up.services
            .iter()
            .map(|s| s.service.as_str())
            .collect::<Vec<_>>(),
        ["web", "client"]
    );
    let got = app.inspect(
        "web",
        "{{.Config.User}}|{{.Config.Hostname}}|{{.Config.WorkingDir}}|{{.Config.Tty}}|{{.Config.OpenStdin}}|{{.Config.StopSignal}}|{{.Config.StopTimeout}}|{{.HostConfig.Init}}|{{.HostConfig.LogConfig.Type}}|{{index .HostConfig.LogConfig.Config \"max-size\"}}|{{.HostConfig.Memory}}|{{.HostConfig.NanoCpus}}|{{.HostConfig.PidsLimit}}|{{.HostConfig.ShmSize}}|{{.Platform}}",
    );
    assert_eq!(
        got,
        "1000:1000|web.internal|/www|true|true|SIGINT|3|true|json-file|1m|67108864|500000000|64|8388608|linux"
    );
    let got = app.inspect(
        "web",
        "{{json .Config.ExposedPorts}}|{{json .HostConfig.ExtraHosts}}|{{json .HostConfig.Tmpfs}}|{{json .HostConfig.Ulimits}}|{{json .HostConfig.CapDrop}}|{{json .HostConfig.SecurityOpt}}",
    );
    for want in [
        "\"9000/tcp\"",
        "\"9100/udp\"",
        "\"9101/udp\"",
        "\"8081/tcp\"",
        "\"8082/tcp\"",
        "\"db.legacy:10.1.2.3\"",
        "\"gateway.internal:host-gateway\"",
        "\"/run/app\":\"size=1m\"",
        "{\"Name\":\"nofile\",\"Hard\":2048,\"Soft\":1024}",
        "\"CHOWN\"",
        "\"NET_RAW\"",
        "\"no-new-privileges\"",
    ] {
        assert!(got.contains(want), "{want} missing from {got}");
    }
    // A host range for one container port: the engine picked a port in it.
    let bound = app.inspect(
        "web",
        "{{(index (index .NetworkSettings.Ports \"8080/tcp\") 0).HostPort}}",
    );
    let bound: u16 = bound.parse().unwrap();
    assert!((port..=port + 5).contains(&bound), "{bound}");
    assert_eq!(http_get(bound, "/index.html"), (200, "served\n".into()));
    // The healthcheck as written (StartInterval needs an engine with API 1.44 or later).
    let health = app.inspect(
        "web",
        "{{.Config.Healthcheck.Interval}}|{{.Config.Healthcheck.StartPeriod}}|{{.Config.Healthcheck.Retries}}",
    );
    assert_eq!(health, "1s|5s|3");
    if engine.facts().api_version.as_str() >= "1.44" {
        assert_eq!(
            app.inspect("web", "{{.Config.Healthcheck.StartInterval}}"),
            "500ms"
        );
    } else {
        eprintln!(
            "engine API {} has no healthcheck StartInterval; it ignores the field",
            engine.facts().api_version
        );
    }
    // Inside: the user, the ulimit, the tmpfs, and container_name resolving as an alias.
    assert_eq!(app.exec("web", "id -u; ulimit -n").1, "1000\n1024\n");
    assert_eq!(
        app.exec("client", "wget -q -O- http://legacy_web:8080/index.html"),
        (0, "served\n".into())
    );
    assert_eq!(
        app.inspect("client", "{{.HostConfig.NanoCpus}}|{{.HostConfig.Memory}}"),
        "250000000|33554432"
    );
    let (code, out) = app.exec("web", "grep -c ' /run/app tmpfs ' /proc/mounts");
    assert_eq!((code, out.trim()), (0, "1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_secrets_configs_and_anonymous_volumes() {
    let Some(engine) = engine().await else { return };
    let _lock = ENGINE_LOCK.read().await;
    let app = App::new("mounts");
    let compose = |marker: &str| {
        format!(
            r#"
services:
  app:
    image: {BASE_IMAGE}
    command: sleep 3600
    working_dir: /app
    environment:
      MARKER: {marker}
    volumes:
      - ./:/app
      - /app/node_modules
      - cache:/app/.cache
      - type: tmpfs
        target: /app/tmp
        tmpfs:
          size: 1048576
    secrets:
      - db_password
      - source: api_key
        target: api.key
    configs:
      - source: app_conf
        target: /etc/app/app.conf
secrets:
  db_password:
    file: ./secrets/db_password.txt
  api_key:
    file: ./secrets/api.key
configs:
  app_conf:
    file: ./config/app.conf
volumes:
  cache:
"#
        )
    };
    let files = [
        ("secrets/db_password.txt", "s3cret\n"),
        ("secrets/api.key", "key-123\n"),
        ("config/app.conf", "level=info\n"),
        ("src/main.js", "console.log(1)\n"),
    ];
    let dir = app.write_release("r1", &compose("one"), &files);
    deploy(&engine, &app, &rel("r1", &dir), None).await.unwrap();
    let exec = |cmd: &str| app.exec("app", cmd);
    assert_eq!(exec("cat /run/secrets/db_password"), (0, "s3cret\n".into()));
    assert_eq!(exec("cat /run/secrets/api.key"), (0, "key-123\n".into()));
    assert_eq!(exec("cat /etc/app/app.conf"), (0, "level=info\n".into()));
    assert_eq!(exec("cat /app/src/main.js"), (0, "console.log(1)\n".into()));
    // Writable: the anonymous volume, the named volume, the tmpfs. Read-only: the release.
    for writable in ["/app/node_modules/x", "/app/.cache/x", "/app/tmp/x"] {
        assert_eq!(exec(&format!("touch {writable}")).0, 0, "{writable}");
    }
    for read_only in [
        "/app/new-file",
        "/app/src/main.js",
        "/run/secrets/db_password",
    ] {
        let (code, out) = exec(&format!("echo x > {read_only}"));
        assert_ne!(code, 0, "{read_only} is writable");
        assert!(out.contains("Read-only file system"), "{read_only}: {out}");
    }
    assert!(!dir.join("new-file").exists());
    // deployd made the mount points the nested mounts need, and nothing else.
    for mount_point in ["node_modules", ".cache", "tmp"] {
        assert!(dir.join(mount_point).is_dir(), "{mount_point}");
        assert_eq!(std::fs::read_dir(dir.join(mount_point)).unwrap().count(), 0);
    }
    let mounts = app.inspect(
        "app",
        "{{range .Mounts}}{{.Type}} {{.Destination}} {{.RW}}|{{end}}",
    );
    for want in [
        "bind /app false",
        "bind /run/secrets/db_password false",
        "bind /run/secrets/api.key false",
        "bind /etc/app/app.conf false",
        "volume /app/node_modules true",
        "volume /app/.cache true",
    ] {
        assert!(mounts.contains(want), "{want} missing from {mounts}");
    }
    // The anonymous volume goes with its container when the service is recreated.
    let anonymous = app.inspect(
        "app",
        "{{range .Mounts}}{{if eq .Destination \"/app/node_modules\"}}{{.Name}}{{end}}{{end}}",
    );
    assert!(!anonymous.is_empty());
    let dir2 = app.write_release("r2", &compose("two"), &files);
    let (_, up) = deploy(&engine, &app, &rel("r2", &dir2), Some(&rel("r1", &dir)))
        .await
        .unwrap();
    assert_eq!(up.services[0].action, UpAction::Recreated);
    let volumes = sh("docker volume ls -q");
    assert!(
        !volumes.lines().any(|v| v == anonymous),
        "{anonymous} left behind"
    );
    assert!(
        volumes
            .lines()
            .any(|v| v == format!("{}_cache", app.project))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_profiles_includes_and_restart_dependencies() {
    let Some(engine) = engine().await else { return };
    let _lock = ENGINE_LOCK.read().await;
    let app = App::new("deps");
    let compose = |db_version: &str, migrate: &str| {
        format!(
            r#"
include:
  - ./extra/compose.yaml
services:
  migrate:
    image: {BASE_IMAGE}
    command: sh -c '{migrate}'
    restart: "no"
    volumes: [shared:/data]
  app:
    image: {BASE_IMAGE}
    command: sh -c 'cat /data/marker && sleep 3600'
    volumes: [shared:/data]
    depends_on:
      migrate:
        condition: service_completed_successfully
      db:
        condition: service_started
        restart: true
  db:
    image: {BASE_IMAGE}
    command: sleep 3600
    environment:
      VERSION: "{db_version}"
  debug:
    image: {BASE_IMAGE}
    profiles: [debug]
    command: sleep 3600
volumes:
  shared:
"#
        )
    };
    let files = [(
        "extra/compose.yaml",
        "services:\n  sidecar:\n    image: deployd-test-busybox:1\n    command: sleep 3600\n",
    )];
    let migrate_ok = "echo migrated > /data/marker";
    let d1 = app.write_release("r1", &compose("1", migrate_ok), &files);
    let (_, up) = deploy(&engine, &app, &rel("r1", &d1), None).await.unwrap();
    let order: Vec<&str> = up.services.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(order, ["migrate", "db", "sidecar", "app"]);
    assert_eq!(
        app.inspect("migrate", "{{.State.Status}} {{.State.ExitCode}}"),
        "exited 0"
    );
    assert_eq!(
        sh(&format!("docker logs {}", app.container("app"))),
        "migrated\n"
    );
    assert!(
        !app.containers().is_empty()
            && sh(&format!(
                "docker ps -aq --filter name={}",
                app.container("debug")
            ))
            .is_empty(),
        "a service of an inactive profile is not created"
    );

    // The dependency changes: `restart: true` recreates the dependent too; the completed job
    // with an unchanged configuration is not run again.
    let d2 = app.write_release("r2", &compose("2", migrate_ok), &files);
    let (_, up) = deploy(&engine, &app, &rel("r2", &d2), Some(&rel("r1", &d1)))
        .await
        .unwrap();
    let action = |s: &str| up.services.iter().find(|u| u.service == s).unwrap().action;
    assert_eq!(action("db"), UpAction::Recreated);
    assert_eq!(action("app"), UpAction::Recreated);
    assert_eq!(action("migrate"), UpAction::Unchanged);
    assert_eq!(action("sidecar"), UpAction::Unchanged);

    // The profile activated by configuration.
    let with_debug = ContainersConfig {
        profiles: vec!["debug".into()],
        ..settings()
    };
    let (_, up) = deploy_with(&engine, &app, &rel("r2", &d2), None, &with_debug)
        .await
        .unwrap();
    assert!(up.services.iter().any(|s| s.service == "debug"));

    // A failing job fails the release, which is rolled back.
    let d3 = app.write_release("r3", &compose("2", "echo no; exit 3"), &files);
    let err = deploy(&engine, &app, &rel("r3", &d3), Some(&rel("r2", &d2)))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("`migrate`")
            && msg.contains("exited with code 3")
            && msg.contains("rolled back"),
        "{msg}"
    );
}
