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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use yaml_serde::Value;

use super::error::ContainerError;

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
const BUILD_KEYS: &[&str] = &[
    "context",
    "dockerfile",
    "args",
    "cache_from",
    "target",
    "labels",
];
const HEALTHCHECK_KEYS: &[&str] = &[
    "test",
    "interval",
    "timeout",
    "retries",
    "start_period",
    "disable",
];
const TOP_OBJECT_KEYS: &[&str] = &["name", "external", "driver"];
/// Name used in errors for keys outside any service.
const TOP_LEVEL: &str = "(top level)";

/// A validated compose project for one release.
#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    /// The container project name (`com.docker.compose.project`).
    pub name: String,
    /// The release directory the compose file was read from.
    pub release_dir: PathBuf,
    /// The compose file that was read.
    pub compose_path: PathBuf,
    /// Services in start order (dependencies first).
    pub services: Vec<Service>,
    /// Named volumes: compose name and engine name.
    pub volumes: Vec<NamedObject>,
    /// Networks: compose name and engine name; `default` is always present.
    pub networks: Vec<NamedObject>,
}

/// A top-level volume or network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedObject {
    /// Name in the compose file.
    pub key: String,
    /// Name in the engine (`<project>_<key>` unless `name:` or `external:` says otherwise).
    pub engine_name: String,
    /// Managed outside deployd: must exist, never created.
    pub external: bool,
    /// Network driver (networks only).
    pub driver: Option<String>,
}

/// One service of the project.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    /// How to build the image, when the service is built from the release.
    pub build: Option<BuildSpec>,
    /// The image reference the service runs (`image:`, or `<project>-<service>` for built services).
    pub image: String,
    pub command: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    /// Final environment: `env_file` entries, overridden by `environment`.
    pub environment: BTreeMap<String, String>,
    pub ports: Vec<PortSpec>,
    pub volumes: Vec<MountSpec>,
    pub restart: Option<String>,
    pub healthcheck: Option<HealthSpec>,
    pub depends_on: Vec<Dependency>,
    pub labels: BTreeMap<String, String>,
    /// Compose names of the networks the service joins.
    pub networks: Vec<String>,
}

/// `build:` of a service.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildSpec {
    /// Absolute build context directory, inside the release directory.
    pub context: PathBuf,
    /// Dockerfile path relative to the context.
    pub dockerfile: String,
    pub args: BTreeMap<String, String>,
    pub cache_from: Vec<String>,
    pub target: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// One published port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub host_ip: Option<String>,
    /// Host port; `None` lets the engine choose.
    pub published: Option<u16>,
    pub target: u16,
    pub protocol: String,
}

/// One mount of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSpec {
    /// A named volume (engine name) mounted at `target`.
    Volume {
        name: String,
        target: String,
        read_only: bool,
    },
    /// A directory or file of the release mounted at `target`.
    Bind {
        source: PathBuf,
        target: String,
        read_only: bool,
    },
}

/// `healthcheck:` of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    /// `["CMD", ...]`, `["CMD-SHELL", "..."]` or `["NONE"]` (disabled).
    pub test: Vec<String>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub retries: Option<u32>,
    pub start_period: Option<Duration>,
}

impl HealthSpec {
    /// Whether the healthcheck is disabled (`disable: true` or `test: ["NONE"]`).
    pub fn disabled(&self) -> bool {
        self.test.first().map(String::as_str) == Some("NONE")
    }
}

/// A `depends_on` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub service: String,
    pub condition: DependCondition,
}

/// When a dependency counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DependCondition {
    Started,
    Healthy,
}

/// Split an image reference into repository and tag (`latest` when absent; digests are dropped).
pub fn split_image(image: &str) -> (&str, &str) {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    match without_digest[last_slash..].rfind(':') {
        Some(i) => (
            &without_digest[..last_slash + i],
            &without_digest[last_slash + i + 1..],
        ),
        None => (without_digest, "latest"),
    }
}

/// Whether a string is a usable tag (what the engine accepts: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`).
pub fn valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && tag.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Parse and validate the compose file of a release. No engine calls.
pub fn load(
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

struct Vars<'a> {
    shell: &'a BTreeMap<String, String>,
    dotenv: BTreeMap<String, String>,
}

impl Vars<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.shell
            .get(name)
            .or_else(|| self.dotenv.get(name))
            .map(String::as_str)
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

/// First pass: every key must be in the supported subset, before interpolation or anything else.
fn validate_keys(cx: &Cx, doc: &Value) -> Result<(), ContainerError> {
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
                for (k, _) in entries(obj).unwrap_or_default() {
                    if !TOP_OBJECT_KEYS.contains(&k.as_str()) {
                        return Err(cx.unsupported(TOP_LEVEL, &format!("{key}.{name}.{k}")));
                    }
                }
            }
        }
    }
    let services = top.iter().find(|(k, _)| k == "services").map(|(_, v)| *v);
    for (name, svc) in services.and_then(entries).unwrap_or_default() {
        let Some(keys) = entries(svc) else { continue };
        for (key, value) in keys {
            if !SERVICE_KEYS.contains(&key.as_str()) {
                return Err(cx.unsupported(&name, &key));
            }
            let nested: &[&str] = match key.as_str() {
                "build" => BUILD_KEYS,
                "healthcheck" => HEALTHCHECK_KEYS,
                _ => continue,
            };
            for (k, _) in entries(value).unwrap_or_default() {
                if !nested.contains(&k.as_str()) {
                    return Err(cx.unsupported(&name, &format!("{key}.{k}")));
                }
            }
        }
        if let Some(deps) = entries(svc)
            .unwrap_or_default()
            .into_iter()
            .find(|(k, _)| k == "depends_on")
            .and_then(|(_, v)| entries(v))
        {
            for (dep, spec) in deps {
                for (k, _) in entries(spec).unwrap_or_default() {
                    if k != "condition" {
                        return Err(cx.unsupported(&name, &format!("depends_on.{dep}.{k}")));
                    }
                }
            }
        }
        if let Some(nets) = entries(svc)
            .unwrap_or_default()
            .into_iter()
            .find(|(k, _)| k == "networks")
            .and_then(|(_, v)| entries(v))
        {
            for (net, spec) in nets {
                if let Some((k, _)) = entries(spec).unwrap_or_default().first() {
                    return Err(cx.unsupported(&name, &format!("networks.{net}.{k}")));
                }
            }
        }
    }
    Ok(())
}

/// Interpolate every string value (keys are left alone, as compose does).
fn interpolate_value(cx: &Cx, v: &Value, vars: &Vars) -> Result<Value, ContainerError> {
    Ok(match v {
        Value::String(s) => Value::String(interpolate(cx, s, vars)?),
        Value::Sequence(items) => Value::Sequence(
            items
                .iter()
                .map(|i| interpolate_value(cx, i, vars))
                .collect::<Result<_, _>>()?,
        ),
        Value::Mapping(m) => {
            let mut out = yaml_serde::Mapping::new();
            for (k, val) in m {
                out.insert(k.clone(), interpolate_value(cx, val, vars)?);
            }
            Value::Mapping(out)
        }
        Value::Tagged(t) => interpolate_value(cx, &t.value, vars)?,
        other => other.clone(),
    })
}

/// Interpolate one string.
fn interpolate(cx: &Cx, s: &str, vars: &Vars) -> Result<String, ContainerError> {
    let err = |message: &str| ContainerError::Interpolation {
        path: cx.path.clone(),
        expression: s.to_string(),
        message: message.to_string(),
    };
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c != '$' {
            out.push(c);
            i += 1;
            continue;
        }
        match chars.get(i + 1) {
            Some('$') => {
                out.push('$');
                i += 2;
            }
            Some('{') => {
                // Find the matching brace, allowing nested `${...}` in defaults.
                let mut depth = 1;
                let mut j = i + 2;
                while j < chars.len() && depth > 0 {
                    match chars[j] {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    j += 1;
                }
                if depth != 0 {
                    return Err(err("unterminated `${`"));
                }
                let inner: String = chars[i + 2..j - 1].iter().collect();
                out.push_str(&expand_braced(cx, &inner, vars, &err)?);
                i = j;
            }
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                let name: String = chars[i + 1..j].iter().collect();
                out.push_str(&lookup(vars, &name));
                i = j;
            }
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    Ok(out)
}

fn lookup(vars: &Vars, name: &str) -> String {
    match vars.get(name) {
        Some(v) => v.to_string(),
        None => {
            tracing::warn!(
                variable = name,
                "compose variable is not set, using an empty string"
            );
            String::new()
        }
    }
}

fn expand_braced(
    cx: &Cx,
    inner: &str,
    vars: &Vars,
    err: &dyn Fn(&str) -> ContainerError,
) -> Result<String, ContainerError> {
    let name_len = inner
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
        .map_or(inner.len(), |(i, _)| i);
    let name = &inner[..name_len];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(err("invalid variable name"));
    }
    let rest = &inner[name_len..];
    let value = vars.get(name);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let (op, word) = if let Some(w) = rest.strip_prefix(":-") {
        (":-", w)
    } else if let Some(w) = rest.strip_prefix(":?") {
        (":?", w)
    } else if let Some(w) = rest.strip_prefix(":+") {
        (":+", w)
    } else if let Some(w) = rest.strip_prefix('-') {
        ("-", w)
    } else if let Some(w) = rest.strip_prefix('?') {
        ("?", w)
    } else if let Some(w) = rest.strip_prefix('+') {
        ("+", w)
    } else if rest.is_empty() {
        ("", "")
    } else {
        return Err(err("unsupported modifier"));
    };
    let word = || interpolate(cx, word, vars);
    Ok(match op {
        "" => lookup(vars, name),
        ":-" if !set_nonempty => word()?,
        "-" if value.is_none() => word()?,
        ":?" if !set_nonempty => {
            return Err(err(&format!("{name} is required: {}", word()?)));
        }
        "?" if value.is_none() => {
            return Err(err(&format!("{name} is required: {}", word()?)));
        }
        ":+" => {
            if set_nonempty {
                word()?
            } else {
                String::new()
            }
        }
        "+" => {
            if value.is_some() {
                word()?
            } else {
                String::new()
            }
        }
        _ => value.unwrap_or_default().to_string(),
    })
}

/// Parse `KEY=value` lines (`.env`, `env_file`): comments, blank lines, `export`, quotes.
pub fn parse_env_lines(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let value = if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
            v[1..v.len() - 1]
                .replace("\\n", "\n")
                .replace("\\\"", "\"")
                .replace("\\\\", "\\")
        } else if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
            v[1..v.len() - 1].to_string()
        } else {
            match v.find(" #") {
                Some(i) => v[..i].trim_end().to_string(),
                None => v.to_string(),
            }
        };
        out.insert(k.trim().to_string(), value);
    }
    out
}

fn parse_project(cx: &Cx, doc: &Value, vars: &Vars) -> Result<Project, ContainerError> {
    let top = entries(doc).unwrap_or_default();
    let get = |k: &str| top.iter().find(|(key, _)| key == k).map(|(_, v)| *v);
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
        let field = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| *v);
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

fn parse_service(
    cx: &Cx,
    name: &str,
    v: &Value,
    vars: &Vars,
    volumes: &[NamedObject],
    networks: &[NamedObject],
) -> Result<Service, ContainerError> {
    let fields = entries(v).ok_or_else(|| cx.invalid(name, "", "service must be a mapping"))?;
    let field = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| *v);
    let build = field("build")
        .map(|b| parse_build(cx, name, b, vars))
        .transpose()?;
    let image = match field("image") {
        Some(i) => scalar_string(i).ok_or_else(|| cx.invalid(name, "image", "must be a string"))?,
        None if build.is_some() => format!("{}-{name}", cx.project),
        None => return Err(cx.invalid(name, "image", "a service needs `image` or `build`")),
    };
    if build.is_some() {
        let (repo, tag) = split_image(&image);
        if repo.is_empty() || !valid_tag(tag) || image.contains('@') {
            return Err(cx.invalid(name, "image", format!("`{image}` is not a name:tag")));
        }
    }
    let command = field("command")
        .map(|c| parse_command(cx, name, "command", c))
        .transpose()?;
    let entrypoint = field("entrypoint")
        .map(|c| parse_command(cx, name, "entrypoint", c))
        .transpose()?;
    let mut environment = BTreeMap::new();
    if let Some(files) = field("env_file") {
        for file in string_list(cx, name, "env_file", files)? {
            let path = inside_release(cx, name, "env_file", &file)?;
            let text =
                std::fs::read_to_string(&path).map_err(|source| ContainerError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
            environment.extend(parse_env_lines(&text));
        }
    }
    if let Some(env) = field("environment") {
        for (k, val) in key_values(cx, name, "environment", env)? {
            match val.or_else(|| vars.get(&k).map(str::to_string)) {
                Some(val) => {
                    environment.insert(k, val);
                }
                None => {
                    environment.remove(&k);
                }
            }
        }
    }
    let ports = match field("ports") {
        Some(p) => seq(cx, name, "ports", p)?
            .iter()
            .map(|p| parse_port(cx, name, p))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let mounts = match field("volumes") {
        Some(m) => seq(cx, name, "volumes", m)?
            .iter()
            .map(|m| parse_mount(cx, name, m, volumes))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let restart = match field("restart").map(scalar_string) {
        Some(Some(r)) => {
            let ok = matches!(
                r.as_str(),
                "no" | "always" | "unless-stopped" | "on-failure"
            ) || r
                .strip_prefix("on-failure:")
                .is_some_and(|n| n.parse::<u32>().is_ok());
            if !ok {
                return Err(cx.invalid(name, "restart", format!("`{r}` is not a restart policy")));
            }
            Some(r)
        }
        Some(None) => return Err(cx.invalid(name, "restart", "must be a string")),
        None => None,
    };
    let healthcheck = field("healthcheck")
        .map(|h| parse_healthcheck(cx, name, h))
        .transpose()?;
    let depends_on = match field("depends_on") {
        Some(d) => parse_depends(cx, name, d)?,
        None => Vec::new(),
    };
    let labels = match field("labels") {
        Some(l) => key_values(cx, name, "labels", l)?
            .into_iter()
            .map(|(k, v)| (k, v.unwrap_or_default()))
            .collect(),
        None => BTreeMap::new(),
    };
    let service_networks = match field("networks") {
        Some(n) if n.as_mapping().is_some() => entries(n)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, _)| k)
            .collect(),
        Some(n) => string_list(cx, name, "networks", n)?,
        None => vec!["default".to_string()],
    };
    for n in &service_networks {
        if !networks.iter().any(|o| &o.key == n) {
            return Err(cx.invalid(
                name,
                "networks",
                format!("network `{n}` is not declared under the top-level `networks`"),
            ));
        }
    }
    Ok(Service {
        name: name.to_string(),
        build,
        image,
        command,
        entrypoint,
        environment,
        ports,
        volumes: mounts,
        restart,
        healthcheck,
        depends_on,
        labels,
        networks: service_networks,
    })
}

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

fn parse_build(
    cx: &Cx,
    service: &str,
    v: &Value,
    vars: &Vars,
) -> Result<BuildSpec, ContainerError> {
    if let Some(context) = scalar_string(v) {
        return Ok(BuildSpec {
            context: inside_release(cx, service, "build.context", &context)?,
            dockerfile: "Dockerfile".into(),
            args: BTreeMap::new(),
            cache_from: Vec::new(),
            target: None,
            labels: BTreeMap::new(),
        });
    }
    let fields =
        entries(v).ok_or_else(|| cx.invalid(service, "build", "must be a path or a mapping"))?;
    let field = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| *v);
    let context = match field("context") {
        Some(c) => scalar_string(c)
            .ok_or_else(|| cx.invalid(service, "build.context", "must be a string"))?,
        None => ".".into(),
    };
    let context = inside_release(cx, service, "build.context", &context)?;
    let dockerfile = match field("dockerfile") {
        Some(d) => scalar_string(d)
            .ok_or_else(|| cx.invalid(service, "build.dockerfile", "must be a string"))?,
        None => "Dockerfile".into(),
    };
    let df = Path::new(&dockerfile);
    if df.is_absolute() || df.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(cx.invalid(
            service,
            "build.dockerfile",
            "must be a relative path inside the build context",
        ));
    }
    let args = match field("args") {
        Some(a) => key_values(cx, service, "build.args", a)?
            .into_iter()
            .filter_map(|(k, v)| {
                // An arg listed without a value takes it from the environment, if set.
                let v = v.or_else(|| vars.get(&k).map(str::to_string))?;
                Some((k, v))
            })
            .collect(),
        None => BTreeMap::new(),
    };
    let cache_from = match field("cache_from") {
        Some(c) => string_list(cx, service, "build.cache_from", c)?,
        None => Vec::new(),
    };
    let target = field("target").and_then(scalar_string);
    let labels = match field("labels") {
        Some(l) => key_values(cx, service, "build.labels", l)?
            .into_iter()
            .map(|(k, v)| (k, v.unwrap_or_default()))
            .collect(),
        None => BTreeMap::new(),
    };
    Ok(BuildSpec {
        context,
        dockerfile,
        args,
        cache_from,
        target,
        labels,
    })
}

/// Resolve a path of the compose file against the release directory, refusing anything that
/// leaves it (lexically, or through a symlink when the path exists).
fn inside_release(cx: &Cx, service: &str, key: &str, p: &str) -> Result<PathBuf, ContainerError> {
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

/// `command` / `entrypoint`: a list, or a string split like a shell would (no expansion).
fn parse_command(
    cx: &Cx,
    service: &str,
    key: &str,
    v: &Value,
) -> Result<Vec<String>, ContainerError> {
    if let Some(s) = scalar_string(v) {
        return shell_split(&s).ok_or_else(|| cx.invalid(service, key, "unbalanced quotes"));
    }
    string_list(cx, service, key, v)
}

/// Split a command line into words: whitespace, single quotes, double quotes, backslashes.
pub fn shell_split(s: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => cur.push(c),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => match chars.next()? {
                            c @ ('"' | '\\' | '$' | '`') => cur.push(c),
                            c => {
                                cur.push('\\');
                                cur.push(c);
                            }
                        },
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.push(chars.next()?);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Some(words)
}

fn parse_port(cx: &Cx, service: &str, v: &Value) -> Result<PortSpec, ContainerError> {
    let bad = |m: String| cx.invalid(service, "ports", m);
    let num = |s: &str| -> Result<u16, ContainerError> {
        s.parse::<u16>()
            .map_err(|_| bad(format!("`{s}` is not a single port number")))
    };
    if let Some(fields) = entries(v) {
        let field = |k: &str| {
            fields
                .iter()
                .find(|(f, _)| f == k)
                .and_then(|(_, v)| scalar_string(v))
        };
        for (k, _) in &fields {
            if !["target", "published", "host_ip", "protocol"].contains(&k.as_str()) {
                return Err(cx.unsupported(service, &format!("ports.{k}")));
            }
        }
        let target = num(&field("target").ok_or_else(|| bad("`target` is required".into()))?)?;
        return Ok(PortSpec {
            host_ip: field("host_ip"),
            published: field("published").map(|p| num(&p)).transpose()?,
            target,
            protocol: field("protocol").unwrap_or_else(|| "tcp".into()),
        });
    }
    let s = scalar_string(v).ok_or_else(|| bad("must be a string or a mapping".into()))?;
    let (spec, protocol) = match s.rsplit_once('/') {
        Some((spec, proto)) => (spec.to_string(), proto.to_string()),
        None => (s.clone(), "tcp".to_string()),
    };
    let (host_ip, rest) = if let Some(after) = spec.strip_prefix('[') {
        let (ip, rest) = after
            .split_once("]:")
            .ok_or_else(|| bad(format!("`{s}` is not a port mapping")))?;
        (Some(ip.to_string()), rest.to_string())
    } else {
        (None, spec)
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let (host_ip, published, target) = match parts.as_slice() {
        [t] => (host_ip, None, num(t)?),
        [p, t] if host_ip.is_some() => (host_ip, Some(num(p)?), num(t)?),
        [p, t] => (
            None,
            if p.is_empty() { None } else { Some(num(p)?) },
            num(t)?,
        ),
        [ip, p, t] if host_ip.is_none() => (
            Some(ip.to_string()),
            if p.is_empty() { None } else { Some(num(p)?) },
            num(t)?,
        ),
        _ => return Err(bad(format!("`{s}` is not a port mapping"))),
    };
    Ok(PortSpec {
        host_ip,
        published,
        target,
        protocol,
    })
}

fn parse_mount(
    cx: &Cx,
    service: &str,
    v: &Value,
    volumes: &[NamedObject],
) -> Result<MountSpec, ContainerError> {
    let bad = |m: String| cx.invalid(service, "volumes", m);
    let (kind, source, target, read_only) = if let Some(fields) = entries(v) {
        for (k, _) in &fields {
            if !["type", "source", "target", "read_only"].contains(&k.as_str()) {
                return Err(cx.unsupported(service, &format!("volumes.{k}")));
            }
        }
        let field = |k: &str| {
            fields
                .iter()
                .find(|(f, _)| f == k)
                .and_then(|(_, v)| scalar_string(v))
        };
        let kind = field("type").unwrap_or_else(|| "volume".into());
        let source = field("source").ok_or_else(|| bad("`source` is required".into()))?;
        let target = field("target").ok_or_else(|| bad("`target` is required".into()))?;
        let ro = field("read_only").is_some_and(|r| r == "true");
        (kind, source, target, ro)
    } else {
        let s = scalar_string(v).ok_or_else(|| bad("must be a string or a mapping".into()))?;
        let parts: Vec<&str> = s.split(':').collect();
        let (source, target, mode) = match parts.as_slice() {
            [s, t] => (*s, *t, "rw"),
            [s, t, m] => (*s, *t, *m),
            _ => {
                return Err(bad(format!(
                    "`{s}` is not SOURCE:TARGET[:ro]; anonymous volumes are not supported"
                )));
            }
        };
        let read_only = match mode {
            "ro" => true,
            "rw" => false,
            m => return Err(bad(format!("mode `{m}` is not supported (use ro or rw)"))),
        };
        let kind = if source.starts_with(['.', '/', '~']) {
            "bind"
        } else {
            "volume"
        };
        (kind.to_string(), source.into(), target.into(), read_only)
    };
    if !target.starts_with('/') {
        return Err(bad(format!("target `{target}` must be an absolute path")));
    }
    match kind.as_str() {
        "bind" => Ok(MountSpec::Bind {
            source: inside_release(cx, service, "volumes", &source)?,
            target,
            read_only,
        }),
        "volume" => {
            let obj = volumes.iter().find(|o| o.key == source).ok_or_else(|| {
                bad(format!(
                    "volume `{source}` is not declared under the top-level `volumes`"
                ))
            })?;
            Ok(MountSpec::Volume {
                name: obj.engine_name.clone(),
                target,
                read_only,
            })
        }
        other => Err(bad(format!("mount type `{other}` is not supported"))),
    }
}

fn parse_healthcheck(cx: &Cx, service: &str, v: &Value) -> Result<HealthSpec, ContainerError> {
    let fields =
        entries(v).ok_or_else(|| cx.invalid(service, "healthcheck", "must be a mapping"))?;
    let field = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| *v);
    let dur = |k: &str| -> Result<Option<Duration>, ContainerError> {
        field(k)
            .map(|d| {
                let s = scalar_string(d).ok_or_else(|| {
                    cx.invalid(service, &format!("healthcheck.{k}"), "not a duration")
                })?;
                parse_duration(&s).ok_or_else(|| {
                    cx.invalid(
                        service,
                        &format!("healthcheck.{k}"),
                        format!("`{s}` is not a duration like 10s or 1m30s"),
                    )
                })
            })
            .transpose()
    };
    let disabled = field("disable").and_then(Value::as_bool).unwrap_or(false);
    let test = if disabled {
        vec!["NONE".to_string()]
    } else {
        match field("test") {
            Some(t) if scalar_string(t).is_some() => {
                vec![
                    "CMD-SHELL".to_string(),
                    scalar_string(t).unwrap_or_default(),
                ]
            }
            Some(t) => {
                let list = string_list(cx, service, "healthcheck.test", t)?;
                if !matches!(
                    list.first().map(String::as_str),
                    Some("CMD" | "CMD-SHELL" | "NONE")
                ) {
                    return Err(cx.invalid(
                        service,
                        "healthcheck.test",
                        "a list must start with CMD, CMD-SHELL or NONE",
                    ));
                }
                list
            }
            None => return Err(cx.invalid(service, "healthcheck.test", "is required")),
        }
    };
    let retries = field("retries")
        .map(|r| {
            r.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| cx.invalid(service, "healthcheck.retries", "must be a number"))
        })
        .transpose()?;
    Ok(HealthSpec {
        test,
        interval: dur("interval")?,
        timeout: dur("timeout")?,
        retries,
        start_period: dur("start_period")?,
    })
}

/// Compose durations: `1h2m3s`, `1m30s`, `10s`, `500ms`, `1.5s`, `100us`, `10ns`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * factor;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_secs_f64(total))
}

fn parse_depends(cx: &Cx, service: &str, v: &Value) -> Result<Vec<Dependency>, ContainerError> {
    if let Some(items) = entries(v) {
        return items
            .into_iter()
            .map(|(dep, spec)| {
                let cond = entries(spec)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|(k, _)| k == "condition")
                    .and_then(|(_, c)| scalar_string(c));
                let condition = match cond.as_deref() {
                    None | Some("service_started") => DependCondition::Started,
                    Some("service_healthy") => DependCondition::Healthy,
                    Some(other) => {
                        return Err(cx.invalid(
                            service,
                            &format!("depends_on.{dep}.condition"),
                            format!(
                                "`{other}` is not supported (use service_started or service_healthy)"
                            ),
                        ));
                    }
                };
                Ok(Dependency {
                    service: dep,
                    condition,
                })
            })
            .collect();
    }
    Ok(string_list(cx, service, "depends_on", v)?
        .into_iter()
        .map(|service| Dependency {
            service,
            condition: DependCondition::Started,
        })
        .collect())
}

/// Order services so dependencies come first (stable: compose file order otherwise).
fn order_services(cx: &Cx, services: Vec<Service>) -> Result<Vec<Service>, ContainerError> {
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

    #[test]
    fn splits_images() {
        assert_eq!(
            split_image("watchparty-backend:latest"),
            ("watchparty-backend", "latest")
        );
        assert_eq!(
            split_image("localhost:5000/app"),
            ("localhost:5000/app", "latest")
        );
        assert_eq!(
            split_image("localhost:5000/app:v1"),
            ("localhost:5000/app", "v1")
        );
        assert_eq!(split_image("redis"), ("redis", "latest"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10x"), None);
    }

    #[test]
    fn shell_words() {
        assert_eq!(
            shell_split(r#"httpd -f -p "80 80" 'a b' c\ d"#),
            Some(
                vec!["httpd", "-f", "-p", "80 80", "a b", "c d"]
                    .into_iter()
                    .map(String::from)
                    .collect()
            )
        );
        assert_eq!(shell_split("echo 'open"), None);
    }

    #[test]
    fn env_lines() {
        let m = parse_env_lines("# c\nA=1\nexport B=\"x y\"\nC='z' \nD=v # comment\n\nbad\n");
        assert_eq!(m.get("A").map(String::as_str), Some("1"));
        assert_eq!(m.get("B").map(String::as_str), Some("x y"));
        assert_eq!(m.get("C").map(String::as_str), Some("z"));
        assert_eq!(m.get("D").map(String::as_str), Some("v"));
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn interpolation_forms() {
        let shell: BTreeMap<String, String> = [
            ("A".to_string(), "shell".to_string()),
            ("E".to_string(), String::new()),
        ]
        .into();
        let dotenv: BTreeMap<String, String> = [
            ("A".to_string(), "dotenv".to_string()),
            ("B".to_string(), "b".to_string()),
        ]
        .into();
        let vars = Vars {
            shell: &shell,
            dotenv,
        };
        let cx = Cx {
            path: "x".into(),
            release_dir: "/r".into(),
            project: "p".into(),
        };
        let i = |s: &str| interpolate(&cx, s, &vars).unwrap();
        assert_eq!(i("${A}-$B-$$A"), "shell-b-$A");
        assert_eq!(i("${E:-d}|${E-d}|${U-d}|${U:-${B}}"), "d||d|b");
        assert_eq!(i("${B:+alt}|${U:+alt}|${E+set}"), "alt||set");
        assert!(interpolate(&cx, "${U:?needed}", &vars).is_err());
        assert!(interpolate(&cx, "${A", &vars).is_err());
    }
}
