//! The compose file: parsing, interpolation and validation, with no engine calls.
//!
//! deployd reads the `docker-compose.yml` a release ships (the same file `docker compose` uses).
//! Every key it accepts has a meaning it honours; any other key is refused, naming the service
//! and the key and saying why: **unsupported** (deployd does not implement it, or only Docker
//! Swarm uses it) or **refused for security** (it would let a container reach outside its app:
//! the host, or other projects' containers, volumes and networks). Refusals come before anything
//! is built.
//!
//! - top level: `services`, `volumes`, `networks`, `secrets` and `configs` (with `file:`),
//!   `include` (files inside the release), `name` (the deployd project name wins), `version`
//!   (ignored), `x-*` extensions; YAML anchors and merge keys (`<<: *defaults`) anywhere;
//! - per service: see [`keys`] for the full list: build, image, command, environment, ports
//!   (ranges too), `expose`, volumes (named, anonymous, tmpfs, and release binds, always
//!   read-only), secrets, configs, depends_on (`service_started`, `service_healthy`,
//!   `service_completed_successfully`), healthcheck, networks with aliases, `container_name`
//!   (an alias), user, working_dir, init, tty, stdin_open, logging, extra_hosts, tmpfs, ulimits,
//!   resource limits (`mem_limit`, `cpus`, `deploy.resources`), stop_signal,
//!   stop_grace_period, profiles, platform, hostname.
//!
//! Services whose `profiles` are not active (`[containers] profiles`, or `COMPOSE_PROFILES`) are
//! left out entirely, unvalidated.
//!
//! Values are interpolated like docker compose does: `${VAR}`, `$VAR`, `${VAR:-default}`,
//! `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`, `${VAR:+alt}`, `${VAR+alt}` and `$$` for a
//! literal `$`. Variables come from the map passed in (treated as the shell environment, so it wins)
//! and then from the release's `.env` file. Unset variables without a default become empty strings,
//! with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use yaml_serde::Value;

use super::error::ContainerError;
use crate::config::ContainersConfig;

pub(crate) mod beneath;
mod interpolate;
mod keys;
mod model;
mod mounts;
mod names;
mod options;
mod project;
mod runtime;
mod service;
mod source;
mod validate;

/// What every compose parsing step returns: the value, or the refusal naming service and key.
pub(crate) type Parsed<T> = Result<T, ContainerError>;

pub(crate) use self::model::split_image;
pub use self::model::{
    BuildSpec, DependCondition, Dependency, HealthSpec, LoggingSpec, MountSpec, NamedObject,
    PortSpec, Project, Resources, RunOptions, Service, ServiceNetwork,
};
pub(crate) use self::validate::valid_tag;

/// Parse and validate the compose file of a release, and the files it includes. No engine
/// calls.
pub(crate) fn load(
    project: &str,
    release_dir: &Path,
    env: &BTreeMap<String, String>,
    settings: &ContainersConfig,
) -> Parsed<Project> {
    let sources = source::read_all(project, release_dir, &settings.compose_file, env, settings)?;
    project::parse_project(&sources, settings)
}

/// Parsing context: what errors name, and where relative paths lead.
#[derive(Debug, Clone)]
struct Cx {
    /// The compose file being read.
    path: PathBuf,
    /// The release directory: nothing may leave it.
    release_dir: PathBuf,
    /// Where relative paths of this file resolve (its project directory).
    base_dir: PathBuf,
    /// The deployd project name.
    project: String,
}

impl Cx {
    fn invalid(&self, service: &str, key: &str, message: impl Into<String>) -> ContainerError {
        ContainerError::InvalidValue {
            path: self.path.clone(),
            service: service.to_string(),
            key: key.to_string(),
            message: message.into(),
        }
    }
    fn unsupported(&self, service: &str, key: &str, why: &str) -> ContainerError {
        ContainerError::UnsupportedKey {
            path: self.path.clone(),
            service: service.to_string(),
            key: key.to_string(),
            why: why.to_string(),
        }
    }
    fn forbidden(&self, service: &str, key: &str, why: impl Into<String>) -> ContainerError {
        ContainerError::Forbidden {
            path: self.path.clone(),
            service: service.to_string(),
            key: key.to_string(),
            why: why.into(),
        }
    }
}

#[cfg(test)]
impl Cx {
    /// A context for unit tests: `docker-compose.yml` of the release `/r`, project `p`.
    fn test() -> Cx {
        Cx {
            path: "docker-compose.yml".into(),
            release_dir: "/r".into(),
            base_dir: "/r".into(),
            project: "p".into(),
        }
    }
}

/// The profiles that are active: `[containers] profiles` plus `COMPOSE_PROFILES`.
fn active_profiles(
    settings: &ContainersConfig,
    compose_profiles: Option<&str>,
) -> BTreeSet<String> {
    settings
        .profiles
        .iter()
        .cloned()
        .chain(
            compose_profiles
                .unwrap_or_default()
                .split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty()),
        )
        .collect()
}

/// Whether a service (raw or interpolated) is enabled by the active profiles: it names no
/// profile, or one of them is active (`*` activates all).
fn service_active(svc: &Value, active: &BTreeSet<String>) -> bool {
    let profiles: Vec<String> = entries(svc)
        .and_then(|f| {
            value_of(&f, "profiles")
                .and_then(Value::as_sequence)
                .cloned()
        })
        .unwrap_or_default()
        .iter()
        .filter_map(scalar_string)
        .collect();
    profiles.is_empty() || active.contains("*") || profiles.iter().any(|p| active.contains(p))
}

/// Entries of a mapping whose keys are strings; `None` if the value is not a mapping.
fn entries(v: &Value) -> Option<Vec<(String, &Value)>> {
    let m = v.as_mapping()?;
    Some(
        m.iter()
            .map(|(k, v)| (scalar_string(k).unwrap_or_else(|| format!("{k:?}")), v))
            .collect(),
    )
}

/// A scalar as a string (numbers and booleans too, as compose accepts them in many places).
fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The value of `key` among a mapping's entries (the first, as YAML keys are unique).
fn value_of<'v>(fields: &[(String, &'v Value)], key: &str) -> Option<&'v Value> {
    fields.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// A list, or an error naming the service and key.
fn seq<'v>(cx: &Cx, service: &str, key: &str, v: &'v Value) -> Parsed<&'v Vec<Value>> {
    v.as_sequence()
        .ok_or_else(|| cx.invalid(service, key, "must be a list"))
}

/// A string or a list of strings.
fn string_list(cx: &Cx, service: &str, key: &str, v: &Value) -> Parsed<Vec<String>> {
    if let Some(s) = scalar_string(v) {
        return Ok(vec![s]);
    }
    seq(cx, service, key, v)?
        .iter()
        .map(|i| scalar_string(i).ok_or_else(|| cx.invalid(service, key, "must hold strings")))
        .collect()
}

/// A boolean (`true`/`false`, also as strings after interpolation).
fn boolean(cx: &Cx, service: &str, key: &str, v: &Value) -> Parsed<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "true" || s == "false" => Ok(s == "true"),
        _ => Err(cx.invalid(service, key, "must be true or false")),
    }
}

/// A `KEY: value` map or a `["KEY=value", "KEY"]` list; `None` values mean "no value given".
fn key_values(
    cx: &Cx,
    service: &str,
    key: &str,
    v: &Value,
) -> Parsed<Vec<(String, Option<String>)>> {
    if let Some(items) = entries(v) {
        return items
            .into_iter()
            .map(|(k, val)| match val {
                Value::Null => Ok((k, None)),
                other => scalar_string(other)
                    .map(|s| (k.clone(), Some(s)))
                    .ok_or_else(|| cx.invalid(service, key, format!("`{k}` must be a scalar"))),
            })
            .collect();
    }
    seq(cx, service, key, v)?
        .iter()
        .map(|i| {
            let s =
                scalar_string(i).ok_or_else(|| cx.invalid(service, key, "must hold strings"))?;
            Ok(match s.split_once('=') {
                Some((k, val)) => (k.to_string(), Some(val.to_string())),
                None => (s, None),
            })
        })
        .collect()
}

/// A list of strings or names, or a mapping from names to per-entry settings: `(name, settings)`
/// pairs (`settings` is `None` for the list form and for `name:` with no value).
fn named_items<'v>(
    cx: &Cx,
    service: &str,
    key: &str,
    v: &'v Value,
) -> Parsed<Vec<(String, Option<&'v Value>)>> {
    if let Some(items) = entries(v) {
        return Ok(items
            .into_iter()
            .map(|(k, spec)| (k, (!spec.is_null()).then_some(spec)))
            .collect());
    }
    Ok(string_list(cx, service, key, v)?
        .into_iter()
        .map(|n| (n, None))
        .collect())
}
