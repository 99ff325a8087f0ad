//! The deployment pipeline: one module per stage, driven by [`Deployer`].
//!
//! ```text
//! resolve ─► (pointer) ─► verify ─► fetch ∥ unpack ─► install ─► build ─► activate ─► run ─► report
//! source     contract::   verify    fetch, unpack,    release    containers (glue:     state   report
//!            pointer                download          (staging    deploy::containers)
//!                                                      → releases)
//! ```
//!
//! [`Deployer`] owns the clients and paths and runs one deployment at a time (a `flock` on the
//! state directory guards against a second process). Every attempt, successful or not, is
//! recorded in `state.json` and `status.json` ([`state::Host`] owns every change to them).
//! Until `activate`, a failure leaves the host exactly as it was: the staged tree is removed
//! and `current` is not touched; a release whose containers do not become healthy is rolled
//! back to the previous one.
//!
//! Fetch and unpack run concurrently for unsigned artifacts ([`download`]): the download streams
//! into a bounded channel while the unpacker reads it on a blocking thread, so memory does not
//! grow with the artifact's size. With `[source] public_key` the artifact is spooled, its
//! signature and SHA-256 verified, and only then unpacked.
//!
//! A release pointer (`DEPLOYMENT_POINTER`, `[source] pointer_key`) is read right after
//! resolving and replaced by the artifact it names, with the pointer's digest as the expected
//! SHA-256. With `[source] public_key` the pointer must be signed, and the pointer and the
//! artifact's signed identities are checked against where they were found and against the
//! newest release accepted here ([`trust`]). Each attempt is also reported outward ([`crate::report::outward`]): EC2 instance
//! tags at its start (concurrently with the pipeline) and end, and the metrics file.

mod containers;
mod download;
pub mod fetch;
pub mod release;
pub mod source;
pub mod state;
pub mod trust;
pub mod unpack;
pub mod verify;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use aws_sdk_s3::Client;
use tokio::sync::watch;

use crate::config::Config;
use crate::config::envfile::{EnvFile, EnvFileError};
use crate::containers::{ContainerError, Engine, ReleaseRef};
use crate::contract::host::Manifest;
use crate::contract::now_rfc3339;
use crate::contract::pointer::PointerError;
use crate::contract::signature::SignatureError;
use crate::contract::state::{Attempt, Outcome, Stage, StateError};
use crate::error::{ExitCode, exit_codes};
use crate::instance::Instance;
use crate::instance::tags::Update;
use crate::report::Reporter;
use crate::report::metrics::Metrics;
use crate::s3::S3Object;
use crate::scrub::scrub;
use download::Staged;
use fetch::FetchError;
use release::{Layout, ReleaseError};
use source::{Artifact, Origin, SourceError};
use state::{Host, HostError};
use trust::TrustError;
use unpack::UnpackError;
use verify::{Verified, VerifyError};

/// How long an attempt runs before the instance is tagged `deploying` even though it has not
/// yet found that it has work to do.
const DEPLOYING_TAG_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// What one attempt aims at, learnt as the pipeline goes.
struct Aim {
    /// The artifact, as soon as it is known.
    object: Option<S3Object>,
    /// The commit it was built from, as soon as it is known.
    commit: Option<String>,
    /// Told when the release is found not to be serving already.
    started: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Aim {
    fn begin(&mut self) {
        if let Some(tx) = self.started.take() {
            let _ = tx.send(());
        }
    }
}

/// What to deploy and how.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// An explicit artifact (trigger file or `--bucket/--key`).
    pub target: Option<S3Object>,
    /// Deploy even if the same artifact is already serving.
    pub force: bool,
    /// Rebuild container images without cache.
    pub force_rebuild: bool,
    /// Remove the project's images and builder cache first.
    pub clear_cache: bool,
    /// Accept a signed release older than the newest one accepted here.
    pub allow_downgrade: bool,
    /// What asked for this deployment, for the log and the state.
    pub trigger: String,
}

/// A successful deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// A new release serves.
    Deployed {
        /// Its id.
        release: String,
    },
    /// The same artifact was already serving; nothing changed.
    Unchanged {
        /// The serving release.
        release: String,
    },
}

/// Why a deployment failed; each variant names what was being acted on.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The environment file is unreadable or malformed.
    #[error(transparent)]
    EnvFile(#[from] EnvFileError),
    /// No usable artifact source.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The release pointer could not be read.
    #[error(transparent)]
    Pointer(#[from] PointerError),
    /// The signature is missing, from another key, or does not match.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// A signed release or pointer is not what its place requires, or is too old.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// A head-object check failed.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The download failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The archive was refused or is broken.
    #[error("unpacking {object} failed: {source}")]
    Unpack {
        /// The artifact.
        object: S3Object,
        /// Why.
        #[source]
        source: UnpackError,
    },
    /// The downloaded bytes do not have the expected SHA-256.
    #[error(
        "checksum mismatch for {object}: expected SHA-256 {expected} ({expected_from}), downloaded {actual}; nothing was activated"
    )]
    Checksum {
        /// The artifact.
        object: S3Object,
        /// The digest it should have had.
        expected: String,
        /// Where that expectation came from.
        expected_from: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// The disk filled up while the artifact was being written; nothing was activated.
    #[error(
        "no space left on the filesystem of {path} while {action}: it needs {needed}, {free} is free; nothing was activated: free some space and deploy again"
    )]
    NoSpace {
        /// The file being written when the disk filled up.
        path: std::path::PathBuf,
        /// What was being done (`unpacking s3://b/k`).
        action: String,
        /// How much space it needs (exactly, or a lower bound: `more than 3 MiB`).
        needed: String,
        /// What the filesystem had free at the end.
        free: String,
    },
    /// A release on disk, `current` or `state.json` could not be changed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The container stage failed (the host is as it was, or says what it is not).
    #[error(transparent)]
    Container(Box<ContainerError>),
    /// The new release was unhealthy and the previous release's containers serve again.
    #[error(transparent)]
    RolledBack(Box<ContainerError>),
    /// Shutdown interrupted the deployment at a safe point.
    #[error("the deployment was interrupted by shutdown; the serving release is unchanged")]
    Cancelled,
    /// A background task failed unexpectedly.
    #[error("internal error while {0}")]
    Internal(String),
}

impl From<ContainerError> for DeployError {
    fn from(e: ContainerError) -> Self {
        DeployError::Container(Box::new(e))
    }
}

// The host's own errors reach a deployment directly as often as through a transition.
impl From<ReleaseError> for DeployError {
    fn from(e: ReleaseError) -> Self {
        DeployError::Host(e.into())
    }
}

impl From<StateError> for DeployError {
    fn from(e: StateError) -> Self {
        DeployError::Host(e.into())
    }
}

exit_codes!(DeployError {
    EnvFile(e) => e.exit_code(),
    Source(e) => e.exit_code(),
    Pointer(e) => e.exit_code(),
    Signature(e) => e.exit_code(),
    Trust(e) => e.exit_code(),
    Verify(e) => e.exit_code(),
    Fetch(e) => e.exit_code(),
    Unpack { source, .. } => source.exit_code(),
    Checksum { .. } => DATAERR,
    NoSpace { .. } => SOFTWARE,
    Host(e) => e.exit_code(),
    Container(e) | RolledBack(e) => e.exit_code(),
    Cancelled => TEMPFAIL,
    Internal(_) => SOFTWARE,
});

/// Runs deployments for one host.
pub struct Deployer {
    cfg: Config,
    s3: Client,
    instance: Arc<Instance>,
    layout: Layout,
    reporter: Arc<Reporter>,
    metrics: Metrics,
    /// Becomes `true` when the daemon is asked to stop.
    cancel: Option<watch::Receiver<bool>>,
    /// The Docker engine, connected on first use.
    engine: tokio::sync::OnceCell<Engine>,
}

impl Deployer {
    /// A deployer for `cfg`, reporting through `reporter`.
    pub fn new(cfg: Config, s3: Client, reporter: Arc<Reporter>) -> Deployer {
        Deployer {
            instance: Arc::new(Instance::of_fleet(&cfg.report, &cfg.app, &cfg.environment)),
            metrics: Metrics::new(&cfg),
            layout: Layout::new(cfg.paths()),
            cfg,
            s3,
            reporter,
            cancel: None,
            engine: tokio::sync::OnceCell::new(),
        }
    }

    /// Lets `cancel` interrupt deployments at their next safe point.
    pub fn with_cancel(mut self, cancel: watch::Receiver<bool>) -> Deployer {
        self.cancel = Some(cancel);
        self
    }

    /// The configuration this deployer runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The S3 client.
    pub fn s3(&self) -> &Client {
        &self.s3
    }

    /// This instance (identity and tags), shared with the source poller.
    pub fn instance(&self) -> Arc<Instance> {
        self.instance.clone()
    }

    /// The host's `current` and `state.json`.
    pub fn host(&self) -> Host<'_> {
        Host::new(&self.layout)
    }

    /// Reconciles the host holding the deployment lock (see [`Host::reconcile`]); when another
    /// process holds it, that process is mid-deployment and its staging is not debris, so the
    /// host is left alone and what `state.json` records is returned.
    pub fn reconcile(&self) -> Result<Option<crate::contract::state::ReleaseSummary>, HostError> {
        match self.layout.lock() {
            Ok(_lock) => self.host().reconcile(),
            Err(ReleaseError::Busy { path }) => {
                tracing::warn!(lock = %path.display(), "another deployment is running; not reconciling the host now");
                Ok(self.host().load()?.current)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Resolves when cancellation is requested; never, without a cancel channel.
    async fn cancelled(&self) {
        if let Some(rx) = &self.cancel {
            let mut rx = rx.clone();
            if rx.wait_for(|stop| *stop).await.is_ok() {
                return;
            }
        }
        std::future::pending::<()>().await
    }

    fn check_cancel(&self) -> Result<(), DeployError> {
        match &self.cancel {
            Some(rx) if *rx.borrow() => Err(DeployError::Cancelled),
            _ => Ok(()),
        }
    }

    /// Runs `fut` unless cancellation comes first.
    async fn cancellable<T, E>(
        &self,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, DeployError>
    where
        DeployError: From<E>,
    {
        tokio::select! {
            r = fut => r.map_err(DeployError::from),
            _ = self.cancelled() => Err(DeployError::Cancelled),
        }
    }

    /// Runs one deployment and records its outcome.
    pub async fn deploy(&self, req: &Request) -> Result<Done, DeployError> {
        let _lock = self.layout.lock()?;
        let started_at = now_rfc3339();
        let clock = Instant::now();
        self.reporter.begin(&req.trigger);
        self.instance.new_deployment();
        let (started, begun) = tokio::sync::oneshot::channel();
        let mut aim = Aim {
            object: None,
            commit: None,
            started: Some(started),
        };
        // "deploying" is tagged once the release is found not to be serving already, or after
        // DEPLOYING_TAG_DELAY; an attempt that ends sooner (nothing to do) writes no tag.
        let tag_start = async {
            let write = match tokio::time::timeout(DEPLOYING_TAG_DELAY, begun).await {
                // Past the "already serving" check.
                Ok(Ok(())) => true,
                // The attempt ended first.
                Ok(Err(_)) => false,
                // Still running after the delay (a wait for the artifact, say).
                Err(_) => true,
            };
            if write {
                self.instance.write_tags(&Update::deploying()).await;
            }
        };
        let ((), result) = tokio::join!(tag_start, self.run(req, &mut aim));
        let target = aim.object.clone();

        let (outcome, release, error, code) = match &result {
            Ok(Done::Deployed { release }) => (Outcome::Deployed, Some(release.clone()), None, 0),
            Ok(Done::Unchanged { release }) => (Outcome::Unchanged, Some(release.clone()), None, 0),
            Err(e @ DeployError::RolledBack(_)) => (
                Outcome::RolledBack,
                None,
                Some(scrub(&e.to_string())),
                e.exit_code(),
            ),
            Err(e) => (
                Outcome::Failed,
                None,
                Some(scrub(&e.to_string())),
                e.exit_code(),
            ),
        };
        let attempt = Attempt {
            started_at,
            finished_at: now_rfc3339(),
            outcome,
            trigger: req.trigger.clone(),
            artifact: target,
            release,
            error,
            exit_code: code,
        };
        // A state file that cannot be written (a full disk) must not hide how the attempt
        // ended: the status, the log and the tags still say it; the old state.json stays.
        let (serving, recorded) = match self.host().record(attempt.clone()) {
            Ok(state) => (state.current, Ok(())),
            Err(error) => {
                tracing::error!(%error, "could not record the attempt in state.json");
                (self.host().load().ok().and_then(|s| s.current), Err(error))
            }
        };
        self.reporter.finish(&attempt, serving.clone());
        let commit = aim.commit.clone().unwrap_or_default();
        self.report_outward(&attempt, serving.as_ref(), true, Some(&commit))
            .await;
        let result = match (result, recorded) {
            (Ok(_), Err(error)) => Err(HostError::State(error).into()),
            (result, _) => result,
        };
        match &result {
            Ok(done) => tracing::info!(
                outcome = outcome.as_str(),
                release = attempt.release.as_deref().unwrap_or("-"),
                seconds = clock.elapsed().as_secs_f64(),
                "deployment finished: {done:?}"
            ),
            Err(e) => tracing::error!(
                exit_code = code,
                seconds = clock.elapsed().as_secs_f64(),
                error = %scrub(&e.to_string()),
                "deployment failed"
            ),
        }
        result
    }

    /// The pipeline; `aim` learns the artifact and its commit as soon as they are known.
    async fn run(&self, req: &Request, aim: &mut Aim) -> Result<Done, DeployError> {
        // Under the lock: whatever a killed run left (staging trees, temporary files, a
        // `current` naming an incomplete release) is cleaned up before anything else, by a
        // one-shot `deploy` as much as by the daemon.
        self.host().reconcile()?;
        self.reporter.stage(Stage::Resolving, None);
        self.learn_bucket_owner().await;
        let keys = self.cfg.source.trusted_keys().map_err(|e| {
            DeployError::Internal(format!("reading [source] public_key, which {e}"))
        })?;
        let env = EnvFile::load(&self.cfg.environment_file)?;
        let artifact = self
            .cancellable(source::resolve(
                &self.cfg,
                &env,
                req.target.clone(),
                &self.instance,
            ))
            .await?;
        aim.object = Some(artifact.object.clone());
        let (artifact, statement, commit) = self.follow_pointer(artifact, keys.as_ref()).await?;
        aim.object = Some(artifact.object.clone());
        aim.commit = commit;
        self.reporter.artifact(&artifact.object);
        if artifact.origin == Origin::Legacy {
            tracing::warn!(
                artifact = %artifact,
                source = %artifact.origin,
                "deploying from the legacy mutable path; publish versioned keys and set DEPLOYMENT_KEY"
            );
        } else {
            tracing::info!(artifact = %artifact, source = %artifact.origin, "resolved artifact");
        }

        let mut retried_after_replace = false;
        let (verified, staged, signed) = loop {
            self.reporter
                .stage(Stage::Verifying, Some(artifact.to_string()));
            let verified = self
                .cancellable(verify::verify(&self.s3, &artifact, &self.cfg.source))
                .await?;
            if aim.commit.as_deref().is_none_or(str::is_empty) {
                aim.commit = verified.commit().map(str::to_string);
            }
            // A signature's identity is checked before "already serving": an old release
            // copied over the requested key must be refused, not reported as unchanged.
            let signed = match &keys {
                Some(keys) => Some(
                    self.check_signed(&verified.object, keys, statement.as_ref())
                        .await?,
                ),
                None => None,
            };
            if !(req.force || req.force_rebuild || req.clear_cache)
                && let Some(release) = self
                    .host()
                    .serving_same(&verified.object, verified.expected_sha256.as_deref())?
            {
                tracing::info!(release = %release, "this artifact is already serving; nothing to do (use --force to redeploy it)");
                return Ok(Done::Unchanged { release });
            }
            aim.begin();
            let signed = match signed {
                Some(s) => Some(self.check_sequence(s, req, statement.as_ref())?),
                None => None,
            };
            self.reporter
                .stage(Stage::Fetching, Some(verified.object.to_string()));
            match self
                .fetch_and_unpack(&verified, signed.as_ref().map(|s| &s.signed))
                .await
            {
                Ok(staged) => break (verified, staged, signed),
                Err(DeployError::Fetch(FetchError::Replaced(_))) if !retried_after_replace => {
                    retried_after_replace = true;
                    tracing::warn!(artifact = %verified.object, "artifact was replaced during the download; verifying it again");
                }
                Err(e) => return Err(e),
            }
        };
        check_sha256(&verified, &staged.downloaded)?;

        // The last safe point: from here to the end the work is synchronous and short, or
        // (containers) not interruptible without leaving a half-started release.
        self.check_cancel()?;
        self.reporter.stage(Stage::Activating, None);
        let mut manifest = self.manifest(&artifact, &verified, &staged);
        if let Some(s) = signed {
            manifest.identity = Some(s.identity);
            manifest.downgrade = s.downgrade;
        }
        let id = manifest.id.clone();
        self.reporter.release(&id, manifest.commit());
        let containers = self.has_containers(staged.staging.path());
        if containers {
            // A broken compose file is refused before anything is installed or built.
            let release = ReleaseRef {
                id: &id,
                dir: staged.staging.path(),
                commit: manifest.commit(),
            };
            Engine::load_project(&self.cfg.app, &release, &env.vars, &self.cfg.containers)?;
        } else if self.cfg.containers.enabled {
            tracing::info!(
                compose_file = %self.cfg.containers.compose_file,
                "the release has no compose file; skipping the container stage"
            );
        }
        let resumes = staged.downloaded.resumes;
        let release_dir = self.layout.install(staged.staging, &manifest)?;
        if containers {
            self.check_cancel()?;
            if let Err(e) = self
                .build_and_run(req, &release_dir, &env.vars, &manifest)
                .await
            {
                if !matches!(e, DeployError::RolledBack(_)) {
                    // Never activated: its tree is of no use to anyone.
                    if let Err(error) = self.layout.discard(&id) {
                        tracing::warn!(release = %id, %error, "could not remove the release that was never activated");
                    }
                }
                return Err(e);
            }
        } else {
            self.host().activate(&manifest, self.cfg.releases.keep)?;
        }
        tracing::info!(
            release = %id,
            commit = manifest.commit().unwrap_or("-"),
            sha256 = %manifest.sha256,
            files = manifest.unpacked.files,
            bytes = manifest.unpacked.bytes,
            resumes,
            "release activated"
        );
        Ok(Done::Deployed { release: id })
    }

    /// The manifest of the release about to be installed.
    fn manifest(&self, artifact: &Artifact, verified: &Verified, staged: &Staged) -> Manifest {
        let short = verified
            .commit()
            .filter(|c| c.len() >= 8 && c.bytes().all(|b| b.is_ascii_hexdigit()))
            .map_or_else(
                || staged.downloaded.sha256[..8].to_string(),
                |c| c[..8].to_ascii_lowercase(),
            );
        Manifest {
            id: self.layout.new_release_id(&short),
            app: self.cfg.app.clone(),
            artifact: verified.object.clone(),
            sha256: staged.downloaded.sha256.clone(),
            sha256_verified_against: verified.sha256_source.clone(),
            size: verified.size,
            compression: staged.compression,
            metadata: verified.metadata.clone(),
            last_modified: verified.last_modified.clone(),
            unpacked: staged.stats.clone(),
            fetched_at: humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
            source: artifact.origin.to_string(),
            identity: None,
            downgrade: false,
        }
    }

    /// Reports how an attempt ended to the metrics file and the EC2 instance tags.
    async fn report_outward(
        &self,
        attempt: &Attempt,
        serving: Option<&crate::contract::state::ReleaseSummary>,
        deployment: bool,
        target: Option<&str>,
    ) {
        let artifact_bytes = serving
            .and_then(|r| self.layout.manifest(&r.id).ok())
            .map(|m| m.size);
        crate::report::outward(
            &self.metrics,
            &self.instance,
            &self.reporter,
            attempt,
            serving,
            artifact_bytes,
            deployment,
            target,
        )
        .await;
    }
}

/// The downloaded bytes must have the expected SHA-256, when one is known.
fn check_sha256(v: &Verified, downloaded: &fetch::Downloaded) -> Result<(), DeployError> {
    match &v.expected_sha256 {
        Some(expected) if !expected.eq_ignore_ascii_case(&downloaded.sha256) => {
            Err(DeployError::Checksum {
                object: v.object.clone(),
                expected: expected.clone(),
                expected_from: v.sha256_source.clone().unwrap_or_default(),
                actual: downloaded.sha256.clone(),
            })
        }
        _ => Ok(()),
    }
}
