//! The host's state transitions: `current` and `state.json` change together, here and nowhere
//! else.
//!
//! ```text
//!            activate (a new release serves; the old one becomes previous-good)
//!   serving ───────────────────────────────────────────────────────────────► serving'
//!      ▲  │ revert (a started release was unhealthy: both records put back)
//!      └──┘
//!   rollback (an operator picks a release on disk) · record (every attempt, in the history)
//!   reconcile (startup: `current`, the releases on disk and state.json made to agree)
//! ```
//!
//! The high-water mark (the newest signed release accepted per app and environment) moves
//! with `activate`, in the same save as `current`: up to the activated release's sequence, or
//! down to it when the operator allowed a downgrade. `revert` puts it back with the rest (an
//! unhealthy release was never accepted); `rollback` leaves it alone (a local, explicit
//! choice); `reconcile` rebuilds it from the releases' manifests when `state.json` was lost.
//!
//! Each transition loads `state.json` once, changes the disk, and saves it atomically. The
//! format of the file is [`crate::contract::state`]; the disk operations are
//! [`crate::deploy::release`].

use crate::contract::host::Manifest;
use crate::contract::now_rfc3339;
use crate::contract::state::{Attempt, HighWater, Outcome, ReleaseSummary, State, StateError};
use crate::deploy::release::{Layout, ReleaseError};
use crate::error::exit_codes;
use crate::s3::S3Object;

/// A transition failed: the disk (release) or the state file.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A release or `current` could not be changed.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// `state.json` could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
}

exit_codes!(HostError {
    Release(e) => e.exit_code(),
    State(e) => e.exit_code(),
});

/// A release on disk as `deployd releases` lists it: what its manifest says, and what
/// `current` and `state.json` say of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReleaseEntry {
    /// The release id (its directory under `releases/`; what `deployd rollback` takes).
    pub id: String,
    /// The commit it was built from, if the artifact said.
    pub commit: Option<String>,
    /// The artifact it was unpacked from.
    #[serde(flatten)]
    pub artifact: Option<S3Object>,
    /// Lower-case hex SHA-256 of the artifact.
    pub sha256: Option<String>,
    /// The artifact's size in bytes.
    pub artifact_bytes: Option<u64>,
    /// Bytes of file content unpacked.
    pub unpacked_bytes: Option<u64>,
    /// RFC 3339, when it was downloaded.
    pub fetched_at: Option<String>,
    /// RFC 3339, when it last became the serving release, if the state remembers.
    pub activated_at: Option<String>,
    /// `current` points at it.
    pub serving: bool,
    /// The previous good release: where `deployd rollback` goes without an argument.
    pub previous_good: bool,
    /// Its last deployment was unhealthy and rolled back.
    pub rolled_back: bool,
    /// Why it is incomplete (no readable manifest), if it is.
    pub incomplete: Option<String>,
}

impl ReleaseEntry {
    fn new(
        id: String,
        manifest: Result<Manifest, ReleaseError>,
        state: &State,
        serving: bool,
    ) -> Self {
        let recorded = [state.current.as_ref(), state.previous_good.as_ref()]
            .into_iter()
            .flatten()
            .find(|r| r.id == id)
            .map(|r| r.activated_at.clone());
        let activated_at = recorded.or_else(|| {
            state
                .history
                .iter()
                .find(|a| a.release.as_deref() == Some(id.as_str()))
                .filter(|a| matches!(a.outcome, Outcome::Deployed | Outcome::RolledBack))
                .map(|a| a.finished_at.clone())
        });
        let mut entry = ReleaseEntry {
            serving,
            previous_good: state.previous_good.as_ref().is_some_and(|r| r.id == id),
            activated_at,
            id,
            commit: None,
            artifact: None,
            sha256: None,
            artifact_bytes: None,
            unpacked_bytes: None,
            fetched_at: None,
            rolled_back: false,
            incomplete: None,
        };
        match manifest {
            Ok(m) => {
                // The newest attempt that concerns this release: one that names it, or a
                // rollback of its artifact after it was downloaded (which names no release).
                let last = state.history.iter().find(|a| {
                    a.release.as_deref() == Some(m.id.as_str())
                        || (a.release.is_none()
                            && a.artifact.as_ref().is_some_and(|o| {
                                o.bucket == m.artifact.bucket && o.key == m.artifact.key
                            })
                            && later(&a.finished_at, &m.fetched_at))
                });
                entry.rolled_back = !serving
                    && last
                        .is_some_and(|a| a.outcome == Outcome::RolledBack && a.release.is_none());
                entry.commit = m.commit().map(str::to_string);
                entry.sha256 = Some(m.sha256);
                entry.artifact_bytes = Some(m.size);
                entry.unpacked_bytes = Some(m.unpacked.bytes);
                entry.fetched_at = Some(m.fetched_at);
                entry.artifact = Some(m.artifact);
            }
            Err(e) => entry.incomplete = Some(e.to_string()),
        }
        entry
    }
}

/// Whether RFC 3339 time `a` is at or after `b` (false if either does not parse).
fn later(a: &str, b: &str) -> bool {
    match (
        humantime::parse_rfc3339_weak(a),
        humantime::parse_rfc3339_weak(b),
    ) {
        (Ok(a), Ok(b)) => a >= b,
        _ => false,
    }
}

/// `current` and `state.json` of one host.
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    layout: &'a Layout,
}

impl<'a> Host<'a> {
    /// The host whose releases are `layout`.
    pub fn new(layout: &'a Layout) -> Host<'a> {
        Host { layout }
    }

    /// Reads `state.json` (missing: an empty state).
    pub fn load(&self) -> Result<State, StateError> {
        State::load(&self.layout.paths().state_file)
    }

    fn save(&self, state: &State) -> Result<(), StateError> {
        state.save(&self.layout.paths().state_file)
    }

    /// The releases on disk, newest first, with what `current` and the state say of each.
    pub fn releases(&self) -> Result<Vec<ReleaseEntry>, HostError> {
        let state = self.load()?;
        let serving = self.layout.current_id();
        Ok(self
            .layout
            .release_ids()?
            .into_iter()
            .rev()
            .map(|id| {
                let manifest = self.layout.manifest(&id);
                let serves = serving.as_deref() == Some(id.as_str());
                ReleaseEntry::new(id, manifest, &state, serves)
            })
            .collect())
    }

    /// Records how an attempt ended; returns the state as saved.
    pub fn record(&self, attempt: Attempt) -> Result<State, StateError> {
        let mut state = self.load()?;
        state.record(attempt);
        self.save(&state)?;
        Ok(state)
    }

    /// The serving release, if it is intact and its artifact is the one described: the same
    /// SHA-256 when one is expected, else the same object and ETag.
    pub fn serving_same(
        &self,
        object: &S3Object,
        expected_sha256: Option<&str>,
    ) -> Result<Option<String>, StateError> {
        let Some(cur) = self.load()?.current else {
            return Ok(None);
        };
        if self.layout.current_id().as_deref() != Some(cur.id.as_str())
            || self.layout.manifest(&cur.id).is_err()
        {
            return Ok(None);
        }
        let same = match expected_sha256 {
            Some(sha) => sha.eq_ignore_ascii_case(&cur.sha256),
            None => {
                cur.artifact.bucket == object.bucket
                    && cur.artifact.key == object.key
                    && cur.artifact.etag() == object.etag()
            }
        };
        Ok(same.then_some(cur.id))
    }

    /// Switches `current` to the new release and records it as serving (the old one becomes
    /// previous-good); then removes releases beyond the newest `keep`, never the two recorded.
    pub fn activate(&self, manifest: &Manifest, keep: usize) -> Result<(), HostError> {
        let mut state = self.load()?;
        self.layout.switch_current(&manifest.id)?;
        let summary = manifest.summary();
        if let Some(previous) = state.current.take()
            && previous.id != summary.id
        {
            state.previous_good = Some(previous);
        }
        state.current = Some(summary);
        raise_high_water(&mut state, manifest);
        self.save(&state)?;
        let protect: Vec<&str> = [state.current.as_ref(), state.previous_good.as_ref()]
            .into_iter()
            .flatten()
            .map(|r| r.id.as_str())
            .collect();
        let removed = self.layout.retain(keep, &protect)?;
        if !removed.is_empty() {
            tracing::info!(removed = ?removed, keep, "removed old releases");
        }
        Ok(())
    }

    /// Puts `current` and the serving/previous-good records back as they were in `before`,
    /// after a failed start (the attempt history is kept).
    pub fn revert(&self, before: &State) -> Result<(), HostError> {
        let mut state = self.load()?;
        match &before.current {
            Some(p) => self.layout.switch_current(&p.id)?,
            None => self.layout.remove_current()?,
        }
        state.current = before.current.clone();
        state.previous_good = before.previous_good.clone();
        state.high_water = before.high_water.clone();
        self.save(&state)?;
        Ok(())
    }

    /// The newest signed release accepted for `scope` (`{app}/{environment}`).
    pub fn high_water(&self, scope: &str) -> Result<Option<HighWater>, StateError> {
        Ok(self.load()?.high_water.get(scope).cloned())
    }

    /// The release `deployd rollback` goes to: `id`, else the previous good one.
    pub fn rollback_target(&self, id: Option<&str>) -> Result<String, HostError> {
        match id {
            Some(id) => Ok(id.to_string()),
            None => self
                .load()?
                .previous_good
                .map(|r| r.id)
                .ok_or_else(|| ReleaseError::NothingToRollBack.into()),
        }
    }

    /// Makes `manifest`'s release the serving one on an operator's request, recording
    /// `attempt`; the release that served becomes previous-good.
    pub fn roll_back_to(&self, manifest: &Manifest, attempt: Attempt) -> Result<State, HostError> {
        let mut state = self.load()?;
        self.layout.switch_current(&manifest.id)?;
        let old = state.current.replace(manifest.summary());
        if let Some(old) = old.filter(|o| o.id != manifest.id) {
            state.previous_good = Some(old);
        }
        state.record(attempt);
        self.save(&state)?;
        Ok(state)
    }

    /// Makes the disk and `state.json` agree, before anything else happens in a process that
    /// deploys: staging debris of dead runs is removed; `current` must name a complete release
    /// (else it is pointed at the recorded or newest complete one, or removed); the state's
    /// serving record is corrected to match. Returns what serves.
    pub fn reconcile(&self) -> Result<Option<ReleaseSummary>, HostError> {
        let layout = self.layout;
        layout.ensure()?;
        let debris = layout.clean_staging()?;
        if debris > 0 {
            tracing::warn!(
                entries = debris,
                "removed staging debris from an interrupted deployment"
            );
        }
        let missing = !layout.paths().state_file.exists();
        let mut state = match self.load() {
            Ok(s) if !missing => s,
            loaded => {
                if let Err(error) = loaded {
                    tracing::warn!(%error, "state file unreadable; rebuilding it from the releases on disk");
                }
                // The high-water marks come back from the releases' manifests, so losing
                // state.json does not reopen the door to rollbacks.
                let mut state = State::default();
                for id in layout.release_ids().unwrap_or_default() {
                    if let Ok(m) = layout.manifest(&id) {
                        let m = Manifest {
                            downgrade: false,
                            ..m
                        };
                        raise_high_water(&mut state, &m);
                    }
                }
                if !state.high_water.is_empty() {
                    tracing::warn!(
                        scopes = ?state.high_water.keys().collect::<Vec<_>>(),
                        "rebuilt the high-water marks from the releases' manifests"
                    );
                    self.save(&state)?;
                }
                state
            }
        };
        let intact = |id: &str| layout.manifest(id).is_ok();
        let mut serving = layout.current_id().filter(|id| intact(id));
        if serving.is_none() {
            // `current` is missing, dangling or names an incomplete release: fall back to the
            // recorded one, else the newest complete release.
            let candidate = state
                .current
                .as_ref()
                .map(|c| c.id.clone())
                .filter(|id| intact(id))
                .or_else(|| {
                    layout
                        .release_ids()
                        .ok()?
                        .into_iter()
                        .rev()
                        .find(|id| intact(id))
                });
            if let Some(id) = &candidate {
                tracing::warn!(release = %id, "`current` did not name a complete release; repointed it");
                layout.switch_current(id)?;
            } else if std::fs::symlink_metadata(&layout.paths().current).is_ok() {
                tracing::warn!("`current` named no complete release and none exists; removed it");
                layout.remove_current()?;
            }
            serving = candidate;
        }
        let recorded = state.current.as_ref().map(|c| c.id.clone());
        if recorded != serving {
            state.current = match &serving {
                Some(id) => Some(layout.manifest(id)?.summary()),
                None => None,
            };
            tracing::warn!(
                recorded = recorded.as_deref().unwrap_or("-"),
                serving = serving.as_deref().unwrap_or("-"),
                "state.json disagreed with `current`; corrected it"
            );
            self.save(&state)?;
        }
        tracing::info!(
            serving = serving.as_deref().unwrap_or("nothing"),
            "reconciled"
        );
        Ok(state.current)
    }
}

/// Moves the high-water mark for `manifest`'s signed release: up to its sequence, or to it
/// whatever it was when the operator allowed a downgrade. Unsigned releases leave it alone.
fn raise_high_water(state: &mut State, manifest: &Manifest) {
    let Some(identity) = &manifest.identity else {
        return;
    };
    let scope = identity.scope();
    let higher = state
        .high_water
        .get(&scope)
        .is_none_or(|hw| identity.sequence > hw.sequence);
    if higher || manifest.downgrade {
        state.high_water.insert(
            scope,
            HighWater {
                sequence: identity.sequence,
                key: identity.key.clone(),
                accepted_at: now_rfc3339(),
                downgraded: manifest.downgrade && !higher,
            },
        );
    }
}
