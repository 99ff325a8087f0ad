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
    /// Services in start order (dependencies first); services of inactive profiles are left out.
    pub services: Vec<Service>,
    /// Named volumes: compose name and engine name.
    pub volumes: Vec<NamedObject>,
    /// Networks: compose name and engine name; `default` is always present.
    pub networks: Vec<NamedObject>,
    /// Services left out because none of their profiles is active.
    pub inactive: Vec<String>,
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
    /// Listed in `[containers] allowed_external`: it may belong to something else.
    pub allowed_external: bool,
    /// Network driver (networks only; `bridge` when unset).
    pub driver: Option<String>,
    /// `internal: true` (networks only): no route outside the network.
    pub internal: bool,
    /// Labels from the compose file (deployd adds its own when it creates the object).
    pub labels: BTreeMap<String, String>,
}

/// One service of the project.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// The service's key under `services`.
    pub name: String,
    /// How to build the image, when the service is built from the release.
    pub build: Option<BuildSpec>,
    /// The image reference the service runs (`image:`, or `<project>-<service>` for built
    /// services; a built image is always under the project's own repository names).
    pub image: String,
    /// `command:` as words; `None` keeps the image's.
    pub command: Option<Vec<String>>,
    /// `entrypoint:` as words; `None` keeps the image's.
    pub entrypoint: Option<Vec<String>>,
    /// Final environment: `env_file` entries, overridden by `environment`.
    pub environment: BTreeMap<String, String>,
    /// Published ports.
    pub ports: Vec<PortSpec>,
    /// Ports exposed to the project's networks only (`expose:`), as `PORT/PROTO`.
    pub expose: Vec<String>,
    /// Volumes, release binds (secrets and configs included), anonymous volumes, tmpfs.
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
    /// The networks the service joins, in order, with their aliases.
    pub networks: Vec<ServiceNetwork>,
    /// Everything else about how the container runs.
    pub run: RunOptions,
}

/// One network a service joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceNetwork {
    /// The network's compose name.
    pub key: String,
    /// Extra DNS names on that network (`aliases`, and `container_name`); the service name
    /// always resolves.
    pub aliases: Vec<String>,
}

/// How a service's container runs, beyond image, command and mounts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunOptions {
    /// `user:` (`uid[:gid]` or names).
    pub user: Option<String>,
    /// `hostname:`.
    pub hostname: Option<String>,
    /// `domainname:`.
    pub domainname: Option<String>,
    /// `working_dir:`.
    pub working_dir: Option<String>,
    /// `init:`: run an init process as PID 1.
    pub init: Option<bool>,
    /// `tty:`.
    pub tty: bool,
    /// `stdin_open:`.
    pub stdin_open: bool,
    /// `read_only:`: the container's root filesystem is read-only.
    pub read_only: bool,
    /// `stop_signal:`.
    pub stop_signal: Option<String>,
    /// `stop_grace_period:`: how long a stop waits before killing.
    pub stop_grace_period: Option<Duration>,
    /// `platform:` (`os/arch[/variant]`).
    pub platform: Option<String>,
    /// `logging:`.
    pub logging: Option<LoggingSpec>,
    /// `extra_hosts:` as `host:ip`.
    pub extra_hosts: Vec<String>,
    /// `tmpfs:`: mount path and mount options.
    pub tmpfs: BTreeMap<String, String>,
    /// `ulimits:`: name and (soft, hard).
    pub ulimits: BTreeMap<String, (i64, i64)>,
    /// `mem_limit`, `cpus`, `pids_limit`, ... and `deploy.resources`.
    pub resources: Resources,
    /// `cap_drop:` (added to `[containers] cap_drop`).
    pub cap_drop: Vec<String>,
    /// `shm_size:` in bytes.
    pub shm_size: Option<i64>,
}

/// Resource limits of a service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// Memory limit in bytes (`mem_limit`, `deploy.resources.limits.memory`).
    pub memory: Option<i64>,
    /// Soft memory limit in bytes (`mem_reservation`, `deploy.resources.reservations.memory`).
    pub memory_reservation: Option<i64>,
    /// Memory plus swap in bytes (`memswap_limit`; -1 unlimited).
    pub memory_swap: Option<i64>,
    /// CPUs in billionths (`cpus`, `deploy.resources.limits.cpus`).
    pub nano_cpus: Option<i64>,
    /// Relative CPU weight (`cpu_shares`).
    pub cpu_shares: Option<i64>,
    /// CPUs the container may run on (`cpuset`).
    pub cpuset: Option<String>,
    /// Process limit (`pids_limit`, `deploy.resources.limits.pids`); never above
    /// `[containers] pids_limit`.
    pub pids: Option<i64>,
}

/// `logging:` of a service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoggingSpec {
    /// The log driver; `None` keeps the engine's default.
    pub driver: Option<String>,
    /// Driver options (`max-size`, `max-file`, ...).
    pub options: BTreeMap<String, String>,
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
    /// Last port of a host range (`8000-8010:80`): the engine picks a free one in it.
    pub published_last: Option<u16>,
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
        /// Do not copy the image's files into an empty volume (`nocopy`).
        nocopy: bool,
    },
    /// An anonymous volume (`- /app/node_modules`): created with the container, removed with it.
    Anonymous {
        /// Absolute path in the container.
        target: String,
    },
    /// A directory or file of the release, always mounted read-only (a release is immutable).
    Bind {
        /// Absolute path inside the release directory.
        source: PathBuf,
        /// Absolute path in the container.
        target: String,
        /// The compose file asked for a writable bind (mounted read-only all the same; a
        /// failing container names it).
        requested_writable: bool,
    },
    /// A tmpfs (`type: tmpfs` in the long form of `volumes`).
    Tmpfs {
        /// Absolute path in the container.
        target: String,
        /// Size limit in bytes.
        size: Option<i64>,
        /// File mode of the root directory.
        mode: Option<i64>,
    },
}

impl MountSpec {
    /// Where the mount appears in the container.
    pub fn target(&self) -> &str {
        match self {
            MountSpec::Volume { target, .. }
            | MountSpec::Anonymous { target }
            | MountSpec::Bind { target, .. }
            | MountSpec::Tmpfs { target, .. } => target,
        }
    }
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
    /// Time between checks during `start_period` (engines with API 1.44 and later).
    pub start_interval: Option<Duration>,
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
    /// `restart: true`: recreate this service whenever the dependency is recreated.
    pub restart: bool,
    /// `required: false`: the dependency may be missing (left out by profiles).
    pub required: bool,
}

/// When a dependency counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DependCondition {
    /// `service_started` (also the list form).
    Started,
    /// `service_healthy`.
    Healthy,
    /// `service_completed_successfully`: the dependency is a one-shot job that must exit 0.
    CompletedSuccessfully,
}

impl Project {
    /// Whether a service runs to completion (another service waits for it to exit 0).
    pub fn is_job(&self, service: &str) -> bool {
        self.services.iter().any(|s| {
            s.depends_on.iter().any(|d| {
                d.service == service && d.condition == DependCondition::CompletedSuccessfully
            })
        })
    }
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
