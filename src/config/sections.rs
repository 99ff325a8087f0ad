//! The config file's tables, each with the defaults the design documents (and nowhere else).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{HumanDuration, Size};
use crate::contract::signature::{PublicKeys, TrustedKeys};

/// `[source]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// Used when `DEPLOYMENT_BUCKET` / `DEPLOYMENT_KEY` are not set.
    pub bucket: String,
    /// The artifact's key, with `bucket`.
    pub key: String,
    /// The legacy bucket template (`{account_id}`, …).
    pub legacy_bucket: String,
    /// The legacy key template (`{pr_number}`, `{tag:NAME}`, …).
    pub legacy_key: String,
    /// How long a 404 is retried (CI may still be uploading).
    pub wait_for_artifact: HumanDuration,
    /// Larger artifacts are refused before download.
    pub max_artifact_size: Size,
    /// User metadata every artifact must carry.
    pub required_metadata: Vec<String>,
    /// Minisign public key (or keys, during a rotation); when set, unsigned artifacts and
    /// pointers are refused and every release's signed identity is checked.
    pub public_key: Option<PublicKeys>,
    /// A release pointer to follow, with `bucket`.
    pub pointer_key: Option<String>,
    /// Buckets a trigger file or `--bucket` may name besides the configured one.
    pub allowed_buckets: Vec<String>,
    /// A signed pointer older than this is refused as expired; `0s` turns the check off.
    pub max_pointer_age: HumanDuration,
}

impl SourceConfig {
    /// The trusted public keys, when signatures are required (the config was validated, so
    /// they parse; a key that does not is reported as the config error it is).
    pub fn trusted_keys(&self) -> Result<Option<TrustedKeys>, String> {
        self.public_key
            .as_ref()
            .map(PublicKeys::trusted)
            .transpose()
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            bucket: String::new(),
            key: String::new(),
            legacy_bucket: "macro-ai-deployment-artifacts-{account_id}".into(),
            legacy_key: "express-api/pr-{pr_number}/express-api-deployment.tar.gz".into(),
            wait_for_artifact: HumanDuration(Duration::from_secs(300)),
            max_artifact_size: Size(4 << 30),
            required_metadata: Vec::new(),
            public_key: None,
            pointer_key: None,
            allowed_buckets: Vec::new(),
            max_pointer_age: HumanDuration(Duration::ZERO),
        }
    }
}

/// `[unpack]`: limits on one archive.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnpackConfig {
    /// Archive entries.
    pub max_entries: u64,
    /// Bytes of file content.
    pub max_bytes: Size,
    /// Bytes in one entry's path.
    pub max_path_len: usize,
    /// Keep group and other write bits from the archive's modes (cleared by default, as
    /// Python's `data` extraction filter does).
    pub keep_group_world_write: bool,
}

impl Default for UnpackConfig {
    fn default() -> Self {
        UnpackConfig {
            max_entries: 200_000,
            max_bytes: Size(16 << 30),
            max_path_len: 4096,
            keep_group_world_write: false,
        }
    }
}

/// `[releases]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReleasesConfig {
    /// Releases kept on disk (the serving and previous good ones always are).
    pub keep: usize,
}

impl Default for ReleasesConfig {
    fn default() -> Self {
        ReleasesConfig { keep: 5 }
    }
}

/// `[containers]`: the container stage (its defaults live here and only here).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainersConfig {
    /// Run the container stage when a release has a compose file.
    pub enabled: bool,
    /// Compose file, relative to the release directory.
    pub compose_file: String,
    /// How long each service may take to become healthy.
    pub health_timeout: HumanDuration,
    /// How long a service without healthcheck must keep running to count as healthy.
    pub health_grace: HumanDuration,
    /// App cache paths `clear-cache` deletes inside release directories.
    pub clear_paths: Vec<String>,
    /// Compose profiles to activate (besides `COMPOSE_PROFILES`); services of other profiles
    /// are left out.
    pub profiles: Vec<String>,
    /// Engine names of volumes and networks outside the app's own (`<app>_...`) that its
    /// compose file may use (`external: true`, or `name:`).
    pub allowed_external: Vec<String>,
    /// Capabilities dropped from every container (on top of Docker's default set); a service's
    /// `cap_drop` adds to them.
    pub cap_drop: Vec<String>,
    /// The most processes one container may run (a service may ask for fewer).
    pub pids_limit: i64,
    /// How long a deployment waits for the Docker engine to answer (it may start after
    /// deployd at boot, or be restarting).
    pub engine_wait: HumanDuration,
    /// How long one engine request may take to be answered (a hung engine is given up on).
    pub engine_timeout: HumanDuration,
    /// The build stage as a whole: every image of the release.
    pub build_timeout: HumanDuration,
}

impl Default for ContainersConfig {
    fn default() -> Self {
        ContainersConfig {
            enabled: true,
            compose_file: "docker-compose.yml".into(),
            health_timeout: HumanDuration(Duration::from_secs(120)),
            health_grace: HumanDuration(Duration::from_secs(5)),
            clear_paths: vec![".next".into(), ".turbo".into(), "__pycache__".into()],
            profiles: Vec::new(),
            allowed_external: Vec::new(),
            cap_drop: ["AUDIT_WRITE", "MKNOD", "NET_RAW", "SETFCAP"]
                .map(String::from)
                .to_vec(),
            pids_limit: 4096,
            engine_wait: HumanDuration(Duration::from_secs(120)),
            engine_timeout: HumanDuration(Duration::from_secs(300)),
            build_timeout: HumanDuration(Duration::from_secs(3600)),
        }
    }
}

/// `[report]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    /// Write `deployd:*` tags on this instance.
    pub ec2_tags: bool,
    /// The tags' prefix.
    pub tag_prefix: String,
    /// A node_exporter textfile to write after every deployment.
    pub metrics_file: Option<PathBuf>,
    /// Default: the SDK's own resolution (`AWS_ENDPOINT_URL_EC2`, `AWS_ENDPOINT_URL`).
    pub ec2_endpoint_url: Option<String>,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig {
            ec2_tags: true,
            tag_prefix: "deployd:".into(),
            metrics_file: None,
            ec2_endpoint_url: None,
        }
    }
}

/// `[triggers]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TriggersConfig {
    /// `0s` turns polling off.
    pub poll_interval: HumanDuration,
    /// While the source stays unchanged, each poll waits twice as long as the last, up to
    /// this; a change brings the interval back to `poll_interval`. `0s`: never stretch.
    pub idle_poll_interval: HumanDuration,
    /// Besides root, who may drop trigger files.
    pub trusted_group: String,
}

impl Default for TriggersConfig {
    fn default() -> Self {
        TriggersConfig {
            poll_interval: HumanDuration(Duration::ZERO),
            idle_poll_interval: HumanDuration(Duration::ZERO),
            trusted_group: String::new(),
        }
    }
}

/// `[daemon]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// How long `SIGTERM` may take to reach a safe stopping point.
    pub stop_timeout: HumanDuration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            stop_timeout: HumanDuration(Duration::from_secs(30)),
        }
    }
}
