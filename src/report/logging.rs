//! Logging setup: journald when running under systemd, readable lines on stderr otherwise, and
//! the terminal view for a person running `deployd deploy`.
//!
//! When `JOURNAL_STREAM` is set (systemd connected stderr to the journal) deployd logs through
//! the native journal protocol, so fields such as `RELEASE`, `COMMIT`, `KEY` and `STAGE` can be
//! filtered with `journalctl -u deployd RELEASE=...`. If the journal socket is missing it falls
//! back to stderr without timestamps (journald adds its own). `--log-format json` writes one
//! JSON object per line for log shippers. `RUST_LOG` overrides the level.
//!
//! [`Output::Human`] is the terminal view ([`crate::report::terminal`]): chosen for a command
//! that asks for it when stderr is a terminal, not under journald, and neither `--log-format`,
//! `-v` nor `RUST_LOG` was given. The view draws the stages itself; the logs then show warnings
//! only. Text logs on stderr are written above any progress bar the view draws.

use std::io::IsTerminal;

use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::report::terminal;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event with its fields.
    Text,
    /// One JSON object per event.
    Json,
}

/// Where the process's logs go, decided once at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The native journal protocol (systemd).
    Journal,
    /// JSON lines on stderr.
    Json,
    /// Text lines on stderr.
    Text,
    /// The terminal view for a person; warnings on stderr.
    Human,
}

impl Output {
    /// Decides the output: `format` is `--log-format` if given; `wants_view` is true for a
    /// command that has a terminal view (`deploy`).
    pub fn choose(format: Option<LogFormat>, verbose: bool, wants_view: bool) -> Output {
        let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
        match format {
            Some(LogFormat::Json) => Output::Json,
            _ if under_journal => Output::Journal,
            Some(LogFormat::Text) => Output::Text,
            None if wants_view
                && !verbose
                && std::env::var_os("RUST_LOG").is_none()
                && std::io::stderr().is_terminal() =>
            {
                Output::Human
            }
            None => Output::Text,
        }
    }

    /// Whether a progress bar may be drawn on stderr: a terminal that receives text, not JSON.
    pub fn draws_bars(self) -> bool {
        matches!(self, Output::Human | Output::Text) && std::io::stderr().is_terminal()
    }
}

/// Installs the global subscriber. `verbose` raises the default level to debug.
pub fn init(output: Output, verbose: bool) {
    let default = if verbose {
        "deployd=debug,info"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    match output {
        Output::Json => tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
        Output::Journal => match tracing_journald::layer() {
            Ok(journald) => tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("deployd".into()))
                .init(),
            Err(error) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(
                        tracing_subscriber::fmt::layer()
                            .without_time()
                            .with_ansi(false)
                            .with_target(false)
                            .with_writer(std::io::stderr),
                    )
                    .init();
                tracing::warn!(%error, "journald socket unavailable, logging to stderr");
            }
        },
        Output::Text => tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(terminal::LogWriter::new),
            )
            .init(),
        // The view tells the stages and the outcome; a failure's sentence is printed by the
        // command itself, so an error event would only say it twice.
        Output::Human => tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .without_time()
                    .with_target(false)
                    .with_writer(terminal::LogWriter::new)
                    .with_filter(filter_fn(|m| *m.level() == tracing::Level::WARN)),
            )
            .init(),
    }
}
