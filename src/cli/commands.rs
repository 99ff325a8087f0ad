//! One function per command: load what it needs, call the module that does the work, print.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;

use super::{Cli, Command, Failure};
use crate::agent::triggers::{self, Trigger, TriggerOrigin};
use crate::agent::{self, Agent};
use crate::ci::publish::{self, CiDefaults};
use crate::ci::{fleet, gc, refresh, rollout};
use crate::config::Config;
use crate::config::envfile::EnvFile;
use crate::contract::signature;
use crate::contract::state::Outcome;
use crate::deploy::release::Layout;
use crate::deploy::source::{self, Artifact, Origin};
use crate::deploy::state::Host;
use crate::deploy::verify;
use crate::deploy::{Deployer, Done, Request};
use crate::error::exit;
use crate::instance::Instance;
use crate::report::Reporter;
use crate::report::logging::Output;
use crate::report::status::Snapshot;
use crate::report::terminal::View;
use crate::s3::S3Object;

async fn deployer(cfg: Config, view: Option<View>) -> Result<Deployer, Failure> {
    let s3 = crate::s3::client(&cfg.s3).await?;
    let reporter = Arc::new(Reporter::new(cfg.paths().status_file, None).with_view(view));
    Ok(Deployer::new(cfg, s3, reporter))
}

/// Runs the parsed command; returns the exit code.
pub(super) async fn dispatch(cli: Cli, output: Output) -> Result<i32, Failure> {
    if let Command::Generate(what) = cli.command {
        // Packaging runs it on a build machine: no config is read.
        return super::generate::run(what);
    }
    let cfg = Config::load(cli.config.as_deref())?;
    match cli.command {
        // Answered above, before the config is read.
        Command::Generate(_) => Ok(exit::OK),
        Command::Run => {
            let agent = Agent::new(cli.config.clone(), cfg).await?;
            agent.run(agent::shutdown_signal()?).await?;
            Ok(exit::OK)
        }
        Command::Trigger(args) => {
            let env = EnvFile::load(&cfg.environment_file)?;
            let bucket = match (args.bucket, &args.key) {
                (Some(b), _) => Some(b),
                (None, Some(_)) => Some(source::default_bucket(&cfg, &env)?),
                (None, None) => None,
            };
            let trigger = Trigger {
                bucket,
                key: args.key,
                force_rebuild: args.force_rebuild,
                clear_cache: args.clear_cache,
                reason: args.reason,
                allow_downgrade: args.allow_downgrade,
                origin: TriggerOrigin::File(PathBuf::new()),
            };
            if trigger.allow_downgrade && !nix::unistd::geteuid().is_root() {
                return Err(Failure {
                    code: exit::USAGE,
                    message: "--allow-downgrade needs root: the daemon honours it only in trigger files root owns".into(),
                });
            }
            if let Some(object) = trigger.target() {
                // The daemon refuses it too; saying so now spares a failed deployment.
                source::check_request(&cfg, &env, &object, &Instance::new(&cfg.report)).await?;
            }
            let path = triggers::write_trigger(&cfg.paths().triggers, &trigger)?;
            println!("queued a redeploy: {}", path.display());
            Ok(exit::OK)
        }
        Command::Deploy {
            bucket,
            key,
            force,
            force_rebuild,
            no_containers,
            allow_downgrade,
        } => {
            let mut cfg = cfg;
            if no_containers {
                cfg.containers.enabled = false;
            }
            let d = deployer(cfg, View::for_output(output)).await?;
            let req = Request {
                target: bucket.zip(key).map(|(b, k)| S3Object::new(b, k)),
                force,
                force_rebuild,
                clear_cache: false,
                allow_downgrade,
                trigger: "command line".into(),
            };
            match d.deploy(&req).await? {
                Done::Deployed { release } => println!("deployed release {release}"),
                Done::Unchanged { release } => {
                    println!("release {release} is already serving this artifact; nothing changed")
                }
            }
            Ok(exit::OK)
        }
        Command::Verify { url, wait } => {
            let object = S3Object::parse_url(&url)?;
            let s3 = crate::s3::client(&cfg.s3).await?;
            let mut scfg = cfg.source.clone();
            scfg.wait_for_artifact = wait;
            let v = verify::verify(&s3, &Artifact::new(object, Origin::Request), &scfg).await?;
            let or_dash = |o: Option<&str>| o.unwrap_or("-").to_string();
            println!("artifact       {}", v.object);
            println!(
                "size           {} ({})",
                v.size,
                ByteSize(v.size).display().iec()
            );
            println!("last modified  {}", or_dash(v.last_modified.as_deref()));
            println!("etag           {}", v.object.etag());
            println!("version id     {}", or_dash(v.object.version_id.as_deref()));
            println!(
                "sha256         {} ({})",
                or_dash(v.expected_sha256.as_deref()),
                v.sha256_source.as_deref().unwrap_or("no expected checksum")
            );
            for (k, val) in &v.metadata {
                println!("metadata       {k}: {val}");
            }
            Ok(exit::OK)
        }
        Command::Status {
            json,
            wait,
            timeout,
        } => status(&cfg, json, wait.then_some(timeout.0)).await,
        Command::Rollback { release } => {
            let d = deployer(cfg, None).await?;
            let id = d.rollback(release.as_deref()).await?;
            println!("current release is now {id}");
            Ok(exit::OK)
        }
        Command::ClearCache => {
            let d = deployer(cfg, None).await?;
            let report = d.clear_cache().await?;
            println!(
                "removed {} images and {} dangling images, reclaimed {} of builder cache, deleted {} app cache paths; the next build starts without cache",
                report.images_removed.len(),
                report.dangling_removed,
                ByteSize(report.build_cache_reclaimed).display().iec(),
                report.paths_removed.len()
            );
            Ok(exit::OK)
        }
        Command::Publish(req) => {
            let mut req = req.with_ci_defaults(CiDefaults::github(|k| std::env::var(k).ok()))?;
            req.sign_password = std::env::var(signature::PASSWORD_ENV).ok();
            let s3 = crate::s3::client(&cfg.s3).await?;
            let p = publish::publish(&s3, &req).await?;
            if let Some(out) = std::env::var_os("GITHUB_OUTPUT").filter(|v| !v.is_empty()) {
                let out = PathBuf::from(out);
                publish::write_github_output(&out, &p).map_err(|e| Failure {
                    code: exit::SOFTWARE,
                    message: format!(
                        "published {} but could not append to GITHUB_OUTPUT {}: {e}",
                        p.object,
                        out.display()
                    ),
                })?;
            }
            println!("{}", p.object.key);
            Ok(exit::OK)
        }
        Command::Gc(req) => {
            let s3 = crate::s3::client(&cfg.s3).await?;
            let r = gc::gc(&s3, &req).await?;
            let verb = if req.dry_run {
                "would delete"
            } else {
                "deleted"
            };
            for d in &r.deleted {
                println!(
                    "{verb} s3://{}/{} ({})",
                    req.bucket,
                    d.key,
                    ByteSize(d.size).display().iec()
                );
            }
            for (env, why) in &r.skipped {
                println!("skipped environment {env}: {why}");
            }
            println!(
                "{verb} {} objects in {} releases, {} in total; kept {} releases{}",
                r.deleted.len(),
                r.releases_deleted.len(),
                ByteSize(r.bytes).display().iec(),
                r.releases_kept,
                if r.protected.is_empty() {
                    String::new()
                } else {
                    format!(" (pointed at: {})", r.protected.join(", "))
                }
            );
            Ok(if r.skipped.is_empty() {
                exit::OK
            } else {
                exit::DATAERR
            })
        }
        Command::Releases { json } => releases(&cfg, json),
        Command::RefreshPointer(mut req) => {
            req.sign_password = std::env::var(signature::PASSWORD_ENV).ok();
            let s3 = crate::s3::client(&cfg.s3).await?;
            let (at, published_at) = refresh::refresh(&s3, &req).await?;
            println!("re-signed {at} at {published_at}");
            Ok(exit::OK)
        }
        Command::Rollout(mut req) => {
            req.signing.sign_password = std::env::var(signature::PASSWORD_ENV).ok();
            let s3 = crate::s3::client(&cfg.s3).await?;
            let r = rollout::rollout(&s3, &req).await?;
            if r.rollout.reverts.is_some() || req.revert {
                println!("{} names {} again, at 100%", r.at, r.key);
                return Ok(exit::OK);
            }
            println!(
                "{} names {} at {}%{}",
                r.at,
                r.key,
                r.rollout.percent,
                r.rollout
                    .previous
                    .as_ref()
                    .map(|p| format!(" (the rest stays on {})", p.key))
                    .unwrap_or_default()
            );
            Ok(exit::OK)
        }
        Command::Fleet(super::FleetCommand::Status(mut req)) => {
            req.signing.sign_password = std::env::var(signature::PASSWORD_ENV).ok();
            let (report, result) = fleet::status(&cfg, &req).await;
            if req.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", fleet::render(&report));
            }
            result?;
            Ok(exit::OK)
        }
        Command::CheckConfig => check_config(&cfg).await,
    }
}

/// `deployd releases`: the releases on disk, newest first, as a table or JSON.
fn releases(cfg: &Config, json: bool) -> Result<i32, Failure> {
    let layout = Layout::new(cfg.paths());
    let list = Host::new(&layout).releases()?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return Ok(exit::OK);
    }
    if list.is_empty() {
        println!("no releases under {}", layout.paths().releases.display());
        return Ok(exit::OK);
    }
    let or_dash = |o: Option<&str>| o.unwrap_or("-").to_string();
    let mut rows = vec![
        [
            "RELEASE",
            "STATUS",
            "COMMIT",
            "ACTIVATED",
            "SIZE",
            "ARTIFACT",
        ]
        .map(String::from),
    ];
    for r in &list {
        let status = match (r.serving, r.previous_good, r.rolled_back, &r.incomplete) {
            (_, _, _, Some(_)) => "incomplete",
            (true, _, _, _) => "serving",
            (_, true, _, _) => "previous",
            (_, _, true, _) => "rolled back",
            _ => "",
        };
        rows.push([
            r.id.clone(),
            status.to_string(),
            or_dash(r.commit.as_deref().map(|c| &c[..c.len().min(8)])),
            or_dash(r.activated_at.as_deref()),
            or_dash(
                r.unpacked_bytes
                    .map(|b| ByteSize(b).display().iec().to_string())
                    .as_deref(),
            ),
            or_dash(r.artifact.as_ref().map(ToString::to_string).as_deref()),
        ]);
    }
    print!("{}", crate::report::columns(&rows));
    Ok(exit::OK)
}

/// `deployd check-config`: the resolved source, the identity, tags and metrics.
async fn check_config(cfg: &Config) -> Result<i32, Failure> {
    let env = EnvFile::load(&cfg.environment_file)?;
    let instance = Instance::new(&cfg.report);
    let artifact = source::resolve(cfg, &env, None, &instance).await?;
    println!(
        "config         {}",
        cfg.path
            .as_ref()
            .map_or("(defaults)".into(), |p| p.display().to_string())
    );
    println!("environment    {}", cfg.environment_file.display());
    println!("source         {artifact} (from {})", artifact.origin);
    if artifact.origin == Origin::Legacy {
        println!(
            "warning        the legacy path is mutable; prefer versioned keys in DEPLOYMENT_KEY"
        );
    }
    match cfg.source.trusted_keys() {
        Ok(Some(keys)) => println!(
            "signatures     required: {} trusted public key{}; unsigned artifacts and pointers are refused",
            keys.len(),
            if keys.len() == 1 { "" } else { "s" }
        ),
        _ => {
            println!(
                "WARNING        NO [source] public_key IS CONFIGURED: this host deploys whatever anyone who can write the bucket puts there, including old releases; set public_key (see the README's security section)"
            );
            tracing::warn!(
                "no [source] public_key is configured: artifacts and pointers are not authenticated"
            );
        }
    }
    println!("state dir      {}", cfg.state_dir.display());
    if cfg.environment.is_empty() {
        println!(
            "fleet          app {}, no environment: set `environment` so that `deployd fleet status` finds this host",
            cfg.app
        );
    } else {
        println!(
            "fleet          app {}, environment {} (tagged {p}app, {p}environment)",
            cfg.app,
            cfg.environment,
            p = cfg.report.tag_prefix
        );
    }
    let mut lines = instance.check().await;
    lines.push(crate::report::metrics::check(cfg));
    for (label, text) in lines {
        println!("{label:<15}{text}");
    }
    Ok(exit::OK)
}

/// `deployd status`: the live status if a daemon writes one, else the durable state; with
/// `wait`, once the running deployment has ended, exiting with its result.
async fn status(cfg: &Config, json: bool, wait: Option<Duration>) -> Result<i32, Failure> {
    let paths = cfg.paths();
    let snap = match wait {
        Some(timeout) => Snapshot::wait_settled(&paths, timeout).await?,
        None => Snapshot::read(&paths)?,
    };
    let last = snap.last_attempt().cloned();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&snap).unwrap_or_default()
        );
    } else {
        match &snap.state.current {
            Some(r) => println!(
                "serving        {} (commit {}, {}, since {})",
                r.id,
                r.commit.as_deref().unwrap_or("-"),
                r.artifact,
                r.activated_at
            ),
            None => println!("serving        nothing yet"),
        }
        if let Some(s) = &snap.live {
            println!(
                "daemon         pid {}, {}{}",
                s.pid,
                s.stage,
                s.detail
                    .as_deref()
                    .map(|d| format!(" {d}"))
                    .unwrap_or_default()
            );
        }
        if let Some(a) = &last {
            println!(
                "last attempt   {} at {} ({}){}",
                a.outcome.as_str(),
                a.finished_at,
                a.trigger,
                a.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(match (&last, wait) {
        (Some(a), Some(_)) if matches!(a.outcome, Outcome::Failed) => a.exit_code.max(1),
        _ => exit::OK,
    })
}
