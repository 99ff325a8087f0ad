//! Unpack: a streamed archive into a fresh staging directory, refusing anything hostile.
//!
//! The compression is detected from magic bytes (gzip, zstd, or a plain tar), so the key's
//! suffix does not matter. The archive is read as it downloads; nothing lands on disk but the
//! unpacked tree.
//!
//! Refused, with exit code 65 and the entry named: absolute paths, `..` components, symlinks
//! whose target is absolute or leaves the release, hardlinks to anything but a regular file
//! already unpacked inside the release, device, fifo and unknown entry types, an entry whose
//! parent is not a directory, and archives over the entry, byte or path-length limits. setuid,
//! setgid and sticky bits are stripped; archive owners are never applied; directories are
//! always left writable by their owner so retention can remove them.
//!
//! The rules are enforced by construction rather than by checking paths after the fact:
//! - every ancestor of every entry must be a real directory (created by us or by an earlier
//!   directory entry), checked with `lstat`, and files are opened `O_CREAT|O_EXCL|O_NOFOLLOW`;
//! - symlinks are created only after every other entry, so no write ever goes through one;
//! - a symlink target must be relative and normalised (`..` only at its start), and may not
//!   climb above the release root from the link's own directory. Every link therefore points
//!   inside the tree, and following a chain of links stays inside too.
//!
//! After the last tar entry the decompressor is read to its end, so a truncated or corrupt
//! gzip/zstd stream is detected by its checksum even when the tar part looked complete.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, BufReader, Cursor, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

pub use crate::contract::host::{Compression, Stats};
use crate::error::exit_codes;

/// Size limits on one archive.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Archive entries.
    pub max_entries: u64,
    /// Bytes of file content.
    pub max_bytes: u64,
    /// Bytes in one entry's path.
    pub max_path_len: usize,
}

/// The archive was refused or is broken (exit 65), or the tree could not be written.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry deployd refuses (escapes the release, device node, …).
    #[error("refusing archive entry {entry:?}: {reason}")]
    Hostile {
        /// The archive entry.
        entry: String,
        /// Why, as one clause.
        reason: String,
    },
    /// Over an `[unpack]` limit.
    #[error("refusing archive: {what} (limit {limit} set by [unpack] {key})")]
    Limit {
        /// Which field.
        what: String,
        /// The limit.
        limit: u64,
        /// The `[unpack]` config key that sets it.
        key: &'static str,
    },
    /// Not gzip, zstd or tar.
    #[error("the artifact is not a gzip, zstd or tar archive (it starts with {magic})")]
    NotAnArchive {
        /// The first bytes, in hex.
        magic: String,
    },
    /// A broken stream or tar structure.
    #[error("the archive is corrupt or truncated: {reason}")]
    Corrupt {
        /// Why, as one clause.
        reason: String,
    },
    /// Writing the tree failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

exit_codes!(UnpackError {
    Io { .. } => SOFTWARE,
    _ => DATAERR,
});

fn hostile(entry: &Path, reason: impl Into<String>) -> UnpackError {
    UnpackError::Hostile {
        entry: entry.to_string_lossy().into_owned(),
        reason: reason.into(),
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Reads from the archive stream; read failures there mean a corrupt or cut-off stream.
fn corrupt(e: io::Error) -> UnpackError {
    UnpackError::Corrupt {
        reason: e.to_string(),
    }
}

/// Detects the compression from the first bytes and returns a reader over the whole stream.
fn sniff<R: Read>(mut reader: R) -> Result<(Compression, impl Read), UnpackError> {
    let mut head = Vec::with_capacity(512);
    (&mut reader)
        .take(512)
        .read_to_end(&mut head)
        .map_err(corrupt)?;
    let compression = if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if head.len() == 512 && looks_like_tar(&head) {
        Compression::None
    } else {
        let magic: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(UnpackError::NotAnArchive {
            magic: if magic.is_empty() {
                "nothing: it is empty".into()
            } else {
                magic.join(" ")
            },
        });
    };
    Ok((compression, Cursor::new(head).chain(reader)))
}

/// A ustar/GNU magic, or a valid header checksum for old v7 archives.
fn looks_like_tar(block: &[u8]) -> bool {
    if &block[257..262] == b"ustar" {
        return true;
    }
    let mut header = tar::Header::new_old();
    header.as_mut_bytes().copy_from_slice(&block[..512]);
    let Ok(stored) = header.cksum() else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    stored == sum && block[0] != 0
}

/// Unpacks the archive read from `reader` into `dest`, which must be an empty directory.
pub fn unpack<R: Read>(
    reader: R,
    dest: &Path,
    limits: &Limits,
) -> Result<(Compression, Stats), UnpackError> {
    let (compression, raw) = sniff(reader)?;
    let stats = match compression {
        Compression::Gzip => extract(flate2::read::MultiGzDecoder::new(raw), dest, limits)?,
        Compression::Zstd => {
            let decoder = zstd::stream::read::Decoder::new(raw).map_err(corrupt)?;
            extract(decoder, dest, limits)?
        }
        Compression::None => extract(raw, dest, limits)?,
    };
    Ok((compression, stats))
}

/// Normalises an entry path: relative, no `..`, `.` removed. `None` for the root itself.
fn entry_path(raw: &[u8], limits: &Limits) -> Result<Option<PathBuf>, UnpackError> {
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
fn check_link_target(link: &Path, target: &[u8]) -> Result<PathBuf, UnpackError> {
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

/// Tracks which directories of the tree are known to be real directories.
struct Tree<'a> {
    root: &'a Path,
    dirs: HashSet<PathBuf>,
}

impl Tree<'_> {
    /// Makes sure every ancestor of `rel` is a real directory, creating missing ones.
    fn ensure_parent(&mut self, rel: &Path) -> Result<(), UnpackError> {
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
}

/// The tar part, over a decompressed stream.
fn extract<R: Read>(decoded: R, dest: &Path, limits: &Limits) -> Result<Stats, UnpackError> {
    let mut archive = tar::Archive::new(BufReader::with_capacity(128 << 10, decoded));
    let mut tree = Tree {
        root: dest,
        dirs: HashSet::new(),
    };
    let mut stats = Stats::default();
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    let mut symlinks: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut buf = vec![0u8; 256 << 10];

    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            continue;
        }
        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(UnpackError::Limit {
                what: format!("more than {} entries", limits.max_entries),
                limit: limits.max_entries,
                key: "max_entries",
            });
        }
        let raw_path = entry.path_bytes().into_owned();
        let Some(rel) = entry_path(&raw_path, limits)? else {
            continue; // "./" itself
        };
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let abs = dest.join(&rel);
        match kind {
            tar::EntryType::Directory => {
                tree.ensure_parent(&rel)?;
                match fs::symlink_metadata(&abs) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return Err(hostile(&rel, "a directory would replace a file")),
                    Err(_) => fs::create_dir(&abs).map_err(io_err("create directory", &abs))?,
                }
                tree.dirs.insert(rel.clone());
                dir_modes.push((abs, mode | 0o700));
                stats.dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(corrupt)?;
                stats.bytes = stats.bytes.saturating_add(size);
                if stats.bytes > limits.max_bytes {
                    return Err(UnpackError::Limit {
                        what: format!("more than {} bytes of content", limits.max_bytes),
                        limit: limits.max_bytes,
                        key: "max_bytes",
                    });
                }
                tree.ensure_parent(&rel)?;
                if tree.dirs.contains(&rel) {
                    return Err(hostile(&rel, "a file would replace a directory"));
                }
                match fs::symlink_metadata(&abs) {
                    // A later entry for the same file replaces it, as tar does.
                    Ok(m) if m.is_file() => {
                        fs::remove_file(&abs).map_err(io_err("replace", &abs))?
                    }
                    Ok(_) => return Err(hostile(&rel, "a file would replace a directory or link")),
                    Err(_) => {}
                }
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&abs)
                    .map_err(io_err("create", &abs))?;
                let mut left = size;
                while left > 0 {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = entry.read(&mut buf[..want]).map_err(corrupt)?;
                    if n == 0 {
                        return Err(UnpackError::Corrupt {
                            reason: format!("{rel:?} ends before its {size} bytes"),
                        });
                    }
                    file.write_all(&buf[..n]).map_err(io_err("write", &abs))?;
                    left -= n as u64;
                }
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_err("set the mode of", &abs))?;
                if let Ok(mtime) = entry.header().mtime() {
                    // Best effort, as tar's own `-m` shows mtimes are not essential.
                    let _ = file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime));
                }
                stats.files += 1;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| hostile(&rel, "symlink without a target"))?
                    .into_owned();
                let target = check_link_target(&rel, &target)?;
                symlinks.push((rel, target));
            }
            tar::EntryType::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .ok_or_else(|| hostile(&rel, "hardlink without a target"))?
                    .into_owned();
                let target = entry_path(&target_raw, limits)?
                    .ok_or_else(|| hostile(&rel, "hardlink to the release root"))?;
                tree.ensure_parent(&target)?;
                let target_abs = dest.join(&target);
                match fs::symlink_metadata(&target_abs) {
                    Ok(m) if m.is_file() => {}
                    _ => {
                        return Err(hostile(
                            &rel,
                            format!(
                                "hardlink to {target:?}, which is not a regular file unpacked before it"
                            ),
                        ));
                    }
                }
                tree.ensure_parent(&rel)?;
                if fs::symlink_metadata(&abs).is_ok() {
                    return Err(hostile(&rel, "a hardlink would replace an existing entry"));
                }
                fs::hard_link(&target_abs, &abs).map_err(io_err("create hardlink", &abs))?;
                stats.hardlinks += 1;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(hostile(&rel, "device nodes are not allowed"));
            }
            tar::EntryType::Fifo => return Err(hostile(&rel, "fifos are not allowed")),
            other => {
                return Err(hostile(
                    &rel,
                    format!("entry type {:?} is not supported", other.as_byte() as char),
                ));
            }
        }
    }

    for (rel, target) in symlinks {
        tree.ensure_parent(&rel)?;
        let abs = dest.join(&rel);
        if fs::symlink_metadata(&abs).is_ok() {
            return Err(hostile(&rel, "a symlink would replace an existing entry"));
        }
        std::os::unix::fs::symlink(&target, &abs).map_err(io_err("create symlink", &abs))?;
        stats.symlinks += 1;
    }
    for (abs, mode) in dir_modes.into_iter().rev() {
        fs::set_permissions(&abs, fs::Permissions::from_mode(mode))
            .map_err(io_err("set the mode of", &abs))?;
    }

    // Read the decompressor to its end: a cut-off gzip/zstd stream fails its checksum here even
    // when the tar part ended cleanly, and trailing garbage is refused.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| UnpackError::Corrupt {
        reason: format!("after the last entry: {e}"),
    })?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ExitCode;

    #[test]
    fn link_targets() {
        let ok = |l: &str, t: &str| check_link_target(Path::new(l), t.as_bytes());
        assert_eq!(ok("a/b/l", "../c").unwrap(), PathBuf::from("../c"));
        assert_eq!(ok("l", "./x/y").unwrap(), PathBuf::from("x/y"));
        assert!(ok("l", "../x").is_err());
        assert!(ok("a/l", "../../x").is_err());
        assert!(ok("l", "/etc/passwd").is_err());
        assert!(ok("l", "x/../../y").is_err());
        assert!(ok("l", "").is_err());
    }

    #[test]
    fn entry_paths() {
        let limits = Limits {
            max_entries: 10,
            max_bytes: 10,
            max_path_len: 20,
        };
        assert_eq!(
            entry_path(b"./a/b", &limits).unwrap(),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(entry_path(b"./", &limits).unwrap(), None);
        assert!(entry_path(b"/abs", &limits).is_err());
        assert!(entry_path(b"a/../../b", &limits).is_err());
        assert!(matches!(
            entry_path(&[b'a'; 30], &limits),
            Err(UnpackError::Limit { .. })
        ));
    }

    #[test]
    fn not_an_archive_shows_its_magic() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_entries: 10,
            max_bytes: 1 << 20,
            max_path_len: 100,
        };
        let err = unpack(&b"<html>not found</html>"[..], dir.path(), &limits).unwrap_err();
        assert!(err.to_string().contains("3c 68 74 6d"), "{err}");
        assert_eq!(err.exit_code(), 65);
    }
}
