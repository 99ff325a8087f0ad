//! Build one release with deployd's container stage and print what it did as one JSON line:
//! `containers_build PROJECT RELEASE_ID DIR [PREV_ID PREV_DIR] [--force] [--classic]`
//! (`--classic`: the classic builder instead of the one decided from the engine). Used by
//! `bench/containers.sh` to compare deployd's builds with the Docker CLI and BuildKit.

// A developer tool: a panic with the error is its error report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use deployd::config::ContainersConfig;
use deployd::containers::{Builder, Engine, ReleaseRef};
use deployd::error::ExitCode;

#[tokio::main]
async fn main() {
    // RUST_LOG=deployd=debug shows every build step and whether it was a cache hit.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let force = args.iter().any(|a| a == "--force");
    let classic = args.iter().any(|a| a == "--classic");
    args.retain(|a| a != "--force" && a != "--classic");
    if args.len() != 3 && args.len() != 5 {
        eprintln!(
            "usage: containers_build PROJECT RELEASE_ID DIR [PREV_ID PREV_DIR] [--force] [--classic]"
        );
        std::process::exit(64);
    }
    let dir = PathBuf::from(&args[2]);
    let prev_dir = args.get(4).map(PathBuf::from);
    let release = ReleaseRef {
        id: &args[1],
        dir: &dir,
        commit: Some("benchcommit"),
    };
    let previous = prev_dir.as_ref().map(|d| ReleaseRef {
        id: &args[3],
        dir: d,
        commit: Some("benchcommit"),
    });
    let code = match run(&args[0], &release, previous.as_ref(), force, classic).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}

async fn run(
    project: &str,
    release: &ReleaseRef<'_>,
    previous: Option<&ReleaseRef<'_>>,
    force: bool,
    classic: bool,
) -> Result<(), deployd::containers::ContainerError> {
    let mut engine = Engine::connect(Duration::from_secs(10)).await?;
    if classic {
        engine = engine.with_builder(Builder::Classic);
    }
    let settings = ContainersConfig::default();
    let p = Engine::load_project(project, release, &BTreeMap::new(), &settings)?;
    let started = Instant::now();
    let report = engine.build(&p, release, previous, force).await?;
    let total = started.elapsed();
    for s in &report.services {
        println!(
            "{{\"service\":\"{}\",\"ms\":{},\"steps\":{},\"cacheable\":{},\"hits\":{},\"total_ms\":{}}}",
            s.service,
            s.duration.as_millis(),
            s.steps,
            s.cacheable_steps,
            s.cache_hits,
            total.as_millis()
        );
    }
    eprintln!("builder: {}", engine.builder_decision().reason);
    Ok(())
}
