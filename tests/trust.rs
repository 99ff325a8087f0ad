//! Trust end to end, the attacks: what someone who can write the bucket but holds no signing
//! key can try against a host with `[source] public_key`, and what an operator can still do.
//!
//! Keys are made by the `minisign` command line, unencrypted (`minisign -G -W`) and with a
//! password. Each attack is refused with exit 65 and leaves the serving release untouched:
//! an older signed pointer or key put back (rollback), another environment's or app's signed
//! pointer copied over this one, a forged unsigned pointer, an old artifact and signature
//! copied over a new key, a plain `minisign -S` signature without a release identity, a
//! release signed by a key that is no longer trusted. `deployd rollback`, `deploy
//! --allow-downgrade` and republishing an old build still work; the high-water mark survives a
//! daemon restart and the loss of `state.json`; two keys are trusted during a rotation.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::time::Duration;

use common::daemon::{Daemon, Notify, Options};
use common::keys::{Keys, ci_keys, cli_sign};
use common::signed::{
    C1, C2, C3, POINTER, Serving, deploy, get, pointer_host, publish, put, refused, release,
    serving_v1, trust,
};
use common::{Host, app, write_file};

#[test]
fn rollbacks_need_an_operator_and_republishing_is_the_way_back() {
    let Some(Serving {
        host,
        key: k,
        v1,
        release: r1,
    }) = serving_v1(true, "")
    else {
        return;
    };
    let p1 = get(&host, POINTER);
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
    // Keys are named by commit and publish time to the second; v1 may have been published
    // less than a second ago on a fast run.
    std::thread::sleep(Duration::from_millis(1100));
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
    let Some(k) = ci_keys("ci", None) else {
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
    let Some(Serving {
        host,
        key: k,
        release: r1,
        ..
    }) = serving_v1(true, "")
    else {
        return;
    };
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
    let Some(Serving {
        host,
        key: k,
        v1,
        release: r1,
    }) = serving_v1(false, "")
    else {
        return;
    };
    let v2 = release(&host, &k, "prod", "v2", C2, false);

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
    let Some(Serving {
        host,
        key: k,
        release: r1,
        ..
    }) = serving_v1(false, "")
    else {
        return;
    };

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
    let Some(old) = ci_keys("old", None) else {
        return;
    };
    let new = ci_keys("new", Some("correct horse battery staple")).unwrap();
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
