//! Instance identity from the EC2 instance metadata service, IMDSv2 only.
//!
//! The `aws-config` IMDS client always fetches a session token first (PUT) and sends it with
//! every GET; it never falls back to IMDSv1. It honours `AWS_EC2_METADATA_SERVICE_ENDPOINT`
//! (tests point it at a local server). `AWS_EC2_METADATA_DISABLED=true` switches it off. The
//! identity document is fetched at most once per process and only when something needs it
//! (a legacy template placeholder), so a laptop or a Lightsail instance without IMDS pays
//! nothing until then, and then gets one clear sentence.

use std::time::Duration;

use serde::Deserialize;
use tokio::sync::OnceCell;

use crate::error::error_chain;

/// Why the instance identity is not available.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ImdsError {
    /// `AWS_EC2_METADATA_DISABLED=true`.
    #[error("the instance metadata service is disabled (AWS_EC2_METADATA_DISABLED=true)")]
    Disabled,
    /// No answer (not on EC2, or IMDS turned off for the instance).
    #[error("the instance metadata service (IMDSv2) did not answer: {0}")]
    Unreachable(String),
    /// An answer that is not an identity document.
    #[error("the instance identity document from IMDS could not be read: {0}")]
    BadDocument(String),
}

/// What IMDS says about this instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// The AWS account.
    pub account_id: String,
    /// The region, e.g. `eu-west-1`.
    pub region: String,
    /// `i-…`.
    pub instance_id: String,
    /// e.g. `eu-west-1a`.
    pub availability_zone: String,
}

/// A lazily-connected IMDSv2 client whose answer is cached for the life of the process.
#[derive(Debug, Default)]
pub struct Imds {
    identity: OnceCell<Result<Identity, ImdsError>>,
}

fn disabled() -> bool {
    std::env::var("AWS_EC2_METADATA_DISABLED")
        .map(|v| v.eq_ignore_ascii_case("true"))
        .unwrap_or(false)
}

impl Imds {
    /// A handle that has asked nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The instance identity document (account, region, instance id, zone).
    pub async fn identity(&self) -> Result<&Identity, ImdsError> {
        self.identity
            .get_or_init(|| async {
                if disabled() {
                    return Err(ImdsError::Disabled);
                }
                let client = aws_config::imds::Client::builder()
                    .max_attempts(2)
                    .connect_timeout(Duration::from_secs(1))
                    .read_timeout(Duration::from_secs(2))
                    .build();
                let doc = client
                    .get("/latest/dynamic/instance-identity/document")
                    .await
                    .map_err(|e| ImdsError::Unreachable(error_chain(&e)))?;
                let identity: Identity = serde_json::from_str(doc.as_ref())
                    .map_err(|e| ImdsError::BadDocument(e.to_string()))?;
                tracing::debug!(instance_id = %identity.instance_id, region = %identity.region, "instance identity from IMDSv2");
                Ok(identity)
            })
            .await
            .as_ref()
            .map_err(Clone::clone)
    }
}
