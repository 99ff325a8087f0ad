//! The S3 client, configured once per process.
//!
//! Region: `[s3] region`, else the SDK's chain (`AWS_REGION`, profile, IMDS). Endpoint:
//! `[s3] endpoint_url`, else the SDK's own `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`.
//! Path-style addressing is forced for IP-address and `localhost` endpoints, which cannot
//! serve virtual-hosted buckets. Retries are the SDK's standard mode (its token bucket bounds
//! attempts); deployd never wraps an SDK call in a second retry loop, except for the
//! deliberate "wait until CI has uploaded" loop in `verify`. Response checksum validation is
//! left to deployd's own streaming SHA-256 (see `fetch`).

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, ResponseChecksumValidation};

use crate::config::S3Config;
use crate::error::{ExitCode, exit};

#[derive(Debug, thiserror::Error)]
pub enum S3SetupError {
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

/// Builds the S3 client from the config and the standard AWS environment.
pub async fn client(cfg: &S3Config) -> Result<aws_sdk_s3::Client, S3SetupError> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(5)
                .with_initial_backoff(Duration::from_millis(200)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .read_timeout(Duration::from_secs(60))
                .build(),
        );
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
    Ok(aws_sdk_s3::Client::from_conf(builder.build()))
}

#[cfg(test)]
mod tests {
    use super::needs_path_style;

    #[test]
    fn ip_and_localhost_endpoints_force_path_style() {
        assert!(needs_path_style("http://127.0.0.1:9000"));
        assert!(needs_path_style("http://localhost:9000/"));
        assert!(needs_path_style("http://[::1]:9000"));
        assert!(!needs_path_style("https://s3.eu-west-1.amazonaws.com"));
        assert!(!needs_path_style("https://minio.internal:9000"));
    }
}
