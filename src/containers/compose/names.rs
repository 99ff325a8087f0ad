//! The names that keep an app inside its own boundary: engine names of volumes and networks,
//! and the repositories its built images are tagged into.
//!
//! A volume or network is the app's own when its engine name is the project name or starts with
//! `<project>_` or `<project>-` (what deployd and docker compose create); anything else, whether
//! the file says `external: true` or only sets `name:`, must be listed in
//! `[containers] allowed_external`. Names that are not plain names (`host`, `none`,
//! `container:<id>`, paths) are refused whatever the list says. An existing object with an owned
//! name must also carry the project's label, which the run stage checks (a project `app` must not
//! reach project `app-admin`'s `app-admin_data`).

use super::Cx;
use super::Parsed;
use super::keys::TOP_LEVEL;
use crate::config::ContainersConfig;

/// Whether an engine name (volume, network, image repository) belongs to `project`.
pub(crate) fn owned_by(project: &str, name: &str) -> bool {
    name == project
        || name
            .strip_prefix(project)
            .is_some_and(|rest| rest.starts_with(['_', '-']))
}

/// Why an engine name can never be used, if it cannot: it is not a plain name.
pub(crate) fn unusable_name(name: &str) -> Option<&'static str> {
    if matches!(name, "host" | "none") {
        return Some("it is the host's network namespace, or no network at all");
    }
    if name.starts_with("container:") || name.starts_with("service:") {
        return Some("it joins another container's network namespace");
    }
    let mut chars = name.chars();
    let plain = matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name.len() <= 128;
    (!plain).then_some("it is not a plain name (letters, digits, `_`, `.`, `-`): a path or a `:` names something outside the app")
}

/// Check a top-level volume or network (`kind`) named `key` in the file, `engine_name` in the
/// engine; `Ok(true)` when it is used through `[containers] allowed_external`.
pub(super) fn check_object_name(
    cx: &Cx,
    kind: &str,
    key: &str,
    engine_name: &str,
    settings: &ContainersConfig,
) -> Parsed<bool> {
    let dotted = format!("{kind}s.{key}");
    if let Some(why) = unusable_name(engine_name) {
        return Err(cx.forbidden(
            TOP_LEVEL,
            &dotted,
            format!("{kind} name `{engine_name}` is refused: {why}"),
        ));
    }
    if settings.allowed_external.iter().any(|n| n == engine_name) {
        return Ok(true);
    }
    if owned_by(&cx.project, engine_name) {
        return Ok(false);
    }
    Err(cx.forbidden(
        TOP_LEVEL,
        &dotted,
        format!(
            "{kind} `{engine_name}` is not the app's own (its name does not start with `{}_`); list it in [containers] allowed_external to share it",
            cx.project
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_is_by_prefix_and_separator() {
        assert!(owned_by("app", "app"));
        assert!(owned_by("app", "app_default"));
        assert!(owned_by("app", "app-web"));
        assert!(!owned_by("app", "apple_data"));
        assert!(!owned_by("app", "other_app_data"));
    }

    #[test]
    fn unusable_names() {
        for bad in [
            "host",
            "none",
            "container:abc",
            "service:web",
            "/etc",
            "a:b",
            "",
            "a/b",
        ] {
            assert!(unusable_name(bad).is_some(), "{bad:?} accepted");
        }
        for good in ["app_default", "bridge", "my.net-1"] {
            assert!(unusable_name(good).is_none(), "{good:?} refused");
        }
    }
}
