//! Uploads that never overwrite and are checked once they landed.
//!
//! - [`put_small`]: a small object (signature, pointer) in one `PutObject` with its full
//!   SHA-256 checksum, optionally create-only.
//! - [`put_file`]: one `PutObject` streamed from a file, with the full-object SHA-256 checksum.
//! - [`put_multipart`]: a multipart upload with parts in flight, each carrying its own SHA-256
//!   checksum that S3 checks (SHA-256 multipart checksums are COMPOSITE in S3: full-object
//!   multipart checksums exist only for CRC algorithms).
//! - [`check_landed`]: head-object must report the size, digest and commit that were sent.
//!
//! Create-only writes send `If-None-Match: *`; a server that does not implement conditional
//! writes (501) gets the write again without it, with a warning, and the caller's earlier
//! existence check is what stands.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart,
};
use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::contract::keys;
use crate::error::{error_chain, exit_codes};
use crate::s3::{self, S3Failure, S3Object};

/// S3's limits on multipart uploads.
const MIN_PART_SIZE: u64 = 5 << 20;
const MAX_PARTS: u64 = 10_000;

/// An upload that failed, naming the object.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The key exists; nothing was overwritten.
    #[error(
        "{0} already exists and deployd never overwrites a published artifact; publish again (the key's timestamp will differ)"
    )]
    Exists(S3Object),
    /// An `If-Match` write found another version than the one it was based on.
    #[error("{0} changed while it was being rewritten; nothing was overwritten, run again")]
    Changed(S3Object),
    /// The bucket does not exist.
    #[error("bucket {} does not exist (publishing {}); create it or fix --bucket", .0.bucket, .0.key)]
    NoSuchBucket(S3Object),
    /// 403.
    #[error(
        "access to {0} was denied; CI's credentials need s3:PutObject and s3:GetObject on the prefix, and s3:ListBucket on the bucket (packaging/ci/README.md)"
    )]
    AccessDenied(S3Object),
    /// Anything else S3 answered, or no answer.
    #[error("uploading {object} failed: {reason}")]
    Failed {
        /// The object.
        object: S3Object,
        /// The error chain.
        reason: String,
    },
    /// The local file could not be read.
    #[error("cannot read {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// What head-object reports is not what was sent.
    #[error("{object} did not land as uploaded: {reason}; the pointer was not updated")]
    Landed {
        /// The object.
        object: S3Object,
        /// The difference.
        reason: String,
    },
}

exit_codes!(UploadError {
    Exists(_) | Changed(_) => TEMPFAIL,
    NoSuchBucket(_) | File { .. } => NOINPUT,
    AccessDenied(_) => CONFIG,
    Failed { .. } => UNAVAILABLE,
    Landed { .. } => DATAERR,
});

/// Maps an SDK error on `object` to an upload error.
pub fn classify<E>(e: &SdkError<E, HttpResponse>, object: &S3Object) -> UploadError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match s3::classify(e) {
        S3Failure::PreconditionFailed => UploadError::Exists(object.clone()),
        S3Failure::NoSuchBucket => UploadError::NoSuchBucket(object.clone()),
        S3Failure::Denied => UploadError::AccessDenied(object.clone()),
        other => UploadError::Failed {
            object: object.clone(),
            reason: other.to_string(),
        },
    }
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> UploadError {
    UploadError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Sends a create-only write; if the server does not implement `If-None-Match: *`, sends it
/// again unconditionally (the caller checked beforehand that the key did not exist).
async fn create_only<T, E, F, Fut>(object: &S3Object, send: F) -> Result<T, UploadError>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    F: Fn(bool) -> Fut,
    Fut: Future<Output = Result<Result<T, SdkError<E, HttpResponse>>, UploadError>>,
{
    match send(true).await? {
        Ok(out) => Ok(out),
        Err(e) if s3::classify(&e) == S3Failure::NotImplemented => {
            tracing::warn!(
                object = %object,
                "the server does not implement conditional writes; relying on the earlier existence check"
            );
            send(false).await?.map_err(|e| classify(&e, object))
        }
        Err(e) => Err(classify(&e, object)),
    }
}

/// How a small write treats what is already at the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Refuse an existing key (`If-None-Match: *`).
    Create,
    /// Replace whatever is there.
    Replace,
    /// Replace only the version with this ETag (`If-Match`); anything else is [`UploadError::Changed`].
    IfMatch(String),
}

/// Writes a small object with a full SHA-256 checksum, as `write` says.
pub async fn put_small(
    s3: &Client,
    object: &S3Object,
    body: Vec<u8>,
    content_type: &str,
    write: Write,
) -> Result<(), UploadError> {
    let checksum = aws_smithy_types::base64::encode(Sha256::digest(&body));
    let send = |conditional: bool| {
        let mut req = s3
            .put_object()
            .bucket(&object.bucket)
            .key(&object.key)
            .content_type(content_type)
            .cache_control("no-cache")
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(&checksum)
            .body(ByteStream::from(body.clone()));
        if conditional {
            req = req.if_none_match("*");
        }
        if let Write::IfMatch(etag) = &write {
            req = req.if_match(etag);
        }
        async move { Ok(req.send().await) }
    };
    match &write {
        Write::Create => create_only(object, send).await.map(|_| ()),
        Write::Replace | Write::IfMatch(_) => {
            send(false)
                .await?
                .map(|_| ())
                .map_err(|e| match (s3::classify(&e), &write) {
                    (S3Failure::PreconditionFailed, Write::IfMatch(_)) => {
                        UploadError::Changed(object.clone())
                    }
                    _ => classify(&e, object),
                })
        }
    }
}

/// One create-only `PutObject` streamed from `file`, with the full-object SHA-256 checksum.
pub async fn put_file(
    s3: &Client,
    object: &S3Object,
    file: &Path,
    metadata: HashMap<String, String>,
    digest: &[u8; 32],
) -> Result<(), UploadError> {
    let checksum = aws_smithy_types::base64::encode(digest);
    let send = |conditional: bool| {
        let metadata = metadata.clone();
        let checksum = checksum.clone();
        async move {
            let body = ByteStream::from_path(file)
                .await
                .map_err(|e| file_error(file, e))?;
            let mut put = s3
                .put_object()
                .bucket(&object.bucket)
                .key(&object.key)
                .content_type("application/gzip")
                .set_metadata(Some(metadata))
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .checksum_sha256(checksum)
                .body(body);
            if conditional {
                put = put.if_none_match("*");
            }
            Ok(put.send().await)
        }
    };
    create_only(object, send).await.map(|_| ())
}

/// How a multipart upload is cut.
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    /// The requested part size (raised to S3's minimum, and for files that would need more
    /// than 10,000 parts).
    pub size: u64,
    /// Parts in flight at once.
    pub concurrency: usize,
}

/// A create-only multipart upload of `file` (`size` bytes), each part with its SHA-256
/// checksum. Returns the number of parts. A failed upload is aborted.
pub async fn put_multipart(
    s3: &Client,
    object: &S3Object,
    file: &Path,
    size: u64,
    metadata: HashMap<String, String>,
    parts: Parts,
) -> Result<u64, UploadError> {
    let part_size = parts.size.max(MIN_PART_SIZE).max(size.div_ceil(MAX_PARTS));
    let count = size.div_ceil(part_size);
    let created = s3
        .create_multipart_upload()
        .bucket(&object.bucket)
        .key(&object.key)
        .set_metadata(Some(metadata))
        .checksum_algorithm(ChecksumAlgorithm::Sha256)
        .content_type("application/gzip")
        .send()
        .await
        .map_err(|e| classify(&e, object))?;
    let Some(upload_id) = created.upload_id().map(str::to_string) else {
        return Err(UploadError::Failed {
            object: object.clone(),
            reason: "CreateMultipartUpload returned no upload id".into(),
        });
    };
    let handle = Arc::new(File::open(file).map_err(|e| file_error(file, e))?);
    let result = async {
        let mut done: Vec<CompletedPart> = futures_util::stream::iter(1..=count)
            .map(|n| {
                let handle = Arc::clone(&handle);
                let upload_id = upload_id.as_str();
                async move {
                    let offset = (n - 1) * part_size;
                    let len = part_size.min(size - offset);
                    // Reading and hashing a part is CPU and disk work: keep it off the runtime.
                    let (data, checksum) = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; len as usize];
                        handle.read_exact_at(&mut buf, offset)?;
                        let checksum = aws_smithy_types::base64::encode(Sha256::digest(&buf));
                        Ok::<_, io::Error>((buf, checksum))
                    })
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))
                    .and_then(|r| r)
                    .map_err(|e| file_error(file, format!("reading part {n} at byte {offset}: {e}")))?;
                    let out = s3
                        .upload_part()
                        .bucket(&object.bucket)
                        .key(&object.key)
                        .upload_id(upload_id)
                        .part_number(n as i32)
                        .content_length(len as i64)
                        .checksum_sha256(&checksum)
                        .body(ByteStream::from(data))
                        .send()
                        .await
                        .map_err(|e| classify(&e, object))?;
                    Ok::<_, UploadError>(
                        CompletedPart::builder()
                            .part_number(n as i32)
                            .set_e_tag(out.e_tag().map(str::to_string))
                            .checksum_sha256(out.checksum_sha256().unwrap_or(&checksum))
                            .build(),
                    )
                }
            })
            .buffer_unordered(parts.concurrency)
            .try_collect()
            .await?;
        done.sort_by_key(|p| p.part_number());
        let complete = |conditional: bool| {
            let mut c = s3
                .complete_multipart_upload()
                .bucket(&object.bucket)
                .key(&object.key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(done.clone()))
                        .build(),
                );
            if conditional {
                c = c.if_none_match("*");
            }
            async move {
                match c.send().await {
                    // The server accepted the request but its answer could not be parsed
                    // (moto 5.2 names the XML root `CompleteMultipartUploadResponse`). Whether
                    // the object is complete and right is what `check_landed` establishes next.
                    Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(200) => {
                        tracing::warn!(object = %object, error = %error_chain(&e), "could not parse the answer to CompleteMultipartUpload; checking what landed instead");
                        Ok(Ok(()))
                    }
                    other => Ok(other.map(|_| ())),
                }
            }
        };
        create_only(object, complete).await.map(|()| count)
    }
    .await;
    if result.is_err()
        && let Err(e) = s3
            .abort_multipart_upload()
            .bucket(&object.bucket)
            .key(&object.key)
            .upload_id(&upload_id)
            .send()
            .await
    {
        tracing::warn!(object = %object, upload_id = %upload_id, error = %error_chain(&e), "could not abort the multipart upload; a lifecycle rule for incomplete uploads will remove its parts");
    }
    result
}

/// What was sent, for [`check_landed`].
#[derive(Debug, Clone, Copy)]
pub struct Sent<'a> {
    /// Bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 (the `sha256` metadata).
    pub sha256: &'a str,
    /// The `commit-sha` metadata.
    pub commit: &'a str,
    /// 1 for a single `PutObject`.
    pub parts: u64,
    /// The raw digest, to compare with a full-object checksum.
    pub digest: &'a [u8; 32],
}

/// head-object: what landed has the size, digest and commit that were sent.
pub async fn check_landed(
    s3: &Client,
    object: &S3Object,
    sent: Sent<'_>,
) -> Result<(), UploadError> {
    let head = s3
        .head_object()
        .bucket(&object.bucket)
        .key(&object.key)
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .map_err(|e| classify(&e, object))?;
    let landed = |reason: String| UploadError::Landed {
        object: object.clone(),
        reason,
    };
    let Sent {
        size,
        sha256,
        commit,
        parts,
        digest,
    } = sent;
    let got = head.content_length().unwrap_or(-1);
    if got != size as i64 {
        return Err(landed(format!("it is {got} bytes where {size} were sent")));
    }
    let meta = head.metadata().cloned().unwrap_or_default();
    let get = |k: &str| {
        meta.iter()
            .find(|(mk, _)| mk.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.as_str())
    };
    if get(keys::META_SHA256) != Some(sha256) {
        return Err(landed(format!(
            "its sha256 metadata is {:?}, not {sha256}",
            get(keys::META_SHA256)
        )));
    }
    if !get(keys::META_COMMIT).is_some_and(|c| c.eq_ignore_ascii_case(commit)) {
        return Err(landed(format!(
            "its commit-sha metadata is {:?}, not {commit}",
            get(keys::META_COMMIT)
        )));
    }
    match (head.checksum_sha256(), head.checksum_type()) {
        (Some(b64), Some(ChecksumType::Composite)) | (Some(b64), _) if b64.contains('-') => {
            if parts > 1 && !b64.ends_with(&format!("-{parts}")) {
                return Err(landed(format!(
                    "its composite checksum {b64} does not cover {parts} parts"
                )));
            }
        }
        (Some(b64), _) if parts == 1 => {
            let want = aws_smithy_types::base64::encode(digest);
            if b64 != want {
                return Err(landed(format!("its SHA-256 checksum is {b64}, not {want}")));
            }
        }
        (Some(_), _) => {}
        (None, _) => {
            tracing::warn!(
                object = %object,
                "the server reports no SHA-256 checksum for the object; relying on size and metadata"
            );
        }
    }
    tracing::info!(object = %object, size, sha256, "verified what landed");
    Ok(())
}
