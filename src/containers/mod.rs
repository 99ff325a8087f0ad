//! The container stage: build a release's images and run them, health-gated, with rollback.
//!
//! A release directory ships a `docker-compose.yml` and Dockerfiles. This module turns them into
//! running containers through the Docker Engine API (bollard), in four steps the agent calls in
//! order:
//!
//! 1. [`Engine::load_project`] parses and validates the compose file (the forms listed in
//!    the compose module; any other key is an error naming the service, the key and why, exit 65),
//!    interpolates variables from the release's `.env` and the environment file, and refuses
//!    what would leave the app's boundary. No engine call, nothing built.
//! 2. [`Engine::build`] builds every service with `build:` with BuildKit (the classic builder where
//!    the engine has none), `cache_from` the previous release's images, and reports cache hits per
//!    service. A failed build stops here:
//!    nothing has been stopped, the serving release keeps serving.
//! 3. [`Engine::up`] recreates only the services whose image or configuration changed, in
//!    `depends_on` order, waits for each to be healthy (or, for a one-shot job, to exit 0), and on
//!    failure removes what it created and starts the previous release again from its
//!    release-tagged images (exit 75). Containers run hardened (`no-new-privileges`, a pids
//!    limit, dropped capabilities) with release files bound read-only, each bind source checked
//!    for symlinks right before create and start.
//! 4. [`Engine::retain`] removes the images of releases no longer kept.
//!
//! [`Engine::rollback`] starts a given release on demand and [`Engine::clear_cache`] removes the
//! project's images, the builder cache and the app cache paths.
//!
//! Images are tagged `<image-repo>:<release-id>` besides their compose `image:`; containers are
//! named `<project>-<service>-1` and labelled like `docker compose` does, plus `deployd.release`.
//! [`Engine::connect`] waits for the engine at startup and records the builder choice and why in
//! a [`BuilderDecision`].

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::ContainersConfig;

pub(crate) mod build;
pub(crate) mod cache;
pub(crate) mod compose;
pub mod context;
pub(crate) mod engine;
pub(crate) mod error;
pub(crate) mod run;
pub(crate) mod socket;

pub use build::{BuildReport, OnStep, ServiceBuild};
pub use cache::ClearReport;
pub use compose::beneath::method as bind_resolver;
pub use compose::{
    BuildSpec, DependCondition, Dependency, HealthSpec, LoggingSpec, MountSpec, NamedObject,
    PortSpec, Project, Resources, RunOptions, Service, ServiceNetwork,
};
pub use engine::{Builder, BuilderDecision, Engine, EngineFacts};
pub use error::ContainerError;
pub use run::{ServiceUp, UpAction, UpReport};

/// Marker `clear_cache` leaves in release directories: the next build from one of them as the
/// previous release runs without cache.
pub(crate) const CACHE_CLEARED_MARKER: &str = ".deployd-cache-cleared";

/// A release as the container stage sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseRef<'a> {
    /// Release id: names the release-tagged images (`<image-repo>:<id>`), so it must be a valid
    /// image tag.
    pub id: &'a str,
    /// The unpacked release directory.
    pub dir: &'a Path,
    /// The commit it was built from, passed as `GIT_COMMIT_HASH`.
    pub commit: Option<&'a str>,
}

impl Engine {
    /// Parse and validate a release's compose file; no engine calls.
    pub fn load_project(
        project: &str,
        release: &ReleaseRef<'_>,
        env: &BTreeMap<String, String>,
        settings: &ContainersConfig,
    ) -> Result<Project, ContainerError> {
        if !compose::valid_tag(release.id) {
            return Err(ContainerError::InvalidValue {
                path: release.dir.join(&settings.compose_file),
                service: "(release)".into(),
                key: "id".into(),
                message: format!(
                    "release id `{}` cannot be an image tag (letters, digits, `_`, `.`, `-`)",
                    release.id
                ),
            });
        }
        compose::load(project, release.dir, env, settings)
    }
}
