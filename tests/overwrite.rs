//! The race that made fleets run two versions: CI overwriting a key while instances read it.
//! The download is pinned to what `verify` saw, so a deployment gets exactly one artifact's
//! bytes or refuses; it never mixes two.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Host, S3, app, moto, sha256_hex, unique};
use deployd::config::{S3Config, SourceConfig};
use deployd::deploy::fetch::{self, Chunk, FetchError};
use deployd::deploy::source::{Artifact, Origin};
use deployd::s3::S3Object;

fn drain(mut rx: tokio::sync::mpsc::Receiver<Chunk>) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        while let Some(c) = rx.recv().await {
            if let Chunk::Data(b) = c {
                out.extend_from_slice(&b);
            }
        }
        out
    })
}

#[test]
fn download_is_pinned_to_the_verified_object() {
    let s3 = S3::new();
    for versioned in [false, true] {
        let bucket = unique("deployd-pin");
        s3.create_bucket(&bucket, versioned);
        let v1 = app("one").gz();
        let v2 = app("two-which-is-longer").gz();
        s3.put(&bucket, "k.tar.gz", &v1, &[]);
        s3.rt.block_on(async {
            let client = deployd::s3::client(&S3Config {
                endpoint_url: Some(moto().endpoint.clone()),
                ..S3Config::default()
            })
            .await
            .unwrap();
            let artifact = Artifact::new(S3Object::new(&bucket, "k.tar.gz"), Origin::Request);
            let verified =
                deployd::deploy::verify::verify(&client, &artifact, &SourceConfig::default())
                    .await
                    .unwrap();
            assert_eq!(verified.object.version_id.is_some(), versioned);
            // CI overwrites the key after verification.
            s3.client
                .put_object()
                .bucket(&bucket)
                .key("k.tar.gz")
                .body(v2.clone().into())
                .send()
                .await
                .unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let sink = drain(rx);
            let result = fetch::download(
                &client,
                &verified,
                fetch::Timeouts::from_config(&Default::default()),
                tx,
                &mut |_| {},
            )
            .await;
            let bytes = sink.await.unwrap();
            if versioned {
                // versionId pins the old version: exactly v1's bytes.
                let got = result.unwrap();
                assert_eq!(got.sha256, sha256_hex(&v1));
                assert_eq!(bytes, v1);
            } else {
                // If-Match refuses the new object: nothing of v2 was handed on.
                assert!(matches!(result, Err(FetchError::Replaced(_))), "{result:?}");
                assert!(bytes.is_empty());
            }
        });
    }
}

#[test]
fn deployments_under_constant_overwrites_never_mix_two_artifacts() {
    let host = Host::new();
    let filler = |c: u8| vec![c; 6 << 20];
    let a = app("A").file("./payload", 0o644, &filler(b'a')).gz();
    let b = app("B").file("./payload", 0o644, &filler(b'b')).gz();
    let (sha_a, sha_b) = (sha256_hex(&a), sha256_hex(&b));
    host.s3.put(&host.bucket, "web/mutable.tar.gz", &a, &[]);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let bucket = host.bucket.clone();
        let (a, b) = (a.clone(), b.clone());
        std::thread::spawn(move || {
            let s3 = S3::new();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let body = if n.is_multiple_of(2) { &b } else { &a };
                s3.put(&bucket, "web/mutable.tar.gz", body, &[]);
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        })
    };
    let (mut deployed, mut refused) = (0, 0);
    for _ in 0..8 {
        let run = host.deploy("web/mutable.tar.gz", &["--force"]);
        match run.code {
            0 => {
                deployed += 1;
                let m = host.manifest();
                let sha = m["sha256"].as_str().unwrap().to_string();
                let version = host.served_version();
                let payload = std::fs::read(host.current_dir().join("payload")).unwrap();
                let expected = if sha == sha_a {
                    "A"
                } else {
                    assert_eq!(sha, sha_b, "the release is one of the two artifacts");
                    "B"
                };
                assert_eq!(version, expected, "files match the manifest's artifact");
                assert!(
                    payload
                        .iter()
                        .all(|&c| c == expected.to_ascii_lowercase().as_bytes()[0])
                );
            }
            75 => {
                refused += 1;
                assert!(
                    run.error_line().contains("changed after it was verified"),
                    "{}",
                    run.error_line()
                );
            }
            other => panic!("unexpected exit {other}: {}", run.stderr),
        }
        assert_eq!(host.staging_entries(), 0);
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    eprintln!("{deployed} deployed, {refused} refused, {writes} overwrites");
    assert!(writes > 8, "the key was overwritten during the deployments");
    assert_eq!(deployed + refused, 8);
}
