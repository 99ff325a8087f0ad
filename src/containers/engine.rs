//! Connecting to the Docker engine and deciding which builder to use.
//!
//! [`Engine::connect`] waits for the engine with exponential backoff (it may still be starting when
//! deployd starts at boot), logging "waiting for docker" at every retry, and gives up with
//! [`ContainerError::EngineUnavailable`] (exit 69) after the bound. It then negotiates the API
//! version down to the engine's and reads what the engine is (`/info`, and the `_ping` headers on a
//! local socket) to decide the builder.
//!
//! ## The builder decision
//!
//! deployd relies on `cache_from` with the previous release's image so that a code-only change
//! rebuilds in seconds even after the builder cache was pruned. What each builder does with a
//! *local* image listed in `cache_from`:
//!
//! - the classic builder (`/build?version=1`) uses it as a cache source from its image history
//!   alone, on both image stores, with no metadata in the image, even when the image was built by
//!   someone else or loaded without its parent chain;
//! - BuildKit (`version=2`) hits only when that image carries inline cache metadata
//!   (`BUILDKIT_INLINE_CACHE=1` at its build) and the engine uses the graphdriver image store; on
//!   the containerd image store it resolves the reference against a registry. Misses are silent.
//!
//! So deployd uses the classic builder on every engine that has it, whatever the engine's default
//! builder (`Builder-Version` header of `_ping`) is, and records why in [`BuilderDecision`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use bollard::Docker;

use super::error::ContainerError;

/// How long the engine may take to answer one request, unless `[containers] engine_timeout`
/// says otherwise (a build's answer starts once its context is uploaded; its output then
/// streams for as long as the build runs).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one startup ping may take before it counts as a failed attempt.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// What deployd found out about the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineFacts {
    /// The engine's version (`Server Version` of `docker info`).
    pub server_version: String,
    /// The API version the engine speaks.
    pub api_version: String,
    /// `linux` or `windows`.
    pub os_type: String,
    /// Storage driver (`overlay2`, `fuse-overlayfs`, ...), or the snapshotter on containerd.
    pub storage_driver: String,
    /// The engine stores images in containerd (`driver-type io.containerd.snapshotter.v1`).
    pub containerd_store: bool,
    /// `Builder-Version` header of `_ping`: the engine's default builder (`1` or `2`).
    pub default_builder: Option<String>,
}

/// Which builder deployd uses and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderDecision {
    /// Always the classic builder today (see the module docs).
    pub builder: Builder,
    /// Why, in one sentence (logged when the engine is ready).
    pub reason: String,
}

/// The engine's builders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builder {
    /// `/build?version=1`: local images are cache sources.
    Classic,
}

/// Decide the builder from what the engine is.
fn decide_builder(f: &EngineFacts) -> BuilderDecision {
    let default = match f.default_builder.as_deref() {
        Some("2") => "BuildKit",
        Some("1") => "classic",
        _ => "unknown",
    };
    let reason = if f.containerd_store {
        format!(
            "classic builder: the engine uses the containerd image store, where BuildKit resolves cache_from against a registry, so a local previous-release image would never be a cache source (engine default builder: {default})"
        )
    } else {
        format!(
            "classic builder: with the {} graphdriver it takes cache_from from local images by their history alone, while BuildKit would need inline cache metadata in every previous image and misses silently without it (engine default builder: {default})",
            f.storage_driver
        )
    };
    BuilderDecision {
        builder: Builder::Classic,
        reason,
    }
}

/// A connection to the Docker engine plus the builder decision.
#[derive(Debug, Clone)]
pub struct Engine {
    pub(crate) docker: Docker,
    pub(crate) facts: EngineFacts,
    pub(crate) decision: BuilderDecision,
    /// Told about each build step (see [`Engine::with_step_hook`]).
    pub(crate) on_step: super::build::StepHook,
}

impl Engine {
    /// Connect to the local engine (`DOCKER_HOST` or the default socket), waiting up to `wait` for
    /// it to answer.
    pub async fn connect(wait: Duration) -> Result<Engine, ContainerError> {
        Self::connect_with(wait, REQUEST_TIMEOUT).await
    }

    /// [`Engine::connect`], giving up on any later request the engine has not answered
    /// within `request_timeout`.
    pub async fn connect_with(
        wait: Duration,
        request_timeout: Duration,
    ) -> Result<Engine, ContainerError> {
        let progress = |attempt, elapsed, error: &str| {
            tracing::info!(attempt, ?elapsed, %error, "waiting for docker");
        };
        Self::connect_on(None, wait, request_timeout, progress).await
    }

    /// [`Engine::connect`] to a given unix socket (`None`: `DOCKER_HOST` or the default socket),
    /// with a progress callback `(attempt, elapsed, last error)` called before each retry.
    pub async fn connect_to(
        socket: Option<&Path>,
        wait: Duration,
        progress: impl FnMut(usize, Duration, &str),
    ) -> Result<Engine, ContainerError> {
        Self::connect_on(socket, wait, REQUEST_TIMEOUT, progress).await
    }

    async fn connect_on(
        socket: Option<&Path>,
        wait: Duration,
        request_timeout: Duration,
        mut progress: impl FnMut(usize, Duration, &str),
    ) -> Result<Engine, ContainerError> {
        let started = Instant::now();
        let unavailable = |message: String| ContainerError::EngineUnavailable {
            waited: started.elapsed(),
            message,
        };
        let mut attempt = 0usize;
        // The socket may not exist yet at boot, so the client is created on every attempt.
        let try_connect = || async move {
            let docker = match socket {
                Some(path) => Docker::connect_with_unix(
                    &path.to_string_lossy(),
                    request_timeout.as_secs(),
                    bollard::API_DEFAULT_VERSION,
                ),
                None => Docker::connect_with_local_defaults(),
            }
            .map_err(|e| e.to_string())?
            .with_timeout(request_timeout);
            match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
                Ok(Ok(_)) => Ok(docker),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {PING_TIMEOUT:?}")),
            }
        };
        let docker = try_connect
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_total_delay(Some(wait))
                    .without_max_times(),
            )
            .notify(|e: &String, _| {
                attempt += 1;
                progress(attempt, started.elapsed(), e);
            })
            .await
            .map_err(unavailable)?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| ContainerError::engine("negotiating the API version", e))?;
        let facts = read_facts(&docker, socket).await?;
        let decision = decide_builder(&facts);
        tracing::info!(
            server_version = %facts.server_version,
            api_version = %facts.api_version,
            storage_driver = %facts.storage_driver,
            containerd_store = facts.containerd_store,
            reason = %decision.reason,
            "docker engine ready"
        );
        Ok(Engine {
            docker,
            facts,
            decision,
            on_step: Default::default(),
        })
    }

    /// What the engine is.
    pub fn facts(&self) -> &EngineFacts {
        &self.facts
    }

    /// Which builder deployd uses and why.
    pub fn builder_decision(&self) -> &BuilderDecision {
        &self.decision
    }
}

async fn read_facts(docker: &Docker, socket: Option<&Path>) -> Result<EngineFacts, ContainerError> {
    let info = docker
        .info()
        .await
        .map_err(|e| ContainerError::engine("reading the engine information", e))?;
    let version = docker
        .version()
        .await
        .map_err(|e| ContainerError::engine("reading the engine version", e))?;
    let driver_status: BTreeMap<String, String> = info
        .driver_status
        .unwrap_or_default()
        .into_iter()
        .filter_map(|kv| match kv.as_slice() {
            [k, v] => Some((k.clone(), v.clone())),
            _ => None,
        })
        .collect();
    let containerd_store = driver_status
        .get("driver-type")
        .is_some_and(|t| t.contains("containerd.snapshotter"));
    let headers = ping_headers(socket).await;
    Ok(EngineFacts {
        server_version: info.server_version.unwrap_or_default(),
        api_version: version.api_version.unwrap_or_default(),
        os_type: info.os_type.unwrap_or_default(),
        storage_driver: info.driver.unwrap_or_default(),
        containerd_store,
        default_builder: headers.get("builder-version").cloned(),
    })
}

/// Headers of `GET /_ping` on the local unix socket (bollard's `ping` returns only the body).
/// Empty when the engine is not on a local socket or does not answer.
async fn ping_headers(socket: Option<&Path>) -> BTreeMap<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = match (socket, std::env::var("DOCKER_HOST")) {
        (Some(p), _) => p.to_string_lossy().into_owned(),
        (None, Ok(h)) => match h.strip_prefix("unix://") {
            Some(p) => p.to_string(),
            None => return BTreeMap::new(),
        },
        (None, Err(_)) => "/var/run/docker.sock".to_string(),
    };
    let fetch = async {
        let mut s = tokio::net::UnixStream::connect(&path).await?;
        s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let Ok(Ok(buf)) = tokio::time::timeout(PING_TIMEOUT, fetch).await else {
        return BTreeMap::new();
    };
    String::from_utf8_lossy(&buf)
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_names_the_store() {
        let mut f = EngineFacts {
            storage_driver: "overlay2".into(),
            default_builder: Some("2".into()),
            ..Default::default()
        };
        let d = decide_builder(&f);
        assert_eq!(d.builder, Builder::Classic);
        assert!(d.reason.contains("overlay2") && d.reason.contains("BuildKit"));
        f.containerd_store = true;
        assert!(decide_builder(&f).reason.contains("containerd image store"));
    }
}
