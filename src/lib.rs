//! deployd
pub mod agent;
pub mod ci;
pub mod cli;
pub mod config;
pub mod containers;
pub mod contract;
pub mod deploy;
pub mod error;
pub mod files;
pub mod instance;
pub mod logging;
pub mod report;
pub mod s3;
