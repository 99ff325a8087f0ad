//! The project as a whole: top-level volumes, networks, secrets and configs from every file,
//! then the active services, their dependencies, their images, and their start order.

use super::Parsed;
use std::collections::BTreeMap;
use std::path::PathBuf;

use yaml_serde::Value;

use super::keys::TOP_LEVEL;
use super::model::{NamedObject, Project, Service, split_image};
use super::names::{check_object_name, owned_by};
use super::service::parse_service;
use super::source::Source;
use super::validate::{inside_release, order_services};
use super::{Cx, boolean, entries, key_values, scalar_string, service_active, value_of};
use crate::config::ContainersConfig;
use crate::containers::error::ContainerError;

/// What the top level declares, for services to refer to.
pub(super) struct Declared<'a> {
    pub(super) volumes: &'a [NamedObject],
    pub(super) networks: &'a [NamedObject],
    /// Secret name → file of the release.
    pub(super) secrets: &'a BTreeMap<String, PathBuf>,
    /// Config name → file of the release.
    pub(super) configs: &'a BTreeMap<String, PathBuf>,
    pub(super) settings: &'a ContainersConfig,
}

/// Every file's top level, then every active service, in start order.
pub(super) fn parse_project(
    sources: &[Source<'_>],
    settings: &ContainersConfig,
) -> Parsed<Project> {
    let root = sources.first().ok_or_else(|| ContainerError::Internal {
        action: "reading the compose file".into(),
        message: "no compose file was read".into(),
    })?;
    let mut volumes = Vec::new();
    let mut networks = Vec::new();
    let mut secrets = BTreeMap::new();
    let mut configs = BTreeMap::new();
    for src in sources {
        let top = entries(&src.doc).unwrap_or_default();
        let get = |k: &str| value_of(&top, k);
        let cx = &src.cx;
        merge(
            cx,
            &mut volumes,
            top_objects(cx, get("volumes"), "volume", settings)?,
        )?;
        merge(
            cx,
            &mut networks,
            top_objects(cx, get("networks"), "network", settings)?,
        )?;
        secrets.extend(top_files(cx, get("secrets"), "secrets")?);
        configs.extend(top_files(cx, get("configs"), "configs")?);
    }
    if !networks.iter().any(|n| n.key == "default") {
        networks.push(NamedObject {
            key: "default".into(),
            engine_name: format!("{}_default", root.cx.project),
            external: false,
            allowed_external: false,
            driver: None,
            internal: false,
            labels: BTreeMap::new(),
        });
    }
    let declared = Declared {
        volumes: &volumes,
        networks: &networks,
        secrets: &secrets,
        configs: &configs,
        settings,
    };
    let mut services: Vec<Service> = Vec::new();
    let mut inactive = Vec::new();
    let mut seen = BTreeMap::new();
    for src in sources {
        let top = entries(&src.doc).unwrap_or_default();
        let svc_entries = match value_of(&top, "services") {
            Some(v) => entries(v).ok_or_else(|| ContainerError::ComposeSyntax {
                path: src.cx.path.clone(),
                message: "`services` is not a mapping".into(),
            })?,
            None => Vec::new(),
        };
        for (name, v) in svc_entries {
            if let Some(first) = seen.insert(name.clone(), src.cx.path.clone()) {
                return Err(src.cx.invalid(
                    &name,
                    "",
                    format!("the service is also defined in {}", first.display()),
                ));
            }
            if !service_active(v, &src.active) {
                tracing::info!(service = %name, "service left out: none of its profiles is active");
                inactive.push(name);
                continue;
            }
            services.push(parse_service(&src.cx, &name, v, &src.vars, &declared)?);
        }
    }
    if services.is_empty() && inactive.is_empty() {
        return Err(ContainerError::ComposeSyntax {
            path: root.cx.path.clone(),
            message: "no `services` mapping".into(),
        });
    }
    drop_missing_dependencies(&root.cx, &mut services, &inactive)?;
    keep_built_images_owned(&root.cx.project, &mut services);
    let services = order_services(&root.cx, services)?;
    Ok(Project {
        name: root.cx.project.clone(),
        release_dir: root.cx.release_dir.clone(),
        compose_path: root.cx.path.clone(),
        services,
        volumes,
        networks,
        inactive,
    })
}

/// Add objects of one file; one declared by two files must be declared the same way.
fn merge(cx: &Cx, into: &mut Vec<NamedObject>, add: Vec<NamedObject>) -> Parsed<()> {
    for obj in add {
        match into.iter().find(|o| o.key == obj.key) {
            Some(existing) if *existing == obj => {}
            Some(_) => {
                return Err(cx.invalid(
                    TOP_LEVEL,
                    &obj.key,
                    "is declared differently by an including file",
                ));
            }
            None => into.push(obj),
        }
    }
    Ok(())
}

/// A dependency on a service that is missing, or left out by profiles, is an error unless it
/// says `required: false`; such optional dependencies are dropped.
fn drop_missing_dependencies(cx: &Cx, services: &mut [Service], inactive: &[String]) -> Parsed<()> {
    let present: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
    for s in services.iter_mut() {
        let mut kept = Vec::new();
        for d in std::mem::take(&mut s.depends_on) {
            if present.contains(&d.service) {
                kept.push(d);
            } else if inactive.contains(&d.service) && d.required {
                return Err(cx.invalid(
                    &s.name,
                    &format!("depends_on.{}", d.service),
                    format!(
                        "service `{}` is left out because none of its profiles is active ([containers] profiles); activate one, or mark the dependency `required: false`",
                        d.service
                    ),
                ));
            } else if d.required {
                kept.push(d); // order_services names it as missing
            }
        }
        s.depends_on = kept;
    }
    Ok(())
}

/// Built images are tagged only under the project's own repositories: a built service whose
/// `image:` is someone else's (`nginx:latest`, `otherapp-web`) is tagged
/// `<project>-<service>:<tag>` instead, and services that run that image follow it.
fn keep_built_images_owned(project: &str, services: &mut [Service]) {
    let mut renamed = BTreeMap::new();
    for s in services.iter_mut().filter(|s| s.build.is_some()) {
        let (repo, tag) = split_image(&s.image);
        if owned_by(project, repo) {
            continue;
        }
        let own = format!("{project}-{}:{tag}", s.name);
        tracing::warn!(
            service = %s.name,
            image = %s.image,
            tagged_as = %own,
            "a built image is tagged only under the app's own repositories"
        );
        renamed.insert(s.image.clone(), own.clone());
        s.image = own;
    }
    for s in services.iter_mut().filter(|s| s.build.is_none()) {
        if let Some(own) = renamed.get(&s.image) {
            s.image = own.clone();
        }
    }
}

/// Top-level `volumes` or `networks` (`kind` is `volume` or `network`), with their engine names.
fn top_objects(
    cx: &Cx,
    v: Option<&Value>,
    kind: &str,
    settings: &ContainersConfig,
) -> Parsed<Vec<NamedObject>> {
    let mut out = Vec::new();
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(out);
    };
    let items = entries(v)
        .ok_or_else(|| cx.invalid(TOP_LEVEL, &format!("{kind}s"), "must be a mapping of names"))?;
    for (key, obj) in items {
        let fields = entries(obj).unwrap_or_default();
        let field = |k: &str| value_of(&fields, k);
        let dotted = |k: &str| format!("{kind}s.{key}.{k}");
        // `external: {name: x}` is the old spelling of `external: true` plus `name: x`.
        let (external, legacy_name) = match field("external") {
            Some(e) if e.is_mapping() => (
                true,
                value_of(&entries(e).unwrap_or_default(), "name").and_then(scalar_string),
            ),
            Some(e) => (boolean(cx, TOP_LEVEL, &dotted("external"), e)?, None),
            None => (false, None),
        };
        let engine_name = match field("name").and_then(scalar_string).or(legacy_name) {
            Some(n) => n,
            None if external => key.clone(),
            None => format!("{}_{key}", cx.project),
        };
        let driver = field("driver").and_then(scalar_string);
        check_driver(cx, kind, &dotted("driver"), driver.as_deref())?;
        let internal = field("internal")
            .map(|i| boolean(cx, TOP_LEVEL, &dotted("internal"), i))
            .transpose()?
            .unwrap_or(false);
        let labels = field("labels")
            .map(|l| key_values(cx, TOP_LEVEL, &dotted("labels"), l))
            .transpose()?
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.unwrap_or_default()))
            .collect();
        let allowed_external = check_object_name(cx, kind, &key, &engine_name, settings)?;
        out.push(NamedObject {
            key,
            engine_name,
            external,
            allowed_external,
            driver,
            internal,
            labels,
        });
    }
    Ok(out)
}

/// Only the drivers that keep containers on their own: `local` volumes, `bridge` networks.
fn check_driver(cx: &Cx, kind: &str, key: &str, driver: Option<&str>) -> Parsed<()> {
    match (kind, driver) {
        (_, None) | ("volume", Some("local")) | ("network", Some("bridge")) => Ok(()),
        ("network", Some("host" | "none" | "null")) => Err(cx.forbidden(
            TOP_LEVEL,
            key,
            "it is the host's network namespace, or no network at all",
        )),
        ("network", Some("macvlan" | "ipvlan")) => Err(cx.forbidden(
            TOP_LEVEL,
            key,
            "it attaches containers to the host's physical network, past its firewall",
        )),
        ("network", Some("overlay")) => Err(cx.unsupported(TOP_LEVEL, key, "only Docker Swarm uses it")),
        ("volume", Some(d)) => Err(cx.forbidden(
            TOP_LEVEL,
            key,
            format!("volume driver `{d}` is a plugin that can mount anything on the host; deployd uses `local` volumes"),
        )),
        (_, Some(d)) => Err(cx.unsupported(
            TOP_LEVEL,
            key,
            &format!("network driver `{d}` is not supported; deployd uses `bridge` networks"),
        )),
    }
}

/// Top-level `secrets` or `configs` (`kind`): name → file of the release (`file:`).
fn top_files(cx: &Cx, v: Option<&Value>, kind: &str) -> Parsed<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(out);
    };
    let items =
        entries(v).ok_or_else(|| cx.invalid(TOP_LEVEL, kind, "must be a mapping of names"))?;
    for (name, obj) in items {
        let key = format!("{kind}.{name}.file");
        let file = entries(obj)
            .and_then(|f| value_of(&f, "file").and_then(scalar_string))
            .ok_or_else(|| cx.invalid(TOP_LEVEL, &key, "is required (a file of the release)"))?;
        let path = inside_release(cx, TOP_LEVEL, &key, &file)?;
        if !path.exists() {
            return Err(cx.invalid(
                TOP_LEVEL,
                &key,
                format!("`{file}` does not exist in the release"),
            ));
        }
        out.insert(name, path);
    }
    Ok(out)
}
