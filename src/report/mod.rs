//! report
pub mod metrics;
pub mod status;
pub use status::{Reporter, StatusSink};
