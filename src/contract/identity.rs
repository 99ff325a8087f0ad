//! A signed release's identity: what `publish --sign` binds an artifact's bytes to, in the
//! trusted comment of `<key>.minisig`.
//!
//! minisign signs the trusted comment together with the signature (its "global signature"),
//! so the comment is as authentic as the bytes. deployd writes it as tab-separated
//! `name:value` fields, starting with the two minisign itself writes:
//!
//! ```text
//! timestamp:1793873700  file:web-deployment.tar.gz  deployd:1  app:web  env:prod
//! seq:1793873700123  commit:622d2103deadbeef…  key:web/prod/622d2103-20261105-101500/web-deployment.tar.gz
//! ```
//!
//! | field | meaning |
//! |---|---|
//! | `deployd` | the identity format, `1`; a comment without it has no identity |
//! | `app`, `env` | the `--app` and `--environment` it was published for |
//! | `seq` | the release sequence: publish time in Unix milliseconds, above any sequence the environment's pointer already had; it only grows, and republishing old bytes makes a new, higher one |
//! | `commit` | the full commit id |
//! | `key` | the S3 key it was published under: a copy under any other key is refused |
//!
//! The bytes themselves are bound by the signature; their SHA-256 is bound by the signed
//! release pointer ([`crate::contract::pointer`]). Fields are never repeated and values hold
//! no tab or control character; a comment that breaks either rule is not an identity.

use serde::{Deserialize, Serialize};

/// The identity format `publish` writes and the newest the agent reads.
pub const IDENTITY_FORMAT: u32 = 1;

/// What a release is: the fields of a deployd trusted comment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseIdentity {
    /// `--app`.
    pub app: String,
    /// `--environment`.
    pub environment: String,
    /// The S3 key the artifact was published under.
    pub key: String,
    /// The full commit id.
    pub commit: String,
    /// The release sequence (publish time in Unix milliseconds, or above).
    pub sequence: u64,
    /// Unix seconds, when it was signed.
    pub timestamp: u64,
}

/// A signed field differs from the expected value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The field: `app`, `environment`, `key`, `sequence`, `sha256`, `pointer`.
    pub field: &'static str,
    /// What was signed.
    pub signed: String,
    /// What was expected where the object was found.
    pub expected: String,
}

/// `Ok` when `signed` equals `expected`, else the [`Mismatch`] naming `field`.
pub fn same(field: &'static str, signed: &str, expected: &str) -> Result<(), Mismatch> {
    if signed == expected {
        Ok(())
    } else {
        Err(Mismatch {
            field,
            signed: signed.to_string(),
            expected: expected.to_string(),
        })
    }
}

impl ReleaseIdentity {
    /// `{app}/{environment}`: the scope a sequence counts in.
    pub fn scope(&self) -> String {
        format!("{}/{}", self.app, self.environment)
    }

    /// The trusted comment to sign.
    pub fn to_trusted_comment(&self) -> String {
        format!(
            "timestamp:{}\tfile:{}-deployment.tar.gz\tdeployd:{IDENTITY_FORMAT}\tapp:{}\tenv:{}\tseq:{}\tcommit:{}\tkey:{}",
            self.timestamp,
            self.app,
            self.app,
            self.environment,
            self.sequence,
            self.commit,
            self.key
        )
    }

    /// Reads an identity from a trusted comment; the error is one clause saying why it is
    /// not one.
    pub fn parse(comment: &str) -> Result<ReleaseIdentity, String> {
        let mut fields = std::collections::BTreeMap::new();
        for part in comment.split('\t') {
            let Some((name, value)) = part.split_once(':') else {
                return Err(format!("field {part:?} is not name:value"));
            };
            if value.chars().any(char::is_control) {
                return Err(format!("field {name} holds a control character"));
            }
            if fields.insert(name, value).is_some() {
                return Err(format!("field {name} appears twice"));
            }
        }
        let format = fields
            .get("deployd")
            .ok_or("it has no deployd field: it was signed without a release identity")?;
        if format.parse::<u32>().ok() != Some(IDENTITY_FORMAT) {
            return Err(format!(
                "its identity format {format:?} is not {IDENTITY_FORMAT}, the one this deployd reads"
            ));
        }
        let text = |name: &str| -> Result<String, String> {
            fields
                .get(name)
                .filter(|v| !v.is_empty())
                .map(|v| v.to_string())
                .ok_or_else(|| format!("it has no {name} field"))
        };
        let number = |name: &str| -> Result<u64, String> {
            text(name)?
                .parse()
                .map_err(|_| format!("its {name} field is not a number"))
        };
        Ok(ReleaseIdentity {
            app: text("app")?,
            environment: text("env")?,
            key: text("key")?,
            commit: text("commit")?,
            sequence: number("seq")?,
            timestamp: number("timestamp")?,
        })
    }

    /// Checks the identity against where the artifact was found: the same key and app.
    pub fn check_found(&self, key: &str, app: &str) -> Result<(), Mismatch> {
        same("key", &self.key, key)?;
        same("app", &self.app, app)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> ReleaseIdentity {
        ReleaseIdentity {
            app: "web".into(),
            environment: "prod".into(),
            key: "web/prod/622d2103-20261105-101500/web-deployment.tar.gz".into(),
            commit: "622d2103deadbeef622d2103deadbeef622d2103".into(),
            sequence: 1_793_873_700_123,
            timestamp: 1_793_873_700,
        }
    }

    #[test]
    fn round_trips_through_the_trusted_comment() {
        let id = identity();
        let comment = id.to_trusted_comment();
        assert!(comment.starts_with("timestamp:1793873700\tfile:web-deployment.tar.gz\t"));
        assert_eq!(ReleaseIdentity::parse(&comment).unwrap(), id);
        assert_eq!(id.scope(), "web/prod");
        assert!(id.check_found(&id.key, "web").is_ok());
        let m = id.check_found("web/prod/other.tar.gz", "web").unwrap_err();
        assert_eq!(m.field, "key");
        assert_eq!(id.check_found(&id.key, "api").unwrap_err().field, "app");
    }

    #[test]
    fn comments_that_are_not_identities() {
        let good = identity().to_trusted_comment();
        for (bad, why) in [
            (
                "timestamp:1\tfile:x\tcommit:abc\tkey:k".to_string(),
                "no deployd field",
            ),
            (good.replace("deployd:1", "deployd:2"), "format"),
            (format!("{good}\tkey:web/prod/x"), "twice"),
            (
                good.replace("seq:1793873700123", "seq:soon"),
                "not a number",
            ),
            (good.replace("\tenv:prod", ""), "no env field"),
            (good.replace("app:web", "app:"), "no app field"),
            (format!("{good}\tnote"), "name:value"),
        ] {
            let err = ReleaseIdentity::parse(&bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
