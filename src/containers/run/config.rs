//! The container a service runs as: its name, its engine configuration, and the hash of that
//! configuration that tells whether a running container still matches.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, HostConfig, HostConfigLogConfig,
    NetworkingConfig, PortBinding, ResourcesUlimits, RestartPolicy, RestartPolicyNameEnum,
};

use super::mounts::engine_mounts;
use super::{LABEL_CONFIG_HASH, LABEL_PROJECT, LABEL_SERVICE, with_labels};
use crate::config::{ContainersConfig, normalize_capability};
use crate::containers::compose::{Project, Service, ServiceNetwork};

/// The container name of a service: `<project>-<service>-1`.
pub(super) fn container_name(project: &str, service: &str) -> String {
    format!("{project}-{service}-1")
}

/// The container configuration for a service, and the hash that identifies it (image id
/// included; the release and working-directory labels excluded). Every container runs with `no-new-privileges`, a process
/// limit and `[containers] cap_drop`; release binds are read-only.
pub(super) fn container_config(
    project: &Project,
    service: &Service,
    image: &str,
    image_id: &str,
    settings: &ContainersConfig,
) -> (ContainerCreateBody, String) {
    let labels = with_labels(
        &service.labels,
        [
            (LABEL_PROJECT.into(), project.name.clone()),
            (LABEL_SERVICE.into(), service.name.clone()),
            ("com.docker.compose.container-number".into(), "1".into()),
            ("com.docker.compose.oneoff".into(), "False".into()),
        ],
    );
    let mut port_bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    let mut exposed: Vec<String> = service.expose.clone();
    for p in &service.ports {
        let key = format!("{}/{}", p.target, p.protocol);
        exposed.push(key.clone());
        let host_port = match (p.published, p.published_last) {
            (Some(first), Some(last)) => Some(format!("{first}-{last}")),
            (published, _) => published.map(|p| p.to_string()),
        };
        port_bindings
            .entry(key)
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: p.host_ip.clone(),
                host_port,
            });
    }
    exposed.sort();
    exposed.dedup();
    let mounts = engine_mounts(service);
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
        start_interval: nanos(h.start_interval),
    });
    let first_network = service.networks.first().and_then(|sn| {
        let engine = engine_network(project, &sn.key)?;
        Some((engine, endpoint(service, sn)))
    });
    let networking_config = first_network.as_ref().map(|(n, e)| NetworkingConfig {
        endpoints_config: Some([(n.clone(), e.clone())].into()),
    });
    let env: Vec<String> = service
        .environment
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let run = &service.run;
    let mut body = ContainerCreateBody {
        image: Some(image_id.to_string()),
        env: Some(env),
        cmd: service.command.clone(),
        entrypoint: service.entrypoint.clone(),
        labels: Some(labels),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        healthcheck,
        user: run.user.clone(),
        hostname: run.hostname.clone(),
        domainname: run.domainname.clone(),
        working_dir: run.working_dir.clone(),
        tty: run.tty.then_some(true),
        open_stdin: run.stdin_open.then_some(true),
        stop_signal: run.stop_signal.clone(),
        stop_timeout: run.stop_grace_period.map(|d| {
            i64::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(i64::MAX)
        }),
        host_config: Some(HostConfig {
            port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
            mounts: (!mounts.is_empty()).then_some(mounts),
            restart_policy,
            network_mode: first_network.map(|(n, _)| n),
            ..host_limits(service, settings)
        }),
        networking_config,
        ..Default::default()
    };
    let hash = config_hash(&body, service);
    if let Some(labels) = body.labels.as_mut() {
        labels.insert(LABEL_CONFIG_HASH.into(), hash.clone());
        // Outside the hash, like the release label: a service whose image and configuration
        // did not change keeps running across releases.
        labels.insert(
            "com.docker.compose.project.working_dir".into(),
            project.release_dir.display().to_string(),
        );
    }
    body.image = Some(image.to_string());
    (body, hash)
}

/// The engine name of one of the project's networks.
pub(super) fn engine_network(project: &Project, key: &str) -> Option<String> {
    project
        .networks
        .iter()
        .find(|o| o.key == key)
        .map(|n| n.engine_name.clone())
}

/// How a service joins one of its networks: reachable by its name and its aliases.
pub(super) fn endpoint(service: &Service, network: &ServiceNetwork) -> EndpointSettings {
    let mut aliases = vec![service.name.clone()];
    aliases.extend(network.aliases.iter().cloned());
    EndpointSettings {
        aliases: Some(aliases),
        ..Default::default()
    }
}

/// The hardening every container gets, and the service's own limits, init, logging, hosts,
/// tmpfs and ulimits.
fn host_limits(service: &Service, settings: &ContainersConfig) -> HostConfig {
    let run = &service.run;
    let r = &run.resources;
    let mut cap_drop: Vec<String> = settings
        .cap_drop
        .iter()
        .filter_map(|c| normalize_capability(c))
        .chain(run.cap_drop.iter().cloned())
        .collect();
    cap_drop.sort();
    cap_drop.dedup();
    HostConfig {
        security_opt: Some(vec!["no-new-privileges".into()]),
        pids_limit: Some(r.pids.unwrap_or(settings.pids_limit)),
        cap_drop: (!cap_drop.is_empty()).then_some(cap_drop),
        memory: r.memory,
        memory_reservation: r.memory_reservation,
        memory_swap: r.memory_swap,
        nano_cpus: r.nano_cpus,
        cpu_shares: r.cpu_shares,
        cpuset_cpus: r.cpuset.clone(),
        init: run.init,
        readonly_rootfs: run.read_only.then_some(true),
        shm_size: run.shm_size,
        log_config: run.logging.as_ref().map(|l| HostConfigLogConfig {
            typ: l.driver.clone(),
            config: (!l.options.is_empty()).then(|| {
                l.options
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }),
        }),
        extra_hosts: (!run.extra_hosts.is_empty()).then(|| run.extra_hosts.clone()),
        tmpfs: (!run.tmpfs.is_empty()).then(|| {
            run.tmpfs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }),
        ulimits: (!run.ulimits.is_empty()).then(|| {
            run.ulimits
                .iter()
                .map(|(name, (soft, hard))| ResourcesUlimits {
                    name: Some(name.clone()),
                    soft: Some(*soft),
                    hard: Some(*hard),
                })
                .collect()
        }),
        ..Default::default()
    }
}

/// FNV-1a over a canonical rendering of the configuration (stable across deployd versions).
fn config_hash(body: &ContainerCreateBody, service: &Service) -> String {
    let canonical: BTreeMap<&str, String> = [
        (
            "body",
            serde_json::to_string(&sorted_json(body)).unwrap_or_default(),
        ),
        ("networks", format!("{:?}", service.networks)),
        ("platform", service.run.platform.clone().unwrap_or_default()),
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
