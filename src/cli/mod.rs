//! The command line: parsing ([`Cli`]) and printing only; every command is a call into the
//! module that does the work ([`commands`]).
//!
//! Every command loads the config first (exit 78 on any problem), sets up logging, and prints
//! exactly one `deployd: error: ...` sentence on failure, exiting with the error's
//! [`crate::error::ExitCode`].

mod commands;
mod generate;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::HumanDuration;
use crate::error::{ExitCode, exit};
use crate::report::logging::{self, LogFormat, Output};

#[derive(Debug, Parser)]
#[command(
    name = "deployd",
    version,
    about = "Deploys verified S3 artifacts onto this host"
)]
pub(crate) struct Cli {
    /// Config file [default: /etc/deployd/deployd.toml]
    #[arg(long, global = true, env = "DEPLOYD_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Log format on stderr [default: text; `deploy` in a terminal shows its stages,
    /// progress bars and a summary instead].
    #[arg(long, global = true, value_enum)]
    pub(crate) log_format: Option<LogFormat>,
    /// Debug logging (and the logs instead of `deploy`'s terminal view).
    #[arg(short, long, global = true)]
    pub(crate) verbose: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// The daemon (systemd's ExecStart): deploy at startup, then on SIGHUP and trigger files.
    Run,
    /// Ask the running daemon to redeploy by dropping a trigger file.
    Trigger(TriggerArgs),
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
        /// Accept a signed release older than the newest one accepted here (a deliberate
        /// rollback; the usual way is to publish the old build again).
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// Run the head-object checks on s3://bucket/key and print what they found.
    Verify {
        /// The artifact: s3://bucket/key.
        url: String,
        /// How long to wait for the key to appear.
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        wait: HumanDuration,
    },
    /// Show what is serving and the last result.
    Status {
        /// Print the live status and the state as JSON.
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
    Rollback {
        /// A release id, as `deployd releases` lists them.
        release: Option<String>,
    },
    /// List the releases on disk, newest first: the serving one, the previous good one, and
    /// what each was built from.
    Releases {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate the config and environment and print the resolved source.
    CheckConfig,
    /// Remove the project's images, the builder cache and the app cache paths.
    ClearCache,
    /// CI: upload FILE under a new versioned key with metadata and checksum, verify it landed.
    Publish(crate::ci::publish::PublishRequest),
    /// CI: delete old artifacts per environment, keeping the newest, the young and the pointed-at.
    Gc(crate::ci::gc::GcRequest),
    /// Packaging: write the man pages and shell completions.
    #[command(hide = true, subcommand)]
    Generate(generate::Generate),
    /// CI: re-sign {app}/{environment}/current.json unchanged, so hosts limiting its age keep it.
    RefreshPointer(crate::ci::refresh::RefreshRequest),
    /// CI: set the share of the fleet that takes the release {app}/{environment}/current.json
    /// names (re-signed with --sign); the rest stays on the previous release.
    Rollout(crate::ci::rollout::RolloutRequest),
    /// CI: the fleet as its EC2 instance tags report it.
    #[command(subcommand)]
    Fleet(FleetCommand),
}

/// `deployd fleet ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum FleetCommand {
    /// The instances of an app and environment: release, commit, status; with --wait, block
    /// until the rollout converges (exit 0) or fails (exit 65).
    Status(crate::ci::fleet::FleetRequest),
}

fn parse_duration(s: &str) -> Result<HumanDuration, String> {
    humantime::parse_duration(s)
        .map(HumanDuration)
        .map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// A command's failure: the sentence to print and the exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    /// The exit code.
    pub code: i32,
    /// The one sentence printed after `deployd: error: `.
    pub message: String,
}

impl<E: ExitCode + std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }
}

/// Entry point for the binary; returns the process exit code.
#[allow(clippy::print_stderr)] // The one sentence a failed command prints, by contract.
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
    let output = Output::choose(
        cli.log_format,
        cli.verbose,
        matches!(cli.command, Command::Deploy { .. }),
    );
    logging::init(output, cli.verbose);
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
    match runtime.block_on(commands::dispatch(cli, output)) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("deployd: error: {}", crate::scrub::scrub(&f.message));
            f.code
        }
    }
}

/// `deployd trigger`: what the trigger file asks of the daemon.
#[derive(Debug, clap::Args)]
pub struct TriggerArgs {
    /// Deploy this bucket (with --key) instead of the configured source.
    #[arg(long, requires = "key")]
    pub bucket: Option<String>,
    /// Deploy this key (bucket: --bucket, else DEPLOYMENT_BUCKET, else [source] bucket).
    #[arg(long)]
    pub key: Option<String>,
    /// Rebuild container images without cache.
    #[arg(long)]
    pub force_rebuild: bool,
    /// Remove the project's images and builder cache first.
    #[arg(long)]
    pub clear_cache: bool,
    /// Why, for the log and the status.
    #[arg(long)]
    pub reason: Option<String>,
    /// Accept a signed release older than the newest accepted (honoured from root only).
    #[arg(long)]
    pub allow_downgrade: bool,
}
