//! Trust: with `[source] public_key`, what a signed release claims to be is checked against
//! where it was found and against what this host already accepted.
//!
//! Whoever can write the bucket but does not hold a signing key can still copy, move and
//! replay anything that was ever signed. So, beyond "a trusted key signed these bytes":
//!
//! - **a pointer** must be a signed (format 2) pointer whose statement names the key it was
//!   read from and this host's `app` — a staging pointer copied over prod's, or another app's,
//!   is refused — and that has not expired (`expires_at`, `[source] max_pointer_age`: a
//!   pointer nobody re-signed is a frozen pointer);
//! - **an artifact**'s signature must carry a release identity
//!   ([`crate::contract::identity`]) naming the exact key it was read from (a v1 artifact and
//!   signature copied over v2's key are refused) and this host's `app`; when a pointer named
//!   it, its identity must also agree with the pointer's statement (environment, sequence);
//! - **the sequence** must not be below the newest signed release this host accepted for the
//!   same app and environment (`state.json` `high_water`, kept across restarts), unless the
//!   operator asked for it (`deploy --allow-downgrade`, or a root-owned trigger file with
//!   `allow_downgrade = true`). The intended way to roll a fleet back is to publish the old
//!   build again: it becomes a new release with a higher sequence.
//!
//! Every refusal is exit 65 with one sentence naming the object, and leaves the serving
//! release as it was. The checks are plain functions; the `Deployer` methods at the end
//! (following a pointer, checking a signature's identity, then its sequence) call them at
//! their places in the pipeline.

use std::time::{Duration, SystemTime};

use super::source::Artifact;
use super::{DeployError, Deployer, Request};
use crate::contract::identity::{Mismatch, ReleaseIdentity, same};
use crate::contract::pointer::{self, PointerRead, Statement};
use crate::contract::signature::{self, SUFFIX, Signed, TrustedKeys};
use crate::contract::state::HighWater;
use crate::contract::state::Stage;
use crate::contract::wave::{self, Choice, Rollout};
use crate::error::{ExitCode, exit};
use crate::s3::S3Object;

/// A signed release or pointer this host must not use.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The artifact's signature carries no release identity.
    #[error(
        "signature {object}{SUFFIX} carries no usable release identity ({reason}); republish the artifact with `deployd publish --sign`"
    )]
    NoIdentity {
        /// The artifact.
        object: S3Object,
        /// Why, as one clause.
        reason: String,
    },
    /// A signed field is not what the place it was found in requires.
    #[error(
        "{what} {object} is signed for {field} {signed:?} but was found where {field} {expected:?} belongs; refusing it"
    )]
    Mismatch {
        /// `artifact` or `release pointer`.
        what: &'static str,
        /// The object.
        object: S3Object,
        /// The field.
        field: &'static str,
        /// What was signed.
        signed: String,
        /// What was expected.
        expected: String,
    },
    /// Older than the newest release accepted here.
    #[error(
        "artifact {object} is release {sequence} of {scope}, older than release {high_water} ({high_water_key}) already accepted here; refusing the rollback (publish the old build again as a new release, or deploy it with --allow-downgrade)"
    )]
    Rollback {
        /// The artifact.
        object: S3Object,
        /// `{app}/{environment}`.
        scope: String,
        /// Its sequence.
        sequence: u64,
        /// The newest accepted sequence.
        high_water: u64,
        /// The newest accepted release's key.
        high_water_key: String,
    },
    /// The pointer's statement no longer holds.
    #[error(
        "release pointer {object} expired at {expired_at} (signed at {published_at}); publish or re-sign it (`deployd refresh-pointer`); the serving release keeps running"
    )]
    Expired {
        /// The pointer.
        object: S3Object,
        /// RFC 3339.
        published_at: String,
        /// RFC 3339.
        expired_at: String,
    },
}

impl ExitCode for TrustError {
    /// Every refusal is bad data: 65.
    fn exit_code(&self) -> i32 {
        exit::DATAERR
    }
}

fn mismatch<'a>(
    what: &'static str,
    object: &'a S3Object,
) -> impl FnOnce(Mismatch) -> TrustError + 'a {
    move |m| TrustError::Mismatch {
        what,
        object: object.clone(),
        field: m.field,
        signed: m.signed,
        expected: m.expected,
    }
}

/// Checks a verified pointer statement read from `object` on a host whose app is `app`, at
/// time `now`.
pub fn check_pointer(
    object: &S3Object,
    statement: &Statement,
    app: &str,
    max_age: Duration,
    now: SystemTime,
) -> Result<(), TrustError> {
    let refuse = mismatch("release pointer", object);
    same("pointer", &statement.pointer, &object.key)
        .and_then(|()| same("app", &statement.app, app))
        .map_err(refuse)?;
    if let Some(expiry) = statement.expiry(max_age)
        && expiry <= now
    {
        return Err(TrustError::Expired {
            object: object.clone(),
            published_at: statement.published_at.clone(),
            expired_at: humantime::format_rfc3339_seconds(expiry).to_string(),
        });
    }
    Ok(())
}

/// Reads and checks the identity in the trusted comment of the signature of the artifact at
/// `object`: its key and app, and, when a pointer named it, agreement with the pointer's
/// statement. (The comment is authenticated when the signature is verified, after the
/// download; a forged one fails there, so checking it early only refuses sooner.)
pub fn check_artifact(
    object: &S3Object,
    trusted_comment: &str,
    app: &str,
    statement: Option<&Statement>,
) -> Result<ReleaseIdentity, TrustError> {
    let identity =
        ReleaseIdentity::parse(trusted_comment).map_err(|reason| TrustError::NoIdentity {
            object: object.clone(),
            reason,
        })?;
    let refuse = mismatch("artifact", object);
    identity.check_found(&object.key, app).map_err(refuse)?;
    if let Some(s) = statement {
        let refuse = mismatch("artifact", object);
        same("environment", &identity.environment, &s.environment)
            .and_then(|()| {
                same(
                    "sequence",
                    &identity.sequence.to_string(),
                    &s.sequence.to_string(),
                )
            })
            .map_err(refuse)?;
    }
    Ok(identity)
}

/// Refuses a release older than `high_water`, unless `allow_downgrade`.
pub fn check_sequence(
    object: &S3Object,
    identity: &ReleaseIdentity,
    high_water: Option<&HighWater>,
    allow_downgrade: bool,
) -> Result<(), TrustError> {
    match high_water {
        Some(hw) if identity.sequence < hw.sequence => {
            if allow_downgrade {
                tracing::warn!(
                    artifact = %object,
                    sequence = identity.sequence,
                    high_water = hw.sequence,
                    "deploying an older release than the newest accepted, as --allow-downgrade asks"
                );
                Ok(())
            } else {
                Err(TrustError::Rollback {
                    object: object.clone(),
                    scope: identity.scope(),
                    sequence: identity.sequence,
                    high_water: hw.sequence,
                    high_water_key: hw.key.clone(),
                })
            }
        }
        _ => Ok(()),
    }
}

/// A signature fetched and its release identity checked, waiting for the bytes.
pub(super) struct SignedRelease {
    pub(super) signed: Signed,
    pub(super) identity: ReleaseIdentity,
    pub(super) downgrade: bool,
}

impl Deployer {
    /// Reads the release pointer `artifact` names, if it is one, and returns the artifact the
    /// pointer names, with the pointer's SHA-256 as the expected digest. With trusted `keys`
    /// the pointer must be signed, and its statement bound to this place and still valid.
    ///
    /// A pointer that names its release for part of the fleet only (`percent`, see
    /// [`crate::contract::wave`]) yields the previous release when this host is outside the
    /// wave and does not serve the release already; the statement returned then describes
    /// that release (its key, digest, commit and sequence, as signed in `previous`). The
    /// commit returned is the one aimed at.
    pub(super) async fn follow_pointer(
        &self,
        artifact: Artifact,
        keys: Option<&TrustedKeys>,
    ) -> Result<(Artifact, Option<Statement>, Option<String>), DeployError> {
        if !artifact.origin.is_pointer() {
            return Ok((artifact, None, None));
        }
        self.reporter
            .stage(Stage::ReadingPointer, Some(artifact.to_string()));
        let PointerRead::Changed { pointer, etag } =
            pointer::read(&self.s3, &artifact.object, None).await?
        else {
            // Without an ETag to compare, S3 never answers 304.
            return Err(DeployError::Internal(format!(
                "reading release pointer {artifact} (unexpected 304)"
            )));
        };
        let statement = match keys {
            Some(keys) => {
                let s = pointer::verify(&artifact.object, &pointer, keys)?;
                check_pointer(
                    &artifact.object,
                    &s,
                    &self.cfg.app,
                    self.cfg.source.max_pointer_age.0,
                    SystemTime::now(),
                )?;
                Some(s)
            }
            None => None,
        };
        let mut statement = statement;
        let (mut key, mut sha256, mut commit, rollout) = match &statement {
            Some(s) => (
                s.key.clone(),
                s.sha256.clone(),
                s.commit.clone(),
                s.rollout.clone(),
            ),
            None => (
                pointer.key.clone(),
                pointer.sha256.clone(),
                pointer.commit.clone(),
                pointer.rollout.clone(),
            ),
        };
        if let (true, Some(previous)) = (rollout.partial(), &rollout.previous) {
            let serving = self.host().load()?.current.map(|c| c.sha256);
            let member = match self.instance.member_id().await {
                Ok(m) => Some(m),
                Err(reason) => {
                    tracing::warn!(%reason, "this host has no member id for the rollout wave; it stays outside the wave");
                    None
                }
            };
            let choice = wave::choose(&rollout, &sha256, member.as_deref(), serving.as_deref());
            tracing::info!(
                pointer = %artifact,
                member = member.as_deref().unwrap_or("-"),
                percent = rollout.percent,
                slot = member.as_deref().map(|m| wave::slot(m, &sha256)),
                in_wave = choice == Choice::Release,
                release = %key,
                previous = %previous.key,
                "rollout wave"
            );
            if choice == Choice::Previous {
                key = previous.key.clone();
                sha256 = previous.sha256.clone();
                commit = previous.commit.clone();
                if let Some(s) = statement.as_mut() {
                    s.key = key.clone();
                    s.sha256 = sha256.clone();
                    s.commit = commit.clone();
                    s.sequence = previous.sequence;
                    s.rollout = Rollout::default();
                }
            }
        }
        tracing::info!(
            pointer = %artifact,
            pointer_etag = %etag,
            key = %key,
            sha256 = %sha256,
            commit = %commit,
            published_at = %pointer.published_at,
            sequence = statement.as_ref().map(|s| s.sequence),
            "following release pointer"
        );
        let followed = Artifact {
            object: artifact.object.sibling(key),
            origin: artifact.origin,
            expected_sha256: Some(sha256),
        };
        Ok((followed, statement, Some(commit)))
    }

    /// Fetches the artifact's signature and checks the release identity it carries against
    /// where it was found and the pointer that named it.
    pub(super) async fn check_signed(
        &self,
        object: &S3Object,
        keys: &TrustedKeys,
        statement: Option<&Statement>,
    ) -> Result<SignedRelease, DeployError> {
        let signed = signature::fetch(&self.s3, object, keys).await?;
        let identity = check_artifact(object, signed.trusted_comment(), &self.cfg.app, statement)?;
        Ok(SignedRelease {
            signed,
            identity,
            downgrade: false,
        })
    }

    /// Checks a signed release against the newest one accepted here (the high-water mark).
    /// A signed pointer that reverts a release (`reverts`) allows going back from it, and from
    /// nothing newer.
    pub(super) fn check_sequence(
        &self,
        mut release: SignedRelease,
        req: &Request,
        statement: Option<&Statement>,
    ) -> Result<SignedRelease, DeployError> {
        let (object, identity) = (&release.signed.object, &release.identity);
        let high_water = self.host().high_water(&identity.scope())?;
        let reverting = statement
            .and_then(|s| s.rollout.reverts)
            .zip(high_water.as_ref())
            .is_some_and(|(reverts, hw)| hw.sequence <= reverts);
        if reverting {
            tracing::info!(artifact = %object, "going back to the previous release, as the signed pointer's revert allows");
        }
        check_sequence(
            object,
            identity,
            high_water.as_ref(),
            req.allow_downgrade || reverting,
        )?;
        release.downgrade = high_water.is_some_and(|hw| identity.sequence < hw.sequence);
        tracing::info!(
            artifact = %object,
            scope = %identity.scope(),
            sequence = identity.sequence,
            commit = %identity.commit,
            downgrade = release.downgrade,
            "signed release identity accepted; the signature is checked as it downloads"
        );
        Ok(release)
    }

    /// Without `[s3] expected_bucket_owner`, learns this instance's account from IMDSv2 (once
    /// per process) so that S3 requests expect their buckets to be owned by it.
    pub(super) async fn learn_bucket_owner(&self) {
        if self.cfg.s3.expected_bucket_owner.is_some() {
            return;
        }
        match self.instance.identity().await {
            Ok(identity) => crate::s3::learn_account_id(&identity.account_id),
            Err(error) => {
                tracing::debug!(%error, "the bucket owner is not known; S3 requests do not name it")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement() -> Statement {
        Statement {
            key: "web/prod/a/web-deployment.tar.gz".into(),
            sequence: 20,
            ..pointer::tests::statement()
        }
    }

    fn identity(env: &str, seq: u64) -> ReleaseIdentity {
        ReleaseIdentity {
            app: "web".into(),
            environment: env.into(),
            key: format!("web/{env}/a/web-deployment.tar.gz"),
            commit: "c".repeat(40),
            sequence: seq,
            timestamp: 1,
        }
    }

    #[test]
    fn pointers_are_bound_to_their_place_and_time() {
        let at = S3Object::new("b", "web/prod/current.json");
        let signed = humantime::parse_rfc3339("2026-11-05T10:15:00Z").unwrap();
        let s = statement();
        check_pointer(&at, &s, "web", Duration::ZERO, signed).unwrap();
        let staging = S3Object::new("b", "web/staging/current.json");
        let err = check_pointer(&staging, &s, "web", Duration::ZERO, signed).unwrap_err();
        assert_eq!(err.exit_code(), 65);
        assert!(
            err.to_string()
                .contains("pointer \"web/prod/current.json\""),
            "{err}"
        );
        let err = check_pointer(&at, &s, "api", Duration::ZERO, signed).unwrap_err();
        assert!(err.to_string().contains("app \"web\""), "{err}");
        let hour = Duration::from_secs(3600);
        check_pointer(&at, &s, "web", hour, signed + hour / 2).unwrap();
        let err = check_pointer(&at, &s, "web", hour, signed + hour).unwrap_err();
        assert!(
            err.to_string().contains("expired at 2026-11-05T11:15:00Z"),
            "{err}"
        );
    }

    #[test]
    fn artifacts_are_bound_to_their_key_and_pointer() {
        let id = identity("prod", 20);
        let at = S3Object::new("b", id.key.clone());
        let comment = id.to_trusted_comment();
        assert_eq!(
            check_artifact(&at, &comment, "web", Some(&statement())).unwrap(),
            id
        );
        let moved = S3Object::new("b", "web/prod/b/web-deployment.tar.gz");
        assert!(check_artifact(&moved, &comment, "web", None).is_err());
        let mut older = statement();
        older.sequence = 21;
        let err = check_artifact(&at, &comment, "web", Some(&older)).unwrap_err();
        assert!(err.to_string().contains("sequence"), "{err}");
        let err = check_artifact(&at, "timestamp:1\tfile:x", "web", None).unwrap_err();
        assert!(matches!(err, TrustError::NoIdentity { .. }), "{err}");
    }

    #[test]
    fn older_sequences_need_an_explicit_downgrade() {
        let at = S3Object::new("b", "k");
        let hw = HighWater {
            sequence: 20,
            key: "web/prod/new".into(),
            accepted_at: "x".into(),
            downgraded: false,
        };
        check_sequence(&at, &identity("prod", 20), Some(&hw), false).unwrap();
        check_sequence(&at, &identity("prod", 3), None, false).unwrap();
        let err = check_sequence(&at, &identity("prod", 19), Some(&hw), false).unwrap_err();
        assert!(err.to_string().contains("older than release 20"), "{err}");
        check_sequence(&at, &identity("prod", 19), Some(&hw), true).unwrap();
    }
}
