//! Test harness: a real S3-compatible server (`moto_server`) on a free loopback port, a local
//! IMDSv2 server, tarball builders (including hostile ones), and a scratch "host" with its own
//! state directory on which the real `deployd` binary is run: to completion, or as a daemon
//! ([`daemon`]), with its S3 traffic through a recording, misbehaving proxy if need be
//! ([`proxy`]). Artifacts reach the bucket with `deployd publish` ([`Host::publish_bytes`]) or
//! as a plain upload with metadata ([`Host::upload`]).
#![allow(dead_code)]

pub mod daemon;
pub mod docker;
pub mod ec2;
pub mod imds;
pub mod keys;
pub mod proxy;
pub mod signed;
pub mod tarball;

#[allow(unused_imports)]
pub use tarball::{Tarball, app, noise, tar_gz_dir};

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use sha2::{Digest, Sha256};

/// A `moto_server` shared by every test in one test binary, killed when the binary exits.
pub struct Moto {
    pub endpoint: String,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Checks `done` every `every` until it holds and returns how long that took, or `None` once
/// `limit` has passed.
pub fn poll(limit: Duration, every: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if done() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(every);
    }
}

fn wait_port(port: u16, limit: Duration) {
    let up = poll(limit, Duration::from_millis(50), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up.is_some(), "server on port {port} did not start");
}

pub fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        // The server is spawned from a thread that never exits, because PR_SET_PDEATHSIG fires
        // when the spawning *thread* ends; the server then dies with the test process.
        std::thread::spawn(move || {
            let port = free_port();
            let mut cmd = Command::new("moto_server");
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd
                .spawn()
                .expect("moto_server must be installed: pip install 'moto[server]'");
            wait_port(port, Duration::from_secs(30));
            tx.send(port).unwrap();
            let _keep = child;
            loop {
                std::thread::park();
            }
        });
        let port = rx.recv().unwrap();
        Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Synchronous S3 helpers for tests, over the real SDK.
pub struct S3 {
    pub rt: tokio::runtime::Runtime,
    pub client: aws_sdk_s3::Client,
}

pub fn set_test_aws_env() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: runs once, before tests start other threads that read the environment
        // through the SDK; values are the same for every test.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", "test");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
            std::env::set_var("AWS_REGION", "us-east-1");
            std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        }
    });
}

/// A current-thread runtime and an SDK client made by `client` from the test credentials; the
/// runtime drives the client's calls.
pub fn sdk<C>(client: impl FnOnce(&aws_config::SdkConfig) -> C) -> (tokio::runtime::Runtime, C) {
    set_test_aws_env();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shared = rt.block_on(aws_config::defaults(aws_config::BehaviorVersion::latest()).load());
    let client = client(&shared);
    (rt, client)
}

impl S3 {
    pub fn new() -> S3 {
        Self::at(&moto().endpoint)
    }

    /// A client for the S3 API at `endpoint` (moto, or a proxy in front of it).
    pub fn at(endpoint: &str) -> S3 {
        let (rt, client) = sdk(|shared| {
            let conf = aws_sdk_s3::config::Builder::from(shared)
                .endpoint_url(endpoint)
                .force_path_style(true)
                .build();
            aws_sdk_s3::Client::from_conf(conf)
        });
        S3 { rt, client }
    }

    pub fn create_bucket(&self, bucket: &str, versioned: bool) {
        self.rt.block_on(async {
            self.client
                .create_bucket()
                .bucket(bucket)
                .send()
                .await
                .unwrap();
            if versioned {
                self.client
                    .put_bucket_versioning()
                    .bucket(bucket)
                    .versioning_configuration(
                        aws_sdk_s3::types::VersioningConfiguration::builder()
                            .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                            .build(),
                    )
                    .send()
                    .await
                    .unwrap();
            }
        });
    }

    /// Uploads `body` with the given user metadata.
    pub fn put(&self, bucket: &str, key: &str, body: &[u8], metadata: &[(&str, &str)]) {
        self.rt.block_on(async {
            let mut req = self
                .client
                .put_object()
                .bucket(bucket)
                .key(key)
                .body(ByteStream::from(body.to_vec()));
            for (k, v) in metadata {
                req = req.metadata(*k, *v);
            }
            req.send().await.unwrap();
        });
    }

    /// Uploads with `sha256` and `commit-sha` metadata; returns the SHA-256.
    pub fn publish(&self, bucket: &str, key: &str, body: &[u8], commit: &str) -> String {
        let sha = sha256_hex(body);
        self.put(
            bucket,
            key,
            body,
            &[("sha256", &sha), ("commit-sha", commit)],
        );
        sha
    }

    /// Uploads with an S3 SHA-256 checksum header of our choosing (base64 of `digest`).
    pub fn put_with_checksum(&self, bucket: &str, key: &str, body: &[u8], digest: &[u8]) {
        self.rt.block_on(async {
            self.client
                .put_object()
                .bucket(bucket)
                .key(key)
                .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Sha256)
                .checksum_sha256(aws_smithy_types::base64::encode(digest))
                .body(ByteStream::from(body.to_vec()))
                .send()
                .await
                .unwrap();
        });
    }
}

/// A scratch host: its own state, runtime and config, and a bucket of its own on moto.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub bucket: String,
    pub s3: S3,
    pub config: PathBuf,
    pub imds: Option<String>,
    /// `app` in the config: names releases and the container project.
    pub app: String,
}

pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

impl Host {
    pub fn new() -> Host {
        Self::with(false, "", "")
    }

    /// `source` lines go into `[source]`; `extra` is appended after the other tables.
    pub fn with(versioned: bool, source: &str, extra: &str) -> Host {
        let s3 = S3::new();
        let bucket = unique("deployd-test");
        s3.create_bucket(&bucket, versioned);
        Self::on(s3, bucket, source, extra)
    }

    /// A host whose own bucket is `bucket`, which already exists: several hosts following one
    /// bucket, as a fleet does.
    pub fn in_bucket(bucket: &str, source: &str, extra: &str) -> Host {
        Self::on(S3::new(), bucket.to_string(), source, extra)
    }

    fn on(s3: S3, bucket: String, source: &str, extra: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let host = Host {
            config: dir.path().join("deployd.toml"),
            dir,
            bucket,
            s3,
            imds: None,
            app: "web".into(),
        };
        host.write_config(source, extra);
        host
    }

    /// Writes the host's config: `source` lines go into `[source]` (with a short
    /// `wait_for_artifact`, and the host's own bucket in `allowed_buckets` so that `deploy
    /// --bucket/--key` and trigger files may name it, unless `source` sets either), `extra`
    /// after the other tables.
    pub fn write_config(&self, source: &str, extra: &str) {
        let d = self.dir.path().display();
        let mut wait = if source.contains("wait_for_artifact") {
            String::new()
        } else {
            "wait_for_artifact = \"2s\"\n".to_string()
        };
        if !source.contains("allowed_buckets") {
            wait.push_str(&format!("allowed_buckets = [\"{}\"]\n", self.bucket));
        }
        let containers = if extra.contains("[containers]") {
            ""
        } else {
            "[containers]\nenabled = false\n"
        };
        let text = format!(
            "app = \"{}\"\nstate_dir = \"{d}/state\"\nruntime_dir = \"{d}/run\"\nenvironment_file = \"{d}/environment\"\n\n[source]\n{wait}{source}\n\n[s3]\nendpoint_url = \"{}\"\n\n{containers}\n{extra}\n",
            self.app,
            moto().endpoint
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// Sends this host's S3 traffic through `endpoint` (a proxy in front of moto).
    pub fn route_s3_through(&self, endpoint: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, text.replace(&moto().endpoint, endpoint)).unwrap();
    }

    /// Adds `lines` (`key = value`) to the config's `[s3]` table.
    pub fn set_s3(&self, lines: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let text = text.replacen("[s3]\n", &format!("[s3]\n{lines}\n"), 1);
        std::fs::write(&self.config, text).unwrap();
    }

    /// Asserts the host is as `deployd` must leave it after a failed attempt: `release`
    /// still serves, no staging, a readable `state.json` whose last attempt failed with
    /// `code` and whose serving record is `release`.
    #[track_caller]
    pub fn assert_failed_intact(&self, release: &str, code: i32) {
        assert_eq!(
            self.current().as_deref(),
            Some(release),
            "current untouched"
        );
        assert_eq!(self.staging_entries(), 0, "no staging left behind");
        let state = self.state();
        assert_eq!(state["current"]["id"], release, "{state}");
        assert_eq!(state["last_attempt"]["outcome"], "failed", "{state}");
        assert_eq!(state["last_attempt"]["exit_code"], code, "{state}");
    }

    pub fn write_env(&self, text: &str) {
        std::fs::write(self.dir.path().join("environment"), text).unwrap();
    }

    /// An environment file naming `key` in the host's own bucket, as cloud-init writes it.
    pub fn write_deployment_env(&self, key: &str) {
        self.write_env(&format!(
            "DEPLOYMENT_BUCKET={}\nDEPLOYMENT_KEY={key}\n",
            self.bucket
        ));
    }

    /// Uploads `body` to `key` in the host's own bucket with `sha256` and `commit-sha`
    /// metadata, as a CI script without `deployd publish` does; returns the SHA-256.
    pub fn upload(&self, key: &str, body: &[u8], commit: &str) -> String {
        self.s3.publish(&self.bucket, key, body, commit)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_deployd"));
        cmd.args(args)
            .env("DEPLOYD_CONFIG", &self.config)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("RUST_LOG", "info")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT_URL_S3")
            .env_remove("AWS_PROFILE")
            .env_remove("DEPLOYMENT_BUCKET")
            .env_remove("DEPLOYMENT_KEY")
            .env_remove("DEPLOYMENT_POINTER")
            .env_remove("DEPLOYMENT_SHA256")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null());
        match &self.imds {
            Some(endpoint) => {
                cmd.env_remove("AWS_EC2_METADATA_DISABLED")
                    .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint);
            }
            None => {
                cmd.env("AWS_EC2_METADATA_DISABLED", "true");
            }
        }
        cmd
    }

    /// Runs `deployd ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        let out = self.command(args).output().unwrap();
        Run::from(out)
    }

    /// `deployd deploy --bucket <own bucket> --key KEY [extra]`.
    pub fn deploy(&self, key: &str, extra: &[&str]) -> Run {
        let mut args = vec!["deploy", "--bucket", &self.bucket, "--key", key];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// `deployd trigger --bucket <own bucket> --key KEY [extra]`: asks a running daemon to
    /// deploy KEY.
    pub fn trigger(&self, key: &str, extra: &[&str]) -> Run {
        let mut args = vec!["trigger", "--bucket", &self.bucket, "--key", key];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// The release `current` points at.
    pub fn current(&self) -> Option<String> {
        let link = std::fs::read_link(self.state_dir().join("current")).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }

    pub fn current_dir(&self) -> PathBuf {
        self.state_dir().join("current")
    }

    /// The VERSION file of the release that serves (see [`app`]).
    pub fn served_version(&self) -> String {
        std::fs::read_to_string(self.current_dir().join("VERSION")).unwrap()
    }

    pub fn releases(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state_dir().join("releases"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn staging_entries(&self) -> usize {
        std::fs::read_dir(self.state_dir().join("staging"))
            .map(|rd| rd.count())
            .unwrap_or(0)
    }

    pub fn manifest(&self) -> serde_json::Value {
        let text = std::fs::read(self.current_dir().join(".deployd-release.json")).unwrap();
        serde_json::from_slice(&text).unwrap()
    }

    pub fn state(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.state_dir().join("state.json")).unwrap())
            .unwrap()
    }

    /// `state.json` if there is one yet, for polling a daemon that may not have written it.
    pub fn try_state(&self) -> Option<serde_json::Value> {
        let bytes = std::fs::read(self.state_dir().join("state.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Asserts that `release` still serves, with `version` in its VERSION file, and that no
    /// staged tree was left behind.
    #[track_caller]
    pub fn assert_serving(&self, release: &str, version: &str) {
        assert_eq!(self.current().as_deref(), Some(release));
        assert_eq!(self.served_version(), version);
        assert_eq!(self.staging_entries(), 0, "the staged tree was removed");
    }

    /// Every path under the host's directory, for "nothing escaped" checks.
    pub fn all_paths(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    let p = e.path();
                    out.push(p.clone());
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(&p, out);
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(self.dir.path(), &mut out);
        out
    }
}

/// A finished `deployd` run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Run {
    /// The final `deployd: error: ...` sentence.
    pub fn error_line(&self) -> &str {
        self.stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("deployd: error: "))
            .unwrap_or("")
    }

    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "expected success:\n{}\n{}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn fails_with(&self, code: i32, needle: &str) -> &Self {
        assert_eq!(
            self.code, code,
            "expected exit {code}:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert!(
            self.error_line().contains(needle),
            "expected {needle:?} in the error line {:?}\n{}",
            self.error_line(),
            self.stderr
        );
        self
    }
}

pub fn metadata_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Writes `bytes` to a file under the host's directory and returns its path.
pub fn write_file(host: &Host, name: &str, bytes: &[u8]) -> PathBuf {
    let path = host.dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

impl Host {
    /// `deployd publish FILE --bucket <own bucket> --app web --environment ENV [extra]`, with
    /// the GitHub Actions variables cleared unless `extra_env` sets them.
    pub fn publish(
        &self,
        file: &Path,
        environment: &str,
        extra: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Run {
        let mut cmd = self.command(&[
            "publish",
            file.to_str().unwrap(),
            "--bucket",
            &self.bucket,
            "--app",
            "web",
            "--environment",
            environment,
        ]);
        cmd.args(extra);
        for var in [
            "GITHUB_SHA",
            "GITHUB_REF",
            "GITHUB_REF_NAME",
            "GITHUB_HEAD_REF",
            "GITHUB_RUN_ID",
            "GITHUB_OUTPUT",
            "DEPLOYD_SIGN_PASSWORD",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        Run::from(cmd.output().unwrap())
    }

    /// The key a successful `publish` printed.
    pub fn published_key(run: &Run) -> String {
        run.ok();
        run.stdout.lines().last().unwrap_or("").trim().to_string()
    }

    /// Writes `body` to `file_name` in the host's directory and publishes it for `environment`
    /// with `deployd publish ... ARGS`, which must succeed.
    pub fn publish_bytes(
        &self,
        file_name: &str,
        body: &[u8],
        environment: &str,
        args: &[&str],
    ) -> Published {
        let file = write_file(self, file_name, body);
        let key = Self::published_key(&self.publish(&file, environment, args, &[]));
        Published {
            key,
            sha256: sha256_hex(body),
        }
    }

    /// `app(version)` published for `prod` with `--commit COMMIT ARGS`.
    pub fn publish_app(&self, version: &str, commit: &str, args: &[&str]) -> Published {
        let mut all = vec!["--commit", commit];
        all.extend_from_slice(args);
        let body = app(version).gz();
        self.publish_bytes(&format!("{version}.tar.gz"), &body, "prod", &all)
    }
}

/// What a successful `deployd publish` uploaded.
#[derive(Debug, Clone)]
pub struct Published {
    pub key: String,
    pub sha256: String,
}

impl S3 {
    /// Every key in `bucket`, sorted.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(bucket)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                for o in page.unwrap().contents() {
                    out.push(o.key().unwrap().to_string());
                }
            }
            out.sort();
            out
        })
    }

    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        self.rt.block_on(async {
            let out = self
                .client
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .unwrap();
            out.body.collect().await.unwrap().into_bytes().to_vec()
        })
    }

    pub fn head(
        &self,
        bucket: &str,
        key: &str,
    ) -> aws_sdk_s3::operation::head_object::HeadObjectOutput {
        self.rt.block_on(async {
            self.client
                .head_object()
                .bucket(bucket)
                .key(key)
                .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
                .send()
                .await
                .unwrap()
        })
    }
}
