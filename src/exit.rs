//! Process exit codes, following `sysexits.h` as the design's CLI contract says.
//!
//! Every error type in deployd maps itself to one of these through an `exit_code()` method, so
//! the code a script or systemd sees always matches the sentence printed on stderr.

/// Success.
pub const OK: i32 = 0;
/// The command line was wrong.
pub const USAGE: i32 = 64;
/// Bad data: checksum or signature mismatch, hostile or broken archive, bad compose file.
pub const DATAERR: i32 = 65;
/// The artifact does not exist.
pub const NOINPUT: i32 = 66;
/// A dependency (S3, Docker) stayed unavailable after retries.
pub const UNAVAILABLE: i32 = 69;
/// Internal error: a bug or an unexpected local failure (disk, permissions).
pub const SOFTWARE: i32 = 70;
/// Temporary failure: try again later (for example another deployment holds the lock).
pub const TEMPFAIL: i32 = 75;
/// Configuration error; the unit sets `RestartPreventExitStatus=78`.
pub const CONFIG: i32 = 78;
