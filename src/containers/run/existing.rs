//! The containers a project already has: finding them, stopping and removing them.

use std::collections::HashMap;

use bollard::models::ContainerSummary;
use bollard::query_parameters::{
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};

use super::{LABEL_PROJECT, LABEL_SERVICE};
use crate::containers::compose::Project;
use crate::containers::engine::Engine;
use crate::containers::error::{ContainerError, is_not_found};

impl Engine {
    /// Every container of a project (running or not), found by its compose project label.
    pub(crate) async fn project_containers(
        &self,
        project: &str,
    ) -> Result<Vec<ContainerSummary>, ContainerError> {
        let filters: HashMap<&str, Vec<String>> =
            [("label", vec![format!("{LABEL_PROJECT}={project}")])].into();
        self.docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(|e| ContainerError::engine(format!("listing containers of {project}"), e))
    }

    /// Stop a container (with its own stop signal, killed after its own grace period:
    /// `stop_signal` and `stop_grace_period`, 10 s by default) and remove it with its anonymous
    /// volumes; one that is gone already counts as removed.
    pub(super) async fn stop_and_remove(&self, id: &str) -> Result<(), ContainerError> {
        match self
            .docker
            .stop_container(id, Some(StopContainerOptionsBuilder::new().build()))
            .await
        {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(()),
            // 304: already stopped.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => {}
            Err(e) => {
                return Err(ContainerError::engine(
                    format!("stopping container {id}"),
                    e,
                ));
            }
        }
        match self
            .docker
            .remove_container(
                id,
                Some(
                    RemoveContainerOptionsBuilder::new()
                        .force(true)
                        .v(true)
                        .build(),
                ),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(ContainerError::engine(
                format!("removing container {id}"),
                e,
            )),
        }
    }

    /// Remove containers, logging the ones that could not be removed.
    pub(super) async fn remove_containers(&self, ids: &[String]) {
        for id in ids {
            if let Err(e) = self.stop_and_remove(id).await {
                tracing::warn!(container = %id, error = %e, "could not remove container");
            }
        }
    }

    /// Remove containers of the project whose service is not in `project`.
    pub(super) async fn remove_orphans(
        &self,
        project: &Project,
    ) -> Result<Vec<String>, ContainerError> {
        let mut removed = Vec::new();
        for c in self.project_containers(&project.name).await? {
            let service = label(&c, LABEL_SERVICE).unwrap_or_default().to_string();
            if project.services.iter().any(|s| s.name == service) {
                continue;
            }
            let id = c.id.clone().unwrap_or_default();
            self.stop_and_remove(&id).await?;
            let name = c
                .names
                .and_then(|n| n.into_iter().next())
                .unwrap_or(id)
                .trim_start_matches('/')
                .to_string();
            tracing::info!(project = %project.name, service, container = %name, "removed orphan container");
            removed.push(name);
        }
        Ok(removed)
    }
}

/// The value of one of a container's labels.
pub(super) fn label<'c>(c: &'c ContainerSummary, key: &str) -> Option<&'c str> {
    c.labels.as_ref()?.get(key).map(String::as_str)
}
