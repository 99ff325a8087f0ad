//! One service of the compose file: image and build, command, environment, dependencies, labels
//! and networks; ports, mounts and run options are parsed by their own modules.

use super::Parsed;
use std::collections::BTreeMap;
use std::path::{Component, Path};

use yaml_serde::Value;

use super::interpolate::Vars;
use super::model::{BuildSpec, DependCondition, Dependency, Service, ServiceNetwork, split_image};
use super::mounts::{parse_file_refs, parse_mount};
use super::options::{parse_restart, parse_run_options};
use super::project::Declared;
use super::runtime::{parse_expose, parse_healthcheck, parse_port};
use super::source::read_env_file;
use super::validate::{inside_release, valid_tag};
use super::{
    Cx, boolean, entries, key_values, named_items, scalar_string, seq, string_list, value_of,
};

/// One service, checked against what the top level declares.
pub(super) fn parse_service(
    cx: &Cx,
    name: &str,
    v: &Value,
    vars: &Vars,
    declared: &Declared<'_>,
) -> Parsed<Service> {
    let fields = entries(v).ok_or_else(|| cx.invalid(name, "", "service must be a mapping"))?;
    let field = |k: &str| value_of(&fields, k);
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
    let environment = parse_environment(cx, name, field("env_file"), field("environment"), vars)?;
    let mut ports = Vec::new();
    for p in items(cx, name, "ports", field("ports"))? {
        ports.extend(parse_port(cx, name, p)?);
    }
    let expose = field("expose")
        .map(|e| parse_expose(cx, name, e))
        .transpose()?
        .unwrap_or_default();
    let mut mounts = Vec::new();
    for m in items(cx, name, "volumes", field("volumes"))? {
        mounts.push(parse_mount(cx, name, m, declared.volumes)?);
    }
    for (kind, files, default_dir) in [
        ("secrets", declared.secrets, "/run/secrets/"),
        ("configs", declared.configs, "/"),
    ] {
        if let Some(refs) = field(kind) {
            mounts.extend(parse_file_refs(cx, name, kind, refs, files, default_dir)?);
        }
    }
    let restart = parse_restart(cx, name, field("restart"), field("deploy"))?;
    let healthcheck = field("healthcheck")
        .map(|h| parse_healthcheck(cx, name, h))
        .transpose()?;
    let depends_on = match field("depends_on") {
        Some(d) => parse_depends(cx, name, d)?,
        None => Vec::new(),
    };
    let labels = parse_labels(cx, name, "labels", field("labels"))?;
    let networks = parse_networks(
        cx,
        name,
        field("networks"),
        field("container_name"),
        declared,
    )?;
    let run = parse_run_options(cx, name, &fields, declared.settings)?;
    Ok(Service {
        name: name.to_string(),
        build,
        image,
        command,
        entrypoint,
        environment,
        ports,
        expose,
        volumes: mounts,
        restart,
        healthcheck,
        depends_on,
        labels,
        networks,
        run,
    })
}

/// The items of a list a service may leave out.
fn items<'v>(cx: &Cx, name: &str, key: &str, v: Option<&'v Value>) -> Parsed<&'v [Value]> {
    Ok(v.map(|v| seq(cx, name, key, v))
        .transpose()?
        .map_or(&[][..], Vec::as_slice))
}

/// `env_file` entries (short or long form), then `environment` over them; a variable listed
/// without a value takes it from the environment, or is left out.
fn parse_environment(
    cx: &Cx,
    name: &str,
    env_file: Option<&Value>,
    environment: Option<&Value>,
    vars: &Vars,
) -> Parsed<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let files: Vec<(String, bool)> = match env_file {
        None => Vec::new(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|i| env_file_entry(cx, name, i))
            .collect::<Result<_, _>>()?,
        Some(one) => vec![env_file_entry(cx, name, one)?],
    };
    for (file, required) in files {
        let path = inside_release(cx, name, "env_file", &file)?;
        out.extend(read_env_file(&path, required)?);
    }
    if let Some(env) = environment {
        for (k, val) in key_values(cx, name, "environment", env)? {
            match val.or_else(|| vars.get(&k).map(str::to_string)) {
                Some(val) => {
                    out.insert(k, val);
                }
                None => {
                    out.remove(&k);
                }
            }
        }
    }
    Ok(out)
}

/// One `env_file` entry: a path, or `{path, required, format}`; `(path, required)`.
fn env_file_entry(cx: &Cx, name: &str, v: &Value) -> Parsed<(String, bool)> {
    if let Some(p) = scalar_string(v) {
        return Ok((p, true));
    }
    let fields =
        entries(v).ok_or_else(|| cx.invalid(name, "env_file", "must hold paths or mappings"))?;
    let field = |k: &str| value_of(&fields, k);
    if let Some(f) = field("format").and_then(scalar_string) {
        return Err(cx.invalid(
            name,
            "env_file.format",
            format!("`{f}` is not supported; deployd reads `KEY=value` lines"),
        ));
    }
    let path = field("path")
        .and_then(scalar_string)
        .ok_or_else(|| cx.invalid(name, "env_file.path", "is required"))?;
    let required = field("required")
        .map(|r| boolean(cx, name, "env_file.required", r))
        .transpose()?
        .unwrap_or(true);
    Ok((path, required))
}

/// `networks` (list, or map with `aliases`), each declared at the top level; `container_name`
/// becomes one more alias on every network, so the name the app uses resolves while the
/// container keeps deployd's `<project>-<service>-1`.
fn parse_networks(
    cx: &Cx,
    name: &str,
    v: Option<&Value>,
    container_name: Option<&Value>,
    declared: &Declared<'_>,
) -> Parsed<Vec<ServiceNetwork>> {
    let container_name = container_name
        .map(|c| {
            scalar_string(c)
                .filter(|c| super::names::unusable_name(c).is_none())
                .ok_or_else(|| {
                    cx.invalid(
                        name,
                        "container_name",
                        "must be a plain name (letters, digits, `_`, `.`, `-`)",
                    )
                })
        })
        .transpose()?;
    let items = match v {
        Some(v) => named_items(cx, name, "networks", v)?,
        None => vec![("default".to_string(), None)],
    };
    let mut out = Vec::new();
    for (key, spec) in items {
        if !declared.networks.iter().any(|o| o.key == key) {
            return Err(cx.invalid(
                name,
                "networks",
                format!("network `{key}` is not declared under the top-level `networks`"),
            ));
        }
        let mut aliases = match spec
            .and_then(entries)
            .as_deref()
            .and_then(|f| value_of(f, "aliases"))
        {
            Some(a) => string_list(cx, name, &format!("networks.{key}.aliases"), a)?,
            None => Vec::new(),
        };
        aliases.extend(container_name.clone());
        out.push(ServiceNetwork { key, aliases });
    }
    Ok(out)
}

/// `build:`: a context path, or the mapping form.
fn parse_build(cx: &Cx, service: &str, v: &Value, vars: &Vars) -> Parsed<BuildSpec> {
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
    let field = |k: &str| value_of(&fields, k);
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
    let labels = parse_labels(cx, service, "build.labels", field("labels"))?;
    Ok(BuildSpec {
        context,
        dockerfile,
        args,
        cache_from,
        target,
        labels,
    })
}

/// `labels` (of a service or of its build): a map or a `KEY=value` list; a label listed without
/// a value is empty.
fn parse_labels(
    cx: &Cx,
    service: &str,
    key: &str,
    v: Option<&Value>,
) -> Parsed<BTreeMap<String, String>> {
    let Some(v) = v else {
        return Ok(BTreeMap::new());
    };
    Ok(key_values(cx, service, key, v)?
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default()))
        .collect())
}

/// `command` / `entrypoint`: a list, or a string split like a shell would (no expansion).
fn parse_command(cx: &Cx, service: &str, key: &str, v: &Value) -> Parsed<Vec<String>> {
    if let Some(s) = scalar_string(v) {
        return shell_split(&s).ok_or_else(|| cx.invalid(service, key, "unbalanced quotes"));
    }
    string_list(cx, service, key, v)
}

/// Split a command line into words: whitespace, single quotes, double quotes, backslashes.
fn shell_split(s: &str) -> Option<Vec<String>> {
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

/// `depends_on`: a list of services, or a map with `condition`, `restart` and `required`.
fn parse_depends(cx: &Cx, service: &str, v: &Value) -> Parsed<Vec<Dependency>> {
    named_items(cx, service, "depends_on", v)?
        .into_iter()
        .map(|(dep, spec)| {
            let fields = spec.and_then(entries).unwrap_or_default();
            let key = |k: &str| format!("depends_on.{dep}.{k}");
            let flag = |k: &str, default: bool| {
                value_of(&fields, k)
                    .map(|v| boolean(cx, service, &key(k), v))
                    .transpose()
                    .map(|b| b.unwrap_or(default))
            };
            let condition = match value_of(&fields, "condition").and_then(scalar_string).as_deref() {
                None | Some("service_started") => DependCondition::Started,
                Some("service_healthy") => DependCondition::Healthy,
                Some("service_completed_successfully") => DependCondition::CompletedSuccessfully,
                Some(other) => {
                    return Err(cx.invalid(
                        service,
                        &key("condition"),
                        format!(
                            "`{other}` is not a condition (service_started, service_healthy, service_completed_successfully)"
                        ),
                    ));
                }
            };
            Ok(Dependency {
                restart: flag("restart", false)?,
                required: flag("required", true)?,
                service: dep,
                condition,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
