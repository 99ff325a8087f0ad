//! How a service's container runs beyond image and mounts: user, working directory, init,
//! terminal, stop signal and grace period, logging, extra hosts, tmpfs, ulimits, resource limits
//! (`mem_limit`, `cpus`, `pids_limit`, `deploy.resources`), capabilities to drop, and the
//! restart policy (`restart`, or `deploy.restart_policy`).

use super::Parsed;
use std::collections::BTreeMap;

use yaml_serde::Value;

use super::model::{LoggingSpec, Resources, RunOptions};
use super::runtime::parse_duration;
use super::{Cx, boolean, entries, key_values, scalar_string, string_list, value_of};
use crate::config::{ContainersConfig, normalize_capability};

/// Log drivers built into the engine (plugins are not supported).
const LOG_DRIVERS: &[&str] = &[
    "json-file",
    "local",
    "journald",
    "syslog",
    "gelf",
    "fluentd",
    "awslogs",
    "splunk",
    "gcplogs",
    "logentries",
    "none",
];
/// Resource limits `ulimits` may set.
const ULIMITS: &[&str] = &[
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];
/// tmpfs mount options (`suid` and `dev` are refused: device nodes and setuid files in a
/// writable filesystem).
const TMPFS_OPTIONS: &[&str] = &[
    "size",
    "mode",
    "uid",
    "gid",
    "nr_inodes",
    "nr_blocks",
    "noexec",
    "exec",
    "nosuid",
    "nodev",
    "ro",
    "rw",
    "noatime",
    "relatime",
    "nodiratime",
];

type Fields<'v> = [(String, &'v Value)];

/// Everything in [`RunOptions`], from a service's fields.
pub(super) fn parse_run_options(
    cx: &Cx,
    name: &str,
    fields: &Fields<'_>,
    settings: &ContainersConfig,
) -> Parsed<RunOptions> {
    let field = |k: &str| value_of(fields, k);
    let text = |k: &str| -> Parsed<Option<String>> {
        field(k)
            .map(|v| scalar_string(v).ok_or_else(|| cx.invalid(name, k, "must be a string")))
            .transpose()
    };
    let flag = |k: &str| field(k).map(|v| boolean(cx, name, k, v)).transpose();
    let checked = |k: &str, ok: fn(&str) -> bool, what: &str| -> Parsed<Option<String>> {
        match text(k)? {
            Some(v) if !ok(&v) => Err(cx.invalid(name, k, format!("`{v}` is not {what}"))),
            other => Ok(other),
        }
    };
    let stop_grace_period = text("stop_grace_period")?
        .map(|d| {
            parse_duration(&d).ok_or_else(|| {
                cx.invalid(
                    name,
                    "stop_grace_period",
                    format!("`{d}` is not a duration like 10s or 1m30s"),
                )
            })
        })
        .transpose()?;
    check_security_opt(cx, name, field("security_opt"))?;
    if let Some(deploy) = field("deploy") {
        check_deploy_shape(cx, name, deploy)?;
    }
    Ok(RunOptions {
        user: checked(
            "user",
            |u| !u.is_empty() && !u.contains(char::is_whitespace),
            "a user (uid[:gid] or name)",
        )?,
        hostname: checked("hostname", is_hostname, "a host name")?,
        domainname: checked("domainname", is_hostname, "a domain name")?,
        working_dir: checked("working_dir", |w| w.starts_with('/'), "an absolute path")?,
        init: flag("init")?,
        tty: flag("tty")?.unwrap_or(false),
        stdin_open: flag("stdin_open")?.unwrap_or(false),
        read_only: flag("read_only")?.unwrap_or(false),
        stop_signal: checked("stop_signal", is_signal, "a signal like SIGTERM or 15")?,
        stop_grace_period,
        platform: checked("platform", is_platform, "a platform like linux/amd64")?,
        logging: field("logging")
            .map(|l| parse_logging(cx, name, l))
            .transpose()?,
        extra_hosts: field("extra_hosts")
            .map(|h| parse_extra_hosts(cx, name, h))
            .transpose()?
            .unwrap_or_default(),
        tmpfs: field("tmpfs")
            .map(|t| parse_tmpfs(cx, name, t))
            .transpose()?
            .unwrap_or_default(),
        ulimits: field("ulimits")
            .map(|u| parse_ulimits(cx, name, u))
            .transpose()?
            .unwrap_or_default(),
        resources: parse_resources(cx, name, fields, settings)?,
        cap_drop: field("cap_drop")
            .map(|c| string_list(cx, name, "cap_drop", c))
            .transpose()?
            .unwrap_or_default()
            .iter()
            .map(|c| {
                normalize_capability(c).ok_or_else(|| {
                    cx.invalid(name, "cap_drop", format!("`{c}` is not a capability"))
                })
            })
            .collect::<Result<_, _>>()?,
        shm_size: field("shm_size")
            .map(|s| parse_bytes(cx, name, "shm_size", s))
            .transpose()?,
    })
}

fn is_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn is_signal(s: &str) -> bool {
    s.parse::<u8>().is_ok_and(|n| n > 0 && n < 65)
        || s.strip_prefix("SIG").is_some_and(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '+' || c == '-')
        })
}

fn is_platform(p: &str) -> bool {
    let parts: Vec<&str> = p.split('/').collect();
    (1..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

/// `security_opt`: only `no-new-privileges`, which every container gets anyway.
fn check_security_opt(cx: &Cx, name: &str, v: Option<&Value>) -> Parsed<()> {
    for opt in v
        .map(|v| string_list(cx, name, "security_opt", v))
        .transpose()?
        .unwrap_or_default()
    {
        if !matches!(
            opt.as_str(),
            "no-new-privileges" | "no-new-privileges:true" | "no-new-privileges=true"
        ) {
            return Err(cx.forbidden(
                name,
                "security_opt",
                format!("`{opt}` would change the container's security profile (every container runs with no-new-privileges)"),
            ));
        }
    }
    Ok(())
}

/// `deploy.replicas` and `deploy.mode`: deployd runs exactly one container per service.
fn check_deploy_shape(cx: &Cx, name: &str, deploy: &Value) -> Parsed<()> {
    let fields = entries(deploy).ok_or_else(|| cx.invalid(name, "deploy", "must be a mapping"))?;
    for (key, only) in [("replicas", "1"), ("mode", "replicated")] {
        if let Some(v) = value_of(&fields, key)
            .and_then(scalar_string)
            .filter(|v| v != only)
        {
            return Err(cx.invalid(
                name,
                &format!("deploy.{key}"),
                format!("`{v}`: deployd runs one container per service ({key}: {only})"),
            ));
        }
    }
    Ok(())
}

/// `restart`, else `deploy.restart_policy` (`condition` none | on-failure | any, `max_attempts`).
pub(super) fn parse_restart(
    cx: &Cx,
    name: &str,
    restart: Option<&Value>,
    deploy: Option<&Value>,
) -> Parsed<Option<String>> {
    if let Some(r) = restart {
        let r = scalar_string(r).ok_or_else(|| cx.invalid(name, "restart", "must be a string"))?;
        let ok = matches!(
            r.as_str(),
            "no" | "always" | "unless-stopped" | "on-failure"
        ) || r
            .strip_prefix("on-failure:")
            .is_some_and(|n| n.parse::<u32>().is_ok());
        if !ok {
            return Err(cx.invalid(name, "restart", format!("`{r}` is not a restart policy")));
        }
        return Ok(Some(r));
    }
    let policy = deploy.and_then(entries).and_then(|d| {
        value_of(&d, "restart_policy").and_then(entries).map(|p| {
            let get = |k: &str| value_of(&p, k).and_then(scalar_string);
            (get("condition"), get("max_attempts"))
        })
    });
    let Some((condition, attempts)) = policy else {
        return Ok(None);
    };
    Ok(Some(
        match (condition.as_deref().unwrap_or("any"), attempts) {
            ("none", _) => "no".into(),
            ("any", _) => "always".into(),
            ("on-failure", None) => "on-failure".into(),
            ("on-failure", Some(n)) if n.parse::<u32>().is_ok() => format!("on-failure:{n}"),
            (c, n) => {
                return Err(cx.invalid(
                name,
                "deploy.restart_policy",
                format!("condition `{c}` with max_attempts {n:?} is not none, on-failure[, N] or any"),
            ));
            }
        },
    ))
}

/// `logging: {driver, options}`.
fn parse_logging(cx: &Cx, name: &str, v: &Value) -> Parsed<LoggingSpec> {
    let fields = entries(v).ok_or_else(|| cx.invalid(name, "logging", "must be a mapping"))?;
    let driver = value_of(&fields, "driver").and_then(scalar_string);
    if let Some(d) = driver.as_deref().filter(|d| !LOG_DRIVERS.contains(d)) {
        return Err(cx.invalid(
            name,
            "logging.driver",
            format!(
                "`{d}` is not a log driver built into the engine ({})",
                LOG_DRIVERS.join(", ")
            ),
        ));
    }
    let options = value_of(&fields, "options")
        .map(|o| key_values(cx, name, "logging.options", o))
        .transpose()?
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default()))
        .collect();
    Ok(LoggingSpec { driver, options })
}

/// `extra_hosts`: `host:ip` or `host=ip` items, or a `host: ip` map; as `host:ip`.
fn parse_extra_hosts(cx: &Cx, name: &str, v: &Value) -> Parsed<Vec<String>> {
    let pairs: Vec<(String, Option<String>)> = if v.is_mapping() {
        key_values(cx, name, "extra_hosts", v)?
    } else {
        string_list(cx, name, "extra_hosts", v)?
            .into_iter()
            .map(|h| match h.split_once('=').or_else(|| h.split_once(':')) {
                Some((host, ip)) => (host.to_string(), Some(ip.to_string())),
                None => (h, None),
            })
            .collect()
    };
    pairs
        .into_iter()
        .map(
            |(host, ip)| match ip.filter(|ip| !ip.is_empty() && is_hostname(&host)) {
                Some(ip) => Ok(format!(
                    "{host}:{}",
                    ip.trim_start_matches('[').trim_end_matches(']')
                )),
                None => Err(cx.invalid(name, "extra_hosts", format!("`{host}` is not HOST:IP"))),
            },
        )
        .collect()
}

/// `tmpfs`: a path or list of `path[:options]`.
fn parse_tmpfs(cx: &Cx, name: &str, v: &Value) -> Parsed<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in string_list(cx, name, "tmpfs", v)? {
        let (path, opts) = item.split_once(':').unwrap_or((&item, ""));
        if !path.starts_with('/') {
            return Err(cx.invalid(name, "tmpfs", format!("`{path}` is not an absolute path")));
        }
        for opt in opts.split(',').filter(|o| !o.is_empty()) {
            let key = opt.split('=').next().unwrap_or_default();
            if matches!(key, "suid" | "dev") {
                return Err(cx.forbidden(
                    name,
                    "tmpfs",
                    format!("option `{key}` would allow setuid files or device nodes"),
                ));
            }
            if !TMPFS_OPTIONS.contains(&key) {
                return Err(cx.invalid(name, "tmpfs", format!("option `{opt}` is not supported")));
            }
        }
        out.insert(path.to_string(), opts.to_string());
    }
    Ok(out)
}

/// `ulimits`: `name: N` or `name: {soft, hard}`.
fn parse_ulimits(cx: &Cx, name: &str, v: &Value) -> Parsed<BTreeMap<String, (i64, i64)>> {
    let items = entries(v).ok_or_else(|| cx.invalid(name, "ulimits", "must be a mapping"))?;
    let mut out = BTreeMap::new();
    for (limit, spec) in items {
        let key = format!("ulimits.{limit}");
        if !ULIMITS.contains(&limit.as_str()) {
            return Err(cx.invalid(name, &key, format!("`{limit}` is not a resource limit")));
        }
        let num = |v: Option<&Value>| {
            v.and_then(scalar_string)
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| cx.invalid(name, &key, "must be a number or {soft, hard}"))
        };
        let pair = match entries(spec) {
            Some(f) => (num(value_of(&f, "soft"))?, num(value_of(&f, "hard"))?),
            None => {
                let n = num(Some(spec))?;
                (n, n)
            }
        };
        out.insert(limit, pair);
    }
    Ok(out)
}

/// Resource limits from the service's keys, overridden by `deploy.resources`; the process limit
/// never exceeds `[containers] pids_limit`.
fn parse_resources(
    cx: &Cx,
    name: &str,
    fields: &Fields<'_>,
    settings: &ContainersConfig,
) -> Parsed<Resources> {
    let resources = value_of(fields, "deploy")
        .and_then(entries)
        .and_then(|d| {
            value_of(&d, "resources").and_then(entries).map(|r| {
                r.into_iter()
                    .map(|(k, v)| (k, v.clone()))
                    .collect::<Vec<_>>()
            })
        })
        .unwrap_or_default();
    let deploy = |section: &str, k: &str| {
        resources
            .iter()
            .find(|(s, _)| s == section)
            .and_then(|(_, v)| entries(v).and_then(|e| value_of(&e, k).cloned()))
    };
    let pick = |top: &str, section: &str, k: &str| {
        deploy(section, k).or_else(|| value_of(fields, top).cloned())
    };
    let bytes = |top: &str, section: &str, k: &str| {
        pick(top, section, k)
            .map(|v| parse_bytes(cx, name, top, &v))
            .transpose()
    };
    let cpus = pick("cpus", "limits", "cpus")
        .map(|c| {
            scalar_string(&c)
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|c| *c > 0.0)
                .map(|c| (c * 1e9) as i64)
                .ok_or_else(|| cx.invalid(name, "cpus", "must be a positive number of CPUs"))
        })
        .transpose()?;
    let int = |k: &str, v: Option<Value>| {
        v.map(|v| {
            scalar_string(&v)
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| cx.invalid(name, k, "must be a number"))
        })
        .transpose()
    };
    let pids = int("pids_limit", pick("pids_limit", "limits", "pids"))?;
    let max = settings.pids_limit;
    let pids = match pids {
        Some(p) if p <= 0 || p > max => {
            tracing::warn!(
                service = name,
                asked = p,
                limit = max,
                "pids limit above [containers] pids_limit; using the configured limit"
            );
            Some(max)
        }
        other => other,
    };
    Ok(Resources {
        memory: bytes("mem_limit", "limits", "memory")?,
        memory_reservation: bytes("mem_reservation", "reservations", "memory")?,
        memory_swap: match value_of(fields, "memswap_limit").and_then(scalar_string) {
            Some(s) if s == "-1" => Some(-1),
            _ => bytes("memswap_limit", "", "")?,
        },
        nano_cpus: cpus,
        cpu_shares: int("cpu_shares", value_of(fields, "cpu_shares").cloned())?,
        cpuset: value_of(fields, "cpuset").and_then(scalar_string),
        pids,
    })
}

/// A byte size as compose writes it: `1073741824`, `512m`, `1g`, `1.5GB`, `64k` (powers of 1024).
pub(super) fn parse_bytes(cx: &Cx, name: &str, key: &str, v: &Value) -> Parsed<i64> {
    let s = scalar_string(v)
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let num_len = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let factor: f64 = match s[num_len..].trim_end_matches('b') {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024.0 * 1024.0,
        "g" => 1024.0 * 1024.0 * 1024.0,
        "t" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => f64::NAN,
    };
    s[..num_len]
        .parse::<f64>()
        .ok()
        .map(|n| n * factor)
        .filter(|n| n.is_finite() && *n >= 0.0 && *n < 9.0e18)
        .map(|n| n as i64)
        .ok_or_else(|| cx.invalid(name, key, format!("`{s}` is not a size like 512m or 1g")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_signals() {
        let b = |s: &str| parse_bytes(&Cx::test(), "s", "k", &Value::String(s.into())).ok();
        assert_eq!(b("512m"), Some(512 << 20));
        assert_eq!(b("1G"), Some(1 << 30));
        assert_eq!(b("1.5gb"), Some(3 << 29));
        assert_eq!(b("1024"), Some(1024));
        assert_eq!(b("lots"), None);
        assert!(is_signal("SIGQUIT") && is_signal("SIGRTMIN+3") && is_signal("9"));
        assert!(!is_signal("TERM") && !is_signal("SIG") && !is_signal("0"));
        assert!(is_platform("linux/amd64") && is_platform("linux/arm64/v8"));
        assert!(!is_platform("linux/") && !is_platform("a/b/c/d"));
    }
}
