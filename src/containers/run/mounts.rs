//! A service's mounts as the engine takes them, and the check that runs immediately before each
//! create and start: every release bind resolves beneath the release directory with no symlink
//! component, is handed to the engine as that canonical path, and is read-only; mount points
//! that nested mounts need inside a read-only release bind are created first (safely), since the
//! engine cannot create them through the read-only mount.

use std::path::{Path, PathBuf};

use bollard::models::{Mount, MountTmpfsOptions, MountType, MountVolumeOptions};

use crate::containers::compose::beneath::{self, BeneathError, Kind};
use crate::containers::compose::{MountSpec, Project, Service};

/// A release bind that did not pass the check.
#[derive(Debug, thiserror::Error)]
#[error("release bind {} (at {target} in the container) is refused: {reason}", path.display())]
pub(crate) struct BindRefused {
    /// The bind's source.
    pub(crate) path: PathBuf,
    /// Where it would be mounted.
    pub(crate) target: String,
    /// What the check found.
    pub(crate) reason: BeneathError,
}

/// The engine mounts of a service, in the compose file's order; release binds are read-only
/// and name the path of the compose model (made canonical by [`secure_binds`]).
pub(super) fn engine_mounts(service: &Service) -> Vec<Mount> {
    service
        .volumes
        .iter()
        .map(|m| match m {
            MountSpec::Volume {
                name,
                target,
                read_only,
                nocopy,
            } => Mount {
                typ: Some(MountType::VOLUME),
                source: Some(name.clone()),
                target: Some(target.clone()),
                read_only: Some(*read_only),
                volume_options: nocopy.then(|| MountVolumeOptions {
                    no_copy: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            },
            MountSpec::Anonymous { target } => Mount {
                typ: Some(MountType::VOLUME),
                target: Some(target.clone()),
                ..Default::default()
            },
            MountSpec::Bind { source, target, .. } => Mount {
                typ: Some(MountType::BIND),
                source: Some(source.display().to_string()),
                target: Some(target.clone()),
                read_only: Some(true),
                ..Default::default()
            },
            MountSpec::Tmpfs { target, size, mode } => Mount {
                typ: Some(MountType::TMPFS),
                target: Some(target.clone()),
                tmpfs_options: Some(MountTmpfsOptions {
                    size_bytes: *size,
                    mode: *mode,
                    ..Default::default()
                }),
                ..Default::default()
            },
        })
        .collect()
}

/// Check every release bind of `service` and point `mounts` (from [`engine_mounts`]) at the
/// checked canonical paths; then create the mount points that other mounts need inside
/// read-only release binds.
pub(super) fn secure_binds(
    project: &Project,
    service: &Service,
    mounts: &mut [Mount],
) -> Result<(), BindRefused> {
    let mut release_dirs: Vec<(String, PathBuf)> = Vec::new();
    let mut kinds = Vec::with_capacity(mounts.len());
    for (spec, mount) in service.volumes.iter().zip(mounts.iter_mut()) {
        let MountSpec::Bind { source, target, .. } = spec else {
            kinds.push(Kind::Dir);
            continue;
        };
        let refused = |reason| BindRefused {
            path: source.clone(),
            target: target.clone(),
            reason,
        };
        let (path, kind) = beneath::checked_bind(&project.release_dir, source).map_err(refused)?;
        if kind == Kind::Dir {
            release_dirs.push((target.clone(), path.clone()));
        }
        kinds.push(kind);
        mount.source = Some(path.display().to_string());
    }
    for (spec, kind) in service.volumes.iter().zip(kinds) {
        let target = spec.target();
        let Some((outer, rel)) = innermost_release_dir(&release_dirs, target) else {
            continue;
        };
        beneath::create(outer, rel, kind == Kind::File).map_err(|reason| BindRefused {
            path: outer.join(rel),
            target: target.to_string(),
            reason,
        })?;
    }
    for target in service.run.tmpfs.keys() {
        if let Some((outer, rel)) = innermost_release_dir(&release_dirs, target) {
            beneath::create(outer, rel, false).map_err(|reason| BindRefused {
                path: outer.join(rel),
                target: target.clone(),
                reason,
            })?;
        }
    }
    Ok(())
}

/// The release directory bound at the deepest strict ancestor of `target`, and `target`
/// relative to it.
fn innermost_release_dir<'a>(
    dirs: &'a [(String, PathBuf)],
    target: &'a str,
) -> Option<(&'a Path, &'a Path)> {
    dirs.iter()
        .filter_map(|(outer_target, source)| {
            let rel = Path::new(target).strip_prefix(outer_target).ok()?;
            (!rel.as_os_str().is_empty()).then_some((outer_target.len(), source.as_path(), rel))
        })
        .max_by_key(|(depth, _, _)| *depth)
        .map(|(_, source, rel)| (source, rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_targets_find_their_release_dir() {
        let dirs = vec![
            ("/app".to_string(), PathBuf::from("/r/1")),
            ("/app/src".to_string(), PathBuf::from("/r/1/src")),
        ];
        assert_eq!(
            innermost_release_dir(&dirs, "/app/node_modules"),
            Some((Path::new("/r/1"), Path::new("node_modules")))
        );
        assert_eq!(
            innermost_release_dir(&dirs, "/app/src/gen"),
            Some((Path::new("/r/1/src"), Path::new("gen")))
        );
        assert_eq!(innermost_release_dir(&dirs, "/app"), None);
        assert_eq!(innermost_release_dir(&dirs, "/application"), None);
        assert_eq!(innermost_release_dir(&dirs, "/data"), None);
    }
}
