//! The container a service runs as: its name, its engine configuration, and the hash of that
//! configuration that tells whether a running container still matches.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, HostConfig, NetworkingConfig, PortBinding,
    RestartPolicy, RestartPolicyNameEnum,
};

use super::{LABEL_CONFIG_HASH, LABEL_PROJECT, LABEL_SERVICE};
use crate::containers::compose::{MountSpec, Project, Service};

/// The container name of a service: `<project>-<service>-1`.
pub(super) fn container_name(project: &str, service: &str) -> String {
    format!("{project}-{service}-1")
}

/// The container configuration for a service, and the hash that identifies it (image id
/// included, release label excluded).
pub(super) fn container_config(
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
