//! The CI side: what runs in the pipeline that builds the artifact, never on the instances.
//!
//! - [`publish`]: a built tarball becomes an immutable, verified, optionally signed release in
//!   S3, and the release pointer moves to it;
//! - [`upload`]: create-only uploads (single or multipart) and the check of what landed;
//! - [`refresh`]: a signed release pointer re-signed, so hosts that limit its age keep it;
//! - [`gc`]: old artifacts deleted per environment, never what a pointer names;
//! - [`rollout`]: the pointer's wave moved (`deployd rollout`), or the pointer sent back to
//!   its previous release;
//! - [`fleet`]: the fleet as its EC2 tags report it, and waiting for a rollout to converge.

pub mod fleet;
pub mod gc;
pub mod publish;
pub mod refresh;
pub mod rollout;
pub mod upload;
