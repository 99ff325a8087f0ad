//! BuildKit builds (`/build?version=2`), the context in the request body and no session, as the
//! engine module decides wherever the engine has BuildKit.
//!
//! The stages the target needs are built first, one request each (`target=<stage>`), then the
//! final image, whose request finds the stages' steps in BuildKit's cache. Each image carries
//! inline cache metadata. (Tagging the stages after the final build, from BuildKit's cache,
//! was measured on Docker 20.10 to give stage images whose inline cache the next release's build
//! after a builder prune used in only one of three runs; built first, four of four.) Steps and
//! hits are counted from the decoded progress (the progress module), each step once: a step
//! reused from BuildKit's cache or from the inline cache metadata of an image in `cache_from` is a
//! hit. Without cache every request runs with `nocache`, so a forced rebuild runs the first
//! stages once per later build: BuildKit's cache may hold older results of the same steps.
//!
//! Without a session BuildKit cannot ask deployd for secrets or ssh agents: a Dockerfile with
//! `RUN --mount=type=secret` or `type=ssh` fails with the engine's "no active sessions", which
//! the error names. Cache and bind mounts, `--platform=$BUILDPLATFORM` and everything else the
//! engine's Dockerfile frontend knows build.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};

use nix::fcntl::{Flock, FlockArg};

use super::StepHook;
use super::progress::Progress;
use super::{BuildRun, Job, Outcome, build_options};
use crate::containers::context::stream_context;
use crate::containers::engine::{BUILD_REQUEST_TIMEOUT, Builder, Engine};
use crate::containers::error::ContainerError;
use crate::containers::socket::{Endpoint, Lines, read_short, streaming_request};

/// The lock that keeps deployd's BuildKit builds on one host from running at the same time.
///
/// BuildKit before v0.12 (Docker 20.10 and 23) can panic, taking the whole engine down, when
/// concurrent builds share steps (moby/moby#42414, moby/buildkit#2303; fixed by
/// moby/buildkit#3953): this happened on Docker 20.10 when two deployments of the same fixture
/// built at once. One deployd per host builds one service at a time anyway; the lock covers
/// several deployd processes (and test processes) on one engine. Where `/run/lock` is read-only
/// (the systemd unit's `ProtectSystem=strict`), the lock file is in the temporary directory.
const HOST_BUILD_LOCK: &str = "/run/lock/deployd-buildkit.lock";

/// Take the host build lock, waiting for another build to end; `None` (and a warning) when no
/// lock file can be used, in which case the build goes ahead unserialised.
async fn host_build_lock(service: &str) -> Option<Flock<File>> {
    let fallback = std::env::temp_dir().join("deployd-buildkit.lock");
    let take = move || {
        let open = |path: &std::path::Path| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
        };
        let file = open(std::path::Path::new(HOST_BUILD_LOCK)).or_else(|_| open(&fallback))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| errno.into())
    };
    let taken: std::io::Result<Flock<File>> = match tokio::task::spawn_blocking(take).await {
        Ok(result) => result,
        Err(e) => Err(std::io::Error::other(e)),
    };
    taken
        .map_err(|error| {
            tracing::warn!(service, path = HOST_BUILD_LOCK, %error, "building without the host build lock");
        })
        .ok()
}

/// One JSON message of the build's answer.
#[derive(Debug, serde::Deserialize)]
struct Message {
    id: Option<String>,
    stream: Option<String>,
    error: Option<String>,
    #[serde(rename = "errorDetail")]
    error_detail: Option<ErrorDetail>,
    aux: Option<serde_json::Value>,
}

#[derive(Debug, serde::Deserialize)]
struct ErrorDetail {
    message: Option<String>,
}

/// The engine's error body for a refused request.
#[derive(Debug, serde::Deserialize)]
struct ErrorBody {
    message: String,
}

/// How a build request ended.
enum Answer {
    /// The engine answered to the end; `error` is the build's failure, if it failed.
    Done {
        progress: Progress,
        image_id: Option<String>,
        error: Option<String>,
    },
    /// The engine refused the request (an HTTP error status), with its message.
    Refused(String),
    /// The connection failed or broke off.
    Lost(String),
}

impl Engine {
    /// Build a service's stage images, then its image, with BuildKit.
    pub(super) async fn buildkit_service(&self, job: &Job<'_>) -> Result<Outcome, ContainerError> {
        let _lock = host_build_lock(&job.service.name).await;
        let mut outcome = Outcome {
            cache_from: job.cache_from.clone(),
            stages: job.stages.clone(),
            ..Outcome::default()
        };
        // A step is counted by the first build that shows it: later builds show the earlier
        // stages' steps again, as hits of BuildKit's own cache.
        let mut counted = HashSet::new();
        for (image, target, stage) in job.builds() {
            // Without cache every build runs with `nocache`: BuildKit's own cache may hold
            // older results for the later builds' steps.
            let run = BuildRun {
                tag: &image,
                target,
                cache_from: &job.cache_from,
                no_cache: job.no_cache,
                stage,
            };
            let (progress, image_id) = self.buildkit_run(job, &run).await?;
            let count = progress.count_new(&mut counted);
            outcome.steps += count.steps;
            outcome.from_steps += count.from_steps;
            outcome.hits += count.hits;
            outcome.image_id = image_id;
        }
        Ok(outcome)
    }

    /// Send one build and follow its progress to the end.
    async fn buildkit_run(
        &self,
        job: &Job<'_>,
        run: &BuildRun<'_>,
    ) -> Result<(Progress, Option<String>), ContainerError> {
        let service = &job.service.name;
        let action = format!("building image {} of service `{service}`", run.tag);
        let internal = |message: String| ContainerError::Internal {
            action: action.clone(),
            message,
        };
        // The decision chose BuildKit only with an endpoint deployd can reach itself.
        let endpoint = self
            .endpoint
            .as_ref()
            .ok_or_else(|| internal("no endpoint for BuildKit builds".into()))?;
        let options = build_options(job, run, Builder::BuildKit);
        let query = serde_urlencoded::to_string(&options).map_err(|e| internal(e.to_string()))?;
        let path = format!("/v{}/build?{query}", self.facts.api_version);
        let context = stream_context(job.spec.context.clone(), job.spec.dockerfile.clone());
        let request = streaming_request("POST", &path, "application/x-tar", context.body)
            .map_err(|e| internal(e.to_string()))?;
        let answer = match tokio::time::timeout(
            BUILD_REQUEST_TIMEOUT,
            follow(endpoint, request, service, &self.on_step),
        )
        .await
        {
            Ok(answer) => answer,
            Err(_) => Answer::Lost(format!("no result within {BUILD_REQUEST_TIMEOUT:?}")),
        };
        let written = context.writer.await.map_err(|e| ContainerError::Internal {
            action: format!("sending the build context of service `{service}`"),
            message: e.to_string(),
        });
        // An engine that went away explains everything after it; a context that could not be
        // read explains a failed build better than the engine does, unless the writer only
        // stopped because the engine stopped reading ("build aborted").
        if let Answer::Lost(message) = answer {
            return Err(ContainerError::EngineLost { action, message });
        }
        match written {
            Ok(Err(ContainerError::ReadFile { source, .. }))
                if source.kind() == std::io::ErrorKind::BrokenPipe => {}
            Ok(Err(e)) | Err(e) => return Err(e),
            Ok(Ok(_)) => {}
        }
        match answer {
            Answer::Lost(message) => Err(ContainerError::EngineLost { action, message }),
            Answer::Refused(message) => Err(job.failed(run.tag, message)),
            Answer::Done {
                progress,
                error: Some(message),
                ..
            } => {
                let mut message = message.trim().to_string();
                if let Some(step) = progress.failure() {
                    message.push_str(&format!(" ({step})"));
                }
                if let Some(hint) = frontend_hint(job.dockerfile.as_deref(), &message) {
                    message.push_str(&format!("; {hint}"));
                }
                Err(job.failed(run.tag, message))
            }
            Answer::Done {
                progress,
                image_id,
                error: None,
            } => Ok((progress, image_id)),
        }
    }
}

/// Send the build request and read its answer to the end.
async fn follow(
    endpoint: &Endpoint,
    request: hyper::Request<crate::containers::socket::Body>,
    service: &str,
    on_step: &StepHook,
) -> Answer {
    let response = match endpoint.send(request).await {
        Ok(r) => r,
        Err(e) => return Answer::Lost(e.to_string()),
    };
    let status = response.status();
    if !status.is_success() {
        let text = read_short(response.into_body()).await;
        let message = serde_json::from_str::<ErrorBody>(&text).map_or(text, |b| b.message);
        return Answer::Refused(message.trim().to_string());
    }
    let mut lines = Lines::new(response.into_body());
    let mut progress = Progress::default();
    let mut image_id = None;
    let mut error = None;
    while let Some(line) = lines.next().await {
        let line = match line {
            Ok(line) => line,
            Err(e) => return Answer::Lost(crate::error::error_chain(&e)),
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let message: Message = match serde_json::from_slice(&line) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(service, error = %e, "unreadable build message");
                continue;
            }
        };
        match (message.id.as_deref(), &message.aux) {
            (Some("moby.buildkit.trace"), Some(serde_json::Value::String(aux))) => {
                let before = progress.at();
                progress.feed(service, aux);
                if let Some(at) = progress.at()
                    && before != Some(at)
                {
                    on_step.tell(service, at);
                }
            }
            (Some("moby.image.id"), Some(aux)) => {
                image_id = aux.get("ID").and_then(|v| v.as_str()).map(str::to_string);
            }
            _ => {}
        }
        if let Some(text) = &message.stream {
            tracing::debug!(service, "{}", text.trim_end());
        }
        if let Some(text) = message
            .error_detail
            .and_then(|d| d.message)
            .or(message.error)
        {
            error = Some(text);
        }
    }
    Answer::Done {
        progress,
        image_id,
        error,
    }
}

/// What to do about a failure that comes from the engine's Dockerfile frontend rather than from
/// the Dockerfile's commands.
fn frontend_hint(dockerfile: Option<&str>, message: &str) -> Option<&'static str> {
    let dockerfile = dockerfile.unwrap_or_default();
    if message.contains("no active session") {
        return Some(
            "RUN mounts of type secret or ssh need a build session, which deployd does not open: build without them",
        );
    }
    if message.contains("frontend gateway") || message.contains("docker/dockerfile") {
        return Some(
            "the `# syntax=` line makes the engine fetch a Dockerfile frontend image, which failed: remove the line to use the engine's own frontend, or let the engine reach the registry",
        );
    }
    let parse_error = message.contains("unknown instruction") || message.contains("parse error");
    if parse_error && dockerfile.contains("<<") {
        return Some(
            "this engine's Dockerfile frontend predates heredocs (`RUN <<EOF`); Docker 23.0 or newer builds them",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_failures_get_a_hint() {
        let heredoc = "FROM busybox\nRUN <<EOT\necho hi\nEOT\n";
        let parse = "failed to create LLB definition: dockerfile parse error line 3: unknown instruction: ECHO";
        assert!(frontend_hint(Some(heredoc), parse).is_some_and(|h| h.contains("heredocs")));
        assert_eq!(frontend_hint(Some("FROM busybox\n"), "exit code: 3"), None);
        assert!(
            frontend_hint(
                None,
                "failed to solve with frontend gateway.v0: failed to do request"
            )
            .is_some_and(|h| h.contains("syntax"))
        );
        assert!(frontend_hint(None, "no active sessions").is_some_and(|h| h.contains("secret")));
    }
}
