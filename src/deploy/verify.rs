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
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::types::{ChecksumMode, ChecksumType};
use backon::{ExponentialBuilder, Retryable};

use crate::config::SourceConfig;
use crate::deploy::source::{Artifact, is_sha256_hex};
use crate::error::error_chain;
use crate::error::{ExitCode, exit};

/// The head-object facts that the download is pinned to.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Verified {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub version_id: Option<String>,
    /// RFC 3339.
    pub last_modified: Option<String>,
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
            .get("commit-sha")
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "artifact s3://{bucket}/{key} was not found after waiting {waited}; check that CI uploaded it under this exact key ({listing})"
    )]
    NotFound {
        bucket: String,
        key: String,
        waited: String,
        listing: String,
    },
    #[error(
        "bucket {bucket} does not exist (looking for key {key}); check DEPLOYMENT_BUCKET or [source] bucket"
    )]
    NoSuchBucket { bucket: String, key: String },
    #[error(
        "access to s3://{bucket}/{key} was denied; the instance's credentials need s3:GetObject on it (and s3:ListBucket, without which S3 reports a missing key as denied)"
    )]
    AccessDenied { bucket: String, key: String },
    #[error("artifact s3://{bucket}/{key} is empty (0 bytes); republish it")]
    Empty { bucket: String, key: String },
    #[error(
        "artifact s3://{bucket}/{key} is {size} bytes, over [source] max_artifact_size = {max} bytes"
    )]
    TooLarge {
        bucket: String,
        key: String,
        size: u64,
        max: u64,
    },
    #[error(
        "artifact s3://{bucket}/{key} lacks the required metadata {missing:?}; publish it with that metadata or change [source] required_metadata"
    )]
    MissingMetadata {
        bucket: String,
        key: String,
        missing: Vec<String>,
    },
    #[error("artifact s3://{bucket}/{key} has a malformed {what}: {value:?}")]
    BadChecksumField {
        bucket: String,
        key: String,
        what: &'static str,
        value: String,
    },
    #[error(
        "the release pointer expects SHA-256 {expected} for s3://{bucket}/{key} but its sha256 metadata says {metadata}; nothing was downloaded, republish the pointer"
    )]
    PointerMismatch {
        bucket: String,
        key: String,
        expected: String,
        metadata: String,
    },
    #[error("S3 did not answer the head-object check for s3://{bucket}/{key}: {reason}")]
    Unavailable {
        bucket: String,
        key: String,
        reason: String,
    },
}

impl ExitCode for VerifyError {
    fn exit_code(&self) -> i32 {
        match self {
            VerifyError::NotFound { .. } | VerifyError::NoSuchBucket { .. } => exit::NOINPUT,
            VerifyError::AccessDenied { .. } => exit::CONFIG,
            VerifyError::Empty { .. }
            | VerifyError::TooLarge { .. }
            | VerifyError::MissingMetadata { .. }
            | VerifyError::BadChecksumField { .. }
            | VerifyError::PointerMismatch { .. } => exit::DATAERR,
            VerifyError::Unavailable { .. } => exit::UNAVAILABLE,
        }
    }
}

/// One head-object attempt's failure, before the wait loop decides what it means.
enum HeadFailure {
    NotFound,
    Denied,
    Other(String),
}

async fn head(
    s3: &Client,
    bucket: &str,
    key: &str,
) -> Result<aws_sdk_s3::operation::head_object::HeadObjectOutput, HeadFailure> {
    s3.head_object()
        .bucket(bucket)
        .key(key)
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .map_err(|e| {
            let status = e.raw_response().map(|r| r.status().as_u16());
            match (&e, status) {
                (SdkError::ServiceError(s), _) if s.err().is_not_found() => HeadFailure::NotFound,
                (_, Some(404)) => HeadFailure::NotFound,
                (_, Some(403)) => HeadFailure::Denied,
                _ => HeadFailure::Other(error_chain(&e)),
            }
        })
}

/// Runs the head-object checks, waiting up to `wait_for_artifact` for the key to appear.
pub async fn verify(
    s3: &Client,
    artifact: &Artifact,
    cfg: &SourceConfig,
) -> Result<Verified, VerifyError> {
    let (bucket, key) = (artifact.bucket.as_str(), artifact.key.as_str());
    let started = Instant::now();
    let wait = cfg.wait_for_artifact.0;
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times();
    // A missing bucket will not appear because CI is still uploading: fail at once.
    let bucket_missing = std::sync::atomic::AtomicBool::new(false);
    let out = (|| async {
        let result = head(s3, bucket, key).await;
        if matches!(result, Err(HeadFailure::NotFound)) && !bucket_exists(s3, bucket).await {
            bucket_missing.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        result
    })
    .retry(backoff)
    .sleep(tokio::time::sleep)
    .when(|e| {
        matches!(e, HeadFailure::NotFound)
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
            bucket,
            key,
            waited_s = started.elapsed().as_secs(),
            retry_in_ms = delay.as_millis() as u64,
            "artifact not there yet, waiting for the upload"
        );
    })
    .await;
    let out = match out {
        Ok(out) => out,
        Err(HeadFailure::NotFound) if bucket_missing.load(std::sync::atomic::Ordering::Relaxed) => {
            return Err(VerifyError::NoSuchBucket {
                bucket: bucket.into(),
                key: key.into(),
            });
        }
        Err(HeadFailure::NotFound) => {
            return Err(VerifyError::NotFound {
                bucket: bucket.into(),
                key: key.into(),
                waited: humantime::format_duration(Duration::from_secs(
                    started.elapsed().as_secs(),
                ))
                .to_string(),
                listing: newest_keys(s3, bucket, key).await,
            });
        }
        Err(HeadFailure::Denied) => {
            return Err(VerifyError::AccessDenied {
                bucket: bucket.into(),
                key: key.into(),
            });
        }
        Err(HeadFailure::Other(reason)) => {
            return Err(VerifyError::Unavailable {
                bucket: bucket.into(),
                key: key.into(),
                reason,
            });
        }
    };

    let size = out.content_length().unwrap_or(0).max(0) as u64;
    if size == 0 {
        return Err(VerifyError::Empty {
            bucket: bucket.into(),
            key: key.into(),
        });
    }
    if size > cfg.max_artifact_size.0 {
        return Err(VerifyError::TooLarge {
            bucket: bucket.into(),
            key: key.into(),
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
            bucket: bucket.into(),
            key: key.into(),
            missing,
        });
    }
    let bad = |what: &'static str, value: &str| VerifyError::BadChecksumField {
        bucket: bucket.into(),
        key: key.into(),
        what,
        value: value.into(),
    };
    let (expected_sha256, sha256_source) = if let Some(sha) = &artifact.expected_sha256 {
        if artifact.origin.is_pointer() {
            // A pointer that disagrees with the artifact's own metadata is wrong whichever of
            // the two is right: fail before downloading anything.
            if let Some(meta) = metadata.get("sha256")
                && !meta.eq_ignore_ascii_case(sha)
            {
                return Err(VerifyError::PointerMismatch {
                    bucket: bucket.into(),
                    key: key.into(),
                    expected: sha.clone(),
                    metadata: meta.clone(),
                });
            }
            (Some(sha.clone()), Some("release pointer".to_string()))
        } else {
            (Some(sha.clone()), Some("DEPLOYMENT_SHA256".to_string()))
        }
    } else if let Some(sha) = metadata.get("sha256") {
        if !is_sha256_hex(sha) {
            return Err(bad("sha256 metadata", sha));
        }
        (
            Some(sha.to_ascii_lowercase()),
            Some("sha256 metadata".to_string()),
        )
    } else if let Some(b64) = out.checksum_sha256()
        && !matches!(out.checksum_type(), Some(ChecksumType::Composite))
        && !b64.contains('-')
    {
        let raw =
            aws_smithy_types::base64::decode(b64).map_err(|_| bad("SHA-256 checksum", b64))?;
        if raw.len() != 32 {
            return Err(bad("SHA-256 checksum", b64));
        }
        (
            Some(hex::encode(raw)),
            Some("S3 SHA-256 checksum".to_string()),
        )
    } else {
        (None, None)
    };

    let verified = Verified {
        bucket: bucket.into(),
        key: key.into(),
        size,
        etag: out.e_tag().unwrap_or_default().to_string(),
        version_id: out
            .version_id()
            .filter(|v| !v.is_empty() && *v != "null")
            .map(str::to_string),
        last_modified: out
            .last_modified()
            .and_then(|d| d.fmt(aws_smithy_types::date_time::Format::DateTime).ok()),
        metadata,
        expected_sha256,
        sha256_source,
    };
    tracing::info!(
        bucket,
        key,
        size = verified.size,
        etag = %verified.etag,
        version_id = verified.version_id.as_deref().unwrap_or("-"),
        last_modified = verified.last_modified.as_deref().unwrap_or("-"),
        commit = verified.commit().unwrap_or("-"),
        branch = verified.metadata.get("branch").map_or("-", String::as_str),
        build_time = verified.metadata.get("build-time").map_or("-", String::as_str),
        workflow_run_id = verified.metadata.get("workflow-run-id").map_or("-", String::as_str),
        pr_number = verified.metadata.get("pr-number").map_or("-", String::as_str),
        sha256 = verified.expected_sha256.as_deref().unwrap_or("-"),
        sha256_source = verified.sha256_source.as_deref().unwrap_or("none"),
        "verified artifact"
    );
    if verified.expected_sha256.is_none() {
        tracing::warn!(
            bucket,
            key,
            "artifact carries no SHA-256 (no DEPLOYMENT_SHA256, sha256 metadata or full-object checksum); only the ETag pins it"
        );
    }
    Ok(verified)
}

/// False only when S3 says the bucket does not exist (any other answer counts as existing).
async fn bucket_exists(s3: &Client, bucket: &str) -> bool {
    match s3.head_bucket().bucket(bucket).send().await {
        Ok(_) => true,
        Err(e) => e.raw_response().map(|r| r.status().as_u16()) != Some(404),
    }
}

/// Lists up to 10 newest keys near `key`: under its directory, or the nearest parent prefix
/// that holds anything. Never fails: the listing only decorates an error.
async fn newest_keys(s3: &Client, bucket: &str, key: &str) -> String {
    let mut prefix = key.rsplit_once('/').map_or("", |(p, _)| p).to_string();
    loop {
        let listed = s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            })
            .max_keys(1000)
            .send()
            .await;
        let page = match listed {
            Ok(page) => page,
            Err(e) => {
                let code = e.as_service_error().and_then(|s| {
                    aws_sdk_s3::error::ProvideErrorMetadata::code(s).map(str::to_string)
                });
                return match code.as_deref() {
                    Some("NoSuchBucket") => format!("bucket {bucket} does not exist"),
                    _ => format!("the bucket could not be listed: {}", error_chain(&e)),
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
                "newest keys under s3://{bucket}/{}: {}",
                if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                },
                shown.join(", ")
            );
        }
        if prefix.is_empty() {
            return format!("bucket {bucket} is empty");
        }
        prefix = prefix.rsplit_once('/').map_or("", |(p, _)| p).to_string();
    }
}
