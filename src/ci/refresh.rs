//! `deployd refresh-pointer`: re-signs an environment's release pointer without publishing.
//!
//! A host with `[source] max_pointer_age` refuses a signed pointer signed longer ago than that
//! (a pointer nobody re-signs looks exactly like one an attacker froze). An environment that
//! goes without releases for a while keeps its pointer fresh with this command on a schedule:
//!
//! 1. reads the pointer (`s3://bucket/{app}/{environment}/current.json`) and its ETag;
//! 2. checks its signature with the signing key's own public key (and any `--trust` keys, for
//!    a pointer signed before a key rotation): a pointer no trusted key signed is never
//!    re-signed, so a forged one cannot be laundered;
//! 3. checks that its statement was signed for the key it was read from;
//! 4. signs the same statement (same artifact, same sequence) with a new `published_at` and,
//!    with `--expires-in`, a new `expires_at`;
//! 5. writes it with `If-Match: <ETag>`, so a `publish` that moved the pointer meanwhile wins
//!    (exit 75, run again).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;

use super::publish::expires_at;
use super::upload::{self, UploadError, Write};
use crate::contract::pointer::{self, PointerError, PointerRead};
use crate::contract::signature::{PublicKeys, SignError, SigningKey, TrustedKeys};
use crate::error::exit_codes;
use crate::s3::S3Object;

/// The arguments of `deployd refresh-pointer`.
#[derive(Debug, Clone, clap::Args)]
pub struct RefreshRequest {
    /// The pointer: s3://bucket/{app}/{environment}/current.json.
    #[arg(value_name = "S3_URL")]
    pub pointer: String,
    /// The minisign secret key file to sign with (password in DEPLOYD_SIGN_PASSWORD).
    #[arg(long, value_name = "SECRET_KEY_FILE")]
    pub sign: PathBuf,
    /// Also accept a pointer signed by this public key (RWQ...), e.g. the key being rotated out.
    #[arg(long, value_name = "PUBLIC_KEY")]
    pub trust: Vec<String>,
    /// The re-signed pointer stops holding after this long.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub expires_in: Option<Duration>,
    /// The password of an encrypted secret key (from `DEPLOYD_SIGN_PASSWORD`).
    #[arg(skip)]
    pub sign_password: Option<String>,
}

/// Why the pointer was not re-signed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// Not an `s3://bucket/key` URL.
    #[error(transparent)]
    Url(#[from] crate::s3::BadS3Url),
    /// The signing key cannot be used.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// The pointer cannot be read, or no trusted key signed it.
    #[error(transparent)]
    Pointer(#[from] PointerError),
    /// The pointer was signed for another place (a copy).
    #[error(
        "release pointer {object} is signed for pointer {signed:?}, not for where it was found; refusing to re-sign a copy"
    )]
    Foreign {
        /// The pointer.
        object: S3Object,
        /// The pointer key it was signed for.
        signed: String,
    },
    /// Writing it failed, or it changed meanwhile.
    #[error(transparent)]
    Upload(#[from] UploadError),
}

exit_codes!(RefreshError {
    Usage(_) => USAGE,
    Url(e) => e.exit_code(),
    Sign(e) => e.exit_code(),
    Pointer(e) => e.exit_code(),
    Foreign { .. } => DATAERR,
    Upload(e) => e.exit_code(),
});

/// Re-signs the pointer; returns it and its new `published_at`.
pub async fn refresh(
    s3: &Client,
    req: &RefreshRequest,
) -> Result<(S3Object, String), RefreshError> {
    let key = SigningKey::load(&req.sign, req.sign_password.clone())?;
    let mut texts = vec![key.public_key_base64()];
    texts.extend(req.trust.iter().cloned());
    let trusted: TrustedKeys = PublicKeys::Many(texts)
        .trusted()
        .map_err(|e| RefreshError::Usage(format!("--trust {e}")))?;
    let at = S3Object::parse_url(&req.pointer)?;
    let PointerRead::Changed { pointer, etag } = pointer::read(s3, &at, None).await? else {
        return Err(RefreshError::Usage(format!(
            "release pointer {at} answered 304 to an unconditional read"
        )));
    };
    let mut statement = pointer::verify(&at, &pointer, &trusted)?;
    if statement.pointer != at.key {
        return Err(RefreshError::Foreign {
            object: at,
            signed: statement.pointer,
        });
    }
    statement.published_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    statement.expires_at = expires_at(req.expires_in);
    let doc = statement.sign(&key)?;
    upload::put_small(
        s3,
        &at,
        doc.to_json().into_bytes(),
        "application/json",
        Write::IfMatch(etag),
    )
    .await?;
    tracing::info!(
        pointer = %at,
        key = %statement.key,
        sequence = statement.sequence,
        published_at = %statement.published_at,
        expires_at = statement.expires_at.as_deref(),
        "release pointer re-signed"
    );
    Ok((at, statement.published_at))
}
