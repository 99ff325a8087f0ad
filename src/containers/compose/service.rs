//! One service of the compose file: image and build, command, environment, dependencies, labels
//! and networks.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use yaml_serde::Value;

use super::interpolate::{Vars, parse_env_lines};
use super::model::{BuildSpec, DependCondition, Dependency, NamedObject, Service, split_image};
use super::runtime::{parse_healthcheck, parse_mount, parse_port};
use super::validate::{inside_release, valid_tag};
use super::{Cx, entries, key_values, scalar_string, seq, string_list, value_of};
use crate::containers::error::ContainerError;

/// One service, checked against the declared volumes and networks.
pub(super) fn parse_service(
    cx: &Cx,
    name: &str,
    v: &Value,
    vars: &Vars,
    volumes: &[NamedObject],
    networks: &[NamedObject],
) -> Result<Service, ContainerError> {
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
    let labels = parse_labels(cx, name, "labels", field("labels"))?;
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

/// `build:`: a context path, or the mapping form.
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
) -> Result<BTreeMap<String, String>, ContainerError> {
    let Some(v) = v else {
        return Ok(BTreeMap::new());
    };
    Ok(key_values(cx, service, key, v)?
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default()))
        .collect())
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

/// `depends_on`: a list of services, or a map with a `condition` each.
fn parse_depends(cx: &Cx, service: &str, v: &Value) -> Result<Vec<Dependency>, ContainerError> {
    if let Some(items) = entries(v) {
        return items
            .into_iter()
            .map(|(dep, spec)| {
                let cond = value_of(&entries(spec).unwrap_or_default(), "condition")
                    .and_then(scalar_string);
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
