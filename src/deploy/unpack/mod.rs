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
//! setgid and sticky bits are stripped, and so are group and other write bits unless
//! `[unpack] keep_group_world_write` is set; archive owners are never applied; directories are
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
//! The tar stream is read under hard caps (see `stream`): an extension header (PAX record set,
//! GNU long name) holds at most 1 MiB, the decompressed stream at most `max_bytes` plus a small
//! allowance per entry, zstd frames a 32 MiB window, and after the end-of-archive marker only
//! zero padding up to one record may follow before the compressed stream ends (where a cut-off
//! or corrupt gzip/zstd stream fails its checksum). Memory stays flat whatever the archive
//! holds. Where the archive is benign the tree is the one GNU tar extracts: the PAX `size`,
//! `path` and `linkpath` records apply, a regular file named `dir/` is a directory, times
//! before 1970 are kept; what GNU tar, Python and Go would read differently (sparse files, two
//! PAX headers for one member, a directory carrying data) is refused.

mod stream;
mod tree;

use std::collections::HashSet;
use std::fs;
use std::io::{self, Cursor, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use stream::{Kind, TarStream};
use tree::{Tree, check_link_target, entry_path, hostile, io_err};

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
    /// Keep group and other write bits from the archive (cleared by default).
    pub keep_group_world_write: bool,
}

/// The largest zstd window accepted, as a power of two (32 MiB; `zstd -19` uses 8 MiB).
pub(crate) const ZSTD_WINDOW_LOG_MAX: u32 = 25;

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
    /// Over one of deployd's fixed caps, or ambiguous to tar implementations.
    #[error("refusing archive: {reason}")]
    Refused {
        /// Why, as one clause.
        reason: String,
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
    &block[257..262] == b"ustar" || (block[0] != 0 && stream::checksum_ok(block))
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
            let mut decoder = zstd::stream::read::Decoder::new(raw).map_err(corrupt)?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(corrupt)?;
            extract(decoder, dest, limits)?
        }
        Compression::None => extract(raw, dest, limits)?,
    };
    Ok((compression, stats))
}

/// The most decompressed bytes an archive within `limits` can need.
fn stream_cap(limits: &Limits) -> u64 {
    limits
        .max_bytes
        .saturating_add(
            limits
                .max_entries
                .saturating_mul(stream::OVERHEAD_PER_ENTRY),
        )
        .saturating_add(stream::MAX_EXTENSION_BYTES)
        .saturating_add(stream::MAX_TRAILING_ZEROS)
}

/// The tar part, over a decompressed stream.
fn extract<R: Read>(decoded: R, dest: &Path, limits: &Limits) -> Result<Stats, UnpackError> {
    let mut tar = TarStream::new(decoded, stream_cap(limits), limits.max_bytes);
    let mut tree = Tree {
        root: dest,
        dirs: HashSet::new(),
    };
    let mut stats = Stats::default();
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    let mut symlinks: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut buf = vec![0u8; 256 << 10];

    while let Some(member) = tar.next_member()? {
        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(UnpackError::Limit {
                what: format!("more than {} entries", limits.max_entries),
                limit: limits.max_entries,
                key: "max_entries",
            });
        }
        let Some(rel) = entry_path(&member.path, limits)? else {
            continue; // "./" itself
        };
        member.check_no_data()?;
        let mode = tree::effective_mode(member.mode, limits);
        match member.kind {
            Kind::Dir => {
                let abs = tree.create_dir(&rel)?;
                dir_modes.push((abs, mode | 0o700));
                stats.dirs += 1;
            }
            Kind::File => {
                let size = member.size;
                stats.bytes = stats.bytes.saturating_add(size);
                if stats.bytes > limits.max_bytes {
                    return Err(UnpackError::Limit {
                        what: format!("more than {} bytes of content", limits.max_bytes),
                        limit: limits.max_bytes,
                        key: "max_bytes",
                    });
                }
                let (abs, mut file) = tree.create_file(&rel)?;
                loop {
                    let n = tar.read_data(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&buf[..n]).map_err(io_err("write", &abs))?;
                }
                tree::finish_file(&mut file, &abs, mode, member.mtime)?;
                stats.files += 1;
            }
            Kind::Symlink => {
                if member.link.is_empty() {
                    return Err(hostile(&rel, "symlink without a target"));
                }
                let target = check_link_target(&rel, &member.link)?;
                symlinks.push((rel, target));
            }
            Kind::Hardlink => {
                if member.link.is_empty() {
                    return Err(hostile(&rel, "hardlink without a target"));
                }
                let target = entry_path(&member.link, limits)?
                    .ok_or_else(|| hostile(&rel, "hardlink to the release root"))?;
                tree.hard_link(&rel, &target)?;
                stats.hardlinks += 1;
            }
            Kind::Char | Kind::Block => {
                return Err(hostile(&rel, "device nodes are not allowed"));
            }
            Kind::Fifo => return Err(hostile(&rel, "fifos are not allowed")),
            Kind::Other(flag) => {
                return Err(hostile(
                    &rel,
                    format!("entry type {:?} is not supported", flag as char),
                ));
            }
        }
    }

    for (rel, target) in symlinks {
        tree.symlink(&rel, &target)?;
        stats.symlinks += 1;
    }
    for (abs, mode) in dir_modes.into_iter().rev() {
        fs::set_permissions(&abs, fs::Permissions::from_mode(mode))
            .map_err(io_err("set the mode of", &abs))?;
    }
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
            keep_group_world_write: false,
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
            keep_group_world_write: false,
        };
        let err = unpack(&b"<html>not found</html>"[..], dir.path(), &limits).unwrap_err();
        assert!(err.to_string().contains("3c 68 74 6d"), "{err}");
        assert_eq!(err.exit_code(), 65);
    }
}
