//! Trust end to end, the limits: a pointer's age (`max_pointer_age`, a signed `expires_at`)
//! reported in status, tags and metrics while the release keeps serving, and re-signing it
//! with `refresh-pointer`; overrides (`--bucket/--key`, trigger files) within the allowed
//! buckets, `allow_downgrade` from root only, no control characters in a reason;
//! `check-config` on signatures; `ExpectedBucketOwner` on every request, on the wire.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::daemon::{Daemon, Notify, Options};
use common::keys::{Keys, ci_keys};
use common::signed::{
    C1, C2, C3, POINTER, Serving, deploy, get, pointer_host, put, refused, release, serving_v1,
    trust,
};
use common::{Host, app, imds, moto, proxy, write_file};

#[test]
fn an_expired_pointer_is_reported_while_the_release_keeps_serving() {
    let Some(k) = ci_keys("ci", None) else {
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
    let Some(old) = ci_keys("old", None) else {
        return;
    };
    let new = ci_keys("new", None).unwrap();
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
    let Some(Serving {
        host,
        key: k,
        release: r1,
        ..
    }) = serving_v1(false, "[triggers]\ntrusted_group = \"daemon\"\n")
    else {
        return;
    };

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
    let from_other = |key: &str| {
        host.run(&[
            "deploy",
            "--no-containers",
            "--bucket",
            &other.bucket,
            "--key",
            key,
        ])
    };
    let run = from_other(&other_key);
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
    let run = from_other("web/prod/unsigned/web-deployment.tar.gz");
    refused(&run, "has no signature", &host, &r1, "v1");
    from_other(&other_key).ok();
    assert_eq!(host.served_version(), "other");
}

#[test]
fn check_config_says_whether_signatures_are_required() {
    let host = Host::new();
    let source = format!(
        "bucket = \"{}\"\nkey = \"web/prod/x.tar.gz\"\n",
        host.bucket
    );
    host.write_config(&source, "");
    let run = host.run(&["check-config"]);
    run.ok();
    assert!(
        run.stdout.contains("NO [source] public_key IS CONFIGURED"),
        "{}",
        run.stdout
    );
    let a = minisign::KeyPair::generate_unencrypted_keypair()
        .unwrap()
        .pk
        .to_base64();
    let b = minisign::KeyPair::generate_unencrypted_keypair()
        .unwrap()
        .pk
        .to_base64();
    host.write_config(&format!("{source}public_key = [\"{a}\", \"{b}\"]\n"), "");
    let run = host.run(&["check-config"]);
    run.ok();
    assert!(
        run.stdout.contains("required: 2 trusted public keys"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("NO [source] public_key"));
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
    let Some(k) = ci_keys("ci", None) else {
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
