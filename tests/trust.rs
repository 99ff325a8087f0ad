//! Trust end to end: what someone who can write the bucket but holds no signing key can do to
//! a host with `[source] public_key`, and what an operator can still do on purpose.
//!
//! Keys are made by the `minisign` command line, unencrypted (`minisign -G -W`) and with a
//! password. Each attack is refused with exit 65 and leaves the serving release untouched;
//! `deployd rollback`, `deploy --allow-downgrade` and republishing an old build still work;
//! the high-water mark survives a daemon restart; two keys are trusted during a rotation; an
//! expired pointer is reported in status, tags and metrics while the release keeps serving;
//! overrides stay within the allowed buckets; `ExpectedBucketOwner` is on the wire.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::daemon::{Daemon, Notify, Options};
use common::keys::{Keys, cli_keys, cli_sign};
use common::{Host, Published, Run, app, imds, moto, proxy, sha256_hex, write_file};

const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";
const C3: &str = "3333333333333333333333333333333333333333";
const POINTER: &str = "web/prod/current.json";

/// Writes a config trusting `keys`, with `source` lines added to `[source]`.
fn trust(host: &Host, keys: &[&Keys], source: &str, extra: &str) {
    let list: Vec<String> = keys.iter().map(|k| format!("\"{}\"", k.public)).collect();
    host.write_config(
        &format!("public_key = [{}]\n{source}", list.join(", ")),
        extra,
    );
}

/// A host following the signed pointer `web/prod/current.json`, trusting `keys`.
fn pointer_host(keys: &[&Keys], source: &str, extra: &str) -> Host {
    let host = Host::new();
    let source = format!(
        "bucket = \"{}\"\npointer_key = \"{POINTER}\"\n{source}",
        host.bucket
    );
    trust(&host, keys, &source, extra);
    host
}

/// `deployd publish` of `app(version)` for `app_name`/`env`, signed with `keys`.
fn publish(
    host: &Host,
    keys: &Keys,
    app_name: &str,
    env: &str,
    version: &str,
    commit: &str,
    extra: &[&str],
) -> Run {
    let body = app(version).gz();
    let file = write_file(host, &format!("{app_name}-{env}-{version}.tar.gz"), &body);
    let mut cmd = host.command(&[
        "publish",
        file.to_str().unwrap(),
        "--bucket",
        &host.bucket,
        "--app",
        app_name,
        "--environment",
        env,
        "--commit",
        commit,
        "--sign",
        keys.secret.to_str().unwrap(),
    ]);
    cmd.args(extra).env_remove("DEPLOYD_SIGN_PASSWORD");
    for (k, v) in keys.env() {
        cmd.env(k, v);
    }
    Run::from(cmd.output().unwrap())
}

/// A signed release of `app(version)` for web/`env`, with its pointer when `pointer`.
fn release(
    host: &Host,
    keys: &Keys,
    env: &str,
    version: &str,
    commit: &str,
    pointer: bool,
) -> Published {
    let extra: &[&str] = if pointer { &["--pointer"] } else { &[] };
    let run = publish(host, keys, "web", env, version, commit, extra);
    Published {
        key: Host::published_key(&run),
        sha256: sha256_hex(&app(version).gz()),
    }
}

fn get(host: &Host, key: &str) -> Vec<u8> {
    host.s3.get(&host.bucket, key)
}

fn put(host: &Host, key: &str, bytes: &[u8]) {
    host.s3.put(&host.bucket, key, bytes, &[]);
}

fn deploy(host: &Host, extra: &[&str]) -> Run {
    let mut args = vec!["deploy", "--no-containers"];
    args.extend_from_slice(extra);
    host.run(&args)
}

/// Refused with 65 and `needle`, recorded as such, `release` (`version`) still serving.
#[track_caller]
fn refused(run: &Run, needle: &str, host: &Host, release: &str, version: &str) {
    run.fails_with(65, needle);
    host.assert_serving(release, version);
    assert_eq!(host.state()["last_attempt"]["exit_code"], 65);
    assert_eq!(host.state()["current"]["id"], release);
}

fn keys(host: &Host, name: &str, password: Option<&str>) -> Option<Keys> {
    cli_keys(host.dir.path(), name, password)
}

#[test]
fn rollbacks_need_an_operator_and_republishing_is_the_way_back() {
    let scratch = Host::new();
    let Some(k) = keys(&scratch, "ci", None) else {
        return;
    };
    let host = pointer_host(&[&k], "", "");
    let v1 = release(&host, &k, "prod", "v1", C1, true);
    let p1 = get(&host, POINTER);
    deploy(&host, &[]).ok();
    let r1 = host.current().unwrap();
    let v2 = release(&host, &k, "prod", "v2", C2, true);
    let p2 = get(&host, POINTER);
    deploy(&host, &[]).ok();
    let r2 = host.current().unwrap();
    let hw = host.state()["high_water"]["web/prod"].clone();
    assert_eq!(hw["key"], v2.key.as_str(), "{hw}");
    assert_eq!(host.manifest()["identity"]["sequence"], hw["sequence"]);
    let seq2 = hw["sequence"].as_u64().unwrap();

    // The genuine, signed v1 pointer put back: a rollback attack.
    put(&host, POINTER, &p1);
    refused(&deploy(&host, &[]), "older than release", &host, &r2, "v2");
    // v1's key named directly: the same.
    refused(
        &host.deploy(&v1.key, &["--no-containers"]),
        "older than release",
        &host,
        &r2,
        "v2",
    );

    // An operator's local rollback still works, and the mark is not lowered by it.
    host.run(&["rollback"]).ok();
    host.assert_serving(&r1, "v1");
    assert_eq!(
        host.state()["high_water"]["web/prod"]["key"],
        v2.key.as_str()
    );
    put(&host, POINTER, &p2);
    deploy(&host, &[]).ok();
    assert_eq!(host.served_version(), "v2");

    // A deliberate downgrade from the command line.
    put(&host, POINTER, &p1);
    deploy(&host, &["--allow-downgrade"]).ok();
    assert_eq!(host.served_version(), "v1");
    let hw = host.state()["high_water"]["web/prod"].clone();
    assert_eq!(hw["key"], v1.key.as_str(), "{hw}");
    assert_eq!(hw["downgraded"], true);
    assert_eq!(host.manifest()["downgrade"], true);

    // Forward again, then the documented way back: publish the old build again.
    put(&host, POINTER, &p2);
    deploy(&host, &[]).ok();
    assert_eq!(host.served_version(), "v2");
    let again = release(&host, &k, "prod", "v1", C1, true);
    assert_ne!(again.key, v1.key);
    assert_eq!(again.sha256, v1.sha256, "the same bytes");
    deploy(&host, &[]).ok();
    assert_eq!(host.served_version(), "v1");
    assert_eq!(host.manifest()["key"], again.key.as_str());
    let seq = host.manifest()["identity"]["sequence"].as_u64().unwrap();
    assert!(seq > seq2, "{seq} > {seq2}");
}

#[test]
fn the_high_water_mark_survives_a_daemon_restart() {
    let scratch = Host::new();
    let Some(k) = keys(&scratch, "ci", None) else {
        return;
    };
    let host = pointer_host(&[&k], "", "");
    release(&host, &k, "prod", "v1", C1, true);
    let p1 = get(&host, POINTER);
    let v2 = release(&host, &k, "prod", "v2", C2, true);

    let mut d = Daemon::start(&host, Options::default().notify(Notify::Path));
    d.ready();
    assert_eq!(host.served_version(), "v2");
    let r2 = host.current().unwrap();
    assert_eq!(d.stop(Duration::from_secs(30)), 0);

    put(&host, POINTER, &p1);
    let mut d = Daemon::start(&host, Options::default().notify(Notify::Path));
    let notes = d.ready().join("\n");
    assert!(notes.contains("older than release"), "{notes}\n{}", d.log());
    host.assert_serving(&r2, "v2");
    let state = host.state();
    assert_eq!(state["last_attempt"]["exit_code"], 65);
    assert_eq!(state["high_water"]["web/prod"]["key"], v2.key.as_str());
    assert_eq!(d.stop(Duration::from_secs(30)), 0);

    // state.json lost or damaged: the mark comes back from the releases' manifests.
    for damage in [Some(&b"{ not json"[..]), None] {
        let file = host.state_dir().join("state.json");
        match damage {
            Some(bytes) => std::fs::write(&file, bytes).unwrap(),
            None => std::fs::remove_file(&file).unwrap(),
        }
        let mut d = Daemon::start(&host, Options::default().notify(Notify::Path));
        let notes = d.ready().join("\n");
        assert!(
            notes.contains("older than release"),
            "{damage:?}: {notes}\n{}",
            d.log()
        );
        host.assert_serving(&r2, "v2");
        assert_eq!(
            host.state()["high_water"]["web/prod"]["key"],
            v2.key.as_str()
        );
        assert_eq!(d.stop(Duration::from_secs(30)), 0);
    }
}

#[test]
fn another_environments_or_apps_pointer_is_refused() {
    let scratch = Host::new();
    let Some(k) = keys(&scratch, "ci", None) else {
        return;
    };
    let host = pointer_host(&[&k], "", "");
    release(&host, &k, "prod", "v1", C1, true);
    deploy(&host, &[]).ok();
    let r1 = host.current().unwrap();
    let prod = get(&host, POINTER);

    // The signed staging pointer copied over prod's.
    let staging = release(&host, &k, "staging", "staging", C2, true);
    put(&host, POINTER, &get(&host, "web/staging/current.json"));
    refused(
        &deploy(&host, &[]),
        "signed for pointer \"web/staging/current.json\"",
        &host,
        &r1,
        "v1",
    );
    // A hand-written pointer naming the staging build: nobody signed it.
    let forged = deployd::contract::pointer::Pointer::unsigned(
        staging.key.clone(),
        staging.sha256.clone(),
        C2.into(),
        "2026-11-05T10:15:00Z".into(),
    );
    put(&host, POINTER, forged.to_json().as_bytes());
    refused(&deploy(&host, &[]), "is not signed", &host, &r1, "v1");

    // Another app's signed pointer (same key, same bucket) copied over web's, and its
    // artifact named directly.
    let api = publish(&host, &k, "api", "prod", "api", C3, &["--pointer"]);
    let api_key = Host::published_key(&api);
    put(&host, POINTER, &get(&host, "api/prod/current.json"));
    refused(
        &deploy(&host, &[]),
        "signed for pointer \"api/prod/current.json\"",
        &host,
        &r1,
        "v1",
    );
    refused(
        &host.deploy(&api_key, &["--no-containers"]),
        "signed for app \"api\"",
        &host,
        &r1,
        "v1",
    );

    // The genuine pointer still deploys (nothing to do).
    put(&host, POINTER, &prod);
    deploy(&host, &[]).ok();
    host.assert_serving(&r1, "v1");
}

#[test]
fn an_old_artifact_copied_over_a_new_key_is_refused() {
    let host = Host::new();
    let Some(k) = keys(&host, "ci", None) else {
        return;
    };
    trust(&host, &[&k], "", "");
    let v1 = release(&host, &k, "prod", "v1", C1, false);
    let v2 = release(&host, &k, "prod", "v2", C2, false);
    host.deploy(&v1.key, &["--no-containers"]).ok();
    let r1 = host.current().unwrap();

    // v1's bytes, metadata and signature copied over v2's exact key before the host deploys it.
    let body = get(&host, &v1.key);
    host.s3.put(
        &host.bucket,
        &v2.key,
        &body,
        &[("sha256", &v1.sha256), ("commit-sha", C1)],
    );
    put(
        &host,
        &format!("{}.minisig", v2.key),
        &get(&host, &format!("{}.minisig", v1.key)),
    );
    let run = host.deploy(&v2.key, &["--no-containers"]);
    refused(
        &run,
        &format!("signed for key \"{}\"", v1.key),
        &host,
        &r1,
        "v1",
    );
    assert!(!run.stdout.contains("already serving"), "{}", run.stdout);
    assert_eq!(host.releases().len(), 1);
}

#[test]
fn a_signature_without_a_release_identity_is_refused() {
    let host = Host::new();
    let Some(k) = keys(&host, "ci", None) else {
        return;
    };
    trust(&host, &[&k], "", "");
    let v1 = release(&host, &k, "prod", "v1", C1, false);
    host.deploy(&v1.key, &["--no-containers"]).ok();
    let r1 = host.current().unwrap();

    // Signed by the trusted key with the minisign command line's own trusted comment
    // (timestamp and file name): genuine bytes, but nothing says which release they are.
    let body = app("v2").gz();
    let file = write_file(&host, "plain.tar.gz", &body);
    let sig = cli_sign(&k, &file);
    let key = "web/prod/22222222-20261105-101500/web-deployment.tar.gz";
    host.upload(key, &body, C2);
    put(&host, &format!("{key}.minisig"), sig.as_bytes());
    refused(
        &host.deploy(key, &["--no-containers"]),
        "carries no usable release identity",
        &host,
        &r1,
        "v1",
    );
}

#[test]
fn minisign_keys_with_and_without_a_password_and_a_rotation() {
    let host = Host::new();
    let Some(old) = keys(&host, "old", None) else {
        return;
    };
    let new = keys(&host, "new", Some("correct horse battery staple")).unwrap();
    trust(&host, &[&old, &new], "", "");

    let v1 = release(&host, &old, "prod", "v1", C1, false);
    host.deploy(&v1.key, &["--no-containers"]).ok();
    assert_eq!(host.served_version(), "v1");
    let v2 = release(&host, &new, "prod", "v2", C2, false);
    host.deploy(&v2.key, &["--no-containers"]).ok();
    assert_eq!(host.served_version(), "v2");
    let r2 = host.current().unwrap();

    // A password-protected key without its password, or with the wrong one.
    let no_password = Keys {
        password: None,
        ..new.clone()
    };
    publish(&host, &no_password, "web", "prod", "v3", C3, &[])
        .fails_with(78, "is encrypted and DEPLOYD_SIGN_PASSWORD is not set");
    let wrong = Keys {
        password: Some("wrong".into()),
        ..new.clone()
    };
    publish(&host, &wrong, "web", "prod", "v3", C3, &[]).fails_with(78, "Wrong password");

    // The rotation ends: only the new key is trusted, and the old one's releases are refused.
    trust(&host, &[&new], "", "");
    let v3 = release(&host, &old, "prod", "v3", C3, false);
    refused(
        &host.deploy(&v3.key, &["--no-containers"]),
        "does not trust",
        &host,
        &r2,
        "v2",
    );
}

#[test]
fn an_expired_pointer_is_reported_while_the_release_keeps_serving() {
    let scratch = Host::new();
    let Some(k) = keys(&scratch, "ci", None) else {
        return;
    };
    let ec2 = common::ec2::Ec2::new();
    let id = ec2.run_instance();
    let server = imds::start("123456789012", "us-east-1", &id);
    let mut host = pointer_host(&[&k], "", "");
    host.imds = Some(server.endpoint.clone());
    let metrics = host.dir.path().join("deployd.prom");
    let source = format!(
        "bucket = \"{}\"\npointer_key = \"{POINTER}\"\nmax_pointer_age = \"6s\"\n",
        host.bucket
    );
    let report = format!(
        "[triggers]\npoll_interval = \"300ms\"\n[report]\nec2_endpoint_url = \"{}\"\nmetrics_file = \"{}\"\n",
        moto().endpoint,
        metrics.display()
    );
    trust(&host, &[&k], &source, &report);
    release(&host, &k, "prod", "v1", C1, true);

    let d = Daemon::start(&host, Options::default().notify(Notify::Path));
    d.ready();
    let r1 = host.current().unwrap();
    assert_eq!(ec2.tags(&id)["deployd:status"], "serving");

    // Nobody re-signs the pointer: once it is 6 s old, the poller's next idle 304 leads to a
    // deployment that refuses it.
    let failed = |h: &Host| {
        h.try_state().is_some_and(|s| {
            s["last_attempt"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("expired at"))
        })
    };
    d.wait_for(
        Duration::from_secs(30),
        "the expired pointer to be reported",
        || failed(&host),
    );
    host.assert_serving(&r1, "v1");
    let status = host.run(&["status", "--json"]);
    status.ok();
    let s: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(s["state"]["last_attempt"]["outcome"], "failed", "{s}");
    assert_eq!(s["state"]["last_attempt"]["exit_code"], 65);
    assert_eq!(s["live"]["last_attempt"]["outcome"], "failed", "{s}");
    assert_eq!(s["state"]["current"]["id"], r1.as_str(), "{s}");
    d.wait_for(Duration::from_secs(10), "the failed tag", || {
        ec2.tags(&id).get("deployd:status").map(String::as_str) == Some("failed")
    });
    assert!(ec2.tags(&id)["deployd:error"].contains("expired"));
    let m = common::ec2::parse_metrics(&metrics);
    assert!(
        common::ec2::sample(&m, "deployd_deployments_total", &[("result", "failed")]) >= Some(1.0),
        "{m}"
    );

    // CI re-signs it (same release, new time): the next poll sees it and all is well again.
    let url = format!("s3://{}/{POINTER}", host.bucket);
    let re = host.run(&[
        "refresh-pointer",
        &url,
        "--sign",
        k.secret.to_str().unwrap(),
    ]);
    re.ok();
    d.wait_for(Duration::from_secs(20), "serving again", || {
        host.try_state()
            .is_some_and(|s| s["last_attempt"]["outcome"] == "unchanged")
    });
    host.assert_serving(&r1, "v1");
    d.wait_for(Duration::from_secs(10), "the serving tag", || {
        ec2.tags(&id).get("deployd:status").map(String::as_str) == Some("serving")
    });
}

#[test]
fn a_signed_expiry_and_refreshing_a_pointer() {
    let scratch = Host::new();
    let Some(old) = keys(&scratch, "old", None) else {
        return;
    };
    let new = keys(&scratch, "new", None).unwrap();
    let host = pointer_host(&[&old, &new], "", "");
    release(&host, &old, "prod", "v1", C1, true);
    deploy(&host, &[]).ok();
    let r1 = host.current().unwrap();
    release(&host, &old, "prod", "v2", C2, true);
    let url = format!("s3://{}/{POINTER}", host.bucket);
    let refresh = |k: &Keys, extra: &[&str]| {
        let mut args = vec![
            "refresh-pointer",
            &url,
            "--sign",
            k.secret.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        host.run(&args)
    };
    // Re-signed with a 1 s expiry and left alone: expired by the time the host looks.
    refresh(&old, &["--expires-in", "1s"]).ok();
    std::thread::sleep(Duration::from_millis(2100));
    refused(&deploy(&host, &[]), "expired at", &host, &r1, "v1");

    // The new key refuses to re-sign a pointer only the old key signed, unless told to trust it.
    refresh(&new, &[]).fails_with(65, "does not trust");
    refresh(&new, &["--trust", &old.public]).ok();
    deploy(&host, &[]).ok();
    assert_eq!(host.served_version(), "v2");

    // A signed copy of another environment's pointer is not re-signed as this one.
    release(&host, &new, "staging", "staging", C3, true);
    put(&host, POINTER, &get(&host, "web/staging/current.json"));
    refresh(&new, &[]).fails_with(65, "refusing to re-sign a copy");

    // A forged pointer is never laundered into a signed one.
    put(
        &host,
        POINTER,
        deployd::contract::pointer::Pointer::unsigned(
            "web/prod/evil/web-deployment.tar.gz".into(),
            "0".repeat(64),
            C3.into(),
            String::new(),
        )
        .to_json()
        .as_bytes(),
    );
    refresh(&new, &[]).fails_with(65, "is not signed");
}

#[test]
fn overrides_stay_within_the_allowed_buckets() {
    let host = Host::new();
    let Some(k) = keys(&host, "ci", None) else {
        return;
    };
    trust(&host, &[&k], "", "[triggers]\ntrusted_group = \"daemon\"\n");
    let v1 = release(&host, &k, "prod", "v1", C1, false);
    host.deploy(&v1.key, &["--no-containers"]).ok();
    let r1 = host.current().unwrap();

    // Another bucket, holding a release signed with the trusted key.
    let other = Host::new();
    let body = app("other").gz();
    let file = write_file(&other, "o.tar.gz", &body);
    let out = other.publish(
        &file,
        "prod",
        &["--commit", C2, "--sign", k.secret.to_str().unwrap()],
        &[],
    );
    let other_key = Host::published_key(&out);
    let run = host.run(&[
        "deploy",
        "--no-containers",
        "--bucket",
        &other.bucket,
        "--key",
        &other_key,
    ]);
    refused(
        &run,
        "is outside the buckets this host deploys from",
        &host,
        &r1,
        "v1",
    );
    host.run(&["trigger", "--bucket", &other.bucket, "--key", &other_key])
        .fails_with(65, "add its bucket to [source] allowed_buckets");
    host.run(&["trigger", "--reason", "deploy\u{1b}[2J now"])
        .fails_with(64, "reason contains control characters");

    // A trigger file naming it, and one allowing a downgrade that root did not write.
    let d = Daemon::start(&host, Options::default().notify(Notify::Path));
    d.ready();
    let triggers = host.dir.path().join("run/triggers");
    let drop_file = |name: &str, text: &str, owner: Option<(u32, u32)>| {
        let tmp = triggers.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o640)).unwrap();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).unwrap();
        }
        std::fs::rename(&tmp, triggers.join(format!("{name}.toml"))).unwrap();
    };
    drop_file(
        "elsewhere",
        &format!("bucket = \"{}\"\nkey = \"{other_key}\"\n", other.bucket),
        None,
    );
    d.wait_for(Duration::from_secs(20), "the refused trigger", || {
        host.try_state().is_some_and(|s| {
            s["last_attempt"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("outside the buckets"))
        })
    });
    assert_eq!(host.state()["last_attempt"]["exit_code"], 65);
    host.assert_serving(&r1, "v1");

    let daemon_gid = nix::unistd::Group::from_name("daemon")
        .unwrap()
        .unwrap()
        .gid
        .as_raw();
    drop_file(
        "downgrade",
        "allow_downgrade = true\n",
        Some((65534, daemon_gid)),
    );
    let note = triggers.join("rejected/downgrade.toml.error");
    d.wait_for(Duration::from_secs(10), "the rejected downgrade", || {
        note.exists()
    });
    let text = std::fs::read_to_string(&note).unwrap();
    assert!(text.contains("only root may allow a downgrade"), "{text}");
    drop(d);

    // Allowed, the other bucket's artifacts are verified like any other: an unsigned one is
    // refused, the signed one deploys.
    trust(
        &host,
        &[&k],
        &format!(
            "allowed_buckets = [\"{}\", \"{}\"]\n",
            host.bucket, other.bucket
        ),
        "",
    );
    other.upload(
        "web/prod/unsigned/web-deployment.tar.gz",
        &app("x").gz(),
        C3,
    );
    let run = host.run(&[
        "deploy",
        "--no-containers",
        "--bucket",
        &other.bucket,
        "--key",
        "web/prod/unsigned/web-deployment.tar.gz",
    ]);
    refused(&run, "has no signature", &host, &r1, "v1");
    host.run(&[
        "deploy",
        "--no-containers",
        "--bucket",
        &other.bucket,
        "--key",
        &other_key,
    ])
    .ok();
    assert_eq!(host.served_version(), "other");
}

fn owners(p: &proxy::Proxy) -> Vec<(String, Option<String>)> {
    p.requests()
        .into_iter()
        .map(|r| {
            let owner = r.header("x-amz-expected-bucket-owner").map(str::to_string);
            (format!("{} {}", r.method, r.path), owner)
        })
        .collect()
}

#[track_caller]
fn all_name(requests: &[(String, Option<String>)], account: &str) {
    assert!(!requests.is_empty());
    for (request, owner) in requests {
        assert_eq!(owner.as_deref(), Some(account), "{request}");
    }
}

#[test]
fn every_s3_request_names_the_bucket_owner() {
    let scratch = Host::new();
    let Some(k) = keys(&scratch, "ci", None) else {
        return;
    };

    // From the config: CI's publish (head, signature, upload, pointer) and a deployment.
    let p = proxy::start(&moto().endpoint, proxy::Behaviour::PassThrough);
    let host = pointer_host(&[&k], "", "[report]\nec2_tags = false\n");
    let text = std::fs::read_to_string(&host.config)
        .unwrap()
        .replace("[s3]\n", "[s3]\nexpected_bucket_owner = \"123456789012\"\n");
    std::fs::write(&host.config, text).unwrap();
    host.route_s3_through(&p.endpoint);
    release(&host, &k, "prod", "v1", C1, true);
    deploy(&host, &[]).ok();
    let seen = owners(&p);
    assert!(seen.iter().any(|(r, _)| r.starts_with("PUT")), "{seen:?}");
    assert!(seen.iter().any(|(r, _)| r.starts_with("GET")), "{seen:?}");
    all_name(&seen, "123456789012");

    // From IMDS: the instance's own account, learned before the first S3 call.
    let p = proxy::start(&moto().endpoint, proxy::Behaviour::PassThrough);
    let server = imds::start("123456789012", "us-east-1", "i-0123456789abcdef0");
    let mut host = pointer_host(&[&k], "", "[report]\nec2_tags = false\n");
    host.imds = Some(server.endpoint.clone());
    release(&host, &k, "prod", "v1", C1, true);
    host.route_s3_through(&p.endpoint);
    deploy(&host, &[]).ok();
    let seen = owners(&p);
    assert!(
        seen.len() >= 4,
        "pointer, head, signature, artifact: {seen:?}"
    );
    all_name(&seen, "123456789012");
    drop(server);
}
