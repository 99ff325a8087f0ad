//! `deployd gc`: delete old published artifacts, per environment, by count and age.
//!
//! A *release* is one directory `publish` wrote, `{app}/{environment}/{commit8}-{YYYYmmdd-
//! HHMMSS}/`, holding the artifact and its `.minisig`; they are kept or deleted together. Per
//! environment, releases are ordered newest first (by their newest object's LastModified) and
//! a release is deleted only if all of these hold:
//!
//! - it is not among the newest `--keep N`;
//! - it is at least `--days D` old;
//! - no release pointer (`{app}/{environment}/current.json`, of any environment of the app,
//!   as its release or as the `previous` release of its wave)
//!   names an object in it: the artifact an environment is told to run, and its signature,
//!   are never deleted.
//!
//! Only directories whose name has the shape `publish` gives them are considered, so objects
//! that `publish` did not write (a legacy mutable key such as `{app}/pr-51/...tar.gz`, the
//! pointer itself) are never touched. An environment whose pointer exists but cannot be read
//! or parsed is skipped with an error rather than collected blind.
//!
//! Deletion uses `DeleteObjects`, 1,000 keys per call. `--dry-run` lists and totals what would
//! go and deletes nothing. On a versioned bucket a delete leaves a delete marker and the old
//! version; a lifecycle rule expiring noncurrent versions reclaims the space.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};

use crate::contract::keys::is_release_dir;
use crate::contract::pointer::{self, PointerError, PointerRead};
use crate::error::exit_codes;
use crate::s3::{self, S3Failure, S3Object};

/// Keys per `DeleteObjects` call (S3's maximum).
pub const DELETE_BATCH: usize = 1000;

/// What to collect: the arguments of `deployd gc`.
#[derive(Debug, Clone, clap::Args)]
pub struct GcRequest {
    /// The bucket CI publishes to.
    #[arg(long)]
    pub bucket: String,
    /// The app (the first key segment).
    #[arg(long)]
    pub app: String,
    /// Only this environment [default: every environment of the app].
    #[arg(long)]
    pub environment: Option<String>,
    /// Keep the newest N releases per environment.
    #[arg(long, default_value_t = 10)]
    pub keep: usize,
    /// Keep releases younger than D days.
    #[arg(long, default_value_t = 30)]
    pub days: u64,
    /// Print what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Now, which ages are measured from.
    #[arg(skip = SystemTime::now())]
    pub now: SystemTime,
}

/// One object deleted (or, with `--dry-run`, to be deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    pub environment: String,
    pub key: String,
    pub size: u64,
}

/// What `gc` did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    pub deleted: Vec<Deletion>,
    /// Release directories removed, as `{app}/{environment}/{dir}/`.
    pub releases_deleted: Vec<String>,
    pub releases_kept: usize,
    /// Keys named by pointers, hence protected.
    pub protected: Vec<String>,
    pub bytes: u64,
    /// Environments skipped because their pointer could not be read.
    pub skipped: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("{0}")]
    Usage(String),
    #[error("bucket {bucket} does not exist; check --bucket")]
    NoSuchBucket { bucket: String },
    #[error(
        "access to s3://{bucket}/{prefix} was denied; gc needs s3:ListBucket on the bucket and s3:GetObject and s3:DeleteObject on the prefix"
    )]
    AccessDenied { bucket: String, prefix: String },
    #[error("listing s3://{bucket}/{prefix} failed: {reason}")]
    List {
        bucket: String,
        prefix: String,
        reason: String,
    },
    #[error(
        "deleting from s3://{bucket} failed for {count} objects (first: {first}: {reason}); run gc again"
    )]
    Delete {
        bucket: String,
        count: usize,
        first: String,
        reason: String,
    },
    #[error("release pointer {0}; no environment was collected")]
    Pointer(#[from] PointerError),
}

exit_codes!(GcError {
    Usage(_) => USAGE,
    NoSuchBucket { .. } => NOINPUT,
    AccessDenied { .. } => CONFIG,
    List { .. } | Delete { .. } => UNAVAILABLE,
    Pointer(e) => e.exit_code(),
});

#[derive(Debug, Default)]
struct Release {
    objects: Vec<(String, u64)>,
    newest: i64,
}

/// Collects old releases; see the module documentation for the rules.
pub async fn gc(s3: &Client, req: &GcRequest) -> Result<GcReport, GcError> {
    let seg_ok = |s: &str| !s.is_empty() && !s.contains('/');
    if !seg_ok(&req.app) || req.environment.as_deref().is_some_and(|e| !seg_ok(e)) {
        return Err(GcError::Usage(
            "--app and --environment must be single key segments without '/'".into(),
        ));
    }
    let bucket = req.bucket.as_str();
    let prefix = match &req.environment {
        Some(env) => format!("{}/{env}/", req.app),
        None => format!("{}/", req.app),
    };

    // environment -> release dir -> objects
    let mut envs: BTreeMap<String, BTreeMap<String, Release>> = BTreeMap::new();
    let mut pointers: BTreeMap<String, String> = BTreeMap::new();
    let mut pages = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(&prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| list_error(&e, bucket, &prefix))?;
        for obj in page.contents() {
            let Some(key) = obj.key() else { continue };
            let rest = &key[req.app.len() + 1..];
            let mut segs = rest.splitn(3, '/');
            let (Some(env), Some(second)) = (segs.next(), segs.next()) else {
                continue;
            };
            match segs.next() {
                None if second == pointer::POINTER_NAME => {
                    pointers.insert(env.to_string(), key.to_string());
                }
                Some(inner) if !inner.is_empty() && is_release_dir(second) => {
                    let r = envs
                        .entry(env.to_string())
                        .or_default()
                        .entry(second.to_string())
                        .or_default();
                    r.objects
                        .push((key.to_string(), obj.size().unwrap_or(0).max(0) as u64));
                    r.newest = r.newest.max(
                        obj.last_modified()
                            .map_or(i64::MAX, |d| d.to_millis().unwrap_or(i64::MAX)),
                    );
                }
                _ => {}
            }
        }
    }

    let mut report = GcReport::default();
    // Every pointer of the app protects what it names, whichever environment it is in.
    let mut protected: HashSet<String> = HashSet::new();
    let mut unreadable: HashSet<String> = HashSet::new();
    let all_pointers: Vec<(String, String)> = if req.environment.is_some() {
        // Pointers of other environments may name this environment's artifacts too.
        list_pointers(s3, bucket, &req.app).await?
    } else {
        pointers.into_iter().collect()
    };
    for (env, pkey) in all_pointers {
        match pointer::read(s3, &S3Object::new(bucket, pkey.clone()), None).await {
            Ok(PointerRead::Changed { pointer, .. }) => {
                // The previous release of a wave is where the rest of the fleet stays.
                if let Some(previous) = pointer.rollout.previous {
                    protected.insert(crate::contract::signature::signature_key(&previous.key));
                    protected.insert(previous.key);
                }
                protected.insert(crate::contract::signature::signature_key(&pointer.key));
                protected.insert(pointer.key);
            }
            Ok(PointerRead::Unchanged) => {}
            Err(PointerError::NotFound(_)) => {}
            Err(e) => {
                tracing::error!(environment = %env, pointer = %pkey, error = %e, "cannot read the release pointer; skipping this environment");
                report.skipped.push((env.clone(), e.to_string()));
                unreadable.insert(env);
            }
        }
    }
    report.protected = protected.iter().cloned().collect();
    report.protected.sort();

    let min_age = Duration::from_secs(req.days.saturating_mul(86_400));
    let now = req
        .now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut doomed: Vec<Deletion> = Vec::new();
    for (env, releases) in envs {
        if unreadable.contains(&env) {
            report.releases_kept += releases.len();
            continue;
        }
        let mut list: Vec<(String, Release)> = releases.into_iter().collect();
        // Newest first; ties (same second) are broken by the build time in the name.
        list.sort_by(|a, b| {
            b.1.newest
                .cmp(&a.1.newest)
                .then_with(|| b.0[9..].cmp(&a.0[9..]))
        });
        for (rank, (dir, release)) in list.into_iter().enumerate() {
            let age_ms = now.saturating_sub(release.newest).max(0) as u128;
            let young = age_ms < min_age.as_millis();
            let named = release.objects.iter().any(|(k, _)| protected.contains(k));
            if rank < req.keep || young || named {
                report.releases_kept += 1;
                continue;
            }
            report
                .releases_deleted
                .push(format!("{}/{env}/{dir}/", req.app));
            for (key, size) in release.objects {
                report.bytes += size;
                doomed.push(Deletion {
                    environment: env.clone(),
                    key,
                    size,
                });
            }
        }
    }

    if !req.dry_run {
        let mut failed: Vec<(String, String)> = Vec::new();
        for batch in doomed.chunks(DELETE_BATCH) {
            let ids: Vec<ObjectIdentifier> = batch
                .iter()
                .filter_map(|d| ObjectIdentifier::builder().key(&d.key).build().ok())
                .collect();
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| GcError::Usage(format!("building a delete request: {e}")))?;
            match s3
                .delete_objects()
                .bucket(bucket)
                .delete(delete)
                .send()
                .await
            {
                Ok(out) => {
                    for err in out.errors() {
                        failed.push((
                            err.key().unwrap_or("?").to_string(),
                            err.message().or(err.code()).unwrap_or("error").to_string(),
                        ));
                    }
                }
                Err(e) => {
                    let reason = s3::classify(&e).to_string();
                    failed.extend(batch.iter().map(|d| (d.key.clone(), reason.clone())));
                }
            }
        }
        if let Some((first, reason)) = failed.first() {
            return Err(GcError::Delete {
                bucket: bucket.into(),
                count: failed.len(),
                first: first.clone(),
                reason: reason.clone(),
            });
        }
    }
    tracing::info!(
        bucket,
        prefix = %prefix,
        releases_deleted = report.releases_deleted.len(),
        releases_kept = report.releases_kept,
        objects = doomed.len(),
        bytes = report.bytes,
        dry_run = req.dry_run,
        "gc finished"
    );
    report.deleted = doomed;
    Ok(report)
}

/// A listing failure, as S3 explained it.
fn list_error<E>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    bucket: &str,
    prefix: &str,
) -> GcError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match s3::classify(e) {
        S3Failure::NoSuchBucket | S3Failure::NotFound => GcError::NoSuchBucket {
            bucket: bucket.into(),
        },
        S3Failure::Denied => GcError::AccessDenied {
            bucket: bucket.into(),
            prefix: prefix.into(),
        },
        other => GcError::List {
            bucket: bucket.into(),
            prefix: prefix.into(),
            reason: other.to_string(),
        },
    }
}

/// `(environment, pointer key)` for every `{app}/*/current.json`.
async fn list_pointers(
    s3: &Client,
    bucket: &str,
    app: &str,
) -> Result<Vec<(String, String)>, GcError> {
    let prefix = format!("{app}/");
    let mut out = Vec::new();
    let mut pages = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(&prefix)
        .delimiter("/")
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| list_error(&e, bucket, &prefix))?;
        for p in page.common_prefixes() {
            if let Some(env_prefix) = p.prefix() {
                let env = env_prefix[prefix.len()..].trim_end_matches('/').to_string();
                out.push((env, format!("{env_prefix}{}", pointer::POINTER_NAME)));
            }
        }
    }
    Ok(out)
}
