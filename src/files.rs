//! Durable file operations shared by every module that writes to disk.
//!
//! - [`write_atomic`]: temporary file, fsync, rename, fsync of the directory: a crash or a power
//!   loss leaves either the old or the new file, never half of one.
//! - [`sync_dir`]: makes renames and creations in a directory durable; [`sync_filesystem`]
//!   flushes a whole unpacked tree at once.
//! - [`remove_tree`]: removes a directory tree or a file, without following a symlink.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A file operation that failed, naming the action and the path (and, when the disk is full,
/// how much space its filesystem has left).
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}{}", no_space_note(.path, .source))]
pub struct FileError {
    /// What was being done, as a verb: "create", "write", "replace", …
    pub action: &'static str,
    /// The path it was done to.
    pub path: PathBuf,
    /// The operating system's error.
    #[source]
    pub source: io::Error,
}

impl FileError {
    /// A closure that wraps an `io::Error` from `action` on `path`.
    pub fn on<'a>(
        action: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> FileError + 'a {
        move |source| FileError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Writes `bytes` to `path` atomically and durably, with permissions `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(FileError::on("create", &tmp))?;
        // The mode is set explicitly: the unit's UMask must not make status.json unreadable.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(FileError::on("set the mode of", &tmp))?;
        f.write_all(bytes).map_err(FileError::on("write", &tmp))?;
        f.sync_all().map_err(FileError::on("sync", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(FileError::on("replace", path))
    })();
    if written.is_err() {
        // A full disk must not also leave a half-written temporary file taking space.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir).map_err(FileError::on("sync", dir))
}

/// True when `e` says the filesystem (or the user's quota on it) is full.
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Bytes available to deployd on the filesystem holding `path` (or its nearest existing
/// ancestor).
pub fn free_space(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let st = nix::sys::statvfs::statvfs(existing).ok()?;
    Some(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// `1.5 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// `; <free> free on its filesystem` after an out-of-space error, else nothing.
fn no_space_note(path: &Path, e: &io::Error) -> String {
    match free_space(path) {
        Some(free) if is_no_space(e) => format!(
            "; {} free on its filesystem: free some space and deploy again",
            human_bytes(free)
        ),
        _ => String::new(),
    }
}

/// fsyncs a directory, making renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Flushes the whole filesystem holding `path` (one `syncfs(2)`, much cheaper than an fsync
/// per file of a freshly unpacked tree).
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    nix::unistd::syncfs(&f).map_err(io::Error::from)
}

/// Removes a directory tree (or a file, or a symlink itself) if it exists.
pub fn remove_tree(path: &Path) -> Result<(), FileError> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(FileError::on("remove", path))
}
