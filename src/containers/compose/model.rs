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
    pub name: String,
    /// How to build the image, when the service is built from the release.
    pub build: Option<BuildSpec>,
    /// The image reference the service runs (`image:`, or `<project>-<service>` for built services).
    pub image: String,
    pub command: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    /// Final environment: `env_file` entries, overridden by `environment`.
    pub environment: BTreeMap<String, String>,
    pub ports: Vec<PortSpec>,
    pub volumes: Vec<MountSpec>,
    pub restart: Option<String>,
    pub healthcheck: Option<HealthSpec>,
    pub depends_on: Vec<Dependency>,
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
    pub args: BTreeMap<String, String>,
    pub cache_from: Vec<String>,
    pub target: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// One published port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub host_ip: Option<String>,
    /// Host port; `None` lets the engine choose.
    pub published: Option<u16>,
    pub target: u16,
    pub protocol: String,
}

/// One mount of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSpec {
    /// A named volume (engine name) mounted at `target`.
    Volume {
        name: String,
        target: String,
        read_only: bool,
    },
    /// A directory or file of the release mounted at `target`.
    Bind {
        source: PathBuf,
        target: String,
        read_only: bool,
    },
}

/// `healthcheck:` of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    /// `["CMD", ...]`, `["CMD-SHELL", "..."]` or `["NONE"]` (disabled).
    pub test: Vec<String>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub retries: Option<u32>,
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
    pub service: String,
    pub condition: DependCondition,
}

/// When a dependency counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DependCondition {
    Started,
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
