//! Durable file operations shared by every module that writes to disk.
//!
//! - [`write_atomic`]: temporary file, fsync, rename, fsync of the directory: a crash or a power
//!   loss leaves either the old or the new file, never half of one.
//! - [`sync_dir`]: makes renames and creations in a directory durable; [`sync_filesystem`]
//!   flushes a whole unpacked tree at once.
//! - [`remove_tree`]: removes a directory tree or a file, without following a symlink.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

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
///
/// The temporary file gets an unpredictable name and is created relative to the opened
/// directory with `O_CREAT|O_EXCL|O_NOFOLLOW`, so that another user who can write to the
/// directory (a shared textfile-collector directory, say) can neither pre-create it nor plant
/// a symlink that redirects the write; the rename replaces a symlink at `path` rather than
/// following it.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let dir_path = path.parent().unwrap_or(Path::new("."));
    let dir_path = if dir_path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir_path
    };
    let name = path.file_name().ok_or_else(|| FileError {
        action: "write",
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
    })?;
    let dir = open_dir(dir_path).map_err(FileError::on("open the directory", dir_path))?;
    let (tmp_name, file) = create_new_in(&dir, &format!(".{}", name.to_string_lossy()), mode)
        .map_err(FileError::on("create a temporary file in", dir_path))?;
    let tmp = dir_path.join(&tmp_name);
    let written = (|| {
        let mut f = file;
        // The mode is set explicitly: the unit's UMask must not make status.json unreadable.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(FileError::on("set the mode of", &tmp))?;
        f.write_all(bytes).map_err(FileError::on("write", &tmp))?;
        f.sync_all().map_err(FileError::on("sync", &tmp))?;
        drop(f);
        nix::fcntl::renameat(&dir, tmp_name.as_str(), &dir, name)
            .map_err(|e| FileError::on("replace", path)(io::Error::from(e)))
    })();
    if written.is_err() {
        // A full disk must not also leave a half-written temporary file taking space.
        let _ = nix::unistd::unlinkat(
            &dir,
            tmp_name.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
    written?;
    File::from(dir)
        .sync_all()
        .map_err(FileError::on("sync", dir_path))
}

/// Opens a directory for `*at` calls.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// An unpredictable suffix for temporary names: SipHash keyed from the operating system's
/// randomness (std's `RandomState`), over a counter.
fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// Creates a new file named `<prefix>.<random>.tmp` in `dir` with `O_EXCL|O_NOFOLLOW`,
/// retrying on a name collision; returns its name and the open file.
pub fn create_new_in(dir: &OwnedFd, prefix: &str, mode: u32) -> io::Result<(String, File)> {
    let mut tries = 0;
    loop {
        let name = format!("{prefix}.{}.tmp", random_suffix());
        match nix::fcntl::openat(
            dir,
            name.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode & 0o777),
        ) {
            Ok(fd) => return Ok((name, File::from(fd))),
            Err(nix::errno::Errno::EEXIST) if tries < 16 => tries += 1,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_a_planted_symlink_and_leaves_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let path = dir.path().join("deployd.prom");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        // What the old predictable temporary name would have been, pre-planted.
        let old_tmp = dir
            .path()
            .join(format!(".deployd.prom.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &old_tmp).unwrap();
        write_atomic(&path, b"metrics", 0o644).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert!(!fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(fs::read(&path).unwrap(), b"metrics");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 3, "no temporary file left: {left:?}");
    }
}
