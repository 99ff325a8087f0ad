//! BuildKit builds against the real Docker engine: a Dockerfile in BuildKit syntax builds and
//! serves, reuses its unchanged steps after a code-only change and after the builder cache is
//! pruned (hits counted from the decoded BuildKit progress), and builds cold after `clear-cache`;
//! what the engine's Dockerfile frontend cannot build fails as a bad Dockerfile (65), and an
//! engine that goes away as an unavailable one (69).
//!
//! Tests run whenever the engine answers, and fail (not skip) when `CI` is set and it does not.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::docker::{
    App, ENGINE_LOCK, EngineRelay, Variant, deploy, engine, http_get, operator_prune,
};
use deployd::containers::{Builder, ContainerError, Engine, ReleaseRef, ServiceBuild};
use deployd::error::ExitCode;

fn rel<'a>(id: &'a str, dir: &'a Path) -> ReleaseRef<'a> {
    ReleaseRef {
        id,
        dir,
        commit: Some("0123456789abcdef"),
    }
}

/// Steps of the BuildKit-syntax fixture a code-only change leaves alone: in `build` the cache
/// mount RUN, COPY deps.txt and the bind mount RUN; in the runtime stage RUN, COPY static and the
/// two COPY --from=build of what those made.
const UNCHANGED_STEPS: usize = 7;

/// At least 80% of the unchanged steps hit, and never a step whose input changed.
fn assert_reused(b: &ServiceBuild) {
    assert_eq!(b.builder, Builder::BuildKit);
    assert!(
        b.cache_hits * 5 >= UNCHANGED_STEPS * 4 && b.cache_hits <= UNCHANGED_STEPS,
        "{} of {UNCHANGED_STEPS} unchanged steps hit: {b:?}",
        b.cache_hits
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildkit_syntax_builds_serves_and_reuses_unchanged_steps_after_a_prune() {
    let Some(engine) = buildkit_engine().await else {
        return;
    };
    let _lock = ENGINE_LOCK.write().await;
    // Cold: BuildKit's cache would otherwise answer from an earlier run of this test.
    operator_prune(false);
    let app = App::new("bksyntax");
    let repo = app.image_repo("backend");
    let mut v = Variant::new("v1");
    v.buildkit_syntax = true;
    let d1 = app.release("r1", &v);
    let (b1, _) = deploy(&engine, &app, &rel("r1", &d1), None).await.unwrap();
    assert_eq!(http_get(app.port, "/version"), (200, "v1\n".into()));
    assert_eq!(
        http_get(app.port, "/deps"),
        (200, "left-pad@1.3.0\n".into())
    );
    // `$TARGETPLATFORM` was set by the frontend; the cache mount outlived the RUN that filled it.
    assert!(http_get(app.port, "/platform").1.starts_with("linux/"));
    assert_eq!(http_get(app.port, "/cache-seen"), (200, "seen\n".into()));
    let s1 = &b1.services[0];
    assert_eq!(s1.stages, ["build"], "{s1:?}");
    assert_eq!((s1.cache_hits, s1.cacheable_steps), (0, 11), "cold: {s1:?}");
    assert!(
        app.image_tags().contains(&format!("{repo}:r1-stage-build")),
        "{:?}",
        app.image_tags()
    );

    // A code-only change.
    v.version = "v2".into();
    let d2 = app.release("r2", &v);
    let (b2, _) = deploy(&engine, &app, &rel("r2", &d2), Some(&rel("r1", &d1)))
        .await
        .unwrap();
    assert_eq!(http_get(app.port, "/version"), (200, "v2\n".into()));
    assert_reused(&b2.services[0]);

    // The operator frees space: only the previous release's images (inline cache metadata) are
    // left to take cache from.
    operator_prune(true);
    v.version = "v3".into();
    let d3 = app.release("r3", &v);
    let (b3, _) = deploy(&engine, &app, &rel("r3", &d3), Some(&rel("r2", &d2)))
        .await
        .unwrap();
    assert_eq!(http_get(app.port, "/version"), (200, "v3\n".into()));
    let s3 = &b3.services[0];
    assert_reused(s3);
    assert!(
        s3.cache_from.contains(&format!("{repo}:r2-stage-build")),
        "{s3:?}"
    );
    assert_eq!(
        http_get(app.port, "/deps"),
        (200, "left-pad@1.3.0\n".into())
    );

    // clear-cache really clears: the next build reuses nothing.
    engine
        .clear_cache(&app.project, std::slice::from_ref(&d3), &[])
        .await
        .unwrap();
    v.version = "v4".into();
    let d4 = app.release("r4", &v);
    let (b4, _) = deploy(&engine, &app, &rel("r4", &d4), Some(&rel("r3", &d3)))
        .await
        .unwrap();
    let s4 = &b4.services[0];
    assert_eq!(s4.cache_hits, 0, "{s4:?}");
    assert!(s4.no_cache && s4.cache_from.is_empty(), "{s4:?}");
    assert_eq!(http_get(app.port, "/version"), (200, "v4\n".into()));
}

/// The engine, when it answers and deployd builds with BuildKit on it (everywhere but on the
/// containerd image store, where the engine module explains why not).
async fn buildkit_engine() -> Option<Engine> {
    let engine = engine().await?;
    let decision = engine.builder_decision();
    if decision.builder != Builder::BuildKit {
        assert!(engine.facts().containerd_store, "{}", decision.reason);
        eprintln!("skipping: {}", decision.reason);
        return None;
    }
    Some(engine)
}

/// The major version of the engine (`20.10.24+dfsg1` -> 20).
fn engine_major(engine: &Engine) -> u32 {
    let version = &engine.facts().server_version;
    version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_frontend_cannot_build_is_a_bad_dockerfile_named_as_such() {
    let Some(engine) = buildkit_engine().await else {
        return;
    };
    let _lock = ENGINE_LOCK.read().await;
    let app = App::new("frontend");

    // Heredocs: the Dockerfile frontend of Docker 23.0 and newer has them.
    let mut v = Variant::new("v1");
    v.extra_dockerfile = "RUN <<EOT\necho heredoc > /www/heredoc\nEOT\n".into();
    let d1 = app.release("r1", &v);
    let result = deploy(&engine, &app, &rel("r1", &d1), None).await;
    if engine_major(&engine) >= 23 {
        result.unwrap();
        assert_eq!(http_get(app.port, "/heredoc"), (200, "heredoc\n".into()));
    } else {
        let err = result.unwrap_err();
        assert!(matches!(err, ContainerError::BuildFailed { .. }), "{err}");
        assert_eq!(err.exit_code(), 65);
        let msg = err.to_string();
        assert!(msg.contains("backend") && msg.contains("heredocs"), "{msg}");
        assert!(app.containers().is_empty(), "nothing was started");
    }

    // A secret mount needs a build session, which deployd does not open.
    let mut v = Variant::new("v2");
    v.extra_dockerfile =
        "RUN --mount=type=secret,id=token cat /run/secrets/token > /dev/null || true\n".into();
    let d2 = app.release("r2", &v);
    let err = deploy(&engine, &app, &rel("r2", &d2), None)
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 65, "{err}");
    assert!(err.to_string().contains("secret"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_goes_away_during_a_build_is_unavailable_not_a_bad_dockerfile() {
    let Some(_) = engine().await else { return };
    let _lock = ENGINE_LOCK.read().await;
    let app = App::new("lost");
    let d1 = app.release("r1", &Variant::new("v1"));
    let p1 = app.load(&rel("r1", &d1));
    for builder in [Builder::BuildKit, Builder::Classic] {
        let relay = EngineRelay::start();
        let engine = Engine::connect_to(Some(&relay.socket), Duration::from_secs(5), |_, _, _| {})
            .await
            .unwrap()
            .with_builder(builder);
        assert_eq!(engine.builder_decision().builder, builder);
        drop(relay);
        // Forced: no cache look-ups before the build request itself.
        let err = engine
            .build(&p1, &rel("r1", &d1), None, true)
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), 69, "{builder:?}: {err}");
        assert!(err.to_string().contains("backend"), "{builder:?}: {err}");
    }
}
