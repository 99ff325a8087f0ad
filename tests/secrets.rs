//! No secret leaves the host: an environment-file line holding a password, and secret-shaped
//! text in an object key, never reach `state.json`, `status.json`, the EC2 tags (moto), the
//! log or the final error line.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::collections::BTreeMap;

use common::ec2::Ec2;
use common::{Host, Run, app, imds, moto};

struct Instance {
    host: Host,
    ec2: Ec2,
    id: String,
    _imds: imds::Imds,
}

fn instance() -> Instance {
    let ec2 = Ec2::new();
    let id = ec2.run_instance();
    let server = imds::start("123456789012", "us-east-1", &id);
    let mut host = Host::new();
    host.imds = Some(server.endpoint.clone());
    host.write_config(
        "wait_for_artifact = \"0s\"",
        &format!("[report]\nec2_endpoint_url = \"{}\"\n", moto().endpoint),
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

    /// Asserts `secret` is in none of the places an error text goes (the log's error lines,
    /// the `error` fields of `state.json` and `status.json`, the tag); returns the tag error.
    #[track_caller]
    fn assert_nowhere(&self, run: &Run, secret: &str) -> String {
        let state = self.host.state();
        let status: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.host.dir.path().join("run/status.json")).unwrap(),
        )
        .unwrap();
        let mut errors = Vec::new();
        error_fields(&state, &mut errors);
        error_fields(&status, &mut errors);
        assert!(errors.len() >= 2, "{state} {status}");
        let log: Vec<&str> = run
            .stderr
            .lines()
            .filter(|l| l.to_ascii_lowercase().contains("error") || l.contains("failed"))
            .collect();
        assert!(!log.is_empty(), "{}", run.stderr);
        let tags = self.tags();
        assert!(!tags["error"].is_empty(), "the failure is tagged: {tags:?}");
        for (place, text) in [
            ("the log's error lines", log.join("\n")),
            ("the error fields", errors.join("\n")),
            ("the error tag", tags["error"].clone()),
        ] {
            assert!(
                !text.contains(secret),
                "{secret:?} leaked into {place}: {text}"
            );
        }
        tags["error"].clone()
    }
}

/// Every string under a key named `error`.
fn error_fields(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) if k == "error" => out.push(s.clone()),
                    other => error_fields(other, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| error_fields(v, out)),
        _ => {}
    }
}

#[test]
fn an_environment_file_secret_is_named_by_line_and_key_only() {
    let i = instance();
    i.host
        .upload("web/v1.tar.gz", &app("v1").gz(), "1111111111111111");
    i.host.deploy("web/v1.tar.gz", &[]).ok();
    i.host
        .write_env("DEPLOYMENT_REGION=us-east-1\nDB_PASSWORD hunter2\n");
    let run = i.host.deploy("web/v1.tar.gz", &["--force"]);
    run.fails_with(78, "line 2");
    assert!(run.error_line().contains("environment"), "{}", run.stderr);
    let tag = i.assert_nowhere(&run, "hunter2");
    assert!(tag.starts_with("config: "), "{tag}");
    for file in [
        i.host.state_dir().join("state.json"),
        i.host.dir.path().join("run/status.json"),
    ] {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains("hunter2"), "{}: {text}", file.display());
    }
    assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);

    i.host
        .write_env("API_TOKEN=\"sk_live_51Habc123 unterminated\n");
    let run = i.host.deploy("web/v1.tar.gz", &["--force"]);
    run.fails_with(78, "unterminated double quote in the value of API_TOKEN");
    i.assert_nowhere(&run, "sk_live_51Habc123");
}

#[test]
fn secret_shapes_in_an_error_are_scrubbed_everywhere() {
    let i = instance();
    i.host
        .upload("web/v1.tar.gz", &app("v1").gz(), "1111111111111111");
    i.host.deploy("web/v1.tar.gz", &[]).ok();
    // Object keys are echoed in errors; these ones carry secret-shaped text.
    let shapes = [
        ("web/x password=hunter2", "hunter2"),
        ("web/x PASSWORD s3cr3tvalue", "s3cr3tvalue"),
        ("web/x API_KEY=sk_live_4eC39HqLyjWDarjt", "4eC39HqLyjWDarjt"),
        (
            "web/x Authorization: Bearer abc.def.ghi123",
            "abc.def.ghi123",
        ),
        (
            "web/x token=ghp_16C7e42F292c6912E7710c838347",
            "16C7e42F292c",
        ),
        ("web/x AKIAIOSFODNN7EXAMPLE y", "AKIAIOSFODNN7EXAMPLE"),
    ];
    for (key, secret) in shapes {
        let run = i.host.deploy(key, &[]);
        assert_eq!(run.code, 66, "{key}: {}", run.stderr);
        let tag = i.assert_nowhere(&run, secret);
        assert!(tag.starts_with("not-found: "), "{tag}");
    }
}
