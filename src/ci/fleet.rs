//! `deployd fleet status`: the fleet as its own EC2 tags report it, from CI.
//!
//! Every agent tags its instance `deployd:app` and `deployd:environment` (config `app` and
//! `environment`) besides `status`, `release`, `commit`, `updated`, `error` and `target` (see
//! [`crate::instance::tags`]). One paginated `ec2:DescribeInstances` filtered by the first two
//! tags and `instance-state-name=running` lists the fleet; nothing runs on the instances and
//! nothing is written to them.
//!
//! With `--bucket`, the environment's pointer is read too, so each instance is placed in or
//! out of the pointer's wave (the same function the agents use, [`crate::contract::wave`]).
//!
//! `--wait` polls every `--interval` until, among the wave's instances, at least
//! `--min-healthy` percent serve `--sha` (a commit; default the pointer's) with status
//! `serving` (exit 0), or more than `--max-failed` instances report `failed` or `rolled-back`
//! with `target` = that commit (exit 65 at once), or `--timeout` passes (exit 75). An empty
//! fleet never converges: a wrong `--environment` times out instead of passing.
//! `--revert-on-failure` then points the environment back at the pointer's previous release
//! ([`super::rollout::Edit::Revert`], signed with `--sign`) and waits, with the same rules,
//! for the whole fleet to serve it; the command still exits 65 (75 if that wait times out).

use std::time::{Duration, Instant};

use aws_sdk_ec2::config::Region;
use aws_sdk_ec2::types::Filter;

use super::rollout::{self, Edit, RolloutError, Signing};
use crate::config::Config;
use crate::contract::pointer::{self, Pointer, PointerError, PointerRead};
use crate::contract::wave::{self, FULL, Rollout};
use crate::error::{error_chain, exit_codes};
use crate::s3::{CallBudget, S3Object, S3SetupError};

/// The arguments of `deployd fleet status`.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetRequest {
    /// The app (`deployd:app` tag).
    #[arg(long)]
    pub app: String,
    /// The environment (`deployd:environment` tag).
    #[arg(long)]
    pub environment: String,
    /// The bucket holding {app}/{environment}/current.json: places instances in its wave.
    #[arg(long)]
    pub bucket: Option<String>,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Wait until the wave serves --sha (exit 0), too many fail (65) or --timeout passes (75).
    #[arg(long, requires = "bucket")]
    pub wait: bool,
    /// The commit to wait for [default: the pointer's].
    #[arg(long, requires = "wait")]
    pub sha: Option<String>,
    /// The share of the wave's instances, in percent, that must serve it.
    #[arg(long, default_value_t = FULL, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub min_healthy: u8,
    /// How many instances may report failed or rolled-back for it.
    #[arg(long, default_value_t = 0)]
    pub max_failed: usize,
    /// Give up waiting after this long (exit 75).
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// How often to ask EC2 while waiting.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// When the rollout fails: point the environment back at the previous release and wait
    /// for the fleet to serve it (the exit status stays 65).
    #[arg(long, requires = "wait")]
    pub revert_on_failure: bool,
    /// The tag prefix the agents use ([report] tag_prefix).
    #[arg(long, default_value = "deployd:")]
    pub tag_prefix: String,
    #[command(flatten)]
    pub signing: Signing,
}

/// One instance, as its tags report it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    /// `i-…`.
    pub instance: String,
    /// `deployd:release`.
    pub release: String,
    /// `deployd:commit`.
    pub commit: String,
    /// `deployd:status`.
    pub status: String,
    /// `deployd:updated`.
    pub updated: String,
    /// `deployd:target`: the commit the last attempt aimed at.
    pub target: String,
    /// `deployd:error`.
    pub error: String,
    /// In the pointer's wave, when the pointer is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_wave: Option<bool>,
}

/// How the fleet stands against a commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// The commit counted.
    pub commit: String,
    /// Instances in the fleet.
    pub instances: usize,
    /// Instances in the wave.
    pub wave: usize,
    /// Wave instances serving the commit.
    pub serving: usize,
    /// Instances that failed or rolled back the commit.
    pub failed: Vec<String>,
}

impl Tally {
    /// True when at least `min_healthy` percent of a non-empty fleet's wave serve the commit.
    pub fn converged(&self, min_healthy: u8) -> bool {
        self.instances > 0 && self.serving * 100 >= usize::from(min_healthy) * self.wave
    }
}

/// What `fleet status` found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// The app.
    pub app: String,
    /// The environment.
    pub environment: String,
    /// The pointer's release, percent and previous release, when read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pointer: Option<PointerView>,
    /// The instances.
    pub instances: Vec<Member>,
    /// Against the commit waited for, when waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tally: Option<Tally>,
    /// The pointer written by `--revert-on-failure`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverted_to: Option<String>,
}

/// The part of the pointer `fleet status` shows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PointerView {
    /// Its release's key.
    pub key: String,
    /// Its SHA-256.
    pub sha256: String,
    /// Its commit.
    pub commit: String,
    /// Its wave.
    pub percent: u8,
    /// The previous release's commit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_commit: Option<String>,
}

/// Why `fleet status` failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// The S3 client cannot be built.
    #[error(transparent)]
    S3(#[from] S3SetupError),
    /// The pointer cannot be read.
    #[error(transparent)]
    Pointer(#[from] PointerError),
    /// EC2 did not answer, or refused.
    #[error(
        "ec2:DescribeInstances failed: {0}; CI's credentials need ec2:DescribeInstances (packaging/ci/README.md)"
    )]
    Ec2(String),
    /// The rollout failed.
    #[error("{} instance(s) failed or rolled back commit {commit}, more than --max-failed {max}: {}; {}", failed.len(), failed.join(", "), reverted.as_deref().map_or_else(|| "the pointer was left as it is".to_string(), |r| format!("the fleet went back to {r}")))]
    Failed {
        /// The commit.
        commit: String,
        /// The instances.
        failed: Vec<String>,
        /// `--max-failed`.
        max: usize,
        /// The release the fleet went back to.
        reverted: Option<String>,
    },
    /// Reverting failed.
    #[error("the rollout of {commit} failed and going back failed too: {source}")]
    Revert {
        /// The commit.
        commit: String,
        /// Why.
        #[source]
        source: RolloutError,
    },
    /// The fleet did not converge in time.
    #[error("{what} within {}s: {serving} of {wave} wave instance(s) serve {commit}, {instances} instance(s) running", timeout.as_secs())]
    Timeout {
        /// What was waited for.
        what: String,
        /// The commit.
        commit: String,
        /// Wave instances serving it.
        serving: usize,
        /// Wave instances.
        wave: usize,
        /// Instances running.
        instances: usize,
        /// `--timeout`.
        timeout: Duration,
    },
}

exit_codes!(FleetError {
    Usage(_) => USAGE,
    S3(e) => e.exit_code(),
    Pointer(e) => e.exit_code(),
    Ec2(_) => UNAVAILABLE,
    Failed { .. } => DATAERR,
    Revert { source, .. } => source.exit_code(),
    Timeout { .. } => TEMPFAIL,
});

/// True when two commit ids name the same commit (one may be abbreviated, 7+ characters).
pub fn same_commit(a: &str, b: &str) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    short.len() >= 7
        && long
            .to_ascii_lowercase()
            .starts_with(&short.to_ascii_lowercase())
}

/// Places `members` in the wave of a pointer naming `release_sha256` with `rollout`.
pub fn place(members: &mut [Member], release_sha256: &str, rollout: &Rollout) {
    for m in members {
        m.in_wave =
            Some(!rollout.partial() || wave::in_wave(&m.instance, release_sha256, rollout.percent));
    }
}

/// Counts `members` against `commit`: instances outside the wave (`in_wave == Some(false)`)
/// count for neither the wave nor its serving instances, but a failure anywhere counts.
pub fn tally(members: &[Member], commit: &str) -> Tally {
    let wave: Vec<&Member> = members
        .iter()
        .filter(|m| m.in_wave != Some(false))
        .collect();
    Tally {
        commit: commit.to_string(),
        instances: members.len(),
        wave: wave.len(),
        serving: wave
            .iter()
            .filter(|m| m.status == "serving" && same_commit(&m.commit, commit))
            .count(),
        failed: members
            .iter()
            .filter(|m| {
                (m.status == "failed" || m.status == "rolled-back")
                    && same_commit(&m.target, commit)
            })
            .map(|m| m.instance.clone())
            .collect(),
    }
}

/// An EC2 client for CI: the standard AWS environment, `[report] ec2_endpoint_url` if set.
async fn ec2_client(cfg: &Config) -> aws_sdk_ec2::Client {
    let mut loader = crate::s3::aws_loader(CallBudget {
        attempts: 3,
        connect: Duration::from_secs(5),
        read: Some(Duration::from_secs(30)),
        attempt: None,
        operation: Some(Duration::from_secs(60)),
    });
    if let Some(region) = &cfg.s3.region {
        loader = loader.region(Region::new(region.clone()));
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_ec2::config::Builder::from(&shared);
    if let Some(url) = &cfg.report.ec2_endpoint_url {
        builder = builder.endpoint_url(url);
    }
    aws_sdk_ec2::Client::from_conf(builder.build())
}

/// The running instances tagged with the app and environment.
async fn describe(
    ec2: &aws_sdk_ec2::Client,
    req: &FleetRequest,
) -> Result<Vec<Member>, FleetError> {
    let p = &req.tag_prefix;
    let filter = |name: String, value: &str| Filter::builder().name(name).values(value).build();
    let mut pages = ec2
        .describe_instances()
        .filters(filter(format!("tag:{p}app"), &req.app))
        .filters(filter(format!("tag:{p}environment"), &req.environment))
        .filters(filter("instance-state-name".into(), "running"))
        .into_paginator()
        .send();
    let mut out = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| FleetError::Ec2(error_chain(&e)))?;
        for i in page.reservations().iter().flat_map(|r| r.instances()) {
            let tag = |name: &str| {
                i.tags()
                    .iter()
                    .find(|t| t.key() == Some(&format!("{p}{name}")))
                    .and_then(|t| t.value())
                    .unwrap_or_default()
                    .to_string()
            };
            out.push(Member {
                instance: i.instance_id().unwrap_or_default().to_string(),
                release: tag("release"),
                commit: tag("commit"),
                status: tag("status"),
                updated: tag("updated"),
                target: tag("target"),
                error: tag("error"),
                in_wave: None,
            });
        }
    }
    out.sort_by(|a, b| a.instance.cmp(&b.instance));
    Ok(out)
}

/// What one wait ended with.
enum Waited {
    Converged,
    Failed(Vec<String>),
    TimedOut,
}

/// Polls the fleet until `commit` converges, fails or `--timeout` passes; `report` holds the
/// last look.
async fn wait(
    ec2: &aws_sdk_ec2::Client,
    req: &FleetRequest,
    pointer: Option<&Pointer>,
    commit: &str,
    report: &mut Report,
) -> Result<Waited, FleetError> {
    let started = Instant::now();
    loop {
        let mut members = describe(ec2, req).await?;
        if let Some(p) = pointer {
            place(&mut members, &p.sha256, &p.rollout);
        }
        let t = tally(&members, commit);
        tracing::info!(
            commit,
            instances = t.instances,
            wave = t.wave,
            serving = t.serving,
            failed = t.failed.len(),
            seconds = started.elapsed().as_secs(),
            "fleet"
        );
        report.instances = members;
        report.tally = Some(t.clone());
        if t.failed.len() > req.max_failed {
            return Ok(Waited::Failed(t.failed));
        }
        if t.converged(req.min_healthy) {
            return Ok(Waited::Converged);
        }
        if started.elapsed() >= req.timeout {
            return Ok(Waited::TimedOut);
        }
        tokio::time::sleep(
            req.interval
                .min(req.timeout.saturating_sub(started.elapsed())),
        )
        .await;
    }
}

fn timeout(what: &str, report: &Report, req: &FleetRequest) -> FleetError {
    let t = report.tally.clone().unwrap_or_default();
    FleetError::Timeout {
        what: what.to_string(),
        commit: t.commit,
        serving: t.serving,
        wave: t.wave,
        instances: t.instances,
        timeout: req.timeout,
    }
}

/// `deployd fleet status`: returns what it found, and how the wait (if any) ended.
pub async fn status(cfg: &Config, req: &FleetRequest) -> (Report, Result<(), FleetError>) {
    let mut report = Report {
        app: req.app.clone(),
        environment: req.environment.clone(),
        ..Report::default()
    };
    let result = run(cfg, req, &mut report).await;
    (report, result)
}

async fn run(cfg: &Config, req: &FleetRequest, report: &mut Report) -> Result<(), FleetError> {
    let ec2 = ec2_client(cfg).await;
    let (s3, pointer, at) = match &req.bucket {
        Some(bucket) => {
            let s3 = crate::s3::client(&cfg.s3).await?;
            let at = S3Object::new(
                bucket.clone(),
                pointer::pointer_key(&req.app, &req.environment),
            );
            let PointerRead::Changed { pointer, .. } = pointer::read(&s3, &at, None).await? else {
                return Err(FleetError::Usage(format!(
                    "release pointer {at} answered 304 to an unconditional read"
                )));
            };
            report.pointer = Some(PointerView {
                key: pointer.key.clone(),
                sha256: pointer.sha256.clone(),
                commit: pointer.commit.clone(),
                percent: pointer.rollout.percent,
                previous_commit: pointer.rollout.previous.as_ref().map(|p| p.commit.clone()),
            });
            (Some(s3), Some(pointer), Some(at))
        }
        None => (None, None, None),
    };
    if !req.wait {
        let mut members = describe(&ec2, req).await?;
        if let Some(p) = &pointer {
            place(&mut members, &p.sha256, &p.rollout);
        }
        report.instances = members;
        return Ok(());
    }
    let (Some(s3), Some(pointer), Some(at)) = (s3, pointer, at) else {
        return Err(FleetError::Usage("--wait needs --bucket".into()));
    };
    let commit = req.sha.clone().unwrap_or_else(|| pointer.commit.clone());
    if commit.len() < 7 {
        return Err(FleetError::Usage(format!(
            "--sha {commit:?} is not a commit id (at least 7 hex characters)"
        )));
    }
    let failed = match wait(&ec2, req, Some(&pointer), &commit, report).await? {
        Waited::Converged => return Ok(()),
        Waited::TimedOut => return Err(timeout("the wave did not converge", report, req)),
        Waited::Failed(failed) => failed,
    };
    tracing::error!(commit = %commit, failed = ?failed, "the rollout failed");
    if !req.revert_on_failure {
        return Err(FleetError::Failed {
            commit,
            failed,
            max: req.max_failed,
            reverted: None,
        });
    }
    let back = rollout::rewrite(&s3, &at, &req.signing, Edit::Revert)
        .await
        .map_err(|source| FleetError::Revert {
            commit: commit.clone(),
            source,
        })?;
    tracing::warn!(pointer = %at, key = %back.key, commit = %back.commit, "reverted the release pointer; waiting for the fleet to return");
    report.reverted_to = Some(back.key.clone());
    let reverted = Pointer {
        key: back.key.clone(),
        sha256: back.sha256.clone(),
        commit: back.commit.clone(),
        published_at: String::new(),
        rollout: back.rollout.clone(),
        signed: None,
    };
    match wait(&ec2, req, Some(&reverted), &back.commit, report).await? {
        Waited::Converged => Err(FleetError::Failed {
            commit,
            failed,
            max: req.max_failed,
            reverted: Some(format!("{} (commit {})", back.key, back.commit)),
        }),
        Waited::Failed(_) | Waited::TimedOut => Err(timeout(
            &format!(
                "the rollout of {commit} failed ({}); the pointer went back to {} but the fleet did not return",
                failed.join(", "),
                back.key
            ),
            report,
            req,
        )),
    }
}

/// The table `fleet status` prints, and its summary lines.
pub fn render(report: &Report) -> String {
    let short = |c: &str| c.chars().take(8).collect::<String>();
    let mut rows =
        vec![["INSTANCE", "RELEASE", "COMMIT", "STATUS", "UPDATED", "WAVE"].map(String::from)];
    for m in &report.instances {
        rows.push([
            m.instance.clone(),
            m.release.clone(),
            short(&m.commit),
            m.status.clone(),
            m.updated.clone(),
            match m.in_wave {
                Some(true) => "in".into(),
                Some(false) => "out".into(),
                None => "-".into(),
            },
        ]);
    }
    let mut out = crate::report::columns(&rows);
    let mut by_commit: std::collections::BTreeMap<String, usize> = Default::default();
    for m in &report.instances {
        *by_commit.entry(short(&m.commit)).or_default() += 1;
    }
    let serving: Vec<String> = by_commit
        .iter()
        .map(|(c, n)| format!("{n} on {}", if c.is_empty() { "nothing" } else { c }))
        .collect();
    let failed = report
        .instances
        .iter()
        .filter(|m| m.status == "failed" || m.status == "rolled-back")
        .count();
    out.push_str(&format!(
        "{} instance(s) of {}/{}: {}; {failed} failed or rolled back\n",
        report.instances.len(),
        report.app,
        report.environment,
        if serving.is_empty() {
            "none".into()
        } else {
            serving.join(", ")
        }
    ));
    if let Some(p) = &report.pointer {
        out.push_str(&format!(
            "pointer: {} (commit {}) at {}%{}\n",
            p.key,
            short(&p.commit),
            p.percent,
            p.previous_commit
                .as_deref()
                .map(|c| format!(", the rest on commit {}", short(c)))
                .unwrap_or_default()
        ));
    }
    if let Some(t) = &report.tally {
        out.push_str(&format!(
            "wave: {} of {} instance(s) serve {}\n",
            t.serving,
            t.wave,
            short(&t.commit)
        ));
    }
    if let Some(r) = &report.reverted_to {
        out.push_str(&format!("reverted the pointer to {r}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::wave::Previous;

    fn member(id: &str, status: &str, commit: &str, target: &str) -> Member {
        Member {
            instance: id.into(),
            status: status.into(),
            commit: commit.into(),
            target: target.into(),
            ..Member::default()
        }
    }

    #[test]
    fn tallies_count_the_wave_and_failures_for_the_commit() {
        let c1 = "1".repeat(40);
        let c2 = "2".repeat(40);
        let mut fleet: Vec<Member> = (0..20)
            .map(|i| member(&format!("i-{i}"), "serving", &c1, &c1))
            .collect();
        let sha = "ab".repeat(32);
        let rollout = Rollout {
            percent: 30,
            previous: Some(Previous {
                key: "k".into(),
                sha256: "aa".repeat(32),
                commit: c1.clone(),
                sequence: 0,
            }),
            reverts: None,
        };
        place(&mut fleet, &sha, &rollout);
        let wave: Vec<usize> = (0..20)
            .filter(|&i| fleet[i].in_wave == Some(true))
            .collect();
        let t = tally(&fleet, &c2[..8]);
        assert_eq!((t.instances, t.wave, t.serving), (20, wave.len(), 0));
        assert_eq!(t.converged(100), wave.is_empty());
        for &i in &wave {
            fleet[i].commit = c2.clone();
        }
        assert!(tally(&fleet, &c2).converged(100));
        // A failure for another commit does not count; one for this commit does.
        fleet[0].status = "failed".into();
        assert!(tally(&fleet, &c2).failed.is_empty());
        fleet[0].target = c2.clone();
        assert_eq!(tally(&fleet, &c2).failed, ["i-0"]);
        assert!(
            !Tally::default().converged(0),
            "an empty fleet never converges"
        );
        assert!(same_commit("1111111", &c1) && !same_commit("111111", &c1));
        assert!(render(&Report::default()).contains("0 instance(s)"));
    }
}
