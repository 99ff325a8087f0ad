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
//!
//! These are the steps of every pointer rewrite ([`super::rollout::rewrite`]); a refresh is the
//! rewrite that changes nothing else.

use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_s3::Client;

use super::rollout::{Edit, RolloutError, Signing, rewrite};
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

/// Re-signs the pointer (the same release, sequence and wave); returns it and its new
/// `published_at`.
pub async fn refresh(
    s3: &Client,
    req: &RefreshRequest,
) -> Result<(S3Object, String), RolloutError> {
    let at = S3Object::parse_url(&req.pointer)?;
    let signing = Signing {
        sign: Some(req.sign.clone()),
        trust: req.trust.clone(),
        expires_in: req.expires_in,
        sign_password: req.sign_password.clone(),
    };
    let done = rewrite(s3, &at, &signing, Edit::Refresh).await?;
    Ok((done.at, done.published_at))
}
