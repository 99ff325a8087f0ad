//! deployd turns "CI put a tarball in S3" into "this instance runs exactly that code, in
//! containers, and says so".
//!
//! The deployment pipeline is one module per stage, each with one entry point and a typed
//! output:
//!
//! ```text
//! resolve ──► verify ──► fetch ──► unpack ──► activate ──► (containers) ──► report
//! source.rs   verify.rs  fetch.rs  unpack.rs  release.rs
//! ```
//!
//! [`deploy::Deployer`] drives one deployment through the stages; [`cli`] maps commands onto it.
//! Failure in any stage before `activate` leaves the host untouched. Every attempt is
//! reported in `state.json`/`status.json` ([`report`]), on the instance's EC2 tags
//! ([`ec2tags`]) and in a node_exporter metrics file ([`metrics`]).

pub mod agent;
pub mod cli;
pub mod config;
pub mod containers;
pub mod deploy;
pub mod ec2tags;
pub mod envfile;
pub mod exit;
pub mod fetch;
pub mod gc;
pub mod imds;
pub mod logging;
pub mod metrics;
pub mod pointer;
pub mod poll;
pub mod publish;
pub mod release;
pub mod report;
pub mod s3;
pub mod sdnotify;
pub mod signature;
pub mod source;
pub mod state;
pub mod triggers;
pub mod unpack;
pub mod verify;
