//! Activate: releases on disk, the `current` symlink, retention and the deployment lock.
//!
//! The paths are [`crate::contract::host::Paths`]. A release directory appears under
//! `releases/` only by a rename from `staging/` after its tree and manifest were synced to
//! disk, so `current` can never point at a partial release. Retention keeps the newest `keep`
//! releases and never removes the serving one or the previous good one.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::contract::host::{MANIFEST, Manifest, Paths};
use crate::error::exit_codes;
use crate::files::{FileError, remove_tree, sync_dir};

/// A release on disk, `current` or the lock could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// A file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// Another deployment holds the lock.
    #[error(
        "another deployment is running (it holds {path}); wait for it or check `deployd status`"
    )]
    Busy {
        /// The path concerned.
        path: PathBuf,
    },
    /// No such release on disk.
    #[error(
        "release {id} does not exist under {dir}; `deployd releases` lists the releases on disk"
    )]
    NoSuchRelease {
        /// The release id.
        id: String,
        /// The releases directory.
        dir: PathBuf,
    },
    /// The release has no readable manifest.
    #[error("release {id} is incomplete (its manifest is missing or unreadable: {reason})")]
    Incomplete {
        /// The release id.
        id: String,
        /// Why, as one clause.
        reason: String,
    },
    /// There is no previous good release.
    #[error("there is no previous release to roll back to")]
    NothingToRollBack,
}

exit_codes!(ReleaseError {
    Busy { .. } => TEMPFAIL,
    NoSuchRelease { .. } | NothingToRollBack => USAGE,
    Incomplete { .. } => DATAERR,
    File(_) => SOFTWARE,
});

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ReleaseError + 'a {
    move |source| ReleaseError::File(FileError::on(action, path)(source))
}

/// The releases on disk and the operations on them.
#[derive(Debug, Clone)]
pub struct Layout {
    paths: Paths,
}

/// Held while a deployment (or rollback) runs; released on drop.
#[derive(Debug)]
pub struct DeployLock {
    _lock: nix::fcntl::Flock<File>,
}

impl Layout {
    /// The releases under `paths`.
    pub fn new(paths: Paths) -> Layout {
        Layout { paths }
    }

    /// Where everything is.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Creates the directories if missing.
    pub fn ensure(&self) -> Result<(), ReleaseError> {
        for dir in [
            &self.paths.state_dir,
            &self.paths.releases,
            &self.paths.staging,
        ] {
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        Ok(())
    }

    /// Takes the deployment lock without waiting.
    pub fn lock(&self) -> Result<DeployLock, ReleaseError> {
        self.ensure()?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&self.paths.lock_file)
            .map_err(io_err("open", &self.paths.lock_file))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(DeployLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(ReleaseError::Busy {
                path: self.paths.lock_file.clone(),
            }),
            Err((_, e)) => Err(io_err("lock", &self.paths.lock_file)(io::Error::from(e))),
        }
    }

    /// Removes the debris of interrupted deployments: everything under `staging/`, and the
    /// temporary files (`.current.<pid>.tmp`, `.state.json.<pid>.tmp`, ...) a process killed
    /// between writing and renaming leaves in the state directory. Only call it holding the
    /// deployment lock: nothing else is then writing there.
    pub fn clean_staging(&self) -> Result<usize, ReleaseError> {
        let mut removed = 0;
        for (dir, debris) in [
            (&self.paths.staging, (|_: &str| true) as fn(&str) -> bool),
            (&self.paths.state_dir, |name: &str| {
                name.starts_with('.') && name.ends_with(".tmp")
            }),
        ] {
            let entries = match fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("list", dir)(e)),
            };
            for entry in entries.flatten() {
                if debris(&entry.file_name().to_string_lossy()) {
                    remove_tree(&entry.path())?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Removes a release directory so that no crash can leave half of it under `releases/`:
    /// it is first renamed into `staging/` (whose content is debris by definition), then
    /// deleted.
    pub fn discard(&self, id: &str) -> Result<(), ReleaseError> {
        let dir = self.release_dir(id);
        let doomed = self.paths.staging.join(format!(
            "discard-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        fs::create_dir_all(&self.paths.staging).map_err(io_err("create", &self.paths.staging))?;
        match fs::rename(&dir, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("move aside", &dir)(e)),
        }
        sync_dir(&self.paths.releases).map_err(io_err("sync", &self.paths.releases))?;
        remove_tree(&doomed)?;
        Ok(())
    }

    /// A fresh, empty directory under `staging/`.
    pub fn new_staging(&self) -> Result<Staging, ReleaseError> {
        self.ensure()?;
        let path = self
            .paths
            .staging
            .join(format!("{}-{}", std::process::id(), fastrand::u64(..)));
        fs::create_dir(&path).map_err(io_err("create", &path))?;
        Ok(Staging { path: Some(path) })
    }

    /// `releases/<id>`.
    pub fn release_dir(&self, id: &str) -> PathBuf {
        self.paths.release_dir(id)
    }

    /// The id of the release `current` points at, if it points at one.
    pub fn current_id(&self) -> Option<String> {
        let target = fs::read_link(&self.paths.current).ok()?;
        let name = target.file_name()?.to_str()?.to_string();
        self.release_dir(&name).is_dir().then_some(name)
    }

    /// Reads a release's manifest, checking that the release is complete.
    pub fn manifest(&self, id: &str) -> Result<Manifest, ReleaseError> {
        let dir = self.release_dir(id);
        if !dir.is_dir() {
            return Err(ReleaseError::NoSuchRelease {
                id: id.to_string(),
                dir: self.paths.releases.clone(),
            });
        }
        let bytes = fs::read(dir.join(MANIFEST)).map_err(|e| ReleaseError::Incomplete {
            id: id.to_string(),
            reason: e.to_string(),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ReleaseError::Incomplete {
            id: id.to_string(),
            reason: e.to_string(),
        })
    }

    /// Release ids on disk, oldest first: ordered by when they were fetched (manifest), then by
    /// name; a release without a readable manifest counts as oldest.
    pub fn release_ids(&self) -> Result<Vec<String>, ReleaseError> {
        let names: Vec<String> = match fs::read_dir(&self.paths.releases) {
            Ok(entries) => entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err("list", &self.paths.releases)(e)),
        };
        let mut dated: Vec<(String, String)> = names
            .into_iter()
            .map(|id| {
                let when = self.manifest(&id).map(|m| m.fetched_at).unwrap_or_default();
                (when, id)
            })
            .collect();
        dated.sort();
        Ok(dated.into_iter().map(|(_, id)| id).collect())
    }

    /// The directories of every release on disk, oldest first.
    pub fn release_dirs(&self) -> Result<Vec<PathBuf>, ReleaseError> {
        Ok(self
            .release_ids()?
            .iter()
            .map(|id| self.release_dir(id))
            .collect())
    }

    /// A new release id: `YYYYmmdd-HHMMSS-<short>`, unique under `releases/`.
    pub fn new_release_id(&self, short: &str) -> String {
        let stamp: String = crate::contract::now_rfc3339()
            .chars()
            .filter(char::is_ascii_digit)
            .collect();
        let base = format!(
            "{}-{}-{short}",
            &stamp[..8.min(stamp.len())],
            &stamp[8.min(stamp.len())..]
        );
        let mut id = base.clone();
        let mut n = 2;
        while self.release_dir(&id).exists() {
            id = format!("{base}-{n}");
            n += 1;
        }
        id
    }

    /// Writes the manifest into the staged tree, syncs it, and renames it into `releases/<id>`.
    pub fn install(
        &self,
        mut staging: Staging,
        manifest: &Manifest,
    ) -> Result<PathBuf, ReleaseError> {
        let staged = staging.path().to_path_buf();
        let manifest_path = staged.join(MANIFEST);
        // The archive may have shipped its own file (or link) of that name: ours replaces it.
        match fs::symlink_metadata(&manifest_path) {
            Ok(m) if m.is_dir() => remove_tree(&manifest_path)?,
            Ok(_) => fs::remove_file(&manifest_path).map_err(io_err("replace", &manifest_path))?,
            Err(_) => {}
        }
        let bytes = serde_json::to_vec_pretty(manifest)
            .map_err(|e| io_err("serialise", &manifest_path)(io::Error::other(e)))?;
        fs::write(&manifest_path, bytes).map_err(io_err("write", &manifest_path))?;
        crate::files::sync_filesystem(&staged).map_err(io_err("sync", &staged))?;
        let dest = self.release_dir(&manifest.id);
        fs::create_dir_all(&self.paths.releases).map_err(io_err("create", &self.paths.releases))?;
        fs::rename(&staged, &dest).map_err(io_err("move into place", &dest))?;
        staging.keep();
        sync_dir(&self.paths.releases).map_err(io_err("sync", &self.paths.releases))?;
        Ok(dest)
    }

    /// Points `current` at `releases/<id>` atomically (temporary symlink, then rename).
    pub fn switch_current(&self, id: &str) -> Result<(), ReleaseError> {
        if !self.release_dir(id).is_dir() {
            return Err(ReleaseError::NoSuchRelease {
                id: id.to_string(),
                dir: self.paths.releases.clone(),
            });
        }
        let tmp = self
            .paths
            .state_dir
            .join(format!(".current.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new("releases").join(id), &tmp)
            .map_err(io_err("create symlink", &tmp))?;
        fs::rename(&tmp, &self.paths.current).map_err(io_err("switch", &self.paths.current))?;
        sync_dir(&self.paths.state_dir).map_err(io_err("sync", &self.paths.state_dir))
    }

    /// Removes `current` (nothing serves); durable.
    pub fn remove_current(&self) -> Result<(), ReleaseError> {
        let current = &self.paths.current;
        match fs::remove_file(current) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("remove", current)(e));
            }
            _ => {}
        }
        sync_dir(&self.paths.state_dir).map_err(io_err("sync", &self.paths.state_dir))
    }

    /// Removes old releases beyond the newest `keep`, never one listed in `protect`.
    pub fn retain(&self, keep: usize, protect: &[&str]) -> Result<Vec<String>, ReleaseError> {
        let ids = self.release_ids()?;
        let mut removed = Vec::new();
        let excess = ids.len().saturating_sub(keep);
        for id in ids.into_iter().take(excess) {
            if protect.contains(&id.as_str()) {
                continue;
            }
            self.discard(&id)?;
            removed.push(id);
        }
        Ok(removed)
    }
}

/// A staging directory that removes itself unless it was installed.
#[derive(Debug)]
pub struct Staging {
    path: Option<PathBuf>,
}

impl Staging {
    /// The directory.
    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    fn keep(&mut self) {
        self.path = None;
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(path) = self.path.take()
            && let Err(error) = remove_tree(&path)
        {
            tracing::warn!(path = %path.display(), %error, "could not remove staging directory");
        }
    }
}
