//! Following a release pointer: deploys what `current.json` names, polls it with a
//! conditional GET (304 when idle), and keeps the serving release when the pointer is wrong.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use common::{Host, app, sha256_hex};
use deployd::contract::pointer::{self, Pointer, PointerError, PointerRead};

const COMMIT1: &str = "1111111122223333444455556666777788889999";
const COMMIT2: &str = "2222222233334444555566667777888899990000";

fn pointer_host() -> Host {
    let host = Host::new();
    host.write_config(
        &format!(
            "bucket = \"{}\"\npointer_key = \"web/prod/current.json\"\n",
            host.bucket
        ),
        "",
    );
    host
}

fn read(host: &Host, etag: Option<&str>) -> Result<PointerRead, PointerError> {
    let object = deployd::s3::S3Object::new(&host.bucket, "web/prod/current.json");
    host.s3
        .rt
        .block_on(pointer::read(&host.s3.client, &object, etag))
}

#[test]
fn deploys_what_the_pointer_names_and_idle_polls_get_304() {
    let host = pointer_host();
    let v1 = host.publish_app("v1", COMMIT1, &["--pointer"]);

    let doc = Pointer::parse(&host.s3.get(&host.bucket, "web/prod/current.json")).unwrap();
    assert_eq!(doc.signed, None, "unsigned publish, unsigned pointer");
    assert_eq!(doc.key, v1.key);
    assert_eq!(doc.sha256, v1.sha256);
    assert_eq!(doc.commit, COMMIT1);
    assert!(humantime::parse_rfc3339(&doc.published_at).is_ok());

    let run = host.run(&["deploy", "--no-containers"]);
    run.ok();
    let m = host.manifest();
    assert_eq!(m["key"], v1.key.as_str());
    assert_eq!(m["sha256"], v1.sha256.as_str());
    assert_eq!(m["sha256_verified_against"], "release pointer");
    assert_eq!(m["source"], "[source] bucket/pointer_key");
    let first = host.current().unwrap();
    assert!(first.ends_with("-11111111"), "{first}");

    // The same pointer again: nothing to do.
    let run = host.run(&["deploy", "--no-containers"]);
    run.ok();
    assert!(run.stdout.contains("already serving"), "{}", run.stdout);
    assert_eq!(host.current().unwrap(), first);

    // The poll primitive: the first read returns the pointer and its ETag, the next one with
    // that ETag is a 304.
    let PointerRead::Changed { pointer, etag } = read(&host, None).unwrap() else {
        panic!("first read must return the pointer");
    };
    assert_eq!(pointer.key, v1.key);
    assert!(!etag.is_empty());
    assert_eq!(read(&host, Some(&etag)).unwrap(), PointerRead::Unchanged);
    assert_eq!(read(&host, Some(&etag)).unwrap(), PointerRead::Unchanged);

    // A new publish changes the pointer; the old ETag now yields the new contents.
    let v2 = host.publish_app("v2", COMMIT2, &["--pointer"]);
    match read(&host, Some(&etag)).unwrap() {
        PointerRead::Changed {
            pointer,
            etag: etag2,
        } => {
            assert_eq!(pointer.key, v2.key);
            assert_eq!(pointer.sha256, v2.sha256);
            assert_ne!(etag2, etag);
        }
        PointerRead::Unchanged => panic!("the pointer changed"),
    }
    host.run(&["deploy", "--no-containers"]).ok();
    assert_eq!(host.manifest()["key"], v2.key.as_str());
    assert_eq!(host.served_version(), "v2");
}

#[test]
fn environment_pointer_ranks_with_deployment_key() {
    let host = Host::new();
    let v1 = host.publish_app("v1", COMMIT1, &["--pointer"]);
    host.write_env(&format!(
        "DEPLOYMENT_BUCKET={}\nDEPLOYMENT_POINTER=web/prod/current.json\n",
        host.bucket
    ));
    let run = host.run(&["check-config"]);
    run.ok();
    assert!(
        run.stdout.contains("DEPLOYMENT_BUCKET/DEPLOYMENT_POINTER"),
        "{}",
        run.stdout
    );
    host.run(&["deploy", "--no-containers"]).ok();
    assert_eq!(host.manifest()["key"], v1.key.as_str());
    assert_eq!(host.manifest()["sha256"], v1.sha256.as_str());

    // An explicit request still wins over the pointer.
    let other = app("manual").gz();
    host.upload("web/manual.tar.gz", &other, COMMIT2);
    host.deploy("web/manual.tar.gz", &["--no-containers"]).ok();
    assert_eq!(host.manifest()["key"], "web/manual.tar.gz");

    // A key and a pointer in the same place is ambiguous.
    host.write_env(&format!(
        "DEPLOYMENT_BUCKET={}\nDEPLOYMENT_KEY={}\nDEPLOYMENT_POINTER=web/prod/current.json\n",
        host.bucket, v1.key
    ));
    host.run(&["deploy", "--no-containers"])
        .fails_with(78, "not both");
    host.write_env(&format!(
        "DEPLOYMENT_BUCKET={}\nDEPLOYMENT_POINTER=web/prod/current.json\nDEPLOYMENT_SHA256={}\n",
        host.bucket, v1.sha256
    ));
    host.run(&["deploy", "--no-containers"])
        .fails_with(78, "remove DEPLOYMENT_SHA256");
    host.write_env("DEPLOYMENT_POINTER=web/prod/current.json\n");
    host.run(&["deploy", "--no-containers"])
        .fails_with(78, "DEPLOYMENT_BUCKET is not");
}

/// Deploys v1 through the pointer, then rewrites the pointer by hand.
fn serving_v1() -> (Host, String) {
    let host = pointer_host();
    host.publish_app("v1", COMMIT1, &["--pointer"]);
    host.run(&["deploy", "--no-containers"]).ok();
    let current = host.current().unwrap();
    (host, current)
}

fn set_pointer(host: &Host, key: &str, sha: &str) {
    let doc = Pointer::unsigned(
        key.into(),
        sha.into(),
        COMMIT2.into(),
        "2026-11-05T10:15:00Z".into(),
    );
    host.s3.put(
        &host.bucket,
        "web/prod/current.json",
        doc.to_json().as_bytes(),
        &[],
    );
}

#[track_caller]
fn still_serving(host: &Host, release: &str) {
    host.assert_serving(release, "v1");
    assert_eq!(host.state()["current"]["id"], release);
    assert_eq!(host.state()["last_attempt"]["outcome"], "failed");
}

#[test]
fn pointer_to_a_missing_artifact_keeps_the_serving_release() {
    let (host, release) = serving_v1();
    set_pointer(
        &host,
        "web/prod/gone/web-deployment.tar.gz",
        &"a".repeat(64),
    );
    host.run(&["deploy", "--no-containers"])
        .fails_with(66, "web/prod/gone/web-deployment.tar.gz");
    still_serving(&host, &release);
}

#[test]
fn pointer_with_the_wrong_sha256_keeps_the_serving_release() {
    let (host, release) = serving_v1();
    let body = app("v2").gz();
    let wrong = sha256_hex(b"something else");

    // The artifact's own sha256 metadata disagrees with the pointer: refused before download.
    let with_meta = "web/prod/22222222-20261105-101500/web-deployment.tar.gz";
    host.upload(with_meta, &body, COMMIT2);
    set_pointer(&host, with_meta, &wrong);
    host.run(&["deploy", "--no-containers"])
        .fails_with(65, "release pointer expects SHA-256");
    still_serving(&host, &release);

    // No metadata to compare: the streamed digest catches it, the staged tree is discarded.
    let bare = "web/prod/22222222-20261105-101501/web-deployment.tar.gz";
    host.s3.put(&host.bucket, bare, &body, &[]);
    set_pointer(&host, bare, &wrong);
    host.run(&["deploy", "--no-containers"])
        .fails_with(65, "checksum mismatch");
    still_serving(&host, &release);
}

#[test]
fn malformed_or_missing_pointer_is_an_error_naming_it() {
    let (host, release) = serving_v1();
    host.s3
        .put(&host.bucket, "web/prod/current.json", b"{\"key\": 3}", &[]);
    host.run(&["deploy", "--no-containers"])
        .fails_with(65, "release pointer s3://");
    still_serving(&host, &release);
    assert!(matches!(
        read(&host, None),
        Err(PointerError::Malformed { .. })
    ));

    host.s3.rt.block_on(async {
        host.s3
            .client
            .delete_object()
            .bucket(&host.bucket)
            .key("web/prod/current.json")
            .send()
            .await
            .unwrap();
    });
    host.run(&["deploy", "--no-containers"])
        .fails_with(66, "does not exist");
    still_serving(&host, &release);
}
