//! Durable and live state: `state.json` and `status.json`.
//!
//! `state.json` (in the state directory) records what is serving, the previous good release,
//! the last attempt and a short history. It is written atomically (temporary file, fsync,
//! rename, fsync of the directory), so a crash or power loss leaves either the old or the new
//! file, never half of one.
//!
//! `status.json` (in the runtime directory) is the live view for `deployd status` and
//! monitoring: the stage of the running deployment, its progress, and the last result. It is
//! best effort: failing to write it is logged, never fatal.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{ExitCode, exit};

/// How many past attempts `state.json` keeps.
const HISTORY: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not valid deployd state ({reason}); move it aside and deployd will rebuild it from the releases on disk"
    )]
    Corrupt { path: PathBuf, reason: String },
}

impl ExitCode for StateError {
    fn exit_code(&self) -> i32 {
        exit::SOFTWARE
    }
}

/// Now, as RFC 3339 with seconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| StateError::Io {
            action,
            path: p,
            source,
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    // The mode is set explicitly: the unit's UMask must not make status.json unreadable.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io("set the mode of", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io("replace", path))?;
    sync_dir(dir).map_err(io("sync", dir))
}

/// fsyncs a directory, making renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A release as recorded in the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSummary {
    pub id: String,
    pub bucket: String,
    pub key: String,
    pub sha256: String,
    pub etag: String,
    pub commit: Option<String>,
    pub activated_at: String,
}

/// The outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Deployed,
    Unchanged,
    Failed,
    RolledBack,
}

/// One deployment attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub started_at: String,
    pub finished_at: String,
    pub outcome: Outcome,
    pub trigger: String,
    pub bucket: Option<String>,
    pub key: Option<String>,
    pub release: Option<String>,
    pub error: Option<String>,
    pub exit_code: i32,
}

/// `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub current: Option<ReleaseSummary>,
    pub previous_good: Option<ReleaseSummary>,
    pub last_attempt: Option<Attempt>,
    #[serde(default)]
    pub history: Vec<Attempt>,
}

impl State {
    /// Reads the state; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<State, StateError> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(StateError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| StateError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        write_atomic(path, &bytes, 0o640)
    }

    /// Records an attempt as the last one and in the history.
    pub fn record(&mut self, attempt: Attempt) {
        self.history.insert(0, attempt.clone());
        self.history.truncate(HISTORY);
        self.last_attempt = Some(attempt);
    }
}

/// `status.json`: the live view of the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    /// `idle`, `resolving`, `verifying`, `fetching`, `unpacking`, `activating`, `building`,
    /// `starting`, `waiting for docker`, `stopping`.
    pub stage: String,
    pub detail: Option<String>,
    pub deploying: bool,
    pub bytes_done: Option<u64>,
    pub bytes_total: Option<u64>,
    pub bucket: Option<String>,
    pub key: Option<String>,
    pub serving: Option<ReleaseSummary>,
    pub last_attempt: Option<Attempt>,
    pub started_at: Option<String>,
    pub updated_at: String,
}

impl Status {
    /// Writes `status.json` into `runtime_dir`; failures are logged once per call site.
    pub fn write(&self, runtime_dir: &Path) {
        let path = runtime_dir.join("status.json");
        let result = serde_json::to_vec_pretty(self)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                fs::create_dir_all(runtime_dir).map_err(|e| e.to_string())?;
                write_atomic(&path, &bytes, 0o644).map_err(|e| e.to_string())
            });
        if let Err(error) = result {
            tracing::debug!(path = %path.display(), %error, "could not write status file");
        }
    }

    pub fn load(runtime_dir: &Path) -> Option<Status> {
        let bytes = fs::read(runtime_dir.join("status.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}
