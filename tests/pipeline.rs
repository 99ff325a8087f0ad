//! The artifact pipeline end to end: the real `deployd` binary against a real S3-compatible
//! server (moto) on loopback.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{Host, Tarball, app, sha256_hex};

#[test]
fn happy_path_unpacks_files_modes_links_and_manifest() {
    let host = Host::new();
    let body = app("v1")
        .file("./bin/suid", 0o4755, b"x")
        .dir("./data", 0o700)
        .file("./data/big.bin", 0o600, &vec![7u8; 3 << 20])
        .gz();
    let sha = host.upload("web/prod/622d2103-1/web.tar.gz", &body, "622d2103deadbeef");
    let run = host.deploy("web/prod/622d2103-1/web.tar.gz", &["--no-containers"]);
    run.ok();
    let id = host.current().expect("current points at a release");
    assert!(
        id.ends_with("-622d2103"),
        "release id {id} carries the commit"
    );
    assert!(run.stdout.contains(&id));

    let cur = host.current_dir();
    assert_eq!(std::fs::read_to_string(cur.join("VERSION")).unwrap(), "v1");
    let mode = |p: &str| std::fs::metadata(cur.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("bin/start.sh"), 0o755);
    assert_eq!(mode("index.html"), 0o644);
    assert_eq!(mode("bin/suid"), 0o755, "setuid bit is stripped");
    assert_eq!(
        std::fs::metadata(cur.join("data/big.bin")).unwrap().len(),
        3 << 20
    );
    let link = std::fs::read_link(cur.join("bin/index")).unwrap();
    assert_eq!(link.to_str(), Some("../index.html"));
    assert_eq!(
        std::fs::read_to_string(cur.join("bin/index")).unwrap(),
        "<h1>v1</h1>\n"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(cur.join("VERSION")).unwrap().uid(),
        0,
        "archive owner 4242 not applied"
    );

    let m = host.manifest();
    assert_eq!(m["sha256"], sha);
    assert_eq!(m["bucket"], host.bucket);
    assert_eq!(m["key"], "web/prod/622d2103-1/web.tar.gz");
    assert_eq!(m["compression"], "gzip");
    assert_eq!(m["metadata"]["commit-sha"], "622d2103deadbeef");
    assert_eq!(m["sha256_verified_against"], "sha256 metadata");
    assert_eq!(m["unpacked"]["symlinks"], 1);
    let state = host.state();
    assert_eq!(state["current"]["id"], id.as_str());
    assert_eq!(state["last_attempt"]["outcome"], "deployed");
    assert_eq!(host.staging_entries(), 0);
}

#[test]
fn environment_file_is_a_source_and_its_sha256_is_enforced() {
    let host = Host::new();
    let body = app("env").gz();
    host.s3.put(&host.bucket, "web/env/a.tar.gz", &body, &[]);
    host.write_env(&format!(
        "# cloud-init\nDEPLOYMENT_BUCKET={}\nDEPLOYMENT_KEY=web/env/a.tar.gz\nDEPLOYMENT_SHA256={}\n",
        host.bucket,
        sha256_hex(&body)
    ));
    host.run(&["deploy"]).ok();
    assert_eq!(
        host.manifest()["sha256_verified_against"],
        "DEPLOYMENT_SHA256"
    );
    assert!(
        host.manifest()["source"]
            .as_str()
            .unwrap()
            .contains("DEPLOYMENT_KEY")
    );

    // The file is re-read at every deployment: a new key and a wrong digest are both seen.
    let other = app("env2").gz();
    host.s3.put(&host.bucket, "web/env/b.tar.gz", &other, &[]);
    host.write_env(&format!(
        "DEPLOYMENT_BUCKET={}\nDEPLOYMENT_KEY=web/env/b.tar.gz\nDEPLOYMENT_SHA256={}\n",
        host.bucket,
        sha256_hex(b"something else")
    ));
    let before = host.current();
    host.run(&["deploy"]).fails_with(65, "checksum mismatch");
    assert_eq!(host.current(), before, "nothing activated");
    assert_eq!(host.releases().len(), 1);
    assert_eq!(host.staging_entries(), 0);
}

#[test]
fn config_file_is_a_source() {
    let host = Host::new();
    let body = app("cfg").zst();
    host.upload("web/cfg.tar.zst", &body, "abcdef0123456789");
    host.write_config(
        &format!("bucket = \"{}\"\nkey = \"web/cfg.tar.zst\"", host.bucket),
        "",
    );
    let run = host.run(&["deploy"]);
    run.ok();
    assert_eq!(host.manifest()["compression"], "zstd");
    assert_eq!(host.served_version(), "cfg");
    let check = host.run(&["check-config"]);
    check.ok();
    assert!(
        check.stdout.contains("[source] bucket/key"),
        "{}",
        check.stdout
    );
}

#[test]
fn legacy_template_fills_placeholders_from_env_file_and_imdsv2() {
    let imds = common::imds::start("123456789012", "eu-west-1", "i-0abc");
    let mut host = Host::new();
    host.imds = Some(imds.endpoint.clone());
    // The legacy bucket embeds the account id; the test's bucket is named to match.
    let bucket = format!("legacy-{}-123456789012", std::process::id());
    host.s3.create_bucket(&bucket, false);
    host.write_config(
        &format!(
            "legacy_bucket = \"legacy-{}-{{account_id}}\"\nlegacy_key = \"web/pr-{{pr_number}}/{{region}}/web-deployment.tar.gz\"",
            std::process::id()
        ),
        "",
    );
    host.write_env("PR_NUMBER=51\n");
    let body = app("legacy").tar();
    host.s3.put(
        &bucket,
        "web/pr-51/eu-west-1/web-deployment.tar.gz",
        &body,
        &[],
    );
    let run = host.run(&["deploy"]);
    run.ok();
    assert!(
        run.stderr.contains("legacy"),
        "using the legacy path warns:\n{}",
        run.stderr
    );
    assert_eq!(host.manifest()["compression"], "none");
    let log = imds.log.lock().unwrap().clone();
    assert_eq!(
        log.first().map(String::as_str),
        Some("PUT /latest/api/token no-token"),
        "{log:?}"
    );
    assert!(
        log.iter().skip(1).all(|l| l.ends_with(" token")),
        "every GET carries the IMDSv2 token: {log:?}"
    );
}

#[test]
fn artifact_uploaded_while_waiting_is_deployed() {
    let host = Host::with(false, "", "");
    host.write_config("wait_for_artifact = \"40s\"", "");
    let child = host
        .command(&[
            "deploy",
            "--bucket",
            &host.bucket,
            "--key",
            "web/late.tar.gz",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    host.upload("web/late.tar.gz", &app("late").gz(), "1234567890abcdef");
    let run = common::Run::from(child.wait_with_output().unwrap());
    run.ok();
    assert!(
        run.stderr.contains("waiting for the upload"),
        "{}",
        run.stderr
    );
    assert_eq!(host.served_version(), "late");
}

#[test]
fn missing_artifact_exits_66_and_lists_the_newest_keys() {
    let host = Host::new();
    host.s3.put(
        &host.bucket,
        "web/prod/aaaa1111-20250101-000000/web.tar.gz",
        b"x",
        &[],
    );
    host.s3.put(
        &host.bucket,
        "web/prod/bbbb2222-20250102-000000/web.tar.gz",
        b"x",
        &[],
    );
    let started = std::time::Instant::now();
    let run = host.deploy("web/prod/cccc3333-20250103-000000/web.tar.gz", &[]);
    run.fails_with(66, "was not found after waiting");
    // The whole configured wait (2 s) is honoured, not cut short by the backoff's last step.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        run.error_line().contains("waiting 2s"),
        "{}",
        run.error_line()
    );
    let line = run.error_line();
    assert!(
        line.contains("bbbb2222-20250102-000000/web.tar.gz"),
        "{line}"
    );
    assert!(
        line.contains("aaaa1111-20250101-000000/web.tar.gz"),
        "{line}"
    );
    assert!(host.current().is_none());
    assert_eq!(host.state()["last_attempt"]["exit_code"], 66);
    host.deploy("x", &[]);
    // A bucket the host may deploy from but which does not exist; one it may not name is
    // refused before S3 is asked.
    let run = host.run(&["deploy", "--bucket", "no-such-bucket-deployd", "--key", "k"]);
    run.fails_with(65, "outside the buckets this host deploys from");
    host.write_config(
        &format!(
            "allowed_buckets = [\"{}\", \"no-such-bucket-deployd\"]\n",
            host.bucket
        ),
        "",
    );
    let run = host.run(&["deploy", "--bucket", "no-such-bucket-deployd", "--key", "k"]);
    run.fails_with(66, "bucket no-such-bucket-deployd does not exist");
}

#[test]
fn checksum_mismatch_from_metadata_or_s3_checksum_activates_nothing() {
    let host = Host::new();
    host.upload("web/good.tar.gz", &app("good").gz(), "1111111111111111");
    host.deploy("web/good.tar.gz", &[]).ok();
    let good = host.current();

    let body = app("bad").gz();
    host.s3.put(
        &host.bucket,
        "web/bad-meta.tar.gz",
        &body,
        &[("sha256", &sha256_hex(b"not it"))],
    );
    host.deploy("web/bad-meta.tar.gz", &[])
        .fails_with(65, "checksum mismatch");

    host.s3
        .put_with_checksum(&host.bucket, "web/bad-sum.tar.gz", &body, &[9u8; 32]);
    host.deploy("web/bad-sum.tar.gz", &[])
        .fails_with(65, "S3 SHA-256 checksum");

    assert_eq!(host.current(), good);
    assert_eq!(host.releases().len(), 1);
    assert_eq!(host.staging_entries(), 0);
    assert_eq!(host.served_version(), "good");
}

#[test]
fn broken_artifacts_exit_65_and_leave_the_serving_release() {
    let host = Host::new();
    host.upload("web/good.tar.gz", &app("good").gz(), "1111111111111111");
    host.deploy("web/good.tar.gz", &[]).ok();
    let good = host.current();

    let full = app("truncated")
        .file("./blob", 0o644, &vec![1u8; 200_000])
        .gz();
    let cut = &full[..full.len() / 2];
    host.s3.put(&host.bucket, "web/cut.tar.gz", cut, &[]);
    host.deploy("web/cut.tar.gz", &[])
        .fails_with(65, "corrupt or truncated");

    // Only the gzip trailer is missing: the tar part is complete, the CRC check catches it.
    host.s3.put(
        &host.bucket,
        "web/trailer.tar.gz",
        &full[..full.len() - 4],
        &[],
    );
    host.deploy("web/trailer.tar.gz", &[])
        .fails_with(65, "corrupt or truncated");

    host.s3.put(
        &host.bucket,
        "web/html.tar.gz",
        b"<html><body>Access Denied</body></html>",
        &[],
    );
    host.deploy("web/html.tar.gz", &[])
        .fails_with(65, "not a gzip, zstd or tar archive");

    host.s3.put(&host.bucket, "web/empty.tar.gz", b"", &[]);
    host.deploy("web/empty.tar.gz", &[])
        .fails_with(65, "is empty");

    assert_eq!(host.current(), good);
    assert_eq!(host.releases().len(), 1);
    assert_eq!(host.staging_entries(), 0);
}

#[test]
fn hostile_archives_are_refused_and_nothing_escapes() {
    use tar::EntryType::*;
    let host = Host::with(
        false,
        "",
        "[unpack]\nmax_entries = 50\nmax_bytes = \"1MiB\"\nmax_path_len = 120\n",
    );
    host.upload("web/good.tar.gz", &app("good").gz(), "1111111111111111");
    host.deploy("web/good.tar.gz", &[]).ok();
    let good = host.current();
    let outside = host.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let out = outside.display().to_string();

    let base = || Tarball::new().file("./ok.txt", 0o644, b"fine");
    let mut many = base();
    for i in 0..60 {
        many = many.file(&format!("./f{i}"), 0o644, b"x");
    }
    let corpus: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "absolute path",
            base()
                .raw(&format!("{out}/evil"), Regular, "", b"pwned")
                .gz(),
            "absolute",
        ),
        (
            "dot-dot",
            base().raw("../evil", Regular, "", b"pwned").gz(),
            "`..`",
        ),
        (
            "nested dot-dot",
            base().raw("a/b/../../../evil", Regular, "", b"pwned").gz(),
            "`..`",
        ),
        (
            "symlink to absolute dir",
            base().raw("escape", Symlink, &out, b"").gz(),
            "leaves the release",
        ),
        (
            "symlink climbing out",
            base().raw("a/escape", Symlink, "../../outside", b"").gz(),
            "leaves the release",
        ),
        (
            "write through a symlink",
            base()
                .raw("link", Symlink, &out, b"")
                .raw("link/evil", Regular, "", b"pwned")
                .gz(),
            "leaves the release",
        ),
        (
            "symlink replaced by a directory",
            base()
                .raw("d", Symlink, "ok.txt", b"")
                .raw("d/evil", Regular, "", b"x")
                .gz(),
            "would replace",
        ),
        (
            "unnormalised symlink",
            base().raw("l", Symlink, "a/../../evil", b"").gz(),
            "normalised",
        ),
        (
            "hardlink to absolute",
            base().raw("h", Link, "/etc/passwd", b"").gz(),
            "absolute",
        ),
        (
            "hardlink climbing out",
            base().raw("h", Link, "../outside/x", b"").gz(),
            "`..`",
        ),
        (
            "hardlink to a directory",
            base().dir("./d", 0o755).raw("h", Link, "d", b"").gz(),
            "not a regular file",
        ),
        (
            "char device",
            base().raw("dev", Char, "", b"").gz(),
            "device nodes",
        ),
        (
            "block device",
            base().raw("blk", Block, "", b"").gz(),
            "device nodes",
        ),
        ("fifo", base().raw("fifo", Fifo, "", b"").gz(), "fifos"),
        ("too many entries", many.gz(), "max_entries"),
        (
            "too many bytes",
            base().file("./big", 0o644, &vec![0u8; 2 << 20]).gz(),
            "max_bytes",
        ),
        (
            "path too long",
            base()
                .file(&format!("./{}", "d/".repeat(70)), 0o644, b"x")
                .gz(),
            "max_path_len",
        ),
        (
            "parent is a file",
            base().raw("ok.txt/evil", Regular, "", b"x").gz(),
            "not a directory",
        ),
        (
            "file replaces a directory",
            base().dir("./d", 0o755).raw("d", Regular, "", b"x").gz(),
            "replace a directory",
        ),
    ];
    assert!(corpus.len() >= 12);
    for (i, (name, body, needle)) in corpus.iter().enumerate() {
        let key = format!("web/hostile-{i}.tar.gz");
        host.s3.put(&host.bucket, &key, body, &[]);
        let run = host.deploy(&key, &[]);
        assert_eq!(run.code, 65, "{name}: expected exit 65\n{}", run.stderr);
        assert!(
            run.error_line().contains(needle),
            "{name}: expected {needle:?} in {:?}",
            run.error_line()
        );
        assert_eq!(host.current(), good, "{name}: serving release changed");
        assert_eq!(host.staging_entries(), 0, "{name}: staging debris");
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "{name}: wrote outside"
        );
        let escaped: Vec<_> = host
            .all_paths()
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|n| n == "evil"))
            .collect();
        assert!(escaped.is_empty(), "{name}: found {escaped:?}");
    }
    assert_eq!(host.releases().len(), 1);
    assert_eq!(host.served_version(), "good");
}

#[test]
fn bad_config_exits_78_naming_the_key() {
    let host = Host::new();
    host.write_config("", "[source2]\nx = 1\n");
    host.run(&["deploy"]).fails_with(78, "source2");
    host.write_config("wait_for_artifact = \"soon\"", "");
    host.run(&["check-config"])
        .fails_with(78, "source.wait_for_artifact");
    host.write_config("bukket = \"x\"", "");
    host.run(&["deploy"]).fails_with(78, "source.bukket");
    host.write_config("legacy_key = \"web/pr-{pr_number}/web.tar.gz\"", "");
    host.write_env("ACCOUNT_ID=1\nDEPLOYMENT_SHA256=\n");
    let run = host.run(&["deploy"]);
    run.fails_with(78, "{pr_number}");
    assert!(
        run.error_line().contains("PR_NUMBER"),
        "{}",
        run.error_line()
    );
    host.write_env("DEPLOYMENT_BUCKET=b\n");
    host.write_config("", "");
    host.run(&["deploy"])
        .fails_with(78, "DEPLOYMENT_KEY is not");
    let run = host.run(&["deploy", "--bogus"]);
    assert_eq!(run.code, 64, "usage errors exit 64: {}", run.stderr);
}

#[test]
fn redeploying_the_same_artifact_is_a_no_op_unless_forced() {
    let host = Host::new();
    host.upload("web/a.tar.gz", &app("a").gz(), "aaaaaaaaaaaaaaaa");
    host.deploy("web/a.tar.gz", &[]).ok();
    let first = host.current();
    let run = host.deploy("web/a.tar.gz", &[]);
    run.ok();
    assert!(run.stdout.contains("already serving"), "{}", run.stdout);
    assert_eq!(host.releases().len(), 1);
    assert_eq!(host.state()["last_attempt"]["outcome"], "unchanged");
    std::thread::sleep(Duration::from_millis(1100));
    host.deploy("web/a.tar.gz", &["--force"]).ok();
    assert_eq!(host.releases().len(), 2);
    assert_ne!(host.current(), first);
}

#[test]
fn retention_keeps_n_releases_and_rollback_switches_back() {
    let host = Host::with(false, "", "[releases]\nkeep = 2\n");
    let mut ids = Vec::new();
    for v in ["v1", "v2", "v3", "v4"] {
        let key = format!("web/{v}.tar.gz");
        host.upload(&key, &app(v).gz(), &format!("{v}{v}{v}{v}abcdef"));
        host.deploy(&key, &[]).ok();
        ids.push(host.current().unwrap());
    }
    assert_eq!(host.releases(), ids[2..].to_vec(), "newest two kept");
    let run = host.run(&["rollback"]);
    run.ok();
    assert_eq!(host.current().as_deref(), Some(ids[2].as_str()));
    assert_eq!(host.served_version(), "v3");
    let state = host.state();
    assert_eq!(state["previous_good"]["id"], ids[3].as_str());
    assert_eq!(state["last_attempt"]["outcome"], "rolled-back");
    host.run(&["rollback", "no-such-release"])
        .fails_with(64, "does not exist");
    let status = host.run(&["status", "--json"]);
    status.ok();
    let doc: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(doc["state"]["current"]["id"], ids[2].as_str());
}

#[test]
fn status_wait_reports_the_last_result() {
    let host = Host::new();
    host.upload("web/a.tar.gz", &app("a").gz(), "aaaaaaaaaaaaaaaa");
    host.deploy("web/a.tar.gz", &[]).ok();
    let run = host.run(&["status", "--wait", "--timeout", "5s"]);
    run.ok();
    assert!(run.stdout.contains("serving"), "{}", run.stdout);
    host.deploy("web/missing.tar.gz", &[]);
    let run = host.run(&["status", "--wait", "--timeout", "5s"]);
    assert_eq!(
        run.code, 66,
        "status --wait exits with the failed attempt's code"
    );
}

#[test]
fn size_limit_and_required_metadata_are_checked_before_download() {
    let host = Host::with(
        false,
        "max_artifact_size = \"64KiB\"\nrequired_metadata = [\"commit-sha\", \"branch\"]",
        "",
    );
    let body = app("m").gz();
    host.upload("web/nobranch.tar.gz", &body, "1234567890abcdef");
    let run = host.deploy("web/nobranch.tar.gz", &[]);
    run.fails_with(65, "lacks the required metadata");
    assert!(run.error_line().contains("branch"), "{}", run.error_line());
    let sha = sha256_hex(&body);
    host.s3.put(
        &host.bucket,
        "web/ok.tar.gz",
        &body,
        &[
            ("sha256", &sha),
            ("commit-sha", "1234567890abcdef"),
            ("branch", "main"),
        ],
    );
    host.deploy("web/ok.tar.gz", &[]).ok();
    let big = Tarball::new()
        .file("./big", 0o644, &vec![1u8; 200 << 10])
        .tar();
    host.s3.put(
        &host.bucket,
        "web/big.tar",
        &big,
        &[("commit-sha", "x"), ("branch", "main")],
    );
    host.deploy("web/big.tar", &[])
        .fails_with(65, "over [source] max_artifact_size");
    assert_eq!(host.releases().len(), 1);
}

#[test]
fn under_systemd_without_a_journal_socket_logs_go_to_stderr_without_timestamps() {
    let host = Host::new();
    host.upload("web/a.tar.gz", &app("a").gz(), "aaaaaaaaaaaaaaaa");
    let out = host
        .command(&["deploy", "--bucket", &host.bucket, "--key", "web/a.tar.gz"])
        .env("JOURNAL_STREAM", "8:12345")
        .output()
        .unwrap();
    let run = common::Run::from(out);
    run.ok();
    assert!(
        run.stderr.contains("journald socket unavailable"),
        "{}",
        run.stderr
    );
    let first_info = run.stderr.lines().find(|l| l.contains("INFO")).unwrap();
    assert!(
        first_info.trim_start().starts_with("INFO"),
        "no timestamp: {first_info}"
    );
    let json = host.run(&["--log-format", "json", "status"]);
    json.ok();
    let with_json = host
        .command(&[
            "--log-format",
            "json",
            "deploy",
            "--bucket",
            &host.bucket,
            "--key",
            "web/a.tar.gz",
        ])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&with_json.stderr)
        .lines()
        .find(|l| l.contains("verified artifact"))
        .map(str::to_string)
        .expect("a JSON log line for the verify stage");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["key"], "web/a.tar.gz");
}
