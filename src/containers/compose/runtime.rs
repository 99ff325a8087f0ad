//! How a service's container runs: published ports, mounts and the healthcheck.

use std::time::Duration;

use yaml_serde::Value;

use super::model::{HealthSpec, MountSpec, NamedObject, PortSpec};
use super::validate::{MOUNT_KEYS, PORT_KEYS, inside_release, only_keys};
use super::{Cx, entries, scalar_string, string_list, value_of};
use crate::containers::error::ContainerError;

/// One `ports` entry: `[IP:][HOST:]CONTAINER[/PROTO]`, `[IPv6]:HOST:CONTAINER`, or the long form.
pub(super) fn parse_port(cx: &Cx, service: &str, v: &Value) -> Result<PortSpec, ContainerError> {
    let bad = |m: String| cx.invalid(service, "ports", m);
    let num = |s: &str| -> Result<u16, ContainerError> {
        s.parse::<u16>()
            .map_err(|_| bad(format!("`{s}` is not a single port number")))
    };
    if let Some(fields) = entries(v) {
        let field = |k: &str| value_of(&fields, k).and_then(scalar_string);
        only_keys(cx, service, "ports", v, PORT_KEYS)?;
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

/// One `volumes` entry: `SOURCE:TARGET[:ro|rw]` or the long form; a bind mount must stay inside
/// the release directory and a named volume must be declared at the top level.
pub(super) fn parse_mount(
    cx: &Cx,
    service: &str,
    v: &Value,
    volumes: &[NamedObject],
) -> Result<MountSpec, ContainerError> {
    let bad = |m: String| cx.invalid(service, "volumes", m);
    let (kind, source, target, read_only) = if let Some(fields) = entries(v) {
        only_keys(cx, service, "volumes", v, MOUNT_KEYS)?;
        let field = |k: &str| value_of(&fields, k).and_then(scalar_string);
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

/// `healthcheck:`; `disable: true` becomes `test: ["NONE"]`.
pub(super) fn parse_healthcheck(
    cx: &Cx,
    service: &str,
    v: &Value,
) -> Result<HealthSpec, ContainerError> {
    let fields =
        entries(v).ok_or_else(|| cx.invalid(service, "healthcheck", "must be a mapping"))?;
    let field = |k: &str| value_of(&fields, k);
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
fn parse_duration(s: &str) -> Option<Duration> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10x"), None);
    }
}
