//! deployd turns "CI put a tarball in S3" into "this instance runs exactly that code, in
//! containers, and says so".
//!
//! ```text
//!                        ┌──────────────────────────── agent (the daemon) ─────────────────────────────┐
//!  triggers: startup,    │                                                                              │
//!  SIGHUP, trigger file, │  deploy::Deployer — one deployment at a time                                  │
//!  poll ─────────────────┼─►  resolve ─► pointer ─► verify ─► fetch ∥ unpack ─► install ─► build ─►     │
//!                        │   (source)  (contract)  (verify)  (fetch, unpack)   (release)  (containers)   │
//!                        │                 ─► activate ─► run (health gate, roll back) ─► report         │
//!                        │                   (state)      (containers)                    (report)       │
//!                        └──────────────────────────────────────────────────────────────────────────────┘
//!  ci: publish ─► S3 (versioned key, metadata, checksum, .minisig, current.json) ◄─ gc
//! ```
//!
//! Where things live:
//!
//! - [`deploy`]: the pipeline, one module per stage, and the host's state transitions;
//! - [`agent`]: the daemon loop, triggers (signal, files, queue), polling, systemd notify;
//! - [`containers`]: compose, image builds with `cache_from`, health-gated runs, cache clearing;
//! - `ci`: `publish`, `upload` and `gc`, the commands CI runs;
//! - [`contract`]: what CI writes and the agent reads (keys, metadata, pointer, signature) and
//!   what the agent leaves on the host (paths, manifest, `state.json`, `status.json`);
//! - `instance`: IMDSv2 identity and EC2 tags; `report`: status, the terminal view, logging,
//!   metrics, outward reports;
//! - [`config`]: the config file and the environment file; [`s3`]: the client, [`s3::S3Object`]
//!   and the one classification of S3 errors; [`error`]: exit codes; `files`: durable writes;
//!   [`units`]: durations and sizes written the human way;
//! - [`cli`]: parsing and printing only.
//!
//! Failure in any stage before `activate` leaves the host untouched; a release whose
//! containers do not become healthy is rolled back. Every error names what it was acting on
//! and maps to one sysexits code ([`error::ExitCode`]).

pub mod agent;
pub(crate) mod ci;
pub mod cli;
pub mod config;
pub mod containers;
pub mod contract;
pub mod deploy;
pub mod error;
pub(crate) mod files;
pub(crate) mod instance;
pub(crate) mod report;
pub mod s3;
pub(crate) mod scrub;
pub mod units;
