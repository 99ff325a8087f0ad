//! Verify: head-object checks before a single byte is downloaded.
//!
//! - **Exists.** A 404 is retried with exponential backoff (with jitter) for up to
//!   `[source] wait_for_artifact`, because an instance may boot before CI finished uploading.
//!   When it never appears the error (exit 66) lists the newest keys under the same prefix, so
//!   the operator sees at once whether the key is misspelled or the upload is late.
//! - **Size** is non-zero and at most `max_artifact_size`.
//! - **Metadata** named in `required_metadata` is present.
//! - **Pin.** The ETag and version id are recorded so that `fetch` downloads exactly these
//!   bytes (`If-Match`, `versionId`), whatever CI does to the key meanwhile.
//! - **Expected SHA-256**, in order: `DEPLOYMENT_SHA256` or the release pointer's `sha256`
//!   (a pointer that disagrees with the artifact's `sha256` metadata fails here, before any
//!   download), the `sha256` user metadata, the S3 full-object SHA-256 checksum. Multipart
//!   uploads have composite checksums that are not the file's digest; those are not used.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::types::{ChecksumMode, ChecksumType};
use backon::{ExponentialBuilder, Retryable};

use crate::config::SourceConfig;
use crate::contract::keys::{self, is_sha256_hex};
use crate::deploy::source::Artifact;
use crate::error::exit_codes;
use crate::s3::{self, S3Failure, S3Object};

/// The head-object facts that the download is pinned to.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Verified {
    /// The artifact, pinned to the ETag and version id head-object reported.
    pub object: S3Object,
    /// Size in bytes.
    pub size: u64,
    /// RFC 3339.
    pub last_modified: Option<String>,
    /// S3 user metadata, keys lower-cased.
    pub metadata: BTreeMap<String, String>,
    /// Lower-case hex.
    pub expected_sha256: Option<String>,
    /// Where `expected_sha256` came from.
    pub sha256_source: Option<String>,
}

impl Verified {
    /// The commit the artifact was built from, from its `commit-sha` metadata.
    pub fn commit(&self) -> Option<&str> {
        self.metadata
            .get(keys::META_COMMIT)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// A head-object check failed; nothing was downloaded.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The key never appeared within `wait_for_artifact`.
    #[error(
        "artifact {object} was not found after waiting {waited}; check that CI uploaded it under this exact key ({listing})"
    )]
    NotFound {
        /// The S3 object concerned.
        object: S3Object,
        /// How long deployd waited.
        waited: String,
        /// What the bucket holds near the key.
        listing: String,
    },
    /// The bucket does not exist.
    #[error(
        "bucket {} does not exist (looking for key {}); check DEPLOYMENT_BUCKET or [source] bucket", .0.bucket, .0.key
    )]
    NoSuchBucket(S3Object),
    /// 403 on head-object.
    #[error(
        "access to {object} was denied; the instance's credentials need s3:GetObject on it (and s3:ListBucket, without which S3 reports a missing key as denied)"
    )]
    AccessDenied {
        /// The S3 object concerned.
        object: S3Object,
    },
    /// The object is 0 bytes.
    #[error("artifact {object} is empty (0 bytes); republish it")]
    Empty {
        /// The S3 object concerned.
        object: S3Object,
    },
    /// The object is over `max_artifact_size`.
    #[error("artifact {object} is {size} bytes, over [source] max_artifact_size = {max} bytes")]
    TooLarge {
        /// The S3 object concerned.
        object: S3Object,
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        max: u64,
    },
    /// Metadata named in `required_metadata` is absent.
    #[error(
        "artifact {object} lacks the required metadata {missing:?}; publish it with that metadata or change [source] required_metadata"
    )]
    MissingMetadata {
        /// The S3 object concerned.
        object: S3Object,
        /// The names that are missing.
        missing: Vec<String>,
    },
    /// A digest field that is not a SHA-256.
    #[error("artifact {object} has a malformed {what}: {value:?}")]
    BadChecksumField {
        /// The S3 object concerned.
        object: S3Object,
        /// Which field.
        what: &'static str,
        /// The value found.
        value: String,
    },
    /// The pointer and the artifact metadata disagree on the digest.
    #[error(
        "the release pointer expects SHA-256 {expected} for {object} but its sha256 metadata says {metadata}; nothing was downloaded, republish the pointer"
    )]
    PointerMismatch {
        /// The S3 object concerned.
        object: S3Object,
        /// What was expected.
        expected: String,
        /// What the metadata says.
        metadata: String,
    },
    /// S3 did not answer.
    #[error("S3 did not answer the head-object check for {object}: {reason}")]
    Unavailable {
        /// The S3 object concerned.
        object: S3Object,
        /// Why, as one clause.
        reason: String,
    },
}

exit_codes!(VerifyError {
    NotFound { .. } | NoSuchBucket(_) => NOINPUT,
    AccessDenied { .. } => CONFIG,
    Empty { .. }
    | TooLarge { .. }
    | MissingMetadata { .. }
    | BadChecksumField { .. }
    | PointerMismatch { .. } => DATAERR,
    Unavailable { .. } => UNAVAILABLE,
});

async fn head(
    s3: &Client,
    object: &S3Object,
) -> Result<aws_sdk_s3::operation::head_object::HeadObjectOutput, S3Failure> {
    s3.head_object()
        .bucket(&object.bucket)
        .key(&object.key)
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .map_err(|e| s3::classify(&e))
}

/// Runs the head-object checks, waiting up to `wait_for_artifact` for the key to appear.
pub async fn verify(
    s3: &Client,
    artifact: &Artifact,
    cfg: &SourceConfig,
) -> Result<Verified, VerifyError> {
    let object = &artifact.object;
    let out = wait_for(s3, object, cfg.wait_for_artifact.0).await?;
    let size = out.content_length().unwrap_or(0).max(0) as u64;
    if size == 0 {
        return Err(VerifyError::Empty {
            object: object.clone(),
        });
    }
    if size > cfg.max_artifact_size.0 {
        return Err(VerifyError::TooLarge {
            object: object.clone(),
            size,
            max: cfg.max_artifact_size.0,
        });
    }
    let metadata: BTreeMap<String, String> = out
        .metadata()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    let missing: Vec<String> = cfg
        .required_metadata
        .iter()
        .filter(|k| {
            metadata
                .get(&k.to_ascii_lowercase())
                .is_none_or(|v| v.is_empty())
        })
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(VerifyError::MissingMetadata {
            object: object.clone(),
            missing,
        });
    }
    let (expected_sha256, sha256_source) = expected_digest(artifact, &metadata, &out)?;
    let verified = Verified {
        object: object.pinned(out.e_tag(), out.version_id()),
        size,
        last_modified: out
            .last_modified()
            .and_then(|d| d.fmt(aws_smithy_types::date_time::Format::DateTime).ok()),
        metadata,
        expected_sha256,
        sha256_source,
    };
    let meta = |name: &str| verified.metadata.get(name).map_or("-", String::as_str);
    tracing::info!(
        bucket = %object.bucket,
        key = %object.key,
        size = verified.size,
        etag = verified.object.etag(),
        version_id = verified.object.version_id.as_deref().unwrap_or("-"),
        last_modified = verified.last_modified.as_deref().unwrap_or("-"),
        commit = verified.commit().unwrap_or("-"),
        branch = meta(keys::META_BRANCH),
        build_time = meta(keys::META_BUILD_TIME),
        workflow_run_id = meta(keys::META_RUN_ID),
        pr_number = meta(keys::META_PR),
        sha256 = verified.expected_sha256.as_deref().unwrap_or("-"),
        sha256_source = verified.sha256_source.as_deref().unwrap_or("none"),
        "verified artifact"
    );
    if verified.expected_sha256.is_none() {
        tracing::warn!(
            bucket = %object.bucket,
            key = %object.key,
            "artifact carries no SHA-256 (no DEPLOYMENT_SHA256, sha256 metadata or full-object checksum); only the ETag pins it"
        );
    }
    Ok(verified)
}

/// head-object, retrying a 404 with backoff until `wait` has passed (but not for a bucket
/// that does not exist: it will not appear because CI is still uploading).
async fn wait_for(
    s3: &Client,
    object: &S3Object,
    wait: Duration,
) -> Result<aws_sdk_s3::operation::head_object::HeadObjectOutput, VerifyError> {
    let started = Instant::now();
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times();
    let bucket_missing = std::sync::atomic::AtomicBool::new(false);
    let out = (|| async {
        let result = head(s3, object).await;
        if matches!(result, Err(S3Failure::NotFound)) && !bucket_exists(s3, &object.bucket).await {
            bucket_missing.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        result
    })
    .retry(backoff)
    .sleep(tokio::time::sleep)
    .when(|e| {
        matches!(e, S3Failure::NotFound)
            && started.elapsed() < wait
            && !bucket_missing.load(std::sync::atomic::Ordering::Relaxed)
    })
    // Wait the whole `wait_for_artifact`: the last sleep is cut to what remains of it, rather
    // than giving up early because a full backoff step would overshoot.
    .adjust(|_, delay| {
        let remaining = wait.saturating_sub(started.elapsed());
        (!remaining.is_zero()).then(|| delay.unwrap_or(remaining).min(remaining))
    })
    .notify(|_, delay| {
        tracing::info!(
            bucket = %object.bucket,
            key = %object.key,
            waited_s = started.elapsed().as_secs(),
            retry_in_ms = delay.as_millis() as u64,
            "artifact not there yet, waiting for the upload"
        );
    })
    .await;
    let object = object.clone();
    match out {
        Ok(out) => Ok(out),
        Err(S3Failure::NotFound) if bucket_missing.load(std::sync::atomic::Ordering::Relaxed) => {
            Err(VerifyError::NoSuchBucket(object))
        }
        Err(S3Failure::NoSuchBucket) => Err(VerifyError::NoSuchBucket(object)),
        Err(S3Failure::NotFound) => Err(VerifyError::NotFound {
            waited: humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()))
                .to_string(),
            listing: newest_keys(s3, &object).await,
            object,
        }),
        Err(S3Failure::Denied) => Err(VerifyError::AccessDenied { object }),
        Err(other) => Err(VerifyError::Unavailable {
            object,
            reason: other.to_string(),
        }),
    }
}

/// The SHA-256 the downloaded bytes must have, and where that expectation came from:
/// `DEPLOYMENT_SHA256` or the release pointer's `sha256` (a pointer that disagrees with the
/// artifact's own metadata fails here), the `sha256` user metadata, the full-object checksum.
fn expected_digest(
    artifact: &Artifact,
    metadata: &BTreeMap<String, String>,
    out: &aws_sdk_s3::operation::head_object::HeadObjectOutput,
) -> Result<(Option<String>, Option<String>), VerifyError> {
    let object = &artifact.object;
    let bad = |what: &'static str, value: &str| VerifyError::BadChecksumField {
        object: object.clone(),
        what,
        value: value.into(),
    };
    if let Some(sha) = &artifact.expected_sha256 {
        if !artifact.origin.is_pointer() {
            return Ok((Some(sha.clone()), Some("DEPLOYMENT_SHA256".to_string())));
        }
        // A pointer that disagrees with the artifact's own metadata is wrong whichever of the
        // two is right: fail before downloading anything.
        if let Some(meta) = metadata.get(keys::META_SHA256)
            && !meta.eq_ignore_ascii_case(sha)
        {
            return Err(VerifyError::PointerMismatch {
                object: object.clone(),
                expected: sha.clone(),
                metadata: meta.clone(),
            });
        }
        return Ok((Some(sha.clone()), Some("release pointer".to_string())));
    }
    if let Some(sha) = metadata.get(keys::META_SHA256) {
        if !is_sha256_hex(sha) {
            return Err(bad("sha256 metadata", sha));
        }
        return Ok((
            Some(sha.to_ascii_lowercase()),
            Some("sha256 metadata".to_string()),
        ));
    }
    if let Some(b64) = out.checksum_sha256()
        && !matches!(out.checksum_type(), Some(ChecksumType::Composite))
        && !b64.contains('-')
    {
        let raw =
            aws_smithy_types::base64::decode(b64).map_err(|_| bad("SHA-256 checksum", b64))?;
        if raw.len() != 32 {
            return Err(bad("SHA-256 checksum", b64));
        }
        return Ok((
            Some(hex::encode(raw)),
            Some("S3 SHA-256 checksum".to_string()),
        ));
    }
    Ok((None, None))
}

/// False only when S3 says the bucket does not exist (any other answer counts as existing).
async fn bucket_exists(s3: &Client, bucket: &str) -> bool {
    match s3.head_bucket().bucket(bucket).send().await {
        Ok(_) => true,
        Err(e) => !matches!(
            s3::classify(&e),
            S3Failure::NotFound | S3Failure::NoSuchBucket
        ),
    }
}

/// Lists up to 10 newest keys near `object`: under its directory, or the nearest parent
/// prefix that holds anything. Never fails: the listing only decorates an error.
async fn newest_keys(s3: &Client, object: &S3Object) -> String {
    let bucket = &object.bucket;
    let mut prefix = object
        .key
        .rsplit_once('/')
        .map_or("", |(p, _)| p)
        .to_string();
    loop {
        let under = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        let listed = s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(&under)
            .max_keys(1000)
            .send()
            .await;
        let page = match listed {
            Ok(page) => page,
            Err(e) => {
                return match s3::classify(&e) {
                    S3Failure::NoSuchBucket => format!("bucket {bucket} does not exist"),
                    other => format!("the bucket could not be listed: {other}"),
                };
            }
        };
        let mut objects: Vec<(String, i64)> = page
            .contents()
            .iter()
            .filter_map(|o| {
                Some((
                    o.key()?.to_string(),
                    o.last_modified().map_or(0, |d| d.secs()),
                ))
            })
            .collect();
        if !objects.is_empty() {
            objects.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
            let shown: Vec<&str> = objects.iter().take(10).map(|(k, _)| k.as_str()).collect();
            return format!(
                "newest keys under s3://{bucket}/{under}: {}",
                shown.join(", ")
            );
        }
        if prefix.is_empty() {
            return format!("bucket {bucket} is empty");
        }
        prefix = prefix.rsplit_once('/').map_or("", |(p, _)| p).to_string();
    }
}
