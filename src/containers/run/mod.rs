//! Running a release: recreate what changed, gate on health, roll back on failure.
//!
//! [`Engine::up`] is called only after every build of the release succeeded. It walks the services
//! in `depends_on` order and, for each one, compares the wanted container (image id plus the
//! container configuration, hashed into the `deployd.config-hash` label) with the running one:
//! unchanged services are left alone; changed ones are stopped, removed and created again as
//! `<project>-<service>-1` with the labels `docker compose` uses (`com.docker.compose.project`,
//! `com.docker.compose.service`, ...) plus `deployd.release`, so deployd, `docker compose ps` and
//! operators all find them. Each service must become healthy (its healthcheck, or running for
//! `health_grace` when it has none) within `health_timeout` before the next one starts, which also
//! satisfies `condition: service_healthy`.
//!
//! When a service does not become healthy, the containers created by the attempt are removed and
//! the previous release is started again from its release-tagged images
//! (`<image-repo>:<previous-release-id>`) with its own compose configuration; the error says the
//! release was rolled back (exit 75). [`Engine::rollback`] does the same on demand.

use std::time::Duration;

use super::ReleaseRef;
use super::compose::Project;
use super::engine::Engine;
use super::error::ContainerError;
use crate::config::ContainersConfig;

mod config;
mod create;
mod existing;
mod health;
mod mounts;
mod objects;

use self::create::ServiceError;

/// Label: the compose project.
const LABEL_PROJECT: &str = "com.docker.compose.project";
/// Label: the compose service.
const LABEL_SERVICE: &str = "com.docker.compose.service";
/// Label: the release a container was created for.
const LABEL_RELEASE: &str = "deployd.release";
/// Label: hash of the image id and container configuration.
const LABEL_CONFIG_HASH: &str = "deployd.config-hash";

/// Labels from the compose file plus deployd's own, which win.
fn with_labels(
    from_file: &std::collections::BTreeMap<String, String>,
    own: impl IntoIterator<Item = (String, String)>,
) -> std::collections::HashMap<String, String> {
    from_file
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .chain(own)
        .collect()
}

/// What `up` or `rollback` did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpReport {
    /// The release that was started.
    pub release: String,
    /// One entry per service, in start order.
    pub services: Vec<ServiceUp>,
    /// Containers of services no longer in the compose file that were removed.
    pub orphans_removed: Vec<String>,
}

/// What happened to one service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceUp {
    /// The compose service.
    pub service: String,
    /// Container name, `<project>-<service>-1`.
    pub container: String,
    /// Container id.
    pub container_id: String,
    /// Image reference the container runs.
    pub image: String,
    /// Id of that image.
    pub image_id: String,
    /// Whether the container was created, replaced or kept.
    pub action: UpAction,
    /// Time from start to healthy.
    pub became_healthy_after: Duration,
}

/// Whether a container was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpAction {
    /// No container existed for the service.
    Created,
    /// The image or configuration changed.
    Recreated,
    /// The running container already matched.
    Unchanged,
}

/// Why starting a release stopped, and what it had created by then.
struct StartFailure {
    /// The service that failed (`(networks)` for the project's networks and volumes).
    service: String,
    reason: ServiceError,
    /// Ids of the containers created before the failure.
    created: Vec<String>,
}

impl Engine {
    /// Start `release` (already built), replacing what changed, health-gated. On failure the
    /// containers it created are removed and `previous` is started again.
    pub async fn up(
        &self,
        project: &Project,
        release: &ReleaseRef<'_>,
        previous: Option<(&Project, &ReleaseRef<'_>)>,
        settings: &ContainersConfig,
    ) -> Result<UpReport, ContainerError> {
        // Volumes and networks that are not the app's own stop the release before anything is
        // touched.
        self.ensure_networks_and_volumes(project).await?;
        let failure = match self.start_release(project, release, settings).await {
            Ok(mut report) => {
                report.orphans_removed = self.remove_orphans(project).await?;
                return Ok(report);
            }
            Err(f) => f,
        };
        // Unhealthy containers are the release's fault; an engine that failed is not, and the
        // error must say which it was.
        let engine_failure = failure.reason.engine_failure();
        tracing::warn!(
            project = %project.name,
            release = release.id,
            service = %failure.service,
            reason = %failure.reason,
            engine_failure = engine_failure.is_some(),
            "release did not start, rolling back"
        );
        self.remove_containers(&failure.created).await;
        let start_failed =
            |rolled_back_to: Option<&str>, unavailable| ContainerError::StartFailed {
                release: release.id.to_string(),
                service: failure.service.clone(),
                reason: failure.reason.to_string(),
                rolled_back_to: rolled_back_to.map(str::to_string),
                unavailable,
            };
        let Some((prev_project, prev_release)) = previous else {
            return Err(match engine_failure {
                Some(unavailable) => start_failed(None, unavailable),
                None => ContainerError::UnhealthyNoPrevious {
                    release: release.id.to_string(),
                    service: failure.service,
                    reason: failure.reason.to_string(),
                },
            });
        };
        match self
            .start_release(prev_project, prev_release, settings)
            .await
        {
            Ok(_) => {
                if let Err(e) = self.remove_orphans(prev_project).await {
                    tracing::warn!(error = %e, "could not remove containers of the failed release");
                }
                tracing::info!(
                    project = %project.name,
                    release = prev_release.id,
                    "previous release is serving again"
                );
                Err(match engine_failure {
                    Some(unavailable) => start_failed(Some(prev_release.id), unavailable),
                    None => ContainerError::RolledBack {
                        release: release.id.to_string(),
                        previous: prev_release.id.to_string(),
                        service: failure.service,
                        reason: failure.reason.to_string(),
                    },
                })
            }
            Err(rollback) => Err(ContainerError::RollbackFailed {
                release: release.id.to_string(),
                previous: prev_release.id.to_string(),
                service: failure.service,
                reason: failure.reason.to_string(),
                rollback_error: format!("service `{}`: {}", rollback.service, rollback.reason),
            }),
        }
    }

    /// Start a given release's containers (typically the previous one) from its release-tagged
    /// images, health-gated, and remove containers of services it does not have.
    pub async fn rollback(
        &self,
        project: &Project,
        release: &ReleaseRef<'_>,
        settings: &ContainersConfig,
    ) -> Result<UpReport, ContainerError> {
        match self.start_release(project, release, settings).await {
            Ok(mut report) => {
                report.orphans_removed = self.remove_orphans(project).await?;
                Ok(report)
            }
            Err(f) => Err(ContainerError::Unhealthy {
                release: release.id.to_string(),
                service: f.service,
                reason: f.reason.to_string(),
            }),
        }
    }

    /// Start every service in order, each health-gated before the next.
    async fn start_release(
        &self,
        project: &Project,
        release: &ReleaseRef<'_>,
        settings: &ContainersConfig,
    ) -> Result<UpReport, StartFailure> {
        let mut report = UpReport {
            release: release.id.to_string(),
            ..Default::default()
        };
        let mut created = Vec::new();
        if let Err(e) = self.ensure_networks_and_volumes(project).await {
            return Err(StartFailure {
                service: "(networks)".into(),
                reason: e.into(),
                created,
            });
        }
        for service in &project.services {
            // `depends_on: {x: {restart: true}}`: recreated along with `x`.
            let force = service.depends_on.iter().any(|d| {
                d.restart
                    && report
                        .services
                        .iter()
                        .any(|u| u.service == d.service && u.action != UpAction::Unchanged)
            });
            match self
                .start_service(project, service, release, settings, force, &mut created)
                .await
            {
                Ok(up) => report.services.push(up),
                Err(reason) => {
                    return Err(StartFailure {
                        service: service.name.clone(),
                        reason,
                        created,
                    });
                }
            }
        }
        Ok(report)
    }
}
