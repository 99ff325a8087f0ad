//! Errors and exit codes: one place for the sysexits codes, the trait every error implements,
//! and the helper that renders an error chain on one line.
//!
//! Every error type in deployd implements [`ExitCode`], so the code a script or systemd sees
//! always matches the sentence printed on stderr: `deployd: error: <one sentence>`.

/// Process exit codes, following `sysexits.h` as the CLI contract says.
pub mod exit {
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
}

/// An error that knows which sysexits code the process should end with.
pub trait ExitCode {
    /// The exit code for this error (see [`exit`]).
    fn exit_code(&self) -> i32;
}

/// Implements [`ExitCode`] for an error enum from `Variant pattern => code` arms: the
/// patterns name variants without the type (`Usage(_)`, `Io { .. }`, `A(e) | B(e)`), the
/// codes are [`exit`] constants (`DATAERR`) or expressions (`e.exit_code()` for a wrapped
/// error).
macro_rules! exit_codes {
    ($ty:ident { $($pat:pat => $code:expr),+ $(,)? }) => {
        impl $crate::error::ExitCode for $ty {
            fn exit_code(&self) -> i32 {
                #[allow(unused_imports)]
                use $crate::error::{ExitCode as _, exit::*};
                use $ty::*;
                match self {
                    $($pat => $code),+
                }
            }
        }
    };
}
pub(crate) use exit_codes;

/// Renders an error and its causes on one line: `outer: cause: root cause`; a cause whose
/// text the outer message already contains is not repeated.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_is_one_line_without_repeats() {
        let e = Outer(std::io::Error::other("disk full"));
        assert_eq!(error_chain(&e), "outer: disk full");
        let e = Outer(std::io::Error::other("outer"));
        assert_eq!(error_chain(&e), "outer");
    }
}
