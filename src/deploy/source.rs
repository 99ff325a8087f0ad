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
//! A release pointer (see [`crate::contract::pointer`]) names the artifact indirectly and ranks with the
//! place it is configured in: `DEPLOYMENT_POINTER` (with `DEPLOYMENT_BUCKET`) in source 2,
//! `[source] pointer_key` (with `[source] bucket`) in source 3. The resolved [`Artifact`] then
//! carries the pointer's key and an origin for which [`Origin::is_pointer`] is true; the
//! deployment reads the pointer and replaces the key with the artifact it names. An exact key
//! and a pointer named in the same place is a configuration error.

use std::fmt;

use crate::config::Config;
use crate::config::envfile::EnvFile;
use crate::error::{ExitCode, exit};
use crate::instance::imds::{Imds, ImdsError};

/// Which source named the artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    Request,
    Environment,
    Config,
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
    pub bucket: String,
    pub key: String,
    pub origin: Origin,
    /// Lower-case hex SHA-256 from `DEPLOYMENT_SHA256`.
    pub expected_sha256: Option<String>,
}

impl fmt::Display for Artifact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "{set} is set but {missing} is not (in {env_file} or the process environment): set both or neither"
    )]
    HalfSet {
        set: &'static str,
        missing: &'static str,
        env_file: String,
    },
    #[error("cannot fill {placeholder} in [source] {field} = {template:?}: {reason}")]
    Placeholder {
        field: &'static str,
        template: String,
        placeholder: String,
        reason: String,
    },
    #[error(
        "both {key} and {pointer} are set (in {place}): set {key} to stay on one artifact or {pointer} to follow the release pointer, not both"
    )]
    KeyAndPointer {
        key: &'static str,
        pointer: &'static str,
        place: String,
    },
    #[error(
        "DEPLOYMENT_SHA256 is set together with DEPLOYMENT_POINTER (in {env_file}); the pointer carries its own sha256, so remove DEPLOYMENT_SHA256"
    )]
    ShaWithPointer { env_file: String },
    #[error("DEPLOYMENT_SHA256 {0:?} is not a SHA-256 hex digest (64 hex characters)")]
    BadSha(String),
    #[error("{0:?} is not an s3://bucket/key URL")]
    BadUrl(String),
}

impl ExitCode for SourceError {
    fn exit_code(&self) -> i32 {
        match self {
            SourceError::BadUrl(_) => exit::USAGE,
            _ => exit::CONFIG,
        }
    }
}

/// Parses `s3://bucket/key`.
pub fn parse_s3_url(url: &str) -> Result<(String, String), SourceError> {
    url.strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(b, k)| !b.is_empty() && !k.is_empty())
        .map(|(b, k)| (b.to_string(), k.to_string()))
        .ok_or_else(|| SourceError::BadUrl(url.to_string()))
}

/// True for a lower- or upper-case 64-character hex string.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
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
    request: Option<(String, String)>,
    imds: &Imds,
) -> Result<Artifact, SourceError> {
    if let Some((bucket, key)) = request {
        return Ok(Artifact {
            bucket,
            key,
            origin: Origin::Request,
            expected_sha256: None,
        });
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
            return Ok(Artifact {
                bucket,
                key,
                origin: Origin::EnvironmentPointer,
                expected_sha256: None,
            });
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
                bucket,
                key,
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
        return Ok(Artifact {
            bucket: cfg.source.bucket.clone(),
            key: key.to_string(),
            origin: Origin::ConfigPointer,
            expected_sha256: None,
        });
    }
    if !cfg.source.bucket.is_empty() {
        return Ok(Artifact {
            bucket: cfg.source.bucket.clone(),
            key: cfg.source.key.clone(),
            origin: Origin::Config,
            expected_sha256: None,
        });
    }
    let bucket = fill("legacy_bucket", &cfg.source.legacy_bucket, env, imds).await?;
    let key = fill("legacy_key", &cfg.source.legacy_key, env, imds).await?;
    Ok(Artifact {
        bucket,
        key,
        origin: Origin::Legacy,
        expected_sha256: None,
    })
}

/// Fills `{name}` placeholders in a legacy template.
pub async fn fill(
    field: &'static str,
    template: &str,
    env: &EnvFile,
    imds: &Imds,
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
                    let id = imds.identity().await.map_err(|e| {
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
                    imds.tag(tag).await.map_err(|e| {
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
    use std::path::Path;

    fn env(text: &str) -> EnvFile {
        EnvFile::parse(text, Path::new("/etc/deployd/environment")).unwrap()
    }

    #[tokio::test]
    async fn placeholders_fill_from_the_environment_file() {
        let imds = Imds::new();
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
        let imds = Imds::new();
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

    #[test]
    fn s3_urls() {
        assert_eq!(
            parse_s3_url("s3://b/k/x.tar.gz").unwrap(),
            ("b".to_string(), "k/x.tar.gz".to_string())
        );
        assert!(parse_s3_url("s3://b").is_err());
        assert!(parse_s3_url("https://b/k").is_err());
    }
}
