//! The command line: one subcommand per operator task, exit codes from [`crate::exit`].
//!
//! Every command loads the config first (exit 78 on any problem), sets up logging, and prints
//! exactly one `deployd: error: ...` sentence on failure.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::agent::triggers::{self, Trigger, TriggerOrigin};
use crate::agent::{self, Agent};
use crate::config::envfile::EnvFile;
use crate::config::{Config, ConfigError, HumanDuration};
use crate::contract::host::{Outcome, State, Status};
use crate::deploy::release::Layout;
use crate::deploy::source::{self, Artifact, Origin};
use crate::deploy::{Deployer, Done, Request};
use crate::error::{ExitCode, exit};
use crate::instance::imds::Imds;
use crate::logging::{self, LogFormat};
use crate::report::Reporter;

#[derive(Debug, Parser)]
#[command(
    name = "deployd",
    version,
    about = "Deploys verified S3 artifacts onto this host"
)]
pub struct Cli {
    /// Config file [default: /etc/deployd/deployd.toml]
    #[arg(long, global = true, env = "DEPLOYD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Debug logging.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon (systemd's ExecStart): deploy at startup, then on SIGHUP and trigger files.
    Run,
    /// Ask the running daemon to redeploy by dropping a trigger file.
    Trigger {
        /// Deploy this bucket (with --key) instead of the configured source.
        #[arg(long, requires = "key")]
        bucket: Option<String>,
        /// Deploy this key (bucket: --bucket, else DEPLOYMENT_BUCKET, else [source] bucket).
        #[arg(long)]
        key: Option<String>,
        /// Rebuild container images without cache.
        #[arg(long)]
        force_rebuild: bool,
        /// Remove the project's images and builder cache first.
        #[arg(long)]
        clear_cache: bool,
        /// Why, for the log and the status.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deploy now, in the foreground, and exit with the result.
    Deploy {
        /// Bucket to deploy from (with --key), overriding the configured source.
        #[arg(long, requires = "key")]
        bucket: Option<String>,
        /// Key to deploy (with --bucket).
        #[arg(long, requires = "bucket")]
        key: Option<String>,
        /// Redeploy even if this artifact is already serving.
        #[arg(long)]
        force: bool,
        /// Rebuild container images without cache.
        #[arg(long)]
        force_rebuild: bool,
        /// Skip the container stage.
        #[arg(long)]
        no_containers: bool,
    },
    /// Run the head-object checks on s3://bucket/key and print what they found.
    Verify {
        url: String,
        /// How long to wait for the key to appear.
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        wait: HumanDuration,
    },
    /// Show what is serving and the last result.
    Status {
        #[arg(long)]
        json: bool,
        /// Wait until the running deployment ends; exit 0 if serving, non-zero otherwise.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (exit 75).
        #[arg(long, default_value = "15m", value_parser = parse_duration, requires = "wait")]
        timeout: HumanDuration,
    },
    /// Point `current` back at the previous good release (or RELEASE).
    Rollback { release: Option<String> },
    /// Validate the config and environment and print the resolved source.
    CheckConfig,
    /// Remove the project's images, the builder cache and the app cache paths.
    ClearCache,
    /// CI: upload FILE under a new versioned key with metadata and checksum, verify it landed.
    Publish {
        /// The artifact (a .tar.gz built by CI).
        file: PathBuf,
        #[arg(long)]
        bucket: String,
        #[arg(long)]
        app: String,
        /// e.g. prod, staging, pr-51.
        #[arg(long)]
        environment: String,
        /// Full commit id [default: GITHUB_SHA].
        #[arg(long)]
        commit: Option<String>,
        /// [default: GITHUB_HEAD_REF, then GITHUB_REF_NAME]
        #[arg(long)]
        branch: Option<String>,
        /// [default: GITHUB_RUN_ID]
        #[arg(long)]
        run_id: Option<String>,
        /// Pull request number [default: from GITHUB_REF refs/pull/N/merge].
        #[arg(long)]
        pr: Option<String>,
        /// Sign with this minisign secret key file (password in DEPLOYD_SIGN_PASSWORD).
        #[arg(long, value_name = "SECRET_KEY_FILE")]
        sign: Option<PathBuf>,
        /// Then point {app}/{environment}/current.json at the new artifact.
        #[arg(long)]
        pointer: bool,
        /// Files larger than this go up as parallel multipart uploads.
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        multipart_threshold: u64,
        #[arg(long, default_value = "16MiB", value_parser = parse_size)]
        part_size: u64,
        /// Parts in flight at once.
        #[arg(long, default_value_t = crate::ci::publish::DEFAULT_CONCURRENCY)]
        concurrency: usize,
    },
    /// CI: delete old artifacts per environment, keeping the newest, the young and the pointed-at.
    Gc {
        #[arg(long)]
        bucket: String,
        #[arg(long)]
        app: String,
        /// Only this environment [default: every environment of the app].
        #[arg(long)]
        environment: Option<String>,
        /// Keep the newest N releases per environment.
        #[arg(long, default_value_t = 10)]
        keep: usize,
        /// Keep releases younger than D days.
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// Print what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("invalid size {s:?}: {e}"))
}

fn parse_duration(s: &str) -> Result<HumanDuration, String> {
    humantime::parse_duration(s)
        .map(HumanDuration)
        .map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// A command's failure: the sentence to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl<E: std::fmt::Display> From<(i32, E)> for Failure {
    fn from((code, e): (i32, E)) -> Self {
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

macro_rules! fail {
    ($e:expr) => {{
        let e = $e;
        Failure {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }};
}

/// Entry point for the binary; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return code;
        }
    };
    logging::init(cli.log_format, cli.verbose);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("deployd: error: cannot start the async runtime: {e}");
            return exit::SOFTWARE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("deployd: error: {}", f.message);
            f.code
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config, Failure> {
    Config::load(cli.config.as_deref()).map_err(|e: ConfigError| fail!(e))
}

async fn deployer(cfg: Config, terminal: bool) -> Result<Deployer, Failure> {
    let s3 = crate::s3::client(&cfg.s3).await.map_err(|e| fail!(e))?;
    let reporter = std::sync::Arc::new(Reporter::new(cfg.runtime_dir.clone(), terminal, None));
    Ok(Deployer::new(cfg, s3, reporter))
}

async fn dispatch(cli: Cli) -> Result<i32, Failure> {
    let cfg = load_config(&cli)?;
    let config_path = cli.config.clone();
    match cli.command {
        Command::Run => {
            let agent = Agent::new(config_path, cfg).await.map_err(|e| fail!(e))?;
            let shutdown = agent::shutdown_signal().map_err(|e| fail!(e))?;
            agent.run(shutdown).await.map_err(|e| fail!(e))?;
            Ok(exit::OK)
        }
        Command::Trigger {
            bucket,
            key,
            force_rebuild,
            clear_cache,
            reason,
        } => {
            let bucket = match (&bucket, &key) {
                (Some(b), _) => Some(b.clone()),
                (None, Some(_)) => {
                    let env = EnvFile::load(&cfg.environment_file).map_err(|e| fail!(e))?;
                    env.get("DEPLOYMENT_BUCKET")
                        .map(str::to_string)
                        .or_else(|| (!cfg.source.bucket.is_empty()).then(|| cfg.source.bucket.clone()))
                        .ok_or_else(|| Failure {
                            code: exit::USAGE,
                            message: "--key needs a bucket: pass --bucket, or set DEPLOYMENT_BUCKET or [source] bucket".into(),
                        })
                        .map(Some)?
                }
                (None, None) => None,
            };
            let trigger = Trigger {
                bucket,
                key,
                force_rebuild,
                clear_cache,
                reason,
                origin: TriggerOrigin::File(PathBuf::new()),
            };
            let path = triggers::write_trigger(&cfg.runtime_dir.join("triggers"), &trigger)
                .map_err(|e| fail!(e))?;
            println!("queued a redeploy: {}", path.display());
            Ok(exit::OK)
        }
        Command::Deploy {
            bucket,
            key,
            force,
            force_rebuild,
            no_containers,
        } => {
            let mut cfg = cfg;
            if no_containers {
                cfg.containers.enabled = false;
            }
            let d = deployer(cfg, true).await?;
            let req = Request {
                target: bucket.zip(key),
                force,
                force_rebuild,
                clear_cache: false,
                trigger: "command line".into(),
            };
            match d.deploy(&req).await {
                Ok(Done::Deployed { release }) => {
                    println!("deployed release {release}");
                    Ok(exit::OK)
                }
                Ok(Done::Unchanged { release }) => {
                    println!("release {release} is already serving this artifact; nothing changed");
                    Ok(exit::OK)
                }
                Err(e) => Err(fail!(e)),
            }
        }
        Command::Verify { url, wait } => {
            let (bucket, key) = source::parse_s3_url(&url).map_err(|e| fail!(e))?;
            let s3 = crate::s3::client(&cfg.s3).await.map_err(|e| fail!(e))?;
            let mut scfg = cfg.source.clone();
            scfg.wait_for_artifact = wait;
            let artifact = Artifact {
                bucket,
                key,
                origin: Origin::Request,
                expected_sha256: None,
            };
            let v = crate::deploy::verify::verify(&s3, &artifact, &scfg)
                .await
                .map_err(|e| fail!(e))?;
            println!("artifact       {}", v.url());
            println!(
                "size           {} ({})",
                v.size,
                bytesize::ByteSize(v.size).display().iec()
            );
            println!(
                "last modified  {}",
                v.last_modified.as_deref().unwrap_or("-")
            );
            println!("etag           {}", v.etag);
            println!("version id     {}", v.version_id.as_deref().unwrap_or("-"));
            println!(
                "sha256         {} ({})",
                v.expected_sha256.as_deref().unwrap_or("-"),
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
            let d = deployer(cfg, false).await?;
            let id = d.rollback(release.as_deref()).await.map_err(|e| fail!(e))?;
            println!("current release is now {id}");
            Ok(exit::OK)
        }
        Command::ClearCache => {
            let d = deployer(cfg, false).await?;
            let report = d.clear_cache().await.map_err(|e| fail!(e))?;
            println!(
                "removed {} images and {} dangling images, reclaimed {} of builder cache, deleted {} app cache paths; the next build starts without cache",
                report.images_removed.len(),
                report.dangling_removed,
                bytesize::ByteSize(report.build_cache_reclaimed)
                    .display()
                    .iec(),
                report.paths_removed.len()
            );
            Ok(exit::OK)
        }
        Command::Publish {
            file,
            bucket,
            app,
            environment,
            commit,
            branch,
            run_id,
            pr,
            sign,
            pointer,
            multipart_threshold,
            part_size,
            concurrency,
        } => {
            let ci = crate::ci::publish::CiDefaults::github(|k| std::env::var(k).ok());
            let Some(commit) = commit.or(ci.commit) else {
                return Err(Failure {
                    code: exit::USAGE,
                    message: "no commit id: pass --commit SHA or run where GITHUB_SHA is set"
                        .into(),
                });
            };
            let req = crate::ci::publish::PublishRequest {
                file,
                bucket,
                app,
                environment,
                commit,
                branch: branch.or(ci.branch),
                run_id: run_id.or(ci.run_id),
                pr_number: pr.or(ci.pr_number),
                sign,
                sign_password: std::env::var(crate::contract::signature::PASSWORD_ENV).ok(),
                pointer,
                multipart_threshold,
                part_size,
                concurrency,
                now: std::time::SystemTime::now(),
            };
            let s3 = crate::s3::client(&cfg.s3).await.map_err(|e| fail!(e))?;
            let p = crate::ci::publish::publish(&s3, &req)
                .await
                .map_err(|e| fail!(e))?;
            if let Some(out) = std::env::var_os("GITHUB_OUTPUT").filter(|v| !v.is_empty()) {
                let out = PathBuf::from(out);
                crate::ci::publish::write_github_output(&out, &p).map_err(|e| Failure {
                    code: exit::SOFTWARE,
                    message: format!(
                        "published {} but could not append to GITHUB_OUTPUT {}: {e}",
                        p.url(),
                        out.display()
                    ),
                })?;
            }
            println!("{}", p.key);
            Ok(exit::OK)
        }
        Command::Gc {
            bucket,
            app,
            environment,
            keep,
            days,
            dry_run,
        } => {
            let s3 = crate::s3::client(&cfg.s3).await.map_err(|e| fail!(e))?;
            let req = crate::ci::gc::GcRequest {
                bucket,
                app,
                environment,
                keep,
                days,
                dry_run,
                now: std::time::SystemTime::now(),
            };
            let r = crate::ci::gc::gc(&s3, &req).await.map_err(|e| fail!(e))?;
            let verb = if dry_run { "would delete" } else { "deleted" };
            for d in &r.deleted {
                println!(
                    "{verb} s3://{}/{} ({})",
                    req.bucket,
                    d.key,
                    bytesize::ByteSize(d.size).display().iec()
                );
            }
            for (env, why) in &r.skipped {
                println!("skipped environment {env}: {why}");
            }
            println!(
                "{verb} {} objects in {} releases, {} in total; kept {} releases{}",
                r.deleted.len(),
                r.releases_deleted.len(),
                bytesize::ByteSize(r.bytes).display().iec(),
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
        Command::CheckConfig => {
            let env = EnvFile::load(&cfg.environment_file).map_err(|e| fail!(e))?;
            let imds = Imds::with_tags(crate::instance::tags::Ec2Tags::new(&cfg.report));
            let artifact = source::resolve(&cfg, &env, None, &imds)
                .await
                .map_err(|e| fail!(e))?;
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
            println!("state dir      {}", cfg.state_dir.display());
            let mut lines = match imds.tags() {
                Some(tags) => tags.check(&imds).await,
                None => Vec::new(),
            };
            lines.push(crate::report::metrics::check(&cfg));
            for (label, text) in lines {
                println!("{label:<15}{text}");
            }
            Ok(exit::OK)
        }
    }
}

/// `deployd status`: the live status if a daemon writes one, else the durable state.
async fn status(cfg: &Config, json: bool, wait: Option<Duration>) -> Result<i32, Failure> {
    let layout = Layout::new(&cfg.state_dir);
    let deadline = wait.map(|w| Instant::now() + w);
    loop {
        let live = Status::load(&cfg.runtime_dir).filter(|s| pid_alive(s.pid));
        let state = State::load(&layout.state_file).map_err(|e| fail!(e))?;
        let deploying = live.as_ref().is_some_and(|s| s.deploying);
        if let Some(deadline) = deadline
            && (deploying || (live.is_none() && state.last_attempt.is_none()))
        {
            if Instant::now() >= deadline {
                return Err(Failure {
                    code: exit::TEMPFAIL,
                    message: "timed out waiting for the deployment to finish".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        let last = live
            .as_ref()
            .and_then(|s| s.last_attempt.clone())
            .or(state.last_attempt.clone());
        if json {
            let doc = serde_json::json!({ "live": live, "state": state });
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        } else {
            match &state.current {
                Some(r) => println!(
                    "serving        {} (commit {}, s3://{}/{}, since {})",
                    r.id,
                    r.commit.as_deref().unwrap_or("-"),
                    r.bucket,
                    r.key,
                    r.activated_at
                ),
                None => println!("serving        nothing yet"),
            }
            if let Some(s) = &live {
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
                    "last attempt   {:?} at {} ({}){}",
                    a.outcome,
                    a.finished_at,
                    a.trigger,
                    a.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
        }
        return Ok(match (&last, wait) {
            (Some(a), Some(_)) if matches!(a.outcome, Outcome::Failed) => a.exit_code.max(1),
            _ => exit::OK,
        });
    }
}

fn pid_alive(pid: u32) -> bool {
    pid != 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}
