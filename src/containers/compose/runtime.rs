//! How a service's container is reached and checked: published and exposed ports, and the
//! healthcheck.

use super::Parsed;
use std::time::Duration;

use yaml_serde::Value;

use super::model::{HealthSpec, PortSpec};
use super::{Cx, entries, scalar_string, seq, string_list, value_of};

/// A port or a range of ports (`3000`, `3000-3005`): first and last.
fn port_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
        None => {
            let p = s.parse().ok()?;
            (p, p)
        }
    };
    (a <= b).then_some((a, b))
}

/// One `ports` entry: `[IP:][HOST:]CONTAINER[/PROTO]`, `[IPv6]:HOST:CONTAINER`, or the long form.
/// Ranges (`3000-3005:3000-3005`, `8000-8010:80`) give one spec per container port.
pub(super) fn parse_port(cx: &Cx, service: &str, v: &Value) -> Parsed<Vec<PortSpec>> {
    let bad = |m: String| cx.invalid(service, "ports", m);
    let range = |s: &str| {
        port_range(s).ok_or_else(|| bad(format!("`{s}` is not a port or a range of ports")))
    };
    let (host_ip, published, target, protocol) = if let Some(fields) = entries(v) {
        let field = |k: &str| value_of(&fields, k).and_then(scalar_string);
        if let Some(mode) = field("mode").filter(|m| m != "host" && m != "ingress") {
            return Err(bad(format!("mode `{mode}` is not host or ingress")));
        }
        let target = field("target").ok_or_else(|| bad("`target` is required".into()))?;
        (
            field("host_ip"),
            field("published").filter(|p| !p.is_empty()),
            target,
            field("protocol").unwrap_or_else(|| "tcp".into()),
        )
    } else {
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
        let opt = |p: &str| (!p.is_empty()).then(|| p.to_string());
        match parts.as_slice() {
            [t] => (host_ip, None, t.to_string(), protocol),
            [p, t] => (host_ip, opt(p), t.to_string(), protocol),
            [ip, p, t] if host_ip.is_none() => {
                (Some(ip.to_string()), opt(p), t.to_string(), protocol)
            }
            _ => return Err(bad(format!("`{s}` is not a port mapping"))),
        }
    };
    if !matches!(protocol.as_str(), "tcp" | "udp" | "sctp") {
        return Err(bad(format!(
            "protocol `{protocol}` is not tcp, udp or sctp"
        )));
    }
    let (first, last) = range(&target)?;
    let host = published.as_deref().map(range).transpose()?;
    let count = last - first;
    let spec = |target: u16, published: Option<u16>, published_last: Option<u16>| PortSpec {
        host_ip: host_ip.clone().filter(|ip| !ip.is_empty()),
        published,
        published_last,
        target,
        protocol: protocol.clone(),
    };
    match host {
        None => Ok((first..=last).map(|t| spec(t, None, None)).collect()),
        Some((h, h_last)) if h_last - h == count => Ok((0..=count)
            .map(|i| spec(first + i, Some(h + i), None))
            .collect()),
        Some((h, h_last)) if count == 0 => Ok(vec![spec(first, Some(h), Some(h_last))]),
        Some(_) => Err(bad(format!(
            "host range `{}` and container range `{target}` differ in length",
            published.unwrap_or_default()
        ))),
    }
}

/// `expose:`: ports (or ranges) reachable on the project's networks only, as `PORT/PROTO`.
pub(super) fn parse_expose(cx: &Cx, service: &str, v: &Value) -> Parsed<Vec<String>> {
    let mut out = Vec::new();
    for item in seq(cx, service, "expose", v)? {
        let s =
            scalar_string(item).ok_or_else(|| cx.invalid(service, "expose", "must hold ports"))?;
        let (ports, proto) = s.split_once('/').unwrap_or((&s, "tcp"));
        let (first, last) = port_range(ports)
            .filter(|_| matches!(proto, "tcp" | "udp" | "sctp"))
            .ok_or_else(|| {
                cx.invalid(
                    service,
                    "expose",
                    format!("`{s}` is not PORT[-PORT][/PROTO]"),
                )
            })?;
        out.extend((first..=last).map(|p| format!("{p}/{proto}")));
    }
    Ok(out)
}

/// `healthcheck:`; `disable: true` becomes `test: ["NONE"]`.
pub(super) fn parse_healthcheck(cx: &Cx, service: &str, v: &Value) -> Parsed<HealthSpec> {
    let fields =
        entries(v).ok_or_else(|| cx.invalid(service, "healthcheck", "must be a mapping"))?;
    let field = |k: &str| value_of(&fields, k);
    let dur = |k: &str| -> Parsed<Option<Duration>> {
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
        start_interval: dur("start_interval")?,
    })
}

/// Compose durations: `1h2m3s`, `1m30s`, `10s`, `500ms`, `1.5s`, `100us`, `10ns`.
pub(super) fn parse_duration(s: &str) -> Option<Duration> {
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
