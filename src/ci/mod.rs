//! ci
pub mod gc;
pub mod publish;
