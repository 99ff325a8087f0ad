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
//!    With `--sign` it is a signed pointer (format 2, see [`crate::contract::pointer`]),
//!    optionally expiring (`--expires-in`).
//!
//! With `--sign`, the signature's trusted comment carries the release identity
//! ([`crate::contract::identity`]): app, environment, key, commit and the release sequence.
//! The sequence is the publish time in Unix milliseconds, raised above the sequence of the
//! environment's current signed pointer if CI's clock is behind it, so it only grows. To roll
//! back, publish the old build again: it becomes a new release with a higher sequence.
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
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use aws_sdk_s3::Client;
use sha2::{Digest, Sha256};

use super::upload::{self, Parts, Sent, UploadError, Write};
use crate::contract::identity::ReleaseIdentity;
use crate::contract::keys::{self, artifact_key, is_segment};
use crate::contract::pointer::{self, Pointer, PointerRead, SIGNED_FORMAT, Statement};
use crate::contract::signature::{self, SignError, SigningKey};
use crate::contract::wave::{FULL, Previous, Rollout};
use crate::error::exit_codes;
use crate::s3::{self as s3mod, S3Failure, S3Object};

/// Parts in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// What to publish: the arguments of `deployd publish`, and what CI fills in.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishRequest {
    /// The artifact (a .tar.gz built by CI).
    pub file: PathBuf,
    /// Where: bucket, app and environment.
    #[command(flatten)]
    pub place: super::Place,
    /// Full commit id; the key uses its first 8 characters [default: GITHUB_SHA].
    #[arg(long)]
    pub commit: Option<String>,
    /// The branch, for the metadata [default: GITHUB_HEAD_REF, then GITHUB_REF_NAME].
    #[arg(long)]
    pub branch: Option<String>,
    /// The CI run id, for the metadata [default: GITHUB_RUN_ID].
    #[arg(long)]
    pub run_id: Option<String>,
    /// Pull request number [default: from GITHUB_REF refs/pull/N/merge].
    #[arg(long = "pr")]
    pub pr_number: Option<String>,
    /// Sign with this minisign secret key file (password in DEPLOYD_SIGN_PASSWORD).
    #[arg(long, value_name = "SECRET_KEY_FILE")]
    pub sign: Option<PathBuf>,
    /// Then point {app}/{environment}/current.json at the new artifact.
    #[arg(long)]
    pub pointer: bool,
    /// With --sign --pointer: the signed pointer stops holding after this long (hosts then
    /// report it expired until it is published or refreshed again).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires_all = ["sign", "pointer"])]
    pub expires_in: Option<std::time::Duration>,
    /// With --pointer: the share of the fleet, in percent, that takes the new release; the
    /// rest stays on the release the pointer named before (see `deployd rollout`).
    #[arg(long, default_value_t = FULL, value_parser = clap::value_parser!(u8).range(0..=100), requires = "pointer")]
    pub percent: u8,
    /// Files larger than this go up as parallel multipart uploads.
    #[arg(long, default_value = "64MiB", value_parser = crate::config::parse_size)]
    pub multipart_threshold: u64,
    /// Multipart part size.
    #[arg(long, default_value = "16MiB", value_parser = crate::config::parse_size)]
    pub part_size: u64,
    /// Parts in flight at once.
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// The password of an encrypted secret key (from `DEPLOYD_SIGN_PASSWORD`).
    #[arg(skip)]
    pub sign_password: Option<String>,
    /// The build time that names the key.
    #[arg(skip = SystemTime::now())]
    pub now: SystemTime,
}

/// The values `publish` fills from the CI environment when the command line leaves them out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CiDefaults {
    /// `GITHUB_SHA`.
    pub commit: Option<String>,
    /// `GITHUB_HEAD_REF` on pull requests, else `GITHUB_REF_NAME`.
    pub branch: Option<String>,
    /// `GITHUB_RUN_ID`.
    pub run_id: Option<String>,
    /// From `GITHUB_REF` `refs/pull/N/merge`.
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

impl PublishRequest {
    /// Fills what the command line left out from CI's variables; a commit is required.
    pub fn with_ci_defaults(mut self, ci: CiDefaults) -> Result<Self, PublishError> {
        self.commit = self.commit.or(ci.commit);
        if self.commit.is_none() {
            return Err(PublishError::Usage(
                "no commit id: pass --commit SHA or run where GITHUB_SHA is set".into(),
            ));
        }
        self.branch = self.branch.or(ci.branch);
        self.run_id = self.run_id.or(ci.run_id);
        self.pr_number = self.pr_number.or(ci.pr_number);
        Ok(self)
    }

    fn commit(&self) -> &str {
        self.commit.as_deref().unwrap_or_default()
    }
}

/// A successful publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The artifact.
    pub object: S3Object,
    /// Lower-case hex.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    /// 1 for a single `PutObject`.
    pub parts: u64,
    /// The signature's key, when signed.
    pub signature_key: Option<String>,
    /// The pointer's key, when moved.
    pub pointer_key: Option<String>,
}

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// The file cannot be read.
    #[error("cannot read {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file is empty.
    #[error("{path} is empty; build the artifact before publishing it")]
    EmptyFile {
        /// The file.
        path: String,
    },
    /// The file changed while it was read.
    #[error(
        "{path} changed size while it was being read ({expected} then {got} bytes); publish a finished file"
    )]
    FileChanged {
        /// The file.
        path: String,
        /// Its size before.
        expected: u64,
        /// What was read.
        got: u64,
    },
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// An upload failed.
    #[error(transparent)]
    Upload(#[from] UploadError),
}

exit_codes!(PublishError {
    Usage(_) => USAGE,
    File { .. } => NOINPUT,
    EmptyFile { .. } | FileChanged { .. } => DATAERR,
    Sign(e) => e.exit_code(),
    Upload(e) => e.exit_code(),
});

impl PublishRequest {
    fn check(&self) -> Result<(), PublishError> {
        if self.place.bucket.is_empty() {
            return Err(PublishError::Usage("--bucket must not be empty".into()));
        }
        for (flag, v) in [
            ("--app", &self.place.app),
            ("--environment", &self.place.environment),
        ] {
            if !is_segment(v) {
                return Err(PublishError::Usage(format!(
                    "{flag} {v:?} must be a name of letters, digits, '-', '_' or '.'"
                )));
            }
        }
        let commit = self.commit();
        if commit.len() < 8 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PublishError::Usage(format!(
                "commit {:?} is not a git commit id (at least 8 hex characters); pass --commit or set GITHUB_SHA",
                commit
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
        m.insert(keys::META_COMMIT.into(), self.commit().to_ascii_lowercase());
        m.insert(
            keys::META_BUILD_TIME.into(),
            humantime::format_rfc3339_seconds(self.now).to_string(),
        );
        m.insert(keys::META_SHA256.into(), sha256.into());
        for (k, v) in [
            (keys::META_BRANCH, &self.branch),
            (keys::META_RUN_ID, &self.run_id),
            (keys::META_PR, &self.pr_number),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                m.insert(k.into(), v.into());
            }
        }
        m
    }
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
    let key = artifact_key(
        &req.place.app,
        &req.place.environment,
        req.commit(),
        req.now,
    );
    let object = S3Object::new(req.place.bucket.clone(), key.clone());

    // A clear answer before hashing and uploading a large file; the conditional write below
    // closes the race this check leaves open.
    match s3
        .head_object()
        .bucket(&object.bucket)
        .key(&object.key)
        .send()
        .await
    {
        Ok(_) => return Err(UploadError::Exists(object).into()),
        Err(e) if s3mod::classify(&e) == S3Failure::NotFound => {}
        Err(e) => return Err(upload::classify(&e, &object).into()),
    }

    let clock = Instant::now();
    let pointer_at = object.sibling(pointer::pointer_key(&req.place.app, &req.place.environment));
    let previous = if req.pointer || signer.is_some() {
        current_release(s3, &pointer_at, signer.as_ref()).await
    } else {
        None
    };
    if req.percent < FULL && previous.is_none() {
        return Err(PublishError::Usage(format!(
            "--percent {} needs a release for the rest of the fleet, but {pointer_at} names none this key signed; publish the first release at 100%",
            req.percent
        )));
    }
    let sequence = match &signer {
        Some(_) => next_sequence(&pointer_at, previous.as_ref(), req.now),
        None => 0,
    };
    let rollout = Rollout {
        percent: req.percent,
        previous: previous.filter(|p| p.key != key),
        reverts: None,
    };
    let identity = ReleaseIdentity {
        app: req.place.app.clone(),
        environment: req.place.environment.clone(),
        key: key.clone(),
        commit: req.commit().to_ascii_lowercase(),
        sequence,
        timestamp: unix_millis(req.now) / 1000,
    };
    let trusted = identity.to_trusted_comment();
    let path = req.file.clone();
    let (sha256, digest, minisig, signer) = tokio::task::spawn_blocking(move || {
        digest_and_sign(&path, size, signer.as_ref().map(|k| (k, trusted.as_str())))
            .map(|(sha, digest, sig)| (sha, digest, sig, signer))
    })
    .await
    .map_err(|e| PublishError::File {
        path: shown.clone(),
        reason: format!("hashing stopped: {e}"),
    })??;
    tracing::info!(file = %shown, size, sha256 = %sha256, seconds = clock.elapsed().as_secs_f64(), "hashed the artifact");

    let signature_key = match minisig {
        Some(text) => {
            let sig = object.sibling(signature::signature_key(&key));
            upload::put_small(s3, &sig, text.into_bytes(), "text/plain", Write::Create).await?;
            tracing::info!(signature = %sig, "uploaded the signature");
            Some(sig.key)
        }
        None => None,
    };

    let metadata = req.metadata(&sha256);
    let clock = Instant::now();
    let parts = if size <= req.multipart_threshold {
        upload::put_file(s3, &object, &req.file, metadata, &digest).await?;
        1
    } else {
        let cut = Parts {
            size: req.part_size,
            concurrency: req.concurrency,
        };
        upload::put_multipart(s3, &object, &req.file, size, metadata, cut).await?
    };
    let seconds = clock.elapsed().as_secs_f64();
    tracing::info!(
        object = %object,
        size,
        parts,
        seconds,
        mib_per_s = size as f64 / (1 << 20) as f64 / seconds.max(1e-9),
        "uploaded the artifact"
    );

    let sent = Sent {
        size,
        sha256: &sha256,
        commit: req.commit(),
        parts,
        digest: &digest,
    };
    upload::check_landed(s3, &object, sent).await?;

    let pointer_key = if req.pointer {
        let published_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let doc = match &signer {
            Some(signer) => Statement {
                format: SIGNED_FORMAT,
                app: req.place.app.clone(),
                environment: req.place.environment.clone(),
                pointer: pointer_at.key.clone(),
                key: key.clone(),
                sha256: sha256.clone(),
                commit: identity.commit.clone(),
                sequence,
                published_at,
                expires_at: expires_at(req.expires_in),
                rollout: rollout.clone(),
            }
            .sign(signer)?,
            None => Pointer {
                rollout: rollout.clone(),
                ..Pointer::unsigned(
                    key.clone(),
                    sha256.clone(),
                    identity.commit.clone(),
                    published_at,
                )
            },
        };
        upload::put_small(
            s3,
            &pointer_at,
            doc.to_json().into_bytes(),
            "application/json",
            Write::Replace,
        )
        .await?;
        tracing::info!(
            pointer = %pointer_at,
            key = %key,
            sequence,
            percent = rollout.percent,
            previous = rollout.previous.as_ref().map(|p| p.key.as_str()),
            signed = doc.signed.is_some(),
            "release pointer updated"
        );
        Some(pointer_at.key)
    } else {
        None
    };

    Ok(Published {
        object,
        sha256,
        size,
        parts,
        signature_key,
        pointer_key,
    })
}

/// Milliseconds since the Unix epoch.
fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// RFC 3339, `after` from now.
pub(crate) fn expires_at(after: Option<std::time::Duration>) -> Option<String> {
    after.map(|d| humantime::format_rfc3339_seconds(SystemTime::now() + d).to_string())
}

/// The release the environment's pointer names now, which becomes the new pointer's
/// `previous`: with a signing key, only a pointer that key signed counts (anything else in
/// the bucket is ignored, so a forged pointer cannot push the sequence or become the
/// fallback); without one, the pointer's readable fields.
pub(crate) async fn current_release(
    s3: &Client,
    at: &S3Object,
    key: Option<&SigningKey>,
) -> Option<Previous> {
    let pointer = match pointer::read(s3, at, None).await {
        Ok(PointerRead::Changed { pointer, .. }) => pointer,
        Ok(PointerRead::Unchanged) => return None,
        Err(error) => {
            tracing::debug!(pointer = %at, %error, "no current release pointer");
            return None;
        }
    };
    match key {
        Some(key) => match key
            .trusted()
            .and_then(|keys| pointer::verify(at, &pointer, &keys).map_err(|e| e.to_string()))
        {
            Ok(s) => Some(Previous {
                key: s.key,
                sha256: s.sha256,
                commit: s.commit,
                sequence: s.sequence,
            }),
            Err(reason) => {
                tracing::debug!(pointer = %at, %reason, "the current pointer is not one this key signed");
                None
            }
        },
        None => Some(Previous {
            key: pointer.key,
            sha256: pointer.sha256,
            commit: pointer.commit,
            sequence: 0,
        }),
    }
}

/// The release sequence of a new signed release: the publish time in milliseconds, or one
/// above the sequence of the environment's current release if that is higher (CI's clock
/// behind an earlier runner's).
fn next_sequence(at: &S3Object, current: Option<&Previous>, now: SystemTime) -> u64 {
    let now = unix_millis(now);
    match current.map(|p| p.sequence) {
        Some(seq) if seq >= now => {
            tracing::warn!(pointer = %at, pointer_sequence = seq, clock_ms = now, "this clock is behind the current release's sequence; continuing above it");
            seq + 1
        }
        _ => now,
    }
}

/// Appends `key=`, `sha256=` and `url=` lines to GitHub Actions' `GITHUB_OUTPUT` file.
pub fn write_github_output(path: &Path, p: &Published) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    write!(
        f,
        "key={}\nsha256={}\nurl={}\n",
        p.object.key, p.sha256, p.object
    )?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

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
