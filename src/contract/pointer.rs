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

use aws_sdk_s3::Client;

use crate::contract::keys::is_sha256_hex;
use crate::error::exit_codes;
use crate::s3::{self, S3Failure, S3Object, SmallBody, read_small_body};

/// A pointer object is a few hundred bytes; anything much larger is not one.
pub const MAX_POINTER_BYTES: usize = 64 * 1024;

/// The name `publish --pointer` gives the pointer object inside `{app}/{environment}/`.
pub const POINTER_NAME: &str = "current.json";

/// The contents of a pointer object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pointer {
    /// The artifact's key, in the pointer's own bucket.
    pub key: String,
    /// Lower-case hex SHA-256 of the artifact.
    pub sha256: String,
    /// The commit the artifact was built from.
    #[serde(default)]
    pub commit: String,
    /// RFC 3339, when `publish` wrote the pointer.
    #[serde(default)]
    pub published_at: String,
}

/// The result of reading a pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

exit_codes!(PointerError {
    NotFound(_) => NOINPUT,
    AccessDenied(_) => CONFIG,
    Malformed { .. } => DATAERR,
    Unavailable { .. } => UNAVAILABLE,
});

impl Pointer {
    /// Parses and checks a pointer document.
    pub fn parse(bytes: &[u8]) -> Result<Pointer, String> {
        let mut p: Pointer =
            serde_json::from_slice(bytes).map_err(|e| format!("it is not pointer JSON ({e})"))?;
        if p.key.is_empty() || p.key.starts_with('/') || p.key.ends_with('/') {
            return Err(format!("its key {:?} is not an object key", p.key));
        }
        if !is_sha256_hex(&p.sha256) {
            return Err(format!(
                "its sha256 {:?} is not a SHA-256 hex digest",
                p.sha256
            ));
        }
        p.sha256.make_ascii_lowercase();
        Ok(p)
    }

    /// The pointer as written to S3: one JSON object and a newline.
    pub fn to_json(&self) -> String {
        // Serialising four strings cannot fail.
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
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
mod tests {
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
        ] {
            assert!(Pointer::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
