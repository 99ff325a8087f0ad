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
//! - **Reconcile** at startup ([`crate::deploy::state::Host::reconcile`]): staging debris is
//!   removed; `current` must name a complete release (manifest present), else it is pointed at
//!   the newest complete one; `state.json` is corrected to agree with `current`. Trigger files already waiting are picked up, since
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
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::{Config, ConfigError};
use crate::contract::state::Stage;
use crate::deploy::state::HostError;
use crate::deploy::{Deployer, Done, Request};
use crate::error::{exit, exit_codes};
use crate::report::Reporter;
use sdnotify::Notifier;
use triggers::{Trigger, TriggerDir, TriggerOrigin, TriggerQueue};

/// Why the daemon could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The S3 client cannot be built.
    #[error(transparent)]
    S3(#[from] crate::s3::S3SetupError),
    /// Reconciling the host failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The trigger directory is unusable.
    #[error(transparent)]
    Trigger(#[from] triggers::TriggerError),
    /// A signal handler could not be installed.
    #[error("cannot listen for {signal}: {source}")]
    Signal {
        /// SIGHUP, SIGTERM, SIGINT.
        signal: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

exit_codes!(AgentError {
    Config(e) => e.exit_code(),
    S3(e) => e.exit_code(),
    Host(e) => e.exit_code(),
    Trigger(e) => e.exit_code(),
    Signal { .. } => SOFTWARE,
});

/// Where the daemon stands with systemd's readiness protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentState {
    /// The first deployment has not finished: `READY=1` is still to come. `reloading`: a
    /// SIGHUP already sent `RELOADING=1` meanwhile.
    Starting { reloading: bool },
    /// `READY=1` was sent; nothing awaits an answer.
    Ready,
    /// A SIGHUP sent `RELOADING=1`; `READY=1` follows when the redeploy it queued ends.
    Reloading,
}

/// The daemon: owns the deployer, the trigger sources and the readiness protocol.
pub struct Agent {
    config_path: Option<PathBuf>,
    deployer: Deployer,
    notifier: Arc<Notifier>,
    reporter: Arc<Reporter>,
    queue: TriggerQueue,
    cancel: watch::Sender<bool>,
    state: AgentState,
    /// Set by SIGHUP: re-read the config before the next deployment.
    reload_config: bool,
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
        let reporter = Arc::new(Reporter::new(cfg.paths().status_file, Some(sink)));
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
            state: AgentState::Starting { reloading: false },
            reload_config: false,
            poller: None,
        })
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        self.reporter.begin("startup");
        self.notifier.status(Stage::Reconciling.as_str());
        let serving = self.deployer.reconcile()?;
        self.reporter.serving(serving, None);

        // Triggers: startup first, then files (the watcher scans what is already there), then
        // SIGHUP. A trigger directory that cannot be watched is logged; SIGHUP still works.
        self.queue.push(Trigger::new(TriggerOrigin::Startup));
        self.start_poller();
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

        let watchdog_every = self.notifier.watchdog_interval();
        let mut watchdog =
            tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let trigger = tokio::select! {
                _ = &mut shutdown => break,
                _ = watchdog.tick(), if watchdog_every.is_some() => {
                    self.notifier.watchdog();
                    continue;
                }
                _ = hangup.recv() => {
                    self.on_hangup();
                    continue;
                }
                trigger = self.queue.next() => trigger,
            };
            if std::mem::take(&mut self.reload_config) {
                self.reload_config().await;
            }
            let watchdog_on = watchdog_every.is_some();
            let deployment = deploy(&self.deployer, trigger);
            tokio::pin!(deployment);
            let finished = loop {
                tokio::select! {
                    summary = &mut deployment => break Some(summary),
                    _ = watchdog.tick(), if watchdog_on => self.notifier.watchdog(),
                    // Answered at once (RELOADING=1 now), acted on after this deployment.
                    _ = hangup.recv() => on_hangup(
                        &mut self.state,
                        &mut self.reload_config,
                        &self.notifier,
                        &self.queue,
                    ),
                    _ = &mut shutdown => break None,
                }
            };
            let Some(summary) = finished else {
                self.stop_deployment(deployment).await;
                self.notifier.stopping_with_status("stopped");
                return Ok(());
            };
            if matches!(
                self.state,
                AgentState::Starting { .. } | AgentState::Reloading
            ) {
                self.state = AgentState::Ready;
                self.notifier.ready_with_status(&summary);
            }
        }
        self.notifier.stopping_with_status("stopped");
        tracing::info!("stopped");
        Ok(())
    }

    fn on_hangup(&mut self) {
        on_hangup(
            &mut self.state,
            &mut self.reload_config,
            &self.notifier,
            &self.queue,
        );
    }

    /// Asks the running deployment to stop at its next safe point and waits for it, bounded.
    async fn stop_deployment(&self, deployment: std::pin::Pin<&mut impl Future<Output = String>>) {
        let limit = self.deployer.config().daemon.stop_timeout.0;
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
        let cfg = self.deployer.config();
        Ok(TriggerDir::new(cfg.paths().triggers, cfg.trusted_gid()?))
    }

    /// Starts the source poller when `[triggers] poll_interval` is set, replacing a running one.
    fn start_poller(&mut self) {
        if let Some(old) = self.poller.take() {
            old.abort();
        }
        self.poller = poll::spawn(
            self.deployer.config(),
            self.deployer.s3().clone(),
            self.deployer.instance(),
            self.queue.clone(),
        );
    }

    /// Re-reads the config; an invalid one is logged and the running one kept.
    async fn reload_config(&mut self) {
        let cfg = match Config::load(self.config_path.as_deref()) {
            Ok(cfg) => cfg,
            Err(error) => {
                tracing::error!(error = %crate::scrub::scrub(&error.to_string()), "the new config is invalid; keeping the running one");
                self.notifier.status(&format!(
                    "config reload failed, kept the running config: {error}"
                ));
                return;
            }
        };
        let s3 = match crate::s3::client(&cfg.s3).await {
            Ok(s3) => s3,
            Err(error) => {
                tracing::error!(error = %crate::scrub::scrub(&error.to_string()), "the new config is unusable; keeping the running one");
                return;
            }
        };
        tracing::info!("config reloaded");
        self.deployer =
            Deployer::new(cfg, s3, self.reporter.clone()).with_cancel(self.cancel.subscribe());
        // The poller follows the new config (interval, source, endpoint).
        self.start_poller();
    }
}

/// SIGHUP: re-read the config before the next deployment, queue a redeploy, and tell systemd
/// `RELOADING=1` unless it already awaits a `READY=1`.
fn on_hangup(
    state: &mut AgentState,
    reload_config: &mut bool,
    notifier: &Notifier,
    queue: &TriggerQueue,
) {
    *reload_config = true;
    match *state {
        AgentState::Ready => {
            notifier.reloading();
            *state = AgentState::Reloading;
        }
        AgentState::Starting { reloading: false } => {
            notifier.reloading();
            *state = AgentState::Starting { reloading: true };
        }
        AgentState::Starting { reloading: true } | AgentState::Reloading => {}
    }
    queue.push(Trigger::new(TriggerOrigin::Signal));
}

/// Runs one deployment for `trigger`; returns the one-line status it ended with.
async fn deploy(deployer: &Deployer, trigger: Trigger) -> String {
    let request = Request {
        target: trigger.target(),
        force: false,
        force_rebuild: trigger.force_rebuild,
        clear_cache: trigger.clear_cache,
        allow_downgrade: trigger.allow_downgrade,
        trigger: trigger.to_string(),
    };
    let span = tracing::info_span!("deployment", trigger = %trigger);
    tracing::info!(parent: &span, "deployment triggered by {trigger}");
    match deployer.deploy(&request).instrument(span).await {
        Ok(Done::Deployed { release }) | Ok(Done::Unchanged { release }) => {
            let since = deployer
                .host()
                .load()
                .ok()
                .and_then(|s| s.current)
                .map_or_else(crate::contract::now_rfc3339, |c| c.activated_at);
            format!("serving {release} since {since}")
        }
        Err(e) => format!("failed: {e}"),
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
