//! Report: what the agent is doing and how each attempt ended, for people and machines.
//!
//! - [`status`]: the live [`Reporter`] — `status.json`, systemd's `STATUS=` (through a sink the
//!   daemon installs) and the terminal view; it also times the stages;
//! - [`terminal`]: the terminal view of `deployd deploy` (stage lines, bars, summary);
//! - [`metrics`]: the node_exporter textfile and its counters;
//! - [`outward`]: the end of an attempt, told to the metrics file and the instance's EC2 tags.

pub mod logging;
pub mod metrics;
pub mod status;
pub mod terminal;

pub use status::{Reporter, StatusSink};

use crate::contract::state::{Attempt, Outcome, ReleaseSummary};
use crate::instance::Instance;
use crate::instance::tags::{TagStatus, Update};

/// Reports how an attempt ended to the metrics file and the EC2 instance tags. `deployment`
/// is false for a rollback, which keeps the last deployment's stage timings and cache figures.
/// `target` is the commit the attempt aimed at (`None` leaves the tag as it is).
#[allow(clippy::too_many_arguments)] // One report, told once; a struct would only rename them.
pub async fn outward(
    metrics: &metrics::Metrics,
    instance: &Instance,
    reporter: &Reporter,
    attempt: &Attempt,
    serving: Option<&ReleaseSummary>,
    artifact_bytes: Option<u64>,
    deployment: bool,
    target: Option<&str>,
) {
    metrics.record(&metrics::Report {
        attempt: Some(attempt),
        stages: deployment.then(|| reporter.stage_durations()),
        serving,
        artifact_bytes,
        build_cache: deployment.then(|| reporter.build_cache()).flatten(),
    });
    let status = match attempt.outcome {
        Outcome::Deployed | Outcome::Unchanged => TagStatus::Serving,
        Outcome::Failed => TagStatus::Failed,
        Outcome::RolledBack => TagStatus::RolledBack,
    };
    instance
        .write_tags(&Update {
            status,
            release: Some(serving.map(|r| r.id.clone()).unwrap_or_default()),
            commit: Some(serving.and_then(|r| r.commit.clone()).unwrap_or_default()),
            // A short category first, so that a tag filter can group failures.
            error: Some(
                attempt
                    .error
                    .as_deref()
                    .map(|e| format!("{}: {e}", crate::scrub::category(attempt.exit_code)))
                    .unwrap_or_default(),
            ),
            target: target.map(str::to_string),
        })
        .await;
}

/// Rows as left-aligned columns two spaces apart, one line each (the tables `deployd releases`
/// and `deployd fleet status` print).
pub fn columns<R: AsRef<[String]>>(rows: &[R]) -> String {
    let n = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.as_ref().get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
