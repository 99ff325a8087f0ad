//! The command line: parsing ([`Cli`]) and printing only; every command is a call into the
//! module that does the work ([`commands`]).
//!
//! Every command loads the config first (exit 78 on any problem), sets up logging, and prints
//! exactly one `deployd: error: ...` sentence on failure, exiting with the error's
//! [`crate::error::ExitCode`].

mod commands;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::HumanDuration;
use crate::error::{ExitCode, exit};
use crate::logging::{self, LogFormat};

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
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub(crate) log_format: LogFormat,
    /// Debug logging.
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
    match runtime.block_on(commands::dispatch(cli)) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("deployd: error: {}", f.message);
            f.code
        }
    }
}
