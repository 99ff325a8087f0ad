//! Activate: releases on disk, the `current` symlink, retention and the deployment lock.
//!
//! ```text
//! /var/lib/deployd/
//!   releases/<id>/                one complete unpacked release each, with .deployd-release.json
//!   current -> releases/<id>      switched atomically: a temporary symlink renamed over it
//!   staging/                      work in progress; debris there at startup is removed
//!   state.json                    see `state`
//!   lock                          flock(2) held for the length of one deployment
//! ```
//!
//! A release directory appears under `releases/` only by a rename from `staging/` after its
//! tree and manifest were synced to disk, so `current` can never point at a partial release.
//! Retention keeps the newest `keep` releases and never removes the serving one or the
//! previous good one.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::contract::host::sync_dir;
use crate::deploy::unpack::{Compression, Stats};
use crate::error::{ExitCode, exit};

/// The manifest's file name inside every release.
pub const MANIFEST: &str = ".deployd-release.json";

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another deployment is running (it holds {path}); wait for it or check `deployd status`"
    )]
    Busy { path: PathBuf },
    #[error("release {id} does not exist under {dir}; `deployd status` lists the releases on disk")]
    NoSuchRelease { id: String, dir: PathBuf },
    #[error("release {id} is incomplete (its manifest is missing or unreadable: {reason})")]
    Incomplete { id: String, reason: String },
    #[error("there is no previous release to roll back to")]
    NothingToRollBack,
}

impl ExitCode for ReleaseError {
    fn exit_code(&self) -> i32 {
        match self {
            ReleaseError::Busy { .. } => exit::TEMPFAIL,
            ReleaseError::NoSuchRelease { .. } | ReleaseError::NothingToRollBack => exit::USAGE,
            ReleaseError::Incomplete { .. } => exit::DATAERR,
            ReleaseError::Io { .. } => exit::SOFTWARE,
        }
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ReleaseError + 'a {
    move |source| ReleaseError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// `.deployd-release.json`: where a release came from and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub app: String,
    pub bucket: String,
    pub key: String,
    pub etag: String,
    pub version_id: Option<String>,
    pub sha256: String,
    pub sha256_verified_against: Option<String>,
    pub size: u64,
    pub compression: Compression,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub last_modified: Option<String>,
    pub unpacked: Stats,
    pub fetched_at: String,
    pub source: String,
}

impl Manifest {
    pub fn commit(&self) -> Option<&str> {
        self.metadata.get("commit-sha").map(String::as_str)
    }

    /// This release as `state.json` records a serving one, activated now.
    pub fn summary(&self) -> crate::contract::host::ReleaseSummary {
        crate::contract::host::ReleaseSummary {
            id: self.id.clone(),
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            sha256: self.sha256.clone(),
            etag: self.etag.clone(),
            commit: self.commit().map(str::to_string),
            activated_at: crate::contract::host::now_rfc3339(),
        }
    }
}

/// The paths under the state directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    pub releases: PathBuf,
    pub staging: PathBuf,
    pub current: PathBuf,
    pub state_file: PathBuf,
    pub lock_file: PathBuf,
}

/// Held while a deployment (or rollback) runs; released on drop.
#[derive(Debug)]
pub struct DeployLock {
    _lock: nix::fcntl::Flock<File>,
}

impl Layout {
    pub fn new(state_dir: &Path) -> Layout {
        Layout {
            root: state_dir.to_path_buf(),
            releases: state_dir.join("releases"),
            staging: state_dir.join("staging"),
            current: state_dir.join("current"),
            state_file: state_dir.join("state.json"),
            lock_file: state_dir.join("lock"),
        }
    }

    /// Creates the directories if missing.
    pub fn ensure(&self) -> Result<(), ReleaseError> {
        for dir in [&self.root, &self.releases, &self.staging] {
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
            .open(&self.lock_file)
            .map_err(io_err("open", &self.lock_file))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(DeployLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(ReleaseError::Busy {
                path: self.lock_file.clone(),
            }),
            Err((_, e)) => Err(io_err("lock", &self.lock_file)(io::Error::from(e))),
        }
    }

    /// Removes everything under `staging/` (debris of an interrupted deployment).
    pub fn clean_staging(&self) -> Result<usize, ReleaseError> {
        let mut removed = 0;
        let entries = match fs::read_dir(&self.staging) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("list", &self.staging)(e)),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            remove_tree(&path)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// A fresh, empty directory under `staging/`.
    pub fn new_staging(&self) -> Result<Staging, ReleaseError> {
        self.ensure()?;
        let path = self
            .staging
            .join(format!("{}-{}", std::process::id(), fastrand::u64(..)));
        fs::create_dir(&path).map_err(io_err("create", &path))?;
        Ok(Staging { path: Some(path) })
    }

    pub fn release_dir(&self, id: &str) -> PathBuf {
        self.releases.join(id)
    }

    /// The id of the release `current` points at, if it points at one.
    pub fn current_id(&self) -> Option<String> {
        let target = fs::read_link(&self.current).ok()?;
        let name = target.file_name()?.to_str()?.to_string();
        self.release_dir(&name).is_dir().then_some(name)
    }

    /// Reads a release's manifest, checking that the release is complete.
    pub fn manifest(&self, id: &str) -> Result<Manifest, ReleaseError> {
        let dir = self.release_dir(id);
        if !dir.is_dir() {
            return Err(ReleaseError::NoSuchRelease {
                id: id.to_string(),
                dir: self.releases.clone(),
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
        let names: Vec<String> = match fs::read_dir(&self.releases) {
            Ok(entries) => entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err("list", &self.releases)(e)),
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
        let stamp: String = crate::contract::host::now_rfc3339()
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
        crate::deploy::unpack::sync_tree(&staged)
            .map_err(|e| io_err("sync", &staged)(io::Error::other(e.to_string())))?;
        let dest = self.release_dir(&manifest.id);
        fs::create_dir_all(&self.releases).map_err(io_err("create", &self.releases))?;
        fs::rename(&staged, &dest).map_err(io_err("move into place", &dest))?;
        staging.keep();
        sync_dir(&self.releases).map_err(io_err("sync", &self.releases))?;
        Ok(dest)
    }

    /// Points `current` at `releases/<id>` atomically (temporary symlink, then rename).
    pub fn switch_current(&self, id: &str) -> Result<(), ReleaseError> {
        if !self.release_dir(id).is_dir() {
            return Err(ReleaseError::NoSuchRelease {
                id: id.to_string(),
                dir: self.releases.clone(),
            });
        }
        let tmp = self
            .root
            .join(format!(".current.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new("releases").join(id), &tmp)
            .map_err(io_err("create symlink", &tmp))?;
        fs::rename(&tmp, &self.current).map_err(io_err("switch", &self.current))?;
        sync_dir(&self.root).map_err(io_err("sync", &self.root))
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
            remove_tree(&self.release_dir(&id))?;
            removed.push(id);
        }
        Ok(removed)
    }
}

/// Removes a directory tree (or a file) if it exists.
pub fn remove_tree(path: &Path) -> Result<(), ReleaseError> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(io_err("remove", path))
}

/// A staging directory that removes itself unless it was installed.
#[derive(Debug)]
pub struct Staging {
    path: Option<PathBuf>,
}

impl Staging {
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
