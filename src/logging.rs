//! Logging setup: journald when running under systemd, readable lines on stderr otherwise.
//!
//! When `JOURNAL_STREAM` is set (systemd connected stderr to the journal) deployd logs through
//! the native journal protocol, so fields such as `RELEASE`, `COMMIT`, `KEY` and `STAGE` can be
//! filtered with `journalctl -u deployd RELEASE=...`. If the journal socket is missing it falls
//! back to stderr without timestamps (journald adds its own). `--log-format json` writes one
//! JSON object per line for log shippers. `RUST_LOG` overrides the level.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `verbose` raises the default level to debug.
pub fn init(format: LogFormat, verbose: bool) {
    let default = if verbose {
        "deployd=debug,info"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let registry = tracing_subscriber::registry().with(filter);
    if format == LogFormat::Json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init();
        return;
    }
    if under_journal {
        match tracing_journald::layer() {
            Ok(journald) => {
                registry
                    .with(journald.with_syslog_identifier("deployd".into()))
                    .init();
                return;
            }
            Err(error) => {
                registry
                    .with(
                        tracing_subscriber::fmt::layer()
                            .without_time()
                            .with_ansi(false)
                            .with_target(false)
                            .with_writer(std::io::stderr),
                    )
                    .init();
                tracing::warn!(%error, "journald socket unavailable, logging to stderr");
                return;
            }
        }
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
        .init();
}
