//! Paths beneath the release directory with no symlink component, resolved by the kernel.
//!
//! A bind mount names a path, and Docker follows symlinks in it when it mounts. So every bind
//! source is resolved again, immediately before each container create and start, with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from the release directory (Linux ≥ 5.6);
//! where `openat2` is missing (`ENOSYS`, or a seccomp filter that says `EPERM`) a walk opens one
//! component at a time with `O_PATH | O_NOFOLLOW` and refuses any symlink. The path handed to
//! Docker is the canonical release directory joined with the checked relative path: no
//! `/proc/self/fd` indirection (Docker resolves paths in its own process).
//!
//! The same walk creates the empty mount points that nested mounts need inside a read-only
//! release bind (`./:/app:ro` with an anonymous volume at `/app/node_modules`): the engine cannot
//! create them through a read-only mount.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat, openat2};
use nix::sys::stat::{Mode, SFlag, fstat, mkdirat};

/// What a resolved path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A directory.
    Dir,
    /// Anything else (a regular file, mostly).
    File,
}

/// Why a path could not be resolved beneath the release directory.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BeneathError {
    /// A component does not exist.
    #[error("it does not exist in the release")]
    Missing,
    /// A component is a symlink.
    #[error("a component of it is a symlink, and release binds never follow symlinks")]
    Symlink,
    /// It leads outside the release directory.
    #[error("it leads outside the release directory")]
    Escapes,
    /// Anything else the kernel said.
    #[error("{0}")]
    Io(#[from] Errno),
}

/// Which resolver runs on this host: `openat2`, or the component walk where it is missing.
pub fn method() -> &'static str {
    if openat2_available() {
        "openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)"
    } else {
        "openat(O_PATH|O_NOFOLLOW) walk"
    }
}

fn openat2_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let probe = open(".", dir_flags(), Mode::empty())
            .map_err(BeneathError::from)
            .and_then(|root| kernel_resolve(&root, Path::new(".")));
        let available = !matches!(probe, Err(BeneathError::Io(Errno::ENOSYS | Errno::EPERM)));
        tracing::info!(
            resolver = if available { "openat2" } else { "openat walk" },
            "release bind sources are resolved without following symlinks"
        );
        available
    })
}

fn dir_flags() -> OFlag {
    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC
}

/// The release directory, canonical, and `source` (an absolute path lexically inside it) as the
/// path to hand to Docker, after checking that `source` exists beneath it with no symlink.
pub(crate) fn checked_bind(
    release_dir: &Path,
    source: &Path,
) -> Result<(PathBuf, Kind), BeneathError> {
    let rel = source
        .strip_prefix(release_dir)
        .map_err(|_| BeneathError::Escapes)?;
    let root = release_dir
        .canonicalize()
        .map_err(|e| BeneathError::Io(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    let kind = resolve(&root, rel)?;
    Ok((root.join(rel), kind))
}

/// Resolve `rel` beneath the directory `root`, refusing symlinks, `..` and absolute paths.
pub(crate) fn resolve(root: &Path, rel: &Path) -> Result<Kind, BeneathError> {
    let root_fd = open(root, dir_flags(), Mode::empty())?;
    let fd = if openat2_available() {
        kernel_resolve(&root_fd, rel)?
    } else {
        walk(root_fd, rel, None)?
    };
    kind_of(&fd)
}

/// Make sure `rel` exists beneath `root` (a checked directory), creating missing directories,
/// and the last component as an empty file when `last_is_file`; never through a symlink.
pub(crate) fn create(root: &Path, rel: &Path, last_is_file: bool) -> Result<(), BeneathError> {
    let root_fd = open(root, dir_flags(), Mode::empty())?;
    walk(root_fd, rel, Some(last_is_file)).map(drop)
}

/// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, retried when a concurrent rename
/// makes the kernel answer `EAGAIN`.
fn kernel_resolve(root: &OwnedFd, rel: &Path) -> Result<OwnedFd, BeneathError> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let mut attempts = 0;
    loop {
        match openat2(root, rel, how) {
            Ok(fd) => return Ok(fd),
            Err(Errno::EAGAIN) if attempts < 8 => attempts += 1,
            Err(Errno::ELOOP) => return Err(BeneathError::Symlink),
            Err(Errno::EXDEV) => return Err(BeneathError::Escapes),
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Err(BeneathError::Missing),
            Err(e) => return Err(BeneathError::Io(e)),
        }
    }
}

/// Open `rel` one component at a time from `dir` with `O_NOFOLLOW`; with `create`, missing
/// components are made (directories, and the last one a file when `create == Some(true)`).
fn walk(mut dir: OwnedFd, rel: &Path, create: Option<bool>) -> Result<OwnedFd, BeneathError> {
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        let name = match part {
            Component::Normal(n) => *n,
            Component::CurDir => continue,
            _ => return Err(BeneathError::Escapes),
        };
        let last = i + 1 == parts.len();
        let opened = openat(
            &dir,
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        );
        let fd = match (opened, create) {
            (Ok(fd), _) => fd,
            (Err(Errno::ENOENT), Some(file)) => {
                if last && file {
                    let flags = OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_WRONLY
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC;
                    drop(openat(&dir, name, flags, Mode::from_bits_truncate(0o644))?);
                } else {
                    mkdirat(&dir, name, Mode::from_bits_truncate(0o755))?;
                }
                openat(
                    &dir,
                    name,
                    OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?
            }
            (Err(Errno::ENOENT), None) => return Err(BeneathError::Missing),
            (Err(e), _) => return Err(BeneathError::Io(e)),
        };
        let mode = SFlag::from_bits_truncate(fstat(&fd)?.st_mode) & SFlag::S_IFMT;
        if mode == SFlag::S_IFLNK {
            return Err(BeneathError::Symlink);
        }
        if !last && mode != SFlag::S_IFDIR {
            return Err(BeneathError::Missing);
        }
        dir = fd;
    }
    Ok(dir)
}

fn kind_of(fd: &OwnedFd) -> Result<Kind, BeneathError> {
    let mode = SFlag::from_bits_truncate(fstat(fd)?.st_mode) & SFlag::S_IFMT;
    Ok(if mode == SFlag::S_IFDIR {
        Kind::Dir
    } else {
        Kind::File
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_anywhere_are_refused_and_plain_paths_resolve() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("app/data")).unwrap();
        std::fs::write(r.join("app/conf.txt"), "x").unwrap();
        symlink("/", r.join("app/rootlink")).unwrap();
        symlink("data", r.join("app/inner")).unwrap();
        assert_eq!(resolve(r, Path::new("app/data")).unwrap(), Kind::Dir);
        assert_eq!(resolve(r, Path::new("app/conf.txt")).unwrap(), Kind::File);
        assert_eq!(resolve(r, Path::new("")).unwrap(), Kind::Dir);
        for bad in [
            "app/rootlink",
            "app/rootlink/etc",
            "app/inner",
            "app/inner/x",
        ] {
            assert!(
                matches!(resolve(r, Path::new(bad)), Err(BeneathError::Symlink)),
                "{bad}: {:?}",
                resolve(r, Path::new(bad))
            );
        }
        assert!(matches!(
            resolve(r, Path::new("app/none")),
            Err(BeneathError::Missing)
        ));
        assert!(matches!(
            resolve(r, Path::new("../x")),
            Err(BeneathError::Escapes)
        ));
        // The fallback walk agrees with the kernel.
        let fd = open(r, dir_flags(), Mode::empty()).unwrap();
        assert!(matches!(
            walk(fd, Path::new("app/inner/x"), None),
            Err(BeneathError::Symlink)
        ));
    }

    #[test]
    fn mount_points_are_created_but_never_through_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        create(r, Path::new("a/b/node_modules"), false).unwrap();
        assert!(r.join("a/b/node_modules").is_dir());
        create(r, Path::new("a/secret.txt"), true).unwrap();
        assert!(r.join("a/secret.txt").is_file());
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), r.join("a/out")).unwrap();
        assert!(matches!(
            create(r, Path::new("a/out/planted"), false),
            Err(BeneathError::Symlink)
        ));
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        let (path, kind) = checked_bind(r, &r.join("a/b")).unwrap();
        assert_eq!(
            (path, kind),
            (r.canonicalize().unwrap().join("a/b"), Kind::Dir)
        );
    }
}
