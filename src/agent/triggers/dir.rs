//! The trigger directory: scanning, validating, consuming and rejecting trigger files, and
//! the inotify watch that notices new ones.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, DirBuilder, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, UnlinkatFlags, chown, unlinkat};
use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode};
use tokio::sync::mpsc;

use super::file::unique_suffix;
use super::{
    DEFAULT_DIR_MODE, MAX_TRIGGER_FILE_SIZE, REJECTED_DIR, Trigger, TriggerError, TriggerOrigin,
};

/// Capacity of the channel returned by [`TriggerDir::watch`].
const CHANNEL_CAPACITY: usize = 64;

/// Why a trigger file was moved aside; displays as one clause.
#[derive(Debug)]
enum Rejection {
    Symlink,
    NotRegular(&'static str),
    Owner { uid: u32, gid: u32, trusted: String },
    HardLinks(u64),
    TooLarge(u64),
    Unreadable(io::Error),
    NotUtf8,
    Invalid(String),
    DowngradeNotRoot(u32),
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Symlink => f.write_str("it is a symbolic link, and only regular files are read"),
            Self::NotRegular(kind) => write!(f, "it is a {kind}, not a regular file"),
            Self::Owner { uid, gid, trusted } => write!(
                f,
                "it is owned by uid {uid} and gid {gid}, but only {trusted} may drop trigger files"
            ),
            Self::HardLinks(n) => write!(
                f,
                "it has {n} hard links; write the file in place or rename it into the directory instead of linking it"
            ),
            Self::TooLarge(size) => write!(
                f,
                "it is {size} bytes long, over the {MAX_TRIGGER_FILE_SIZE}-byte limit"
            ),
            Self::Unreadable(e) => write!(f, "it could not be read ({e})"),
            Self::NotUtf8 => f.write_str("it is not UTF-8 text"),
            Self::Invalid(reason) => f.write_str(reason),
            Self::DowngradeNotRoot(uid) => write!(
                f,
                "it sets allow_downgrade but is owned by uid {uid}; only root may allow a downgrade"
            ),
        }
    }
}

/// What became of one directory entry.
enum Outcome {
    Accepted(Trigger),
    Rejected,
    Gone,
}

/// The trigger directory: scanning, validating, consuming and rejecting trigger files.
///
/// Cloning is cheap; clones share a lock so a file is never processed twice at once.
#[derive(Debug, Clone)]
pub struct TriggerDir {
    dir: PathBuf,
    trusted_uids: Vec<u32>,
    trusted_gid: Option<u32>,
    lock: Arc<Mutex<()>>,
}

impl TriggerDir {
    /// A trigger directory whose files must be owned by root or by `trusted_gid`.
    pub fn new(dir: PathBuf, trusted_gid: Option<u32>) -> Self {
        Self {
            dir,
            trusted_uids: vec![0],
            trusted_gid,
            lock: Arc::new(Mutex::new(())),
        }
    }

    /// Also trusts files owned by these uids; root stays trusted.
    pub fn with_trusted_uids(mut self, uids: Vec<u32>) -> Self {
        self.trusted_uids = uids;
        if !self.trusted_uids.contains(&0) {
            self.trusted_uids.push(0);
        }
        self
    }

    /// The directory watched.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory (and missing parents) if it does not exist.
    ///
    /// A directory deployd creates gets the configured mode; with a trusted group it also gets
    /// that group and the setgid bit. An existing directory is left as it is, but must be a
    /// real directory, not a symlink.
    pub fn ensure_dir(&self) -> Result<(), TriggerError> {
        match fs::symlink_metadata(&self.dir) {
            Ok(meta) if meta.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(TriggerError::NotADirectory {
                    path: self.dir.clone(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TriggerError::ReadDir {
                    path: self.dir.clone(),
                    source,
                });
            }
        }
        let create_err = |source| TriggerError::CreateDir {
            path: self.dir.clone(),
            source,
        };
        if let Some(parent) = self.dir.parent() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(create_err)?;
        }
        match DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => {}
            // Another process created it in between; that one is as good as ours.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(create_err(e)),
        }
        let mut mode = DEFAULT_DIR_MODE;
        if let Some(gid) = self.trusted_gid {
            chown(&self.dir, None, Some(Gid::from_raw(gid)))
                .map_err(|e| create_err(io::Error::from(e)))?;
            mode |= libc::S_ISGID;
        }
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(mode)).map_err(create_err)?;
        tracing::info!(dir = %self.dir.display(), mode = format_args!("{mode:o}"), "created the trigger directory");
        Ok(())
    }

    /// Processes every trigger file present now, oldest name first.
    ///
    /// Accepted files are removed and returned as triggers; rejected ones are moved aside.
    pub fn scan(&self) -> Result<Vec<Trigger>, TriggerError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let dirfd = self.open_dir()?;
        let mut names = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(|source| TriggerError::ReadDir {
            path: self.dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| TriggerError::ReadDir {
                path: self.dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            if !is_ignored(&name) {
                names.push(name);
            }
        }
        names.sort();
        let mut triggers = Vec::new();
        for name in names {
            if let Outcome::Accepted(trigger) = self.process(&dirfd, &name) {
                triggers.push(trigger);
            }
        }
        Ok(triggers)
    }

    /// Watches the directory and sends a trigger for every accepted file.
    ///
    /// Creates the directory if needed, starts the inotify watch, then scans files already
    /// present (sent first, merged into one trigger). Keep the returned guard alive for as long
    /// as triggers should arrive; dropping it stops the watch.
    pub fn watch(&self) -> Result<(TriggerWatch, mpsc::Receiver<Trigger>), TriggerError> {
        self.ensure_dir()?;
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let this = self.clone();
        let events_tx = tx.clone();
        let watch_err = |source| TriggerError::Watch {
            path: self.dir.clone(),
            source,
        };
        let mut watcher =
            notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
                this.handle_events(result.map(|e| vec![e]).map_err(|e| vec![e]), &events_tx);
            })
            .map_err(watch_err)?;
        notify::Watcher::watch(&mut watcher, &self.dir, RecursiveMode::NonRecursive)
            .map_err(watch_err)?;

        // inotify only reports what happens from now on; pick up what is already here.
        let mut found = self.scan()?.into_iter();
        if let Some(mut first) = found.next() {
            for later in found {
                first.merge(later);
            }
            // The channel is new and empty and its receiver is in hand, so this cannot fail.
            let _ = tx.try_send(first);
        }
        tracing::info!(dir = %self.dir.display(), "watching the trigger directory");
        Ok((TriggerWatch { watcher }, rx))
    }

    /// Runs on the watcher's thread for every event.
    fn handle_events(
        &self,
        result: Result<Vec<notify::Event>, Vec<notify::Error>>,
        tx: &mpsc::Sender<Trigger>,
    ) {
        let events = match result {
            Ok(events) => events,
            Err(errors) => {
                for error in errors {
                    tracing::warn!(dir = %self.dir.display(), error = %error, "the trigger directory watch reported an error; files dropped now are picked up by the next event or restart");
                }
                return;
            }
        };
        let triggers = if events.iter().any(|e| e.need_rescan()) {
            tracing::info!(dir = %self.dir.display(), "inotify lost events; rescanning the trigger directory");
            match self.scan() {
                Ok(triggers) => triggers,
                Err(error) => {
                    tracing::warn!(dir = %self.dir.display(), error = %error, "could not rescan the trigger directory");
                    return;
                }
            }
        } else {
            let mut names = BTreeSet::new();
            for event in &events {
                if let Some(name) = self.candidate(event) {
                    names.insert(name);
                }
            }
            if names.is_empty() {
                return;
            }
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            let dirfd = match self.open_dir() {
                Ok(fd) => fd,
                Err(error) => {
                    tracing::warn!(dir = %self.dir.display(), error = %error, "could not open the trigger directory to read new files");
                    return;
                }
            };
            names
                .iter()
                .filter_map(|name| match self.process(&dirfd, name) {
                    Outcome::Accepted(trigger) => Some(trigger),
                    Outcome::Rejected | Outcome::Gone => None,
                })
                .collect()
        };
        for trigger in triggers {
            // This runs on the watcher's own thread, outside the runtime, so blocking is fine.
            if tx.blocking_send(trigger).is_err() {
                tracing::debug!(dir = %self.dir.display(), "trigger receiver is gone; dropping trigger");
                return;
            }
        }
    }

    /// The file name an event asks deployd to look at, if any.
    fn candidate(&self, event: &notify::Event) -> Option<OsString> {
        let path = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => event.paths.first()?,
            EventKind::Modify(ModifyKind::Name(
                RenameMode::To | RenameMode::Both | RenameMode::Any,
            )) => event.paths.last()?,
            EventKind::Create(_) => {
                let path = event.paths.first()?;
                // A regular file that was just created is still being written: its close
                // (or its rename into place) follows. Links, directories, FIFOs and extra
                // hard links get no such event, so they are handled now.
                let meta = fs::symlink_metadata(path).ok()?;
                if meta.file_type().is_file() && meta.nlink() == 1 {
                    return None;
                }
                path
            }
            _ => return None,
        };
        if path.parent() != Some(self.dir.as_path()) {
            return None;
        }
        let name = path.file_name()?;
        (!is_ignored(name)).then(|| name.to_os_string())
    }

    fn open_dir(&self) -> Result<OwnedFd, TriggerError> {
        nix::fcntl::open(
            &self.dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => TriggerError::NotADirectory {
                path: self.dir.clone(),
            },
            e => TriggerError::ReadDir {
                path: self.dir.clone(),
                source: e.into(),
            },
        })
    }

    /// Reads, checks and consumes (or rejects) one entry. The caller holds `self.lock`.
    fn process(&self, dirfd: &OwnedFd, name: &OsStr) -> Outcome {
        let path = self.dir.join(name);
        match self.read_trigger(dirfd, name, &path) {
            Ok(Some((trigger, stat))) => {
                // Remove the name only if it still refers to the file that was read.
                match fstatat(dirfd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(now) if same_file(&now, &stat) => {}
                    Ok(_) | Err(Errno::ENOENT) => return Outcome::Gone,
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "could not re-check a trigger file before removing it; ignoring it");
                        return Outcome::Gone;
                    }
                }
                match unlinkat(dirfd, name, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) => {}
                    // Someone else consumed it first.
                    Err(Errno::ENOENT) => return Outcome::Gone,
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "could not remove a consumed trigger file; it may trigger again");
                    }
                }
                tracing::info!(
                    file = %path.display(),
                    bucket = trigger.bucket.as_deref(),
                    key = trigger.key.as_deref(),
                    force_rebuild = trigger.force_rebuild,
                    clear_cache = trigger.clear_cache,
                    reason = trigger.reason.as_deref(),
                    allow_downgrade = trigger.allow_downgrade,
                    "accepted a trigger file"
                );
                Outcome::Accepted(trigger)
            }
            Ok(None) => Outcome::Gone,
            Err(rejection) => {
                self.reject(dirfd, name, &path, &rejection);
                Outcome::Rejected
            }
        }
    }

    /// `Ok(None)`: the entry vanished. `Err`: it must be moved aside.
    fn read_trigger(
        &self,
        dirfd: &OwnedFd,
        name: &OsStr,
        path: &Path,
    ) -> Result<Option<(Trigger, FileStat)>, Rejection> {
        // Look before opening, so device nodes and FIFOs are never opened.
        let pre = match fstatat(dirfd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(Rejection::Unreadable(e.into())),
        };
        check_type(&pre)?;
        let fd = match openat(
            dirfd,
            name,
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => return Err(Rejection::Symlink),
            Err(e) => return Err(Rejection::Unreadable(e.into())),
        };
        // Every decision below uses the opened file, not the name.
        let stat = fstat(fd.as_fd()).map_err(|e| Rejection::Unreadable(e.into()))?;
        check_type(&stat)?;
        let (uid, gid) = (stat.st_uid, stat.st_gid);
        let trusted = self.trusted_uids.contains(&uid) || self.trusted_gid == Some(gid);
        if !trusted {
            return Err(Rejection::Owner {
                uid,
                gid,
                trusted: self.describe_trusted(),
            });
        }
        if stat.st_nlink > 1 {
            return Err(Rejection::HardLinks(stat.st_nlink as u64));
        }
        let size = stat.st_size.max(0) as u64;
        if size > MAX_TRIGGER_FILE_SIZE {
            return Err(Rejection::TooLarge(size));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        File::from(fd)
            .take(MAX_TRIGGER_FILE_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(Rejection::Unreadable)?;
        if bytes.len() as u64 > MAX_TRIGGER_FILE_SIZE {
            return Err(Rejection::TooLarge(bytes.len() as u64));
        }
        let text = String::from_utf8(bytes).map_err(|_| Rejection::NotUtf8)?;
        let trigger = Trigger::parse(&text, TriggerOrigin::File(path.to_path_buf()))
            .map_err(Rejection::Invalid)?;
        if trigger.allow_downgrade && uid != 0 {
            return Err(Rejection::DowngradeNotRoot(uid));
        }
        Ok(Some((trigger, stat)))
    }

    fn describe_trusted(&self) -> String {
        let mut who = "root".to_string();
        let others: Vec<String> = self
            .trusted_uids
            .iter()
            .filter(|&&u| u != 0)
            .map(|u| format!("uid {u}"))
            .collect();
        if !others.is_empty() {
            who = format!("{who}, {}", others.join(", "));
        }
        match self.trusted_gid {
            Some(gid) => format!("{who} or group {gid}"),
            None => who,
        }
    }

    /// Moves `name` into `rejected/` with a note; if that is impossible, removes it.
    fn reject(&self, dirfd: &OwnedFd, name: &OsStr, path: &Path, rejection: &Rejection) {
        let sentence = format!("deployd rejected this trigger file because {rejection}.\n");
        match self.move_aside(dirfd, name, &sentence) {
            Ok(Some(moved_to)) => {
                tracing::warn!(
                    file = %path.display(),
                    moved_to = %moved_to.display(),
                    reason = %rejection,
                    "rejected a trigger file and moved it aside"
                );
            }
            Ok(None) => {}
            Err(error) => {
                // Leaving the file would reject it again on every event; drop it instead.
                let removed = unlinkat(dirfd, name, UnlinkatFlags::NoRemoveDir)
                    .or_else(|_| unlinkat(dirfd, name, UnlinkatFlags::RemoveDir));
                tracing::warn!(
                    file = %path.display(),
                    reason = %rejection,
                    error = %error,
                    removed = removed.is_ok(),
                    "rejected a trigger file but could not move it into rejected/, so it was removed"
                );
            }
        }
    }

    /// `Ok(None)`: the entry vanished before it could be moved.
    fn move_aside(&self, dirfd: &OwnedFd, name: &OsStr, note: &str) -> io::Result<Option<PathBuf>> {
        let rejected = self.open_rejected_dir(dirfd)?;
        let mut target = name.to_os_string();
        if fstatat(&rejected, target.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).is_ok() {
            target.push(format!(".{}", unique_suffix()));
        }
        match renameat(dirfd, name, &rejected, target.as_os_str()) {
            Ok(()) => {}
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let mut note_name = target.clone();
        note_name.push(".error");
        // Replace whatever is there (possibly a hostile link moved aside earlier) with a new file.
        let _ = unlinkat(&rejected, note_name.as_os_str(), UnlinkatFlags::NoRemoveDir);
        let note_result = openat(
            &rejected,
            note_name.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o640),
        )
        .map_err(io::Error::from)
        .and_then(|fd| File::from(fd).write_all(note.as_bytes()));
        let moved_to = self.dir.join(REJECTED_DIR).join(&target);
        if let Err(error) = note_result {
            tracing::warn!(file = %moved_to.display(), error = %error, "could not write the .error note for a rejected trigger file");
        }
        Ok(Some(moved_to))
    }

    fn open_rejected_dir(&self, dirfd: &OwnedFd) -> io::Result<OwnedFd> {
        match mkdirat(dirfd, REJECTED_DIR, Mode::from_bits_truncate(0o750)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = openat(
            dirfd,
            REJECTED_DIR,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let stat = fstat(fd.as_fd())?;
        let euid = nix::unistd::geteuid().as_raw();
        if stat.st_uid != euid {
            return Err(io::Error::other(format!(
                "{} is owned by uid {}, not by deployd (uid {euid})",
                self.dir.join(REJECTED_DIR).display(),
                stat.st_uid
            )));
        }
        Ok(fd)
    }
}

fn is_ignored(name: &OsStr) -> bool {
    name.as_bytes().starts_with(b".") || name == REJECTED_DIR
}

fn same_file(a: &FileStat, b: &FileStat) -> bool {
    a.st_dev == b.st_dev && a.st_ino == b.st_ino
}

fn check_type(stat: &FileStat) -> Result<(), Rejection> {
    let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
    match kind {
        SFlag::S_IFREG => Ok(()),
        SFlag::S_IFLNK => Err(Rejection::Symlink),
        SFlag::S_IFDIR => Err(Rejection::NotRegular("directory")),
        SFlag::S_IFIFO => Err(Rejection::NotRegular("FIFO")),
        SFlag::S_IFSOCK => Err(Rejection::NotRegular("socket")),
        SFlag::S_IFCHR => Err(Rejection::NotRegular("character device")),
        SFlag::S_IFBLK => Err(Rejection::NotRegular("block device")),
        _ => Err(Rejection::NotRegular("file of unknown type")),
    }
}

/// Keeps the trigger directory watched; dropping it stops the watch.
pub struct TriggerWatch {
    watcher: RecommendedWatcher,
}

impl TriggerWatch {
    /// Stops watching.
    pub fn stop(self) {
        drop(self.watcher);
    }
}

impl fmt::Debug for TriggerWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TriggerWatch").finish_non_exhaustive()
    }
}
