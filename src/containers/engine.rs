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
//! deployd builds with BuildKit (`/build?version=2`, the context in the request body, no
//! session) wherever that works: the Dockerfiles people write use its syntax
//! (`RUN --mount=type=cache`, `FROM --platform=$BUILDPLATFORM`, heredocs where the engine's
//! Dockerfile frontend has them), and it rebuilds a code-only change several times faster than
//! the classic builder. BuildKit takes cache from a *local* image listed in `cache_from` only when
//! that image carries inline cache metadata, so deployd builds every image with
//! `BUILDKIT_INLINE_CACHE=1` (see the build module); with that, unchanged steps hit after the
//! builder cache was pruned.
//!
//! The classic builder (`version=1`) remains as the fallback where that BuildKit build is not
//! available: an engine older than API 1.39 (Docker 18.09), a Windows engine, an endpoint deployd
//! cannot reach with its own requests (TLS or ssh `DOCKER_HOST`: the BuildKit progress that
//! counts cache hits comes through those, see the socket module), and the containerd image store
//! (the default of fresh Docker 29 installs): there BuildKit cannot read a context sent in the
//! body (moby/moby#47717, open; measured on Docker 26.1 with the containerd snapshotter: "failed
//! to read downloaded context"), and it would resolve `cache_from` against a registry anyway.
//! [`BuilderDecision`] records which and why, and the log line "docker engine ready" carries it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use bollard::Docker;

use super::error::ContainerError;
use super::socket::{Endpoint, Lines, empty_request};

/// How long the engine may take to answer one request, unless `[containers] engine_timeout`
/// says otherwise (a build's answer starts once its context is uploaded; its output then
/// streams for as long as the build runs).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one BuildKit build request may stream its progress (the build stage as a whole is
/// bounded by `[containers] build_timeout`).
pub(crate) const BUILD_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);
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
    /// BuildKit where the engine has it, else the classic builder (see the module docs).
    pub builder: Builder,
    /// Why, in one sentence (logged when the engine is ready).
    pub reason: String,
}

/// The engine's builders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builder {
    /// `/build?version=2` with inline cache metadata in every image.
    BuildKit,
    /// `/build?version=1`: local images are cache sources by their history.
    Classic,
}

/// The oldest API version with BuildKit (Docker 18.09).
const BUILDKIT_MIN_API: (u32, u32) = (1, 39);

/// `1.41` as `(1, 41)`; `None` when it does not parse.
fn api_version(v: &str) -> Option<(u32, u32)> {
    let (major, minor) = v.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Decide the builder from what the engine is and how deployd reaches it.
fn decide_builder(f: &EngineFacts, endpoint: &Result<Endpoint, String>) -> BuilderDecision {
    let default = match f.default_builder.as_deref() {
        Some("2") => "BuildKit",
        Some("1") => "classic",
        _ => "unknown",
    };
    let classic = |why: String| BuilderDecision {
        builder: Builder::Classic,
        reason: format!(
            "classic builder: {why}, so BuildKit-only Dockerfile syntax (RUN --mount, heredocs) will not build (engine default builder: {default})"
        ),
    };
    if f.os_type == "windows" {
        return classic("the engine runs Windows containers, which BuildKit does not build".into());
    }
    if api_version(&f.api_version).is_none_or(|v| v < BUILDKIT_MIN_API) {
        return classic(format!(
            "the engine speaks API {}, older than BuildKit (1.39, Docker 18.09)",
            f.api_version
        ));
    }
    if let Err(why) = endpoint {
        return classic(format!(
            "BuildKit's progress (cache hits) is read on a unix socket or plain tcp, not {why}"
        ));
    }
    if f.containerd_store {
        return classic(
            "the engine uses the containerd image store, where BuildKit cannot read a build context sent with the request (moby/moby#47717) and resolves cache_from against a registry".into(),
        );
    }
    let cache = "cache_from the previous release's images, built with inline cache metadata, so unchanged steps hit even after the builder cache is pruned";
    BuilderDecision {
        builder: Builder::BuildKit,
        reason: format!(
            "BuildKit (engine {}, API {}, {}): {cache} (engine default builder: {default})",
            f.server_version, f.api_version, f.storage_driver
        ),
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
    /// How deployd's own requests (BuildKit builds) reach the engine.
    pub(crate) endpoint: Option<Endpoint>,
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
        let endpoint = Endpoint::resolve(socket);
        let facts = read_facts(&docker, endpoint.as_ref().ok()).await?;
        let decision = decide_builder(&facts, &endpoint);
        tracing::info!(
            server_version = %facts.server_version,
            api_version = %facts.api_version,
            storage_driver = %facts.storage_driver,
            containerd_store = facts.containerd_store,
            builder = ?decision.builder,
            reason = %decision.reason,
            "docker engine ready"
        );
        Ok(Engine {
            docker,
            facts,
            decision,
            on_step: Default::default(),
            endpoint: endpoint.ok(),
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

    /// Build with `builder` instead of the one decided from the engine: for comparisons in tests
    /// and benchmarks. deployd itself always builds with what [`Engine::connect`] decided.
    pub fn with_builder(mut self, builder: Builder) -> Engine {
        if builder != self.decision.builder {
            self.decision = BuilderDecision {
                builder,
                reason: format!("{builder:?} builder, chosen by the caller"),
            };
        }
        self
    }
}

async fn read_facts(
    docker: &Docker,
    endpoint: Option<&Endpoint>,
) -> Result<EngineFacts, ContainerError> {
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
    let headers = match endpoint {
        Some(e) => ping_headers(e).await,
        None => BTreeMap::new(),
    };
    Ok(EngineFacts {
        server_version: info.server_version.unwrap_or_default(),
        api_version: version.api_version.unwrap_or_default(),
        os_type: info.os_type.unwrap_or_default(),
        storage_driver: info.driver.unwrap_or_default(),
        containerd_store,
        default_builder: headers.get("builder-version").cloned(),
    })
}

/// Headers of `GET /_ping` (bollard's `ping` returns only the body); empty when the engine
/// does not answer.
async fn ping_headers(endpoint: &Endpoint) -> BTreeMap<String, String> {
    let fetch = async {
        let response = endpoint.send(empty_request("GET", "/_ping")?).await?;
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (k.as_str().to_ascii_lowercase(), value)
            })
            .collect();
        // Read the short body so the connection ends cleanly.
        let mut body = Lines::new(response.into_body());
        while let Some(Ok(_)) = body.next().await {}
        Ok::<_, std::io::Error>(headers)
    };
    match tokio::time::timeout(PING_TIMEOUT, fetch).await {
        Ok(Ok(headers)) => headers,
        _ => BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildkit_where_the_engine_has_it_else_classic_with_the_reason() {
        let unix = Ok(Endpoint::Unix("/var/run/docker.sock".into()));
        let mut f = EngineFacts {
            server_version: "20.10.24".into(),
            api_version: "1.41".into(),
            os_type: "linux".into(),
            storage_driver: "overlay2".into(),
            default_builder: Some("1".into()),
            ..Default::default()
        };
        let d = decide_builder(&f, &unix);
        assert_eq!(d.builder, Builder::BuildKit);
        assert!(d.reason.contains("inline cache") && d.reason.contains("overlay2"));
        f.containerd_store = true;
        let d = decide_builder(&f, &unix);
        assert_eq!(d.builder, Builder::Classic);
        assert!(d.reason.contains("containerd image store"), "{}", d.reason);
        f.containerd_store = false;

        let d = decide_builder(&f, &Err("DOCKER_HOST=ssh://me@host".into()));
        assert_eq!(d.builder, Builder::Classic);
        assert!(d.reason.contains("ssh://me@host"), "{}", d.reason);
        f.api_version = "1.38".into();
        let d = decide_builder(&f, &unix);
        assert_eq!(d.builder, Builder::Classic);
        assert!(d.reason.contains("API 1.38"), "{}", d.reason);
        f.api_version = "1.41".into();
        f.os_type = "windows".into();
        assert_eq!(decide_builder(&f, &unix).builder, Builder::Classic);
    }
}
