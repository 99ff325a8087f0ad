//! Errors of the container stage, each naming what was being acted on and mapping to a sysexits
//! exit code: 65 for a bad compose file or a Dockerfile that does not build, 69 for an engine that
//! does not answer (at startup or in the middle of a build),
//! 75 for a release that did not become healthy (and was rolled back), 70 for everything else.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{ExitCode, exit};

/// Everything that can go wrong while building and running a release's containers.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The compose file could not be read.
    #[error("cannot read compose file {path}: {source}")]
    ComposeRead {
        /// The compose file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The compose file is not valid YAML or not a mapping.
    #[error("compose file {path} is not valid: {message}")]
    ComposeSyntax {
        /// The compose file.
        path: PathBuf,
        /// What the YAML parser, or deployd, found wrong.
        message: String,
    },
    /// A key deployd does not support; nothing was built or stopped.
    #[error(
        "compose file {path}: service `{service}` uses unsupported key `{key}` ({why}); remove it or use one of the supported keys"
    )]
    UnsupportedKey {
        /// The compose file.
        path: PathBuf,
        /// The service, or `(top level)`.
        service: String,
        /// The key, dotted below the service (`build.ssh`).
        key: String,
        /// Why deployd does not support it (`deployd does not implement it`, `only Docker
        /// Swarm uses it`).
        why: String,
    },
    /// A key or value that would let a container reach outside its app (the host, other
    /// projects' containers, volumes or networks); nothing was built or stopped.
    #[error("compose file {path}: service `{service}`, key `{key}` is refused for security: {why}")]
    Forbidden {
        /// The compose file.
        path: PathBuf,
        /// The service, or `(top level)`.
        service: String,
        /// The key, dotted below the service.
        key: String,
        /// What it would give the container.
        why: String,
    },
    /// A supported key with a value deployd cannot use.
    #[error("compose file {path}: service `{service}`, key `{key}`: {message}")]
    InvalidValue {
        /// The compose file.
        path: PathBuf,
        /// The service, or `(top level)` / `(release)`.
        service: String,
        /// The key, dotted below the service.
        key: String,
        /// What is wrong with the value.
        message: String,
    },
    /// An existing volume or network the compose file names belongs to something else.
    #[error(
        "{kind} {name} exists but is not the app's own ({}); deployd uses only {kind}s labelled with project {project}, or listed in [containers] allowed_external",
        owner.as_deref().map_or("it has no project label".to_string(), |o| format!("it belongs to project {o}"))
    )]
    NotOwned {
        /// `volume` or `network`.
        kind: String,
        /// Its engine name.
        name: String,
        /// The project it is labelled with, if any.
        owner: Option<String>,
        /// This app's project.
        project: String,
    },
    /// `${VAR:?message}` with VAR unset, or a malformed `${...}`.
    #[error("compose file {path}: cannot interpolate `{expression}`: {message}")]
    Interpolation {
        /// The compose file.
        path: PathBuf,
        /// The string being interpolated.
        expression: String,
        /// What is wrong with it.
        message: String,
    },
    /// A file the build or the run needs could not be read (context, env_file, .dockerignore).
    #[error("cannot read {path}: {source}")]
    ReadFile {
        /// The file or directory.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// A writable path (app cache path, marker file) could not be changed.
    #[error("cannot change {path}: {source}")]
    WriteFile {
        /// The file or directory.
        path: PathBuf,
        /// Why it could not be changed.
        #[source]
        source: std::io::Error,
    },
    /// The Docker build of a service failed; the serving containers were not touched.
    #[error(
        "build of service `{service}` (image {image}) failed: {message}; the serving release was left running"
    )]
    BuildFailed {
        /// The service being built.
        service: String,
        /// The image (or stage image) being built.
        image: String,
        /// The engine's error.
        message: String,
    },
    /// An image a service runs is not present and could not be pulled.
    #[error("image {image} for service `{service}` is not available: {message}")]
    ImageMissing {
        /// The service that runs the image.
        service: String,
        /// The image reference.
        image: String,
        /// Why it is not there.
        message: String,
    },
    /// The engine never answered within the startup bound.
    #[error(
        "the Docker engine did not answer within {waited:?} ({message}); start it (systemctl start docker) or check DOCKER_HOST"
    )]
    EngineUnavailable {
        /// How long deployd waited.
        waited: Duration,
        /// The last attempt's error.
        message: String,
    },
    /// The engine stopped answering in the middle of a request (a build): not the release's fault.
    #[error(
        "the Docker engine stopped answering while {action} ({message}); check that it runs (systemctl status docker)"
    )]
    EngineLost {
        /// What deployd was doing.
        action: String,
        /// What broke.
        message: String,
    },
    /// An engine call failed.
    #[error("Docker engine call failed while {action}: {source}")]
    Engine {
        /// What deployd was doing (`creating network app_default`).
        action: String,
        /// The engine's error.
        #[source]
        source: bollard::errors::Error,
    },
    /// The new release did not become healthy and the previous one was started again.
    #[error(
        "release {release} was rolled back to {previous}: service `{service}` did not become healthy ({reason})"
    )]
    RolledBack {
        /// The release that failed.
        release: String,
        /// The release serving again.
        previous: String,
        /// The service that did not become healthy.
        service: String,
        /// Why it did not (the container it was, and what the engine said).
        reason: String,
    },
    /// The engine failed while the new release was being started (pulling an image, creating
    /// a network, volume or container, starting it, or answering at all): the release was not
    /// unhealthy, the engine was.
    #[error(
        "release {release}: the Docker engine failed while starting service `{service}` ({reason}); {}",
        match rolled_back_to {
            Some(previous) => format!("rolled back to {previous}, which serves again"),
            None => "there is no previous release to roll back to".to_string(),
        }
    )]
    StartFailed {
        /// The release that failed.
        release: String,
        /// The service being started (`(networks)` for the project's networks and volumes).
        service: String,
        /// What the engine said.
        reason: String,
        /// The previous release, started again.
        rolled_back_to: Option<String>,
        /// The engine could not be reached or answered with a server error (exit 69).
        unavailable: bool,
    },
    /// The build stage ran past `[containers] build_timeout`.
    #[error(
        "the builds of release {release} did not finish within {} ([containers] build_timeout); the serving release was left running",
        humantime::format_duration(*limit)
    )]
    BuildTimeout {
        /// The release being built.
        release: String,
        /// The limit.
        limit: Duration,
    },
    /// The new release did not become healthy and there was nothing to roll back to.
    #[error(
        "release {release}: service `{service}` did not become healthy ({reason}) and there is no previous release to roll back to"
    )]
    UnhealthyNoPrevious {
        /// The release that failed.
        release: String,
        /// The service that did not become healthy.
        service: String,
        /// Why it did not.
        reason: String,
    },
    /// The new release failed and starting the previous one failed as well.
    #[error(
        "release {release}: service `{service}` did not become healthy ({reason}) and rolling back to {previous} failed too: {rollback_error}"
    )]
    RollbackFailed {
        /// The release that failed.
        release: String,
        /// The release that could not be started again.
        previous: String,
        /// The service of `release` that did not become healthy.
        service: String,
        /// Why it did not.
        reason: String,
        /// Which service of `previous` failed, and why.
        rollback_error: String,
    },
    /// A service did not become healthy while starting a release on demand (rollback).
    #[error("release {release}: service `{service}` did not become healthy: {reason}")]
    Unhealthy {
        /// The release being started.
        release: String,
        /// The service that did not become healthy.
        service: String,
        /// Why it did not.
        reason: String,
    },
    /// A background task panicked or was cancelled.
    #[error("internal error while {action}: {message}")]
    Internal {
        /// What deployd was doing.
        action: String,
        /// What went wrong.
        message: String,
    },
}

impl ExitCode for ContainerError {
    /// The sysexits code the CLI exits with for this error.
    fn exit_code(&self) -> i32 {
        match self {
            Self::ComposeSyntax { .. }
            | Self::UnsupportedKey { .. }
            | Self::Forbidden { .. }
            | Self::NotOwned { .. }
            | Self::InvalidValue { .. }
            | Self::Interpolation { .. }
            | Self::BuildFailed { .. } => exit::DATAERR,
            Self::ComposeRead { .. } | Self::ReadFile { .. } => exit::DATAERR,
            Self::EngineUnavailable { .. }
            | Self::EngineLost { .. }
            | Self::BuildTimeout { .. } => exit::UNAVAILABLE,
            Self::StartFailed { unavailable, .. } => {
                if *unavailable {
                    exit::UNAVAILABLE
                } else {
                    exit::SOFTWARE
                }
            }
            Self::Engine { source, .. } if is_engine_failure(source) => exit::UNAVAILABLE,
            Self::ImageMissing { .. } => exit::UNAVAILABLE,
            Self::RolledBack { .. } | Self::UnhealthyNoPrevious { .. } | Self::Unhealthy { .. } => {
                exit::TEMPFAIL
            }
            Self::RollbackFailed { .. }
            | Self::Engine { .. }
            | Self::WriteFile { .. }
            | Self::Internal { .. } => exit::SOFTWARE,
        }
    }
}

impl ContainerError {
    pub(crate) fn engine(action: impl Into<String>, source: bollard::errors::Error) -> Self {
        Self::Engine {
            action: action.into(),
            source,
        }
    }
}

/// Whether a bollard error means the engine could not be reached at all (the HTTP client's
/// transport errors: no socket, refused, reset, timed out).
pub(crate) fn is_connection_error(e: &bollard::errors::Error) -> bool {
    use bollard::errors::Error as E;
    matches!(
        e,
        E::IOError { .. }
            | E::HyperResponseError { .. }
            | E::HyperLegacyError { .. }
            | E::RequestTimeoutError
            | E::SocketNotFoundError(_)
    )
}

/// Whether a bollard error means the engine is unreachable or failed on its side (HTTP 5xx):
/// a dependency unavailable (exit 69), as opposed to a request it refused.
pub(crate) fn is_engine_failure(e: &bollard::errors::Error) -> bool {
    is_connection_error(e)
        || matches!(
            e,
            bollard::errors::Error::DockerResponseServerError { status_code, .. } if *status_code >= 500
        )
}

/// Whether a bollard error is the engine saying "no such object" (HTTP 404).
pub(crate) fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}
