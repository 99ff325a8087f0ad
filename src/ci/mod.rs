//! The CI side: what runs in the pipeline that builds the artifact, never on the instances.
//!
//! - [`publish`]: a built tarball becomes an immutable, verified, optionally signed release in
//!   S3, and the release pointer moves to it;
//! - [`upload`]: create-only uploads (single or multipart) and the check of what landed;
//! - [`refresh`]: a signed release pointer re-signed, so hosts that limit its age keep it;
//! - [`gc`]: old artifacts deleted per environment, never what a pointer names.

pub mod gc;
pub mod publish;
pub mod refresh;
pub mod upload;
