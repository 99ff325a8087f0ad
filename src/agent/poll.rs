//! Polling: with `[triggers] poll_interval` above zero, the daemon looks at its source every
//! interval (plus up to a quarter of it in random jitter, so a fleet does not poll in step)
//! and queues a redeploy when it changed.
//!
//! With `[triggers] idle_poll_interval` above `poll_interval`, each poll that finds nothing
//! changed doubles the wait before the next, up to `idle_poll_interval`; a change brings it
//! back to `poll_interval`. A fleet polled every 5 s that stretches to 60 s while idle costs
//! about 60 requests an hour per host, and sees a change within about 75 s at worst (60 s and
//! its jitter), within 5–6 s while changes keep coming.
//!
//! What one idle poll costs S3:
//!
//! - a **release pointer** source: one `GET current.json` with `If-None-Match: <ETag>`,
//!   answered `304 Not Modified` without a body ([`crate::contract::pointer::read`]);
//! - a **direct key** (environment, config or legacy template): one `HEAD` with
//!   `If-None-Match: <ETag>`, answered 304. On the legacy mutable key this is what notices CI
//!   rewriting it in place.
//!
//! The source is resolved again at every tick (the environment file is re-read, as for every
//! deployment), so an operator who switches a host from a key to a pointer needs no restart.
//! The first observation queues one deployment too: it is a no-op when the startup deployment
//! already serves that artifact, and it closes the window in which the source changed between
//! the startup deployment and the first poll. Errors are logged and the next tick tries again;
//! a poll never stops the daemon.
//!
//! A signed pointer that stops changing is the one thing a 304 cannot reveal: a frozen pointer
//! answers exactly like an idle one. So the poller remembers when the last signed pointer it
//! read expires (`expires_at`, `[source] max_pointer_age`) and, once that moment has passed,
//! queues one deployment, which refuses the expired pointer and reports the failure (status,
//! tags, metrics) while the serving release keeps running.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;
use tokio::task::JoinHandle;

use super::triggers::{Trigger, TriggerOrigin, TriggerQueue};
use crate::config::Config;
use crate::config::envfile::EnvFile;
use crate::contract::pointer::{self, PointerRead};
use crate::deploy::source;
use crate::instance::Instance;
use crate::s3::{self, S3Failure};

/// Starts the poller when `[triggers] poll_interval` is above zero. It resolves the source
/// with the daemon's own `instance`, so `{tag:NAME}` placeholders work as in a deployment.
pub fn spawn(
    cfg: &Config,
    s3: Client,
    instance: Arc<Instance>,
    queue: TriggerQueue,
) -> Option<JoinHandle<()>> {
    let every = cfg.triggers.poll_interval.0;
    if every.is_zero() {
        return None;
    }
    let cfg = cfg.clone();
    tracing::info!(
        interval_ms = every.as_millis() as u64,
        "polling the artifact source"
    );
    Some(tokio::spawn(async move {
        poll_loop(cfg, s3, instance, queue, every).await
    }))
}

/// The interval after a poll: back to `every` after a change, else twice `current` up to
/// `idle` (when `idle` is above `every`).
fn next_interval(current: Duration, every: Duration, idle: Duration, changed: bool) -> Duration {
    if changed || idle <= every {
        every
    } else {
        (current * 2).min(idle)
    }
}

/// The interval plus up to a quarter of it in jitter.
fn next_delay(every: Duration) -> Duration {
    let jitter_ms = (every.as_millis() as u64 / 4).max(1);
    every + Duration::from_millis(fastrand::u64(0..jitter_ms))
}

async fn poll_loop(
    cfg: Config,
    s3: Client,
    instance: Arc<Instance>,
    queue: TriggerQueue,
    every: Duration,
) {
    // (s3://bucket/key watched, its last ETag)
    let mut last: Option<(String, String)> = None;
    // When the last signed pointer read stops holding; taken once it has been acted on.
    let mut expires: Option<SystemTime> = None;
    let idle = cfg.triggers.idle_poll_interval.0;
    let mut interval = every;
    loop {
        tokio::time::sleep(next_delay(interval)).await;
        let env = match EnvFile::load(&cfg.environment_file) {
            Ok(env) => env,
            Err(error) => {
                tracing::warn!(error = %crate::scrub::scrub(&error.to_string()), "poll: cannot read the environment file");
                continue;
            }
        };
        // Tags are read afresh at every tick, as for every deployment.
        instance.new_deployment();
        let artifact = match source::resolve(&cfg, &env, None, &instance).await {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(error = %crate::scrub::scrub(&error.to_string()), "poll: cannot resolve the artifact source");
                continue;
            }
        };
        let at = artifact.to_string();
        let etag = last
            .as_ref()
            .filter(|(watched, _)| *watched == at)
            .map(|(_, e)| e.as_str());
        let object = &artifact.object;
        let changed = if artifact.origin.is_pointer() {
            match pointer::read(&s3, object, etag).await {
                Ok(PointerRead::Unchanged) => match expires {
                    Some(t) if t <= SystemTime::now() => {
                        expires = None;
                        tracing::warn!(pointer = %at, "poll: the release pointer has expired and nobody re-signed it");
                        queue.push(Trigger::new(TriggerOrigin::Poll));
                        None
                    }
                    _ => None,
                },
                Ok(PointerRead::Changed { etag, pointer }) => {
                    tracing::info!(pointer = %at, key = %pointer.key, "poll: the release pointer changed");
                    // An already expired one is reported by the deployment queued now.
                    expires =
                        signed_expiry(&cfg, object, &pointer).filter(|t| *t > SystemTime::now());
                    Some(etag)
                }
                Err(error) => {
                    tracing::warn!(error = %crate::scrub::scrub(&error.to_string()), "poll: cannot read the release pointer");
                    None
                }
            }
        } else {
            let mut head = s3.head_object().bucket(&object.bucket).key(&object.key);
            if let Some(etag) = etag {
                head = head.if_none_match(etag);
            }
            match head.send().await {
                Ok(out) => {
                    tracing::info!(artifact = %at, "poll: the artifact changed");
                    Some(out.e_tag().unwrap_or_default().to_string())
                }
                Err(e) => match s3::classify(&e) {
                    S3Failure::NotModified => None,
                    failure => {
                        tracing::warn!(artifact = %at, error = %crate::scrub::scrub(&failure.to_string()), "poll: head-object failed");
                        None
                    }
                },
            }
        };
        let seen = changed.is_some();
        if let Some(etag) = changed {
            last = Some((at, etag));
            queue.push(Trigger::new(TriggerOrigin::Poll));
        }
        let next = next_interval(interval, every, idle, seen);
        if next != interval {
            tracing::debug!(interval_ms = next.as_millis() as u64, "poll interval");
        }
        interval = next;
    }
}

/// When a pointer just read stops holding, if signatures are required and it verifies.
fn signed_expiry(cfg: &Config, object: &s3::S3Object, p: &pointer::Pointer) -> Option<SystemTime> {
    let keys = cfg.source.trusted_keys().ok().flatten()?;
    let statement = pointer::verify(object, p, &keys).ok()?;
    statement.expiry(cfg.source.max_pointer_age.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_polls_stretch_and_a_change_resets_them() {
        let s = Duration::from_secs;
        let mut i = s(5);
        let mut seen = Vec::new();
        for _ in 0..6 {
            i = next_interval(i, s(5), s(60), false);
            seen.push(i.as_secs());
        }
        assert_eq!(seen, [10, 20, 40, 60, 60, 60]);
        assert_eq!(next_interval(i, s(5), s(60), true), s(5));
        assert_eq!(next_interval(s(5), s(5), Duration::ZERO, false), s(5));
    }
}
