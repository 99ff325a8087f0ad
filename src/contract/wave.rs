//! Rollout waves: which hosts of a fleet take a release that a pointer names for only part of
//! the fleet.
//!
//! A pointer may carry a `percent` (1–100, default 100 when absent) and the `previous` release
//! (key, SHA-256, commit, sequence). Each host decides by itself, with no coordinator, whether
//! it is in the wave:
//!
//! ```text
//! slot = first 8 bytes of SHA-256(member_id || "\n" || release_sha256), big-endian, mod 10000
//! in the wave  ⇔  slot < percent × 100
//! ```
//!
//! where `member_id` is the EC2 instance id (IMDSv2), else `/etc/machine-id`, and
//! `release_sha256` is the lower-case hex SHA-256 of the release the pointer names. The slot
//! depends only on the host and the release, so the same hosts stay in the wave as the
//! percentage grows, a host started in the middle of a wave (an Auto Scaling scale-out) lands
//! where its slot says, and each release draws a different wave. CI computes the same function
//! from `DescribeInstances` (`deployd fleet status`).
//!
//! In the wave, a host deploys the release; out of it, it keeps (or, with nothing serving,
//! deploys) the previous one. A host that already serves the release keeps it whatever its
//! slot says, so lowering the percentage stops a rollout from widening without flapping hosts
//! back. Going back is a separate, explicit step: a pointer naming the previous release again,
//! which carries `reverts` (the sequence of the release it takes the environment back from) so
//! that hosts which accepted that release may go back below their high-water mark.

use sha2::{Digest, Sha256};

use crate::contract::keys::is_sha256_hex;

/// The percentage a pointer without one stands for.
pub const FULL: u8 = 100;

/// The release a rollout started from: where hosts outside the wave stay.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Previous {
    /// Its key, in the pointer's bucket.
    pub key: String,
    /// Lower-case hex SHA-256 of its artifact.
    pub sha256: String,
    /// Its full commit id.
    #[serde(default)]
    pub commit: String,
    /// Its release sequence (0 for an unsigned release).
    #[serde(default)]
    pub sequence: u64,
}

/// A pointer's rollout fields, in its readable part and in its signed statement alike.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rollout {
    /// The share of the fleet, in percent, that takes the release.
    #[serde(default = "full", skip_serializing_if = "is_full")]
    pub percent: u8,
    /// The release hosts outside the wave stay on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Previous>,
    /// The sequence of the release this pointer takes the environment back from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverts: Option<u64>,
}

fn full() -> u8 {
    FULL
}

fn is_full(p: &u8) -> bool {
    *p == FULL
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            percent: FULL,
            previous: None,
            reverts: None,
        }
    }
}

impl Rollout {
    /// Checks the fields; the error is one clause saying why they are not usable.
    pub fn check(&self) -> Result<(), String> {
        if self.percent > FULL {
            return Err(format!("its percent {} is above 100", self.percent));
        }
        if self.percent < FULL && self.previous.is_none() {
            return Err(format!(
                "its percent {} names no previous release for the rest of the fleet",
                self.percent
            ));
        }
        if let Some(p) = &self.previous {
            if p.key.is_empty() || p.key.starts_with('/') {
                return Err(format!("its previous key {:?} is not an object key", p.key));
            }
            if !is_sha256_hex(&p.sha256) {
                return Err(format!(
                    "its previous sha256 {:?} is not a SHA-256 hex digest",
                    p.sha256
                ));
            }
        }
        Ok(())
    }

    /// True when only part of the fleet takes the release.
    pub fn partial(&self) -> bool {
        self.percent < FULL && self.previous.is_some()
    }
}

/// The slot of `member` for the release whose SHA-256 is `release_sha256`: 0..10000.
pub fn slot(member: &str, release_sha256: &str) -> u16 {
    let mut h = Sha256::new();
    h.update(member.as_bytes());
    h.update(b"\n");
    h.update(release_sha256.to_ascii_lowercase().as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % 10_000) as u16
}

/// True when `member` is in a `percent` wave of the release `release_sha256`.
pub fn in_wave(member: &str, release_sha256: &str, percent: u8) -> bool {
    u32::from(slot(member, release_sha256)) < u32::from(percent.min(FULL)) * 100
}

/// Which of a pointer's two releases a host deploys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The release the pointer names.
    Release,
    /// The previous release (outside the wave).
    Previous,
}

/// The decision of a host `member` (known only when needed) serving `serving_sha256`, for a
/// pointer naming `release_sha256` with `rollout`.
pub fn choose(
    rollout: &Rollout,
    release_sha256: &str,
    member: Option<&str>,
    serving_sha256: Option<&str>,
) -> Choice {
    if !rollout.partial() {
        return Choice::Release;
    }
    if serving_sha256.is_some_and(|s| s.eq_ignore_ascii_case(release_sha256)) {
        return Choice::Release;
    }
    match member {
        Some(m) if in_wave(m, release_sha256, rollout.percent) => Choice::Release,
        _ => Choice::Previous,
    }
}

/// Where a host's member id comes from when IMDS has none.
pub const MACHINE_ID: &str = "/etc/machine-id";

#[cfg(test)]
mod tests {
    use super::*;

    fn previous() -> Previous {
        Previous {
            key: "web/prod/a/web-deployment.tar.gz".into(),
            sha256: "aa".repeat(32),
            commit: "c".repeat(40),
            sequence: 1,
        }
    }

    #[test]
    fn wave_slots_are_stable_and_grow_with_the_percentage() {
        let sha = "ab".repeat(32);
        // A known value, so that CI and hosts of any version agree.
        let mut h = Sha256::new();
        h.update(b"i-0123456789abcdef0\n");
        h.update(sha.as_bytes());
        let d = h.finalize();
        let want = u64::from_be_bytes(d[..8].try_into().unwrap()) % 10_000;
        assert_eq!(u64::from(slot("i-0123456789abcdef0", &sha)), want);
        assert_eq!(slot("i-1", &sha), slot("i-1", &sha.to_uppercase()));
        let members: Vec<String> = (0..2000).map(|i| format!("i-{i:017x}")).collect();
        let mut last = 0;
        for percent in [0u8, 10, 30, 50, 100] {
            let inside: Vec<&String> = members
                .iter()
                .filter(|m| in_wave(m, &sha, percent))
                .collect();
            assert!(inside.len() >= last, "the wave only grows");
            // Everyone inside at a lower percentage is inside at this one.
            for m in &members {
                if in_wave(m, &sha, percent / 2) {
                    assert!(in_wave(m, &sha, percent));
                }
            }
            let share = inside.len() as f64 / members.len() as f64 * 100.0;
            assert!(
                (share - f64::from(percent)).abs() < 4.0,
                "{percent}%: {share}"
            );
            last = inside.len();
        }
        assert_eq!(last, members.len());
    }

    #[test]
    fn hosts_choose_by_wave_and_keep_what_they_serve() {
        let sha = "ab".repeat(32);
        let full = Rollout::default();
        assert_eq!(choose(&full, &sha, None, None), Choice::Release);
        let none = Rollout {
            percent: 0,
            previous: Some(previous()),
            reverts: None,
        };
        assert_eq!(choose(&none, &sha, Some("i-1"), None), Choice::Previous);
        assert_eq!(choose(&none, &sha, None, None), Choice::Previous);
        assert_eq!(
            choose(&none, &sha, Some("i-1"), Some(&sha)),
            Choice::Release,
            "a host already serving the release keeps it"
        );
        let all = Rollout {
            percent: 99,
            ..none.clone()
        };
        let members: Vec<String> = (0..100).map(|i| format!("i-{i}")).collect();
        let taking = members
            .iter()
            .filter(|m| choose(&all, &sha, Some(m), None) == Choice::Release)
            .count();
        assert!(taking > 90, "{taking}");
    }

    #[test]
    fn rollout_fields_are_checked() {
        assert!(Rollout::default().check().is_ok());
        let bad = Rollout {
            percent: 30,
            ..Rollout::default()
        };
        assert!(bad.check().unwrap_err().contains("no previous"));
        let over = Rollout {
            percent: 101,
            previous: Some(previous()),
            reverts: None,
        };
        assert!(over.check().unwrap_err().contains("above 100"));
        let mut p = previous();
        p.sha256 = "x".into();
        let bad_prev = Rollout {
            percent: 50,
            previous: Some(p),
            reverts: None,
        };
        assert!(bad_prev.check().unwrap_err().contains("previous sha256"));
        let text = serde_json::to_string(&Rollout::default()).unwrap();
        assert_eq!(text, "{}");
    }
}
