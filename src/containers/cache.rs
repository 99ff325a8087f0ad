//! Clearing caches and keeping the disk from filling with old images.
//!
//! [`Engine::clear_cache`] is the operator's "start from scratch": it removes every tag of the
//! project's images except the ones serving containers run (removing a tag also removes the
//! classic builder's intermediate images below it), removes dangling images (the classic
//! builder's leftovers; the engine cannot tell whose they are), prunes the BuildKit cache
//! (`/build/prune`), deletes the configured app cache paths inside the given release directories,
//! and leaves a marker file in each of them so that the next build, whose previous release is one
//! of them, runs without cache and without `cache_from`. The build after that is warm again.
//!
//! App cache paths: an entry with a `/` is a path relative to the release directory; a bare name
//! (`.next`, `__pycache__`) is removed wherever it occurs in the tree. Symlinks are removed, never
//! followed, so nothing outside the release directory is touched.
//!
//! [`Engine::retain`] runs after a successful deployment: images built for releases that are no
//! longer kept are removed, as are the project's dangling images. Images used by any container
//! are never removed, so the serving release's images always stay; the caller keeps the previous
//! good release in the list it passes. Stage images of multi-stage builds
//! (`<repo>:<release>-stage-<name>`) follow their release in both.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use bollard::query_parameters::{
    ListImagesOptionsBuilder, PruneBuildOptionsBuilder, PruneImagesOptionsBuilder,
    RemoveImageOptionsBuilder,
};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use super::CACHE_CLEARED_MARKER;
use super::compose::split_image;
use super::engine::Engine;
use super::error::{ContainerError, is_not_found};

/// What `clear_cache` removed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClearReport {
    /// Image tags removed.
    pub images_removed: Vec<String>,
    /// Dangling images removed.
    pub dangling_removed: usize,
    /// Bytes the builder cache prune reclaimed.
    pub build_cache_reclaimed: u64,
    /// App cache paths deleted.
    pub paths_removed: Vec<PathBuf>,
}

impl Engine {
    /// Remove the project's images (but those serving containers use), the builder cache and the
    /// app cache paths inside `release_dirs`.
    pub async fn clear_cache(
        &self,
        project: &str,
        release_dirs: &[PathBuf],
        clear_paths: &[String],
    ) -> Result<ClearReport, ContainerError> {
        let mut report = ClearReport::default();
        let in_use = self.images_in_use(project).await?;
        // Stage images first: they are found through the repositories of the labelled images,
        // whose tags the loop below removes.
        for (tag, _) in self.stage_images(project).await? {
            if self.remove_tag(&tag).await? {
                report.images_removed.push(tag);
            }
        }
        for image in self.project_images(project, false).await? {
            for tag in &image.repo_tags {
                if tag == "<none>:<none>" || in_use.refs.contains(tag) {
                    continue;
                }
                if self.remove_tag(tag).await? {
                    report.images_removed.push(tag.clone());
                }
            }
        }
        let pruned = self
            .docker
            .prune_images(Some(
                PruneImagesOptionsBuilder::new()
                    .filters(&HashMap::from([("dangling", vec!["true"])]))
                    .build(),
            ))
            .await
            .map_err(|e| ContainerError::engine("pruning dangling images", e))?;
        report.dangling_removed = pruned
            .images_deleted
            .unwrap_or_default()
            .iter()
            .filter(|d| d.deleted.is_some())
            .count();
        let build = self.prune_builder_cache().await?;
        report.build_cache_reclaimed = build
            .space_reclaimed
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(0);
        for dir in release_dirs {
            remove_cache_paths(dir, clear_paths, &mut report.paths_removed)?;
            let marker = dir.join(CACHE_CLEARED_MARKER);
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            // Atomically, under a random name created O_EXCL|O_NOFOLLOW: a container that can
            // write to the release cannot redirect the marker through a planted symlink.
            crate::files::write_atomic(&marker, format!("{stamp}\n").as_bytes(), 0o644).map_err(
                |e| ContainerError::WriteFile {
                    path: marker,
                    source: e.source,
                },
            )?;
        }
        tracing::info!(
            project,
            images = report.images_removed.len(),
            dangling = report.dangling_removed,
            build_cache_bytes = report.build_cache_reclaimed,
            paths = report.paths_removed.len(),
            "caches cleared"
        );
        Ok(report)
    }

    /// Prune the whole builder cache. The engine runs one prune at a time and refuses a second
    /// ("a prune operation is already running"): that one is waited for, up to a minute.
    async fn prune_builder_cache(
        &self,
    ) -> Result<bollard::models::BuildPruneResponse, ContainerError> {
        let mut waited = 0;
        loop {
            match self
                .docker
                .prune_build(Some(PruneBuildOptionsBuilder::new().all(true).build()))
                .await
            {
                Err(bollard::errors::Error::DockerResponseServerError { message, .. })
                    if message.contains("already running") && waited < 30 =>
                {
                    waited += 1;
                    tracing::info!(%message, "waiting for another builder cache prune");
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
                result => {
                    return result
                        .map_err(|e| ContainerError::engine("pruning the builder cache", e));
                }
            }
        }
    }

    /// Remove images of releases not in `keep_release_ids` and the project's dangling images;
    /// returns how many images (tags or dangling ids) were removed.
    pub async fn retain(
        &self,
        project: &str,
        keep_release_ids: &[String],
    ) -> Result<usize, ContainerError> {
        let in_use = self.images_in_use(project).await?;
        let keep: BTreeSet<&str> = keep_release_ids.iter().map(String::as_str).collect();
        let mut removed = 0;
        for (tag, release) in self.stage_images(project).await? {
            if !keep.contains(release.as_str()) && self.remove_tag(&tag).await? {
                tracing::info!(project, image = %tag, release, "removed old stage image");
                removed += 1;
            }
        }
        for image in self.project_images(project, false).await? {
            let release = image.labels.get("deployd.release").map(String::as_str);
            if in_use.ids.contains(&image.id) || release.is_none_or(|r| keep.contains(r)) {
                continue;
            }
            for tag in &image.repo_tags {
                if tag != "<none>:<none>" && self.remove_tag(tag).await? {
                    tracing::info!(project, image = %tag, release = ?release, "removed old release image");
                    removed += 1;
                }
            }
        }
        for image in self.project_images(project, true).await? {
            if in_use.ids.contains(&image.id) {
                continue;
            }
            if self.remove_tag(&image.id).await? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Images labelled for the project (`dangling` selects the untagged ones).
    async fn project_images(
        &self,
        project: &str,
        dangling: bool,
    ) -> Result<Vec<bollard::models::ImageSummary>, ContainerError> {
        let mut filters: HashMap<&str, Vec<String>> =
            HashMap::from([("label", vec![format!("deployd.project={project}")])]);
        if dangling {
            filters.insert("dangling", vec!["true".into()]);
        }
        self.docker
            .list_images(Some(
                ListImagesOptionsBuilder::new().filters(&filters).build(),
            ))
            .await
            .map_err(|e| ContainerError::engine(format!("listing images of {project}"), e))
    }

    /// Stage images (`<repo>:<release>-stage-<name>`, see the build module) in the project's image
    /// repositories, with the release each belongs to. They carry no labels: the classic builder
    /// turns every label into one more build step, which each stage's build would pay for.
    async fn stage_images(&self, project: &str) -> Result<Vec<(String, String)>, ContainerError> {
        let mut repos = BTreeSet::new();
        for image in self.project_images(project, false).await? {
            for tag in &image.repo_tags {
                if tag != "<none>:<none>" {
                    repos.insert(split_image(tag).0.to_string());
                }
            }
        }
        let mut stages = Vec::new();
        for repo in repos {
            let filters = HashMap::from([("reference", vec![format!("{repo}:*-stage-*")])]);
            let images = self
                .docker
                .list_images(Some(
                    ListImagesOptionsBuilder::new().filters(&filters).build(),
                ))
                .await
                .map_err(|e| {
                    ContainerError::engine(format!("listing stage images of {repo}"), e)
                })?;
            for tag in images.into_iter().flat_map(|i| i.repo_tags) {
                let (tag_repo, tag_name) = split_image(&tag);
                if tag_repo != repo {
                    continue;
                }
                if let Some((release, _)) = tag_name.split_once("-stage-") {
                    stages.push((tag.clone(), release.to_string()));
                }
            }
        }
        Ok(stages)
    }

    /// Image references and ids used by any container of the project.
    async fn images_in_use(&self, project: &str) -> Result<InUse, ContainerError> {
        let mut in_use = InUse::default();
        for c in self.project_containers(project).await? {
            if let Some(r) = c.image {
                in_use.refs.insert(r);
            }
            if let Some(id) = c.image_id {
                in_use.ids.insert(id);
            }
        }
        // Other projects' containers may share an image by id; never remove those either.
        let all = self
            .docker
            .list_containers(Some(
                bollard::query_parameters::ListContainersOptionsBuilder::new()
                    .all(true)
                    .build(),
            ))
            .await
            .map_err(|e| ContainerError::engine("listing containers", e))?;
        in_use
            .ids
            .extend(all.into_iter().filter_map(|c| c.image_id));
        Ok(in_use)
    }

    /// Untag (and, for the last tag, delete) an image; `false` when it is in use or gone.
    async fn remove_tag(&self, tag: &str) -> Result<bool, ContainerError> {
        match self
            .docker
            .remove_image(
                tag,
                Some(
                    RemoveImageOptionsBuilder::new()
                        .force(false)
                        .noprune(false)
                        .build(),
                ),
                None,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409,
                message,
            }) => {
                tracing::debug!(image = tag, %message, "image in use, kept");
                Ok(false)
            }
            Err(e) => Err(ContainerError::engine(format!("removing image {tag}"), e)),
        }
    }
}

#[derive(Default)]
struct InUse {
    refs: BTreeSet<String>,
    ids: BTreeSet<String>,
}

/// Delete the app cache paths below a release directory. Every directory is opened relative
/// to its parent with `O_NOFOLLOW`, so a symlink a container planted in the release (in place
/// of `node_modules`, or of a directory on a relative clear path) is removed or skipped, never
/// followed.
fn remove_cache_paths(
    dir: &Path,
    clear_paths: &[String],
    removed: &mut Vec<PathBuf>,
) -> Result<(), ContainerError> {
    let root = match crate::files::open_dir(dir) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(read_err(dir)(source)),
    };
    let (relative, names): (Vec<&String>, Vec<&String>) =
        clear_paths.iter().partition(|p| p.contains('/'));
    for rel in relative {
        let rel_path = Path::new(rel.trim_start_matches('/'));
        if rel_path
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            continue;
        }
        let parts: Vec<&OsStr> = rel_path.iter().collect();
        let Some((last, ancestors)) = parts.split_last() else {
            continue;
        };
        let mut fd = root.try_clone().map_err(read_err(dir))?;
        let mut at = dir.to_path_buf();
        let mut reachable = true;
        for part in ancestors {
            at.push(part);
            match open_child_dir(&fd, part) {
                Ok(Some(child)) => fd = child,
                Ok(None) => {
                    reachable = false;
                    break;
                }
                Err(source) => return Err(read_err(&at)(source)),
            }
        }
        if reachable {
            remove_at(&fd, last, &at.join(last), removed)?;
        }
    }
    if names.is_empty() {
        return Ok(());
    }
    let names: BTreeSet<&str> = names.iter().map(|s| s.as_str()).collect();
    walk_remove(&root, dir, &names, removed)
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> ContainerError + '_ {
    move |source| ContainerError::ReadFile {
        path: path.to_path_buf(),
        source,
    }
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> ContainerError + '_ {
    move |source| ContainerError::WriteFile {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens the directory `name` in `dir` without following a symlink; `None` when it is
/// missing, a symlink or not a directory.
fn open_child_dir(dir: &OwnedFd, name: &OsStr) -> io::Result<Option<OwnedFd>> {
    match nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => Ok(None),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// The names in a directory (`.` and `..` left out).
fn list(dir: &OwnedFd) -> io::Result<Vec<OsString>> {
    let mut d = Dir::from_fd(dir.try_clone()?).map_err(io::Error::from)?;
    let mut out = Vec::new();
    for entry in d.iter() {
        let entry = entry.map_err(io::Error::from)?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name != "." && name != ".." {
            out.push(name.to_os_string());
        }
    }
    Ok(out)
}

fn walk_remove(
    dir: &OwnedFd,
    path: &Path,
    names: &BTreeSet<&str>,
    removed: &mut Vec<PathBuf>,
) -> Result<(), ContainerError> {
    for name in list(dir).map_err(read_err(path))? {
        let child = path.join(&name);
        if names.contains(name.to_string_lossy().as_ref()) {
            remove_at(dir, &name, &child, removed)?;
        } else if let Some(fd) = open_child_dir(dir, &name).map_err(read_err(&child))? {
            walk_remove(&fd, &child, names, removed)?;
        }
    }
    Ok(())
}

/// Removes `name` in `dir`: a file or symlink itself, or a directory tree, never following a
/// symlink.
fn remove_at(
    dir: &OwnedFd,
    name: &OsStr,
    path: &Path,
    removed: &mut Vec<PathBuf>,
) -> Result<(), ContainerError> {
    match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(read_err(path)(io::Error::from(e))),
        Ok(_) => {}
    }
    remove_tree_at(dir, name, path)?;
    removed.push(path.to_path_buf());
    Ok(())
}

fn remove_tree_at(dir: &OwnedFd, name: &OsStr, path: &Path) -> Result<(), ContainerError> {
    if let Some(fd) = open_child_dir(dir, name).map_err(read_err(path))? {
        for child in list(&fd).map_err(read_err(path))? {
            remove_tree_at(&fd, &child, &path.join(&child))?;
        }
        drop(fd);
        return nix::unistd::unlinkat(dir, name, UnlinkatFlags::RemoveDir)
            .map_err(|e| write_err(path)(io::Error::from(e)));
    }
    match nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(write_err(path)(io::Error::from(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_paths_never_follow_planted_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir_all(outside.join(".next")).unwrap();
        std::fs::write(outside.join(".next/keep"), b"x").unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        let release = root.path().join("release");
        std::fs::create_dir_all(release.join("app/.next/cache")).unwrap();
        std::fs::write(release.join("app/.next/cache/f"), b"x").unwrap();
        std::fs::create_dir_all(release.join("web")).unwrap();
        // A planted link named like a cache path, and one in place of a directory on a
        // relative clear path.
        std::os::unix::fs::symlink(&outside, release.join("web/.turbo")).unwrap();
        std::os::unix::fs::symlink(&outside, release.join("linked")).unwrap();
        let mut removed = Vec::new();
        remove_cache_paths(
            &release,
            &[".next".into(), ".turbo".into(), "linked/.next".into()],
            &mut removed,
        )
        .unwrap();
        assert!(!release.join("app/.next").exists());
        assert!(std::fs::symlink_metadata(release.join("web/.turbo")).is_err());
        assert!(outside.join(".next/keep").exists(), "followed a symlink");
        assert!(outside.join("keep").exists(), "followed a symlink");
        assert!(release.join("linked").exists());
        assert_eq!(removed.len(), 2, "{removed:?}");
    }
}
