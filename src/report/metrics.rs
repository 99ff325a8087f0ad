//! Metrics for node_exporter's textfile collector.
//!
//! When `[report] metrics_file` is set (for example
//! `/var/lib/node_exporter/textfile_collector/deployd.prom`), deployd rewrites that file after
//! every deployment and rollback, atomically (a temporary dot-file in the same directory, which
//! the collector ignores, then a rename), in the Prometheus text exposition format:
//!
//! | metric | type | what |
//! |---|---|---|
//! | `deployd_deployments_total{result="deployed\|unchanged\|failed\|rolled-back"}` | counter | attempts by result, kept across restarts |
//! | `deployd_last_success_timestamp_seconds` | gauge | end of the last successful deployment (deployed or unchanged), 0 if none |
//! | `deployd_stage_duration_seconds{stage=...}` | gauge | time spent in each stage by the last deployment |
//! | `deployd_artifact_bytes` | gauge | size of the serving release's artifact as stored in S3 |
//! | `deployd_build_cache_hits`, `deployd_build_cache_misses` | gauge | image build cache steps of the last deployment (0 without a container build) |
//! | `deployd_release_info{release,commit}` | gauge | 1 for the serving release |
//!
//! The counters and the last deployment's figures live in `<state_dir>/metrics.json`, written
//! atomically under the deployment lock, so they survive restarts and reboots. Failing to write
//! either file is logged and never fails a deployment.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::contract::state::{Attempt, Outcome, ReleaseSummary, StateError};
use crate::files::write_atomic;

/// Every result, always written, so that rates work from the first sample.
const RESULTS: [Outcome; 4] = [
    Outcome::Deployed,
    Outcome::Unchanged,
    Outcome::Failed,
    Outcome::RolledBack,
];

/// What the metrics remember between deployments (`<state_dir>/metrics.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Attempts by result label.
    #[serde(default)]
    pub deployments: BTreeMap<String, u64>,
    /// Unix seconds of the last successful deployment.
    #[serde(default)]
    pub last_success: Option<f64>,
    /// Seconds per stage of the last deployment, in the order the stages ran.
    #[serde(default)]
    pub stages: Vec<(String, f64)>,
    #[serde(default)]
    pub build_cache_hits: u64,
    #[serde(default)]
    pub build_cache_misses: u64,
}

/// What one deployment or rollback contributes.
#[derive(Debug, Clone, Default)]
pub struct Report<'a> {
    pub attempt: Option<&'a Attempt>,
    /// Stage timings of a deployment; `None` for a rollback, which keeps the last ones.
    pub stages: Option<Vec<(crate::contract::state::Stage, Duration)>>,
    pub serving: Option<&'a ReleaseSummary>,
    pub artifact_bytes: Option<u64>,
    pub build_cache: Option<(u64, u64)>,
}

/// Writes the metrics file; a no-op without `[report] metrics_file`.
#[derive(Debug, Clone)]
pub struct Metrics {
    file: Option<PathBuf>,
    counters: PathBuf,
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_millis() as f64) / 1000.0)
}

impl Metrics {
    /// The metrics file `[report] metrics_file`, with its counters in the state directory.
    pub fn new(cfg: &Config) -> Metrics {
        Metrics {
            file: cfg.report.metrics_file.clone(),
            counters: cfg.paths().metrics_counters,
        }
    }

    /// Counts the attempt and rewrites the metrics file. Failures are logged, never returned.
    pub fn record(&self, report: &Report<'_>) {
        let Some(file) = &self.file else {
            return;
        };
        if let Err(error) = self.try_record(file, report) {
            tracing::warn!(%error, path = %file.display(), "could not write the metrics file: {error}");
        }
    }

    fn try_record(&self, file: &Path, report: &Report<'_>) -> Result<(), StateError> {
        let mut counters = load_counters(&self.counters);
        if let Some(a) = report.attempt {
            *counters
                .deployments
                .entry(a.outcome.as_str().to_string())
                .or_default() += 1;
            if matches!(a.outcome, Outcome::Deployed | Outcome::Unchanged) {
                let at = humantime::parse_rfc3339(&a.finished_at).unwrap_or(SystemTime::now());
                counters.last_success = Some(unix_seconds(at));
            }
        }
        if let Some(stages) = &report.stages {
            counters.stages = stages
                .iter()
                .map(|(s, d)| (s.as_str().to_string(), d.as_secs_f64()))
                .collect();
            let (hits, misses) = report.build_cache.unwrap_or((0, 0));
            counters.build_cache_hits = hits;
            counters.build_cache_misses = misses;
        }
        let mut json = serde_json::to_vec_pretty(&counters).map_err(|e| StateError::Corrupt {
            path: self.counters.clone(),
            reason: e.to_string(),
        })?;
        json.push(b'\n');
        write_atomic(&self.counters, &json, 0o640)?;
        let text = render(&counters, report.serving, report.artifact_bytes);
        write_atomic(file, text.as_bytes(), 0o644)?;
        tracing::debug!(path = %file.display(), "metrics written");
        Ok(())
    }
}

/// Reads the counters; a missing or unreadable file starts from zero (with a warning if it
/// was there but broken, since Prometheus then sees a counter reset).
fn load_counters(path: &Path) -> Counters {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            tracing::warn!(path = %path.display(), %error, "metrics counters unreadable; starting again from zero");
            Counters::default()
        }),
        Err(_) => Counters::default(),
    }
}

/// Escapes a label value for the text format.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A float in the text format (integers without a fraction).
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Renders the text exposition format.
pub fn render(
    c: &Counters,
    serving: Option<&ReleaseSummary>,
    artifact_bytes: Option<u64>,
) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    family(
        "deployd_deployments_total",
        "counter",
        "Deployment attempts by result.",
        RESULTS
            .iter()
            .map(|o| {
                let l = o.as_str();
                (
                    format!("{{result=\"{l}\"}}"),
                    c.deployments.get(l).copied().unwrap_or(0).to_string(),
                )
            })
            .collect(),
    );
    family(
        "deployd_last_success_timestamp_seconds",
        "gauge",
        "When the last successful deployment finished, in Unix seconds (0: never).",
        vec![(String::new(), num(c.last_success.unwrap_or(0.0)))],
    );
    family(
        "deployd_stage_duration_seconds",
        "gauge",
        "Seconds the last deployment spent in each stage.",
        c.stages
            .iter()
            .map(|(s, d)| (format!("{{stage=\"{}\"}}", label(s)), num(*d)))
            .collect(),
    );
    family(
        "deployd_artifact_bytes",
        "gauge",
        "Size of the serving release's artifact in S3, in bytes.",
        vec![(String::new(), artifact_bytes.unwrap_or(0).to_string())],
    );
    family(
        "deployd_build_cache_hits",
        "gauge",
        "Image build steps served from cache in the last deployment.",
        vec![(String::new(), c.build_cache_hits.to_string())],
    );
    family(
        "deployd_build_cache_misses",
        "gauge",
        "Image build steps rebuilt in the last deployment.",
        vec![(String::new(), c.build_cache_misses.to_string())],
    );
    family(
        "deployd_release_info",
        "gauge",
        "The serving release (always 1).",
        serving
            .map(|r| {
                (
                    format!(
                        "{{release=\"{}\",commit=\"{}\"}}",
                        label(&r.id),
                        label(r.commit.as_deref().unwrap_or(""))
                    ),
                    "1".to_string(),
                )
            })
            .into_iter()
            .collect(),
    );
    out
}

/// A line for `deployd check-config`.
pub fn check(cfg: &Config) -> (&'static str, String) {
    let text = match &cfg.report.metrics_file {
        Some(f) => format!("{} (node_exporter textfile format)", f.display()),
        None => "off ([report] metrics_file is not set)".into(),
    };
    ("metrics", text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_and_escapes_labels() {
        let mut c = Counters::default();
        c.deployments.insert("deployed".into(), 3);
        c.last_success = Some(1_700_000_000.5);
        c.stages = vec![("fetching".into(), 1.25), ("we\"ird\\".into(), 0.0)];
        let r = ReleaseSummary {
            id: "20250101-120000-622d2103".into(),
            artifact: crate::s3::S3Object::new("b", "k"),
            sha256: "s".into(),
            commit: Some("622d2103".into()),
            activated_at: "t".into(),
        };
        let text = render(&c, Some(&r), Some(42));
        assert!(text.contains("deployd_deployments_total{result=\"deployed\"} 3\n"));
        assert!(text.contains("deployd_deployments_total{result=\"rolled-back\"} 0\n"));
        assert!(text.contains("deployd_last_success_timestamp_seconds 1700000000.5\n"));
        assert!(text.contains("deployd_stage_duration_seconds{stage=\"fetching\"} 1.25\n"));
        assert!(text.contains("{stage=\"we\\\"ird\\\\\"} 0\n"));
        assert!(text.contains("deployd_artifact_bytes 42\n"));
        assert!(text.contains(
            "deployd_release_info{release=\"20250101-120000-622d2103\",commit=\"622d2103\"} 1\n"
        ));
        assert_eq!(text.matches("# TYPE ").count(), 7);
    }
}
