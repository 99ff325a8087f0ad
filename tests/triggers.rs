//! Trigger files with real inotify and real files, the coalescing queue, and real SIGHUPs.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use deployd::agent::triggers::{
    MAX_TRIGGER_FILE_SIZE, REJECTED_DIR, Trigger, TriggerDir, TriggerError, TriggerOrigin,
    TriggerQueue, write_trigger,
};
use deployd::error::ExitCode;
use nix::unistd::{Gid, Uid, chown, geteuid};
use tokio::sync::mpsc;
use tokio::time::timeout;

const WANTED_LATENCY: Duration = Duration::from_millis(250);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::DEBUG)
        .try_init();
}

fn is_root() -> bool {
    geteuid().is_root()
}

/// A trigger directory under a fresh temp dir that trusts the current uid (root in CI).
fn trigger_dir() -> (tempfile::TempDir, TriggerDir) {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = TriggerDir::new(tmp.path().join("triggers"), None)
        .with_trusted_uids(vec![geteuid().as_raw()]);
    (tmp, dir)
}

async fn recv_within(rx: &mut mpsc::Receiver<Trigger>, limit: Duration) -> Option<Trigger> {
    timeout(limit, rx.recv()).await.ok().flatten()
}

async fn assert_no_trigger(rx: &mut mpsc::Receiver<Trigger>, wait: Duration) {
    if let Some(t) = recv_within(rx, wait).await {
        panic!("unexpected trigger {t:?}");
    }
}

/// Waits until `path` exists (the watcher works on its own thread).
async fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{} did not appear",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn rejected(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let base = dir.join(REJECTED_DIR);
    (base.join(name), base.join(format!("{name}.error")))
}

/// The note is one sentence on one line.
fn assert_note(note: &Path, expect: &str) {
    let text = fs::read_to_string(note).unwrap();
    assert!(text.ends_with(".\n"), "{text:?}");
    assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
    assert!(
        text.starts_with("deployd rejected this trigger file because "),
        "{text:?}"
    );
    assert!(
        text.contains(expect),
        "note {text:?} should mention {expect:?}"
    );
    let meta = fs::symlink_metadata(note).unwrap();
    assert!(meta.file_type().is_file(), "the note is a regular file");
}

#[tokio::test]
async fn dropped_file_arrives_within_250ms() {
    let (_tmp, dir) = trigger_dir();
    let (watch, mut rx) = dir.watch().unwrap();
    let mode = fs::metadata(dir.path()).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o770, "created with mode 0770");

    let mut latencies = Vec::new();
    for i in 0..20 {
        let path = dir.path().join(format!("drop-{i}.toml"));
        let start = Instant::now();
        fs::write(
            &path,
            format!("force_rebuild = true\nreason = \"drop {i}\"\n"),
        )
        .unwrap();
        let trigger = recv_within(&mut rx, Duration::from_secs(2))
            .await
            .expect("a trigger for the dropped file");
        let latency = start.elapsed();
        latencies.push(latency);
        assert_eq!(trigger.origin, TriggerOrigin::File(path.clone()));
        assert!(trigger.force_rebuild && !trigger.clear_cache);
        assert_eq!(trigger.reason, Some(format!("drop {i}")));
        assert!(!path.exists(), "accepted files are removed");
    }
    latencies.sort();
    println!(
        "file drop -> trigger latency over {} drops: min {:?}, median {:?}, max {:?}",
        latencies.len(),
        latencies[0],
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    assert!(
        *latencies.last().unwrap() <= WANTED_LATENCY,
        "worst latency {:?} over {WANTED_LATENCY:?}",
        latencies.last().unwrap()
    );
    assert_no_trigger(&mut rx, Duration::from_millis(200)).await;
    watch.stop();
}

#[tokio::test]
async fn renamed_into_place_and_write_trigger() {
    let (_tmp, dir) = trigger_dir();
    let (_watch, mut rx) = dir.watch().unwrap();

    // By hand: write a dot-file, then rename it into place.
    let tmp = dir.path().join(".manual.tmp");
    let path = dir.path().join("manual.toml");
    fs::write(&tmp, "clear_cache = true\n").unwrap();
    let start = Instant::now();
    fs::rename(&tmp, &path).unwrap();
    let trigger = recv_within(&mut rx, Duration::from_secs(2)).await.unwrap();
    println!("rename -> trigger latency {:?}", start.elapsed());
    assert!(start.elapsed() <= WANTED_LATENCY);
    assert_eq!(trigger.origin, TriggerOrigin::File(path.clone()));
    assert!(trigger.clear_cache && !trigger.force_rebuild);

    // A dot-file written long before its rename (its own events already settled).
    let tmp = dir.path().join(".slow.tmp");
    fs::write(&tmp, "reason = \"slow\"\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_no_trigger(&mut rx, Duration::from_millis(10)).await;
    fs::rename(&tmp, dir.path().join("slow.toml")).unwrap();
    let trigger = recv_within(&mut rx, Duration::from_secs(2)).await.unwrap();
    assert_eq!(trigger.reason.as_deref(), Some("slow"));

    // Moved in from another directory on the same filesystem.
    let outside = dir.path().parent().unwrap().join("outside.toml");
    fs::write(&outside, "reason = \"moved in\"\n").unwrap();
    fs::rename(&outside, dir.path().join("moved.toml")).unwrap();
    let trigger = recv_within(&mut rx, Duration::from_secs(2)).await.unwrap();
    assert_eq!(trigger.reason.as_deref(), Some("moved in"));

    // What `deployd trigger --bucket B --key K --force-rebuild --reason R` does.
    let mut wanted = Trigger::new(TriggerOrigin::Signal);
    wanted.bucket = Some("deploy-artifacts".into());
    wanted.key = Some("express-api/pr-51/3f2a9c1e-20261105-120000/express-api.tar.gz".into());
    wanted.force_rebuild = true;
    wanted.reason = Some("hotfix \"quoted\"".into());
    let start = Instant::now();
    let written = write_trigger(dir.path(), &wanted).unwrap();
    let got = recv_within(&mut rx, Duration::from_secs(2)).await.unwrap();
    println!("write_trigger -> trigger latency {:?}", start.elapsed());
    assert_eq!(written.extension().unwrap(), "toml");
    assert_eq!(got.origin, TriggerOrigin::File(written.clone()));
    assert_eq!(
        Trigger {
            origin: TriggerOrigin::Signal,
            ..got
        },
        wanted
    );
    assert!(!written.exists());
    let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "no temp files left: {leftovers:?}");
}

#[tokio::test]
async fn write_trigger_errors() {
    let (_tmp, dir) = trigger_dir();
    let mut half = Trigger::new(TriggerOrigin::Signal);
    half.bucket = Some("b".into());
    let err = write_trigger(dir.path(), &half).unwrap_err();
    assert!(matches!(err, TriggerError::InvalidTrigger { .. }), "{err}");
    assert_eq!(err.exit_code(), 64);

    let err = write_trigger(dir.path(), &Trigger::new(TriggerOrigin::Signal)).unwrap_err();
    assert!(matches!(err, TriggerError::DirMissing { .. }), "{err}");
    assert!(err.to_string().contains(&dir.path().display().to_string()));
    assert_eq!(err.exit_code(), 69);

    // Unique names even when written in a tight loop.
    dir.ensure_dir().unwrap();
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..200 {
        names.insert(write_trigger(dir.path(), &Trigger::new(TriggerOrigin::Signal)).unwrap());
    }
    assert_eq!(names.len(), 200);
    assert_eq!(dir.scan().unwrap().len(), 200);
}

#[tokio::test]
async fn dot_files_are_ignored() {
    let (_tmp, dir) = trigger_dir();
    let (_watch, mut rx) = dir.watch().unwrap();
    let hidden = dir.path().join(".hidden");
    let tmp = dir.path().join(".half-written.tmp");
    fs::write(&hidden, "force_rebuild = true\n").unwrap();
    fs::write(&tmp, "not = [toml").unwrap();
    assert_no_trigger(&mut rx, Duration::from_millis(300)).await;
    assert!(hidden.exists() && tmp.exists(), "dot-files are left alone");
    assert!(!dir.path().join(REJECTED_DIR).exists());
    assert!(dir.scan().unwrap().is_empty());
    assert!(hidden.exists() && tmp.exists());
}

/// Drops every kind of hostile entry; each is moved aside with a note, none triggers.
fn drop_hostile(dir: &Path) -> Vec<(&'static str, &'static str)> {
    let mut cases = vec![
        ("bad-toml.toml", "not valid trigger TOML at line 1"),
        ("unknown-key.toml", "unknown field `force`"),
        ("bucket-only.toml", "names a bucket but no key"),
        ("symlink.toml", "symbolic link"),
        ("huge.toml", "over the 65536-byte limit"),
        ("directory", "a directory, not a regular file"),
        ("fifo", "a FIFO, not a regular file"),
        ("hardlink.toml", "hard links"),
        ("binary.toml", "not UTF-8"),
    ];
    fs::write(dir.join("bad-toml.toml"), "force_rebuild = [true\n").unwrap();
    fs::write(dir.join("unknown-key.toml"), "force = true\n").unwrap();
    fs::write(dir.join("bucket-only.toml"), "bucket = \"b\"\n").unwrap();
    symlink("/etc/passwd", dir.join("symlink.toml")).unwrap();
    let huge = format!(
        "reason = \"{}\"\n",
        "x".repeat(MAX_TRIGGER_FILE_SIZE as usize)
    );
    fs::write(dir.join("huge.toml"), huge).unwrap();
    fs::create_dir(dir.join("directory")).unwrap();
    fs::write(dir.join("directory").join("inner.toml"), "").unwrap();
    nix::unistd::mkfifo(
        &dir.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let outside = dir.parent().unwrap().join("link-source");
    fs::write(&outside, "").unwrap();
    fs::hard_link(&outside, dir.join("hardlink.toml")).unwrap();
    fs::write(dir.join("binary.toml"), b"reason = \"\xff\xfe\"\n").unwrap();
    if is_root() {
        let owned = dir.join("wrong-owner.toml");
        fs::write(&owned, "force_rebuild = true\n").unwrap();
        chown(
            &owned,
            Some(Uid::from_raw(12345)),
            Some(Gid::from_raw(12345)),
        )
        .unwrap();
        cases.push(("wrong-owner.toml", "owned by uid 12345 and gid 12345"));
    } else {
        eprintln!("not root: the wrong-owner case needs chown and is left out");
    }
    cases
}

#[tokio::test]
async fn hostile_files_are_moved_aside_by_the_watcher() {
    let (_tmp, dir) = trigger_dir();
    let (_watch, mut rx) = dir.watch().unwrap();
    let cases = drop_hostile(dir.path());
    for (name, expect) in &cases {
        let (moved, note) = rejected(dir.path(), name);
        wait_for(&note).await;
        assert_note(&note, expect);
        assert!(
            fs::symlink_metadata(&moved).is_ok(),
            "{name} moved into rejected/"
        );
        assert!(
            fs::symlink_metadata(dir.path().join(name)).is_err(),
            "{name} is gone from the trigger directory"
        );
    }
    assert_no_trigger(&mut rx, Duration::from_millis(200)).await;
    // The symlink was moved, not followed.
    assert!(fs::read_to_string("/etc/passwd").unwrap().contains("root:"));

    // The daemon side is still healthy: a good file after all that still triggers.
    fs::write(dir.path().join("good.toml"), "").unwrap();
    let t = recv_within(&mut rx, Duration::from_secs(2)).await.unwrap();
    assert_eq!(t.origin, TriggerOrigin::File(dir.path().join("good.toml")));
}

#[tokio::test]
async fn startup_scan_picks_up_and_filters_existing_files() {
    let (_tmp, dir) = trigger_dir();
    dir.ensure_dir().unwrap();
    // Dropped while deployd was down.
    fs::write(
        dir.path().join("a.toml"),
        "force_rebuild = true\nreason = \"a\"\n",
    )
    .unwrap();
    fs::write(
        dir.path().join("b.toml"),
        "bucket = \"b\"\nkey = \"k\"\nclear_cache = true\nreason = \"b\"\n",
    )
    .unwrap();
    fs::write(dir.path().join(".c.tmp"), "").unwrap();
    let cases = drop_hostile(dir.path());

    let (_watch, mut rx) = dir.watch().unwrap();
    let t = recv_within(&mut rx, Duration::from_secs(1))
        .await
        .expect("the startup scan sends what it found");
    assert!(t.force_rebuild && t.clear_cache, "{t:?}");
    assert_eq!(
        (t.bucket.as_deref(), t.key.as_deref()),
        (Some("b"), Some("k"))
    );
    assert_eq!(t.reason.as_deref(), Some("a; b"));
    assert_no_trigger(&mut rx, Duration::from_millis(300)).await;
    for (name, expect) in &cases {
        assert_note(&rejected(dir.path(), name).1, expect);
    }
    let mut left: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, [".c.tmp", REJECTED_DIR]);
}

#[tokio::test]
async fn scan_returns_each_file_in_name_order() {
    let (_tmp, dir) = trigger_dir();
    dir.ensure_dir().unwrap();
    for name in ["2.toml", "1.toml", "3"] {
        fs::write(dir.path().join(name), format!("reason = \"{name}\"\n")).unwrap();
    }
    let reasons: Vec<_> = dir
        .scan()
        .unwrap()
        .into_iter()
        .map(|t| t.reason.unwrap())
        .collect();
    assert_eq!(reasons, ["1.toml", "2.toml", "3"]);
    assert!(dir.scan().unwrap().is_empty(), "consumed files are gone");
}

#[tokio::test]
async fn trusted_group_and_directory_mode() {
    if !is_root() {
        eprintln!("not root: chown to another group is not possible; skipping");
        return;
    }
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = TriggerDir::new(tmp.path().join("run/deployd/triggers"), Some(4242));
    dir.ensure_dir().unwrap();
    let meta = fs::metadata(dir.path()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o2770);
    assert_eq!(meta.gid(), 4242);

    let member = dir.path().join("member.toml");
    fs::write(&member, "reason = \"group member\"\n").unwrap();
    chown(
        &member,
        Some(Uid::from_raw(12345)),
        Some(Gid::from_raw(4242)),
    )
    .unwrap();
    let stranger = dir.path().join("stranger.toml");
    fs::write(&stranger, "").unwrap();
    chown(
        &stranger,
        Some(Uid::from_raw(12345)),
        Some(Gid::from_raw(4243)),
    )
    .unwrap();

    let found = dir.scan().unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].reason.as_deref(), Some("group member"));
    assert_note(
        &rejected(dir.path(), "stranger.toml").1,
        "only root or group 4242 may drop trigger files",
    );

    // An existing directory is not re-moded.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o750)).unwrap();
    dir.ensure_dir().unwrap();
    assert_eq!(
        fs::metadata(dir.path()).unwrap().permissions().mode() & 0o7777,
        0o750
    );
}

#[tokio::test]
async fn hostile_rejected_dir_and_notes_are_not_followed() {
    let (tmp, dir) = trigger_dir();
    dir.ensure_dir().unwrap();

    // A note name already taken by a symlink pointing at a victim file.
    let victim = tmp.path().join("victim");
    fs::write(&victim, "precious").unwrap();
    fs::create_dir(dir.path().join(REJECTED_DIR)).unwrap();
    symlink(
        &victim,
        dir.path().join(REJECTED_DIR).join("bad.toml.error"),
    )
    .unwrap();
    fs::write(dir.path().join("bad.toml"), "nope").unwrap();
    assert!(dir.scan().unwrap().is_empty());
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    assert_note(
        &rejected(dir.path(), "bad.toml").1,
        "not valid trigger TOML",
    );

    // Same name rejected twice: the first one is kept.
    fs::write(dir.path().join("bad.toml"), "again").unwrap();
    assert!(dir.scan().unwrap().is_empty());
    let kept = fs::read_dir(dir.path().join(REJECTED_DIR))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name().into_string().unwrap();
            name.starts_with("bad.toml") && !name.ends_with(".error")
        })
        .count();
    assert_eq!(kept, 2);

    // `rejected` replaced by a symlink elsewhere: nothing is moved there.
    let elsewhere = tmp.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    fs::rename(
        dir.path().join(REJECTED_DIR),
        tmp.path().join("old-rejected"),
    )
    .unwrap();
    symlink(&elsewhere, dir.path().join(REJECTED_DIR)).unwrap();
    fs::write(dir.path().join("evil.toml"), "force = 1").unwrap();
    assert!(dir.scan().unwrap().is_empty());
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    assert!(
        !dir.path().join("evil.toml").exists(),
        "removed when it cannot be moved aside"
    );
}

#[tokio::test]
async fn thousand_pushes_while_busy_leave_one_pending_trigger() {
    let queue = TriggerQueue::new();
    queue.push(Trigger::new(TriggerOrigin::Startup));
    let first = queue.next().await;
    assert_eq!(first.origin, TriggerOrigin::Startup);
    assert!(!queue.is_pending());

    // "Deploying" now; a burst arrives.
    let start = Instant::now();
    for i in 0..1000 {
        let mut t = Trigger::new(if i % 2 == 0 {
            TriggerOrigin::Signal
        } else {
            TriggerOrigin::File(PathBuf::from(format!("/run/deployd/triggers/{i}.toml")))
        });
        t.force_rebuild = i == 17;
        t.clear_cache = i == 600;
        if i == 400 {
            t.bucket = Some("b".into());
            t.key = Some("k400".into());
        }
        t.reason = Some(if i % 2 == 0 { "SIGHUP" } else { "file" }.into());
        queue.push(t);
    }
    println!("1000 pushes took {:?}", start.elapsed());
    assert_eq!(queue.pushed(), 1001);

    let pending = queue.try_next().expect("one pending trigger");
    assert!(pending.force_rebuild && pending.clear_cache);
    assert_eq!(pending.key.as_deref(), Some("k400"));
    assert_eq!(pending.reason.as_deref(), Some("SIGHUP; file"));
    assert_eq!(
        pending.origin,
        TriggerOrigin::File("/run/deployd/triggers/999.toml".into())
    );
    assert!(queue.try_next().is_none(), "exactly one was pending");
    assert!(
        timeout(Duration::from_millis(100), queue.next())
            .await
            .is_err(),
        "next() waits when nothing is pending"
    );
}

/// 1000 real SIGHUPs to this process within a second, most of them while a deployment runs:
/// exactly two deployments (the one they started and one more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_sighups_cause_at_most_two_deployments() {
    use nix::sys::signal::{Signal, kill};
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup()).unwrap();
    let queue = TriggerQueue::new();

    let received = Arc::new(AtomicUsize::new(0));
    let feeder = {
        let queue = queue.clone();
        let received = received.clone();
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                received.fetch_add(1, Ordering::Relaxed);
                let mut t = Trigger::new(TriggerOrigin::Signal);
                t.reason = Some("SIGHUP".into());
                queue.push(t);
            }
        })
    };
    let deployments = Arc::new(AtomicUsize::new(0));
    let deployer = {
        let queue = queue.clone();
        let deployments = deployments.clone();
        tokio::spawn(async move {
            loop {
                let _trigger = queue.next().await;
                deployments.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(700)).await; // the deployment
            }
        })
    };

    let pid = nix::unistd::getpid();
    let start = Instant::now();
    kill(pid, Signal::SIGHUP).unwrap();
    while deployments.load(Ordering::Relaxed) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "first SIGHUP not seen"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The rest arrive in bursts while the first deployment runs, so the handler wakes many times.
    for _ in 0..9 {
        for _ in 0..111 {
            kill(pid, Signal::SIGHUP).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let sent_in = start.elapsed();
    assert!(sent_in < Duration::from_secs(1), "sent in {sent_in:?}");
    // Long enough for the second deployment to start and for a third one to show up if it were
    // (wrongly) queued.
    tokio::time::sleep(Duration::from_millis(1600)).await;

    let deployments = deployments.load(Ordering::Relaxed);
    let wakeups = received.load(Ordering::Relaxed);
    println!(
        "1000 SIGHUPs sent in {sent_in:?}; {wakeups} handler wake-ups; {deployments} deployments"
    );
    assert!(
        wakeups >= 2,
        "the burst reached the handler more than once ({wakeups})"
    );
    assert_eq!(
        deployments, 2,
        "one deployment plus one coalesced follow-up"
    );
    assert!(!queue.is_pending());
    feeder.abort();
    deployer.abort();
}
