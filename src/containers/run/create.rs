//! Starting one service: reuse the running container when nothing changed, else replace it,
//! then wait for it to become healthy (or, for a one-shot job, to exit 0).
//!
//! Release binds are checked (no symlink component, beneath the release directory) immediately
//! before the container is created and again immediately before it is started.

use std::time::Instant;

use bollard::models::{ContainerSummaryStateEnum, NetworkConnectRequest};
use bollard::query_parameters::{CreateContainerOptionsBuilder, CreateImageOptionsBuilder};
use futures_util::StreamExt;

use super::config::{container_config, container_name, endpoint, engine_network};
use super::existing::label;
use super::health::HealthError;
use super::mounts::{BindRefused, engine_mounts, secure_binds};
use super::{LABEL_CONFIG_HASH, LABEL_RELEASE, LABEL_SERVICE, ServiceUp, UpAction};
use crate::config::ContainersConfig;
use crate::containers::ReleaseRef;
use crate::containers::build::release_image;
use crate::containers::compose::{MountSpec, Project, Service};
use crate::containers::engine::Engine;
use crate::containers::error::{ContainerError, is_engine_failure};

/// Why one service of a release did not start or become healthy.
#[derive(Debug, thiserror::Error)]
pub(super) enum ServiceError {
    /// Its image, its networks and volumes, or the containers it replaces.
    #[error(transparent)]
    Engine(#[from] ContainerError),
    /// A release bind did not pass the check before create or start.
    #[error("container {container}: {source}")]
    Bind {
        container: String,
        source: BindRefused,
    },
    /// The engine refused to create the container.
    #[error("creating container {container}: {source}")]
    Create {
        container: String,
        source: bollard::errors::Error,
    },
    /// The container could not join one of its networks.
    #[error("connecting {container} to network {network}: {source}")]
    ConnectNetwork {
        container: String,
        network: String,
        source: bollard::errors::Error,
    },
    /// The engine refused to start the container.
    #[error("starting container {container}: {source}")]
    Start {
        container: String,
        source: bollard::errors::Error,
    },
    /// The container started but did not become healthy; `hint` names release binds the
    /// compose file wanted writable, which are read-only.
    #[error("container {container}: {source}{hint}")]
    Unhealthy {
        container: String,
        source: HealthError,
        hint: String,
    },
}

/// What the compose file asked to be writable that is mounted read-only, as a hint for a
/// container that failed.
fn read_only_hint(service: &Service) -> String {
    let binds: Vec<String> = service
        .volumes
        .iter()
        .filter_map(|m| match m {
            MountSpec::Bind {
                source,
                target,
                requested_writable: true,
            } => Some(format!("{}:{target}", source.display())),
            _ => None,
        })
        .collect();
    if binds.is_empty() {
        String::new()
    } else {
        format!(
            "; note: release files are mounted read-only, including {} (keep writable data in a named volume)",
            binds.join(", ")
        )
    }
}

impl ServiceError {
    /// `Some(unavailable)` when the engine failed (it could not pull, create, connect or
    /// start, or stopped answering), `unavailable` when it was unreachable or answered with a
    /// server error; `None` when the service itself did not become healthy.
    pub(super) fn engine_failure(&self) -> Option<bool> {
        match self {
            ServiceError::Engine(ContainerError::Engine { source, .. })
            | ServiceError::Create { source, .. }
            | ServiceError::ConnectNetwork { source, .. }
            | ServiceError::Start { source, .. }
            | ServiceError::Unhealthy {
                source: HealthError::Inspect(source),
                ..
            } => Some(is_engine_failure(source)),
            // An image that could not be pulled, a lookup that failed.
            ServiceError::Engine(_) => Some(true),
            // A release bind that turned into a symlink after validation: refused before the
            // engine saw it; not the container's health.
            ServiceError::Bind { .. } => Some(false),
            ServiceError::Unhealthy { .. } => None,
        }
    }
}

impl Engine {
    /// Start one service of `release`: keep its container when it runs this very image and
    /// configuration (and `force` is not set), else replace it; either way wait until it is
    /// healthy, or has exited 0 for a job. Containers created here are added to `created`, so a
    /// failed release can remove them.
    pub(super) async fn start_service(
        &self,
        project: &Project,
        service: &Service,
        release: &ReleaseRef<'_>,
        settings: &ContainersConfig,
        force: bool,
        created: &mut Vec<String>,
    ) -> Result<ServiceUp, ServiceError> {
        let image = if service.build.is_some() {
            release_image(service, release.id)
        } else {
            service.image.clone()
        };
        let image_id = self.ensure_image(service, &image).await?;
        let (mut body, hash) = container_config(project, service, &image, &image_id, settings);
        let name = container_name(&project.name, &service.name);
        let job = project.is_job(&service.name);
        let unhealthy = |source| ServiceError::Unhealthy {
            container: name.clone(),
            source,
            hint: read_only_hint(service),
        };
        let up = |container_id: String, action, waited| ServiceUp {
            service: service.name.clone(),
            container: name.clone(),
            container_id,
            image: image.clone(),
            image_id: image_id.clone(),
            action,
            became_healthy_after: waited,
        };
        let existing = self
            .project_containers(&project.name)
            .await?
            .into_iter()
            .filter(|c| label(c, LABEL_SERVICE) == Some(service.name.as_str()))
            .collect::<Vec<_>>();
        let matching = existing.iter().find(|c| {
            label(c, LABEL_CONFIG_HASH) == Some(hash.as_str())
                && match c.state {
                    Some(ContainerSummaryStateEnum::RUNNING) => !job,
                    Some(ContainerSummaryStateEnum::EXITED) => {
                        job && c
                            .status
                            .as_deref()
                            .is_some_and(|s| s.starts_with("Exited (0)"))
                    }
                    _ => false,
                }
        });
        if let (Some(c), 1, false) = (matching, existing.len(), force) {
            let id = c.id.clone().unwrap_or_default();
            let waited = if job {
                Default::default()
            } else {
                self.wait_healthy(&id, settings, Instant::now())
                    .await
                    .map_err(unhealthy)?
            };
            tracing::info!(project = %project.name, service = %service.name, container = %name, "unchanged");
            return Ok(up(id, UpAction::Unchanged, waited));
        }
        let action = if existing.is_empty() {
            UpAction::Created
        } else {
            UpAction::Recreated
        };
        let bind_refused = |source| ServiceError::Bind {
            container: name.clone(),
            source,
        };
        // Checked before the old container is stopped (a refused bind leaves it serving), and
        // again immediately before create.
        let secure = |body: &mut bollard::models::ContainerCreateBody| match body
            .host_config
            .as_mut()
            .and_then(|h| h.mounts.as_mut())
        {
            Some(mounts) => secure_binds(project, service, mounts).map_err(bind_refused),
            None => Ok(()),
        };
        secure(&mut body)?;
        for c in &existing {
            let id = c.id.clone().unwrap_or_default();
            self.stop_and_remove(&id).await?;
        }
        if let Some(labels) = body.labels.as_mut() {
            labels.insert(LABEL_RELEASE.into(), release.id.to_string());
        }
        secure(&mut body)?;
        let mut options = CreateContainerOptionsBuilder::new().name(&name);
        if let Some(p) = &service.run.platform {
            options = options.platform(p);
        }
        let id = self
            .docker
            .create_container(Some(options.build()), body)
            .await
            .map_err(|source| ServiceError::Create {
                container: name.clone(),
                source,
            })?
            .id;
        created.push(id.clone());
        self.connect_other_networks(project, service, &id, &name)
            .await?;
        // The container names the checked paths; check them again right before the engine
        // mounts them.
        secure_binds(project, service, &mut engine_mounts(service)).map_err(bind_refused)?;
        let started = Instant::now();
        self.docker
            .start_container(&id, None)
            .await
            .map_err(|source| ServiceError::Start {
                container: name.clone(),
                source,
            })?;
        let waited = if job {
            self.wait_completed(&id, settings, started).await
        } else {
            self.wait_healthy(&id, settings, started).await
        }
        .map_err(unhealthy)?;
        tracing::info!(
            project = %project.name,
            service = %service.name,
            container = %name,
            image = %image,
            release = release.id,
            after = ?waited,
            job,
            "container healthy"
        );
        Ok(up(id, action, waited))
    }

    /// Join the service's networks after the first (which the container was created on).
    async fn connect_other_networks(
        &self,
        project: &Project,
        service: &Service,
        id: &str,
        name: &str,
    ) -> Result<(), ServiceError> {
        for net in service.networks.iter().skip(1) {
            let engine_net = engine_network(project, &net.key).unwrap_or_default();
            self.docker
                .connect_network(
                    &engine_net,
                    NetworkConnectRequest {
                        container: id.to_string(),
                        endpoint_config: Some(endpoint(service, net)),
                    },
                )
                .await
                .map_err(|source| ServiceError::ConnectNetwork {
                    container: name.to_string(),
                    network: engine_net.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// The id of the image a service runs, pulling it when it is not built by deployd.
    async fn ensure_image(&self, service: &Service, image: &str) -> Result<String, ContainerError> {
        if let Some(id) = self.image_id(image).await? {
            return Ok(id);
        }
        let missing = |message: String| ContainerError::ImageMissing {
            service: service.name.clone(),
            image: image.to_string(),
            message,
        };
        if service.build.is_some() {
            return Err(missing("it was not built for this release".into()));
        }
        tracing::info!(service = %service.name, image, "pulling image");
        let mut options = CreateImageOptionsBuilder::new().from_image(image);
        if let Some(p) = &service.run.platform {
            options = options.platform(p);
        }
        let mut pull = self.docker.create_image(Some(options.build()), None, None);
        while let Some(item) = pull.next().await {
            item.map_err(|e| missing(e.to_string()))?;
        }
        self.image_id(image)
            .await?
            .ok_or_else(|| missing("the pull did not produce it".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unhealthy_service_names_its_container() {
        let e = ServiceError::Unhealthy {
            container: "app-web-1".into(),
            source: HealthError::CheckFailed {
                last: "exit 1: refused".into(),
            },
            hint: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "container app-web-1: healthcheck failed (exit 1: refused)"
        );
    }
}
