//! One deployment, start to finish: resolve → verify → fetch + unpack → activate.
//!
//! [`Deployer`] owns the clients and paths and runs one deployment at a time (a `flock` on
//! the state directory guards against a second process). Every attempt, successful or not, is
//! recorded in `state.json` and `status.json`. Until `activate`, a failure leaves the host
//! exactly as it was: the staged tree is removed and `current` is not touched.
//!
//! Fetch and unpack run concurrently: the download streams into a bounded channel on the async
//! side while the unpacker reads it on a blocking thread, so the artifact never lands on disk
//! whole and memory does not grow with its size. The SHA-256 is compared once the last byte
//! has arrived; a mismatch discards the staged tree.
//!
//! A release pointer (`DEPLOYMENT_POINTER`, `[source] pointer_key`) is read right after
//! resolving and replaced by the artifact it names, with the pointer's digest as the expected
//! SHA-256. With `[source] public_key` set, the artifact's `.minisig` is fetched before the
//! download and checked against the streamed bytes before activation (see [`crate::contract::signature`]).
//! Each attempt is also reported outward: EC2 instance tags at its start (concurrently with the
//! pipeline) and end ([`crate::instance::tags`], bounded in time, never failing the deployment) and the
//! node_exporter metrics file ([`crate::report::metrics`]).

pub mod fetch;
pub mod release;
pub mod source;
pub mod unpack;
pub mod verify;

use std::sync::Arc;
use std::time::Instant;

use aws_sdk_s3::Client;
use tokio::sync::{mpsc, watch};

use self::fetch::{ChannelReader, Downloaded, FetchError};
use self::source::{Artifact, Origin, SourceError};
use self::unpack::{Compression, Stats, UnpackError};
use self::verify::{Verified, VerifyError};
use crate::config::envfile::{EnvFile, EnvFileError};
use crate::config::{Config, ContainersConfig};
use crate::containers::{ContainerError, Engine, ReleaseRef};
use crate::contract::host::{Attempt, Outcome, ReleaseSummary, State, StateError, now_rfc3339};
use crate::contract::pointer::{self, PointerError, PointerRead};
use crate::contract::signature::{self, SignatureError, Signed};
use crate::deploy::release::{Layout, Manifest, ReleaseError, Staging};
use crate::error::{ExitCode, exit};
use crate::instance::imds::Imds;
use crate::instance::tags::{Ec2Tags, TagStatus, Update};
use crate::report::Reporter;
use crate::report::metrics::{self, Metrics};

/// What to deploy and how.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// An explicit bucket and key (trigger file or `--bucket/--key`).
    pub target: Option<(String, String)>,
    /// Deploy even if the same artifact is already serving.
    pub force: bool,
    pub force_rebuild: bool,
    pub clear_cache: bool,
    /// What asked for this deployment, for the log and the state.
    pub trigger: String,
}

/// A successful deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Deployed {
        release: String,
    },
    /// The same artifact was already serving; nothing changed.
    Unchanged {
        release: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    EnvFile(#[from] EnvFileError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Pointer(#[from] PointerError),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("unpacking s3://{bucket}/{key} failed: {source}")]
    Unpack {
        bucket: String,
        key: String,
        #[source]
        source: UnpackError,
    },
    #[error(
        "checksum mismatch for s3://{bucket}/{key}: expected SHA-256 {expected} ({expected_from}), downloaded {actual}; nothing was activated"
    )]
    Checksum {
        bucket: String,
        key: String,
        expected: String,
        expected_from: String,
        actual: String,
    },
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Container(Box<ContainerError>),
    #[error("{source}; release {release} was rolled back and {previous} is serving again")]
    RolledBack {
        release: String,
        previous: String,
        #[source]
        source: Box<ContainerError>,
    },
    #[error("the deployment was interrupted by shutdown; the serving release is unchanged")]
    Cancelled,
    #[error("internal error while {0}")]
    Internal(String),
}

impl From<ContainerError> for DeployError {
    fn from(e: ContainerError) -> Self {
        DeployError::Container(Box::new(e))
    }
}

impl ExitCode for DeployError {
    fn exit_code(&self) -> i32 {
        match self {
            DeployError::EnvFile(e) => e.exit_code(),
            DeployError::Source(e) => e.exit_code(),
            DeployError::Pointer(e) => e.exit_code(),
            DeployError::Signature(e) => e.exit_code(),
            DeployError::Verify(e) => e.exit_code(),
            DeployError::Fetch(e) => e.exit_code(),
            DeployError::Unpack { source, .. } => source.exit_code(),
            DeployError::Checksum { .. } => exit::DATAERR,
            DeployError::Release(e) => e.exit_code(),
            DeployError::State(e) => e.exit_code(),
            DeployError::Container(e) => e.exit_code(),
            DeployError::RolledBack { source, .. } => source.exit_code(),
            DeployError::Cancelled => exit::TEMPFAIL,
            DeployError::Internal(_) => exit::SOFTWARE,
        }
    }
}

/// Runs deployments for one host.
pub struct Deployer {
    pub cfg: Config,
    pub s3: Client,
    pub imds: Imds,
    pub layout: Layout,
    pub reporter: Arc<Reporter>,
    pub metrics: Metrics,
    /// Becomes `true` when the daemon is asked to stop.
    cancel: Option<watch::Receiver<bool>>,
    /// The Docker engine, connected on first use.
    engine: tokio::sync::OnceCell<Engine>,
}

/// How long a deployment waits for the Docker engine to answer (it may start after deployd).
const DOCKER_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// A fetched, unpacked, checksummed tree waiting to be installed.
struct Staged {
    staging: Staging,
    downloaded: Downloaded,
    compression: Compression,
    stats: Stats,
}

impl Deployer {
    pub fn new(cfg: Config, s3: Client, reporter: Arc<Reporter>) -> Deployer {
        let layout = Layout::new(&cfg.state_dir);
        Deployer {
            imds: Imds::with_tags(Ec2Tags::new(&cfg.report)),
            metrics: Metrics::new(&cfg),
            cfg,
            s3,
            layout,
            reporter,
            cancel: None,
            engine: tokio::sync::OnceCell::new(),
        }
    }

    /// The `[containers]` settings as the container stage takes them.
    pub fn container_settings(&self) -> &ContainersConfig {
        &self.cfg.containers
    }

    /// True when containers are enabled and `dir` holds the compose file.
    fn has_containers(&self, dir: &std::path::Path) -> bool {
        self.cfg.containers.enabled && dir.join(&self.cfg.containers.compose_file).is_file()
    }

    /// The Docker engine, waiting for it (with backoff) the first time.
    pub async fn engine(&self) -> Result<&Engine, DeployError> {
        if let Some(engine) = self.engine.get() {
            return Ok(engine);
        }
        self.reporter.stage("waiting for docker", None);
        let engine = self.cancellable(Engine::connect(DOCKER_WAIT)).await?;
        Ok(self.engine.get_or_init(|| async { engine }).await)
    }

    /// Lets `cancel` interrupt deployments at their next safe point.
    pub fn with_cancel(mut self, cancel: watch::Receiver<bool>) -> Deployer {
        self.cancel = Some(cancel);
        self
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
        fut: impl std::future::Future<Output = Result<T, E>>,
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
        let mut target: Option<Artifact> = None;
        let tags = self.imds.tags();
        tags.inspect(|t| t.new_deployment());
        let tag_start = async {
            if let Some(t) = tags {
                t.write(&self.imds, &Update::deploying()).await;
            }
        };
        let ((), result) = tokio::join!(tag_start, self.run(req, &mut target));

        let mut state = State::load(&self.layout.state_file)?;
        let (outcome, release, error, code) = match &result {
            Ok(Done::Deployed { release }) => (Outcome::Deployed, Some(release.clone()), None, 0),
            Ok(Done::Unchanged { release }) => (Outcome::Unchanged, Some(release.clone()), None, 0),
            Err(e @ DeployError::RolledBack { .. }) => (
                Outcome::RolledBack,
                None,
                Some(e.to_string()),
                e.exit_code(),
            ),
            Err(e) => (Outcome::Failed, None, Some(e.to_string()), e.exit_code()),
        };
        let attempt = Attempt {
            started_at,
            finished_at: now_rfc3339(),
            outcome,
            trigger: req.trigger.clone(),
            bucket: target.as_ref().map(|t| t.bucket.clone()),
            key: target.as_ref().map(|t| t.key.clone()),
            release,
            error,
            exit_code: code,
        };
        state.record(attempt.clone());
        state.save(&self.layout.state_file)?;
        self.reporter.finish(&attempt, state.current.clone());
        self.report_outward(&attempt, state.current.as_ref(), true)
            .await;
        match &result {
            Ok(done) => tracing::info!(
                outcome = ?outcome,
                release = attempt.release.as_deref().unwrap_or("-"),
                seconds = clock.elapsed().as_secs_f64(),
                "deployment finished: {done:?}"
            ),
            Err(e) => tracing::error!(
                exit_code = code,
                seconds = clock.elapsed().as_secs_f64(),
                error = %e,
                "deployment failed; the serving release is unchanged"
            ),
        }
        result
    }

    async fn run(&self, req: &Request, target: &mut Option<Artifact>) -> Result<Done, DeployError> {
        self.layout.ensure()?;
        self.reporter.stage("resolving", None);
        let env = EnvFile::load(&self.cfg.environment_file)?;
        let artifact = self
            .cancellable(source::resolve(
                &self.cfg,
                &env,
                req.target.clone(),
                &self.imds,
            ))
            .await?;
        *target = Some(artifact.clone());
        let artifact = self.follow_pointer(artifact).await?;
        *target = Some(artifact.clone());
        self.reporter.artifact(&artifact.bucket, &artifact.key);
        if artifact.origin == Origin::Legacy {
            tracing::warn!(
                bucket = %artifact.bucket,
                key = %artifact.key,
                source = %artifact.origin,
                "deploying from the legacy mutable path; publish versioned keys and set DEPLOYMENT_KEY"
            );
        } else {
            tracing::info!(bucket = %artifact.bucket, key = %artifact.key, source = %artifact.origin, "resolved artifact");
        }

        let mut retried_after_replace = false;
        let (verified, staged) = loop {
            self.reporter.stage("verifying", Some(artifact.to_string()));
            let verified = self
                .cancellable(verify::verify(&self.s3, &artifact, &self.cfg.source))
                .await?;
            if !(req.force || req.force_rebuild || req.clear_cache)
                && let Some(release) = self.already_serving(&verified)?
            {
                tracing::info!(release = %release, "this artifact is already serving; nothing to do (use --force to redeploy it)");
                return Ok(Done::Unchanged { release });
            }
            let signed = match &self.cfg.source.public_key {
                Some(public_key) => Some(
                    signature::fetch(&self.s3, &verified.bucket, &verified.key, public_key).await?,
                ),
                None => None,
            };
            self.reporter.stage("fetching", Some(verified.url()));
            match self.fetch_and_unpack(&verified, signed.as_ref()).await {
                Ok(staged) => break (verified, staged),
                Err(DeployError::Fetch(FetchError::Replaced { .. })) if !retried_after_replace => {
                    retried_after_replace = true;
                    tracing::warn!(bucket = %verified.bucket, key = %verified.key, "artifact was replaced during the download; verifying it again");
                }
                Err(e) => return Err(e),
            }
        };

        check_sha256(&verified, &staged.downloaded)?;

        // The last safe point: from here to the end the work is synchronous and short.
        self.check_cancel()?;
        self.reporter.stage("activating", None);
        let short = verified
            .commit()
            .filter(|c| c.len() >= 8 && c.bytes().all(|b| b.is_ascii_hexdigit()))
            .map_or_else(
                || staged.downloaded.sha256[..8].to_string(),
                |c| c[..8].to_ascii_lowercase(),
            );
        let id = self.layout.new_release_id(&short);
        let manifest = Manifest {
            id: id.clone(),
            app: self.cfg.app.clone(),
            bucket: verified.bucket.clone(),
            key: verified.key.clone(),
            etag: verified.etag.clone(),
            version_id: verified.version_id.clone(),
            sha256: staged.downloaded.sha256.clone(),
            sha256_verified_against: verified.sha256_source.clone(),
            size: verified.size,
            compression: staged.compression,
            metadata: verified.metadata.clone(),
            last_modified: verified.last_modified.clone(),
            unpacked: staged.stats.clone(),
            fetched_at: humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
            source: artifact.origin.to_string(),
        };
        let settings = self.container_settings();
        let commit = verified.commit().map(str::to_string);
        let containers = self.has_containers(staged.staging.path());
        if containers {
            // A broken compose file is refused before anything is installed or built.
            Engine::load_project(
                &self.cfg.app,
                &ReleaseRef {
                    id: &id,
                    dir: staged.staging.path(),
                    commit: commit.as_deref(),
                },
                &env.vars,
                settings,
            )?;
        } else if self.cfg.containers.enabled {
            tracing::info!(
                compose_file = %self.cfg.containers.compose_file,
                "the release has no compose file; skipping the container stage"
            );
        }
        let release_dir = self.layout.install(staged.staging, &manifest)?;
        if containers {
            self.check_cancel()?;
            if let Err(e) = self
                .build_and_run(
                    req,
                    &id,
                    &release_dir,
                    commit.as_deref(),
                    &env.vars,
                    settings,
                    &manifest,
                )
                .await
            {
                if !matches!(e, DeployError::RolledBack { .. }) {
                    // Never activated: its tree is of no use to anyone.
                    let _ = crate::deploy::release::remove_tree(&release_dir);
                }
                return Err(e);
            }
        } else {
            self.activate(&manifest)?;
        }
        tracing::info!(
            release = %id,
            commit = verified.commit().unwrap_or("-"),
            sha256 = %manifest.sha256,
            files = manifest.unpacked.files,
            bytes = manifest.unpacked.bytes,
            resumes = staged.downloaded.resumes,
            "release activated"
        );
        Ok(Done::Deployed { release: id })
    }

    /// Builds the release's images, activates it, and starts its containers behind the health
    /// gate; an unhealthy start is rolled back to the previous release.
    #[allow(clippy::too_many_arguments)]
    async fn build_and_run(
        &self,
        req: &Request,
        id: &str,
        dir: &std::path::Path,
        commit: Option<&str>,
        env: &std::collections::BTreeMap<String, String>,
        settings: &ContainersConfig,
        manifest: &Manifest,
    ) -> Result<(), DeployError> {
        let engine = self.engine().await?;
        let app = &self.cfg.app;
        let release = ReleaseRef { id, dir, commit };
        let project = Engine::load_project(app, &release, env, settings)?;
        let before = State::load(&self.layout.state_file)?;
        let previous = before
            .current
            .clone()
            .filter(|p| p.id != id && self.has_containers(&self.layout.release_dir(&p.id)));
        let previous_dir = previous.as_ref().map(|p| self.layout.release_dir(&p.id));
        let previous_ref = previous
            .as_ref()
            .zip(previous_dir.as_deref())
            .map(|(p, dir)| ReleaseRef {
                id: &p.id,
                dir,
                commit: p.commit.as_deref(),
            });
        if req.clear_cache {
            self.reporter.stage("clearing caches", None);
            let dirs = self.layout.release_dirs()?;
            let report = engine
                .clear_cache(app, &dirs, &settings.clear_paths)
                .await?;
            tracing::info!(?report, "caches cleared");
        }
        self.reporter.stage("building", Some(id.to_string()));
        let built = self
            .cancellable(engine.build(&project, &release, previous_ref.as_ref(), req.force_rebuild))
            .await?;
        for s in &built.services {
            tracing::info!(
                service = %s.service,
                image = %s.image,
                steps = s.steps,
                cache_hits = s.cache_hits,
                seconds = s.duration.as_secs_f64(),
                "built"
            );
        }
        self.reporter.build_report(
            built.cache_hits() as u64,
            built
                .services
                .iter()
                .map(|s| s.cacheable_steps as u64)
                .sum(),
        );
        // From here on the work is not interruptible: a half-started release would be worse.
        self.reporter.stage("starting", Some(id.to_string()));
        self.activate(manifest)?;
        let previous_project = match &previous_ref {
            Some(p) => Engine::load_project(app, p, env, settings).ok(),
            None => None,
        };
        let previous_pair = previous_project.as_ref().zip(previous_ref.as_ref());
        match engine.up(&project, &release, previous_pair, settings).await {
            Ok(up) => {
                tracing::info!(services = up.services.len(), "containers healthy");
            }
            Err(source) => {
                let previous_id = previous.as_ref().map(|p| p.id.clone());
                self.revert(&before)?;
                return Err(match previous_id {
                    Some(previous) => DeployError::RolledBack {
                        release: id.to_string(),
                        previous,
                        source: Box::new(source),
                    },
                    None => DeployError::from(source),
                });
            }
        }
        let keep: Vec<String> = self.layout.release_ids()?;
        match engine.retain(app, &keep).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(images = n, "removed images of releases no longer kept"),
            Err(error) => tracing::warn!(%error, "could not remove old release images"),
        }
        Ok(())
    }

    /// Puts `current` and the serving/previous-good records back as they were in `before`,
    /// after a failed start (the attempt history is kept).
    fn revert(&self, before: &State) -> Result<(), DeployError> {
        let mut state = State::load(&self.layout.state_file)?;
        match &before.current {
            Some(p) => self.layout.switch_current(&p.id)?,
            None => {
                let _ = std::fs::remove_file(&self.layout.current);
            }
        }
        state.current = before.current.clone();
        state.previous_good = before.previous_good.clone();
        state.save(&self.layout.state_file)?;
        Ok(())
    }
    /// Reads the release pointer `artifact` names, if it is one, and returns the artifact the
    /// pointer names, with the pointer's SHA-256 as the expected digest.
    async fn follow_pointer(&self, artifact: Artifact) -> Result<Artifact, DeployError> {
        if !artifact.origin.is_pointer() {
            return Ok(artifact);
        }
        self.reporter
            .stage("reading pointer", Some(artifact.to_string()));
        let PointerRead::Changed { pointer, etag } =
            pointer::read(&self.s3, &artifact.bucket, &artifact.key, None).await?
        else {
            // Without an ETag to compare, S3 never answers 304.
            return Err(DeployError::Internal(format!(
                "reading release pointer {artifact} (unexpected 304)"
            )));
        };
        tracing::info!(
            pointer = %artifact,
            pointer_etag = %etag,
            key = %pointer.key,
            sha256 = %pointer.sha256,
            commit = %pointer.commit,
            published_at = %pointer.published_at,
            "following release pointer"
        );
        Ok(Artifact {
            bucket: artifact.bucket,
            key: pointer.key,
            origin: artifact.origin,
            expected_sha256: Some(pointer.sha256),
        })
    }

    /// The serving release, if it is this very artifact and intact.
    fn already_serving(&self, v: &Verified) -> Result<Option<String>, DeployError> {
        let state = State::load(&self.layout.state_file)?;
        let Some(cur) = state.current else {
            return Ok(None);
        };
        if self.layout.current_id().as_deref() != Some(cur.id.as_str())
            || self.layout.manifest(&cur.id).is_err()
        {
            return Ok(None);
        }
        let same = match &v.expected_sha256 {
            Some(sha) => sha.eq_ignore_ascii_case(&cur.sha256),
            None => cur.bucket == v.bucket && cur.key == v.key && cur.etag == v.etag,
        };
        Ok(same.then_some(cur.id))
    }

    fn unpack_limits(&self) -> unpack::Limits {
        unpack::Limits {
            max_entries: self.cfg.unpack.max_entries,
            max_bytes: self.cfg.unpack.max_bytes.0,
            max_path_len: self.cfg.unpack.max_path_len,
        }
    }

    /// Downloads and unpacks concurrently into a new staging directory; with a signature to
    /// check, downloads, verifies, then unpacks (see [`Self::fetch_verify_unpack`]).
    async fn fetch_and_unpack(
        &self,
        v: &Verified,
        signed: Option<&Signed>,
    ) -> Result<Staged, DeployError> {
        if let Some(signed) = signed {
            return self.fetch_verify_unpack(v, signed).await;
        }
        let staging = self.layout.new_staging()?;
        let dest = staging.path().to_path_buf();
        let limits = self.unpack_limits();
        let (tx, rx) = mpsc::channel(fetch::CHANNEL_DEPTH);
        // The staging guard travels with the unpacker, so that even if this future is dropped
        // (shutdown) the tree is removed only after the unpacker has stopped writing into it.
        let unpacker = tokio::task::spawn_blocking(move || {
            let result = unpack::unpack(ChannelReader::new(rx), &dest, &limits);
            (staging, result)
        });
        let size = v.size;
        let mut progress = |done: u64| self.reporter.progress(done, size);
        // On cancellation the download is dropped, which closes the channel; the unpacker then
        // stops with an error and removes its staging tree before the join below returns.
        let fetched = tokio::select! {
            r = fetch::download(&self.s3, v, tx, &mut progress) => Some(r),
            _ = self.cancelled() => None,
        };
        let (staging, unpacked) = unpacker
            .await
            .map_err(|e| DeployError::Internal(format!("unpacking ({e})")))?;
        let unpack_err = |source| DeployError::Unpack {
            bucket: v.bucket.clone(),
            key: v.key.clone(),
            source,
        };
        let Some(fetched) = fetched else {
            drop(staging);
            return Err(DeployError::Cancelled);
        };
        match (fetched, unpacked) {
            (Ok(downloaded), Ok((compression, stats))) => Ok(Staged {
                staging,
                downloaded,
                compression,
                stats,
            }),
            (Err(FetchError::ConsumerGone), Err(e)) | (Ok(_), Err(e)) => Err(unpack_err(e)),
            (Err(e), _) => Err(e.into()),
        }
    }

    /// The signed path: the artifact is spooled to a file under `staging/` while its SHA-256
    /// and signature are computed, and unpacked from that file only once both verified, so bytes
    /// nobody signed never reach the decompressor or the tar parser. It gives up the overlap of
    /// download and unpack, and needs the artifact's size in disk space while it runs.
    async fn fetch_verify_unpack(
        &self,
        v: &Verified,
        signed: &Signed,
    ) -> Result<Staged, DeployError> {
        let spool = self.layout.new_staging()?;
        let spool_file = spool.path().join("artifact");
        let (tx, rx) = mpsc::channel(fetch::CHANNEL_DEPTH);
        let writer = {
            let path = spool_file.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
                let mut out =
                    std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
                let n = std::io::copy(&mut ChannelReader::new(rx), &mut out)?;
                out.into_inner()
                    .map_err(std::io::IntoInnerError::into_error)?;
                Ok(n)
            })
        };
        let size = v.size;
        let mut progress = |done: u64| self.reporter.progress(done, size);
        let mut verifier = signed.verifier()?;
        let mut observe = |chunk: &[u8]| verifier.update(chunk);
        let fetched = tokio::select! {
            r = fetch::download_observed(&self.s3, v, tx, &mut progress, &mut observe) => Some(r),
            _ = self.cancelled() => None,
        };
        let written = writer
            .await
            .map_err(|e| DeployError::Internal(format!("spooling the artifact ({e})")))?;
        let spool_err = |e: std::io::Error| {
            DeployError::Internal(format!("writing {} ({e})", spool_file.display()))
        };
        let downloaded = match (fetched, written) {
            (None, _) => return Err(DeployError::Cancelled),
            // The spool stopped reading (a full disk, say): its error is the one that explains.
            (Some(Err(FetchError::ConsumerGone)), Err(e)) | (Some(Ok(_)), Err(e)) => {
                return Err(spool_err(e));
            }
            (Some(Err(e)), _) => return Err(e.into()),
            (Some(Ok(downloaded)), Ok(_)) => downloaded,
        };
        signed.finish(verifier)?;
        tracing::info!(bucket = %v.bucket, key = %v.key, "signature verified");
        check_sha256(v, &downloaded)?;
        self.check_cancel()?;

        self.reporter.stage("unpacking", Some(v.url()));
        let staging = self.layout.new_staging()?;
        let dest = staging.path().to_path_buf();
        let limits = self.unpack_limits();
        let (staging, unpacked) = tokio::task::spawn_blocking(move || {
            let result = std::fs::File::open(&spool_file)
                .map_err(|source| unpack::UnpackError::Io {
                    action: "open",
                    path: spool_file.clone(),
                    source,
                })
                .and_then(|f| {
                    unpack::unpack(
                        std::io::BufReader::with_capacity(1 << 20, f),
                        &dest,
                        &limits,
                    )
                });
            (staging, result)
        })
        .await
        .map_err(|e| DeployError::Internal(format!("unpacking ({e})")))?;
        drop(spool);
        match unpacked {
            Ok((compression, stats)) => Ok(Staged {
                staging,
                downloaded,
                compression,
                stats,
            }),
            Err(source) => Err(DeployError::Unpack {
                bucket: v.bucket.clone(),
                key: v.key.clone(),
                source,
            }),
        }
    }

    /// Switches `current` to the new release and records it as serving.
    fn activate(&self, manifest: &Manifest) -> Result<(), DeployError> {
        let mut state = State::load(&self.layout.state_file)?;
        self.layout.switch_current(&manifest.id)?;
        let summary = manifest.summary();
        if let Some(previous) = state.current.take()
            && previous.id != summary.id
        {
            state.previous_good = Some(previous);
        }
        state.current = Some(summary);
        state.save(&self.layout.state_file)?;
        let protect: Vec<&str> = [state.current.as_ref(), state.previous_good.as_ref()]
            .into_iter()
            .flatten()
            .map(|r| r.id.as_str())
            .collect();
        let removed = self.layout.retain(self.cfg.releases.keep, &protect)?;
        if !removed.is_empty() {
            tracing::info!(removed = ?removed, keep = self.cfg.releases.keep, "removed old releases");
        }
        Ok(())
    }

    /// Points `current` back at `id` (default: the previous good release) and, when the
    /// release has containers, starts them again from its release-tagged images.
    pub async fn rollback(&self, id: Option<&str>) -> Result<String, DeployError> {
        let _lock = self.layout.lock()?;
        let mut state = State::load(&self.layout.state_file)?;
        let target = match id {
            Some(id) => id.to_string(),
            None => state
                .previous_good
                .as_ref()
                .map(|r| r.id.clone())
                .ok_or(ReleaseError::NothingToRollBack)?,
        };
        let manifest = self.layout.manifest(&target)?;
        let started_at = now_rfc3339();
        let dir = self.layout.release_dir(&target);
        if self.has_containers(&dir) {
            let env = EnvFile::load(&self.cfg.environment_file)?;
            let settings = self.container_settings();
            let release = ReleaseRef {
                id: &target,
                dir: &dir,
                commit: manifest.commit(),
            };
            let project = Engine::load_project(&self.cfg.app, &release, &env.vars, settings)?;
            self.reporter.stage("starting", Some(target.clone()));
            self.engine()
                .await?
                .rollback(&project, &release, settings)
                .await?;
        }
        self.layout.switch_current(&target)?;
        let summary = manifest.summary();
        let old = state.current.replace(summary);
        if let Some(old) = old.filter(|o| o.id != target) {
            state.previous_good = Some(old);
        }
        let attempt = Attempt {
            started_at,
            finished_at: now_rfc3339(),
            outcome: Outcome::RolledBack,
            trigger: "rollback".into(),
            bucket: Some(manifest.bucket.clone()),
            key: Some(manifest.key.clone()),
            release: Some(target.clone()),
            error: None,
            exit_code: 0,
        };
        state.record(attempt.clone());
        state.save(&self.layout.state_file)?;
        self.reporter
            .serving(state.current.clone(), Some(attempt.clone()));
        self.report_outward(&attempt, state.current.as_ref(), false)
            .await;
        tracing::info!(release = %target, "rolled back");
        Ok(target)
    }

    /// Removes the project's images, the builder cache and the app cache paths in every
    /// release, so the next build starts from nothing.
    pub async fn clear_cache(&self) -> Result<crate::containers::ClearReport, DeployError> {
        let _lock = self.layout.lock()?;
        let dirs = self.layout.release_dirs()?;
        let settings = self.container_settings();
        Ok(self
            .engine()
            .await?
            .clear_cache(&self.cfg.app, &dirs, &settings.clear_paths)
            .await?)
    }

    /// Reports how an attempt ended to the metrics file and the EC2 instance tags; `deployment`
    /// is false for a rollback, which keeps the last deployment's stage timings.
    async fn report_outward(
        &self,
        attempt: &Attempt,
        serving: Option<&ReleaseSummary>,
        deployment: bool,
    ) {
        let artifact_bytes = serving
            .and_then(|r| self.layout.manifest(&r.id).ok())
            .map(|m| m.size);
        self.metrics.record(&metrics::Report {
            attempt: Some(attempt),
            stages: deployment.then(|| self.reporter.stage_durations()),
            serving,
            artifact_bytes,
            build_cache: deployment.then(|| self.reporter.build_cache()).flatten(),
        });
        if let Some(tags) = self.imds.tags() {
            let status = match attempt.outcome {
                Outcome::Deployed | Outcome::Unchanged => TagStatus::Serving,
                Outcome::Failed => TagStatus::Failed,
                Outcome::RolledBack => TagStatus::RolledBack,
            };
            let update = Update {
                status,
                release: Some(serving.map(|r| r.id.clone()).unwrap_or_default()),
                commit: Some(serving.and_then(|r| r.commit.clone()).unwrap_or_default()),
                error: Some(attempt.error.clone().unwrap_or_default()),
            };
            tags.write(&self.imds, &update).await;
        }
    }
}

/// The downloaded bytes must have the expected SHA-256, when one is known.
fn check_sha256(v: &Verified, downloaded: &Downloaded) -> Result<(), DeployError> {
    match &v.expected_sha256 {
        Some(expected) if !expected.eq_ignore_ascii_case(&downloaded.sha256) => {
            Err(DeployError::Checksum {
                bucket: v.bucket.clone(),
                key: v.key.clone(),
                expected: expected.clone(),
                expected_from: v.sha256_source.clone().unwrap_or_default(),
                actual: downloaded.sha256.clone(),
            })
        }
        _ => Ok(()),
    }
}
