//! Readiness beyond the host: EC2 instance tags (against moto's EC2 API, with the instance
//! identity served by a local IMDSv2 server), `{tag:NAME}` placeholders, hosts where tagging
//! cannot work, and the node_exporter metrics file checked with the Prometheus parser.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, Options};
use common::ec2::{self, Ec2, parse_metrics, sample};
use common::{Host, app, imds, moto};

/// A host whose IMDS identity is a fresh moto instance, with tags and metrics switched on.
struct Instance {
    host: Host,
    ec2: Ec2,
    id: String,
    _imds: imds::Imds,
}

fn instance(source: &str, report: &str) -> Instance {
    let ec2 = Ec2::new();
    let id = ec2.run_instance();
    let server = imds::start("123456789012", "us-east-1", &id);
    let mut host = Host::with(false, source, "");
    host.imds = Some(server.endpoint.clone());
    let metrics = host.dir.path().join("textfile/deployd.prom");
    std::fs::create_dir_all(metrics.parent().unwrap()).unwrap();
    host.write_config(
        source,
        &format!(
            "[report]\nec2_endpoint_url = \"{}\"\nmetrics_file = \"{}\"\n{report}",
            moto().endpoint,
            metrics.display()
        ),
    );
    Instance {
        host,
        ec2,
        id,
        _imds: server,
    }
}

impl Instance {
    fn tags(&self) -> BTreeMap<String, String> {
        self.ec2
            .tags(&self.id)
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("deployd:")?.to_string(), v)))
            .collect()
    }

    fn metrics(&self) -> serde_json::Value {
        parse_metrics(&self.host.dir.path().join("textfile/deployd.prom"))
    }
}

fn count(m: &serde_json::Value, result: &str) -> f64 {
    sample(m, "deployd_deployments_total", &[("result", result)])
        .unwrap_or_else(|| panic!("no deployd_deployments_total{{result={result:?}}} in {m}"))
}

fn recent(rfc3339: &str) -> bool {
    humantime::parse_rfc3339(rfc3339)
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < Duration::from_secs(120))
}

#[test]
fn tags_and_metrics_follow_deploys_a_failure_and_a_rollback() {
    let i = instance("", "");
    let h = &i.host;
    h.upload(
        "web/prod/aaaa1111/web.tar.gz",
        &app("v1").gz(),
        "aaaa1111deadbeefaaaa1111deadbeefaaaa1111",
    );
    h.upload(
        "web/prod/bbbb2222/web.tar.gz",
        &app("v2").gz(),
        "bbbb2222deadbeefbbbb2222deadbeefbbbb2222",
    );

    let run = h.deploy("web/prod/aaaa1111/web.tar.gz", &[]);
    run.ok();
    assert!(!run.stderr.contains("tags are off"), "{}", run.stderr);
    let v1 = h.current().unwrap();
    let t = i.tags();
    assert_eq!(t["status"], "serving");
    assert_eq!(t["release"], v1);
    assert_eq!(t["commit"], "aaaa1111deadbeefaaaa1111deadbeefaaaa1111");
    assert_eq!(t["error"], "");
    assert!(recent(&t["updated"]), "updated = {:?}", t["updated"]);
    let m = i.metrics();
    assert_eq!(count(&m, "deployed"), 1.0);
    assert_eq!(count(&m, "failed"), 0.0);
    let first_success = sample(&m, "deployd_last_success_timestamp_seconds", &[]).unwrap();
    assert!(first_success > 1.7e9, "{first_success}");
    assert_eq!(
        sample(
            &m,
            "deployd_release_info",
            &[
                ("release", &v1),
                ("commit", "aaaa1111deadbeefaaaa1111deadbeefaaaa1111")
            ]
        ),
        Some(1.0)
    );
    let size = app("v1").gz().len() as f64;
    assert_eq!(sample(&m, "deployd_artifact_bytes", &[]), Some(size));
    for stage in ["resolving", "verifying", "fetching", "activating"] {
        let s = sample(&m, "deployd_stage_duration_seconds", &[("stage", stage)])
            .unwrap_or_else(|| panic!("no duration for {stage}: {m}"));
        assert!((0.0..60.0).contains(&s), "{stage}: {s}");
    }
    assert_eq!(sample(&m, "deployd_build_cache_hits", &[]), Some(0.0));
    assert_eq!(sample(&m, "deployd_build_cache_misses", &[]), Some(0.0));
    assert_eq!(m["deployd_deployments"]["type"], "counter");

    std::thread::sleep(Duration::from_millis(1100));
    h.deploy("web/prod/bbbb2222/web.tar.gz", &[]).ok();
    let v2 = h.current().unwrap();
    assert_ne!(v1, v2);
    assert_eq!(i.tags()["release"], v2);
    assert_eq!(
        i.tags()["commit"],
        "bbbb2222deadbeefbbbb2222deadbeefbbbb2222"
    );
    let m = i.metrics();
    assert_eq!(count(&m, "deployed"), 2.0);
    assert!(sample(&m, "deployd_last_success_timestamp_seconds", &[]).unwrap() > first_success);

    // A failing deployment: a key that never appears (the wait is 2 s) and that carries
    // something which must not reach a tag. While it waits, the instance says "deploying".
    let secret_key =
        "web/prod/missing.tar.gz?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE&X-Amz-Signature=0badc0ffee";
    let mut child = h
        .command(&["deploy", "--bucket", &h.bucket, "--key", secret_key])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut saw_deploying = false;
    while start.elapsed() < Duration::from_secs(10) && child.try_wait().unwrap().is_none() {
        if i.tags().get("status").map(String::as_str) == Some("deploying") {
            saw_deploying = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = common::Run::from(child.wait_with_output().unwrap());
    assert!(
        saw_deploying,
        "status=deploying was never visible\n{}",
        out.stderr
    );
    out.fails_with(66, "missing.tar.gz");
    let t = i.tags();
    assert_eq!(t["status"], "failed");
    assert_eq!(t["release"], v2, "the release tag names what still serves");
    let error = &t["error"];
    assert!(error.contains("missing.tar.gz"), "{error}");
    assert!(error.chars().count() <= 255, "{error}");
    for secret in ["AKIAIOSFODNN7EXAMPLE", "0badc0ffee", "X-Amz-Signature"] {
        assert!(
            !error.contains(secret),
            "{secret} leaked into the tag: {error}"
        );
    }
    assert_eq!(count(&i.metrics(), "failed"), 1.0);

    h.run(&["rollback"]).ok();
    assert_eq!(h.current().as_deref(), Some(v1.as_str()));
    let t = i.tags();
    assert_eq!(t["status"], "rolled-back");
    assert_eq!(t["release"], v1);
    assert_eq!(t["commit"], "aaaa1111deadbeefaaaa1111deadbeefaaaa1111");
    assert_eq!(t["error"], "");
    let m = i.metrics();
    assert_eq!(count(&m, "rolled-back"), 1.0);
    assert_eq!(
        sample(&m, "deployd_release_info", &[("release", &v1)]),
        Some(1.0)
    );
    // A rollback keeps the stage timings of the last deployment: the failed one, which spent
    // at least one retry delay (0.5 s or more) waiting for the key in `verifying` and never
    // fetched.
    let verifying = sample(
        &m,
        "deployd_stage_duration_seconds",
        &[("stage", "verifying")],
    );
    assert!(verifying.is_some_and(|s| (0.45..30.0).contains(&s)), "{m}");
    assert_eq!(
        sample(
            &m,
            "deployd_stage_duration_seconds",
            &[("stage", "fetching")]
        ),
        None
    );

    // The same artifact again is "unchanged", and the instance is back to "serving".
    h.deploy("web/prod/aaaa1111/web.tar.gz", &[]).ok();
    assert_eq!(i.tags()["status"], "serving");
    let m = i.metrics();
    assert_eq!(count(&m, "unchanged"), 1.0);
    assert_eq!(
        count(&m, "deployed"),
        2.0,
        "counters survive across processes"
    );

    h.write_deployment_env("web/prod/aaaa1111/web.tar.gz");
    let check = h.run(&["check-config"]);
    check.ok();
    assert!(
        check.stdout.contains(&format!("{} in us-east-1", i.id)),
        "{}",
        check.stdout
    );
    assert!(
        check.stdout.contains("ec2 tags       on:") && check.stdout.contains("dry run"),
        "{}",
        check.stdout
    );
    assert!(check.stdout.contains("deployd.prom"), "{}", check.stdout);
}

#[test]
fn tag_placeholder_fills_a_legacy_key() {
    let bucket = common::unique("legacy");
    common::S3::new().create_bucket(&bucket, false);
    let i = instance(
        &format!(
            "legacy_bucket = \"{bucket}\"\nlegacy_key = \"web/pr-{{tag:pr-number}}/web.tar.gz\""
        ),
        "",
    );
    i.ec2.tag(&i.id, "pr-number", "77");
    let h = &i.host;
    h.s3.publish(
        &bucket,
        "web/pr-77/web.tar.gz",
        &app("pr77").gz(),
        "7777777777777777",
    );

    let check = h.run(&["check-config"]);
    check.ok();
    assert!(
        check
            .stdout
            .contains(&format!("s3://{bucket}/web/pr-77/web.tar.gz")),
        "{}",
        check.stdout
    );
    h.run(&["deploy"]).ok();
    assert_eq!(h.manifest()["key"], "web/pr-77/web.tar.gz");
    assert_eq!(h.manifest()["source"], "legacy template");

    // Tags are read again by every deployment.
    i.ec2.tag(&i.id, "pr-number", "78");
    h.run(&["deploy"]).fails_with(66, "web/pr-78/web.tar.gz");

    // A tag the instance does not have names the tag and the instance.
    h.write_config(
        &format!("legacy_bucket = \"{bucket}\"\nlegacy_key = \"web/{{tag:no-such-tag}}.tar.gz\""),
        &format!("[report]\nec2_endpoint_url = \"{}\"", moto().endpoint),
    );
    h.run(&["deploy"])
        .fails_with(78, "{tag:no-such-tag}")
        .fails_with(78, &i.id);
}

/// The source poller resolves `{tag:NAME}` with the instance's tags, as a deployment does:
/// retagging the instance moves it to the artifact the new tag names, without a trigger.
#[test]
fn the_poller_follows_a_tag_placeholder() {
    let bucket = common::unique("legacy");
    common::S3::new().create_bucket(&bucket, false);
    let i = instance(
        &format!(
            "legacy_bucket = \"{bucket}\"\nlegacy_key = \"web/pr-{{tag:pr-number}}/web.tar.gz\""
        ),
        "\n[triggers]\npoll_interval = \"1s\"\n",
    );
    let h = &i.host;
    i.ec2.tag(&i.id, "pr-number", "77");
    for pr in ["77", "78"] {
        h.s3.publish(
            &bucket,
            &format!("web/pr-{pr}/web.tar.gz"),
            &app(&format!("pr{pr}")).gz(),
            "7777777777777777",
        );
    }
    let mut d = Daemon::start(h, Options::default());
    let key = || {
        h.try_state()
            .and_then(|s| s["current"]["key"].as_str().map(str::to_string))
    };
    d.wait_for(
        Duration::from_secs(30),
        "the startup deployment of pr-77",
        || key().as_deref() == Some("web/pr-77/web.tar.gz"),
    );
    i.ec2.tag(&i.id, "pr-number", "78");
    d.wait_for(
        Duration::from_secs(30),
        "the poller to deploy pr-78 after the instance was retagged",
        || key().as_deref() == Some("web/pr-78/web.tar.gz"),
    );
    d.stop(Duration::from_secs(30));
    assert!(
        !d.log().contains("instance tags are not available"),
        "{}",
        d.log()
    );
}

#[test]
fn without_imds_tagging_is_off_with_one_warning_and_deployments_work() {
    // A metadata endpoint nobody listens on (a laptop, Lightsail without IMDS).
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let mut h = Host::new();
    h.imds = Some(dead);
    h.upload("web/a.tar.gz", &app("a").gz(), "aaaaaaaa00000000");
    // An explicit source: nothing in it needs the instance identity.
    h.write_config(
        &format!("bucket = \"{}\"\nkey = \"web/a.tar.gz\"", h.bucket),
        "",
    );
    let started = Instant::now();
    let run = h.deploy("web/a.tar.gz", &[]);
    run.ok();
    let warnings: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("tags are off"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", run.stderr);
    assert!(
        warnings[0].contains("IMDSv2") && warnings[0].contains("WARN"),
        "{}",
        warnings[0]
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    let check = h.run(&["check-config"]);
    check.ok();
    let line = check
        .stdout
        .lines()
        .find(|l| l.starts_with("ec2 tags"))
        .unwrap_or_else(|| panic!("{}", check.stdout));
    assert!(line.contains("off:") && line.contains("IMDSv2"), "{line}");
    assert!(
        check.stdout.contains("identity       unavailable"),
        "{}",
        check.stdout
    );

    // AWS_EC2_METADATA_DISABLED=true says so.
    h.imds = None;
    let check = h.run(&["check-config"]);
    assert!(
        check.stdout.contains("AWS_EC2_METADATA_DISABLED=true"),
        "{}",
        check.stdout
    );

    // Switched off in the config: no warning at all, and check-config says why.
    h.write_config(
        &format!("bucket = \"{}\"\nkey = \"web/a.tar.gz\"", h.bucket),
        "[report]\nec2_tags = false",
    );
    h.upload("web/b.tar.gz", &app("b").gz(), "bbbbbbbb00000000");
    let run = h.deploy("web/b.tar.gz", &[]);
    run.ok();
    assert!(!run.stderr.contains("tags are off"), "{}", run.stderr);
    let check = h.run(&["check-config"]);
    assert!(
        check.stdout.contains("[report] ec2_tags = false"),
        "{}",
        check.stdout
    );
}

/// Runs `deployd run` until `attempts` deployments are recorded, then stops it; `between`
/// runs once the first one is. Returns the daemon's log.
fn daemon_until(h: &Host, options: Options, attempts: usize, between: impl Fn()) -> String {
    let mut d = Daemon::start(h, options);
    let mut nudged = false;
    d.wait_for(
        Duration::from_secs(60),
        &format!("the daemon to record {attempts} deployments"),
        || {
            let recorded = h
                .try_state()
                .and_then(|s| s["history"].as_array().map(Vec::len))
                .unwrap_or(0);
            let done = recorded >= attempts;
            if !done && recorded >= 1 && !nudged {
                nudged = true;
                between();
            }
            done
        },
    );
    d.stop(Duration::from_secs(30));
    d.log()
}

#[test]
fn tagging_denied_warns_once_and_the_next_deployment_makes_no_tag_calls() {
    let denied = ec2::denied_ec2();
    let id = Ec2::new().run_instance();
    let server = imds::start("123456789012", "us-east-1", &id);
    let mut h = Host::new();
    h.imds = Some(server.endpoint.clone());
    h.upload("web/a.tar.gz", &app("a").gz(), "aaaaaaaa11111111");
    h.upload("web/b.tar.gz", &app("b").gz(), "bbbbbbbb22222222");
    h.write_deployment_env("web/a.tar.gz");
    // This test takes the endpoint from the SDK's own variable rather than the config key.
    let options = Options::default().env("AWS_ENDPOINT_URL_EC2", &denied.endpoint);
    let log = daemon_until(&h, options, 2, || {
        h.trigger("web/b.tar.gz", &[]).ok();
    });
    let state = h.state();
    let outcomes: Vec<&str> = state["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["deployed", "deployed"], "{log}");
    assert_eq!(denied.calls("CreateTags"), 1, "{log}");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("tags are off")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("UnauthorizedOperation") && warnings[0].contains(&id),
        "{}",
        warnings[0]
    );

    // check-config names the refusal (its dry run is one more call).
    let mut cmd = h.command(&["check-config"]);
    cmd.env("AWS_ENDPOINT_URL_EC2", &denied.endpoint);
    let check = common::Run::from(cmd.output().unwrap());
    check.ok();
    assert!(
        check.stdout.lines().any(|l| l.starts_with("ec2 tags")
            && l.contains("off:")
            && l.contains("UnauthorizedOperation")),
        "{}",
        check.stdout
    );
}

#[test]
fn a_metadata_service_that_never_answers_costs_one_bounded_wait() {
    // Accepts connections and never answers, like a black-holed 169.254.169.254.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let mut h = Host::new();
    h.imds = Some(endpoint);
    h.upload("web/a.tar.gz", &app("a").gz(), "aaaaaaaa00000000");
    let started = Instant::now();
    let run = h.deploy("web/a.tar.gz", &[]);
    let took = started.elapsed();
    run.ok();
    let warnings = run
        .stderr
        .lines()
        .filter(|l| l.contains("tags are off"))
        .count();
    assert_eq!(warnings, 1, "{}", run.stderr);
    // The start-of-deployment write runs alongside the pipeline and gives up within 5 s;
    // the end-of-deployment write then knows tagging is off and costs nothing.
    assert!(
        took < Duration::from_secs(9),
        "took {took:?}\n{}",
        run.stderr
    );
}

/// With containers: build cache figures reach the metrics, and a release that fails its
/// health check and is rolled back automatically shows `rolled-back` with the reason.
#[test]
fn container_builds_and_automatic_rollbacks_are_reported() {
    use common::docker::{App, Variant, engine};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if rt.block_on(engine()).is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the Docker engine must answer in CI"
        );
        return;
    }
    let app = App::new("report");
    let ec2 = Ec2::new();
    let id = ec2.run_instance();
    let server = imds::start("123456789012", "us-east-1", &id);
    let mut host = Host::new();
    host.app = app.project.clone();
    host.imds = Some(server.endpoint.clone());
    let metrics = host.dir.path().join("deployd.prom");
    host.write_config(
        "",
        &format!(
            "[containers]\nenabled = true\nhealth_timeout = \"8s\"\nhealth_grace = \"1s\"\n\n[report]\nec2_endpoint_url = \"{}\"\nmetrics_file = \"{}\"\n",
            moto().endpoint,
            metrics.display()
        ),
    );
    host.write_env(&format!("HOST_PORT={}\n", app.port));
    let publish = |name: &str, v: &Variant| {
        let key = format!("web/{name}.tar.gz");
        let body = common::tar_gz_dir(&app.release(name, v));
        host.upload(&key, &body, &format!("{name}{name}abcdef0123"));
        key
    };
    host.deploy(&publish("v1", &Variant::new("v1")), &[]).ok();
    host.deploy(&publish("v2", &Variant::new("v2")), &[]).ok();
    let r2 = host.current().unwrap();
    let m = parse_metrics(&metrics);
    let hits = sample(&m, "deployd_build_cache_hits", &[]).unwrap();
    let misses = sample(&m, "deployd_build_cache_misses", &[]).unwrap();
    assert!(
        hits >= 1.0,
        "the second build reuses the first one's layers: {m}"
    );
    assert!(misses >= 1.0, "the version file changed: {m}");
    for stage in ["building", "starting"] {
        assert!(
            sample(&m, "deployd_stage_duration_seconds", &[("stage", stage)]).is_some(),
            "{stage}: {m}"
        );
    }

    let mut sick = Variant::new("v3");
    sick.health_path = "/no-such-file".into();
    host.deploy(&publish("v3", &sick), &[])
        .fails_with(75, "rolled back");
    let tags = ec2.tags(&id);
    assert_eq!(tags["deployd:status"], "rolled-back");
    assert_eq!(tags["deployd:release"], r2, "what serves again");
    assert!(
        tags["deployd:error"].contains("rolled back"),
        "{}",
        tags["deployd:error"]
    );
    let m = parse_metrics(&metrics);
    assert_eq!(count(&m, "rolled-back"), 1.0);
    assert_eq!(count(&m, "deployed"), 2.0);
}
