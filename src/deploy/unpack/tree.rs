//! The tree side of unpacking: entry paths and link targets checked, then written below the
//! staging directory without ever following a link.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{Limits, UnpackError};

pub(super) fn hostile(entry: &Path, reason: impl Into<String>) -> UnpackError {
    UnpackError::Hostile {
        entry: entry.to_string_lossy().into_owned(),
        reason: reason.into(),
    }
}

pub(super) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Normalises an entry path: relative, no `..`, `.` removed. `None` for the root itself.
pub(super) fn entry_path(raw: &[u8], limits: &Limits) -> Result<Option<PathBuf>, UnpackError> {
    let path = Path::new(OsStr::from_bytes(raw));
    if raw.len() > limits.max_path_len {
        return Err(UnpackError::Limit {
            what: format!("entry path of {} bytes", raw.len()),
            limit: limits.max_path_len as u64,
            key: "max_path_len",
        });
    }
    if raw.contains(&0) {
        return Err(hostile(path, "its path contains a NUL byte"));
    }
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(hostile(path, "absolute paths are not allowed"));
            }
            Component::ParentDir => return Err(hostile(path, "`..` in paths is not allowed")),
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// Validates a symlink target: relative, normalised, and not above the root from `link`.
pub(super) fn check_link_target(link: &Path, target: &[u8]) -> Result<PathBuf, UnpackError> {
    let target_path = Path::new(OsStr::from_bytes(target));
    if target.is_empty() {
        return Err(hostile(link, "symlink with an empty target"));
    }
    if target.contains(&0) {
        return Err(hostile(link, "symlink target contains a NUL byte"));
    }
    let depth = link.components().count() - 1;
    let mut ups = 0usize;
    let mut seen_normal = false;
    let mut out = PathBuf::new();
    for c in target_path.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {
                return Err(hostile(
                    link,
                    format!("symlink to absolute path {target_path:?} leaves the release"),
                ));
            }
            Component::CurDir => {}
            Component::ParentDir if seen_normal => {
                return Err(hostile(
                    link,
                    format!(
                        "symlink target {target_path:?} has `..` after a name; write it normalised"
                    ),
                ));
            }
            Component::ParentDir => {
                ups += 1;
                if ups > depth {
                    return Err(hostile(
                        link,
                        format!("symlink to {target_path:?} leaves the release"),
                    ));
                }
                out.push("..");
            }
            Component::Normal(p) => {
                seen_normal = true;
                out.push(p);
            }
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    Ok(out)
}

/// The mode a member gets: permission bits only, group/other write cleared unless configured
/// otherwise (as Python's `data` extraction filter does).
pub(super) fn effective_mode(mode: u32, limits: &Limits) -> u32 {
    let mode = mode & 0o777;
    if limits.keep_group_world_write {
        mode
    } else {
        mode & !0o022
    }
}

/// Sets a file's modification time from the archive, best effort: times before 1970 are
/// kept, times the system cannot represent are left alone.
pub(super) fn set_mtime(file: &File, mtime: Option<i64>) {
    let Some(t) = mtime else { return };
    let when = if t >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(t.unsigned_abs()))
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(t.unsigned_abs()))
    };
    if let Some(when) = when {
        // As tar's own `-m` shows, mtimes are not essential; a refusal is not an error.
        let _ = file.set_modified(when);
    }
}

/// Tracks which directories of the tree are known to be real directories.
pub(super) struct Tree<'a> {
    pub root: &'a Path,
    pub dirs: HashSet<PathBuf>,
}

impl Tree<'_> {
    /// Makes sure every ancestor of `rel` is a real directory, creating missing ones.
    pub(super) fn ensure_parent(&mut self, rel: &Path) -> Result<(), UnpackError> {
        let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) else {
            return Ok(());
        };
        if self.dirs.contains(parent) {
            return Ok(());
        }
        let mut sofar = PathBuf::new();
        for c in parent.components() {
            sofar.push(c);
            if self.dirs.contains(&sofar) {
                continue;
            }
            let abs = self.root.join(&sofar);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(hostile(
                        rel,
                        format!("its parent {sofar:?} is not a directory"),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&abs).map_err(io_err("create directory", &abs))?;
                }
                Err(e) => return Err(io_err("inspect", &abs)(e)),
            }
            self.dirs.insert(sofar.clone());
        }
        Ok(())
    }

    /// Creates (or, for a later member of the same name, replaces) the regular file `rel`,
    /// opened so that it can only be a new file in a real directory.
    pub(super) fn create_file(&mut self, rel: &Path) -> Result<(PathBuf, File), UnpackError> {
        self.ensure_parent(rel)?;
        if self.dirs.contains(rel) {
            return Err(hostile(rel, "a file would replace a directory"));
        }
        let abs = self.root.join(rel);
        match fs::symlink_metadata(&abs) {
            // A later entry for the same file replaces it, as tar does.
            Ok(m) if m.is_file() => fs::remove_file(&abs).map_err(io_err("replace", &abs))?,
            Ok(_) => return Err(hostile(rel, "a file would replace a directory or link")),
            Err(_) => {}
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&abs)
            .map_err(io_err("create", &abs))?;
        Ok((abs, file))
    }

    /// A directory member.
    pub(super) fn create_dir(&mut self, rel: &Path) -> Result<PathBuf, UnpackError> {
        self.ensure_parent(rel)?;
        let abs = self.root.join(rel);
        match fs::symlink_metadata(&abs) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(hostile(rel, "a directory would replace a file")),
            Err(_) => fs::create_dir(&abs).map_err(io_err("create directory", &abs))?,
        }
        self.dirs.insert(rel.to_path_buf());
        Ok(abs)
    }

    /// A hardlink member: only to a regular file already unpacked.
    pub(super) fn hard_link(&mut self, rel: &Path, target: &Path) -> Result<(), UnpackError> {
        self.ensure_parent(target)?;
        let target_abs = self.root.join(target);
        match fs::symlink_metadata(&target_abs) {
            Ok(m) if m.is_file() => {}
            _ => {
                return Err(hostile(
                    rel,
                    format!(
                        "hardlink to {target:?}, which is not a regular file unpacked before it"
                    ),
                ));
            }
        }
        self.ensure_parent(rel)?;
        let abs = self.root.join(rel);
        if fs::symlink_metadata(&abs).is_ok() {
            return Err(hostile(rel, "a hardlink would replace an existing entry"));
        }
        fs::hard_link(&target_abs, &abs).map_err(io_err("create hardlink", &abs))
    }

    /// A symlink, created after every other member.
    pub(super) fn symlink(&mut self, rel: &Path, target: &Path) -> Result<(), UnpackError> {
        self.ensure_parent(rel)?;
        let abs = self.root.join(rel);
        if fs::symlink_metadata(&abs).is_ok() {
            return Err(hostile(rel, "a symlink would replace an existing entry"));
        }
        std::os::unix::fs::symlink(target, &abs).map_err(io_err("create symlink", &abs))
    }
}

/// Sets a written file's mode and modification time.
pub(super) fn finish_file(
    file: &mut File,
    abs: &Path,
    mode: u32,
    mtime: Option<i64>,
) -> Result<(), UnpackError> {
    file.flush().map_err(io_err("write", abs))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("set the mode of", abs))?;
    set_mtime(file, mtime);
    Ok(())
}
