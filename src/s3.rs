//! S3: the client, the one type that names an object, and the one classification of S3's
//! answers.
//!
//! [`S3Object`] (bucket, key, and once verified the ETag and version id the download is
//! pinned to) travels through every stage and every error, and displays as `s3://bucket/key`.
//! [`classify`] turns an SDK error into the handful of cases deployd acts on (not found,
//! denied, not modified, precondition failed, not implemented, anything else with its cause).
//!
//! The client is configured once per process.
//!
//! Region: `[s3] region`, else the SDK's chain (`AWS_REGION`, profile, IMDS). Endpoint:
//! `[s3] endpoint_url`, else the SDK's own `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`.
//! Path-style addressing is forced for IP-address and `localhost` endpoints, which cannot
//! serve virtual-hosted buckets. Retries are the SDK's standard mode (its token bucket bounds
//! attempts); deployd never wraps an SDK call in a second retry loop, except for the
//! deliberate "wait until CI has uploaded" loop in `verify`. Response checksum validation is
//! left to deployd's own streaming SHA-256 (see `fetch`).
//!
//! Bucket owner: every request carries `x-amz-expected-bucket-owner` (S3's
//! `ExpectedBucketOwner`) once the account that owns the bucket is known, so a bucket of the
//! same name in someone else's account (a deleted bucket re-created, a predictable legacy
//! name claimed first) is answered 403 instead of being trusted. The account is `[s3]
//! expected_bucket_owner`, else this instance's own account as IMDSv2 reports it (learned by
//! the first deployment, [`learn_account_id`]). One interceptor adds the header to every
//! request the client sends, whatever the operation and wherever it is built.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, ResponseChecksumValidation};

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use serde::{Deserialize, Serialize};

use crate::error::{ExitCode, error_chain, exit};
use crate::units::HumanDuration;

/// `[s3]`: the S3 client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Default: `AWS_REGION`, then the profile, then IMDS.
    pub region: Option<String>,
    /// Default: the SDK's own resolution (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`).
    pub endpoint_url: Option<String>,
    /// Forced on for IP-address and `localhost` endpoints.
    pub force_path_style: bool,
    /// Attempts per request, the first included (5xx, `SlowDown`, connection resets are
    /// retried with backoff).
    pub attempts: u32,
    /// How long connecting may take.
    pub connect_timeout: HumanDuration,
    /// How long S3 may stay silent: waiting for an answer, and between two pieces of a
    /// download's body (a stalled body is resumed where it stopped).
    pub read_timeout: HumanDuration,
    /// The fetch stage as a whole: the download, its retries and resumes.
    pub download_deadline: HumanDuration,
    /// The AWS account that must own every bucket deployd talks to (`ExpectedBucketOwner`).
    /// Default: this instance's account, from IMDSv2, once a deployment has asked for it.
    pub expected_bucket_owner: Option<String>,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            region: None,
            endpoint_url: None,
            force_path_style: false,
            attempts: 5,
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            read_timeout: HumanDuration(Duration::from_secs(30)),
            download_deadline: HumanDuration(Duration::from_secs(3600)),
            expected_bucket_owner: None,
        }
    }
}

/// True for a 12-digit AWS account id.
pub fn is_account_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

/// True for a name S3 accepts as a bucket name (3–63 lower-case letters, digits, `.`, `-`,
/// starting and ending with a letter or digit).
pub fn is_bucket_name(s: &str) -> bool {
    let b = s.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// This instance's account as IMDS reported it, for buckets whose owner the config leaves open.
static INSTANCE_ACCOUNT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Records this instance's AWS account (from IMDSv2): from now on every request of every
/// client without `[s3] expected_bucket_owner` expects its buckets to be owned by it.
pub fn learn_account_id(account_id: &str) {
    if is_account_id(account_id) && INSTANCE_ACCOUNT.set(account_id.to_string()).is_ok() {
        tracing::info!(
            account_id,
            "S3 requests now expect buckets owned by this instance's account"
        );
    }
}

/// Adds `x-amz-expected-bucket-owner` to every request once the owner is known.
#[derive(Debug)]
struct ExpectBucketOwner {
    configured: Option<String>,
}

impl ExpectBucketOwner {
    fn owner(&self) -> Option<&str> {
        self.configured
            .as_deref()
            .or_else(|| INSTANCE_ACCOUNT.get().map(String::as_str))
    }
}

impl aws_sdk_s3::config::Intercept for ExpectBucketOwner {
    fn name(&self) -> &'static str {
        "ExpectBucketOwner"
    }

    fn modify_before_signing(
        &self,
        context: &mut aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &aws_sdk_s3::config::RuntimeComponents,
        _cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        if let Some(owner) = self.owner() {
            context
                .request_mut()
                .headers_mut()
                .try_insert("x-amz-expected-bucket-owner", owner.to_string())?;
        }
        Ok(())
    }
}

/// An object in S3; once verified, pinned to one version of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct S3Object {
    /// The bucket.
    pub bucket: String,
    /// The key.
    pub key: String,
    /// The ETag head-object reported; a download sends it as `If-Match`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// The version id on a versioned bucket; a download asks for exactly this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
}

impl S3Object {
    /// An unpinned object.
    pub fn new(bucket: impl Into<String>, key: impl Into<String>) -> S3Object {
        S3Object {
            bucket: bucket.into(),
            key: key.into(),
            etag: None,
            version_id: None,
        }
    }

    /// Parses `s3://bucket/key`.
    pub fn parse_url(url: &str) -> Result<S3Object, BadS3Url> {
        url.strip_prefix("s3://")
            .and_then(|rest| rest.split_once('/'))
            .filter(|(b, k)| !b.is_empty() && !k.is_empty())
            .map(|(b, k)| S3Object::new(b, k))
            .ok_or_else(|| BadS3Url(url.to_string()))
    }

    /// Another, unpinned, object in the same bucket.
    pub fn sibling(&self, key: impl Into<String>) -> S3Object {
        S3Object::new(self.bucket.clone(), key)
    }

    /// The same object pinned to `etag` and `version_id` (empty values and S3's `null`
    /// version mean "none").
    pub fn pinned(&self, etag: Option<&str>, version_id: Option<&str>) -> S3Object {
        S3Object {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            etag: etag.filter(|e| !e.is_empty()).map(str::to_string),
            version_id: version_id
                .filter(|v| !v.is_empty() && *v != "null")
                .map(str::to_string),
        }
    }

    /// The ETag, or `""` when none is known.
    pub fn etag(&self) -> &str {
        self.etag.as_deref().unwrap_or("")
    }
}

impl std::fmt::Display for S3Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// A string that is not an `s3://bucket/key` URL.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an s3://bucket/key URL")]
pub struct BadS3Url(pub String);

impl ExitCode for BadS3Url {
    fn exit_code(&self) -> i32 {
        exit::USAGE
    }
}

/// What an S3 error means to deployd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum S3Failure {
    /// 404 for the key (`NoSuchKey`, or a body-less 404 to a HEAD).
    NotFound,
    /// 404 `NoSuchBucket`.
    NoSuchBucket,
    /// 403.
    Denied,
    /// 304: the object still has the ETag sent in `If-None-Match`.
    NotModified,
    /// 412: `If-Match` / `If-None-Match` did not hold.
    PreconditionFailed,
    /// 501: the server does not implement a header that was sent.
    NotImplemented,
    /// Anything else (network, throttling after the SDK's retries, 5xx): the error chain.
    Other(String),
}

impl std::fmt::Display for S3Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            S3Failure::NotFound => "not found (404)",
            S3Failure::NoSuchBucket => "no such bucket (404)",
            S3Failure::Denied => "access denied (403)",
            S3Failure::NotModified => "not modified (304)",
            S3Failure::PreconditionFailed => "precondition failed (412)",
            S3Failure::NotImplemented => "not implemented by the server (501)",
            S3Failure::Other(reason) => reason,
        })
    }
}

/// Classifies an S3 SDK error: the one place that reads status codes and error codes.
pub fn classify<E>(e: &SdkError<E, HttpResponse>) -> S3Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.as_service_error().and_then(|s| s.code());
    match (status, code) {
        (_, Some("NoSuchBucket")) => S3Failure::NoSuchBucket,
        (_, Some("NoSuchKey")) | (Some(404), _) => S3Failure::NotFound,
        (Some(403), _) => S3Failure::Denied,
        (Some(304), _) => S3Failure::NotModified,
        (Some(412), _) | (_, Some("PreconditionFailed")) => S3Failure::PreconditionFailed,
        (Some(501), _) | (_, Some("NotImplemented")) => S3Failure::NotImplemented,
        _ => S3Failure::Other(error_chain(e)),
    }
}

/// The S3 client cannot be configured.
#[derive(Debug, thiserror::Error)]
pub enum S3SetupError {
    /// No region in the config, the environment or IMDS.
    #[error(
        "no AWS region is configured: set [s3] region in the config or AWS_REGION in the environment"
    )]
    NoRegion,
}

impl ExitCode for S3SetupError {
    fn exit_code(&self) -> i32 {
        exit::CONFIG
    }
}

/// The endpoint deployd will talk to, if it is not AWS's default.
fn effective_endpoint(cfg: &S3Config) -> Option<String> {
    cfg.endpoint_url
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok())
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .filter(|s| !s.is_empty())
}

/// True for endpoints such as `http://127.0.0.1:9000` or `http://localhost:9000`.
fn needs_path_style(endpoint: &str) -> bool {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok()
}

/// How often the SDK may try an AWS call and how long each part of it may take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallBudget {
    /// Attempts, the first one included (the SDK's standard retry mode, 200 ms initial backoff).
    pub attempts: u32,
    /// Connecting.
    pub connect: Duration,
    /// Waiting for the next bytes of a response (a stalled server).
    pub read: Option<Duration>,
    /// One attempt, start to end.
    pub attempt: Option<Duration>,
    /// The whole call, retries included.
    pub operation: Option<Duration>,
}

/// The shared AWS configuration loader for `budget` (credentials, region and endpoints from
/// the standard AWS environment).
pub(crate) fn aws_loader(budget: CallBudget) -> aws_config::ConfigLoader {
    let mut timeouts = TimeoutConfig::builder().connect_timeout(budget.connect);
    timeouts
        .set_read_timeout(budget.read)
        .set_operation_attempt_timeout(budget.attempt)
        .set_operation_timeout(budget.operation);
    aws_config::defaults(BehaviorVersion::latest())
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(budget.attempts)
                .with_initial_backoff(Duration::from_millis(200)),
        )
        .timeout_config(timeouts.build())
}

/// Builds the S3 client from the config and the standard AWS environment.
pub async fn client(cfg: &S3Config) -> Result<aws_sdk_s3::Client, S3SetupError> {
    // No attempt or operation timeout: the same client uploads multi-GB artifacts in CI. The
    // download bounds itself (`[s3] read_timeout` between chunks, `download_deadline` overall).
    let mut loader = aws_loader(CallBudget {
        attempts: cfg.attempts,
        connect: cfg.connect_timeout.0,
        read: Some(cfg.read_timeout.0),
        attempt: None,
        operation: None,
    });
    if let Some(region) = &cfg.region {
        loader = loader.region(Region::new(region.clone()));
    }
    let shared = loader.load().await;
    if shared.region().is_none() {
        return Err(S3SetupError::NoRegion);
    }
    let endpoint = effective_endpoint(cfg);
    // deployd hashes every download itself and compares the digest with the expected one;
    // the SDK validating the same body again would only double the hashing cost.
    let mut builder = aws_sdk_s3::config::Builder::from(&shared)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .force_path_style(
            cfg.force_path_style || endpoint.as_deref().is_some_and(needs_path_style),
        );
    if let Some(url) = &cfg.endpoint_url {
        builder = builder.endpoint_url(url);
    }
    builder = builder.interceptor(ExpectBucketOwner {
        configured: cfg.expected_bucket_owner.clone(),
    });
    Ok(aws_sdk_s3::Client::from_conf(builder.build()))
}

/// Why a small object (a pointer, a signature) could not be read whole.
#[derive(Debug)]
pub enum SmallBody {
    /// It is larger than the limit.
    TooLarge,
    /// The body broke off; the error chain.
    Failed(String),
}

/// A small object's bytes and ETag.
#[derive(Debug)]
pub struct Body {
    /// The object's bytes.
    pub bytes: bytes::Bytes,
    /// Its ETag.
    pub etag: String,
}

/// Reads a GET response's body whole, refusing one larger than `max` bytes (by its
/// `Content-Length` before reading, and by what arrived).
pub async fn read_small_body(
    resp: aws_sdk_s3::operation::get_object::GetObjectOutput,
    max: usize,
) -> Result<Body, SmallBody> {
    if resp.content_length().is_some_and(|n| n > max as i64) {
        return Err(SmallBody::TooLarge);
    }
    let etag = resp.e_tag().unwrap_or_default().to_string();
    let bytes = resp
        .body
        .collect()
        .await
        .map_err(|e| SmallBody::Failed(error_chain(&e)))?
        .into_bytes();
    if bytes.len() > max {
        return Err(SmallBody::TooLarge);
    }
    Ok(Body { bytes, etag })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        let o = S3Object::parse_url("s3://b/k/x.tar.gz").unwrap();
        assert_eq!((o.bucket.as_str(), o.key.as_str()), ("b", "k/x.tar.gz"));
        assert_eq!(o.to_string(), "s3://b/k/x.tar.gz");
        assert!(S3Object::parse_url("s3://b").is_err());
        assert!(S3Object::parse_url("https://b/k").is_err());
    }

    #[test]
    fn pinning_ignores_empty_and_null() {
        let o = S3Object::new("b", "k").pinned(Some(""), Some("null"));
        assert_eq!((o.etag, o.version_id), (None, None));
        let o = S3Object::new("b", "k").pinned(Some("\"e\""), Some("v1"));
        assert_eq!(o.etag(), "\"e\"");
        assert_eq!(o.version_id.as_deref(), Some("v1"));
    }

    #[test]
    fn account_ids_and_bucket_names() {
        assert!(is_account_id("123456789012"));
        assert!(!is_account_id("12345678901a") && !is_account_id("1234"));
        assert!(is_bucket_name("deploy-artifacts.eu-1"));
        for bad in ["ab", "Upper", "-dash", "dot.", "a/b", ""] {
            assert!(!is_bucket_name(bad), "{bad}");
        }
    }

    #[test]
    fn ip_and_localhost_endpoints_force_path_style() {
        assert!(needs_path_style("http://127.0.0.1:9000"));
        assert!(needs_path_style("http://localhost:9000/"));
        assert!(needs_path_style("http://[::1]:9000"));
        assert!(!needs_path_style("https://s3.eu-west-1.amazonaws.com"));
        assert!(!needs_path_style("https://minio.internal:9000"));
    }
}
