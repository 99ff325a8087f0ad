//! The project's networks and volumes: created when missing, and, when they exist, used only if
//! they are the app's own (labelled with its project) or listed in `[containers]
//! allowed_external`. The compose stage already refused names that are not the app's; this
//! check catches an object of another project whose name merely starts like the app's
//! (`app-admin_data` for the app `app`).

use std::collections::HashMap;

use bollard::models::{NetworkCreateRequest, VolumeCreateRequest};

use super::{LABEL_PROJECT, with_labels};
use crate::containers::compose::{NamedObject, Project};
use crate::containers::engine::Engine;
use crate::containers::error::{ContainerError, is_not_found};

impl Engine {
    /// Create the project's networks and volumes that do not exist yet; an external one must
    /// exist already, and an existing one must be the app's own or allowed.
    pub(super) async fn ensure_networks_and_volumes(
        &self,
        project: &Project,
    ) -> Result<(), ContainerError> {
        let labels = |kind: &str, obj: &NamedObject| {
            with_labels(
                &obj.labels,
                [
                    (LABEL_PROJECT.to_string(), project.name.clone()),
                    (format!("com.docker.compose.{kind}"), obj.key.clone()),
                ],
            )
        };
        let creating = |kind: &str, obj: &NamedObject| {
            let action = format!("creating {kind} {}", obj.engine_name);
            move |e| ContainerError::engine(action, e)
        };
        for net in &project.networks {
            let found = self
                .docker
                .inspect_network(&net.engine_name, None)
                .await
                .map(|n| n.labels.unwrap_or_default());
            if !needs_creating(found, net, "network", &project.name)? {
                continue;
            }
            self.docker
                .create_network(NetworkCreateRequest {
                    name: net.engine_name.clone(),
                    driver: net.driver.clone(),
                    internal: net.internal.then_some(true),
                    labels: Some(labels("network", net)),
                    ..Default::default()
                })
                .await
                .map_err(creating("network", net))?;
        }
        for vol in &project.volumes {
            let found = self
                .docker
                .inspect_volume(&vol.engine_name)
                .await
                .map(|v| v.labels);
            if !needs_creating(found, vol, "volume", &project.name)? {
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

/// Whether a network or volume (`kind`) has to be created, from the labels the engine reported
/// for it: not when it exists and is the app's own or allowed; an error when the lookup failed,
/// when it is missing and external (managed outside deployd), or when it belongs to something
/// else.
fn needs_creating(
    lookup: Result<HashMap<String, String>, bollard::errors::Error>,
    obj: &NamedObject,
    kind: &str,
    project: &str,
) -> Result<bool, ContainerError> {
    match lookup {
        Ok(_) if obj.allowed_external => Ok(false),
        Ok(labels) if labels.get(LABEL_PROJECT).map(String::as_str) == Some(project) => Ok(false),
        Ok(labels) => Err(ContainerError::NotOwned {
            kind: kind.to_string(),
            name: obj.engine_name.clone(),
            owner: labels.get(LABEL_PROJECT).cloned(),
            project: project.to_string(),
        }),
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
    fn only_missing_managed_objects_are_created_and_only_owned_ones_reused() {
        let obj = |external, allowed_external| NamedObject {
            key: "data".into(),
            engine_name: "app_data".into(),
            external,
            allowed_external,
            driver: None,
            internal: false,
            labels: Default::default(),
        };
        let missing = || {
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message: "no such volume".into(),
            })
        };
        let owned = || {
            Ok(HashMap::from([(
                LABEL_PROJECT.to_string(),
                "app".to_string(),
            )]))
        };
        let other = || {
            Ok(HashMap::from([(
                LABEL_PROJECT.to_string(),
                "app-admin".to_string(),
            )]))
        };
        assert!(!needs_creating(owned(), &obj(false, false), "volume", "app").unwrap());
        assert!(needs_creating(missing(), &obj(false, false), "volume", "app").unwrap());
        let e = needs_creating(missing(), &obj(true, false), "volume", "app").unwrap_err();
        assert!(e.to_string().contains("looking up volume app_data"), "{e}");
        let e = needs_creating(other(), &obj(false, false), "volume", "app").unwrap_err();
        assert!(e.to_string().contains("app-admin"), "{e}");
        let e = needs_creating(Ok(HashMap::new()), &obj(true, false), "volume", "app").unwrap_err();
        assert!(e.to_string().contains("allowed_external"), "{e}");
        assert!(!needs_creating(other(), &obj(true, true), "volume", "app").unwrap());
    }
}
