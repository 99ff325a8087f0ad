//! `deployd publish` and `deployd gc` against moto: key shape, metadata, checksums, refusal to
//! overwrite, GITHUB_OUTPUT, multipart, and gc never touching what a pointer names.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::time::{Duration, SystemTime};

use common::{Host, Tarball, app, sha256_hex, write_file};

const COMMIT: &str = "622d2103deadbeefcafe0123456789abcdef0123";

fn key_shape_ok(key: &str, env: &str, commit8: &str) -> bool {
    let Some(rest) = key.strip_prefix(&format!("web/{env}/")) else {
        return false;
    };
    let Some((dir, file)) = rest.split_once('/') else {
        return false;
    };
    file == "web-deployment.tar.gz"
        && dir.len() == 24
        && dir.starts_with(&format!("{commit8}-"))
        && dir[9..17].bytes().all(|b| b.is_ascii_digit())
        && &dir[17..18] == "-"
        && dir[18..].bytes().all(|b| b.is_ascii_digit())
}

#[test]
fn publish_round_trip_metadata_checksum_and_github_output() {
    let host = Host::new();
    let body = app("v1").gz();
    let file = write_file(&host, "web.tar.gz", &body);
    let out = host.dir.path().join("github_output");
    std::fs::write(&out, "earlier=line\n").unwrap();
    let run = host.publish(
        &file,
        "prod",
        &[
            "--commit", COMMIT, "--branch", "main", "--run-id", "4242", "--pr", "51",
        ],
        &[("GITHUB_OUTPUT", out.to_str().unwrap())],
    );
    let key = Host::published_key(&run);
    assert!(key_shape_ok(&key, "prod", "622d2103"), "key {key}");
    let sha = sha256_hex(&body);

    let head = host.s3.head(&host.bucket, &key);
    assert_eq!(head.content_length(), Some(body.len() as i64));
    let meta = head.metadata().unwrap();
    assert_eq!(meta["commit-sha"], COMMIT);
    assert_eq!(meta["branch"], "main");
    assert_eq!(meta["workflow-run-id"], "4242");
    assert_eq!(meta["pr-number"], "51");
    assert_eq!(meta["sha256"], sha);
    let build_time = humantime::parse_rfc3339(&meta["build-time"]).unwrap();
    let age = SystemTime::now().duration_since(build_time).unwrap();
    assert!(age < Duration::from_secs(120), "build-time {age:?} ago");
    // A single PUT carries the full-object SHA-256 checksum.
    assert_eq!(
        head.checksum_sha256()
            .map(|b| hex::encode(aws_smithy_types::base64::decode(b).unwrap())),
        Some(sha.clone())
    );
    assert_eq!(host.s3.get(&host.bucket, &key), body);

    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.starts_with("earlier=line\n"),
        "appended, not replaced: {text}"
    );
    assert!(text.contains(&format!("\nkey={key}\n")), "{text}");
    assert!(text.contains(&format!("\nsha256={sha}\n")), "{text}");

    // No pointer without --pointer, no signature without --sign.
    let keys = host.s3.keys(&host.bucket);
    assert_eq!(keys, vec![key.clone()]);

    // The agent deploys it, trusting the digest from the metadata.
    host.deploy(&key, &["--no-containers"]).ok();
    let m = host.manifest();
    assert_eq!(m["sha256"], sha);
    assert_eq!(m["sha256_verified_against"], "sha256 metadata");
    assert_eq!(m["metadata"]["commit-sha"], COMMIT);
}

#[test]
fn publish_refuses_to_overwrite_an_existing_key() {
    let host = Host::new();
    let body = app("v1").gz();
    let file = write_file(&host, "web.tar.gz", &body);
    // Occupy every key the next few seconds could produce.
    let start = SystemTime::now();
    let mut occupied = Vec::new();
    for s in 0..8 {
        let key = deployd::contract::keys::artifact_key(
            "web",
            "prod",
            COMMIT,
            start + Duration::from_secs(s),
        );
        host.s3.put(&host.bucket, &key, b"the original", &[]);
        occupied.push(key);
    }
    let run = host.publish(&file, "prod", &["--commit", COMMIT, "--pointer"], &[]);
    run.fails_with(75, "already exists");
    for key in &occupied {
        assert_eq!(host.s3.get(&host.bucket, key), b"the original");
    }
    assert!(
        !host
            .s3
            .keys(&host.bucket)
            .iter()
            .any(|k| k.ends_with("current.json")),
        "no pointer is written after a refused upload"
    );
}

#[test]
fn multipart_upload_lands_whole_with_parallel_parts() {
    let host = Host::new();
    let mut noise = vec![0u8; 12 << 20];
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let body = app("big").file("./blob.bin", 0o644, &noise).gz();
    assert!(body.len() > 10 << 20);
    let file = write_file(&host, "big.tar.gz", &body);
    let run = host.publish(
        &file,
        "prod",
        &[
            "--commit",
            COMMIT,
            "--multipart-threshold",
            "5MiB",
            "--part-size",
            "5MiB",
            "--concurrency",
            "3",
        ],
        &[],
    );
    let key = Host::published_key(&run);
    let head = host.s3.head(&host.bucket, &key);
    assert_eq!(head.content_length(), Some(body.len() as i64));
    assert_eq!(head.metadata().unwrap()["sha256"], sha256_hex(&body));
    assert!(
        head.e_tag().unwrap().ends_with("-3\""),
        "three parts: {:?}",
        head.e_tag()
    );
    assert_eq!(
        sha256_hex(&host.s3.get(&host.bucket, &key)),
        sha256_hex(&body)
    );
    host.deploy(&key, &["--no-containers"]).ok();
    assert_eq!(
        std::fs::read(host.current_dir().join("blob.bin")).unwrap(),
        noise
    );
}

#[test]
fn commit_comes_from_github_sha_and_is_required() {
    let host = Host::new();
    let file = write_file(&host, "web.tar.gz", &app("v1").gz());
    host.publish(&file, "prod", &[], &[])
        .fails_with(64, "GITHUB_SHA");
    host.publish(&file, "prod", &["--commit", "xyz"], &[])
        .fails_with(64, "not a git commit id");
    host.publish(&file, "pr/51", &["--commit", COMMIT], &[])
        .fails_with(64, "--environment");

    let run = host.publish(
        &file,
        "pr-51",
        &[],
        &[
            ("GITHUB_SHA", "abcdef0123456789abcdef0123456789abcdef01"),
            ("GITHUB_REF", "refs/pull/51/merge"),
            ("GITHUB_REF_NAME", "51/merge"),
            ("GITHUB_HEAD_REF", "feature/login"),
            ("GITHUB_RUN_ID", "777"),
        ],
    );
    let key = Host::published_key(&run);
    assert!(key_shape_ok(&key, "pr-51", "abcdef01"), "{key}");
    let head = host.s3.head(&host.bucket, &key);
    let meta = head.metadata().unwrap();
    assert_eq!(meta["branch"], "feature/login");
    assert_eq!(meta["pr-number"], "51");
    assert_eq!(meta["workflow-run-id"], "777");
    assert_eq!(
        meta["commit-sha"],
        "abcdef0123456789abcdef0123456789abcdef01"
    );
}

#[test]
fn missing_file_and_empty_file_are_named() {
    let host = Host::new();
    let missing = host.dir.path().join("nope.tar.gz");
    host.publish(&missing, "prod", &["--commit", COMMIT], &[])
        .fails_with(66, "nope.tar.gz");
    let empty = write_file(&host, "empty.tar.gz", b"");
    host.publish(&empty, "prod", &["--commit", COMMIT], &[])
        .fails_with(65, "is empty");
    assert!(host.s3.keys(&host.bucket).is_empty());
}

/// Publishes `n` releases of `env`, one second apart; returns their keys, oldest first.
fn publish_n(host: &Host, env: &str, n: usize, first_extra: &[&str]) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..n {
        let body = Tarball::new()
            .file("./VERSION", 0o644, format!("{env}-{i}").as_bytes())
            .gz();
        let commit = format!("{i:08x}{}", &COMMIT[8..]);
        let mut args = vec!["--commit", commit.as_str()];
        if i == 0 {
            args.extend_from_slice(first_extra);
        }
        let name = format!("{env}-{i}.tar.gz");
        keys.push(host.publish_bytes(&name, &body, env, &args).key);
        std::thread::sleep(Duration::from_millis(1100));
    }
    keys
}

/// `deployd gc --bucket <own bucket> --app web ARGS`.
fn gc(host: &Host, args: &[&str]) -> common::Run {
    let mut all = vec!["gc", "--bucket", &host.bucket, "--app", "web"];
    all.extend_from_slice(args);
    host.run(&all)
}

#[test]
fn gc_keeps_newest_young_and_pointed_at_releases() {
    let host = Host::new();
    let sk = host.dir.path().join("ci.key");
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    std::fs::write(&sk, kp.sk.to_box(None).unwrap().to_string()).unwrap();
    // prod: the OLDEST release is the one the pointer names, and it is signed.
    let prod = publish_n(
        &host,
        "prod",
        5,
        &["--pointer", "--sign", sk.to_str().unwrap()],
    );
    let staging = publish_n(&host, "staging", 3, &[]);
    host.s3.put(
        &host.bucket,
        "web/pr-51/web-deployment.tar.gz",
        b"legacy",
        &[],
    );
    host.s3.put(&host.bucket, "web/prod/notes.txt", b"x", &[]);
    host.s3
        .put(&host.bucket, "web/prod/not-a-release/x.tar.gz", b"x", &[]);
    let before = host.s3.keys(&host.bucket);
    let sig0 = format!("{}.minisig", prod[0]);
    assert!(before.contains(&sig0));

    // Everything is young: the default --days 30 protects it all.
    let run = gc(&host, &["--keep", "0"]);
    run.ok();
    assert!(run.stdout.contains("deleted 0 objects"), "{}", run.stdout);
    assert_eq!(host.s3.keys(&host.bucket), before);

    // Dry run: lists releases 1 and 2 of prod with sizes, deletes nothing.
    let run = gc(
        &host,
        &[
            "--environment",
            "prod",
            "--keep",
            "2",
            "--days",
            "0",
            "--dry-run",
        ],
    );
    run.ok();
    for k in &prod[1..3] {
        assert!(
            run.stdout
                .contains(&format!("would delete s3://{}/{k} (", host.bucket)),
            "{}",
            run.stdout
        );
    }
    for k in [&prod[0], &sig0, &prod[3], &prod[4]] {
        let line = format!("would delete s3://{}/{k} ", host.bucket);
        assert!(!run.stdout.contains(&line), "{k} is kept:\n{}", run.stdout);
    }
    assert!(
        run.stdout.contains(&format!("pointed at: {}", prod[0])),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("would delete 2 objects in 2 releases"),
        "{}",
        run.stdout
    );
    assert_eq!(host.s3.keys(&host.bucket), before);

    // For real, all environments, keep 1.
    let run = gc(&host, &["--keep", "1", "--days", "0"]);
    run.ok();
    let after = host.s3.keys(&host.bucket);
    let mut expected: Vec<String> = before
        .iter()
        .filter(|k| ![&prod[1], &prod[2], &prod[3], &staging[0], &staging[1]].contains(k))
        .cloned()
        .collect();
    expected.sort();
    assert_eq!(after, expected, "{}", run.stdout);
    for k in [&prod[0], &sig0, &prod[4], &staging[2]] {
        assert!(after.contains(k), "{k} kept");
    }
    assert!(after.contains(&"web/prod/current.json".to_string()));
    assert!(after.contains(&"web/pr-51/web-deployment.tar.gz".to_string()));
    assert!(
        run.stdout.contains("deleted 5 objects in 5 releases"),
        "{}",
        run.stdout
    );
}

#[test]
fn gc_refuses_an_environment_whose_pointer_is_broken() {
    let host = Host::new();
    let prod = publish_n(&host, "prod", 2, &[]);
    host.s3
        .put(&host.bucket, "web/prod/current.json", b"{not json", &[]);
    let run = gc(&host, &["--keep", "0", "--days", "0"]);
    assert_eq!(run.code, 65, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("skipped environment prod"),
        "{}",
        run.stdout
    );
    let keys = host.s3.keys(&host.bucket);
    assert!(prod.iter().all(|k| keys.contains(k)));
}
