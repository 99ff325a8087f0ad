//! Which keys deployd accepts, and why it refuses the others: checked on the raw document
//! (after YAML merge keys, before interpolation or anything else), so a refusal comes before any
//! build and names the service, the dotted key, and the reason.
//!
//! A key is either supported (its value is checked later, when it is parsed), refused because
//! it would cross the app's boundary (`security`), or unsupported (`unsupported`, or any key not
//! listed). `x-*` extension keys are allowed wherever a mapping has fixed keys.

use super::Parsed;
use std::collections::BTreeSet;

use yaml_serde::Value;

use super::{Cx, entries, service_active, value_of};
use crate::containers::error::ContainerError;

/// Name used in errors for keys outside any service.
pub(super) const TOP_LEVEL: &str = "(top level)";

/// What a part of the compose file may hold.
pub(super) enum Shape {
    /// A mapping with these keys (plus `x-*`).
    Keys(Keys),
    /// A mapping from chosen names to values of a shape, or a list whose mapping items have it
    /// (`depends_on`, `ports`, `volumes`, top-level `networks`...).
    Each(&'static Shape),
}

/// The keys of a mapping; key lists are space-separated.
pub(super) struct Keys {
    /// Supported keys whose values are checked when they are parsed.
    ok: &'static str,
    /// Supported keys whose values have a shape of their own.
    nested: &'static [(&'static str, &'static Shape)],
    /// Keys refused because they would let the container reach outside its app, and why.
    security: &'static [(&'static str, &'static str)],
    /// Keys refused because deployd does not implement them, and why.
    unsupported: &'static [(&'static str, &'static str)],
}

const NONE: Keys = Keys {
    ok: "",
    nested: &[],
    security: &[],
    unsupported: &[],
};

/// A mapping with these supported keys only.
const fn keys(ok: &'static str) -> Shape {
    Shape::Keys(Keys { ok, ..NONE })
}

/// A mapping with these supported keys, some with a shape of their own.
const fn nesting(ok: &'static str, nested: &'static [(&'static str, &'static Shape)]) -> Shape {
    Shape::Keys(Keys { ok, nested, ..NONE })
}

/// A mapping with these supported keys, and keys refused for security or unsupported.
const fn refusing(
    ok: &'static str,
    security: &'static [(&'static str, &'static str)],
    unsupported: &'static [(&'static str, &'static str)],
) -> Shape {
    Shape::Keys(Keys {
        ok,
        nested: &[],
        security,
        unsupported,
    })
}

const SWARM: &str = "only Docker Swarm uses it";
const NOT_IMPLEMENTED: &str = "deployd does not implement it";
const DEVICES: &str = "it gives the container devices of the host";
const FROM_FILE: &str = "deployd mounts secrets and configs from files of the release; use `file:`";

static TOP: Shape = Shape::Keys(Keys {
    ok: "services name version",
    nested: &[
        ("volumes", &Shape::Each(&TOP_VOLUME)),
        ("networks", &Shape::Each(&TOP_NETWORK)),
        ("secrets", &Shape::Each(&TOP_FILE)),
        ("configs", &Shape::Each(&TOP_FILE)),
        ("include", &Shape::Each(&INCLUDE)),
    ],
    ..NONE
});

static TOP_VOLUME: Shape = refusing(
    "name external driver labels",
    &[(
        "driver_opts",
        "driver options can make a volume a bind mount of any host path",
    )],
    &[],
);

static TOP_NETWORK: Shape = keys("name external driver labels internal attachable");

static TOP_FILE: Shape = refusing(
    "file name",
    &[],
    &[("external", SWARM), ("environment content", FROM_FILE)],
);

static INCLUDE: Shape = keys("path project_directory env_file");

static SERVICE: Shape = Shape::Keys(Keys {
    // `security_opt` takes only `no-new-privileges` (checked when parsed); `develop` holds
    // `docker compose watch` settings, meaningless for a deployment as for `docker compose up`.
    ok: "image command entrypoint environment expose restart labels container_name user \
         hostname domainname platform tty stdin_open working_dir init extra_hosts tmpfs \
         mem_limit memswap_limit mem_reservation cpus cpu_shares cpuset pids_limit shm_size \
         stop_signal stop_grace_period profiles read_only cap_drop security_opt develop",
    nested: &[
        ("build", &BUILD),
        ("env_file", &Shape::Each(&ENV_FILE)),
        ("ports", &Shape::Each(&PORT)),
        ("volumes", &Shape::Each(&MOUNT)),
        ("healthcheck", &HEALTHCHECK),
        ("depends_on", &Shape::Each(&DEPENDENCY)),
        ("networks", &Shape::Each(&SERVICE_NETWORK)),
        ("secrets", &Shape::Each(&FILE_REF)),
        ("configs", &Shape::Each(&FILE_REF)),
        ("deploy", &DEPLOY),
        ("logging", &LOGGING),
        ("ulimits", &Shape::Each(&ULIMIT)),
    ],
    security: &[
        (
            "privileged",
            "it gives the container every capability and every device of the host",
        ),
        (
            "cap_add",
            "it gives the container capabilities beyond Docker's default set",
        ),
        ("devices device_cgroup_rules gpus", DEVICES),
        (
            "network_mode pid ipc uts userns_mode cgroup",
            "it would share a namespace with the host or another container",
        ),
        (
            "cgroup_parent",
            "it moves the container out of Docker's cgroup",
        ),
        (
            "volumes_from",
            "it mounts another container's volumes, possibly another project's",
        ),
        (
            "external_links",
            "it links to containers outside the project",
        ),
        ("runtime", "it chooses another container runtime"),
        (
            "oom_kill_disable",
            "a container the kernel may not kill can exhaust the host's memory",
        ),
    ],
    unsupported: &[
        ("links", "use depends_on, and networks with aliases"),
        ("scale", "deployd runs one container per service"),
    ],
});

/// Keys of `build:` (the build stage owns their meaning).
static BUILD: Shape = keys("context dockerfile args cache_from target labels");

static HEALTHCHECK: Shape =
    keys("test interval timeout retries start_period start_interval disable");

static ENV_FILE: Shape = keys("path required format");

static PORT: Shape = keys("target published host_ip protocol mode name app_protocol");

static MOUNT: Shape = nesting(
    "type source target read_only consistency",
    &[
        ("volume", &MOUNT_VOLUME),
        ("tmpfs", &keys("size mode")),
        ("bind", &MOUNT_BIND),
    ],
);

static MOUNT_VOLUME: Shape = refusing("nocopy", &[], &[("subpath", NOT_IMPLEMENTED)]);

static MOUNT_BIND: Shape = refusing(
    "create_host_path",
    &[(
        "propagation",
        "mount propagation would share mounts with the host",
    )],
    &[("selinux", NOT_IMPLEMENTED)],
);

static DEPENDENCY: Shape = keys("condition restart required");

static SERVICE_NETWORK: Shape = keys("aliases");

static FILE_REF: Shape = keys("source target uid gid mode");

static DEPLOY: Shape = Shape::Keys(Keys {
    ok: "replicas mode",
    nested: &[
        ("resources", &RESOURCES),
        (
            "restart_policy",
            &keys("condition max_attempts delay window"),
        ),
    ],
    unsupported: &[(
        "labels placement update_config rollback_config endpoint_mode",
        SWARM,
    )],
    ..NONE
});

static RESOURCES: Shape = nesting(
    "",
    &[
        ("limits", &keys("cpus memory pids")),
        ("reservations", &RESERVATIONS),
    ],
);

static RESERVATIONS: Shape = refusing(
    "cpus memory",
    &[("devices", DEVICES)],
    &[("generic_resources", SWARM)],
);

static LOGGING: Shape = keys("driver options");

static ULIMIT: Shape = keys("soft hard");

/// Every key of the raw document must be supported; services of inactive profiles are skipped.
pub(super) fn validate_keys(cx: &Cx, doc: &Value, active: &BTreeSet<String>) -> Parsed<()> {
    let top = entries(doc).ok_or_else(|| ContainerError::ComposeSyntax {
        path: cx.path.clone(),
        message: "the document is not a mapping".into(),
    })?;
    check(cx, TOP_LEVEL, "", doc, &TOP)?;
    let services = value_of(&top, "services");
    for (name, svc) in services.and_then(entries).unwrap_or_default() {
        if service_active(svc, active) {
            check(cx, &name, "", svc, &SERVICE)?;
        }
    }
    Ok(())
}

/// Check `v` against `shape`; keys are named `<prefix>.<key>` below `service`.
pub(super) fn check(cx: &Cx, service: &str, prefix: &str, v: &Value, shape: &Shape) -> Parsed<()> {
    let dotted = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match shape {
        Shape::Keys(keys) => {
            let listed = |list: &[(&str, &'static str)], k: &str| {
                list.iter()
                    .find(|(names, _)| names.split_whitespace().any(|n| n == k))
                    .map(|(_, why)| *why)
            };
            for (k, value) in entries(v).unwrap_or_default() {
                if k.starts_with("x-") || keys.ok.split_whitespace().any(|n| n == k) {
                    continue;
                }
                if let Some((_, inner)) = keys.nested.iter().find(|(n, _)| *n == k) {
                    check(cx, service, &dotted(&k), value, inner)?;
                } else if let Some(why) = listed(keys.security, &k) {
                    return Err(cx.forbidden(service, &dotted(&k), why));
                } else {
                    let why = listed(keys.unsupported, &k).unwrap_or(NOT_IMPLEMENTED);
                    return Err(cx.unsupported(service, &dotted(&k), why));
                }
            }
            Ok(())
        }
        Shape::Each(inner) => {
            if let Some(items) = entries(v) {
                for (name, item) in items {
                    check(cx, service, &dotted(&name), item, inner)?;
                }
            } else if let Some(items) = v.as_sequence() {
                for item in items.iter().filter(|i| i.is_mapping()) {
                    check(cx, service, prefix, item, inner)?;
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `<service> <key>` of the refusal (with `!` for a security refusal), or what
    /// `validate_keys` returned instead.
    fn refused(yaml: &str) -> String {
        let cx = Cx::test();
        let mut doc: Value = yaml_serde::from_str(yaml).unwrap();
        doc.apply_merge().unwrap();
        match validate_keys(&cx, &doc, &BTreeSet::new()) {
            Err(ContainerError::UnsupportedKey { service, key, .. }) => format!("{service} {key}"),
            Err(ContainerError::Forbidden { service, key, .. }) => format!("{service} {key}!"),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn refusals_name_the_service_the_dotted_key_and_the_kind() {
        let svc = |body: &str| refused(&format!("services:\n  web:\n{body}"));
        assert_eq!(
            svc("    image: x\n    privileged: true\n"),
            "web privileged!"
        );
        assert_eq!(svc("    network_mode: host\n"), "web network_mode!");
        assert_eq!(svc("    build:\n      ssh: default\n"), "web build.ssh");
        assert_eq!(
            svc("    healthcheck:\n      start_interval: 1s\n      x-note: 1\n"),
            "Ok(())"
        );
        assert_eq!(
            svc("    depends_on:\n      db:\n        restart: true\n        required: false\n"),
            "Ok(())"
        );
        assert_eq!(
            svc("    networks:\n      front:\n        ipv4_address: 10.0.0.2\n"),
            "web networks.front.ipv4_address"
        );
        assert_eq!(
            svc(
                "    volumes:\n      - type: bind\n        source: .\n        target: /a\n        bind:\n          propagation: rshared\n"
            ),
            "web volumes.bind.propagation!"
        );
        assert_eq!(
            svc("    deploy:\n      resources:\n        reservations:\n          devices: []\n"),
            "web deploy.resources.reservations.devices!"
        );
        assert_eq!(
            svc("    deploy:\n      placement: {}\n"),
            "web deploy.placement"
        );
        assert_eq!(
            refused("volumes:\n  data:\n    driver_opts: {}\n"),
            "(top level) volumes.data.driver_opts!"
        );
        assert_eq!(
            refused("secrets:\n  s:\n    environment: X\n"),
            "(top level) secrets.s.environment"
        );
        assert_eq!(refused("swarm: {}\n"), "(top level) swarm");
        // Extensions and merge keys: the merged keys are checked like any other.
        assert_eq!(
            refused(
                "x-base: &base\n  restart: always\n  init: true\nservices:\n  web:\n    <<: *base\n    image: x\n"
            ),
            "Ok(())"
        );
        assert_eq!(
            refused(
                "x-base: &base\n  privileged: true\nservices:\n  web:\n    <<: *base\n    image: x\n"
            ),
            "web privileged!"
        );
    }

    #[test]
    fn inactive_services_are_not_checked() {
        let cx = Cx::test();
        let doc: Value =
            yaml_serde::from_str("services:\n  dbg:\n    profiles: [debug]\n    pid: host\n")
                .unwrap();
        assert!(validate_keys(&cx, &doc, &BTreeSet::new()).is_ok());
        let active = BTreeSet::from(["debug".to_string()]);
        assert!(validate_keys(&cx, &doc, &active).is_err());
    }
}
