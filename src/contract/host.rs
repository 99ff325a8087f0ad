//! The files deployd keeps on the host: where they are ([`Paths`]) and what a release's
//! manifest says ([`Manifest`]).
//!
//! ```text
//! <state_dir>/                    /var/lib/deployd
//!   releases/<id>/                one complete unpacked release each, with .deployd-release.json
//!   current -> releases/<id>      switched atomically: a temporary symlink renamed over it
//!   staging/                      work in progress; debris there is removed before the next run
//!   state.json                    see crate::contract::state
//!   metrics.json                  the metrics' counters, kept across restarts
//!   lock                          flock(2) held for the length of one deployment
//! <runtime_dir>/                  /run/deployd
//!   status.json                   the live status
//!   triggers/                     drop a file here to redeploy
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::s3::S3Object;

/// The manifest's file name inside every release.
pub const MANIFEST: &str = ".deployd-release.json";

/// Every path deployd reads or writes on the host, built in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// `[state_dir]`.
    pub state_dir: PathBuf,
    /// `<state_dir>/releases`.
    pub releases: PathBuf,
    /// `<state_dir>/staging`.
    pub staging: PathBuf,
    /// `<state_dir>/current`, a symlink to the serving release.
    pub current: PathBuf,
    /// `<state_dir>/state.json`.
    pub state_file: PathBuf,
    /// `<state_dir>/lock`.
    pub lock_file: PathBuf,
    /// `<state_dir>/metrics.json`.
    pub metrics_counters: PathBuf,
    /// `[runtime_dir]`.
    pub runtime_dir: PathBuf,
    /// `<runtime_dir>/status.json`.
    pub status_file: PathBuf,
    /// `<runtime_dir>/triggers`.
    pub triggers: PathBuf,
}

impl Paths {
    /// The paths under a state directory and a runtime directory.
    pub fn new(state_dir: &Path, runtime_dir: &Path) -> Paths {
        Paths {
            state_dir: state_dir.to_path_buf(),
            releases: state_dir.join("releases"),
            staging: state_dir.join("staging"),
            current: state_dir.join("current"),
            state_file: state_dir.join("state.json"),
            lock_file: state_dir.join("lock"),
            metrics_counters: state_dir.join("metrics.json"),
            runtime_dir: runtime_dir.to_path_buf(),
            status_file: runtime_dir.join("status.json"),
            triggers: runtime_dir.join("triggers"),
        }
    }

    /// `releases/<id>`.
    pub fn release_dir(&self, id: &str) -> PathBuf {
        self.releases.join(id)
    }
}

/// How an artifact was compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// gzip, possibly multi-member.
    Gzip,
    /// zstd.
    Zstd,
    /// A plain tar.
    None,
}

/// What was unpacked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Archive entries read.
    pub entries: u64,
    /// Regular files written.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Hardlinks created.
    pub hardlinks: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// `.deployd-release.json`: where a release came from and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The release id.
    pub id: String,
    /// `app` from the config.
    pub app: String,
    /// The artifact, pinned to the ETag and version that were downloaded.
    #[serde(flatten)]
    pub artifact: S3Object,
    /// Lower-case hex SHA-256 of the downloaded bytes.
    pub sha256: String,
    /// What the digest was checked against (`sha256 metadata`, `release pointer`, …).
    pub sha256_verified_against: Option<String>,
    /// The artifact's size in bytes.
    pub size: u64,
    /// How it was compressed.
    pub compression: Compression,
    /// Its S3 user metadata (`commit-sha`, `branch`, …).
    pub metadata: BTreeMap<String, String>,
    /// RFC 3339, as S3 reported it.
    pub last_modified: Option<String>,
    /// What was unpacked.
    pub unpacked: Stats,
    /// RFC 3339 with nanoseconds; orders releases.
    pub fetched_at: String,
    /// Which source named the artifact.
    pub source: String,
    /// The signed release identity, when signatures are required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<crate::contract::identity::ReleaseIdentity>,
    /// True when it was accepted although older than the newest accepted (`--allow-downgrade`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub downgrade: bool,
}

impl Manifest {
    /// The commit the release was built from (`commit-sha` metadata).
    pub fn commit(&self) -> Option<&str> {
        self.metadata
            .get(crate::contract::keys::META_COMMIT)
            .map(String::as_str)
    }

    /// This release as `state.json` records a serving one, activated now.
    pub fn summary(&self) -> crate::contract::state::ReleaseSummary {
        crate::contract::state::ReleaseSummary {
            id: self.id.clone(),
            artifact: self.artifact.clone(),
            sha256: self.sha256.clone(),
            commit: self.commit().map(str::to_string),
            activated_at: crate::contract::now_rfc3339(),
        }
    }
}
