//! Resolve: which artifact to deploy.
//!
//! The first source that names both a bucket and a key wins, in this order, and the log says
//! which one it was:
//!
//! 1. an explicit request: a trigger file or `deploy --bucket/--key`;
//! 2. `DEPLOYMENT_BUCKET` and `DEPLOYMENT_KEY`, from the environment file (re-read now), then
//!    the process environment;
//! 3. `[source] bucket` / `key` in the config;
//! 4. the legacy path: `[source] legacy_bucket` / `legacy_key` templates. Placeholders such as
//!    `{pr_number}` come from the environment file (`PR_NUMBER`); `{account_id}`, `{region}`,
//!    `{instance_id}` and `{availability_zone}` from the environment file if set there, else
//!    IMDSv2; `{tag:NAME}` from this instance's EC2 tag NAME (one `DescribeTags` call per
//!    deployment). Using it logs a warning: it is the mutable path that caused fleets to run two
//!    versions. A placeholder that cannot be filled is an error, never a literal `{x}` in a key.
//!
//! `DEPLOYMENT_SHA256` is only trusted for the key it travels with (source 2).
//!
//! An explicit request (source 1) may only name a bucket this host is configured to deploy
//! from: `DEPLOYMENT_BUCKET`, `[source] bucket`, the filled legacy bucket when that is the
//! configured source, or one of `[source] allowed_buckets` ([`check_request`]); anything else
//! is refused (exit 65) before S3 is asked. With `[source] public_key` the artifact it names
//! is then verified like any other, high-water mark included.
//!
//! A release pointer (see [`crate::contract::pointer`]) names the artifact indirectly and ranks with the
//! place it is configured in: `DEPLOYMENT_POINTER` (with `DEPLOYMENT_BUCKET`) in source 2,
//! `[source] pointer_key` (with `[source] bucket`) in source 3. The resolved [`Artifact`] then
//! carries the pointer's key and an origin for which [`Origin::is_pointer`] is true; the
//! deployment reads the pointer and replaces the key with the artifact it names. An exact key
//! and a pointer named in the same place is a configuration error.

use std::fmt;

use crate::config::Config;
use crate::config::envfile::EnvFile;
use crate::contract::keys::is_sha256_hex;
use crate::error::exit_codes;
use crate::instance::Instance;
use crate::instance::imds::ImdsError;
use crate::s3::S3Object;

/// Which source named the artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// A trigger file or `deploy --bucket/--key`.
    Request,
    /// `DEPLOYMENT_BUCKET` and `DEPLOYMENT_KEY`.
    Environment,
    /// `[source] bucket` and `key`.
    Config,
    /// The legacy templates.
    Legacy,
    /// `DEPLOYMENT_BUCKET` and `DEPLOYMENT_POINTER`.
    EnvironmentPointer,
    /// `[source] bucket` and `pointer_key`.
    ConfigPointer,
}

impl Origin {
    /// True when the artifact's key is a release pointer that still has to be read.
    pub fn is_pointer(self) -> bool {
        matches!(self, Origin::EnvironmentPointer | Origin::ConfigPointer)
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Request => "explicit request",
            Origin::Environment => "DEPLOYMENT_BUCKET/DEPLOYMENT_KEY",
            Origin::Config => "[source] bucket/key",
            Origin::Legacy => "legacy template",
            Origin::EnvironmentPointer => "DEPLOYMENT_BUCKET/DEPLOYMENT_POINTER",
            Origin::ConfigPointer => "[source] bucket/pointer_key",
        })
    }
}

/// An artifact location, with the checksum that came with it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Where it is.
    pub object: S3Object,
    /// Which source named it.
    pub origin: Origin,
    /// Lower-case hex SHA-256 from `DEPLOYMENT_SHA256` or a release pointer.
    pub expected_sha256: Option<String>,
}

impl Artifact {
    /// An artifact named by `origin`, with no expected digest.
    pub fn new(object: S3Object, origin: Origin) -> Artifact {
        Artifact {
            object,
            origin,
            expected_sha256: None,
        }
    }
}

impl fmt::Display for Artifact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.object.fmt(f)
    }
}

/// No usable artifact source (exit 78, or 64 for a bad argument).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// One of a pair of variables is set without the other.
    #[error(
        "{set} is set but {missing} is not (in {env_file} or the process environment): set both or neither"
    )]
    HalfSet {
        /// The variable that is set.
        set: &'static str,
        /// The variable that is not.
        missing: &'static str,
        /// The environment file.
        env_file: String,
    },
    /// A legacy template placeholder cannot be filled.
    #[error("cannot fill {placeholder} in [source] {field} = {template:?}: {reason}")]
    Placeholder {
        /// The template field.
        field: &'static str,
        /// The template.
        template: String,
        /// The placeholder.
        placeholder: String,
        /// Why, as one clause.
        reason: String,
    },
    /// An exact key and a pointer are named in the same place.
    #[error(
        "both {key} and {pointer} are set (in {place}): set {key} to stay on one artifact or {pointer} to follow the release pointer, not both"
    )]
    KeyAndPointer {
        /// The key variable or setting.
        key: &'static str,
        /// The pointer variable or key.
        pointer: &'static str,
        /// Where both are set.
        place: String,
    },
    /// `DEPLOYMENT_SHA256` beside `DEPLOYMENT_POINTER`.
    #[error(
        "DEPLOYMENT_SHA256 is set together with DEPLOYMENT_POINTER (in {env_file}); the pointer carries its own sha256, so remove DEPLOYMENT_SHA256"
    )]
    ShaWithPointer {
        /// The environment file.
        env_file: String,
    },
    /// `DEPLOYMENT_SHA256` is not a SHA-256.
    #[error("DEPLOYMENT_SHA256 {0:?} is not a SHA-256 hex digest (64 hex characters)")]
    BadSha(String),
    /// A key was given without any bucket to look it up in.
    #[error("a key needs a bucket: pass --bucket, or set DEPLOYMENT_BUCKET or [source] bucket")]
    NoBucket,
    /// An explicit request names a bucket this host does not deploy from.
    #[error(
        "{object} is outside the buckets this host deploys from ({allowed}); add its bucket to [source] allowed_buckets to allow it"
    )]
    NotAllowed {
        /// The requested artifact.
        object: S3Object,
        /// The buckets allowed, comma-separated.
        allowed: String,
    },
}

exit_codes!(SourceError {
    NoBucket => USAGE,
    NotAllowed { .. } => DATAERR,
    _ => CONFIG,
});

/// Refuses an explicit request (trigger file, `--bucket/--key`) for a bucket this host is not
/// configured to deploy from.
pub async fn check_request(
    cfg: &Config,
    env: &EnvFile,
    object: &S3Object,
    instance: &Instance,
) -> Result<(), SourceError> {
    let mut allowed: Vec<String> = cfg.source.allowed_buckets.clone();
    allowed.extend(lookup(env, "DEPLOYMENT_BUCKET"));
    if !cfg.source.bucket.is_empty() {
        allowed.push(cfg.source.bucket.clone());
    }
    if allowed.contains(&object.bucket) {
        return Ok(());
    }
    if lookup(env, "DEPLOYMENT_BUCKET").is_none() && cfg.source.bucket.is_empty() {
        // The legacy template is the configured source: its bucket, if it can be filled.
        match fill("legacy_bucket", &cfg.source.legacy_bucket, env, instance).await {
            Ok(bucket) if bucket == object.bucket => return Ok(()),
            Ok(bucket) => allowed.push(bucket),
            Err(error) => tracing::debug!(%error, "the legacy bucket cannot be filled"),
        }
    }
    Err(SourceError::NotAllowed {
        object: object.clone(),
        allowed: if allowed.is_empty() {
            "none is configured".into()
        } else {
            allowed.join(", ")
        },
    })
}

/// The bucket an explicit key without a bucket (`deployd trigger --key K`) is looked up in:
/// `DEPLOYMENT_BUCKET`, else `[source] bucket`.
pub fn default_bucket(cfg: &Config, env: &EnvFile) -> Result<String, SourceError> {
    lookup(env, "DEPLOYMENT_BUCKET")
        .or_else(|| (!cfg.source.bucket.is_empty()).then(|| cfg.source.bucket.clone()))
        .ok_or(SourceError::NoBucket)
}

/// Looks a variable up in the environment file, then the process environment.
fn lookup(env: &EnvFile, name: &str) -> Option<String> {
    env.get(name)
        .map(str::to_string)
        .or_else(|| std::env::var(name).ok().filter(|v| !v.is_empty()))
}

/// Picks the artifact to deploy; `request` is an explicit bucket and key (trigger or CLI).
pub async fn resolve(
    cfg: &Config,
    env: &EnvFile,
    request: Option<S3Object>,
    instance: &Instance,
) -> Result<Artifact, SourceError> {
    if let Some(object) = request {
        check_request(cfg, env, &object, instance).await?;
        return Ok(Artifact::new(object, Origin::Request));
    }
    let env_file = env.path.display().to_string();
    let pointer = lookup(env, "DEPLOYMENT_POINTER");
    match (
        lookup(env, "DEPLOYMENT_BUCKET"),
        lookup(env, "DEPLOYMENT_KEY"),
        pointer,
    ) {
        (_, Some(_), Some(_)) => {
            return Err(SourceError::KeyAndPointer {
                key: "DEPLOYMENT_KEY",
                pointer: "DEPLOYMENT_POINTER",
                place: format!("{env_file} or the process environment"),
            });
        }
        (Some(bucket), None, Some(key)) => {
            if lookup(env, "DEPLOYMENT_SHA256").is_some() {
                return Err(SourceError::ShaWithPointer { env_file });
            }
            return Ok(Artifact::new(
                S3Object::new(bucket, key),
                Origin::EnvironmentPointer,
            ));
        }
        (None, None, Some(_)) => {
            return Err(SourceError::HalfSet {
                set: "DEPLOYMENT_POINTER",
                missing: "DEPLOYMENT_BUCKET",
                env_file,
            });
        }
        (Some(bucket), Some(key), None) => {
            let expected_sha256 = match lookup(env, "DEPLOYMENT_SHA256") {
                Some(s) if is_sha256_hex(&s) => Some(s.to_ascii_lowercase()),
                Some(s) => return Err(SourceError::BadSha(s)),
                None => None,
            };
            return Ok(Artifact {
                object: S3Object::new(bucket, key),
                origin: Origin::Environment,
                expected_sha256,
            });
        }
        (Some(_), None, None) => {
            return Err(SourceError::HalfSet {
                set: "DEPLOYMENT_BUCKET",
                missing: "DEPLOYMENT_KEY",
                env_file,
            });
        }
        (None, Some(_), None) => {
            return Err(SourceError::HalfSet {
                set: "DEPLOYMENT_KEY",
                missing: "DEPLOYMENT_BUCKET",
                env_file,
            });
        }
        (None, None, None) => {}
    }
    let pointer_key = cfg.source.pointer_key.as_deref().filter(|k| !k.is_empty());
    if !cfg.source.bucket.is_empty()
        && let Some(key) = pointer_key
    {
        if !cfg.source.key.is_empty() {
            return Err(SourceError::KeyAndPointer {
                key: "[source] key",
                pointer: "[source] pointer_key",
                place: "the config file".into(),
            });
        }
        return Ok(Artifact::new(
            S3Object::new(cfg.source.bucket.clone(), key.to_string()),
            Origin::ConfigPointer,
        ));
    }
    if !cfg.source.bucket.is_empty() {
        return Ok(Artifact::new(
            S3Object::new(cfg.source.bucket.clone(), cfg.source.key.clone()),
            Origin::Config,
        ));
    }
    let bucket = fill("legacy_bucket", &cfg.source.legacy_bucket, env, instance).await?;
    let key = fill("legacy_key", &cfg.source.legacy_key, env, instance).await?;
    Ok(Artifact::new(S3Object::new(bucket, key), Origin::Legacy))
}

/// Fills `{name}` placeholders in a legacy template.
pub async fn fill(
    field: &'static str,
    template: &str,
    env: &EnvFile,
    instance: &Instance,
) -> Result<String, SourceError> {
    let err = |placeholder: &str, reason: String| SourceError::Placeholder {
        field,
        template: template.to_string(),
        placeholder: format!("{{{placeholder}}}"),
        reason,
    };
    if template.is_empty() {
        return Err(err(
            "",
            "no artifact source is configured: set DEPLOYMENT_BUCKET and DEPLOYMENT_KEY, or [source] bucket and key".into(),
        ));
    }
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(err(after, "the `{` is never closed".into()));
        };
        let name = &after[..close];
        let upper = name.to_ascii_uppercase();
        let value = match env.get(&upper).or_else(|| env.get(name)) {
            Some(v) => v.to_string(),
            None => match name {
                "account_id" | "region" | "instance_id" | "availability_zone" => {
                    let id = instance.identity().await.map_err(|e| {
                        let hint = match e {
                            ImdsError::Disabled => String::new(),
                            _ => " (not on EC2?)".into(),
                        };
                        err(
                            name,
                            format!("{e}{hint}; set {upper} in {}", env.path.display()),
                        )
                    })?;
                    match name {
                        "account_id" => id.account_id.clone(),
                        "region" => id.region.clone(),
                        "instance_id" => id.instance_id.clone(),
                        _ => id.availability_zone.clone(),
                    }
                }
                _ if name.starts_with("tag:") => {
                    let tag = &name["tag:".len()..];
                    instance.tag(tag).await.map_err(|e| {
                        err(name, format!("{e} (EC2 instance tags, ec2:DescribeTags)"))
                    })?
                }
                _ => {
                    return Err(err(name, format!("set {upper} in {}", env.path.display())));
                }
            },
        };
        if value.contains('{') || value.contains('/') && field == "legacy_bucket" {
            return Err(err(name, format!("its value {value:?} is not usable here")));
        }
        out.push_str(&value);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ExitCode;
    use std::path::Path;

    fn env(text: &str) -> EnvFile {
        EnvFile::parse(text, Path::new("/etc/deployd/environment")).unwrap()
    }

    #[tokio::test]
    async fn placeholders_fill_from_the_environment_file() {
        let imds = Instance::new(&Default::default());
        let e = env("PR_NUMBER=51\nACCOUNT_ID=123456789012\n");
        let key = fill(
            "legacy_key",
            "express-api/pr-{pr_number}/x.tar.gz",
            &e,
            &imds,
        )
        .await
        .unwrap();
        assert_eq!(key, "express-api/pr-51/x.tar.gz");
        let b = fill("legacy_bucket", "artifacts-{account_id}", &e, &imds)
            .await
            .unwrap();
        assert_eq!(b, "artifacts-123456789012");
    }

    #[tokio::test]
    async fn unfillable_placeholder_names_the_variable() {
        let imds = Instance::new(&Default::default());
        let err = fill("legacy_key", "app/pr-{pr_number}/x", &env(""), &imds)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("{pr_number}") && msg.contains("PR_NUMBER"),
            "{msg}"
        );
        assert_eq!(err.exit_code(), 78);
    }
}
