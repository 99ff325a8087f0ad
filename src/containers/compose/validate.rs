//! Checks shared by the parsers: tags the engine would accept, paths that stay inside the
//! release directory, and `depends_on` that names existing services without a cycle.

use super::Parsed;
use std::collections::BTreeSet;
use std::path::{Component, PathBuf};

use super::Cx;
use super::model::Service;

/// Whether a string is a usable tag (what the engine accepts: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`).
pub(crate) fn valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && tag.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Resolve a path of the compose file against its project directory, refusing anything that
/// leaves the release directory (lexically, or through a symlink when the path exists).
pub(super) fn inside_release(cx: &Cx, service: &str, key: &str, p: &str) -> Parsed<PathBuf> {
    let outside = || {
        cx.forbidden(
            service,
            key,
            format!(
                "`{p}` is outside the release directory, and containers may only mount files of their release"
            ),
        )
    };
    if p.starts_with('~') {
        return Err(outside());
    }
    let joined = cx.base_dir.join(p);
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

/// Order services so dependencies come first (stable: compose file order otherwise).
pub(super) fn order_services(cx: &Cx, services: Vec<Service>) -> Parsed<Vec<Service>> {
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
