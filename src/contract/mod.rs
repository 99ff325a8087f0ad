//! The contract: what CI writes and the agent reads, and what the agent leaves on the host for
//! people and programs to read.
//!
//! - [`keys`]: the versioned S3 key layout and the user metadata names;
//! - [`pointer`]: `current.json`, the release pointer, unsigned or signed (its statement);
//! - [`signature`]: `<key>.minisig`, minisign signatures, trusted keys and the signing key;
//! - [`identity`]: the release identity a signature's trusted comment binds the bytes to;
//! - [`host`]: the paths under the state and runtime directories, and a release's manifest;
//! - [`state`]: `state.json` and `status.json`, and the deployment [`state::Stage`]s;
//! - [`wave`]: rollout waves, which hosts take a release a pointer names for part of a fleet.
//!
//! Nothing here decides anything: the pipeline (`deploy`), the daemon
//! (`agent`) and the CI commands (`ci`) all speak through these types.

pub mod host;
pub mod identity;
pub mod keys;
pub mod pointer;
pub mod signature;
pub mod state;
pub mod wave;

/// Now, as RFC 3339 with seconds: the timestamp format of every contract file.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
