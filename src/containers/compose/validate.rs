//! What deployd refuses: keys outside the supported subset (checked on the raw document,
//! before interpolation or anything else), tags the engine would reject, paths that leave the
//! release directory, and `depends_on` that names a missing service or forms a cycle.

use std::collections::BTreeSet;
use std::path::{Component, PathBuf};

use yaml_serde::Value;

use super::model::Service;
use super::{Cx, entries, value_of};
use crate::containers::error::ContainerError;

/// Top-level keys deployd accepts.
const TOP_LEVEL_KEYS: &[&str] = &["services", "volumes", "networks", "name", "version"];
/// Service keys deployd accepts.
const SERVICE_KEYS: &[&str] = &[
    "build",
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "volumes",
    "restart",
    "healthcheck",
    "depends_on",
    "labels",
    "networks",
];
/// Keys of `build:`.
const BUILD_KEYS: &[&str] = &[
    "context",
    "dockerfile",
    "args",
    "cache_from",
    "target",
    "labels",
];
/// Keys of `healthcheck:`.
const HEALTHCHECK_KEYS: &[&str] = &[
    "test",
    "interval",
    "timeout",
    "retries",
    "start_period",
    "disable",
];
/// Keys of a top-level volume or network.
const TOP_OBJECT_KEYS: &[&str] = &["name", "external", "driver"];
/// Keys of one entry of the map form of `depends_on`.
const DEPENDENCY_KEYS: &[&str] = &["condition"];
/// Keys of the long form of a `ports` entry.
pub(super) const PORT_KEYS: &[&str] = &["target", "published", "host_ip", "protocol"];
/// Keys of the long form of a `volumes` entry.
pub(super) const MOUNT_KEYS: &[&str] = &["type", "source", "target", "read_only"];
/// Name used in errors for keys outside any service.
pub(super) const TOP_LEVEL: &str = "(top level)";

/// First pass: every key must be in the supported subset, before interpolation or anything else.
pub(super) fn validate_keys(cx: &Cx, doc: &Value) -> Result<(), ContainerError> {
    let top = entries(doc).ok_or_else(|| ContainerError::ComposeSyntax {
        path: cx.path.clone(),
        message: "the document is not a mapping".into(),
    })?;
    for (key, value) in &top {
        if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
            return Err(cx.unsupported(TOP_LEVEL, key));
        }
        if key == "volumes" || key == "networks" {
            for (name, obj) in entries(value).unwrap_or_default() {
                only_keys(
                    cx,
                    TOP_LEVEL,
                    &format!("{key}.{name}"),
                    obj,
                    TOP_OBJECT_KEYS,
                )?;
            }
        }
    }
    let services = value_of(&top, "services");
    for (name, svc) in services.and_then(entries).unwrap_or_default() {
        let Some(keys) = entries(svc) else { continue };
        for (key, value) in &keys {
            if !SERVICE_KEYS.contains(&key.as_str()) {
                return Err(cx.unsupported(&name, key));
            }
            match key.as_str() {
                "build" => only_keys(cx, &name, key, value, BUILD_KEYS)?,
                "healthcheck" => only_keys(cx, &name, key, value, HEALTHCHECK_KEYS)?,
                _ => {}
            }
        }
        // The map forms of `depends_on` and `networks`: what each entry may hold.
        for (key, allowed) in [("depends_on", DEPENDENCY_KEYS), ("networks", &[][..])] {
            for (item, spec) in value_of(&keys, key).and_then(entries).unwrap_or_default() {
                only_keys(cx, &name, &format!("{key}.{item}"), spec, allowed)?;
            }
        }
    }
    Ok(())
}

/// Refuse the first key of the mapping `v` that is not in `allowed`, naming it
/// `<prefix>.<key>`; anything but a mapping has no keys to refuse.
pub(super) fn only_keys(
    cx: &Cx,
    service: &str,
    prefix: &str,
    v: &Value,
    allowed: &[&str],
) -> Result<(), ContainerError> {
    match entries(v)
        .unwrap_or_default()
        .into_iter()
        .find(|(k, _)| !allowed.contains(&k.as_str()))
    {
        Some((k, _)) => Err(cx.unsupported(service, &format!("{prefix}.{k}"))),
        None => Ok(()),
    }
}

/// Whether a string is a usable tag (what the engine accepts: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`).
pub(crate) fn valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && tag.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Resolve a path of the compose file against the release directory, refusing anything that
/// leaves it (lexically, or through a symlink when the path exists).
pub(super) fn inside_release(
    cx: &Cx,
    service: &str,
    key: &str,
    p: &str,
) -> Result<PathBuf, ContainerError> {
    if p.starts_with('~') {
        return Err(cx.invalid(
            service,
            key,
            format!("`{p}` is outside the release directory"),
        ));
    }
    let joined = cx.release_dir.join(p);
    let mut normal = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other.as_os_str()),
        }
    }
    let outside = || {
        cx.invalid(
            service,
            key,
            format!("`{p}` is outside the release directory"),
        )
    };
    if !normal.starts_with(&cx.release_dir) {
        return Err(outside());
    }
    if let (Ok(real), Ok(root)) = (normal.canonicalize(), cx.release_dir.canonicalize())
        && !real.starts_with(&root)
    {
        return Err(outside());
    }
    Ok(normal)
}

/// Order services so dependencies come first (stable: compose file order otherwise).
pub(super) fn order_services(
    cx: &Cx,
    services: Vec<Service>,
) -> Result<Vec<Service>, ContainerError> {
    let names: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
    for s in &services {
        for d in &s.depends_on {
            if !names.contains(d.service.as_str()) {
                return Err(cx.invalid(
                    &s.name,
                    "depends_on",
                    format!("service `{}` does not exist", d.service),
                ));
            }
        }
    }
    let mut placed: BTreeSet<String> = BTreeSet::new();
    let mut ordered = Vec::with_capacity(services.len());
    let mut remaining = services;
    while !remaining.is_empty() {
        let before = remaining.len();
        let mut next = Vec::new();
        for s in remaining {
            if s.depends_on.iter().all(|d| placed.contains(&d.service)) {
                placed.insert(s.name.clone());
                ordered.push(s);
            } else {
                next.push(s);
            }
        }
        if next.len() == before {
            let names: Vec<&str> = next.iter().map(|s| s.name.as_str()).collect();
            return Err(cx.invalid(
                names.first().copied().unwrap_or_default(),
                "depends_on",
                format!("dependency cycle between {}", names.join(", ")),
            ));
        }
        remaining = next;
    }
    Ok(ordered)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `<service> <key>` of the refusal, or what `validate_keys` returned instead.
    fn refused(yaml: &str) -> String {
        let cx = Cx {
            path: "docker-compose.yml".into(),
            release_dir: "/r".into(),
            project: "p".into(),
        };
        let doc: Value = yaml_serde::from_str(yaml).unwrap();
        match validate_keys(&cx, &doc) {
            Err(ContainerError::UnsupportedKey { service, key, .. }) => format!("{service} {key}"),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn refusals_name_the_service_and_the_dotted_key() {
        let svc = |body: &str| refused(&format!("services:\n  web:\n{body}"));
        assert_eq!(
            svc("    image: x\n    privileged: true\n"),
            "web privileged"
        );
        assert_eq!(svc("    build:\n      ssh: default\n"), "web build.ssh");
        assert_eq!(
            svc("    healthcheck:\n      start_interval: 1s\n"),
            "web healthcheck.start_interval"
        );
        assert_eq!(
            svc("    depends_on:\n      db:\n        restart: true\n"),
            "web depends_on.db.restart"
        );
        assert_eq!(
            svc("    networks:\n      front:\n        aliases: [a]\n"),
            "web networks.front.aliases"
        );
        assert_eq!(
            refused("volumes:\n  data:\n    labels: {}\n"),
            "(top level) volumes.data.labels"
        );
        assert_eq!(refused("configs: {}\n"), "(top level) configs");
        assert_eq!(
            svc(
                "    depends_on:\n      db:\n        condition: service_healthy\n    networks:\n      front:\n"
            ),
            "Ok(())"
        );
    }
}
