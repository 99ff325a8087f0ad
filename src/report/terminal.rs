//! The terminal view of a deployment: what `deployd deploy` shows a person.
//!
//! ```text
//!   ✓ resolving            0.0s
//!   ✓ verifying            0.1s  s3://deployment-artifacts/web/prod/2f1c…/web-deployment.tar.gz
//!   ✓ fetching             0.3s  4.2 MiB (14.0 MiB/s)
//!   ✓ activating           0.0s  release 20261118-101700-2f1c9a07
//!   ⠙ building             3.1s  [#########>-----------] web: step 4/9
//! ```
//!
//! One line per stage with its duration, printed when the stage ends; a progress bar for the
//! download and the image builds while they run (`indicatif`); a summary at the end: the
//! release, its commit, the duration, the build's cache hits and what serves. The logging
//! setup ([`crate::report::logging`]) chooses this view only for a person at a terminal; the daemon,
//! journald, `--log-format` and `-v` keep the structured logs. With text logs in a terminal
//! the view draws only the bars, below the logs ([`View::bars_only`]).
//!
//! Every text line on stderr goes through [`LogWriter`], which clears the bars, writes the
//! line and draws them again, so logs and bars never overwrite each other.

use std::io::{self, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use console::{Term, style};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

use crate::contract::state::{Attempt, Outcome, ReleaseSummary, Stage};
use crate::report::logging::Output;

/// How often a spinner turns.
const TICK: Duration = Duration::from_millis(120);

/// The bars on stderr, shared by the view and the log writer.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// Writes to stderr above the bars; the text logs' writer.
#[derive(Debug, Default)]
pub struct LogWriter;

impl LogWriter {
    /// A writer (tracing's `MakeWriter` calls this once per event).
    pub fn new() -> LogWriter {
        LogWriter
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        bars().suspend(|| io::stderr().lock().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// `1.2s`, `14.0s`, `2m05s`.
pub fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// A bar style from a template that is known to parse (else indicatif's default).
fn bar_style(template: &str, bar: bool) -> ProgressStyle {
    let fallback = if bar {
        ProgressStyle::default_bar()
    } else {
        ProgressStyle::default_spinner()
    };
    ProgressStyle::with_template(template)
        .unwrap_or(fallback)
        .with_key("secs", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{}", seconds(s.elapsed()));
        })
        .progress_chars("#>-")
}

fn spinner_style() -> ProgressStyle {
    bar_style(
        "  {spinner:.cyan} {prefix:<18} {secs:>6}  {wide_msg}",
        false,
    )
}

fn bytes_style() -> ProgressStyle {
    bar_style(
        "  {spinner:.cyan} {prefix:<18} {secs:>6}  [{bar:30.cyan/blue}] {bytes}/{total_bytes} ({bytes_per_sec})",
        true,
    )
}

fn steps_style() -> ProgressStyle {
    bar_style(
        "  {spinner:.cyan} {prefix:<18} {secs:>6}  [{bar:30.cyan/blue}] {msg}",
        true,
    )
}

/// The bar of the running stage: a spinner, or a bar once its size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Spinner,
    Bytes,
    Steps,
}

/// The stage that is running.
struct Running {
    stage: Stage,
    detail: Option<String>,
    began: Instant,
    bar: Option<(ProgressBar, Kind)>,
}

/// What the view has learnt about the running deployment.
#[derive(Default)]
struct Seen {
    began: Option<Instant>,
    running: Option<Running>,
    /// The release being deployed and its commit, once known.
    release: Option<(String, Option<String>)>,
    /// Bytes downloaded.
    fetched: Option<u64>,
    /// Build cache hits and cacheable steps.
    build: Option<(u64, u64)>,
}

/// The terminal view; see the module documentation.
pub struct View {
    /// Stage lines and the summary; without them, only the bars (under text logs).
    lines: bool,
    seen: Mutex<Seen>,
}

impl View {
    /// The whole view: stage lines, bars and the summary.
    pub fn full() -> View {
        View {
            lines: true,
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Only the download and build bars, drawn below the text logs.
    pub fn bars_only() -> View {
        View {
            lines: false,
            ..View::full()
        }
    }

    /// The view for a command whose logs go to `output`: the whole view for a person, the
    /// bars under text logs in a terminal, none otherwise.
    pub fn for_output(output: Output) -> Option<View> {
        match output {
            Output::Human => Some(View::full()),
            o if o.draws_bars() => Some(View::bars_only()),
            _ => None,
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Prints one line above the bars, cut to the terminal's width.
    fn print(line: &str) {
        let width = usize::from(Term::stderr().size().1).max(20);
        let line = console::truncate_str(line, width, "…");
        bars().suspend(|| {
            let _ = writeln!(io::stderr().lock(), "{line}");
        });
    }

    /// A deployment started.
    pub fn begin(&self) {
        let mut seen = self.seen();
        if let Some(r) = seen.running.take()
            && let Some((bar, _)) = r.bar
        {
            bar.finish_and_clear();
        }
        *seen = Seen {
            began: Some(Instant::now()),
            ..Seen::default()
        };
    }

    /// The deployment entered `stage`: the previous stage's line, and a spinner for this one.
    pub fn stage(&self, stage: Stage, detail: Option<&str>) {
        let mut seen = self.seen();
        self.end_stage(&mut seen, None);
        let bar = self.lines.then(|| {
            let bar = bars().add(
                ProgressBar::new_spinner()
                    .with_style(spinner_style())
                    .with_prefix(stage.as_str())
                    .with_message(detail.unwrap_or_default().to_string()),
            );
            bar.enable_steady_tick(TICK);
            (bar, Kind::Spinner)
        });
        seen.running = Some(Running {
            stage,
            detail: detail.map(str::to_string),
            began: Instant::now(),
            bar,
        });
    }

    /// The release being deployed.
    pub fn release(&self, id: &str, commit: Option<&str>) {
        self.seen().release = Some((id.to_string(), commit.map(str::to_string)));
    }

    /// Turns the running stage's bar into one of `kind`, of `len` units; returns it.
    fn bar_of(&self, seen: &mut Seen, kind: Kind, len: u64) -> Option<ProgressBar> {
        let running = seen.running.as_mut()?;
        let style = match kind {
            Kind::Bytes => bytes_style(),
            Kind::Steps => steps_style(),
            Kind::Spinner => spinner_style(),
        };
        match &mut running.bar {
            Some((_, k)) if *k == kind => {}
            Some((bar, k)) => {
                bar.set_style(style);
                *k = kind;
            }
            None => {
                let bar = bars().add(
                    ProgressBar::new(len)
                        .with_style(style)
                        .with_prefix(running.stage.as_str())
                        .with_elapsed(running.began.elapsed()),
                );
                bar.enable_steady_tick(TICK);
                running.bar = Some((bar, kind));
            }
        }
        let (bar, _) = running.bar.as_ref()?;
        bar.set_length(len);
        Some(bar.clone())
    }

    /// Download progress.
    pub fn download(&self, done: u64, total: u64) {
        let mut seen = self.seen();
        seen.fetched = Some(done);
        if let Some(bar) = self.bar_of(&mut seen, Kind::Bytes, total) {
            bar.set_position(done);
        }
    }

    /// A build of `service` is at step `step` of `steps`.
    pub fn build_step(&self, service: &str, step: usize, steps: usize) {
        let mut seen = self.seen();
        if let Some(bar) = self.bar_of(&mut seen, Kind::Steps, steps as u64) {
            bar.set_position(step.saturating_sub(1) as u64);
            bar.set_message(format!("{service}: step {step}/{steps}"));
        }
    }

    /// The builds are done: `hits` of `steps` cacheable steps came from cache.
    pub fn build_report(&self, hits: u64, steps: u64) {
        self.seen().build = Some((hits, steps));
    }

    /// Ends the running stage; prints its line with `failure`'s mark and text if given.
    fn end_stage(&self, seen: &mut Seen, failure: Option<&str>) {
        let Some(running) = seen.running.take() else {
            return;
        };
        if let Some((bar, _)) = &running.bar {
            bar.finish_and_clear();
            bars().remove(bar);
        }
        if !self.lines {
            return;
        }
        let took = running.began.elapsed();
        let detail = match (failure, running.stage) {
            (Some(why), _) => why.to_string(),
            (None, Stage::Fetching) => seen.fetched.map_or_else(String::new, |b| {
                let rate = (b as f64 / took.as_secs_f64().max(0.001)) as u64;
                format!("{} ({}/s)", human(b), human(rate))
            }),
            (None, Stage::Activating) => seen
                .release
                .as_ref()
                .map_or_else(String::new, |(id, _)| format!("release {id}")),
            (None, Stage::Building) => seen.build.map_or_else(String::new, |(hits, steps)| {
                format!("{hits} of {steps} steps from cache")
            }),
            (None, Stage::Starting) => "containers healthy".into(),
            (None, _) => running.detail.unwrap_or_default(),
        };
        let mark = if failure.is_some() {
            style("✗").red().bold().for_stderr()
        } else {
            style("✓").green().for_stderr()
        };
        Self::print(&format!(
            "  {mark} {:<18} {:>6}  {detail}",
            running.stage.as_str(),
            seconds(took)
        ));
    }

    /// The deployment ended: the last stage's line and the summary.
    pub fn finish(&self, attempt: &Attempt, serving: Option<&ReleaseSummary>) {
        let mut seen = self.seen();
        let failure = match attempt.outcome {
            Outcome::Deployed | Outcome::Unchanged => None,
            Outcome::RolledBack => Some("not healthy: rolled back"),
            Outcome::Failed => Some("failed"),
        };
        self.end_stage(&mut seen, failure);
        if !self.lines {
            return;
        }
        let took = seconds(seen.began.map_or(Duration::ZERO, |b| b.elapsed()));
        for line in summary(&seen, attempt, serving, &took) {
            Self::print(&line);
        }
    }
}

/// The summary lines: what happened, the release and commit, the build, what serves.
fn summary(
    seen: &Seen,
    attempt: &Attempt,
    serving: Option<&ReleaseSummary>,
    took: &str,
) -> Vec<String> {
    let (id, commit) = seen
        .release
        .clone()
        .map_or((None, None), |(id, c)| (Some(id), c));
    let id = id.or_else(|| attempt.release.clone()).unwrap_or_default();
    let head = match attempt.outcome {
        Outcome::Deployed => format!(
            "{} {id} in {took}",
            style("deployed").green().bold().for_stderr()
        ),
        Outcome::Unchanged => format!(
            "{} in {took}: {id} already serves this artifact",
            style("unchanged").green().bold().for_stderr()
        ),
        Outcome::RolledBack => format!(
            "{} after {took}: {id} did not become healthy",
            style("rolled back").yellow().bold().for_stderr()
        ),
        Outcome::Failed => format!("{} after {took}", style("failed").red().bold().for_stderr()),
    };
    let mut lines = vec![head];
    if attempt.outcome != Outcome::Unchanged
        && let Some(c) = commit
    {
        lines.push(format!("  commit    {c}"));
    }
    if let Some((hits, steps)) = seen.build {
        lines.push(format!("  build     {hits} of {steps} steps from cache"));
    }
    let serves = match serving {
        Some(r) => {
            let commit = r.commit.as_deref().map_or(String::new(), |c| {
                format!(" (commit {})", &c[..c.len().min(8)])
            });
            let how = match attempt.outcome {
                Outcome::RolledBack => ", the previous release, again",
                _ if seen.build.is_some() => ", containers healthy",
                _ => "",
            };
            format!("{}{commit}{how}", r.id)
        }
        None => "nothing".into(),
    };
    lines.push(format!("  serving   {serves}"));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_seconds_then_minutes() {
        assert_eq!(seconds(Duration::from_millis(40)), "0.0s");
        assert_eq!(seconds(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(seconds(Duration::from_secs(125)), "2m05s");
    }

    fn attempt(outcome: Outcome) -> Attempt {
        Attempt {
            started_at: String::new(),
            finished_at: String::new(),
            outcome,
            trigger: "command line".into(),
            artifact: None,
            release: None,
            error: None,
            exit_code: 0,
        }
    }

    fn summary_text(seen: &Seen, outcome: Outcome, serving: Option<&ReleaseSummary>) -> String {
        console::set_colors_enabled_stderr(false);
        summary(seen, &attempt(outcome), serving, "7.0s").join("\n")
    }

    #[test]
    fn the_summary_names_release_commit_cache_and_what_serves() {
        let seen = Seen {
            release: Some(("r3".into(), Some("3333333333333333".into()))),
            build: Some((6, 8)),
            ..Seen::default()
        };
        let v2 = ReleaseSummary {
            id: "r2".into(),
            artifact: crate::s3::S3Object::new("b", "k"),
            sha256: String::new(),
            commit: Some("2222222222222222".into()),
            activated_at: String::new(),
        };
        assert_eq!(
            summary_text(&seen, Outcome::RolledBack, Some(&v2)),
            "rolled back after 7.0s: r3 did not become healthy\n  commit    3333333333333333\n  build     6 of 8 steps from cache\n  serving   r2 (commit 22222222), the previous release, again"
        );
        let served = ReleaseSummary {
            id: "r3".into(),
            ..v2
        };
        assert_eq!(
            summary_text(&seen, Outcome::Deployed, Some(&served)),
            "deployed r3 in 7.0s\n  commit    3333333333333333\n  build     6 of 8 steps from cache\n  serving   r3 (commit 22222222), containers healthy"
        );
        assert_eq!(
            summary_text(&Seen::default(), Outcome::Failed, None),
            "failed after 7.0s\n  serving   nothing"
        );
    }
}
