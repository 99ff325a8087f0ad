//! EC2 instance tags: which commit this instance serves, visible from the AWS console.
//!
//! At the start and end of every deployment, and on rollback, deployd writes tags on its own
//! instance with `CreateTags` (prefix `[report] tag_prefix`, default `deployd:`):
//!
//! | tag | value |
//! |---|---|
//! | `deployd:status` | `deploying`, `serving`, `failed` or `rolled-back` |
//! | `deployd:release` | the serving release id (empty if nothing serves yet) |
//! | `deployd:commit` | its commit (`commit-sha` metadata; empty if unknown) |
//! | `deployd:updated` | RFC 3339 time of this update |
//! | `deployd:error` | on failure, the first 255 characters of the error with anything that looks like a credential or query string removed; empty otherwise |
//! | `deployd:target` | the commit the last attempt aimed at (empty if unknown): with `status` `failed` or `rolled-back`, the release that failed here |
//! | `deployd:app`, `deployd:environment` | the config's `app` and `environment` (the latter only when set), so that `deployd fleet status` finds the fleet |
//!
//! so that one `aws ec2 describe-tags --filters Name=key,Values=deployd:status` shows a whole
//! fleet. The instance id and region come from IMDSv2 ([`crate::instance::imds`]); the endpoint is
//! `[report] ec2_endpoint_url`, else the SDK's own resolution (`AWS_ENDPOINT_URL_EC2`,
//! `AWS_ENDPOINT_URL`).
//!
//! A write identical to the last one this process made (the `updated` time aside) is skipped,
//! so a deployment that finds its release already serving costs no EC2 request.
//!
//! Tagging is a report, never a gate: a tag write is bounded by [`TAG_TIMEOUT`] (throttling is
//! retried by the SDK inside that bound), a failure is logged and the deployment goes on. When
//! tagging cannot work on this host (no IMDS, a Lightsail instance the EC2 API does not know,
//! no `ec2:CreateTags` permission, no credentials) the first failure logs one warning naming
//! the reason and tagging stays off for the life of this process (the daemon tries again after
//! `systemctl reload`). `[report] ec2_tags = false` turns it off explicitly.
//!
//! Tags are also read: legacy templates may use `{tag:NAME}` placeholders, filled from one
//! `DescribeTags` call per deployment ([`Ec2Tags::tag`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_ec2::config::Region;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{Filter, Tag};
use tokio::sync::OnceCell;

use crate::config::ReportConfig;
use crate::contract::now_rfc3339;
use crate::error::error_chain;
use crate::instance::imds::{Imds, ImdsError};

/// The most time one tag write (or one tag read) may add to a deployment.
pub const TAG_TIMEOUT: Duration = Duration::from_secs(5);

/// What `deployd:status` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagStatus {
    Deploying,
    Serving,
    Failed,
    RolledBack,
}

impl TagStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TagStatus::Deploying => "deploying",
            TagStatus::Serving => "serving",
            TagStatus::Failed => "failed",
            TagStatus::RolledBack => "rolled-back",
        }
    }
}

/// One tag update. `None` fields are left as they are on the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub status: TagStatus,
    /// The serving release and its commit; `Some("")` clears the tag's value.
    pub release: Option<String>,
    pub commit: Option<String>,
    /// The failure, sanitised by [`Update::pairs`]; `Some("")` clears a previous one.
    pub error: Option<String>,
    /// The commit the attempt aimed at; `Some("")` when unknown.
    pub target: Option<String>,
}

impl Update {
    /// A deployment started: only the status and the time change.
    pub fn deploying() -> Update {
        Update {
            status: TagStatus::Deploying,
            release: None,
            commit: None,
            error: None,
            target: None,
        }
    }

    /// The tag keys and values to write, prefixed, with `updated` set to now.
    pub fn pairs(&self, prefix: &str) -> Vec<(String, String)> {
        let mut out = vec![
            (format!("{prefix}status"), self.status.as_str().to_string()),
            (format!("{prefix}updated"), now_rfc3339()),
        ];
        for (name, value) in [
            ("release", &self.release),
            ("commit", &self.commit),
            ("target", &self.target),
        ] {
            if let Some(v) = value {
                out.push((format!("{prefix}{name}"), v.chars().take(256).collect()));
            }
        }
        if let Some(e) = &self.error {
            out.push((format!("{prefix}error"), sanitize_error(e)));
        }
        out
    }
}

/// Where tags go: this instance, through an EC2 client in its region.
struct Target {
    client: aws_sdk_ec2::Client,
    instance_id: String,
    region: String,
}

/// Why a write failed, and whether trying again later could help.
enum WriteFailure {
    /// IMDS is switched off on purpose (`AWS_EC2_METADATA_DISABLED=true`): stop, quietly.
    Disabled(String),
    /// This host cannot tag (no IMDS, no permission, unknown instance): stop trying.
    Permanent(String),
    /// A timeout, a network error or a server error: try again next time.
    Transient(String),
}

/// EC2 error codes after which tagging cannot work until something outside deployd changes.
fn permanent_code(code: &str) -> bool {
    code == "UnauthorizedOperation"
        || code.starts_with("AccessDenied")
        || code == "AuthFailure"
        || code.starts_with("InvalidInstanceID")
        || code == "OptInRequired"
        || code == "Blocked"
        || code == "InvalidClientTokenId"
        || code == "SignatureDoesNotMatch"
        || code == "UnrecognizedClientException"
}

/// Turns an SDK error into one sentence and a verdict.
fn classify<E>(err: &SdkError<E>, action: &str, instance_id: &str) -> WriteFailure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("unknown");
            let message = e.message().unwrap_or("no message");
            let text = format!("{action} on {instance_id} was refused: {code}: {message}");
            if permanent_code(code) {
                let hint = if code.starts_with("InvalidInstanceID") {
                    " (the EC2 API does not know this instance: Lightsail, or another account?)"
                } else if code == "UnauthorizedOperation" || code.starts_with("AccessDenied") {
                    " (grant it with the IAM policy in packaging/README.md)"
                } else {
                    ""
                };
                WriteFailure::Permanent(format!("{text}{hint}"))
            } else {
                WriteFailure::Transient(text)
            }
        }
        // Missing credentials and bad configuration surface while building the request.
        SdkError::ConstructionFailure(_) => {
            WriteFailure::Permanent(format!("{action} could not be sent: {}", error_chain(err)))
        }
        _ => WriteFailure::Transient(format!("{action} failed: {}", error_chain(err))),
    }
}

/// Tag reads for one deployment: the instance's tags, or why they could not be read.
type TagCache = Option<Result<BTreeMap<String, String>, String>>;

/// Reads and writes this instance's EC2 tags; see the module documentation.
pub struct Ec2Tags {
    cfg: ReportConfig,
    target: OnceCell<Result<Target, ImdsError>>,
    /// Set when writing has been turned off, with the reason.
    writes_off: Mutex<Option<String>>,
    /// The instance's tags, read at most once per deployment.
    read: tokio::sync::Mutex<TagCache>,
    /// Tags written with every update: `app` and `environment`.
    fleet: Vec<(String, String)>,
    /// The last pairs written (without `updated`), to skip writing them again.
    last: Mutex<Option<Vec<(String, String)>>>,
}

impl std::fmt::Debug for Ec2Tags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Tags")
            .field("enabled", &self.cfg.ec2_tags)
            .field("prefix", &self.cfg.tag_prefix)
            .field("writes_off", &self.off_reason())
            .finish_non_exhaustive()
    }
}

impl Ec2Tags {
    pub fn new(cfg: &ReportConfig) -> Ec2Tags {
        let writes_off = (!cfg.ec2_tags)
            .then(|| "it is turned off in the config ([report] ec2_tags = false)".into());
        Ec2Tags {
            cfg: cfg.clone(),
            target: OnceCell::new(),
            writes_off: Mutex::new(writes_off),
            read: tokio::sync::Mutex::new(None),
            fleet: Vec::new(),
            last: Mutex::new(None),
        }
    }

    /// Adds `app` and `environment` (when not empty) to every write.
    pub fn with_fleet(mut self, app: &str, environment: &str) -> Ec2Tags {
        let p = &self.cfg.tag_prefix;
        self.fleet = [("app", app), ("environment", environment)]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (format!("{p}{k}"), v.to_string()))
            .collect();
        self
    }

    /// The pairs `update` writes: its own and the fleet's.
    fn all_pairs(&self, update: &Update) -> Vec<(String, String)> {
        let mut pairs = update.pairs(&self.cfg.tag_prefix);
        pairs.extend(self.fleet.iter().cloned());
        pairs
    }

    /// True when `pairs` (without `updated`) are what was written last; else remembers them.
    fn unchanged(&self, pairs: &[(String, String)]) -> bool {
        let updated = format!("{}updated", self.cfg.tag_prefix);
        let key: Vec<(String, String)> = pairs
            .iter()
            .filter(|(k, _)| *k != updated)
            .cloned()
            .collect();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref() == Some(&key) {
            return true;
        }
        *last = Some(key);
        false
    }

    fn forget_last(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Why tag writes are off, if they are.
    pub fn off_reason(&self) -> Option<String> {
        self.writes_off
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Turns writes off for the life of this handle, logging the reason once: a warning, or
    /// an info line when the operator switched IMDS off on purpose.
    fn turn_off(&self, reason: String, warn: bool) {
        let mut off = self.writes_off.lock().unwrap_or_else(|p| p.into_inner());
        if off.is_none() {
            if warn {
                tracing::warn!(%reason, "EC2 instance tags are off");
            } else {
                tracing::info!(%reason, "EC2 instance tags are off");
            }
            *off = Some(reason);
        }
    }

    /// Forgets the tags read by the previous deployment.
    pub fn new_deployment(&self) {
        if let Ok(mut cache) = self.read.try_lock() {
            *cache = None;
        }
    }

    /// The instance and a client for its region, resolved once.
    async fn target(&self, imds: &Imds) -> Result<&Target, ImdsError> {
        self.target
            .get_or_init(|| async {
                let id = imds.identity().await?;
                let shared = crate::s3::aws_loader(crate::s3::CallBudget {
                    attempts: 3,
                    connect: Duration::from_secs(2),
                    read: None,
                    attempt: Some(Duration::from_secs(3)),
                    operation: Some(TAG_TIMEOUT),
                })
                .region(Region::new(id.region.clone()))
                .load()
                .await;
                let mut builder = aws_sdk_ec2::config::Builder::from(&shared);
                if let Some(url) = &self.cfg.ec2_endpoint_url {
                    builder = builder.endpoint_url(url);
                }
                Ok(Target {
                    client: aws_sdk_ec2::Client::from_conf(builder.build()),
                    instance_id: id.instance_id.clone(),
                    region: id.region.clone(),
                })
            })
            .await
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Writes `update` on this instance. Never fails and never takes longer than
    /// [`TAG_TIMEOUT`]; problems are logged (once, for those that will not go away).
    pub async fn write(&self, imds: &Imds, update: &Update) {
        if self.off_reason().is_some() {
            return;
        }
        if self.unchanged(&self.all_pairs(update)) {
            tracing::debug!(
                status = update.status.as_str(),
                "EC2 instance tags already say this; not writing them again"
            );
            return;
        }
        let started = std::time::Instant::now();
        // Boxed: the SDK's request futures are deep, and this one is awaited inside the
        // deployment's own future.
        let write = Box::pin(self.try_write(imds, update, false));
        match tokio::time::timeout(TAG_TIMEOUT, write).await {
            Ok(Ok(instance_id)) => tracing::debug!(
                instance_id,
                status = update.status.as_str(),
                ms = started.elapsed().as_millis() as u64,
                "EC2 instance tags written"
            ),
            Ok(Err(WriteFailure::Permanent(reason))) => self.turn_off(reason, true),
            Ok(Err(WriteFailure::Disabled(reason))) => self.turn_off(reason, false),
            Ok(Err(WriteFailure::Transient(reason))) => {
                self.forget_last();
                tracing::warn!(
                    %reason,
                    "could not write EC2 instance tags; the deployment goes on"
                )
            }
            // Still no identity after the whole budget: IMDS is black-holed (not on EC2).
            Err(_) if self.target.get().is_none() => self.turn_off(
                format!(
                    "the instance metadata service (IMDSv2) did not answer within {}s",
                    TAG_TIMEOUT.as_secs()
                ),
                true,
            ),
            Err(_) => {
                self.forget_last();
                tracing::warn!(
                    timeout_s = TAG_TIMEOUT.as_secs(),
                    "writing EC2 instance tags took longer than {}s; the deployment goes on",
                    TAG_TIMEOUT.as_secs()
                )
            }
        }
    }

    async fn try_write(
        &self,
        imds: &Imds,
        update: &Update,
        dry_run: bool,
    ) -> Result<String, WriteFailure> {
        let target = self.target(imds).await.map_err(|e| match e {
            ImdsError::Disabled => WriteFailure::Disabled(e.to_string()),
            _ => WriteFailure::Permanent(e.to_string()),
        })?;
        let mut req = target
            .client
            .create_tags()
            .resources(&target.instance_id)
            .dry_run(dry_run);
        for (key, value) in self.all_pairs(update) {
            req = req.tags(Tag::builder().key(key).value(value).build());
        }
        match req.send().await {
            Ok(_) => Ok(target.instance_id.clone()),
            Err(SdkError::ServiceError(e))
                if dry_run && e.err().code() == Some("DryRunOperation") =>
            {
                Ok(target.instance_id.clone())
            }
            Err(e) => Err(classify(&e, "ec2:CreateTags", &target.instance_id)),
        }
    }

    /// The value of instance tag `name`, for a `{tag:NAME}` placeholder. All tags are read
    /// with one `DescribeTags` call per deployment.
    pub async fn tag(&self, imds: &Imds, name: &str) -> Result<String, String> {
        let mut cache = self.read.lock().await;
        if cache.is_none() {
            let read = match tokio::time::timeout(TAG_TIMEOUT, Box::pin(self.read_all(imds))).await
            {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "ec2:DescribeTags did not answer within {}s",
                    TAG_TIMEOUT.as_secs()
                )),
            };
            *cache = Some(read);
        }
        match cache.as_ref() {
            Some(Ok(tags)) => tags.get(name).cloned().ok_or_else(|| {
                let id = self
                    .target
                    .get()
                    .and_then(|t| t.as_ref().ok())
                    .map_or("this instance", |t| t.instance_id.as_str());
                format!("{id} has no tag {name:?}")
            }),
            Some(Err(e)) => Err(e.clone()),
            None => Err("instance tags were not read".into()),
        }
    }

    async fn read_all(&self, imds: &Imds) -> Result<BTreeMap<String, String>, String> {
        let target = self
            .target(imds)
            .await
            .map_err(|e| format!("instance tags need the instance id: {e}"))?;
        let mut tags = BTreeMap::new();
        let mut next: Option<String> = None;
        loop {
            let out = target
                .client
                .describe_tags()
                .filters(
                    Filter::builder()
                        .name("resource-id")
                        .values(&target.instance_id)
                        .build(),
                )
                .set_next_token(next.take())
                .send()
                .await
                .map_err(
                    |e| match classify(&e, "ec2:DescribeTags", &target.instance_id) {
                        WriteFailure::Disabled(s)
                        | WriteFailure::Permanent(s)
                        | WriteFailure::Transient(s) => s,
                    },
                )?;
            for t in out.tags() {
                if let (Some(k), Some(v)) = (t.key(), t.value()) {
                    tags.insert(k.to_string(), v.to_string());
                }
            }
            match out.next_token().filter(|t| !t.is_empty()) {
                Some(t) => next = Some(t.to_string()),
                None => break,
            }
        }
        tracing::debug!(instance_id = %target.instance_id, count = tags.len(), "read instance tags");
        Ok(tags)
    }

    /// Lines for `deployd check-config`: the instance identity and whether tagging works here
    /// (checked with a `CreateTags` dry run, which changes nothing).
    pub async fn check(&self, imds: &Imds) -> Vec<(&'static str, String)> {
        let identity = match imds.identity().await {
            Ok(id) => format!(
                "{} in {} ({}), account {}, from IMDSv2",
                id.instance_id, id.region, id.availability_zone, id.account_id
            ),
            Err(e) => format!(
                "unavailable: {e}; EC2 tags and the {{account_id}}, {{region}}, {{instance_id}} and {{tag:...}} placeholders are off"
            ),
        };
        let tags = if let Some(reason) = self.off_reason() {
            format!("off: {reason}")
        } else {
            let probe = Update {
                status: TagStatus::Serving,
                release: None,
                commit: None,
                error: None,
                target: None,
            };
            let probe = Box::pin(self.try_write(imds, &probe, true));
            match tokio::time::timeout(TAG_TIMEOUT, probe).await {
                Ok(Ok(id)) => {
                    let region = self
                        .target
                        .get()
                        .and_then(|t| t.as_ref().ok())
                        .map_or("", |t| t.region.as_str());
                    format!(
                        "on: {}status, release, commit, updated, error on {id} in {region} (ec2:CreateTags allowed, checked with a dry run)",
                        self.cfg.tag_prefix
                    )
                }
                Ok(Err(WriteFailure::Permanent(reason) | WriteFailure::Disabled(reason))) => {
                    format!("off: {reason}")
                }
                Ok(Err(WriteFailure::Transient(reason))) => {
                    format!("on, but the check failed: {reason}")
                }
                Err(_) => format!(
                    "on, but the check did not answer within {}s",
                    TAG_TIMEOUT.as_secs()
                ),
            }
        };
        vec![("identity", identity), ("ec2 tags", tags)]
    }
}

/// Makes an error message safe and short enough for a tag value: [`crate::scrub::scrub`]bed,
/// at most 255 characters.
pub fn sanitize_error(message: &str) -> String {
    crate::scrub::for_tag(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_lose_secrets_and_stay_short() {
        let e = sanitize_error(
            "GET https://b.s3.amazonaws.com/k.tar.gz?X-Amz-Signature=abc&X-Amz-Security-Token=xyz failed",
        );
        assert_eq!(
            e,
            "GET https://b.s3.amazonaws.com/k.tar.gz?[redacted] failed"
        );
        let e = sanitize_error("proxy http://alice:hunter2@proxy:3128/ refused");
        assert_eq!(e, "proxy http://[redacted]@proxy:3128/ refused");
        let e = sanitize_error(
            "key AKIAIOSFODNN7EXAMPLE and wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY leaked",
        );
        assert_eq!(e, "key [redacted] and [redacted] leaked");
        let e = sanitize_error("bad aws_secret_access_key=abc123 and password: hunter2 here");
        assert_eq!(
            e,
            "bad aws_secret_access_key=[redacted] and password: [redacted] here"
        );
        let long = "x".repeat(1000);
        assert_eq!(sanitize_error(&long).chars().count(), 255);
        assert_eq!(sanitize_error("line one\nline two"), "line one line two");
        // What operators need stays: keys, digests, exit reasons.
        let digest = "a".repeat(64);
        let msg = format!(
            "checksum mismatch for s3://bucket/web/prod/622d2103-20250101-120000/web.tar.gz: expected SHA-256 {digest}"
        );
        assert_eq!(sanitize_error(&msg), msg);
    }

    #[test]
    fn updates_write_the_documented_keys() {
        let u = Update {
            status: TagStatus::Failed,
            release: Some("20250101-120000-622d2103".into()),
            commit: Some("622d2103".into()),
            error: Some("x?token=1".into()),
            target: Some("622d2103".into()),
        };
        let pairs: BTreeMap<String, String> = u.pairs("deployd:").into_iter().collect();
        assert_eq!(pairs["deployd:status"], "failed");
        assert_eq!(pairs["deployd:release"], "20250101-120000-622d2103");
        assert_eq!(pairs["deployd:error"], "x?[redacted]");
        assert!(humantime::parse_rfc3339(&pairs["deployd:updated"]).is_ok());
        let keys: Vec<String> = Update::deploying()
            .pairs("p:")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["p:status", "p:updated"]);
        const TAG_NAMES: [&str; 6] = ["status", "release", "commit", "updated", "error", "target"];
        for (k, _) in u.pairs("deployd:") {
            assert!(TAG_NAMES.iter().any(|n| k == format!("deployd:{n}")));
        }
    }
}
