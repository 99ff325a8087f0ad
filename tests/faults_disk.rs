//! A full disk and the debris of killed runs. The state directory (or the runtime directory)
//! is a small tmpfs mounted for the test (`mount -t tmpfs -o size=...`, as root; skipped
//! otherwise, mandatory when `CI` is set), so `ENOSPC` comes from the kernel, wherever
//! deployd happens to be writing: while unpacking, while spooling a signed artifact, while
//! writing `state.json` or `status.json`. Every time: one sentence naming the path and the
//! space, nothing activated, no staging left, `state.json` intact, and the daemon carries on.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, Options};
use common::{Host, app};

/// A tmpfs of `size` mounted on `dir` for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (the test is skipped) when not root, unless `CI` is set.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = nix::unistd::geteuid().is_root()
            && Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0755"),
                    "tmpfs",
                ])
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success());
        match ok {
            true => Some(Tmpfs(dir.to_path_buf())),
            false if std::env::var_os("CI").is_some() => {
                panic!(
                    "CI is set and a tmpfs cannot be mounted on {}",
                    dir.display()
                )
            }
            false => {
                eprintln!("skipping: mounting a tmpfs needs root");
                None
            }
        }
    }

    /// Fills the filesystem with a file until it is full.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        // What does not fit in a whole block.
        while f.write_all(&block[..512]).is_ok() {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An artifact of about `mib` MiB that does not compress.
fn big(version: &str, mib: usize) -> Vec<u8> {
    app(version)
        .file("./noise.bin", 0o644, &common::noise(5, mib << 20))
        .gz()
}

/// The `.tmp` files left in a directory.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[test]
fn a_one_shot_deploy_removes_the_debris_of_killed_runs() {
    let host = Host::new();
    host.upload("web/v1.tar.gz", &app("v1").gz(), "1111111111111111");
    host.upload("web/v2.tar.gz", &app("v2").gz(), "2222222222222222");
    host.deploy("web/v1.tar.gz", &[]).ok();
    // What SIGKILL leaves at each point: a half-unpacked tree, a spool, a temporary link and
    // a temporary state file.
    let state = host.state_dir();
    std::fs::create_dir_all(state.join("staging/4242-17/app/lib")).unwrap();
    std::fs::write(state.join("staging/4242-17/app/lib/half"), b"half").unwrap();
    std::fs::create_dir_all(state.join("staging/4243-9")).unwrap();
    std::fs::write(state.join("staging/4243-9/artifact"), b"spool").unwrap();
    std::os::unix::fs::symlink("releases/nothing", state.join(".current.4242.tmp")).unwrap();
    std::fs::write(state.join(".state.json.4242.tmp"), b"{\"cur").unwrap();

    let run = host.deploy("web/v2.tar.gz", &[]);
    run.ok();
    assert!(
        run.stderr.contains("removed staging debris"),
        "{}",
        run.stderr
    );
    assert_eq!(host.served_version(), "v2");
    assert_eq!(host.staging_entries(), 0, "debris of dead runs removed");
    assert!(temporaries(&state).is_empty(), "{:?}", temporaries(&state));
}

#[test]
fn a_full_disk_while_unpacking_fails_cleanly_and_names_the_space() {
    let host = Host::new();
    let Some(_fs) = Tmpfs::mount(&host.state_dir(), "6m") else {
        return;
    };
    host.upload("web/v1.tar.gz", &app("v1").gz(), "1111111111111111");
    host.upload("web/v2.tar.gz", &big("v2", 8), "2222222222222222");
    host.deploy("web/v1.tar.gz", &[]).ok();
    let r1 = host.current().unwrap();

    let run = host.deploy("web/v2.tar.gz", &[]);
    run.fails_with(70, "no space left on the filesystem of");
    let line = run.error_line();
    for needle in [
        host.state_dir().to_str().unwrap(),
        "unpacking s3://",
        "free",
        "MiB",
    ] {
        assert!(line.contains(needle), "{needle:?} missing from: {line}");
    }
    host.assert_failed_intact(&r1, 70);
    assert_eq!(host.served_version(), "v1");
    assert_eq!(host.releases(), vec![r1.clone()], "nothing half-installed");
    assert!(temporaries(&host.state_dir()).is_empty());
    // The space is back: the next attempt of something that fits succeeds.
    host.upload("web/v3.tar.gz", &app("v3").gz(), "3333333333333333");
    host.deploy("web/v3.tar.gz", &[]).ok();
    assert_eq!(host.served_version(), "v3");
}

#[test]
fn a_full_disk_while_spooling_a_signed_artifact_fails_cleanly() {
    let host = Host::new();
    let Some(_fs) = Tmpfs::mount(&host.state_dir(), "6m") else {
        return;
    };
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let secret = host.dir.path().join("ci.key");
    std::fs::write(&secret, kp.sk.to_box(None).unwrap().to_string()).unwrap();
    host.write_config(&format!("public_key = \"{}\"\n", kp.pk.to_base64()), "");
    let sign = [
        "--sign",
        secret.to_str().unwrap(),
        "--commit",
        "1111111111111111",
    ];
    let v1 = host.publish_bytes("v1.tar.gz", &app("v1").gz(), "prod", &sign);
    host.deploy(&v1.key, &[]).ok();
    let r1 = host.current().unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // a new key, by the second
    let v2 = host.publish_bytes("v2.tar.gz", &big("v2", 8), "prod", &sign);

    let run = host.deploy(&v2.key, &[]);
    run.fails_with(70, "while spooling s3://");
    let line = run.error_line();
    assert!(line.contains("it needs 8."), "{line}");
    assert!(line.contains("staging/"), "{line}");
    host.assert_failed_intact(&r1, 70);
}

#[test]
fn a_full_disk_never_corrupts_state_json() {
    let host = Host::new();
    let Some(fs) = Tmpfs::mount(&host.state_dir(), "2m") else {
        return;
    };
    host.upload("web/v1.tar.gz", &app("v1").gz(), "1111111111111111");
    host.deploy("web/v1.tar.gz", &[]).ok();
    let state_file = host.state_dir().join("state.json");
    let before = std::fs::read(&state_file).unwrap();
    fs.fill();

    // Already serving: the only write is the attempt's record in state.json.
    let run = host.deploy("web/v1.tar.gz", &[]);
    run.fails_with(70, "state.json");
    assert!(run.error_line().contains("free"), "{}", run.error_line());
    assert_eq!(
        std::fs::read(&state_file).unwrap(),
        before,
        "state.json untouched"
    );
    assert!(temporaries(&host.state_dir()).is_empty());
    assert_eq!(host.served_version(), "v1");
    // The status file (elsewhere) still tells how the attempt ended.
    let status = std::fs::read_to_string(host.dir.path().join("run/status.json")).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["last_attempt"]["outcome"], "unchanged", "{status}");
}

#[test]
fn a_full_runtime_directory_does_not_stop_a_deployment() {
    let host = Host::new();
    let Some(fs) = Tmpfs::mount(&host.dir.path().join("run"), "1m") else {
        return;
    };
    fs.fill();
    host.upload("web/v1.tar.gz", &app("v1").gz(), "1111111111111111");
    let run = host.deploy("web/v1.tar.gz", &[]);
    run.ok();
    assert!(
        run.stderr.contains("status.json"),
        "the failed write is logged:\n{}",
        run.stderr
    );
    assert_eq!(host.served_version(), "v1");
    assert!(temporaries(&host.dir.path().join("run")).is_empty());
}

#[test]
fn the_daemon_survives_a_full_disk_and_deploys_on_the_next_trigger() {
    let host = Host::new();
    let Some(_fs) = Tmpfs::mount(&host.state_dir(), "6m") else {
        return;
    };
    host.upload("web/v1.tar.gz", &app("v1").gz(), "1111111111111111");
    host.upload("web/v2.tar.gz", &big("v2", 8), "2222222222222222");
    host.upload("web/v3.tar.gz", &app("v3").gz(), "3333333333333333");
    host.write_deployment_env("web/v1.tar.gz");
    let mut daemon = Daemon::start(&host, Options::default());
    daemon.wait_for(Duration::from_secs(30), "v1 to serve", || {
        host.try_state()
            .is_some_and(|s| s["last_attempt"]["outcome"] == "deployed")
    });
    let r1 = host.current().unwrap();

    host.trigger("web/v2.tar.gz", &[]).ok();
    daemon.wait_for(Duration::from_secs(30), "the full disk to fail v2", || {
        host.try_state()
            .is_some_and(|s| s["last_attempt"]["outcome"] == "failed")
    });
    assert!(daemon.is_running(), "{}", daemon.log());
    host.assert_failed_intact(&r1, 70);
    assert!(
        host.state()["last_attempt"]["error"]
            .as_str()
            .unwrap()
            .contains("no space left"),
        "{}",
        host.state()
    );

    host.trigger("web/v3.tar.gz", &[]).ok();
    daemon.wait_for(Duration::from_secs(30), "v3 to serve", || {
        host.try_state()
            .is_some_and(|s| s["last_attempt"]["outcome"] == "deployed")
    });
    assert_eq!(host.served_version(), "v3");
    assert_eq!(daemon.stop(Duration::from_secs(10)), 0);
}
