//! `deployd publish`: the CI side of the contract the agent reads.
//!
//! One command turns a built tarball into an immutable, verifiable release in S3:
//!
//! 1. **Key.** `{app}/{environment}/{commit8}-{YYYYmmdd-HHMMSS}/{app}-deployment.tar.gz`
//!    (UTC), so every build has its own key and a key never changes once written.
//! 2. **Digest.** The file's SHA-256 is computed in one streaming pass (which also feeds the
//!    minisign signer with `--sign`), before anything is uploaded, because S3 metadata is
//!    fixed when an upload starts.
//! 3. **Signature first.** With `--sign`, `<key>.minisig` is written before the artifact, so
//!    an agent that requires signatures never sees the artifact without one.
//! 4. **Upload, never overwrite.** Up to `--multipart-threshold` (64 MiB) one `PutObject`
//!    carrying the full-object `x-amz-checksum-sha256`; above it a multipart upload with
//!    `--concurrency` parts in flight, each part carrying its own SHA-256 checksum (S3 checks
//!    every part; SHA-256 multipart checksums are COMPOSITE in S3, full-object multipart
//!    checksums exist only for CRC algorithms). Either way the `sha256` user metadata holds
//!    the whole file's digest, which is what the agent verifies every downloaded byte
//!    against. Both writes are conditional (`If-None-Match: *` on `PutObject` and on
//!    `CompleteMultipartUpload`), after a head-object check that gives a clear error before
//!    a large upload starts; a server that does not implement conditional writes falls back
//!    to that check alone, with a warning.
//! 5. **Check what landed.** head-object must report the same size, `sha256` and
//!    `commit-sha` metadata, and (single PUT) the same full-object SHA-256 checksum.
//! 6. **Pointer last.** With `--pointer`, `{app}/{environment}/current.json` is rewritten only
//!    after all of the above succeeded, so it never names an artifact that is not complete.
//!
//! Metadata: `commit-sha`, `branch`, `build-time` (RFC 3339), `workflow-run-id`, `pr-number`,
//! `sha256`. Commit, branch and run id default from GitHub Actions' `GITHUB_SHA`,
//! `GITHUB_HEAD_REF` (pull requests) or `GITHUB_REF_NAME`, and `GITHUB_RUN_ID`; the PR number
//! from `GITHUB_REF` (`refs/pull/N/merge`).
//!
//! A `CompleteMultipartUpload` answered `200 OK` with a body the SDK cannot parse (moto 5.2
//! names the XML root `CompleteMultipartUploadResponse`) is taken as "outcome unknown" and
//! settled by step 5, which is the real test either way.
//!
//! Measured against moto on loopback, see `packaging/ci/README.md` for the figures.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart,
};
use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::contract::pointer::{self, Pointer};
use crate::contract::signature::{self, SignError, SigningKey};
use crate::error::error_chain;
use crate::error::{ExitCode, exit};

/// Files up to this size go up in one `PutObject`.
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 64 << 20;
/// Multipart part size (grown for files that would need more than 10,000 parts).
pub const DEFAULT_PART_SIZE: u64 = 16 << 20;
/// Parts in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// S3's limits on multipart uploads.
const MIN_PART_SIZE: u64 = 5 << 20;
const MAX_PARTS: u64 = 10_000;

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub file: PathBuf,
    pub bucket: String,
    pub app: String,
    pub environment: String,
    /// Full commit id; the key uses its first 8 characters.
    pub commit: String,
    pub branch: Option<String>,
    pub run_id: Option<String>,
    pub pr_number: Option<String>,
    /// A minisign secret key file.
    pub sign: Option<PathBuf>,
    /// The password of an encrypted secret key.
    pub sign_password: Option<String>,
    /// Rewrite `{app}/{environment}/current.json` once the artifact is in place.
    pub pointer: bool,
    pub multipart_threshold: u64,
    pub part_size: u64,
    pub concurrency: usize,
    /// The build time that names the key.
    pub now: SystemTime,
}

/// The values `publish` fills from the CI environment when the command line leaves them out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CiDefaults {
    pub commit: Option<String>,
    pub branch: Option<String>,
    pub run_id: Option<String>,
    pub pr_number: Option<String>,
}

impl CiDefaults {
    /// Reads GitHub Actions' variables through `get` (the process environment in `deployd`).
    pub fn github(get: impl Fn(&str) -> Option<String>) -> CiDefaults {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        CiDefaults {
            commit: get("GITHUB_SHA"),
            // On pull requests GITHUB_REF_NAME is "51/merge"; the branch is GITHUB_HEAD_REF.
            branch: get("GITHUB_HEAD_REF").or_else(|| get("GITHUB_REF_NAME")),
            run_id: get("GITHUB_RUN_ID"),
            pr_number: get("GITHUB_REF").and_then(|r| {
                let n = r.strip_prefix("refs/pull/")?.split('/').next()?.to_string();
                (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(n)
            }),
        }
    }
}

/// A successful publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub bucket: String,
    pub key: String,
    /// Lower-case hex.
    pub sha256: String,
    pub size: u64,
    /// 1 for a single `PutObject`.
    pub parts: u64,
    pub signature_key: Option<String>,
    pub pointer_key: Option<String>,
}

impl Published {
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}: {reason}")]
    File { path: String, reason: String },
    #[error("{path} is empty; build the artifact before publishing it")]
    EmptyFile { path: String },
    #[error(
        "{path} changed size while it was being read ({expected} then {got} bytes); publish a finished file"
    )]
    FileChanged {
        path: String,
        expected: u64,
        got: u64,
    },
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error(
        "s3://{bucket}/{key} already exists and deployd never overwrites a published artifact; publish again (the key's timestamp will differ)"
    )]
    Exists { bucket: String, key: String },
    #[error("bucket {bucket} does not exist (publishing {key}); create it or fix --bucket")]
    NoSuchBucket { bucket: String, key: String },
    #[error(
        "access to s3://{bucket}/{key} was denied; CI's credentials need s3:PutObject and s3:GetObject on the prefix, and s3:ListBucket on the bucket (packaging/ci/README.md)"
    )]
    AccessDenied { bucket: String, key: String },
    #[error("uploading s3://{bucket}/{key} failed: {reason}")]
    Upload {
        bucket: String,
        key: String,
        reason: String,
    },
    #[error("s3://{bucket}/{key} did not land as uploaded: {reason}; the pointer was not updated")]
    Landed {
        bucket: String,
        key: String,
        reason: String,
    },
}

impl ExitCode for PublishError {
    fn exit_code(&self) -> i32 {
        match self {
            PublishError::Usage(_) => exit::USAGE,
            PublishError::File { .. } => exit::NOINPUT,
            PublishError::EmptyFile { .. } | PublishError::FileChanged { .. } => exit::DATAERR,
            PublishError::Sign(e) => e.exit_code(),
            PublishError::Exists { .. } => exit::TEMPFAIL,
            PublishError::NoSuchBucket { .. } => exit::NOINPUT,
            PublishError::AccessDenied { .. } => exit::CONFIG,
            PublishError::Upload { .. } => exit::UNAVAILABLE,
            PublishError::Landed { .. } => exit::DATAERR,
        }
    }
}

/// True for a name usable as one key segment: letters, digits, `-`, `_`, `.`.
fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `YYYYmmdd-HHMMSS` in UTC.
pub fn key_timestamp(t: SystemTime) -> String {
    // "2026-11-05T10:15:00Z"
    let rfc = humantime::format_rfc3339_seconds(t).to_string();
    let digits: String = rfc.chars().filter(char::is_ascii_digit).collect();
    format!("{}-{}", &digits[..8], &digits[8..14])
}

/// `{app}/{environment}/{commit8}-{YYYYmmdd-HHMMSS}/{app}-deployment.tar.gz`.
pub fn artifact_key(app: &str, environment: &str, commit: &str, t: SystemTime) -> String {
    let short = commit.get(..8).unwrap_or(commit).to_ascii_lowercase();
    format!(
        "{app}/{environment}/{short}-{}/{app}-deployment.tar.gz",
        key_timestamp(t)
    )
}

/// True for a release directory name `publish` writes: `{8 hex}-{8 digits}-{6 digits}`.
pub fn is_release_dir(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 24
        && b[..8].iter().all(u8::is_ascii_hexdigit)
        && b[8] == b'-'
        && b[9..17].iter().all(u8::is_ascii_digit)
        && b[17] == b'-'
        && b[18..].iter().all(u8::is_ascii_digit)
}

impl PublishRequest {
    fn check(&self) -> Result<(), PublishError> {
        if self.bucket.is_empty() {
            return Err(PublishError::Usage("--bucket must not be empty".into()));
        }
        for (flag, v) in [("--app", &self.app), ("--environment", &self.environment)] {
            if !is_segment(v) {
                return Err(PublishError::Usage(format!(
                    "{flag} {v:?} must be a name of letters, digits, '-', '_' or '.'"
                )));
            }
        }
        if self.commit.len() < 8 || !self.commit.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PublishError::Usage(format!(
                "commit {:?} is not a git commit id (at least 8 hex characters); pass --commit or set GITHUB_SHA",
                self.commit
            )));
        }
        if self.concurrency == 0 {
            return Err(PublishError::Usage(
                "--concurrency must be at least 1".into(),
            ));
        }
        Ok(())
    }

    fn metadata(&self, sha256: &str) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("commit-sha".into(), self.commit.to_ascii_lowercase());
        m.insert(
            "build-time".into(),
            humantime::format_rfc3339_seconds(self.now).to_string(),
        );
        m.insert("sha256".into(), sha256.into());
        for (k, v) in [
            ("branch", &self.branch),
            ("workflow-run-id", &self.run_id),
            ("pr-number", &self.pr_number),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                m.insert(k.into(), v.into());
            }
        }
        m
    }
}

/// Maps an SDK error on `key` to a publish error.
fn classify<E>(e: &SdkError<E, HttpResponse>, bucket: &str, key: &str) -> PublishError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = status_of(e);
    let code = e.as_service_error().and_then(|s| s.code());
    match (status, code) {
        (Some(412), _) | (_, Some("PreconditionFailed")) => PublishError::Exists {
            bucket: bucket.into(),
            key: key.into(),
        },
        (_, Some("NoSuchBucket")) => PublishError::NoSuchBucket {
            bucket: bucket.into(),
            key: key.into(),
        },
        (Some(403), _) => PublishError::AccessDenied {
            bucket: bucket.into(),
            key: key.into(),
        },
        _ => PublishError::Upload {
            bucket: bucket.into(),
            key: key.into(),
            reason: error_chain(e),
        },
    }
}

fn status_of<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// True when the server rejected a conditional header it does not implement.
fn is_not_implemented<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> bool {
    status_of(e) == Some(501)
        || e.as_service_error().and_then(|s| s.code()) == Some("NotImplemented")
}

/// Reads `path` once: its SHA-256 and, with a key, its minisign signature.
fn digest_and_sign(
    path: &Path,
    size: u64,
    signer: Option<(&SigningKey, &str)>,
) -> Result<(String, [u8; 32], Option<String>), PublishError> {
    struct Tee<R> {
        inner: R,
        hasher: Sha256,
        read: u64,
    }
    impl<R: Read> Read for Tee<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.hasher.update(&buf[..n]);
            self.read += n as u64;
            Ok(n)
        }
    }
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| PublishError::File {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let mut tee = Tee {
        inner: io::BufReader::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        read: 0,
    };
    let minisig = match signer {
        Some((key, trusted)) => Some(key.sign(&mut tee, trusted, &shown)?),
        None => {
            io::copy(&mut tee, &mut io::sink()).map_err(|e| PublishError::File {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
            None
        }
    };
    if tee.read != size {
        return Err(PublishError::FileChanged {
            path: shown,
            expected: size,
            got: tee.read,
        });
    }
    let raw: [u8; 32] = tee.hasher.finalize().into();
    Ok((hex::encode(raw), raw, minisig))
}

/// Publishes one artifact; see the module documentation for the steps.
pub async fn publish(s3: &Client, req: &PublishRequest) -> Result<Published, PublishError> {
    req.check()?;
    let shown = req.file.display().to_string();
    let meta = std::fs::metadata(&req.file).map_err(|e| PublishError::File {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(PublishError::File {
            path: shown,
            reason: "it is not a regular file".into(),
        });
    }
    let size = meta.len();
    if size == 0 {
        return Err(PublishError::EmptyFile { path: shown });
    }
    let signer = match &req.sign {
        Some(path) => Some(SigningKey::load(path, req.sign_password.clone())?),
        None => None,
    };
    let bucket = req.bucket.as_str();
    let key = artifact_key(&req.app, &req.environment, &req.commit, req.now);

    // A clear answer before hashing and uploading a large file; the conditional write below
    // closes the race this check leaves open.
    match s3.head_object().bucket(bucket).key(&key).send().await {
        Ok(_) => {
            return Err(PublishError::Exists {
                bucket: bucket.into(),
                key,
            });
        }
        Err(e) if status_of(&e) == Some(404) => {}
        Err(e) => return Err(classify(&e, bucket, &key)),
    }

    let clock = Instant::now();
    let trusted = format!(
        "timestamp:{}\tfile:{}-deployment.tar.gz\tcommit:{}\tkey:{key}",
        req.now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        req.app,
        req.commit.to_ascii_lowercase(),
    );
    let path = req.file.clone();
    let (sha256, digest, minisig) = tokio::task::spawn_blocking(move || {
        digest_and_sign(&path, size, signer.as_ref().map(|k| (k, trusted.as_str())))
    })
    .await
    .map_err(|e| PublishError::Upload {
        bucket: bucket.into(),
        key: key.clone(),
        reason: format!("hashing stopped: {e}"),
    })??;
    tracing::info!(file = %shown, size, sha256 = %sha256, seconds = clock.elapsed().as_secs_f64(), "hashed the artifact");

    let signature_key = match minisig {
        Some(text) => {
            let sig_key = signature::signature_key(&key);
            put_small(s3, bucket, &sig_key, text.into_bytes(), "text/plain", true).await?;
            tracing::info!(key = %sig_key, "uploaded the signature");
            Some(sig_key)
        }
        None => None,
    };

    let metadata = req.metadata(&sha256);
    let clock = Instant::now();
    let parts = if size <= req.multipart_threshold {
        put_whole(s3, req, &key, metadata, &digest).await?;
        1
    } else {
        put_multipart(s3, req, &key, size, metadata).await?
    };
    let seconds = clock.elapsed().as_secs_f64();
    tracing::info!(
        bucket,
        key = %key,
        size,
        parts,
        seconds,
        mib_per_s = size as f64 / (1 << 20) as f64 / seconds.max(1e-9),
        "uploaded the artifact"
    );

    check_landed(s3, bucket, &key, size, &sha256, &req.commit, parts, &digest).await?;

    let pointer_key = if req.pointer {
        let pkey = pointer::pointer_key(&req.app, &req.environment);
        let doc = Pointer {
            key: key.clone(),
            sha256: sha256.clone(),
            commit: req.commit.to_ascii_lowercase(),
            published_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        put_small(
            s3,
            bucket,
            &pkey,
            doc.to_json().into_bytes(),
            "application/json",
            false,
        )
        .await?;
        tracing::info!(pointer = %pkey, key = %key, "release pointer updated");
        Some(pkey)
    } else {
        None
    };

    Ok(Published {
        bucket: bucket.into(),
        key,
        sha256,
        size,
        parts,
        signature_key,
        pointer_key,
    })
}

/// Writes a small object with a full SHA-256 checksum; `create_only` refuses an existing key.
async fn put_small(
    s3: &Client,
    bucket: &str,
    key: &str,
    body: Vec<u8>,
    content_type: &str,
    create_only: bool,
) -> Result<(), PublishError> {
    let checksum = aws_smithy_types::base64::encode(Sha256::digest(&body));
    let send = |conditional: bool| {
        let mut req = s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .cache_control("no-cache")
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(&checksum)
            .body(ByteStream::from(body.clone()));
        if conditional {
            req = req.if_none_match("*");
        }
        req.send()
    };
    match send(create_only).await {
        Ok(_) => Ok(()),
        Err(e) if create_only && is_not_implemented(&e) => {
            tracing::warn!(
                bucket,
                key,
                "the server does not implement conditional writes; relying on the earlier existence check"
            );
            send(false)
                .await
                .map(|_| ())
                .map_err(|e| classify(&e, bucket, key))
        }
        Err(e) => Err(classify(&e, bucket, key)),
    }
}

/// One `PutObject` streamed from the file, with the full-object SHA-256 checksum.
async fn put_whole(
    s3: &Client,
    req: &PublishRequest,
    key: &str,
    metadata: HashMap<String, String>,
    digest: &[u8; 32],
) -> Result<(), PublishError> {
    let bucket = req.bucket.as_str();
    let checksum = aws_smithy_types::base64::encode(digest);
    let send = |conditional: bool| {
        let metadata = metadata.clone();
        let checksum = checksum.clone();
        async move {
            let body = ByteStream::from_path(&req.file)
                .await
                .map_err(|e| PublishError::File {
                    path: req.file.display().to_string(),
                    reason: e.to_string(),
                })?;
            let mut put = s3
                .put_object()
                .bucket(bucket)
                .key(key)
                .content_type("application/gzip")
                .set_metadata(Some(metadata))
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .checksum_sha256(checksum)
                .body(body);
            if conditional {
                put = put.if_none_match("*");
            }
            Ok::<_, PublishError>(put.send().await)
        }
    };
    match send(true).await? {
        Ok(_) => Ok(()),
        Err(e) if is_not_implemented(&e) => {
            tracing::warn!(
                bucket,
                key,
                "the server does not implement conditional writes; relying on the earlier existence check"
            );
            send(false)
                .await?
                .map(|_| ())
                .map_err(|e| classify(&e, bucket, key))
        }
        Err(e) => Err(classify(&e, bucket, key)),
    }
}

/// A multipart upload with `concurrency` parts in flight, each with its SHA-256 checksum.
/// Returns the number of parts.
async fn put_multipart(
    s3: &Client,
    req: &PublishRequest,
    key: &str,
    size: u64,
    metadata: HashMap<String, String>,
) -> Result<u64, PublishError> {
    let bucket = req.bucket.as_str();
    let part_size = req
        .part_size
        .max(MIN_PART_SIZE)
        .max(size.div_ceil(MAX_PARTS));
    let count = size.div_ceil(part_size);
    let created = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .content_type("application/gzip")
        .set_metadata(Some(metadata))
        .checksum_algorithm(ChecksumAlgorithm::Sha256)
        .send()
        .await
        .map_err(|e| classify(&e, bucket, key))?;
    let Some(upload_id) = created.upload_id().map(str::to_string) else {
        return Err(PublishError::Upload {
            bucket: bucket.into(),
            key: key.into(),
            reason: "CreateMultipartUpload returned no upload id".into(),
        });
    };
    let file = Arc::new(File::open(&req.file).map_err(|e| PublishError::File {
        path: req.file.display().to_string(),
        reason: e.to_string(),
    })?);
    let result = async {
        let mut parts: Vec<CompletedPart> = futures_util::stream::iter(1..=count)
            .map(|n| {
                let file = Arc::clone(&file);
                let upload_id = upload_id.as_str();
                async move {
                    let offset = (n - 1) * part_size;
                    let len = part_size.min(size - offset);
                    // Reading and hashing a part is CPU and disk work: keep it off the runtime.
                    let (data, checksum) = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; len as usize];
                        file.read_exact_at(&mut buf, offset)?;
                        let checksum = aws_smithy_types::base64::encode(Sha256::digest(&buf));
                        Ok::<_, io::Error>((buf, checksum))
                    })
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))
                    .and_then(|r| r)
                    .map_err(|e| PublishError::File {
                        path: req.file.display().to_string(),
                        reason: format!("reading part {n} at byte {offset}: {e}"),
                    })?;
                    let out = s3
                        .upload_part()
                        .bucket(bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .part_number(n as i32)
                        .content_length(len as i64)
                        .checksum_sha256(&checksum)
                        .body(ByteStream::from(data))
                        .send()
                        .await
                        .map_err(|e| classify(&e, bucket, key))?;
                    Ok::<_, PublishError>(
                        CompletedPart::builder()
                            .part_number(n as i32)
                            .set_e_tag(out.e_tag().map(str::to_string))
                            .checksum_sha256(out.checksum_sha256().unwrap_or(&checksum))
                            .build(),
                    )
                }
            })
            .buffer_unordered(req.concurrency)
            .try_collect()
            .await?;
        parts.sort_by_key(|p| p.part_number());
        let complete = |conditional: bool| {
            let mut c = s3
                .complete_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts.clone()))
                        .build(),
                );
            if conditional {
                c = c.if_none_match("*");
            }
            c.send()
        };
        match complete(true).await {
            Ok(_) => Ok(count),
            // The server accepted the request but its answer could not be parsed (moto 5.2
            // names the XML root `CompleteMultipartUploadResponse`). Whether the object is
            // complete and right is what `check_landed` establishes next, from head-object.
            Err(e) if status_of(&e) == Some(200) => {
                tracing::warn!(bucket, key, error = %error_chain(&e), "could not parse the answer to CompleteMultipartUpload; checking what landed instead");
                Ok(count)
            }
            Err(e) if is_not_implemented(&e) => {
                tracing::warn!(bucket, key, "the server does not implement conditional writes; relying on the earlier existence check");
                complete(false)
                    .await
                    .map(|_| count)
                    .map_err(|e| classify(&e, bucket, key))
            }
            Err(e) => Err(classify(&e, bucket, key)),
        }
    }
    .await;
    if result.is_err()
        && let Err(e) = s3
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .send()
            .await
    {
        tracing::warn!(bucket, key, upload_id = %upload_id, error = %error_chain(&e), "could not abort the multipart upload; a lifecycle rule for incomplete uploads will remove its parts");
    }
    result
}

/// head-object: what landed has our size, digest and commit.
#[allow(clippy::too_many_arguments)]
async fn check_landed(
    s3: &Client,
    bucket: &str,
    key: &str,
    size: u64,
    sha256: &str,
    commit: &str,
    parts: u64,
    digest: &[u8; 32],
) -> Result<(), PublishError> {
    let head = s3
        .head_object()
        .bucket(bucket)
        .key(key)
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .map_err(|e| classify(&e, bucket, key))?;
    let landed = |reason: String| PublishError::Landed {
        bucket: bucket.into(),
        key: key.into(),
        reason,
    };
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
    if get("sha256") != Some(sha256) {
        return Err(landed(format!(
            "its sha256 metadata is {:?}, not {sha256}",
            get("sha256")
        )));
    }
    if !get("commit-sha").is_some_and(|c| c.eq_ignore_ascii_case(commit)) {
        return Err(landed(format!(
            "its commit-sha metadata is {:?}, not {commit}",
            get("commit-sha")
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
                bucket,
                key,
                "the server reports no SHA-256 checksum for the object; relying on size and metadata"
            );
        }
    }
    tracing::info!(bucket, key, size, sha256, "verified what landed");
    Ok(())
}

/// Appends `key=`, `sha256=` and `url=` lines to GitHub Actions' `GITHUB_OUTPUT` file.
pub fn write_github_output(path: &Path, p: &Published) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    write!(f, "key={}\nsha256={}\nurl={}\n", p.key, p.sha256, p.url())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn key_shape() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_793_873_700); // 2026-11-05 10:15:00
        assert_eq!(key_timestamp(t), "20261105-101500");
        let k = artifact_key("web", "prod", "622D2103DEADBEEF", t);
        assert_eq!(k, "web/prod/622d2103-20261105-101500/web-deployment.tar.gz");
        assert!(is_release_dir("622d2103-20261105-101500"));
        assert!(!is_release_dir("current.json"));
        assert!(!is_release_dir("622d2103-2026110-1015000"));
    }

    #[test]
    fn github_defaults() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let pr = CiDefaults::github(env(&[
            ("GITHUB_SHA", "abc"),
            ("GITHUB_REF", "refs/pull/51/merge"),
            ("GITHUB_REF_NAME", "51/merge"),
            ("GITHUB_HEAD_REF", "feature/x"),
            ("GITHUB_RUN_ID", "99"),
        ]));
        assert_eq!(pr.branch.as_deref(), Some("feature/x"));
        assert_eq!(pr.pr_number.as_deref(), Some("51"));
        let push = CiDefaults::github(env(&[
            ("GITHUB_REF", "refs/heads/main"),
            ("GITHUB_REF_NAME", "main"),
            ("GITHUB_HEAD_REF", ""),
        ]));
        assert_eq!(push.branch.as_deref(), Some("main"));
        assert_eq!(push.pr_number, None);
        assert_eq!(push.commit, None);
    }
}
