//! Redeploy triggers: SIGHUP, files dropped into the trigger directory, and their coalescing.
//!
//! Anything that asks deployd for a new deployment becomes a [`Trigger`]: the daemon's own
//! startup, SIGHUP (`systemctl reload deployd`), a polling tick, or a file dropped into the
//! trigger directory (`<runtime_dir>/triggers/`, normally `/run/deployd/triggers/`).
//!
//! # Trigger files
//!
//! A trigger file is empty or holds TOML with exactly these keys, all optional:
//!
//! ```toml
//! bucket = "deploy-artifacts"                       # with `key`: deploy exactly this object
//! key = "express-api/pr-51/3f2a9c1e-20261105-120000/express-api-deployment.tar.gz"
//! force_rebuild = true                              # rebuild containers even if unchanged
//! clear_cache = false                               # drop images and builder cache first
//! reason = "hotfix for #51"                         # shown in the log and status
//! ```
//!
//! `bucket` and `key` come together or not at all. Unknown keys are an error. Writers must not
//! let deployd see a half-written file: write `.<name>.tmp` (dot-files are ignored), then
//! rename it into place. `deployd trigger` does exactly that through [`write_trigger`].
//!
//! Every file is opened relative to the directory with `O_NOFOLLOW`, and its type, owner, link
//! count and size are checked on the opened descriptor (`fstat`), not by path, so a file swapped
//! between check and use is caught. A file is accepted when it is a regular file with one link,
//! at most [`MAX_TRIGGER_FILE_SIZE`] bytes, owned by root (or another trusted uid) or by the
//! trusted group, and parses. An accepted file is removed. Anything else (bad TOML, an unknown
//! key, the wrong owner, a symlink, a directory, a FIFO, a huge file) is moved into
//! `<dir>/rejected/` with a one-sentence `<name>.error` note beside it and logged as a warning;
//! it never stops the daemon. The `rejected` directory itself and dot-files are ignored.
//!
//! When deployd creates the trigger directory it uses mode `0o770`; with a trusted group it
//! also gives the directory that group and the setgid bit (`0o2770`), so files written by group
//! members inherit the group and pass the ownership check.
//!
//! # Watching
//!
//! [`TriggerDir::watch`] puts an inotify watch (through `notify`) on the directory and then
//! scans what is already there, because inotify cannot report files dropped while deployd was down. It acts
//! on files renamed into place and on files closed after writing; a bare create of a regular
//! file waits for its close, so a slowly written file is not read half-way. Triggers arrive on
//! a tokio channel. There is no debouncer: the events acted on are already settled ones, the
//! queue below coalesces, and a debouncer's timer thread would wake an idle daemon about 80
//! times a second.
//!
//! # Coalescing
//!
//! [`TriggerQueue`] holds at most one pending trigger. Pushing while one is pending merges into
//! it (see [`Trigger::merge`]), so while a deployment runs any number of triggers queue at most
//! one more deployment: a thousand SIGHUPs within a second cause at most two deployments.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, UnlinkatFlags, chown, unlinkat};
use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode};
use serde::{Deserialize, Serialize};

use crate::error::{ExitCode, exit};
use tokio::sync::{Notify, mpsc};

/// Largest trigger file accepted, in bytes.
pub const MAX_TRIGGER_FILE_SIZE: u64 = 64 * 1024;

/// Longest `reason`, in bytes, in a file and after merging.
pub const MAX_REASON_LEN: usize = 1024;

/// Name of the subdirectory rejected files are moved into.
pub const REJECTED_DIR: &str = "rejected";

/// Mode of a trigger directory deployd creates (the setgid bit is added with a trusted group).
pub const DEFAULT_DIR_MODE: u32 = 0o770;

/// Capacity of the channel returned by [`TriggerDir::watch`].
const CHANNEL_CAPACITY: usize = 64;

/// What asked for a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerOrigin {
    /// The daemon started.
    Startup,
    /// SIGHUP (`systemctl reload deployd`).
    Signal,
    /// A file in the trigger directory; the path it had there.
    File(PathBuf),
    /// A polling tick (`[triggers] poll_interval`).
    Poll,
}

impl fmt::Display for TriggerOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Startup => f.write_str("startup"),
            Self::Signal => f.write_str("SIGHUP"),
            Self::File(path) => write!(f, "trigger file {}", path.display()),
            Self::Poll => f.write_str("poll"),
        }
    }
}

/// A request for a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// Bucket of the artifact to deploy; always set together with `key`.
    pub bucket: Option<String>,
    /// Key of the artifact to deploy; always set together with `bucket`.
    pub key: Option<String>,
    /// Rebuild containers even when the release did not change.
    pub force_rebuild: bool,
    /// Remove the project's images and builder cache before building.
    pub clear_cache: bool,
    /// Free text for the log and the status file.
    pub reason: Option<String>,
    /// What asked for it.
    pub origin: TriggerOrigin,
}

/// The on-disk form of a trigger: the TOML keys a trigger file may hold.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct TriggerFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bucket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    force_rebuild: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    clear_cache: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl Trigger {
    /// The artifact this trigger names, if it names one.
    pub fn target(&self) -> Option<crate::s3::S3Object> {
        self.bucket
            .as_ref()
            .zip(self.key.as_ref())
            .map(|(b, k)| crate::s3::S3Object::new(b.clone(), k.clone()))
    }

    /// A trigger with no artifact override and no flags.
    pub fn new(origin: TriggerOrigin) -> Self {
        Self {
            bucket: None,
            key: None,
            force_rebuild: false,
            clear_cache: false,
            reason: None,
            origin,
        }
    }

    /// Parses trigger-file text (empty or TOML) and checks it with [`Trigger::validate`].
    ///
    /// The error is one lowercase clause meant to follow "the trigger file is invalid: ".
    pub fn parse(text: &str, origin: TriggerOrigin) -> Result<Self, String> {
        let file: TriggerFile = toml::from_str(text).map_err(|e| describe_toml_error(text, &e))?;
        let trigger = Self {
            bucket: file.bucket,
            key: file.key,
            force_rebuild: file.force_rebuild,
            clear_cache: file.clear_cache,
            reason: file.reason,
            origin,
        };
        trigger.check()?;
        Ok(trigger)
    }

    /// The TOML a trigger file for this trigger holds (the origin is not written).
    pub fn to_toml(&self) -> String {
        let file = TriggerFile {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            force_rebuild: self.force_rebuild,
            clear_cache: self.clear_cache,
            reason: self.reason.clone(),
        };
        // Serializing a struct of strings and booleans has no failure mode in `toml`.
        toml::to_string(&file).unwrap_or_default()
    }

    /// Checks that `bucket` and `key` come together and that no field is empty or oversized.
    pub fn validate(&self) -> Result<(), TriggerError> {
        self.check()
            .map_err(|reason| TriggerError::InvalidTrigger { reason })
    }

    fn check(&self) -> Result<(), String> {
        match (&self.bucket, &self.key) {
            (Some(_), None) => {
                return Err("it names a bucket but no key; give both or neither".into());
            }
            (None, Some(_)) => {
                return Err("it names a key but no bucket; give both or neither".into());
            }
            _ => {}
        }
        for (name, value) in [("bucket", &self.bucket), ("key", &self.key)] {
            if let Some(value) = value {
                if value.trim().is_empty() {
                    return Err(format!("its {name} is empty"));
                }
                if value.chars().any(char::is_control) {
                    return Err(format!("its {name} contains control characters"));
                }
            }
        }
        if let Some(reason) = &self.reason
            && reason.len() > MAX_REASON_LEN
        {
            return Err(format!(
                "its reason is {} bytes long, over the {MAX_REASON_LEN}-byte limit",
                reason.len()
            ));
        }
        Ok(())
    }

    /// Folds a later trigger into this pending one.
    ///
    /// A later trigger that names an artifact replaces the earlier artifact; `force_rebuild`
    /// and `clear_cache` are OR-ed; distinct reasons are joined with `"; "` (bounded by
    /// [`MAX_REASON_LEN`]); the origin becomes the later one.
    pub fn merge(&mut self, later: Trigger) {
        if later.key.is_some() {
            self.bucket = later.bucket;
            self.key = later.key;
        }
        self.force_rebuild |= later.force_rebuild;
        self.clear_cache |= later.clear_cache;
        self.reason = join_reasons(self.reason.take(), later.reason);
        self.origin = later.origin;
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let (Some(bucket), Some(key)) = (&self.bucket, &self.key) {
            write!(f, " for s3://{bucket}/{key}")?;
        }
        if self.force_rebuild {
            f.write_str(", force rebuild")?;
        }
        if self.clear_cache {
            f.write_str(", clear cache")?;
        }
        if let Some(reason) = &self.reason {
            write!(f, " ({reason})")?;
        }
        Ok(())
    }
}

const REASONS_TRUNCATED: &str = "…";

fn join_reasons(earlier: Option<String>, later: Option<String>) -> Option<String> {
    match (earlier, later) {
        (None, later) => later,
        (earlier, None) => earlier,
        (Some(mut joined), Some(later)) => {
            if joined.ends_with(REASONS_TRUNCATED) || joined.split("; ").any(|r| r == later) {
                return Some(joined);
            }
            if joined.len() + 2 + later.len() > MAX_REASON_LEN {
                joined.push_str("; ");
                joined.push_str(REASONS_TRUNCATED);
            } else {
                joined.push_str("; ");
                joined.push_str(&later);
            }
            Some(joined)
        }
    }
}

/// One line saying where TOML parsing failed and why.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().replace(['\n', '\r'], " ");
    let message = message.trim().trim_end_matches('.');
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("it is not valid trigger TOML at line {line}, column {column}: {message}")
        }
        None => format!("it is not valid trigger TOML: {message}"),
    }
}

/// Everything that can go wrong with triggers, naming the file or directory involved.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    /// The trigger directory could not be created or given its mode and group.
    #[error("cannot create the trigger directory {path}: {source}")]
    CreateDir {
        /// The trigger directory.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The trigger directory could not be opened or listed.
    #[error("cannot read the trigger directory {path}: {source}")]
    ReadDir {
        /// The trigger directory.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The trigger directory path is a symlink or not a directory.
    #[error(
        "the trigger directory {path} is a symlink or not a directory; point runtime_dir at a real directory"
    )]
    NotADirectory {
        /// The trigger directory.
        path: PathBuf,
    },
    /// The trigger directory does not exist (when writing a trigger).
    #[error(
        "the trigger directory {path} does not exist; check that deployd is running and that runtime_dir matches its config"
    )]
    DirMissing {
        /// The trigger directory.
        path: PathBuf,
    },
    /// inotify could not watch the trigger directory.
    #[error("cannot watch the trigger directory {path} for new files: {source}")]
    Watch {
        /// The trigger directory.
        path: PathBuf,
        /// What notify said.
        source: notify::Error,
    },
    /// A trigger to write is inconsistent (e.g. a bucket without a key).
    #[error("the trigger is invalid because {reason}")]
    InvalidTrigger {
        /// One clause explaining the problem.
        reason: String,
    },
    /// A trigger file could not be written, synced or renamed into place.
    #[error("cannot write the trigger file {path}: {source}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
}

impl ExitCode for TriggerError {
    /// The sysexits code `deployd` exits with for this error.
    ///
    /// 64 for an invalid trigger given on the command line, 69 when the daemon's trigger
    /// directory is missing, 78 for a misconfigured directory or missing permission, 70 for
    /// other I/O failures.
    fn exit_code(&self) -> i32 {
        let io_code = |e: &io::Error| {
            if e.kind() == io::ErrorKind::PermissionDenied {
                exit::CONFIG
            } else {
                exit::SOFTWARE
            }
        };
        match self {
            Self::InvalidTrigger { .. } => exit::USAGE,
            Self::DirMissing { .. } => exit::UNAVAILABLE,
            Self::NotADirectory { .. } => exit::CONFIG,
            Self::CreateDir { source, .. }
            | Self::ReadDir { source, .. }
            | Self::Write { source, .. } => io_code(source),
            Self::Watch { .. } => exit::SOFTWARE,
        }
    }
}

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
    dir_mode: u32,
    lock: Arc<Mutex<()>>,
}

impl TriggerDir {
    /// A trigger directory whose files must be owned by root or by `trusted_gid`.
    pub fn new(dir: PathBuf, trusted_gid: Option<u32>) -> Self {
        Self {
            dir,
            trusted_uids: vec![0],
            trusted_gid,
            dir_mode: DEFAULT_DIR_MODE,
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

    /// Mode for the directory when deployd creates it (default [`DEFAULT_DIR_MODE`]).
    pub fn with_dir_mode(mut self, mode: u32) -> Self {
        self.dir_mode = mode & 0o7777;
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
        let mut mode = self.dir_mode;
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

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `<seconds>.<microseconds>-<pid>-<counter>`: sorts by time, unique per process and call.
fn unique_suffix() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}.{:06}-{}-{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
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

/// Writes a trigger file for the running daemon: `.<name>.tmp`, fsync, rename to `<name>.toml`.
///
/// Returns the final path. The name is unique (time, pid and a counter), so concurrent
/// writers never collide; the daemon never sees a half-written file.
pub fn write_trigger(dir: &Path, trigger: &Trigger) -> Result<PathBuf, TriggerError> {
    trigger.validate()?;
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(TriggerError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(TriggerError::DirMissing {
                path: dir.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(TriggerError::Write {
                path: dir.to_path_buf(),
                source,
            });
        }
    }
    let name = unique_suffix();
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(format!("{name}.toml"));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        file.write_all(trigger.to_toml().as_bytes())?;
        file.sync_all()
    })();
    if let Err(source) = written {
        let _ = fs::remove_file(&tmp);
        return Err(TriggerError::Write { path: tmp, source });
    }
    if let Err(source) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(TriggerError::Write { path, source });
    }
    // Make the rename durable; on tmpfs this is a no-op, elsewhere it matters.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| TriggerError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    Ok(path)
}

/// At most one pending trigger; later pushes merge into it.
///
/// The deployment loop calls [`TriggerQueue::next`], deploys, and calls it again. Everything
/// pushed while it deploys collapses into the one pending trigger, so a burst of any size
/// costs at most one extra deployment. Cloning shares the queue.
#[derive(Debug, Clone, Default)]
pub struct TriggerQueue {
    inner: Arc<QueueInner>,
}

#[derive(Debug, Default)]
struct QueueInner {
    pending: Mutex<Option<Trigger>>,
    wake: Notify,
    pushed: AtomicU64,
}

impl TriggerQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `trigger`, merging it into the pending one if there is one.
    pub fn push(&self, trigger: Trigger) {
        {
            let mut pending = self.lock();
            match pending.as_mut() {
                Some(existing) => existing.merge(trigger),
                None => *pending = Some(trigger),
            }
        }
        self.inner.pushed.fetch_add(1, Ordering::Relaxed);
        self.inner.wake.notify_one();
    }

    /// Waits for and takes the pending trigger.
    pub async fn next(&self) -> Trigger {
        loop {
            let woken = self.inner.wake.notified();
            if let Some(trigger) = self.try_next() {
                return trigger;
            }
            woken.await;
        }
    }

    /// Takes the pending trigger, if any, without waiting.
    pub fn try_next(&self) -> Option<Trigger> {
        self.lock().take()
    }

    /// Whether a trigger is pending.
    pub fn is_pending(&self) -> bool {
        self.lock().is_some()
    }

    /// How many triggers were pushed since the queue was made (merged ones included).
    pub fn pushed(&self) -> u64 {
        self.inner.pushed.load(Ordering::Relaxed)
    }

    /// Pushes everything received on `rx` until its senders are gone.
    pub async fn forward(self, mut rx: mpsc::Receiver<Trigger>) {
        while let Some(trigger) = rx.recv().await {
            self.push(trigger);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Trigger>> {
        // The lock is never held across a panic point that leaves the slot inconsistent.
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> TriggerOrigin {
        TriggerOrigin::File(PathBuf::from(name))
    }

    #[test]
    fn parses_empty_and_full_files() {
        assert_eq!(Trigger::parse("", file("a")), Ok(Trigger::new(file("a"))));
        let t = Trigger::parse(
            "bucket = \"b\"\nkey = \"k/x.tar.gz\"\nforce_rebuild = true\nreason = \"r\"\n",
            file("a"),
        )
        .unwrap();
        assert_eq!(t.bucket.as_deref(), Some("b"));
        assert_eq!(t.key.as_deref(), Some("k/x.tar.gz"));
        assert!(t.force_rebuild && !t.clear_cache);
        assert_eq!(t.reason.as_deref(), Some("r"));
    }

    #[test]
    fn rejects_unknown_keys_and_half_sources() {
        let e =
            Trigger::parse("bucket = \"b\"\nkey = \"k\"\nforce = true\n", file("a")).unwrap_err();
        assert!(e.contains("line 3, column 1"), "{e}");
        assert!(e.contains("unknown field `force`"), "{e}");
        let e = Trigger::parse("bucket = \"b\"\n", file("a")).unwrap_err();
        assert!(e.contains("no key"), "{e}");
        let e = Trigger::parse("key = \"k\"\n", file("a")).unwrap_err();
        assert!(e.contains("no bucket"), "{e}");
        let e = Trigger::parse("bucket = \"\"\nkey = \"k\"\n", file("a")).unwrap_err();
        assert!(e.contains("bucket is empty"), "{e}");
        assert!(
            !Trigger::parse("force_rebuild = \"yes\"", file("a"))
                .unwrap_err()
                .contains('\n')
        );
    }

    #[test]
    fn toml_round_trips() {
        let mut t = Trigger::new(TriggerOrigin::Signal);
        t.bucket = Some("b".into());
        t.key = Some("k".into());
        t.clear_cache = true;
        t.reason = Some("quote \" and\nnewline".into());
        let back = Trigger::parse(&t.to_toml(), TriggerOrigin::Signal).unwrap();
        assert_eq!(back, t);
        assert_eq!(Trigger::new(TriggerOrigin::Poll).to_toml(), "");
    }

    #[test]
    fn merge_rules() {
        let mut a = Trigger::new(TriggerOrigin::Signal);
        a.bucket = Some("b1".into());
        a.key = Some("k1".into());
        a.reason = Some("one".into());
        let mut b = Trigger::new(file("x"));
        b.force_rebuild = true;
        b.reason = Some("two".into());
        a.merge(b);
        assert_eq!(
            a.key.as_deref(),
            Some("k1"),
            "a trigger without a key keeps the earlier key"
        );
        assert!(a.force_rebuild);
        let mut c = Trigger::new(TriggerOrigin::Poll);
        c.bucket = Some("b2".into());
        c.key = Some("k2".into());
        c.clear_cache = true;
        c.reason = Some("one".into());
        a.merge(c);
        assert_eq!(
            (a.bucket.as_deref(), a.key.as_deref()),
            (Some("b2"), Some("k2"))
        );
        assert!(a.force_rebuild && a.clear_cache);
        assert_eq!(a.reason.as_deref(), Some("one; two"));
        assert_eq!(a.origin, TriggerOrigin::Poll);
    }

    #[test]
    fn merged_reasons_stay_bounded() {
        let mut a = Trigger::new(TriggerOrigin::Signal);
        for i in 0..10_000 {
            let mut b = Trigger::new(TriggerOrigin::Signal);
            b.reason = Some(format!("reason number {i}"));
            a.merge(b);
        }
        let reason = a.reason.unwrap();
        assert!(reason.len() <= MAX_REASON_LEN + 8, "{}", reason.len());
        assert!(reason.starts_with("reason number 0; reason number 1;"));
        assert!(reason.ends_with(REASONS_TRUNCATED));
    }
}
