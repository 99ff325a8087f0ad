//! EC2 for tests: instances and tags on the shared `moto_server` (which serves EC2 on the same
//! port as S3), an EC2 endpoint that refuses every call as an instance without the IAM
//! permission would see it, and the real Prometheus text-format parser for metrics files.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use super::{moto, sdk};

/// Synchronous EC2 helpers over the real SDK, against moto.
pub struct Ec2 {
    rt: tokio::runtime::Runtime,
    pub client: aws_sdk_ec2::Client,
}

impl Ec2 {
    pub fn new() -> Ec2 {
        let (rt, client) = sdk(|shared| {
            let conf = aws_sdk_ec2::config::Builder::from(shared)
                .endpoint_url(&moto().endpoint)
                .build();
            aws_sdk_ec2::Client::from_conf(conf)
        });
        Ec2 { rt, client }
    }

    /// Launches an instance (from an AMI moto knows) and returns its id.
    pub fn run_instance(&self) -> String {
        static AMI: OnceLock<String> = OnceLock::new();
        self.rt.block_on(async {
            let ami = match AMI.get() {
                Some(a) => a.clone(),
                None => {
                    let images = self.client.describe_images().send().await.unwrap();
                    let id = images.images()[0].image_id().unwrap().to_string();
                    AMI.get_or_init(|| id).clone()
                }
            };
            let out = self
                .client
                .run_instances()
                .image_id(ami)
                .min_count(1)
                .max_count(1)
                .send()
                .await
                .unwrap();
            out.instances()[0].instance_id().unwrap().to_string()
        })
    }

    /// Every tag on `instance`.
    pub fn tags(&self, instance: &str) -> BTreeMap<String, String> {
        self.rt.block_on(async {
            let out = self
                .client
                .describe_tags()
                .filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name("resource-id")
                        .values(instance)
                        .build(),
                )
                .send()
                .await
                .unwrap();
            out.tags()
                .iter()
                .map(|t| {
                    (
                        t.key().unwrap_or("").to_string(),
                        t.value().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
    }

    pub fn tag(&self, instance: &str, key: &str, value: &str) {
        self.rt.block_on(async {
            self.client
                .create_tags()
                .resources(instance)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key(key)
                        .value(value)
                        .build(),
                )
                .send()
                .await
                .unwrap();
        });
    }
}

/// An EC2 endpoint that answers every call with 403 `UnauthorizedOperation`, as EC2 does for
/// a role without `ec2:CreateTags`.
pub struct DeniedEc2 {
    pub endpoint: String,
    /// The `Action=` of every request seen.
    pub actions: Arc<Mutex<Vec<String>>>,
}

pub fn denied_ec2() -> DeniedEc2 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let actions = Arc::new(Mutex::new(Vec::new()));
    let seen = actions.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0usize;
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                continue;
            }
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.trim().eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let body = String::from_utf8_lossy(&body).into_owned();
            let action = body
                .split('&')
                .find_map(|p| p.strip_prefix("Action="))
                .unwrap_or("?")
                .to_string();
            seen.lock().unwrap().push(action);
            let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>You are not authorized to perform this operation.</Message></Error></Errors><RequestID>6e1a5d4b-0000-4000-8000-000000000000</RequestID></Response>";
            let _ = write!(
                stream,
                "HTTP/1.1 403 Forbidden\r\nContent-Type: text/xml;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                xml.len()
            );
        }
    });
    DeniedEc2 { endpoint, actions }
}

impl DeniedEc2 {
    pub fn calls(&self, action: &str) -> usize {
        self.actions
            .lock()
            .unwrap()
            .iter()
            .filter(|a| *a == action)
            .count()
    }
}

const PARSER: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    out[fam.name] = {"type": fam.type, "help": fam.documentation,
                     "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in fam.samples]}
print(json.dumps(out))
"#;

/// Parses a metrics file with the Prometheus client library's text-format parser (installed
/// with pip if missing) and returns `{family: {type, help, samples: [{name, labels, value}]}}`.
pub fn parse_metrics(path: &Path) -> serde_json::Value {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let have = Command::new("python3")
            .args(["-c", "import prometheus_client"])
            .status()
            .is_ok_and(|s| s.success());
        if !have {
            let ok = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "prometheus_client"])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "pip install prometheus_client failed");
        }
    });
    let out = Command::new("python3")
        .args(["-c", PARSER])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser rejected {}:\n{}\n---\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(path).unwrap_or_default()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
pub fn sample(metrics: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.as_object()?.values().find_map(|fam| {
        fam["samples"].as_array()?.iter().find_map(|s| {
            let matches = s["name"] == name
                && labels
                    .iter()
                    .all(|(k, v)| s["labels"][*k].as_str() == Some(*v));
            if matches { s["value"].as_f64() } else { None }
        })
    })
}
