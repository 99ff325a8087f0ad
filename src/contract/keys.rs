//! The S3 layout `deployd publish` writes and the agent reads: versioned keys and the user
//! metadata names.
//!
//! Keys: `{app}/{environment}/{commit8}-{YYYYmmdd-HHMMSS}/{app}-deployment.tar.gz` (UTC), one
//! per build, never overwritten; the signature beside it (`<key>.minisig`) and the release
//! pointer `{app}/{environment}/current.json` (see [`crate::contract::pointer`]).

use std::time::SystemTime;

/// User metadata: the full commit id the artifact was built from.
pub const META_COMMIT: &str = "commit-sha";
/// User metadata: the branch.
pub const META_BRANCH: &str = "branch";
/// User metadata: RFC 3339 build time.
pub const META_BUILD_TIME: &str = "build-time";
/// User metadata: the CI run id.
pub const META_RUN_ID: &str = "workflow-run-id";
/// User metadata: the pull request number.
pub const META_PR: &str = "pr-number";
/// User metadata: lower-case hex SHA-256 of the whole artifact.
pub const META_SHA256: &str = "sha256";

/// True for a name usable as one key segment: letters, digits, `-`, `_`, `.`.
pub fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// True for a lower- or upper-case 64-character hex string.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `YYYYmmdd-HHMMSS` in UTC.
pub fn key_timestamp(t: SystemTime) -> String {
    // "2026-11-05T10:15:00Z"
    let rfc = humantime::format_rfc3339_seconds(t).to_string();
    let digits: String = rfc.chars().filter(char::is_ascii_digit).collect();
    format!("{}-{}", &digits[..8], &digits[8..14])
}

/// `{app}/{environment}/{commit8}-{YYYYmmdd-HHMMSS}/{app}-deployment.tar.gz`.
pub fn artifact_key(app: &str, environment: &str, commit: &str, t: SystemTime) -> String {
    let short = commit.get(..8).unwrap_or(commit).to_ascii_lowercase();
    format!(
        "{app}/{environment}/{short}-{}/{app}-deployment.tar.gz",
        key_timestamp(t)
    )
}

/// True for a release directory name `publish` writes: `{8 hex}-{8 digits}-{6 digits}`.
pub fn is_release_dir(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 24
        && b[..8].iter().all(u8::is_ascii_hexdigit)
        && b[8] == b'-'
        && b[9..17].iter().all(u8::is_ascii_digit)
        && b[17] == b'-'
        && b[18..].iter().all(u8::is_ascii_digit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn key_shape() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_793_873_700); // 2026-11-05 10:15:00
        assert_eq!(key_timestamp(t), "20261105-101500");
        let k = artifact_key("web", "prod", "622D2103DEADBEEF", t);
        assert_eq!(k, "web/prod/622d2103-20261105-101500/web-deployment.tar.gz");
        assert!(is_release_dir("622d2103-20261105-101500"));
        assert!(!is_release_dir("current.json"));
        assert!(!is_release_dir("622d2103-2026110-1015000"));
    }
}
