//! The daemon, `deployd run`: one [`Agent`] loop that owns the clients and runs one deployment
//! at a time.
//!
//! ```text
//! startup ─► reconcile ─► first deployment ─► READY=1 ─► wait for triggers ─┐
//!                                              ▲                            │
//!                                              └─── deployment ◄────────────┘
//!   triggers: SIGHUP (systemctl reload), files in <runtime_dir>/triggers/, startup
//! ```
//!
//! - **Reconcile** at startup: staging debris is removed; `current` must name a complete
//!   release (manifest present), else it is pointed at the newest complete one; `state.json`
//!   is corrected to agree with `current`. Trigger files already waiting are picked up, since
//!   inotify misses what was dropped while deployd was down.
//! - **Readiness** over `NOTIFY_SOCKET`: `READY=1` once the first deployment has finished
//!   (serving, or failed with the reason in `STATUS=`); `STATUS=` at every stage; on SIGHUP,
//!   `RELOADING=1` with `MONOTONIC_USEC`, then `READY=1` when that redeploy ends; `STOPPING=1`
//!   on shutdown; `WATCHDOG=1` from this loop itself, so a wedged loop is restarted by systemd.
//! - **SIGHUP** re-reads the config (an invalid one is logged and the old one kept) and queues
//!   a redeploy. The environment file is re-read by every deployment anyway.
//! - **Triggers coalesce**: while a deployment runs, any number of triggers queue one more.
//! - **Stopping** (the injected `shutdown` future, SIGTERM/SIGINT in production): the running
//!   deployment stops at its next safe point (a download or a wait is abandoned and its staging
//!   removed; install and activation are never cut in half), bounded by
//!   `[daemon] stop_timeout`.

pub mod poll;
pub mod sdnotify;
pub mod triggers;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::Instrument;

use self::sdnotify::Notifier;
use self::triggers::{Trigger, TriggerDir, TriggerOrigin, TriggerQueue};
use crate::config::{Config, ConfigError};
use crate::contract::host::{State, StateError, now_rfc3339};
use crate::deploy::release::{Layout, ReleaseError};
use crate::deploy::{Deployer, Done, Request};
use crate::error::{ExitCode, exit};
use crate::report::Reporter;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    S3(#[from] crate::s3::S3SetupError),
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Trigger(#[from] crate::agent::triggers::TriggerError),
    #[error("cannot listen for {signal}: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl ExitCode for AgentError {
    fn exit_code(&self) -> i32 {
        match self {
            AgentError::Config(e) => e.exit_code(),
            AgentError::S3(e) => e.exit_code(),
            AgentError::Release(e) => e.exit_code(),
            AgentError::State(e) => e.exit_code(),
            AgentError::Trigger(e) => e.exit_code(),
            AgentError::Signal { .. } => exit::SOFTWARE,
        }
    }
}

pub struct Agent {
    config_path: Option<PathBuf>,
    deployer: Deployer,
    notifier: Arc<Notifier>,
    reporter: Arc<Reporter>,
    queue: TriggerQueue,
    cancel: watch::Sender<bool>,
    /// Set by SIGHUP: re-read the config before the next deployment.
    reload: Arc<AtomicBool>,
    /// A `RELOADING=1` was sent and awaits its `READY=1`.
    reloading: Arc<AtomicBool>,
    /// The source poller, when `[triggers] poll_interval` is set.
    poller: Option<tokio::task::JoinHandle<()>>,
}

impl Agent {
    /// Builds the agent from a loaded config; `config_path` is re-read on SIGHUP.
    pub async fn new(config_path: Option<PathBuf>, cfg: Config) -> Result<Agent, AgentError> {
        let notifier = Arc::new(Notifier::from_env());
        let sink = {
            let notifier = notifier.clone();
            Box::new(move |text: &str| notifier.status(text)) as crate::report::StatusSink
        };
        let reporter = Arc::new(Reporter::new(cfg.runtime_dir.clone(), false, Some(sink)));
        let (cancel, cancel_rx) = watch::channel(false);
        let s3 = crate::s3::client(&cfg.s3).await?;
        let deployer = Deployer::new(cfg, s3, reporter.clone()).with_cancel(cancel_rx);
        Ok(Agent {
            config_path,
            deployer,
            notifier,
            reporter,
            queue: TriggerQueue::new(),
            cancel,
            reload: Arc::new(AtomicBool::new(false)),
            reloading: Arc::new(AtomicBool::new(false)),
            poller: None,
        })
    }

    /// The queue triggers go into (for tests and for the poller).
    pub fn queue(&self) -> TriggerQueue {
        self.queue.clone()
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        self.reporter.begin("startup");
        self.notifier.status("reconciling");
        self.reconcile()?;

        // Triggers: startup first, then files (the watcher scans what is already there), then
        // SIGHUP. A trigger directory that cannot be watched is logged; SIGHUP still works.
        self.queue.push(Trigger::new(TriggerOrigin::Startup));
        self.poller = crate::agent::poll::spawn(
            &self.deployer.cfg,
            self.deployer.s3.clone(),
            self.queue.clone(),
        );
        let _watch = match self.trigger_dir().and_then(|dir| Ok(dir.watch()?)) {
            Ok((guard, rx)) => {
                tokio::spawn(self.queue.clone().forward(rx));
                Some(guard)
            }
            Err(error) => {
                tracing::error!(%error, "trigger files are not watched; SIGHUP still redeploys");
                None
            }
        };
        let mut hangup = signal(SignalKind::hangup()).map_err(|source| AgentError::Signal {
            signal: "SIGHUP",
            source,
        })?;
        {
            let (queue, notifier) = (self.queue.clone(), self.notifier.clone());
            let (reload, reloading) = (self.reload.clone(), self.reloading.clone());
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    reload.store(true, Ordering::SeqCst);
                    if !reloading.swap(true, Ordering::SeqCst) {
                        notifier.reloading();
                    }
                    queue.push(Trigger::new(TriggerOrigin::Signal));
                }
            });
        }

        let watchdog_every = self.notifier.watchdog_interval();
        let mut watchdog =
            tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        loop {
            let trigger = tokio::select! {
                _ = &mut shutdown => break,
                _ = watchdog.tick(), if watchdog_every.is_some() => {
                    self.notifier.watchdog();
                    continue;
                }
                trigger = self.queue.next() => trigger,
            };
            if self.reload.swap(false, Ordering::SeqCst) {
                self.reload_config().await;
            }
            let deployment = self.deploy(trigger);
            tokio::pin!(deployment);
            let finished = loop {
                tokio::select! {
                    summary = &mut deployment => break Some(summary),
                    _ = watchdog.tick(), if watchdog_every.is_some() => self.notifier.watchdog(),
                    _ = &mut shutdown => break None,
                }
            };
            let Some(summary) = finished else {
                self.stop_deployment(deployment).await;
                self.notifier.stopping_with_status("stopped");
                return Ok(());
            };
            if first {
                first = false;
                self.reloading.store(false, Ordering::SeqCst);
                self.notifier.ready_with_status(&summary);
            } else if self.reloading.swap(false, Ordering::SeqCst) {
                self.notifier.ready_with_status(&summary);
            }
        }
        self.notifier.stopping_with_status("stopped");
        tracing::info!("stopped");
        Ok(())
    }

    /// Asks the running deployment to stop at its next safe point and waits for it, bounded.
    async fn stop_deployment(&self, deployment: std::pin::Pin<&mut impl Future<Output = String>>) {
        let limit = self.deployer.cfg.daemon.stop_timeout.0;
        self.notifier
            .stopping_with_status("stopping: finishing the current stage");
        tracing::info!(
            timeout_s = limit.as_secs(),
            "stopping the running deployment at its next safe point"
        );
        let _ = self.cancel.send(true);
        if tokio::time::timeout(limit, deployment).await.is_err() {
            tracing::warn!("the deployment did not reach a safe point in time; exiting anyway");
        }
    }

    fn trigger_dir(&self) -> Result<TriggerDir, AgentError> {
        let cfg = &self.deployer.cfg;
        Ok(TriggerDir::new(
            cfg.runtime_dir.join("triggers"),
            cfg.trusted_gid()?,
        ))
    }

    /// Runs one deployment for `trigger`; returns the one-line status it ended with.
    async fn deploy(&self, trigger: Trigger) -> String {
        let request = Request {
            target: trigger.bucket.clone().zip(trigger.key.clone()),
            force: false,
            force_rebuild: trigger.force_rebuild,
            clear_cache: trigger.clear_cache,
            trigger: trigger.to_string(),
        };
        let span = tracing::info_span!("deployment", trigger = %trigger);
        tracing::info!(parent: &span, "deployment triggered by {trigger}");
        match self.deployer.deploy(&request).instrument(span).await {
            Ok(Done::Deployed { release }) | Ok(Done::Unchanged { release }) => {
                format!("serving {release} since {}", self.serving_since())
            }
            Err(e) => format!("failed: {e}"),
        }
    }

    fn serving_since(&self) -> String {
        State::load(&self.deployer.layout.state_file)
            .ok()
            .and_then(|s| s.current)
            .map_or_else(now_rfc3339, |c| c.activated_at)
    }

    /// Re-reads the config; an invalid one is logged and the running one kept.
    async fn reload_config(&mut self) {
        let cfg = match Config::load(self.config_path.as_deref()) {
            Ok(cfg) => cfg,
            Err(error) => {
                tracing::error!(%error, "the new config is invalid; keeping the running one");
                self.notifier.status(&format!(
                    "config reload failed, kept the running config: {error}"
                ));
                return;
            }
        };
        let s3 = match crate::s3::client(&cfg.s3).await {
            Ok(s3) => s3,
            Err(error) => {
                tracing::error!(%error, "the new config is unusable; keeping the running one");
                return;
            }
        };
        tracing::info!("config reloaded");
        let deployer =
            Deployer::new(cfg, s3, self.reporter.clone()).with_cancel(self.cancel.subscribe());
        self.deployer = deployer;
        // The poller follows the new config (interval, source, endpoint).
        if let Some(old) = self.poller.take() {
            old.abort();
        }
        self.poller = crate::agent::poll::spawn(
            &self.deployer.cfg,
            self.deployer.s3.clone(),
            self.queue.clone(),
        );
    }

    /// Makes the disk and `state.json` agree before anything else happens.
    fn reconcile(&self) -> Result<(), AgentError> {
        let layout: &Layout = &self.deployer.layout;
        layout.ensure()?;
        let debris = layout.clean_staging()?;
        if debris > 0 {
            tracing::warn!(
                entries = debris,
                "removed staging debris from an interrupted deployment"
            );
        }
        let mut state = match State::load(&layout.state_file) {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, "state file unreadable; rebuilding it from the releases on disk");
                State::default()
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
            } else if std::fs::symlink_metadata(&layout.current).is_ok() {
                tracing::warn!("`current` named no complete release and none exists; removed it");
                let _ = std::fs::remove_file(&layout.current);
            }
            serving = candidate;
        }
        let recorded = state.current.as_ref().map(|c| c.id.clone());
        if recorded != serving {
            state.current = match &serving {
                Some(id) => {
                    let m = layout.manifest(id)?;
                    Some(m.summary())
                }
                None => None,
            };
            tracing::warn!(
                recorded = recorded.as_deref().unwrap_or("-"),
                serving = serving.as_deref().unwrap_or("-"),
                "state.json disagreed with `current`; corrected it"
            );
            state.save(&layout.state_file)?;
        }
        tracing::info!(
            serving = serving.as_deref().unwrap_or("nothing"),
            "reconciled"
        );
        self.reporter.serving(state.current.clone(), None);
        Ok(())
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits the process at once.
pub fn shutdown_signal() -> Result<impl Future<Output = ()>, AgentError> {
    let err = |signal: &'static str| move |source| AgentError::Signal { signal, source };
    let mut term = signal(SignalKind::terminate()).map_err(err("SIGTERM"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(err("SIGINT"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping (send SIGTERM again to exit at once)");
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second stop signal: exiting now");
            std::process::exit(exit::OK);
        });
    })
}
