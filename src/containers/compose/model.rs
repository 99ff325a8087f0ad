//! The typed compose project: what a validated compose file says, with every path resolved
//! and every reference checked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// A validated compose project for one release.
#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    /// The container project name (`com.docker.compose.project`).
    pub name: String,
    /// The release directory the compose file was read from.
    pub release_dir: PathBuf,
    /// The compose file that was read.
    pub compose_path: PathBuf,
    /// Services in start order (dependencies first).
    pub services: Vec<Service>,
    /// Named volumes: compose name and engine name.
    pub volumes: Vec<NamedObject>,
    /// Networks: compose name and engine name; `default` is always present.
    pub networks: Vec<NamedObject>,
}

/// A top-level volume or network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedObject {
    /// Name in the compose file.
    pub key: String,
    /// Name in the engine (`<project>_<key>` unless `name:` or `external:` says otherwise).
    pub engine_name: String,
    /// Managed outside deployd: must exist, never created.
    pub external: bool,
    /// Network driver (networks only).
    pub driver: Option<String>,
}

/// One service of the project.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// The service's key under `services`.
    pub name: String,
    /// How to build the image, when the service is built from the release.
    pub build: Option<BuildSpec>,
    /// The image reference the service runs (`image:`, or `<project>-<service>` for built services).
    pub image: String,
    /// `command:` as words; `None` keeps the image's.
    pub command: Option<Vec<String>>,
    /// `entrypoint:` as words; `None` keeps the image's.
    pub entrypoint: Option<Vec<String>>,
    /// Final environment: `env_file` entries, overridden by `environment`.
    pub environment: BTreeMap<String, String>,
    /// Published ports.
    pub ports: Vec<PortSpec>,
    /// Named volumes and bind mounts.
    pub volumes: Vec<MountSpec>,
    /// Restart policy (`no`, `always`, `unless-stopped`, `on-failure[:N]`).
    pub restart: Option<String>,
    /// `healthcheck:`; `None` keeps the image's.
    pub healthcheck: Option<HealthSpec>,
    /// Services that start before this one.
    pub depends_on: Vec<Dependency>,
    /// Container labels from the compose file (deployd adds its own when it creates the
    /// container).
    pub labels: BTreeMap<String, String>,
    /// Compose names of the networks the service joins.
    pub networks: Vec<String>,
}

/// `build:` of a service.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildSpec {
    /// Absolute build context directory, inside the release directory.
    pub context: PathBuf,
    /// Dockerfile path relative to the context.
    pub dockerfile: String,
    /// Build args; an arg listed without a value took it from the environment, or was left out.
    pub args: BTreeMap<String, String>,
    /// Extra cache sources from the compose file.
    pub cache_from: Vec<String>,
    /// The stage to build; `None` builds the last one.
    pub target: Option<String>,
    /// Image labels from the compose file.
    pub labels: BTreeMap<String, String>,
}

/// One published port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// Host address to bind; `None` binds all.
    pub host_ip: Option<String>,
    /// Host port; `None` lets the engine choose.
    pub published: Option<u16>,
    /// Container port.
    pub target: u16,
    /// `tcp` (the default), `udp` or `sctp`.
    pub protocol: String,
}

/// One mount of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSpec {
    /// A named volume (engine name) mounted at `target`.
    Volume {
        /// The volume's engine name.
        name: String,
        /// Absolute path in the container.
        target: String,
        /// Mounted read-only (`:ro`).
        read_only: bool,
    },
    /// A directory or file of the release mounted at `target`.
    Bind {
        /// Absolute path inside the release directory.
        source: PathBuf,
        /// Absolute path in the container.
        target: String,
        /// Mounted read-only (`:ro`).
        read_only: bool,
    },
}

/// `healthcheck:` of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    /// `["CMD", ...]`, `["CMD-SHELL", "..."]` or `["NONE"]` (disabled).
    pub test: Vec<String>,
    /// Time between checks.
    pub interval: Option<Duration>,
    /// How long one check may take.
    pub timeout: Option<Duration>,
    /// Failed checks in a row that make the container unhealthy.
    pub retries: Option<u32>,
    /// Time after start during which failed checks do not count.
    pub start_period: Option<Duration>,
}

impl HealthSpec {
    /// Whether the healthcheck is disabled (`disable: true` or `test: ["NONE"]`).
    pub fn disabled(&self) -> bool {
        self.test.first().map(String::as_str) == Some("NONE")
    }
}

/// A `depends_on` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    /// The service depended on.
    pub service: String,
    /// When it counts as ready.
    pub condition: DependCondition,
}

/// When a dependency counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DependCondition {
    /// `service_started` (also the list form).
    Started,
    /// `service_healthy`.
    Healthy,
}

/// Split an image reference into repository and tag (`latest` when absent; digests are dropped).
pub(crate) fn split_image(image: &str) -> (&str, &str) {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    match without_digest[last_slash..].rfind(':') {
        Some(i) => (
            &without_digest[..last_slash + i],
            &without_digest[last_slash + i + 1..],
        ),
        None => (without_digest, "latest"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_images() {
        assert_eq!(
            split_image("watchparty-backend:latest"),
            ("watchparty-backend", "latest")
        );
        assert_eq!(
            split_image("localhost:5000/app"),
            ("localhost:5000/app", "latest")
        );
        assert_eq!(
            split_image("localhost:5000/app:v1"),
            ("localhost:5000/app", "v1")
        );
        assert_eq!(split_image("redis"), ("redis", "latest"));
    }
}
