//! Release pointers: a small JSON object that names the artifact an environment should run.
//!
//! `deployd publish --pointer` writes `{app}/{environment}/current.json` as its very last step,
//! after the artifact (and its signature) have landed and been checked:
//!
//! ```json
//! {"key": "web/prod/622d2103-20261105-101500/web-deployment.tar.gz",
//!  "sha256": "9f86d0…", "commit": "622d2103deadbeef…", "published_at": "2026-11-05T10:15:00Z"}
//! ```
//!
//! The artifact lives in the same bucket as the pointer. An agent that follows a pointer
//! (`[source] pointer_key`, or `DEPLOYMENT_POINTER` with `DEPLOYMENT_BUCKET`) reads it, then
//! verifies and deploys the artifact it names exactly as it would a key given directly, with
//! the pointer's `sha256` as the expected digest: a pointer naming a missing artifact, or an
//! artifact whose bytes do not hash to that digest, fails the deployment and the serving
//! release stays.
//!
//! [`read`] is also the poll primitive: it sends `If-None-Match: <last ETag>`, so an idle poll
//! is one conditional GET answered `304 Not Modified` with no body, and nothing else.
//!
//! ## Where a pointer ranks among the sources
//!
//! A pointer is another way of *naming* the artifact, so it takes the rank of the place it is
//! configured in (see `deploy::source`): `DEPLOYMENT_POINTER` ranks with `DEPLOYMENT_KEY`
//! (the per-instance environment file beats the config baked into the image), and
//! `[source] pointer_key` ranks with `[source] key`. An explicit request (trigger file,
//! `deploy --bucket/--key`) still beats both, so an operator can always deploy one exact
//! artifact by hand. Naming both an exact key and a pointer in the same place is refused as a
//! configuration error instead of silently preferring one: the two mean "stay on this build"
//! and "follow CI", and only the operator knows which was meant.

//! ## Signed pointers (format 2)
//!
//! `deployd publish --sign --pointer` writes a pointer whose meaning is signed with the same
//! minisign key as the artifact. The document keeps the four readable fields above (so that
//! agents that predate signing keep working) and adds the signed statement, as the exact
//! JSON text that was signed, and its signature:
//!
//! ```json
//! {"format": 2,
//!  "key": "web/prod/622d2103-20261105-101500/web-deployment.tar.gz", "sha256": "9f86d0…",
//!  "commit": "622d2103deadbeef…", "published_at": "2026-11-05T10:15:00Z",
//!  "statement": "{\"format\":2,\"app\":\"web\",\"environment\":\"prod\",\"pointer\":\"web/prod/current.json\",\"key\":\"web/prod/…\",\"sha256\":\"9f86d0…\",\"commit\":\"622d…\",\"sequence\":1793873700123,\"published_at\":\"2026-11-05T10:15:00Z\"}",
//!  "minisig": "untrusted comment: …\nRUT…\ntrusted comment: …\n…\n"}
//! ```
//!
//! The statement ([`Statement`]) binds the artifact's key, SHA-256, commit and release
//! sequence to the app, the environment and the pointer's own key, and says when it was
//! signed (`published_at`) and, optionally, until when it holds (`expires_at`). The signature
//! is minisign's (pre-hashed) over the statement's bytes, checkable by hand with `jq -j
//! .statement current.json > s && jq -j .minisig current.json > s.minisig && minisign -V -P
//! RWQ... -m s`. Signing the statement's exact bytes (rather than a re-serialisation of the
//! document) means no canonical JSON is needed. The readable copies must equal the
//! statement's `key` and `sha256`, else the pointer is malformed.
//!
//! With `[source] public_key`, an agent accepts only format-2 pointers signed by a trusted key
//! and uses only the statement; see `deploy::trust` for what it checks. Format evolution:
//! fields may be added to the statement without changing `format` (an agent ignores fields it
//! does not know, so an addition must be safe to ignore); a change older agents must not
//! misread raises `format`, and an agent refuses a format above [`SIGNED_FORMAT`].

use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;

use crate::contract::keys::is_sha256_hex;
use crate::contract::signature::{BytesRefused, SignError, SigningKey, TrustedKeys};
use crate::contract::wave::Rollout;
use crate::error::exit_codes;
use crate::s3::{self, S3Failure, S3Object, SmallBody, read_small_body};

/// A pointer object is a few hundred bytes; anything much larger is not one.
pub const MAX_POINTER_BYTES: usize = 64 * 1024;

/// The name `publish --pointer` gives the pointer object inside `{app}/{environment}/`.
pub const POINTER_NAME: &str = "current.json";

/// The format of a signed pointer, and the newest this deployd reads.
pub const SIGNED_FORMAT: u32 = 2;

/// A pointer as read: its readable fields, and for a signed one the statement still to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    /// The artifact's key, in the pointer's own bucket.
    pub key: String,
    /// Lower-case hex SHA-256 of the artifact.
    pub sha256: String,
    /// The commit the artifact was built from.
    pub commit: String,
    /// RFC 3339, when `publish` wrote the pointer.
    pub published_at: String,
    /// The wave: percent, previous release, the release it reverts (see `contract::wave`).
    pub rollout: Rollout,
    /// A format-2 pointer's signed part, not yet verified.
    pub signed: Option<SignedPart>,
}

/// The signed part of a format-2 pointer, as found (unverified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPart {
    /// The statement's exact JSON text, as signed.
    pub statement: String,
    /// The minisign signature over it.
    pub minisig: String,
}

/// What a signed pointer says: its meaning, bound to where it lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Statement {
    /// [`SIGNED_FORMAT`].
    pub format: u32,
    /// `--app`.
    pub app: String,
    /// `--environment`.
    pub environment: String,
    /// The pointer's own key: a copy of it anywhere else is refused.
    pub pointer: String,
    /// The artifact's key, in the pointer's bucket.
    pub key: String,
    /// Lower-case hex SHA-256 of the artifact.
    pub sha256: String,
    /// The full commit id.
    pub commit: String,
    /// The artifact's release sequence (the `seq` its signature carries).
    pub sequence: u64,
    /// RFC 3339, when this statement was signed.
    pub published_at: String,
    /// RFC 3339, after which the statement no longer holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The wave (absent fields: 100%, no previous release).
    #[serde(flatten)]
    pub rollout: Rollout,
}

/// The document on the wire: both formats.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Wire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    format: Option<u32>,
    key: String,
    sha256: String,
    #[serde(default)]
    commit: String,
    #[serde(default)]
    published_at: String,
    #[serde(flatten)]
    rollout: Rollout,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    statement: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    minisig: Option<String>,
}

/// The result of reading a pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
// One value per poll, matched at once: boxing the pointer would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum PointerRead {
    /// The pointer's ETag is still `last_etag` (S3 answered 304).
    Unchanged,
    /// The pointer is new or changed.
    Changed {
        /// The pointer variable or key.
        pointer: Pointer,
        /// Its ETag.
        etag: String,
    },
}

/// A release pointer could not be read or is not one.
#[derive(Debug, thiserror::Error)]
pub enum PointerError {
    /// The pointer does not exist.
    #[error(
        "release pointer {0} does not exist; publish with `deployd publish --pointer` or fix DEPLOYMENT_POINTER / [source] pointer_key"
    )]
    NotFound(S3Object),
    /// 403.
    #[error(
        "access to release pointer {0} was denied; the instance's credentials need s3:GetObject on it"
    )]
    AccessDenied(S3Object),
    /// The pointer is not a pointer document.
    #[error("release pointer {object} is not valid: {reason}; republish it")]
    Malformed {
        /// The S3 object concerned.
        object: S3Object,
        /// Why, as one clause.
        reason: String,
    },
    /// S3 did not answer.
    #[error("S3 did not answer for release pointer {object}: {reason}")]
    Unavailable {
        /// The S3 object concerned.
        object: S3Object,
        /// Why, as one clause.
        reason: String,
    },
    /// Signatures are required and the pointer is not signed.
    #[error(
        "release pointer {0} is not signed, and [source] public_key requires signed pointers; publish with `deployd publish --sign --pointer`"
    )]
    Unsigned(S3Object),
    /// The pointer's signature is not from a trusted key, or does not match.
    #[error("release pointer {object} is refused: {reason}; nothing was deployed")]
    BadSignature {
        /// The S3 object concerned.
        object: S3Object,
        /// Why, as one clause.
        reason: String,
    },
}

exit_codes!(PointerError {
    NotFound(_) => NOINPUT,
    AccessDenied(_) => CONFIG,
    Malformed { .. } | Unsigned(_) | BadSignature { .. } => DATAERR,
    Unavailable { .. } => UNAVAILABLE,
});

impl Pointer {
    /// An unsigned (format 1) pointer.
    pub fn unsigned(key: String, sha256: String, commit: String, published_at: String) -> Self {
        Pointer {
            key,
            sha256,
            commit,
            published_at,
            rollout: Rollout::default(),
            signed: None,
        }
    }

    /// Parses and checks a pointer document of either format; a signed one's statement must
    /// parse and agree with the readable fields (its signature is checked by [`verify`]).
    pub fn parse(bytes: &[u8]) -> Result<Pointer, String> {
        let wire: Wire =
            serde_json::from_slice(bytes).map_err(|e| format!("it is not pointer JSON ({e})"))?;
        check_key_and_sha(&wire.key, &wire.sha256)?;
        wire.rollout.check()?;
        let signed = match (wire.statement, wire.minisig) {
            (None, None) => None,
            (Some(statement), Some(minisig)) => {
                let s = Statement::parse(&statement)?;
                if s.key != wire.key || !s.sha256.eq_ignore_ascii_case(&wire.sha256) {
                    return Err(
                        "its readable key and sha256 differ from its signed statement".into(),
                    );
                }
                if s.rollout != wire.rollout {
                    return Err(
                        "its readable percent and previous release differ from its signed statement"
                            .into(),
                    );
                }
                Some(SignedPart { statement, minisig })
            }
            _ => return Err("it has a statement without a signature, or the reverse".into()),
        };
        if let Some(format) = wire.format
            && format > SIGNED_FORMAT
        {
            return Err(format!(
                "its format {format} is newer than this deployd reads ({SIGNED_FORMAT}); upgrade deployd"
            ));
        }
        Ok(Pointer {
            key: wire.key,
            sha256: wire.sha256.to_ascii_lowercase(),
            commit: wire.commit,
            published_at: wire.published_at,
            rollout: wire.rollout,
            signed,
        })
    }

    /// The document as written to S3: one JSON object and a newline.
    pub fn to_json(&self) -> String {
        let wire = Wire {
            format: self.signed.as_ref().map(|_| SIGNED_FORMAT),
            key: self.key.clone(),
            sha256: self.sha256.clone(),
            commit: self.commit.clone(),
            published_at: self.published_at.clone(),
            rollout: self.rollout.clone(),
            statement: self.signed.as_ref().map(|s| s.statement.clone()),
            minisig: self.signed.as_ref().map(|s| s.minisig.clone()),
        };
        // Serialising strings and a number cannot fail.
        let mut s = serde_json::to_string_pretty(&wire).unwrap_or_default();
        s.push('\n');
        s
    }
}

fn check_key_and_sha(key: &str, sha256: &str) -> Result<(), String> {
    if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
        return Err(format!("its key {key:?} is not an object key"));
    }
    if !is_sha256_hex(sha256) {
        return Err(format!("its sha256 {sha256:?} is not a SHA-256 hex digest"));
    }
    Ok(())
}

fn parse_time(field: &str, value: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(value)
        .map_err(|e| format!("its {field} {value:?} is not an RFC 3339 time ({e})"))
}

impl Statement {
    /// Parses and checks a statement's JSON text (not its signature).
    pub fn parse(text: &str) -> Result<Statement, String> {
        let mut s: Statement = serde_json::from_str(text)
            .map_err(|e| format!("its signed statement is not valid ({e})"))?;
        if s.format != SIGNED_FORMAT {
            return Err(format!(
                "its signed statement has format {}, not {SIGNED_FORMAT}",
                s.format
            ));
        }
        check_key_and_sha(&s.key, &s.sha256)?;
        s.rollout.check()?;
        s.sha256.make_ascii_lowercase();
        parse_time("published_at", &s.published_at)?;
        if let Some(at) = &s.expires_at {
            parse_time("expires_at", at)?;
        }
        Ok(s)
    }

    /// When the statement stops holding: its `expires_at`, or `published_at` plus `max_age`
    /// (zero: no limit), whichever comes first.
    pub fn expiry(&self, max_age: Duration) -> Option<SystemTime> {
        let signed_limit = self
            .expires_at
            .as_deref()
            .and_then(|at| parse_time("expires_at", at).ok());
        let age_limit = (!max_age.is_zero())
            .then(|| parse_time("published_at", &self.published_at).ok())
            .flatten()
            .map(|t| t + max_age);
        match (signed_limit, age_limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Signs the statement with `key` and returns the format-2 document.
    pub fn sign(&self, key: &SigningKey) -> Result<Pointer, SignError> {
        // Serialising strings and numbers cannot fail.
        let statement = serde_json::to_string(self).unwrap_or_default();
        let comment = format!(
            "timestamp:{}\tfile:{POINTER_NAME}\tpointer:{}\tseq:{}",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            self.pointer,
            self.sequence
        );
        let minisig = key.sign(statement.as_bytes(), &comment, POINTER_NAME)?;
        Ok(Pointer {
            key: self.key.clone(),
            sha256: self.sha256.clone(),
            commit: self.commit.clone(),
            published_at: self.published_at.clone(),
            rollout: self.rollout.clone(),
            signed: Some(SignedPart { statement, minisig }),
        })
    }
}

/// Checks a pointer's signature with the trusted keys and returns its statement: an unsigned
/// pointer, one signed by another key, or one whose statement does not match its signature
/// is refused.
pub fn verify(
    object: &S3Object,
    pointer: &Pointer,
    keys: &TrustedKeys,
) -> Result<Statement, PointerError> {
    let signed = pointer
        .signed
        .as_ref()
        .ok_or_else(|| PointerError::Unsigned(object.clone()))?;
    let refused = |reason: String| PointerError::BadSignature {
        object: object.clone(),
        reason,
    };
    keys.verify_bytes(signed.statement.as_bytes(), &signed.minisig)
        .map_err(|e| {
            refused(match e {
                BytesRefused::NotASignature(why) => {
                    format!("its signature is not a minisign signature ({why})")
                }
                BytesRefused::WrongKey => {
                    "it was signed with a key that [source] public_key does not trust".into()
                }
                BytesRefused::Invalid => {
                    "its statement does not match its signature (it was altered after signing)"
                        .into()
                }
            })
        })?;
    Statement::parse(&signed.statement).map_err(|reason| PointerError::Malformed {
        object: object.clone(),
        reason,
    })
}

/// The pointer key `publish --pointer` writes for an app and environment.
pub fn pointer_key(app: &str, environment: &str) -> String {
    format!("{app}/{environment}/{POINTER_NAME}")
}

/// Reads the pointer `object`; with `last_etag`, a pointer that has not changed costs one
/// conditional GET answered 304 and yields [`PointerRead::Unchanged`].
pub async fn read(
    s3: &Client,
    object: &S3Object,
    last_etag: Option<&str>,
) -> Result<PointerRead, PointerError> {
    let mut req = s3.get_object().bucket(&object.bucket).key(&object.key);
    if let Some(etag) = last_etag.filter(|e| !e.is_empty()) {
        req = req.if_none_match(etag);
    }
    let unavailable = |reason: String| PointerError::Unavailable {
        object: object.clone(),
        reason,
    };
    let resp = match req.send().await {
        Ok(resp) => resp,
        Err(e) => {
            return match s3::classify(&e) {
                S3Failure::NotModified => Ok(PointerRead::Unchanged),
                S3Failure::NotFound | S3Failure::NoSuchBucket => {
                    Err(PointerError::NotFound(object.clone()))
                }
                S3Failure::Denied => Err(PointerError::AccessDenied(object.clone())),
                other => Err(unavailable(other.to_string())),
            };
        }
    };
    let malformed = |reason: String| PointerError::Malformed {
        object: object.clone(),
        reason,
    };
    let body = read_small_body(resp, MAX_POINTER_BYTES)
        .await
        .map_err(|e| match e {
            SmallBody::TooLarge => malformed(format!(
                "it is more than a pointer's {MAX_POINTER_BYTES} bytes"
            )),
            SmallBody::Failed(reason) => unavailable(reason),
        })?;
    let pointer = Pointer::parse(&body.bytes).map_err(malformed)?;
    tracing::debug!(pointer = %object, etag = %body.etag, artifact = %pointer.key, sha256 = %pointer.sha256, "read release pointer");
    Ok(PointerRead::Changed {
        pointer,
        etag: body.etag,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let sha = "AB".repeat(32);
        let p = Pointer::parse(
            format!(r#"{{"key":"a/b/c.tar.gz","sha256":"{sha}","commit":"x","extra":1}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(p.sha256, "ab".repeat(32));
        assert_eq!(p.published_at, "");
        assert_eq!(p.signed, None);
        let back = Pointer::parse(p.to_json().as_bytes()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn rejects_bad_pointers() {
        let sha = "0".repeat(64);
        for bad in [
            "not json".to_string(),
            format!(r#"{{"key":"","sha256":"{sha}"}}"#),
            format!(r#"{{"key":"/abs","sha256":"{sha}"}}"#),
            r#"{"key":"a/b","sha256":"1234"}"#.to_string(),
            r#"{"sha256":"1234"}"#.to_string(),
            format!(r#"{{"key":"a/b","sha256":"{sha}","statement":"{{}}"}}"#),
            format!(r#"{{"format":3,"key":"a/b","sha256":"{sha}"}}"#),
        ] {
            assert!(Pointer::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    /// A prod statement for web, sequence 7, signed 2026-11-05T10:15:00Z.
    pub(crate) fn statement() -> Statement {
        Statement {
            format: SIGNED_FORMAT,
            app: "web".into(),
            environment: "prod".into(),
            pointer: "web/prod/current.json".into(),
            key: "web/prod/x/web-deployment.tar.gz".into(),
            sha256: "ab".repeat(32),
            commit: "c".repeat(40),
            sequence: 7,
            published_at: "2026-11-05T10:15:00Z".into(),
            expires_at: None,
            rollout: Rollout::default(),
        }
    }

    fn signer() -> (SigningKey, TrustedKeys, tempfile::TempDir) {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.sec");
        std::fs::write(&path, kp.sk.to_box(None).unwrap().to_string()).unwrap();
        let key = SigningKey::load(&path, None).unwrap();
        let trusted = crate::contract::signature::PublicKeys::One(kp.pk.to_base64())
            .trusted()
            .unwrap();
        (key, trusted, dir)
    }

    #[test]
    fn signed_pointers_verify_and_tampering_is_caught() {
        let (key, trusted, _dir) = signer();
        let object = S3Object::new("b", "web/prod/current.json");
        let doc = statement().sign(&key).unwrap();
        let read = Pointer::parse(doc.to_json().as_bytes()).unwrap();
        assert_eq!(read, doc);
        assert_eq!(verify(&object, &read, &trusted).unwrap(), statement());

        // The statement altered (and the readable copy with it): the signature no longer holds.
        let mut forged = read.clone();
        let part = forged.signed.as_mut().unwrap();
        part.statement = part.statement.replace("\"sequence\":7", "\"sequence\":9");
        let err = verify(&object, &forged, &trusted).unwrap_err();
        assert!(err.to_string().contains("altered"), "{err}");

        // Another key's signature, and no signature at all.
        let (other, _, _d) = signer();
        let err = verify(&object, &statement().sign(&other).unwrap(), &trusted).unwrap_err();
        assert!(err.to_string().contains("does not trust"), "{err}");
        let unsigned = Pointer::unsigned(read.key, read.sha256, read.commit, read.published_at);
        assert!(matches!(
            verify(&object, &unsigned, &trusted),
            Err(PointerError::Unsigned(_))
        ));
    }

    #[test]
    fn readable_copies_must_agree_with_the_statement() {
        let (key, _, _dir) = signer();
        let mut doc = statement().sign(&key).unwrap();
        doc.key = "web/prod/evil/web-deployment.tar.gz".into();
        let err = Pointer::parse(doc.to_json().as_bytes()).unwrap_err();
        assert!(err.contains("differ"), "{err}");
    }

    #[test]
    fn waves_are_signed_and_old_pointers_read_as_full() {
        let (key, trusted, _dir) = signer();
        let object = S3Object::new("b", "web/prod/current.json");
        let mut s = statement();
        s.rollout = Rollout {
            percent: 30,
            previous: Some(crate::contract::wave::Previous {
                key: "web/prod/old/web-deployment.tar.gz".into(),
                sha256: "cd".repeat(32),
                commit: "d".repeat(40),
                sequence: 3,
            }),
            reverts: None,
        };
        let doc = s.sign(&key).unwrap();
        let text = doc.to_json();
        assert!(text.contains("\"percent\": 30"), "{text}");
        let read = Pointer::parse(text.as_bytes()).unwrap();
        assert_eq!(verify(&object, &read, &trusted).unwrap(), s);
        // The readable copy cannot claim another wave than the signed one.
        let mut forged = read.clone();
        forged.rollout.percent = 100;
        let err = Pointer::parse(forged.to_json().as_bytes()).unwrap_err();
        assert!(err.contains("percent"), "{err}");
        // A pointer without the fields (written before waves) is a 100% pointer.
        let old = statement().sign(&key).unwrap();
        assert!(!old.to_json().contains("percent"));
        let back = Pointer::parse(old.to_json().as_bytes()).unwrap();
        assert_eq!(back.rollout, Rollout::default());
    }

    #[test]
    fn expiry_is_the_earlier_of_the_signed_limit_and_the_age() {
        let mut s = statement();
        let published = humantime::parse_rfc3339("2026-11-05T10:15:00Z").unwrap();
        assert_eq!(s.expiry(Duration::ZERO), None);
        let day = Duration::from_secs(86_400);
        assert_eq!(s.expiry(day), Some(published + day));
        s.expires_at = Some("2026-11-05T12:15:00Z".into());
        assert_eq!(s.expiry(day), Some(published + Duration::from_secs(7200)));
        assert_eq!(
            s.expiry(Duration::from_secs(60)),
            Some(published + Duration::from_secs(60))
        );
    }
}
