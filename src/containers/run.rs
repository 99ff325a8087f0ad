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

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, HealthStatusEnum, HostConfig,
    NetworkCreateRequest, NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures_util::StreamExt;

use super::ReleaseRef;
use super::build::release_image;
use super::compose::{MountSpec, Project, Service};
use super::engine::Engine;
use super::error::{ContainerError, is_not_found};
use crate::config::ContainersConfig;

/// Label: the compose project.
pub const LABEL_PROJECT: &str = "com.docker.compose.project";
/// Label: the compose service.
pub const LABEL_SERVICE: &str = "com.docker.compose.service";
/// Label: the release a container was created for.
pub const LABEL_RELEASE: &str = "deployd.release";
/// Label: hash of the image id and container configuration.
pub const LABEL_CONFIG_HASH: &str = "deployd.config-hash";

/// How often health is polled.
const HEALTH_POLL: Duration = Duration::from_millis(250);
/// How long a container gets to stop before it is killed.
const STOP_TIMEOUT_SECS: i32 = 10;

/// What `up` or `rollback` did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpReport {
    pub release: String,
    pub services: Vec<ServiceUp>,
    /// Containers of services no longer in the compose file that were removed.
    pub orphans_removed: Vec<String>,
}

/// What happened to one service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceUp {
    pub service: String,
    pub container: String,
    pub container_id: String,
    /// Image reference the container runs.
    pub image: String,
    pub image_id: String,
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
    service: String,
    reason: String,
    created: Vec<String>,
}

/// The container name of a service: `<project>-<service>-1`.
pub fn container_name(project: &str, service: &str) -> String {
    format!("{project}-{service}-1")
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
        let failure = match self.start_release(project, release, settings).await {
            Ok(mut report) => {
                report.orphans_removed = self.remove_orphans(project).await?;
                return Ok(report);
            }
            Err(f) => f,
        };
        tracing::warn!(
            project = %project.name,
            release = release.id,
            service = %failure.service,
            reason = %failure.reason,
            "release did not become healthy, rolling back"
        );
        self.remove_containers(&failure.created).await;
        let Some((prev_project, prev_release)) = previous else {
            return Err(ContainerError::UnhealthyNoPrevious {
                release: release.id.to_string(),
                service: failure.service,
                reason: failure.reason,
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
                Err(ContainerError::RolledBack {
                    release: release.id.to_string(),
                    previous: prev_release.id.to_string(),
                    service: failure.service,
                    reason: failure.reason,
                })
            }
            Err(rollback) => Err(ContainerError::RollbackFailed {
                release: release.id.to_string(),
                previous: prev_release.id.to_string(),
                service: failure.service,
                reason: failure.reason,
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
                reason: f.reason,
            }),
        }
    }

    /// Containers of a project: `(service, container id, name, labels, running)`.
    pub(crate) async fn project_containers(
        &self,
        project: &str,
    ) -> Result<Vec<bollard::models::ContainerSummary>, ContainerError> {
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
        let fail = |service: &str, reason: String, created: &Vec<String>| StartFailure {
            service: service.to_string(),
            reason,
            created: created.clone(),
        };
        if let Err(e) = self.ensure_networks_and_volumes(project).await {
            return Err(fail("(networks)", e.to_string(), &created));
        }
        for service in &project.services {
            match self
                .start_service(project, service, release, settings, &mut created)
                .await
            {
                Ok(up) => report.services.push(up),
                Err(reason) => return Err(fail(&service.name, reason, &created)),
            }
        }
        Ok(report)
    }

    async fn start_service(
        &self,
        project: &Project,
        service: &Service,
        release: &ReleaseRef<'_>,
        settings: &ContainersConfig,
        created: &mut Vec<String>,
    ) -> Result<ServiceUp, String> {
        let image = if service.build.is_some() {
            release_image(service, release.id)
        } else {
            service.image.clone()
        };
        let image_id = self
            .ensure_image(service, &image)
            .await
            .map_err(|e| e.to_string())?;
        let (mut body, hash) = container_config(project, service, &image, &image_id);
        let name = container_name(&project.name, &service.name);
        let existing = self
            .project_containers(&project.name)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|c| {
                c.labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_SERVICE))
                    .is_some_and(|s| s == &service.name)
            })
            .collect::<Vec<_>>();
        let matching = existing.iter().find(|c| {
            c.labels
                .as_ref()
                .and_then(|l| l.get(LABEL_CONFIG_HASH))
                .is_some_and(|h| h == &hash)
                && c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
        });
        if let (Some(c), 1) = (matching, existing.len()) {
            let id = c.id.clone().unwrap_or_default();
            let waited = self
                .wait_healthy(&id, settings, Instant::now())
                .await
                .map_err(|r| format!("container {name}: {r}"))?;
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
            self.stop_and_remove(&id).await.map_err(|e| e.to_string())?;
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
            .map_err(|e| format!("creating container {name}: {e}"))?
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
                .map_err(|e| format!("connecting {name} to network {engine_net}: {e}"))?;
        }
        let started = Instant::now();
        self.docker
            .start_container(&id, None)
            .await
            .map_err(|e| format!("starting container {name}: {e}"))?;
        let waited = self
            .wait_healthy(&id, settings, started)
            .await
            .map_err(|r| format!("container {name}: {r}"))?;
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

    async fn ensure_networks_and_volumes(&self, project: &Project) -> Result<(), ContainerError> {
        let labels = |kind: &str, key: &str| -> HashMap<String, String> {
            [
                (LABEL_PROJECT.to_string(), project.name.clone()),
                (format!("com.docker.compose.{kind}"), key.to_string()),
            ]
            .into()
        };
        for net in &project.networks {
            match self.docker.inspect_network(&net.engine_name, None).await {
                Ok(_) => continue,
                Err(e) if is_not_found(&e) && !net.external => {}
                Err(e) => {
                    return Err(ContainerError::engine(
                        format!("looking up network {}", net.engine_name),
                        e,
                    ));
                }
            }
            self.docker
                .create_network(NetworkCreateRequest {
                    name: net.engine_name.clone(),
                    driver: net.driver.clone(),
                    labels: Some(labels("network", &net.key)),
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    ContainerError::engine(format!("creating network {}", net.engine_name), e)
                })?;
        }
        for vol in &project.volumes {
            match self.docker.inspect_volume(&vol.engine_name).await {
                Ok(_) => continue,
                Err(e) if is_not_found(&e) && !vol.external => {}
                Err(e) => {
                    return Err(ContainerError::engine(
                        format!("looking up volume {}", vol.engine_name),
                        e,
                    ));
                }
            }
            self.docker
                .create_volume(VolumeCreateRequest {
                    name: Some(vol.engine_name.clone()),
                    labels: Some(labels("volume", &vol.key)),
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    ContainerError::engine(format!("creating volume {}", vol.engine_name), e)
                })?;
        }
        Ok(())
    }

    /// Wait until a container is healthy; the error is the reason it is not.
    async fn wait_healthy(
        &self,
        id: &str,
        settings: &ContainersConfig,
        started: Instant,
    ) -> Result<Duration, String> {
        let deadline = started + settings.health_timeout.0;
        let mut running_since: Option<Instant> = None;
        let mut restarts: Option<i64> = None;
        loop {
            let c = self
                .docker
                .inspect_container(id, None)
                .await
                .map_err(|e| format!("inspecting: {e}"))?;
            let state = c.state.unwrap_or_default();
            let restart_count = c.restart_count.unwrap_or(0);
            if !state.running.unwrap_or(false) || state.restarting.unwrap_or(false) {
                if state.status == Some(bollard::models::ContainerStateStatusEnum::CREATED) {
                    // Not started yet; keep waiting.
                } else {
                    return Err(format!(
                        "exited with code {}{}",
                        state.exit_code.unwrap_or_default(),
                        state
                            .error
                            .filter(|e| !e.is_empty())
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ));
                }
            }
            if *restarts.get_or_insert(restart_count) != restart_count {
                return Err(format!("restarted {restart_count} times"));
            }
            match state.health.as_ref().and_then(|h| h.status) {
                Some(HealthStatusEnum::HEALTHY) => return Ok(started.elapsed()),
                Some(HealthStatusEnum::UNHEALTHY) => {
                    let last = state
                        .health
                        .and_then(|h| h.log)
                        .and_then(|l| l.into_iter().last())
                        .map(|r| {
                            format!(
                                "exit {}: {}",
                                r.exit_code.unwrap_or_default(),
                                r.output.unwrap_or_default().trim()
                            )
                        })
                        .unwrap_or_default();
                    return Err(format!("healthcheck failed ({last})"));
                }
                Some(HealthStatusEnum::STARTING) => {}
                _ => {
                    // No healthcheck: running for the grace period counts as healthy.
                    if state.running.unwrap_or(false) {
                        let since = *running_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= settings.health_grace.0 {
                            return Ok(started.elapsed());
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("not healthy after {:?}", settings.health_timeout.0));
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }

    async fn stop_and_remove(&self, id: &str) -> Result<(), ContainerError> {
        match self
            .docker
            .stop_container(
                id,
                Some(
                    StopContainerOptionsBuilder::new()
                        .t(STOP_TIMEOUT_SECS)
                        .build(),
                ),
            )
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
                Some(RemoveContainerOptionsBuilder::new().force(true).build()),
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

    async fn remove_containers(&self, ids: &[String]) {
        for id in ids {
            if let Err(e) = self.stop_and_remove(id).await {
                tracing::warn!(container = %id, error = %e, "could not remove container");
            }
        }
    }

    /// Remove containers of the project whose service is not in `project`.
    async fn remove_orphans(&self, project: &Project) -> Result<Vec<String>, ContainerError> {
        let mut removed = Vec::new();
        for c in self.project_containers(&project.name).await? {
            let service = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE))
                .cloned()
                .unwrap_or_default();
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

/// The container configuration for a service, and the hash that identifies it (image id
/// included, release label excluded).
fn container_config(
    project: &Project,
    service: &Service,
    image: &str,
    image_id: &str,
) -> (ContainerCreateBody, String) {
    let mut labels: HashMap<String, String> = service
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(LABEL_PROJECT.into(), project.name.clone());
    labels.insert(LABEL_SERVICE.into(), service.name.clone());
    labels.insert("com.docker.compose.container-number".into(), "1".into());
    labels.insert("com.docker.compose.oneoff".into(), "False".into());
    labels.insert(
        "com.docker.compose.project.working_dir".into(),
        project.release_dir.display().to_string(),
    );
    let mut port_bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    let mut exposed = Vec::new();
    for p in &service.ports {
        let key = format!("{}/{}", p.target, p.protocol);
        exposed.push(key.clone());
        port_bindings
            .entry(key)
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: p.host_ip.clone(),
                host_port: p.published.map(|p| p.to_string()),
            });
    }
    exposed.sort();
    let binds: Vec<String> = service
        .volumes
        .iter()
        .map(|m| match m {
            MountSpec::Volume {
                name,
                target,
                read_only,
            } => format!("{name}:{target}{}", if *read_only { ":ro" } else { "" }),
            MountSpec::Bind {
                source,
                target,
                read_only,
            } => format!(
                "{}:{target}{}",
                source.display(),
                if *read_only { ":ro" } else { "" }
            ),
        })
        .collect();
    let restart_policy = service.restart.as_deref().map(|r| {
        let (name, count) = match r.split_once(':') {
            Some((n, c)) => (n, c.parse::<i64>().ok()),
            None => (r, None),
        };
        RestartPolicy {
            name: Some(match name {
                "always" => RestartPolicyNameEnum::ALWAYS,
                "unless-stopped" => RestartPolicyNameEnum::UNLESS_STOPPED,
                "on-failure" => RestartPolicyNameEnum::ON_FAILURE,
                _ => RestartPolicyNameEnum::NO,
            }),
            maximum_retry_count: count,
        }
    });
    let nanos = |d: Option<Duration>| d.map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let healthcheck = service.healthcheck.as_ref().map(|h| HealthConfig {
        test: Some(h.test.clone()),
        interval: nanos(h.interval),
        timeout: nanos(h.timeout),
        retries: h.retries.map(i64::from),
        start_period: nanos(h.start_period),
        start_interval: None,
    });
    let first_network = service
        .networks
        .first()
        .and_then(|n| project.networks.iter().find(|o| &o.key == n))
        .map(|n| n.engine_name.clone());
    let networking_config = first_network.as_ref().map(|n| NetworkingConfig {
        endpoints_config: Some(
            [(
                n.clone(),
                EndpointSettings {
                    aliases: Some(vec![service.name.clone()]),
                    ..Default::default()
                },
            )]
            .into(),
        ),
    });
    let env: Vec<String> = service
        .environment
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut body = ContainerCreateBody {
        image: Some(image_id.to_string()),
        env: Some(env),
        cmd: service.command.clone(),
        entrypoint: service.entrypoint.clone(),
        labels: Some(labels),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        healthcheck,
        host_config: Some(HostConfig {
            port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
            binds: (!binds.is_empty()).then_some(binds),
            restart_policy,
            network_mode: first_network,
            ..Default::default()
        }),
        networking_config,
        ..Default::default()
    };
    let hash = config_hash(&body, service);
    if let Some(labels) = body.labels.as_mut() {
        labels.insert(LABEL_CONFIG_HASH.into(), hash.clone());
    }
    body.image = Some(image.to_string());
    (body, hash)
}

/// FNV-1a over a canonical rendering of the configuration (stable across deployd versions).
fn config_hash(body: &ContainerCreateBody, service: &Service) -> String {
    let canonical: BTreeMap<&str, String> = [
        (
            "body",
            serde_json::to_string(&sorted_json(body)).unwrap_or_default(),
        ),
        ("networks", service.networks.join(",")),
    ]
    .into();
    let text = format!("{canonical:?}");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// JSON with object keys sorted, so `HashMap` order does not change the hash.
fn sorted_json(body: &ContainerCreateBody) -> serde_json::Value {
    fn sort(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let sorted: BTreeMap<String, serde_json::Value> =
                    m.into_iter().map(|(k, v)| (k, sort(v))).collect();
                serde_json::Value::Object(sorted.into_iter().collect())
            }
            serde_json::Value::Array(a) => {
                serde_json::Value::Array(a.into_iter().map(sort).collect())
            }
            other => other,
        }
    }
    sort(serde_json::to_value(body).unwrap_or_default())
}
