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

use crate::contract::pointer::pointer_key;
use crate::s3::S3Object;

/// Where an environment's releases live: the arguments `publish` and `rollout` share.
#[derive(Debug, Clone, clap::Args)]
pub struct Place {
    /// The bucket.
    #[arg(long)]
    pub bucket: String,
    /// The app: the first key segment.
    #[arg(long)]
    pub app: String,
    /// The environment, the second key segment: prod, staging, pr-51, …
    #[arg(long)]
    pub environment: String,
}

impl Place {
    /// The environment's release pointer, `s3://{bucket}/{app}/{environment}/current.json`.
    pub fn pointer(&self) -> S3Object {
        S3Object::new(
            self.bucket.clone(),
            pointer_key(&self.app, &self.environment),
        )
    }
}
