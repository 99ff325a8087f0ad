//! `deployd rollout`: moves the percentage of an environment's release pointer, and the revert
//! `deployd fleet status --revert-on-failure` writes.
//!
//! Both rewrite the current pointer the way `refresh-pointer` re-signs it: read it and its
//! ETag; with `--sign`, check its signature with the signing key's own public key (and any
//! `--trust` keys) and that it was signed for the key it was read from, so a forged pointer is
//! never re-signed; change it; sign the new statement with a new `published_at`; write it with
//! `If-Match: <ETag>`, so a `publish` that moved the pointer meanwhile wins (exit 75, run
//! again). Without `--sign` the pointer must be unsigned, and only its readable fields change.
//!
//! - **percent**: the wave grows (or stops growing) for the same release; hosts already in it
//!   stay in it ([`crate::contract::wave`]);
//! - **revert**: the pointer names its previous release again, at 100%, with `reverts` set to
//!   the sequence of the release it leaves, so hosts that accepted that release may go back to
//!   the previous one (their high-water mark allows exactly that step, and no older one).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;

use super::publish::expires_at;
use super::upload::{self, UploadError, Write};
use crate::contract::pointer::{self, Pointer, PointerError, PointerRead};
use crate::contract::signature::{PublicKeys, SignError, SigningKey};
use crate::contract::wave::{FULL, Previous, Rollout};
use crate::error::exit_codes;
use crate::s3::S3Object;

/// How a rewritten pointer is signed: the arguments `rollout` and `fleet status` share.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Signing {
    /// Sign with this minisign secret key file (password in DEPLOYD_SIGN_PASSWORD); needed
    /// when the pointer is signed.
    #[arg(long, value_name = "SECRET_KEY_FILE")]
    pub sign: Option<PathBuf>,
    /// Also accept a pointer signed by this public key (RWQ...), e.g. the key being rotated out.
    #[arg(long, value_name = "PUBLIC_KEY", requires = "sign")]
    pub trust: Vec<String>,
    /// The rewritten pointer stops holding after this long.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "sign")]
    pub expires_in: Option<Duration>,
    /// The password of an encrypted secret key (from `DEPLOYD_SIGN_PASSWORD`).
    #[arg(skip)]
    pub sign_password: Option<String>,
}

/// The arguments of `deployd rollout`.
#[derive(Debug, Clone, clap::Args)]
pub struct RolloutRequest {
    /// Where: the bucket holding {app}/{environment}/current.json.
    #[command(flatten)]
    pub place: super::Place,
    /// The share of the fleet, in percent, that takes the pointer's release.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100), required_unless_present = "revert", conflicts_with = "revert")]
    pub percent: Option<u8>,
    /// Point the environment back at the pointer's previous release, at 100% (hosts that
    /// accepted the current release may go back from it).
    #[arg(long)]
    pub revert: bool,
    #[command(flatten)]
    pub signing: Signing,
}

/// What to change in the pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// Set the percentage.
    Percent(u8),
    /// Name the previous release again, at 100%.
    Revert,
    /// Change nothing but the signing time (and expiry): `refresh-pointer`.
    Refresh,
}

/// The pointer as rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// Where it is.
    pub at: S3Object,
    /// The release it names now.
    pub key: String,
    /// Its SHA-256.
    pub sha256: String,
    /// Its commit.
    pub commit: String,
    /// Its wave.
    pub rollout: Rollout,
    /// When it was written (RFC 3339; for a signed pointer, the signed `published_at`).
    pub published_at: String,
}

/// Why the pointer was not rewritten.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// A bad argument, or a change the pointer cannot take.
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
    /// The pointer names no previous release to go back to.
    #[error(
        "release pointer {0} names no previous release to go back to; publish the release to go back to again"
    )]
    NothingToRevert(S3Object),
    /// Writing it failed, or it changed meanwhile.
    #[error(transparent)]
    Upload(#[from] UploadError),
}

exit_codes!(RolloutError {
    Usage(_) => USAGE,
    Url(e) => e.exit_code(),
    Sign(e) => e.exit_code(),
    Pointer(e) => e.exit_code(),
    Foreign { .. } | NothingToRevert(_) => DATAERR,
    Upload(e) => e.exit_code(),
});

/// Applies `edit` to a pointer's wave; returns the pointer's new sequence (the previous
/// release's, for a revert) and, for a revert, the release it names from now on.
fn apply(
    at: &S3Object,
    edit: Edit,
    sequence: u64,
    rollout: &mut Rollout,
) -> Result<(u64, Option<Previous>), RolloutError> {
    match edit {
        Edit::Percent(percent) => {
            if percent < FULL && rollout.previous.is_none() {
                return Err(RolloutError::Usage(format!(
                    "release pointer {at} names no previous release for the rest of the fleet, so its percent cannot be {percent}; publish with --percent instead"
                )));
            }
            rollout.percent = percent;
            Ok((sequence, None))
        }
        Edit::Revert => {
            let previous = rollout
                .previous
                .take()
                .ok_or_else(|| RolloutError::NothingToRevert(at.clone()))?;
            *rollout = Rollout {
                percent: FULL,
                previous: None,
                reverts: (sequence > 0).then_some(sequence),
            };
            Ok((previous.sequence, Some(previous)))
        }
        Edit::Refresh => Ok((sequence, None)),
    }
}

/// Rewrites the pointer at `at` with `edit`, signed as `signing` says.
pub async fn rewrite(
    s3: &Client,
    at: &S3Object,
    signing: &Signing,
    edit: Edit,
) -> Result<Rewritten, RolloutError> {
    let key = match &signing.sign {
        Some(path) => Some(SigningKey::load(path, signing.sign_password.clone())?),
        None => None,
    };
    let PointerRead::Changed { pointer, etag } = pointer::read(s3, at, None).await? else {
        return Err(RolloutError::Usage(format!(
            "release pointer {at} answered 304 to an unconditional read"
        )));
    };
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let doc = match &key {
        Some(key) => {
            let mut texts = vec![key.public_key_base64()];
            texts.extend(signing.trust.iter().cloned());
            let trusted = PublicKeys::Many(texts)
                .trusted()
                .map_err(|e| RolloutError::Usage(format!("--trust {e}")))?;
            let mut s = pointer::verify(at, &pointer, &trusted)?;
            if s.pointer != at.key {
                return Err(RolloutError::Foreign {
                    object: at.clone(),
                    signed: s.pointer,
                });
            }
            let (sequence, back) = apply(at, edit, s.sequence, &mut s.rollout)?;
            s.sequence = sequence;
            if let Some(b) = back {
                (s.key, s.sha256, s.commit) = (b.key, b.sha256, b.commit);
            }
            s.published_at = now;
            s.expires_at = expires_at(signing.expires_in);
            s.sign(key)?
        }
        None => {
            if pointer.signed.is_some() {
                return Err(RolloutError::Usage(format!(
                    "release pointer {at} is signed: pass --sign with the key that signs it"
                )));
            }
            let mut p: Pointer = pointer;
            if let (_, Some(b)) = apply(at, edit, 0, &mut p.rollout)? {
                (p.key, p.sha256, p.commit) = (b.key, b.sha256, b.commit);
            }
            p.published_at = now;
            p
        }
    };
    upload::put_small(
        s3,
        at,
        doc.to_json().into_bytes(),
        "application/json",
        Write::IfMatch(etag),
    )
    .await?;
    tracing::info!(
        pointer = %at,
        key = %doc.key,
        sha256 = %doc.sha256,
        percent = doc.rollout.percent,
        reverts = doc.rollout.reverts,
        signed = doc.signed.is_some(),
        "release pointer rewritten"
    );
    Ok(Rewritten {
        at: at.clone(),
        key: doc.key,
        sha256: doc.sha256,
        commit: doc.commit,
        rollout: doc.rollout,
        published_at: doc.published_at,
    })
}

/// `deployd rollout`: sets the percentage of the environment's pointer, or reverts it.
pub async fn rollout(s3: &Client, req: &RolloutRequest) -> Result<Rewritten, RolloutError> {
    let at = req.place.pointer();
    let edit = match (req.revert, req.percent) {
        (true, _) => Edit::Revert,
        (false, Some(p)) => Edit::Percent(p),
        (false, None) => {
            return Err(RolloutError::Usage("pass --percent N or --revert".into()));
        }
    };
    rewrite(s3, &at, &req.signing, edit).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_move_the_percentage_or_go_back() {
        let at = S3Object::new("b", "web/prod/current.json");
        let mut rollout = Rollout {
            percent: 10,
            previous: Some(Previous {
                key: "old".into(),
                sha256: "aa".repeat(32),
                commit: "c1".into(),
                sequence: 5,
            }),
            reverts: None,
        };
        assert_eq!(
            apply(&at, Edit::Percent(50), 9, &mut rollout).unwrap(),
            (9, None)
        );
        assert_eq!(rollout.percent, 50);
        let (sequence, back) = apply(&at, Edit::Revert, 9, &mut rollout).unwrap();
        assert_eq!(sequence, 5);
        assert_eq!(
            back.map(|b| (b.key, b.commit)),
            Some(("old".into(), "c1".into()))
        );
        assert!(matches!(
            apply(&at, Edit::Revert, 5, &mut rollout),
            Err(RolloutError::NothingToRevert(_))
        ));
        assert!(matches!(
            apply(&at, Edit::Percent(20), 5, &mut rollout),
            Err(RolloutError::Usage(_))
        ));
        assert_eq!(rollout.reverts, Some(9));
        assert_eq!(rollout.percent, FULL);
        assert_eq!(
            apply(&at, Edit::Refresh, 5, &mut rollout).unwrap(),
            (5, None)
        );
    }
}
