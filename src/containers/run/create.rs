//! Starting one service: reuse the running container when nothing changed, else replace it,
//! then wait for it to become healthy.

use std::collections::HashMap;
use std::time::Instant;

use bollard::models::{EndpointSettings, NetworkCreateRequest, VolumeCreateRequest};
use bollard::query_parameters::{CreateContainerOptionsBuilder, CreateImageOptionsBuilder};
use futures_util::StreamExt;

use super::config::{container_config, container_name};
use super::existing::label;
use super::health::HealthError;
use super::{LABEL_CONFIG_HASH, LABEL_PROJECT, LABEL_RELEASE, LABEL_SERVICE, ServiceUp, UpAction};
use crate::config::ContainersConfig;
use crate::containers::ReleaseRef;
use crate::containers::build::release_image;
use crate::containers::compose::{NamedObject, Project, Service};
use crate::containers::engine::Engine;
use crate::containers::error::{ContainerError, is_engine_failure, is_not_found};

/// Why one service of a release did not start or become healthy.
#[derive(Debug, thiserror::Error)]
pub(super) enum ServiceError {
    /// Its image, its networks and volumes, or the containers it replaces.
    #[error(transparent)]
    Engine(#[from] ContainerError),
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
    /// The container started but did not become healthy.
    #[error("container {container}: {source}")]
    Unhealthy {
        container: String,
        source: HealthError,
    },
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
            ServiceError::Unhealthy { .. } => None,
        }
    }
}

impl Engine {
    /// Start one service of `release`: keep its container when it runs this very image and
    /// configuration, else replace it; either way wait until it is healthy. Containers created
    /// here are added to `created`, so a failed release can remove them.
    pub(super) async fn start_service(
        &self,
        project: &Project,
        service: &Service,
        release: &ReleaseRef<'_>,
        settings: &ContainersConfig,
        created: &mut Vec<String>,
    ) -> Result<ServiceUp, ServiceError> {
        let image = if service.build.is_some() {
            release_image(service, release.id)
        } else {
            service.image.clone()
        };
        let image_id = self.ensure_image(service, &image).await?;
        let (mut body, hash) = container_config(project, service, &image, &image_id);
        let name = container_name(&project.name, &service.name);
        let unhealthy = |source| ServiceError::Unhealthy {
            container: name.clone(),
            source,
        };
        let existing = self
            .project_containers(&project.name)
            .await?
            .into_iter()
            .filter(|c| label(c, LABEL_SERVICE) == Some(service.name.as_str()))
            .collect::<Vec<_>>();
        let matching = existing.iter().find(|c| {
            label(c, LABEL_CONFIG_HASH) == Some(hash.as_str())
                && c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
        });
        if let (Some(c), 1) = (matching, existing.len()) {
            let id = c.id.clone().unwrap_or_default();
            let waited = self
                .wait_healthy(&id, settings, Instant::now())
                .await
                .map_err(unhealthy)?;
            tracing::info!(project = %project.name, service = %service.name, container = %name, "unchanged");
            return Ok(ServiceUp {
                service: service.name.clone(),
                container: name,
                container_id: id,
                image,
                image_id,
                action: UpAction::Unchanged,
                became_healthy_after: waited,
            });
        }
        let action = if existing.is_empty() {
            UpAction::Created
        } else {
            UpAction::Recreated
        };
        for c in &existing {
            let id = c.id.clone().unwrap_or_default();
            self.stop_and_remove(&id).await?;
        }
        if let Some(labels) = body.labels.as_mut() {
            labels.insert(LABEL_RELEASE.into(), release.id.to_string());
        }
        let id = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                body,
            )
            .await
            .map_err(|source| ServiceError::Create {
                container: name.clone(),
                source,
            })?
            .id;
        created.push(id.clone());
        for net in service.networks.iter().skip(1) {
            let engine_net = project
                .networks
                .iter()
                .find(|n| &n.key == net)
                .map(|n| n.engine_name.clone())
                .unwrap_or_default();
            self.docker
                .connect_network(
                    &engine_net,
                    bollard::models::NetworkConnectRequest {
                        container: id.clone(),
                        endpoint_config: Some(EndpointSettings {
                            aliases: Some(vec![service.name.clone()]),
                            ..Default::default()
                        }),
                    },
                )
                .await
                .map_err(|source| ServiceError::ConnectNetwork {
                    container: name.clone(),
                    network: engine_net.clone(),
                    source,
                })?;
        }
        let started = Instant::now();
        self.docker
            .start_container(&id, None)
            .await
            .map_err(|source| ServiceError::Start {
                container: name.clone(),
                source,
            })?;
        let waited = self
            .wait_healthy(&id, settings, started)
            .await
            .map_err(unhealthy)?;
        tracing::info!(
            project = %project.name,
            service = %service.name,
            container = %name,
            image = %image,
            release = release.id,
            after = ?waited,
            "container healthy"
        );
        Ok(ServiceUp {
            service: service.name.clone(),
            container: name,
            container_id: id,
            image,
            image_id,
            action,
            became_healthy_after: waited,
        })
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
        let mut pull = self.docker.create_image(
            Some(CreateImageOptionsBuilder::new().from_image(image).build()),
            None,
            None,
        );
        while let Some(item) = pull.next().await {
            item.map_err(|e| missing(e.to_string()))?;
        }
        self.image_id(image)
            .await?
            .ok_or_else(|| missing("the pull did not produce it".into()))
    }

    /// Create the project's networks and volumes that do not exist yet; an external one must
    /// exist already.
    pub(super) async fn ensure_networks_and_volumes(
        &self,
        project: &Project,
    ) -> Result<(), ContainerError> {
        let labels = |kind: &str, obj: &NamedObject| -> HashMap<String, String> {
            [
                (LABEL_PROJECT.to_string(), project.name.clone()),
                (format!("com.docker.compose.{kind}"), obj.key.clone()),
            ]
            .into()
        };
        let creating = |kind: &str, obj: &NamedObject| {
            let action = format!("creating {kind} {}", obj.engine_name);
            move |e| ContainerError::engine(action, e)
        };
        for net in &project.networks {
            let found = self.docker.inspect_network(&net.engine_name, None).await;
            if !needs_creating(found, net, "network")? {
                continue;
            }
            self.docker
                .create_network(NetworkCreateRequest {
                    name: net.engine_name.clone(),
                    driver: net.driver.clone(),
                    labels: Some(labels("network", net)),
                    ..Default::default()
                })
                .await
                .map_err(creating("network", net))?;
        }
        for vol in &project.volumes {
            let found = self.docker.inspect_volume(&vol.engine_name).await;
            if !needs_creating(found, vol, "volume")? {
                continue;
            }
            self.docker
                .create_volume(VolumeCreateRequest {
                    name: Some(vol.engine_name.clone()),
                    labels: Some(labels("volume", vol)),
                    ..Default::default()
                })
                .await
                .map_err(creating("volume", vol))?;
        }
        Ok(())
    }
}

/// Whether a network or volume (`kind`) has to be created, from the engine's answer to looking
/// it up: not when it exists; an error when the lookup failed, or when it is missing and external
/// (managed outside deployd).
fn needs_creating<T>(
    lookup: Result<T, bollard::errors::Error>,
    obj: &NamedObject,
    kind: &str,
) -> Result<bool, ContainerError> {
    match lookup {
        Ok(_) => Ok(false),
        Err(e) if is_not_found(&e) && !obj.external => Ok(true),
        Err(e) => Err(ContainerError::engine(
            format!("looking up {kind} {}", obj.engine_name),
            e,
        )),
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
        };
        assert_eq!(
            e.to_string(),
            "container app-web-1: healthcheck failed (exit 1: refused)"
        );
    }

    #[test]
    fn only_missing_managed_objects_are_created() {
        let obj = |external| NamedObject {
            key: "data".into(),
            engine_name: "app_data".into(),
            external,
            driver: None,
        };
        let missing = || {
            Err::<(), _>(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message: "no such volume".into(),
            })
        };
        assert!(!needs_creating(Ok(()), &obj(false), "volume").unwrap());
        assert!(needs_creating(missing(), &obj(false), "volume").unwrap());
        let e = needs_creating(missing(), &obj(true), "volume").unwrap_err();
        assert!(e.to_string().contains("looking up volume app_data"), "{e}");
    }
}
