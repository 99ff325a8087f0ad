//! The compose file: parsing, interpolation and validation, with no engine calls.
//!
//! deployd reads the `docker-compose.yml` a release ships (the same file `docker compose` uses) but
//! supports only a subset of it, so that every key it accepts has a meaning it honours:
//!
//! - top level: `services`, `volumes`, `networks`, `name` (the deployd project name wins), `version`
//!   (ignored);
//! - per service: `build` (`context`, `dockerfile`, `args`, `cache_from`, `target`, `labels`), `image`,
//!   `command`, `entrypoint`, `environment` (map or list), `env_file`, `ports`, `volumes` (named
//!   volumes, and bind mounts that stay inside the release directory), `restart`, `healthcheck`,
//!   `depends_on` (list, or map with `condition: service_started | service_healthy`), `labels`,
//!   `networks`.
//!
//! Any other key is an error naming the service and the key, raised before anything is built.
//!
//! Values are interpolated like docker compose does: `${VAR}`, `$VAR`, `${VAR:-default}`,
//! `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`, `${VAR:+alt}`, `${VAR+alt}` and `$$` for a
//! literal `$`. Variables come from the map passed in (treated as the shell environment, so it wins)
//! and then from the release's `.env` file. Unset variables without a default become empty strings,
//! with a warning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use yaml_serde::Value;

use self::interpolate::{Vars, interpolate_value, parse_env_lines};
use self::service::parse_service;
use self::validate::{TOP_LEVEL, order_services, validate_keys};
use super::error::ContainerError;

mod interpolate;
mod model;
mod runtime;
mod service;
mod validate;

pub(crate) use self::model::split_image;
pub use self::model::{
    BuildSpec, DependCondition, Dependency, HealthSpec, MountSpec, NamedObject, PortSpec, Project,
    Service,
};
pub(crate) use self::validate::valid_tag;

/// Parse and validate the compose file of a release. No engine calls.
pub(crate) fn load(
    project: &str,
    release_dir: &Path,
    compose_file: &str,
    env: &BTreeMap<String, String>,
) -> Result<Project, ContainerError> {
    let compose_path = release_dir.join(compose_file);
    let text =
        std::fs::read_to_string(&compose_path).map_err(|source| ContainerError::ComposeRead {
            path: compose_path.clone(),
            source,
        })?;
    let dotenv_path = release_dir.join(".env");
    let dotenv = match std::fs::read_to_string(&dotenv_path) {
        Ok(t) => parse_env_lines(&t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(source) => {
            return Err(ContainerError::ReadFile {
                path: dotenv_path,
                source,
            });
        }
    };
    let vars = Vars { shell: env, dotenv };
    let cx = Cx {
        path: compose_path.clone(),
        release_dir: release_dir.to_path_buf(),
        project: project.to_string(),
    };
    let raw: Value = yaml_serde::from_str(&text).map_err(|e| ContainerError::ComposeSyntax {
        path: compose_path.clone(),
        message: e.to_string(),
    })?;
    validate_keys(&cx, &raw)?;
    let doc = interpolate_value(&cx, &raw, &vars)?;
    parse_project(&cx, &doc, &vars)
}

/// Parsing context: what errors name.
struct Cx {
    path: PathBuf,
    release_dir: PathBuf,
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
    fn unsupported(&self, service: &str, key: &str) -> ContainerError {
        ContainerError::UnsupportedKey {
            path: self.path.clone(),
            service: service.to_string(),
            key: key.to_string(),
        }
    }
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
fn seq<'v>(
    cx: &Cx,
    service: &str,
    key: &str,
    v: &'v Value,
) -> Result<&'v Vec<Value>, ContainerError> {
    v.as_sequence()
        .ok_or_else(|| cx.invalid(service, key, "must be a list"))
}

/// A string or a list of strings.
fn string_list(
    cx: &Cx,
    service: &str,
    key: &str,
    v: &Value,
) -> Result<Vec<String>, ContainerError> {
    if let Some(s) = scalar_string(v) {
        return Ok(vec![s]);
    }
    seq(cx, service, key, v)?
        .iter()
        .map(|i| scalar_string(i).ok_or_else(|| cx.invalid(service, key, "must hold strings")))
        .collect()
}

/// A `KEY: value` map or a `["KEY=value", "KEY"]` list; `None` values mean "no value given".
fn key_values(
    cx: &Cx,
    service: &str,
    key: &str,
    v: &Value,
) -> Result<Vec<(String, Option<String>)>, ContainerError> {
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

/// The project: top-level volumes and networks, then every service, in start order.
fn parse_project(cx: &Cx, doc: &Value, vars: &Vars) -> Result<Project, ContainerError> {
    let top = entries(doc).unwrap_or_default();
    let get = |k: &str| value_of(&top, k);
    let volumes = parse_top_objects(cx, get("volumes"), "volumes")?;
    let mut networks = parse_top_objects(cx, get("networks"), "networks")?;
    if !networks.iter().any(|n| n.key == "default") {
        networks.push(NamedObject {
            key: "default".into(),
            engine_name: format!("{}_default", cx.project),
            external: false,
            driver: None,
        });
    }
    let services_v = get("services").ok_or_else(|| ContainerError::ComposeSyntax {
        path: cx.path.clone(),
        message: "no `services` mapping".into(),
    })?;
    let svc_entries = entries(services_v).ok_or_else(|| ContainerError::ComposeSyntax {
        path: cx.path.clone(),
        message: "`services` is not a mapping".into(),
    })?;
    let mut services = Vec::new();
    for (name, v) in svc_entries {
        services.push(parse_service(cx, &name, v, vars, &volumes, &networks)?);
    }
    let services = order_services(cx, services)?;
    Ok(Project {
        name: cx.project.clone(),
        release_dir: cx.release_dir.clone(),
        compose_path: cx.path.clone(),
        services,
        volumes,
        networks,
    })
}

/// Top-level `volumes` or `networks` (`kind`), with their engine names.
fn parse_top_objects(
    cx: &Cx,
    v: Option<&Value>,
    kind: &str,
) -> Result<Vec<NamedObject>, ContainerError> {
    let mut out = Vec::new();
    let Some(v) = v else { return Ok(out) };
    if v.is_null() {
        return Ok(out);
    }
    let items =
        entries(v).ok_or_else(|| cx.invalid(TOP_LEVEL, kind, "must be a mapping of names"))?;
    for (key, obj) in items {
        let fields = entries(obj).unwrap_or_default();
        let field = |k: &str| value_of(&fields, k);
        let external = field("external").and_then(Value::as_bool).unwrap_or(false);
        let engine_name = match field("name").and_then(scalar_string) {
            Some(n) => n,
            None if external => key.clone(),
            None => format!("{}_{key}", cx.project),
        };
        let driver = field("driver").and_then(scalar_string);
        out.push(NamedObject {
            key,
            engine_name,
            external,
            driver,
        });
    }
    Ok(out)
}
