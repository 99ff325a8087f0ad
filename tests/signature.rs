//! minisign signatures end to end: `publish --sign` writes `<key>.minisig`; a host with
//! `[source] public_key` deploys signed artifacts and refuses (exit 65, nothing activated)
//! tampered ones, unsigned ones and ones signed by another key. A signed artifact is verified
//! before it is unpacked: bytes nobody signed never reach the decompressor or the tar parser.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::path::PathBuf;

use common::{Host, Tarball, app, noise, sha256_hex};

const COMMIT: &str = "5151515151515151515151515151515151515151";

struct Keys {
    secret: PathBuf,
    public: String,
}

fn keys(host: &Host, name: &str) -> Keys {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let secret = host.dir.path().join(name);
    std::fs::write(&secret, kp.sk.to_box(None).unwrap().to_string()).unwrap();
    Keys {
        secret,
        public: kp.pk.to_base64(),
    }
}

/// A host that requires signatures from `keys`, serving a signed v1.
fn signed_host() -> (Host, Keys, String) {
    let host = Host::new();
    let k = keys(&host, "ci.key");
    host.write_config(&format!("public_key = \"{}\"\n", k.public), "");
    let key = publish(&host, "v1", Some(&k));
    host.deploy(&key, &["--no-containers"]).ok();
    let release = host.current().unwrap();
    (host, k, release)
}

/// Publishes `app(version)`, signed with `k` if given, then waits for the next second: every
/// release here has the same commit, and keys and release ids tell them apart by the second.
fn publish(host: &Host, version: &str, k: Option<&Keys>) -> String {
    let sign = k.map(|k| ["--sign", k.secret.to_str().unwrap()]);
    let key = host
        .publish_app(version, COMMIT, sign.as_ref().map_or(&[], |s| s))
        .key;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    key
}

#[track_caller]
fn nothing_activated(host: &Host, release: &str) {
    host.assert_serving(release, "v1");
    assert_eq!(host.releases().len(), 1, "no second release was installed");
}

#[test]
fn signed_artifact_is_accepted_and_the_minisig_is_standard() {
    let (host, k, release) = signed_host();
    let m = host.manifest();
    let key = m["key"].as_str().unwrap().to_string();
    assert!(release.ends_with("-51515151"));
    let text = String::from_utf8(host.s3.get(&host.bucket, &format!("{key}.minisig"))).unwrap();
    // Any minisign implementation can check it.
    let pk = minisign_verify::PublicKey::from_base64(&k.public).unwrap();
    let sig = minisign_verify::Signature::decode(&text).unwrap();
    assert!(sig.trusted_comment().contains(&format!("key:{key}")));
    assert!(sig.trusted_comment().contains(&format!("commit:{COMMIT}")));
    let body = host.s3.get(&host.bucket, &key);
    pk.verify(&body, &sig, false).unwrap();
    let mut tampered = body.clone();
    tampered[100] ^= 1;
    assert!(pk.verify(&tampered, &sig, false).is_err());

    // A second signed release deploys too.
    let key2 = publish(&host, "v2", Some(&k));
    host.deploy(&key2, &["--no-containers"]).ok();
    assert_eq!(host.served_version(), "v2");
}

#[test]
fn tampered_artifact_is_refused_and_nothing_is_activated() {
    let (host, k, release) = signed_host();
    let key = publish(&host, "v2", Some(&k));
    // Someone with write access replaces the bytes, and even fixes the sha256 metadata.
    let evil = app("evil").gz();
    host.s3.put(
        &host.bucket,
        &key,
        &evil,
        &[("sha256", &sha256_hex(&evil)), ("commit-sha", COMMIT)],
    );
    host.deploy(&key, &["--no-containers"])
        .fails_with(65, "does not match its signature");
    nothing_activated(&host, &release);
    assert_eq!(host.state()["last_attempt"]["exit_code"], 65);
}

#[test]
fn a_tampered_hostile_archive_never_reaches_the_unpacker() {
    let (host, k, release) = signed_host();
    let key = publish(&host, "v2", Some(&k));
    // An archive the unpacker would refuse at its first entry, followed by 32 MiB: had it been
    // unpacked while downloading, the unpacker's refusal would have stopped the download and
    // been the error. With a signature required it is never parsed: the signature fails first.
    let evil = Tarball::new()
        .raw("../evil", tar::EntryType::Regular, "", b"pwned")
        .file("./padding", 0o644, &noise(7, 32 << 20))
        .gz();
    host.s3.put(
        &host.bucket,
        &key,
        &evil,
        &[("sha256", &sha256_hex(&evil)), ("commit-sha", COMMIT)],
    );
    let run = host.deploy(&key, &["--no-containers"]);
    run.fails_with(65, "does not match its signature");
    assert!(
        !run.stderr.contains("refusing archive entry"),
        "the unpacker saw unsigned bytes:\n{}",
        run.stderr
    );
    nothing_activated(&host, &release);
    assert!(!host.dir.path().join("evil").exists());
}

#[test]
fn unsigned_artifact_is_refused() {
    let (host, _k, release) = signed_host();
    let key = publish(&host, "v2", None);
    host.deploy(&key, &["--no-containers"])
        .fails_with(65, "has no signature");
    nothing_activated(&host, &release);
}

#[test]
fn signature_from_another_key_or_garbage_is_refused() {
    let (host, _k, release) = signed_host();
    let other = keys(&host, "other.key");
    let key = publish(&host, "v2", Some(&other));
    host.deploy(&key, &["--no-containers"])
        .fails_with(65, "does not trust");
    nothing_activated(&host, &release);

    host.s3.put(
        &host.bucket,
        &format!("{key}.minisig"),
        b"untrusted comment: nope\nAAAA\n",
        &[],
    );
    host.deploy(&key, &["--no-containers"])
        .fails_with(65, "cannot be used");
    nothing_activated(&host, &release);
}

#[test]
fn a_bad_public_key_is_a_config_error() {
    let host = Host::new();
    host.write_config("public_key = \"RWQnot-a-key\"\n", "");
    host.run(&["check-config"])
        .fails_with(78, "source.public_key");
}
