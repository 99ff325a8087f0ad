//! `state.json` and `status.json`: what this host serves and what it is doing.
//!
//! `state.json` (in the state directory) records what is serving, the previous good release,
//! the last attempt and a short history. It is written atomically ([`crate::files`]), so a
//! crash or power loss leaves either the old or the new file, never half of one. The changes
//! to it (activate, revert, rollback, reconcile) live beside the disk changes they go with, in
//! `deploy::state`.
//!
//! It also keeps, per `{app}/{environment}`, the highest signed release sequence this host has
//! accepted (`high_water`): the agent refuses an older signed release unless an operator asks
//! for the downgrade explicitly. Files written before it existed load with none recorded.
//!
//! `status.json` (in the runtime directory) is the live view for `deployd status` and
//! monitoring: the [`Stage`] of the running deployment, its progress, and the last result. It
//! is best effort: failing to write it is logged, never fatal.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ExitCode, exit};
use crate::files::{FileError, write_atomic};
use crate::s3::S3Object;

/// How many past attempts `state.json` keeps.
const HISTORY: usize = 20;

/// `state.json` could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the file failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The file is there but is not deployd's state.
    #[error(
        "{path} is not valid deployd state ({reason}); move it aside and deployd will rebuild it from the releases on disk"
    )]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
}

impl ExitCode for StateError {
    fn exit_code(&self) -> i32 {
        exit::SOFTWARE
    }
}

/// A release as recorded in the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSummary {
    /// The release id (its directory under `releases/`).
    pub id: String,
    /// The artifact it was unpacked from.
    #[serde(flatten)]
    pub artifact: S3Object,
    /// Lower-case hex SHA-256 of the artifact.
    pub sha256: String,
    /// The commit it was built from, if the artifact said.
    pub commit: Option<String>,
    /// RFC 3339, when it last became the serving release.
    pub activated_at: String,
}

/// The outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// A new release serves.
    Deployed,
    /// The artifact was already serving; nothing changed.
    Unchanged,
    /// Nothing changed on the host (or the failure left it as it was).
    Failed,
    /// The new release was unhealthy and the previous one serves again (or, for
    /// `deployd rollback`, the requested release serves).
    RolledBack,
}

impl Outcome {
    /// The label used in metrics and tags.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Deployed => "deployed",
            Outcome::Unchanged => "unchanged",
            Outcome::Failed => "failed",
            Outcome::RolledBack => "rolled-back",
        }
    }
}

/// One deployment attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339.
    pub finished_at: String,
    /// How it ended.
    pub outcome: Outcome,
    /// What asked for it.
    pub trigger: String,
    /// The artifact it resolved to, once known.
    #[serde(flatten)]
    pub artifact: Option<S3Object>,
    /// The release that serves because of it.
    pub release: Option<String>,
    /// The one-sentence error of a failure.
    pub error: Option<String>,
    /// The exit code `deployd deploy` ended (or would have ended) with.
    pub exit_code: i32,
}

/// `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The serving release.
    pub current: Option<ReleaseSummary>,
    /// The release that served before it, kept for rollback.
    pub previous_good: Option<ReleaseSummary>,
    /// The last attempt.
    pub last_attempt: Option<Attempt>,
    /// Recent attempts, newest first.
    #[serde(default)]
    pub history: Vec<Attempt>,
    /// Per `{app}/{environment}`, the newest signed release accepted here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub high_water: BTreeMap<String, HighWater>,
}

/// The newest signed release accepted for one app and environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HighWater {
    /// Its release sequence.
    pub sequence: u64,
    /// Its S3 key.
    pub key: String,
    /// RFC 3339, when it was accepted.
    pub accepted_at: String,
    /// True when an operator lowered the mark on purpose (`--allow-downgrade`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub downgraded: bool,
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
            Err(e) => Err(FileError::on("read", path)(e).into()),
        }
    }

    /// Writes the state atomically.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| StateError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        Ok(write_atomic(path, &bytes, 0o640)?)
    }

    /// Records an attempt as the last one and in the history.
    pub fn record(&mut self, attempt: Attempt) {
        self.history.insert(0, attempt.clone());
        self.history.truncate(HISTORY);
        self.last_attempt = Some(attempt);
    }
}

/// The stage a deployment is in, as `status.json`, `STATUS=` and the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Stage {
    /// No deployment is running.
    #[default]
    #[serde(rename = "idle")]
    Idle,
    /// The daemon is making disk and state agree at startup.
    #[serde(rename = "reconciling")]
    Reconciling,
    /// Picking the artifact (environment file, config, legacy template).
    #[serde(rename = "resolving")]
    Resolving,
    /// Reading a release pointer.
    #[serde(rename = "reading pointer")]
    ReadingPointer,
    /// Head-object checks.
    #[serde(rename = "verifying")]
    Verifying,
    /// Downloading (and, unsigned, unpacking while downloading).
    #[serde(rename = "fetching")]
    Fetching,
    /// Unpacking a spooled, verified artifact.
    #[serde(rename = "unpacking")]
    Unpacking,
    /// Switching `current`.
    #[serde(rename = "activating")]
    Activating,
    /// Waiting for the Docker engine to answer.
    #[serde(rename = "waiting for docker")]
    WaitingForDocker,
    /// Removing images, builder cache and app cache paths.
    #[serde(rename = "clearing caches")]
    ClearingCaches,
    /// Building the release's images.
    #[serde(rename = "building")]
    Building,
    /// Starting containers behind the health gate.
    #[serde(rename = "starting")]
    Starting,
}

impl Stage {
    /// The stage's name: `fetching`, `waiting for docker`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Idle => "idle",
            Stage::Reconciling => "reconciling",
            Stage::Resolving => "resolving",
            Stage::ReadingPointer => "reading pointer",
            Stage::Verifying => "verifying",
            Stage::Fetching => "fetching",
            Stage::Unpacking => "unpacking",
            Stage::Activating => "activating",
            Stage::WaitingForDocker => "waiting for docker",
            Stage::ClearingCaches => "clearing caches",
            Stage::Building => "building",
            Stage::Starting => "starting",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `status.json`: the live view of the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The process writing it.
    pub pid: u32,
    /// What the running deployment is doing.
    pub stage: Stage,
    /// More about the stage: the artifact, the release, cache hits.
    pub detail: Option<String>,
    /// True while a deployment runs.
    pub deploying: bool,
    /// Download progress.
    pub bytes_done: Option<u64>,
    /// The artifact's size.
    pub bytes_total: Option<u64>,
    /// The artifact of the running (or last) deployment.
    #[serde(flatten)]
    pub artifact: Option<S3Object>,
    /// What serves now.
    pub serving: Option<ReleaseSummary>,
    /// How the last attempt ended.
    pub last_attempt: Option<Attempt>,
    /// RFC 3339, when the running deployment started.
    pub started_at: Option<String>,
    /// RFC 3339, when this file was written.
    pub updated_at: String,
}

impl Status {
    /// Writes `status.json` to `path`; failures are logged at debug level only.
    pub fn write(&self, path: &Path) {
        let result = serde_json::to_vec_pretty(self)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                if let Some(dir) = path.parent() {
                    fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                }
                write_atomic(path, &bytes, 0o644).map_err(|e| e.to_string())
            });
        // Written at every stage and progress step: a full disk is told once, not each time.
        static FAILING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let was_failing = FAILING.swap(result.is_err(), std::sync::atomic::Ordering::Relaxed);
        match result {
            Err(error) if !was_failing => {
                tracing::warn!(path = %path.display(), %error, "could not write the status file; deploying on without it");
            }
            Err(error) => {
                tracing::debug!(path = %path.display(), %error, "could not write status file");
            }
            Ok(()) if was_failing => {
                tracing::info!(path = %path.display(), "the status file is written again");
            }
            Ok(()) => {}
        }
    }

    /// Reads `status.json`, if there is a readable one.
    pub fn load(path: &Path) -> Option<Status> {
        let bytes = fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `state.json` as the previous layout wrote it must still load.
    #[test]
    fn reads_state_written_before_s3object() {
        let old = r#"{
          "current": {"id": "r1", "bucket": "b", "key": "k", "sha256": "00", "etag": "\"e\"",
                      "commit": null, "activated_at": "2026-01-01T00:00:00Z"},
          "previous_good": null,
          "last_attempt": {"started_at": "a", "finished_at": "b", "outcome": "failed",
                           "trigger": "startup", "bucket": null, "key": null, "release": null,
                           "error": "x", "exit_code": 66},
          "history": []
        }"#;
        let s: State = serde_json::from_str(old).unwrap();
        let cur = s.current.unwrap();
        assert_eq!(cur.artifact.to_string(), "s3://b/k");
        assert_eq!(cur.artifact.etag(), "\"e\"");
        assert_eq!(s.last_attempt.unwrap().artifact, None);
        assert!(s.high_water.is_empty());
        let again: State =
            serde_json::from_slice(&serde_json::to_vec(&State::default()).unwrap()).unwrap();
        assert_eq!(again, State::default());
    }

    #[test]
    fn stages_serialise_as_their_names() {
        for stage in [Stage::Idle, Stage::ReadingPointer, Stage::WaitingForDocker] {
            let json = serde_json::to_string(&stage).unwrap();
            assert_eq!(json, format!("\"{stage}\""));
        }
    }
}
