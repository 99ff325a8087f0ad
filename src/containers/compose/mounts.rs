//! What a service mounts: named volumes, anonymous volumes, tmpfs, and files of the release
//! (binds, secrets, configs). Release files are always mounted read-only: a release is
//! immutable, and a writable bind is how a container could plant a symlink for the engine to
//! follow on the next start. Writable data belongs in named volumes.

use super::Parsed;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use yaml_serde::Value;

use super::beneath::{BeneathError, checked_bind};
use super::model::{MountSpec, NamedObject};
use super::options::parse_bytes;
use super::validate::inside_release;
use super::{Cx, boolean, entries, named_items, scalar_string, value_of};

/// One `volumes` entry: `SOURCE:TARGET[:MODE]`, `/anonymous/target`, or the long form.
pub(super) fn parse_mount(
    cx: &Cx,
    service: &str,
    v: &Value,
    volumes: &[NamedObject],
) -> Parsed<MountSpec> {
    let bad = |m: String| cx.invalid(service, "volumes", m);
    let (kind, source, target, read_only, nocopy, tmpfs) = if let Some(fields) = entries(v) {
        let field = |k: &str| value_of(&fields, k);
        let text = |k: &str| field(k).and_then(scalar_string);
        let sub = |k: &str, f: &str| {
            field(k)
                .and_then(entries)
                .and_then(|e| value_of(&e, f).cloned())
        };
        let flag = |v: Option<Value>, key: &str| {
            v.map(|v| boolean(cx, service, key, &v))
                .transpose()
                .map(|b| b.unwrap_or(false))
        };
        let target = text("target").ok_or_else(|| bad("`target` is required".into()))?;
        let tmpfs = (
            sub("tmpfs", "size")
                .map(|s| parse_bytes(cx, service, "volumes.tmpfs.size", &s))
                .transpose()?,
            sub("tmpfs", "mode")
                .and_then(|m| scalar_string(&m))
                .map(|m| {
                    i64::from_str_radix(&m, 8)
                        .map_err(|_| bad(format!("tmpfs mode `{m}` is not octal")))
                })
                .transpose()?,
        );
        (
            text("type").unwrap_or_else(|| "volume".into()),
            text("source").filter(|s| !s.is_empty()),
            target,
            flag(field("read_only").cloned(), "volumes.read_only")?,
            flag(sub("volume", "nocopy"), "volumes.volume.nocopy")?,
            tmpfs,
        )
    } else {
        let s = scalar_string(v).ok_or_else(|| bad("must be a string or a mapping".into()))?;
        let parts: Vec<&str> = s.split(':').collect();
        let (source, target, mode) = match parts.as_slice() {
            [t] => (None, *t, ""),
            [s, t] => (Some(*s), *t, ""),
            [s, t, m] => (Some(*s), *t, *m),
            _ => return Err(bad(format!("`{s}` is not [SOURCE:]TARGET[:MODE]"))),
        };
        let (read_only, nocopy) = parse_mode(cx, service, mode)?;
        let kind = match source {
            Some(src) if src.starts_with(['.', '/', '~']) => "bind",
            _ => "volume",
        };
        (
            kind.to_string(),
            source.map(str::to_string),
            target.to_string(),
            read_only,
            nocopy,
            (None, None),
        )
    };
    check_target(cx, service, "volumes", &target)?;
    match (kind.as_str(), source) {
        ("bind", Some(source)) => {
            let source = release_file(cx, service, "volumes", &source)?;
            if !read_only {
                tracing::warn!(
                    service,
                    source = %source.display(),
                    target = %target,
                    "release files are mounted read-only (a release is immutable); keep writable data in a named volume"
                );
            }
            Ok(MountSpec::Bind {
                source,
                target,
                requested_writable: !read_only,
            })
        }
        ("volume", None) => Ok(MountSpec::Anonymous { target }),
        ("volume", Some(source)) => {
            let obj = volumes.iter().find(|o| o.key == source).ok_or_else(|| {
                bad(format!(
                    "volume `{source}` is not declared under the top-level `volumes`"
                ))
            })?;
            Ok(MountSpec::Volume {
                name: obj.engine_name.clone(),
                target,
                read_only,
                nocopy,
            })
        }
        ("tmpfs", _) => Ok(MountSpec::Tmpfs {
            target,
            size: tmpfs.0,
            mode: tmpfs.1,
        }),
        ("bind", None) => Err(bad("a bind needs a `source`".into())),
        (other, _) => Err(cx.unsupported(
            service,
            "volumes.type",
            &format!("mount type `{other}` is not one of volume, bind, tmpfs"),
        )),
    }
}

/// The mode of a short-form mount (`ro`, `rw`, `nocopy`, ...): `(read_only, nocopy)`.
fn parse_mode(cx: &Cx, service: &str, mode: &str) -> Parsed<(bool, bool)> {
    let (mut read_only, mut nocopy) = (false, false);
    for m in mode.split(',').filter(|m| !m.is_empty()) {
        match m {
            "ro" => read_only = true,
            "rw" | "cached" | "delegated" | "consistent" | "private" | "rprivate" => {}
            "nocopy" => nocopy = true,
            "shared" | "rshared" | "slave" | "rslave" => {
                return Err(cx.forbidden(
                    service,
                    "volumes",
                    format!("mount propagation `{m}` would share mounts with the host"),
                ));
            }
            other => {
                return Err(cx.invalid(
                    service,
                    "volumes",
                    format!("mode `{other}` is not supported (ro, rw, nocopy)"),
                ));
            }
        }
    }
    Ok((read_only, nocopy))
}

/// A container path: absolute, with no `..`.
fn check_target(cx: &Cx, service: &str, key: &str, target: &str) -> Parsed<()> {
    let p = Path::new(target);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
        return Err(cx.invalid(
            service,
            key,
            format!("target `{target}` must be an absolute path without `..`"),
        ));
    }
    Ok(())
}

/// A file or directory of the release to bind: inside it, existing, and with no symlink
/// component (checked again before every create and start).
fn release_file(cx: &Cx, service: &str, key: &str, source: &str) -> Parsed<PathBuf> {
    if Path::new(source).ends_with("docker.sock") {
        return Err(cx.forbidden(
            service,
            key,
            format!(
                "`{source}` is the Docker socket, which gives the container control of the host"
            ),
        ));
    }
    let path = inside_release(cx, service, key, source)?;
    match checked_bind(&cx.release_dir, &path) {
        Ok(_) => Ok(path),
        Err(BeneathError::Missing) => Err(cx.invalid(
            service,
            key,
            format!(
                "`{source}` does not exist in the release (deployd mounts release files read-only and does not create them; keep writable data in a named volume)"
            ),
        )),
        Err(e @ (BeneathError::Symlink | BeneathError::Escapes)) => {
            Err(cx.forbidden(service, key, format!("`{source}`: {e}")))
        }
        Err(e) => Err(cx.invalid(service, key, format!("`{source}`: {e}"))),
    }
}

/// A service's `secrets` or `configs` (`kind`): names, or `{source, target, uid, gid, mode}`;
/// each a release file declared at the top level, mounted read-only at `target` (relative
/// targets and the default go under `default_dir`).
pub(super) fn parse_file_refs(
    cx: &Cx,
    service: &str,
    kind: &str,
    v: &Value,
    files: &BTreeMap<String, PathBuf>,
    default_dir: &str,
) -> Parsed<Vec<MountSpec>> {
    let items: Vec<(String, Option<&Value>)> = match v.as_sequence() {
        Some(list) => list
            .iter()
            .map(|i| match scalar_string(i) {
                Some(name) => Ok((name, None)),
                None => {
                    let source = entries(i)
                        .and_then(|f| value_of(&f, "source").and_then(scalar_string))
                        .ok_or_else(|| {
                            cx.invalid(service, &format!("{kind}.source"), "is required")
                        })?;
                    Ok((source, Some(i)))
                }
            })
            .collect::<Parsed<_>>()?,
        None => named_items(cx, service, kind, v)?,
    };
    let mut out = Vec::new();
    for (name, spec) in items {
        let file = files.get(&name).ok_or_else(|| {
            cx.invalid(
                service,
                kind,
                format!("`{name}` is not declared under the top-level `{kind}`"),
            )
        })?;
        let fields = spec.and_then(entries).unwrap_or_default();
        if ["uid", "gid", "mode"]
            .iter()
            .any(|k| value_of(&fields, k).is_some())
        {
            tracing::warn!(service, kind, name = %name, "uid, gid and mode do not apply to files mounted from the release; ignored");
        }
        let target = match value_of(&fields, "target").and_then(scalar_string) {
            Some(t) if t.starts_with('/') => t,
            Some(t) => format!("{default_dir}{t}"),
            None => format!("{default_dir}{name}"),
        };
        check_target(cx, service, kind, &target)?;
        release_file(cx, service, kind, &file.to_string_lossy())?;
        out.push(MountSpec::Bind {
            source: file.clone(),
            target,
            requested_writable: false,
        });
    }
    Ok(out)
}
