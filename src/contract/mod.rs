//! contract
pub mod host;
pub mod pointer;
pub mod signature;
