//! instance
pub mod imds;
pub mod tags;
