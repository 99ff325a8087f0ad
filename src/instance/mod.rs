//! This instance, as AWS knows it: its identity from the instance metadata service (IMDSv2,
//! [`imds`]) and its EC2 tags ([`tags`]), as one handle.
//!
//! [`Instance`] answers the legacy templates' placeholders (`{account_id}`, `{region}`,
//! `{instance_id}`, `{availability_zone}`, `{tag:NAME}`) and reports each deployment on the
//! instance's own tags. Everything is asked lazily and cached, so a laptop or a Lightsail
//! instance without IMDS pays nothing until something needs it, and then gets one clear
//! sentence.

pub mod imds;
pub mod tags;

use crate::config::ReportConfig;
use imds::{Identity, Imds, ImdsError};
use tags::{Ec2Tags, Update};

/// This instance: identity and tags.
#[derive(Debug)]
pub struct Instance {
    imds: Imds,
    tags: Ec2Tags,
}

impl Instance {
    /// The instance as `[report]` configures its tags.
    pub fn new(report: &ReportConfig) -> Instance {
        Instance {
            imds: Imds::new(),
            tags: Ec2Tags::new(report),
        }
    }

    /// The instance of a host of `app` in `environment`, which its tags say.
    pub fn of_fleet(report: &ReportConfig, app: &str, environment: &str) -> Instance {
        Instance {
            imds: Imds::new(),
            tags: Ec2Tags::new(report).with_fleet(app, environment),
        }
    }

    /// This host's id in a rollout wave: the EC2 instance id, else `/etc/machine-id`.
    pub async fn member_id(&self) -> Result<String, String> {
        let imds = match self.imds.identity().await {
            Ok(id) => return Ok(id.instance_id.clone()),
            Err(e) => e,
        };
        match std::fs::read_to_string(crate::contract::wave::MACHINE_ID) {
            Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_string()),
            Ok(_) => Err(format!(
                "{imds}, and {} is empty",
                crate::contract::wave::MACHINE_ID
            )),
            Err(e) => Err(format!(
                "{imds}, and {} cannot be read ({e})",
                crate::contract::wave::MACHINE_ID
            )),
        }
    }

    /// The instance identity document (account, region, instance id, zone).
    pub async fn identity(&self) -> Result<&Identity, ImdsError> {
        self.imds.identity().await
    }

    /// The value of instance tag `name` (all tags are read once per deployment).
    pub async fn tag(&self, name: &str) -> Result<String, String> {
        self.tags.tag(&self.imds, name).await
    }

    /// A deployment starts: tags read for the previous one are forgotten.
    pub fn new_deployment(&self) {
        self.tags.new_deployment();
    }

    /// Writes `update` on this instance's tags; bounded in time, never fails (see [`tags`]).
    pub async fn write_tags(&self, update: &Update) {
        self.tags.write(&self.imds, update).await;
    }

    /// Lines for `deployd check-config`: the identity and whether tagging works here.
    pub async fn check(&self) -> Vec<(&'static str, String)> {
        self.tags.check(&self.imds).await
    }
}
