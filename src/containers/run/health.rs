//! Waiting for a container to become healthy: its healthcheck, or running for `health_grace`
//! when it has none, within `health_timeout`.

use std::time::{Duration, Instant};

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum};

use crate::config::ContainersConfig;
use crate::containers::engine::Engine;
use crate::containers::error::is_engine_failure;

/// How often health is polled.
const HEALTH_POLL: Duration = Duration::from_millis(250);

/// Why a container did not become healthy (the caller names the container).
#[derive(Debug, thiserror::Error)]
pub(crate) enum HealthError {
    /// The engine could not say how the container is.
    #[error("inspecting: {0}")]
    Inspect(#[source] bollard::errors::Error),
    /// The container stopped; `detail` is the engine's error, when it gave one.
    #[error("exited with code {code}{}", in_parens(.detail.as_deref()))]
    Exited { code: i64, detail: Option<String> },
    /// The container was restarted while it was being watched.
    #[error("restarted {0} times")]
    Restarted(i64),
    /// Its healthcheck reported unhealthy; `last` is the last check's exit code and output.
    #[error("healthcheck failed ({last})")]
    CheckFailed { last: String },
    /// Neither healthy nor failed within `health_timeout`.
    #[error("not healthy after {0:?}")]
    Timeout(Duration),
}

/// ` (text)`, or nothing.
fn in_parens(text: Option<&str>) -> String {
    text.map(|t| format!(" ({t})")).unwrap_or_default()
}

impl Engine {
    /// Inspect a container every [`HEALTH_POLL`] until `judge` says how it went, or until
    /// `health_timeout` after `started`; the time it took.
    async fn poll(
        &self,
        id: &str,
        settings: &ContainersConfig,
        started: Instant,
        mut judge: impl FnMut(ContainerInspectResponse) -> Option<Result<(), HealthError>>,
    ) -> Result<Duration, HealthError> {
        let deadline = started + settings.health_timeout.0;
        loop {
            let c = match self.docker.inspect_container(id, None).await {
                Ok(c) => c,
                // An engine restarting (or briefly overloaded) is waited for, within the
                // health timeout: the container itself may be fine.
                Err(e) if is_engine_failure(&e) && Instant::now() < deadline => {
                    tracing::warn!(container = id, error = %e, "the Docker engine did not answer; asking again");
                    tokio::time::sleep(HEALTH_POLL).await;
                    continue;
                }
                Err(e) => return Err(HealthError::Inspect(e)),
            };
            if let Some(done) = judge(c) {
                return done.map(|()| started.elapsed());
            }
            if Instant::now() >= deadline {
                return Err(HealthError::Timeout(settings.health_timeout.0));
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }

    /// Wait until a container is healthy; the error is the reason it is not.
    pub(super) async fn wait_healthy(
        &self,
        id: &str,
        settings: &ContainersConfig,
        started: Instant,
    ) -> Result<Duration, HealthError> {
        let mut running_since: Option<Instant> = None;
        let mut restarts: Option<i64> = None;
        self.poll(id, settings, started, |c| {
            let state = c.state.unwrap_or_default();
            let restart_count = c.restart_count.unwrap_or(0);
            if (!state.running.unwrap_or(false) || state.restarting.unwrap_or(false))
                && state.status != Some(ContainerStateStatusEnum::CREATED)
            {
                return Some(Err(HealthError::Exited {
                    code: state.exit_code.unwrap_or_default(),
                    detail: state.error.filter(|e| !e.is_empty()),
                }));
            }
            if *restarts.get_or_insert(restart_count) != restart_count {
                return Some(Err(HealthError::Restarted(restart_count)));
            }
            match state.health.as_ref().and_then(|h| h.status) {
                Some(HealthStatusEnum::HEALTHY) => Some(Ok(())),
                Some(HealthStatusEnum::UNHEALTHY) => {
                    let last = state
                        .health
                        .and_then(|h| h.log)
                        .and_then(|l| l.into_iter().last())
                        .map(|r| {
                            format!(
                                "exit {}: {}",
                                r.exit_code.unwrap_or_default(),
                                r.output.unwrap_or_default().trim()
                            )
                        })
                        .unwrap_or_default();
                    Some(Err(HealthError::CheckFailed { last }))
                }
                Some(HealthStatusEnum::STARTING) => None,
                // No healthcheck: running for the grace period counts as healthy.
                _ if state.running.unwrap_or(false) => {
                    let since = *running_since.get_or_insert_with(Instant::now);
                    (since.elapsed() >= settings.health_grace.0).then_some(Ok(()))
                }
                _ => None,
            }
        })
        .await
    }

    /// Wait until a one-shot container (a dependency with `service_completed_successfully`)
    /// exits; exit code 0 is success.
    pub(super) async fn wait_completed(
        &self,
        id: &str,
        settings: &ContainersConfig,
        started: Instant,
    ) -> Result<Duration, HealthError> {
        self.poll(id, settings, started, |c| {
            let state = c.state.unwrap_or_default();
            let exited = matches!(
                state.status,
                Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD)
            );
            match state.exit_code {
                Some(0) if exited => Some(Ok(())),
                Some(code) if exited => Some(Err(HealthError::Exited {
                    code,
                    detail: state.error.filter(|e| !e.is_empty()),
                })),
                _ => None,
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_what_the_engine_said() {
        let exited = HealthError::Exited {
            code: 3,
            detail: None,
        };
        assert_eq!(exited.to_string(), "exited with code 3");
        let exited = HealthError::Exited {
            code: 127,
            detail: Some("executable file not found".into()),
        };
        assert_eq!(
            exited.to_string(),
            "exited with code 127 (executable file not found)"
        );
        assert_eq!(
            HealthError::Timeout(Duration::from_secs(2)).to_string(),
            "not healthy after 2s"
        );
    }
}
