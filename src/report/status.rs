//! Report: what the agent is doing, for people and machines.
//!
//! Every stage change and download progress goes to `status.json` in the runtime directory,
//! to an optional status sink (the daemon forwards it to systemd as `STATUS=`), and, for a
//! person at a terminal, to the terminal view ([`crate::report::terminal`]). Progress updates
//! are throttled so that a fast download does not turn into thousands of file writes.
//!
//! The reporter also times the stages of the running deployment (from each `stage()` call to
//! the next, or to `finish()`), for the metrics file ([`crate::report::metrics`]).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::terminal::View;
use crate::contract::now_rfc3339;
use crate::contract::state::{Attempt, ReleaseSummary, Stage, Status};
use crate::s3::S3Object;

/// Receives one-line status texts (for systemd's `STATUS=`).
pub type StatusSink = Box<dyn Fn(&str) + Send + Sync>;

const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The live status of this process's deployments; see the module documentation.
pub struct Reporter {
    status_file: PathBuf,
    status: Mutex<Status>,
    view: Option<View>,
    sink: Option<StatusSink>,
    progress: Mutex<ProgressState>,
    /// Stages of the running deployment and when each began; the end, once finished.
    timings: Mutex<StageTimes>,
    /// Build cache hits and misses of the running deployment, once it has built.
    build: Mutex<Option<(u64, u64)>>,
}

/// Stage names with the instant each began, and the instant the deployment finished.
type StageTimes = (Vec<(Stage, Instant)>, Option<Instant>);

#[derive(Default)]
struct ProgressState {
    started: Option<Instant>,
    last: Option<Instant>,
}

fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

impl Reporter {
    /// Writes `status_file` and tells `sink` (systemd's `STATUS=`).
    pub fn new(status_file: PathBuf, sink: Option<StatusSink>) -> Reporter {
        Reporter {
            status_file,
            status: Mutex::new(Status {
                pid: std::process::id(),
                stage: Stage::Idle,
                updated_at: now_rfc3339(),
                ..Status::default()
            }),
            view: None,
            sink,
            progress: Mutex::new(ProgressState::default()),
            timings: Mutex::new((Vec::new(), None)),
            build: Mutex::new(None),
        }
    }

    /// Also draws `view` on the terminal.
    pub fn with_view(mut self, view: Option<View>) -> Reporter {
        self.view = view;
        self
    }

    /// Build cache hits and misses of the current (or last) deployment; `None` if it built
    /// nothing.
    pub fn build_cache(&self) -> Option<(u64, u64)> {
        *self.build.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seconds spent in each stage by the current (or last) deployment, summed per stage, in
    /// the order the stages first ran.
    pub fn stage_durations(&self) -> Vec<(Stage, Duration)> {
        let t = self.timings.lock().unwrap_or_else(|p| p.into_inner());
        let (stages, end) = &*t;
        let end = end.unwrap_or_else(Instant::now);
        let mut out: Vec<(Stage, Duration)> = Vec::new();
        for (i, (name, began)) in stages.iter().enumerate() {
            let until = stages.get(i + 1).map_or(end, |(_, next)| *next);
            let spent = until.saturating_duration_since(*began);
            match out.iter_mut().find(|(n, _)| n == name) {
                Some((_, d)) => *d += spent,
                None => out.push((*name, spent)),
            }
        }
        out
    }

    fn update(&self, f: impl FnOnce(&mut Status)) -> Status {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut status);
        status.updated_at = now_rfc3339();
        status.write(&self.status_file);
        status.clone()
    }

    fn say(&self, text: &str) {
        if let Some(sink) = &self.sink {
            sink(text);
        }
    }

    /// A deployment started.
    pub fn begin(&self, trigger: &str) {
        self.update(|s| {
            s.deploying = true;
            s.started_at = Some(now_rfc3339());
            s.detail = Some(format!("triggered by {trigger}"));
            s.bytes_done = None;
            s.bytes_total = None;
        });
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = ProgressState::default();
        *self.timings.lock().unwrap_or_else(|p| p.into_inner()) = (Vec::new(), None);
        *self.build.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(view) = &self.view {
            view.begin();
        }
    }

    /// The deployment entered `stage`.
    pub fn stage(&self, stage: Stage, detail: Option<String>) {
        if let Some(view) = &self.view {
            view.stage(stage, detail.as_deref());
        }
        self.timings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .push((stage, Instant::now()));
        let name = stage.as_str();
        match &detail {
            Some(d) => tracing::info!(stage = name, detail = %d, "{name} {d}"),
            None => tracing::info!(stage = name, "{name}"),
        }
        let text = match &detail {
            Some(d) => format!("{name} {d}"),
            None => name.to_string(),
        };
        self.update(|s| {
            s.stage = stage;
            s.detail = detail;
        });
        self.say(&text);
    }

    /// The artifact named by the deployment.
    pub fn artifact(&self, object: &S3Object) {
        self.update(|s| s.artifact = Some(object.clone()));
    }

    /// The release being deployed, once it has an id.
    pub fn release(&self, id: &str, commit: Option<&str>) {
        if let Some(view) = &self.view {
            view.release(id, commit);
        }
    }

    /// Download progress; throttled.
    pub fn progress(&self, done: u64, total: u64) {
        let now = Instant::now();
        let (elapsed, due) = {
            let mut p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
            let started = *p.started.get_or_insert(now);
            let due = done >= total || p.last.is_none_or(|l| now - l >= PROGRESS_EVERY);
            if due {
                p.last = Some(now);
            }
            (now - started, due)
        };
        if !due {
            return;
        }
        let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
        let rate = if elapsed.as_secs_f64() > 0.0 {
            (done as f64 / elapsed.as_secs_f64()) as u64
        } else {
            0
        };
        let (url, text) = {
            let s = self.update(|s| {
                s.bytes_done = Some(done);
                s.bytes_total = Some(total);
            });
            let url = s.artifact.map(|o| o.to_string()).unwrap_or_default();
            (
                url,
                format!(
                    "{pct}% {} of {}, {}/s",
                    human(done),
                    human(total),
                    human(rate)
                ),
            )
        };
        self.say(&format!("fetching {url} {text}"));
        if let Some(view) = &self.view {
            view.download(done, total);
        }
    }

    /// A build of `service` is at step `step` of `steps` (for the terminal's bar).
    pub fn build_step(&self, service: &str, step: usize, steps: usize) {
        if let Some(view) = &self.view {
            view.build_step(service, step, steps);
        }
    }

    /// The image builds of this deployment: `steps` cacheable steps, `cache_hits` of them from
    /// cache.
    pub fn build_report(&self, cache_hits: u64, steps: u64) {
        *self.build.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((cache_hits, steps.saturating_sub(cache_hits)));
        if let Some(view) = &self.view {
            view.build_report(cache_hits, steps);
        }
        self.update(|s| {
            s.detail = Some(format!("{cache_hits} of {steps} build steps from cache"));
        });
    }

    /// The deployment ended; `serving` is what serves now.
    pub fn finish(&self, attempt: &Attempt, serving: Option<ReleaseSummary>) {
        if let Some(view) = &self.view {
            view.finish(attempt, serving.as_ref());
        }
        self.timings.lock().unwrap_or_else(|p| p.into_inner()).1 = Some(Instant::now());
        let text = match (&attempt.error, &serving) {
            (Some(e), _) => format!("failed: {e}"),
            (None, Some(r)) => format!(
                "serving {} since {}",
                r.commit
                    .as_deref()
                    .map_or(r.id.as_str(), |c| &c[..c.len().min(8)]),
                r.activated_at
            ),
            (None, None) => "idle".into(),
        };
        self.update(|s| {
            s.deploying = false;
            s.stage = Stage::Idle;
            s.detail = None;
            s.serving = serving;
            s.last_attempt = Some(attempt.clone());
        });
        self.say(&text);
    }

    /// Sets the serving release without a deployment (startup, rollback).
    pub fn serving(&self, serving: Option<ReleaseSummary>, last: Option<Attempt>) {
        self.update(|s| {
            s.serving = serving;
            if last.is_some() {
                s.last_attempt = last;
            }
        });
    }
}

/// What `deployd status` reads: the live status when a running daemon writes one, and the
/// durable state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Snapshot {
    /// `status.json`, when the process that wrote it is alive.
    pub live: Option<Status>,
    /// `state.json`.
    pub state: crate::contract::state::State,
}

/// `deployd status --wait` gave up.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The deployment did not end in time.
    #[error("timed out waiting for the deployment to finish")]
    Timeout,
    /// `state.json` is unreadable.
    #[error(transparent)]
    State(#[from] crate::contract::state::StateError),
}

impl crate::error::ExitCode for WaitError {
    fn exit_code(&self) -> i32 {
        match self {
            WaitError::Timeout => crate::error::exit::TEMPFAIL,
            WaitError::State(e) => e.exit_code(),
        }
    }
}

impl Snapshot {
    /// Reads both files now.
    pub fn read(
        paths: &crate::contract::host::Paths,
    ) -> Result<Snapshot, crate::contract::state::StateError> {
        Ok(Snapshot {
            live: Status::load(&paths.status_file).filter(|s| pid_alive(s.pid)),
            state: crate::contract::state::State::load(&paths.state_file)?,
        })
    }

    /// Waits (polling every 250 ms) until no deployment runs and at least one was attempted.
    pub async fn wait_settled(
        paths: &crate::contract::host::Paths,
        timeout: Duration,
    ) -> Result<Snapshot, WaitError> {
        let deadline = Instant::now() + timeout;
        loop {
            let snap = Snapshot::read(paths)?;
            let deploying = snap.live.as_ref().is_some_and(|s| s.deploying);
            if !deploying && (snap.live.is_some() || snap.state.last_attempt.is_some()) {
                return Ok(snap);
            }
            if Instant::now() >= deadline {
                return Err(WaitError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The last attempt: the live one, else the recorded one.
    pub fn last_attempt(&self) -> Option<&Attempt> {
        self.live
            .as_ref()
            .and_then(|s| s.last_attempt.as_ref())
            .or(self.state.last_attempt.as_ref())
    }
}

fn pid_alive(pid: u32) -> bool {
    pid != 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}
