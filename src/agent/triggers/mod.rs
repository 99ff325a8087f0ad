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
//! allow_downgrade = true                            # accept an older signed release (root only)
//! ```
//!
//! `bucket` and `key` come together or not at all, and may only name a bucket the host deploys
//! from (see `deploy::source::check_request`). `reason` may hold no control characters (it is
//! shown in logs, terminals and tags). `allow_downgrade` is honoured only in a file owned by
//! root: a trusted group may ask for deployments, not for rollbacks past the newest signed
//! release. Unknown keys are an error. Writers must not
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

mod dir;
mod file;
mod queue;

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::error::{ExitCode, exit};

pub use dir::{TriggerDir, TriggerWatch};
pub use file::write_trigger;
pub use queue::TriggerQueue;

/// Largest trigger file accepted, in bytes.
pub const MAX_TRIGGER_FILE_SIZE: u64 = 64 * 1024;

/// Longest `reason`, in bytes, in a file and after merging.
pub const MAX_REASON_LEN: usize = 1024;

/// Name of the subdirectory rejected files are moved into.
pub const REJECTED_DIR: &str = "rejected";

/// Mode of a trigger directory deployd creates (the setgid bit is added with a trusted group).
pub const DEFAULT_DIR_MODE: u32 = 0o770;

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
    /// Accept a signed release older than the newest accepted (root-owned files only).
    pub allow_downgrade: bool,
    /// What asked for it.
    pub origin: TriggerOrigin,
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
            allow_downgrade: false,
            origin,
        }
    }

    /// Checks that `bucket` and `key` come together and that no field is empty or oversized.
    pub fn validate(&self) -> Result<(), TriggerError> {
        self.check()
            .map_err(|reason| TriggerError::InvalidTrigger { reason })
    }

    pub(super) fn check(&self) -> Result<(), String> {
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
            && reason.chars().any(char::is_control)
        {
            return Err("its reason contains control characters".into());
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
    /// [`MAX_REASON_LEN`]); the origin becomes the later one. `allow_downgrade` stays with the
    /// artifact it was given for: it never extends to an artifact another trigger named.
    pub fn merge(&mut self, later: Trigger) {
        if later.key.is_some() {
            self.bucket = later.bucket;
            self.key = later.key;
            self.allow_downgrade = later.allow_downgrade;
        } else if self.key.is_none() {
            self.allow_downgrade |= later.allow_downgrade;
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
        if let Some(target) = self.target() {
            write!(f, " for {target}")?;
        }
        if self.force_rebuild {
            f.write_str(", force rebuild")?;
        }
        if self.clear_cache {
            f.write_str(", clear cache")?;
        }
        if self.allow_downgrade {
            f.write_str(", downgrade allowed")?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_rules() {
        let mut a = Trigger::new(TriggerOrigin::Signal);
        a.bucket = Some("b1".into());
        a.key = Some("k1".into());
        a.reason = Some("one".into());
        let mut b = Trigger::new(TriggerOrigin::File(PathBuf::from("x")));
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

        // A downgrade allowed for one artifact never carries over to another.
        let mut root = Trigger::new(TriggerOrigin::Signal);
        root.allow_downgrade = true;
        a.merge(root);
        assert!(!a.allow_downgrade, "k2 was named without it");
        let mut b = Trigger::new(TriggerOrigin::Signal);
        b.bucket = Some("b3".into());
        b.key = Some("k3".into());
        b.allow_downgrade = true;
        a.merge(b);
        assert!(a.allow_downgrade);
        a.merge(Trigger::new(TriggerOrigin::Poll));
        assert!(
            a.allow_downgrade,
            "a later trigger without a key keeps k3's"
        );
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
