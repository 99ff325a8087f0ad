//! The configuration file, `/etc/deployd/deployd.toml`.
//!
//! Every key is optional and has the default documented in the design; unknown keys are an
//! error, and every value is validated when the file is loaded, so a typo stops deployd with
//! exit code 78 and a sentence naming the file, the line and the key, instead of surfacing
//! halfway through a deployment. `--config` or `DEPLOYD_CONFIG` choose another file; a missing
//! file at the default path means "all defaults", a missing file named explicitly is an error.

pub mod envfile;
mod sections;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{ExitCode, exit};
pub use crate::s3::S3Config;
pub use crate::units::{HumanDuration, Size, parse_size};
pub use sections::{
    ContainersConfig, DaemonConfig, ReleasesConfig, ReportConfig, SourceConfig, TriggersConfig,
    UnpackConfig,
};

/// Where the configuration lives unless `--config` or `DEPLOYD_CONFIG` say otherwise.
pub const DEFAULT_PATH: &str = "/etc/deployd/deployd.toml";

/// A configuration problem; always exit code 78.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or an unknown key or a bad value.
    #[error("invalid config file {path}, line {line}{}: {message}", key.as_ref().map(|k| format!(" (key `{k}`)")).unwrap_or_default())]
    Parse {
        /// The path concerned.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The dotted config key.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A value serde accepts but deployd cannot use.
    #[error("invalid config file {path}: `{key}` {message}")]
    Invalid {
        /// The path concerned.
        path: PathBuf,
        /// The dotted config key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl ExitCode for ConfigError {
    fn exit_code(&self) -> i32 {
        exit::CONFIG
    }
}

/// `/etc/deployd/deployd.toml`; every key optional (see the README's config section).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Names releases, the container project and legacy templates.
    pub app: String,
    /// The environment this host belongs to (`prod`, `staging`), tagged as
    /// `deployd:environment` so that `deployd fleet status` finds the fleet; empty: untagged.
    pub environment: String,
    /// Releases, `current`, `state.json` (default `/var/lib/deployd`).
    pub state_dir: PathBuf,
    /// `status.json` and `triggers/` live here.
    pub runtime_dir: PathBuf,
    /// `KEY=value` lines written by cloud-init, re-read at every deployment.
    pub environment_file: PathBuf,
    /// `[source]`: where the artifact comes from.
    pub source: SourceConfig,
    /// `[s3]`: the S3 client.
    pub s3: S3Config,
    /// `[unpack]`: archive limits.
    pub unpack: UnpackConfig,
    /// `[releases]`: retention.
    pub releases: ReleasesConfig,
    /// `[containers]`: the container stage.
    pub containers: ContainersConfig,
    /// `[report]`: EC2 tags and metrics.
    pub report: ReportConfig,
    /// `[triggers]`: polling and trigger files.
    pub triggers: TriggersConfig,
    /// `[daemon]`: the daemon itself.
    pub daemon: DaemonConfig,
    /// The file this configuration came from, if any.
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            app: "express-api".into(),
            environment: String::new(),
            state_dir: "/var/lib/deployd".into(),
            runtime_dir: "/run/deployd".into(),
            environment_file: "/etc/deployd/environment".into(),
            source: SourceConfig::default(),
            s3: S3Config::default(),
            unpack: UnpackConfig::default(),
            releases: ReleasesConfig::default(),
            containers: ContainersConfig::default(),
            report: ReportConfig::default(),
            triggers: TriggersConfig::default(),
            daemon: DaemonConfig::default(),
            path: None,
        }
    }
}

impl Config {
    /// Loads the configuration: `explicit` (from `--config` / `DEPLOYD_CONFIG`) must exist; the
    /// default path may be absent, which means all defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, required) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                tracing::debug!(path = %path.display(), "no config file, using defaults");
                let cfg = Config::default();
                cfg.validate()?;
                return Ok(cfg);
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let mut cfg = Self::parse(&text, &path)?;
        cfg.path = Some(path);
        Ok(cfg)
    }

    /// Parses and validates configuration text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
        cfg.path = Some(path.to_path_buf());
        cfg.validate()?;
        Ok(cfg)
    }

    fn invalid(&self, key: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self
                .path
                .clone()
                .unwrap_or_else(|| PathBuf::from("(defaults)")),
            key,
            message: message.into(),
        }
    }

    /// Checks the values serde cannot: names, ranges, relative paths, URLs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.app.is_empty()
            || !self
                .app
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(self.invalid(
                "app",
                format!(
                    "{:?} must be a non-empty name of letters, digits, '-', '_' or '.'",
                    self.app
                ),
            ));
        }
        if !self.environment.is_empty() && !crate::contract::keys::is_segment(&self.environment) {
            return Err(self.invalid(
                "environment",
                format!(
                    "{:?} must be a name of letters, digits, '-', '_' or '.'",
                    self.environment
                ),
            ));
        }
        for (key, dir) in [
            ("state_dir", &self.state_dir),
            ("runtime_dir", &self.runtime_dir),
            ("environment_file", &self.environment_file),
        ] {
            if !dir.is_absolute() {
                return Err(
                    self.invalid(key, format!("{} must be an absolute path", dir.display()))
                );
            }
        }
        let pointer_key = self.source.pointer_key.as_deref().unwrap_or("");
        if !self.source.key.is_empty() && !pointer_key.is_empty() {
            return Err(self.invalid(
                "source.pointer_key",
                "and `source.key` cannot both be set: set `key` to stay on one artifact or `pointer_key` to follow a release pointer",
            ));
        }
        if self.source.bucket.is_empty() != (self.source.key.is_empty() && pointer_key.is_empty()) {
            return Err(self.invalid(
                "source.bucket",
                "and `source.key` (or `source.pointer_key`) must be set together (or all left empty)",
            ));
        }
        if let Err(e) = self.source.trusted_keys() {
            return Err(self.invalid("source.public_key", e));
        }
        if !self.source.max_pointer_age.0.is_zero() && self.source.public_key.is_none() {
            return Err(self.invalid(
                "source.max_pointer_age",
                "needs `source.public_key`: an unsigned pointer's age is whatever its writer says",
            ));
        }
        if let Some(b) = self
            .source
            .allowed_buckets
            .iter()
            .find(|b| !crate::s3::is_bucket_name(b))
        {
            return Err(self.invalid(
                "source.allowed_buckets",
                format!("entry {b:?} is not an S3 bucket name"),
            ));
        }
        if let Some(owner) = &self.s3.expected_bucket_owner
            && !crate::s3::is_account_id(owner)
        {
            return Err(self.invalid(
                "s3.expected_bucket_owner",
                format!("{owner:?} is not an AWS account id (12 digits)"),
            ));
        }
        if self.source.max_artifact_size.0 == 0 {
            return Err(self.invalid("source.max_artifact_size", "must be greater than zero"));
        }
        if self.unpack.max_entries == 0 {
            return Err(self.invalid("unpack.max_entries", "must be greater than zero"));
        }
        if self.unpack.max_bytes.0 == 0 {
            return Err(self.invalid("unpack.max_bytes", "must be greater than zero"));
        }
        if self.unpack.max_path_len < 16 {
            return Err(self.invalid("unpack.max_path_len", "must be at least 16"));
        }
        if self.releases.keep < 2 {
            return Err(self.invalid(
                "releases.keep",
                "must be at least 2 (the serving release and the previous good one)",
            ));
        }
        let compose = Path::new(&self.containers.compose_file);
        if compose.is_absolute()
            || compose
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(self.invalid(
                "containers.compose_file",
                "must be a path relative to the release, without `..`",
            ));
        }
        for p in &self.containers.clear_paths {
            let path = Path::new(p);
            if p.is_empty()
                || path.is_absolute()
                || path
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(self.invalid(
                    "containers.clear_paths",
                    format!("entry {p:?} must be a relative path inside the release, without `..`"),
                ));
            }
        }
        self.validate_containers()?;
        if !(1..=20).contains(&self.s3.attempts) {
            return Err(self.invalid("s3.attempts", "must be between 1 and 20"));
        }
        for (key, value) in [
            ("s3.connect_timeout", self.s3.connect_timeout),
            ("s3.read_timeout", self.s3.read_timeout),
            ("s3.download_deadline", self.s3.download_deadline),
            ("containers.engine_wait", self.containers.engine_wait),
            ("containers.engine_timeout", self.containers.engine_timeout),
            ("containers.build_timeout", self.containers.build_timeout),
        ] {
            if value.0.is_zero() {
                return Err(self.invalid(key, "must be greater than zero"));
            }
        }
        if let Some(url) = &self.s3.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(self.invalid(
                "s3.endpoint_url",
                format!("{url:?} must start with http:// or https://"),
            ));
        }
        if let Some(url) = &self.report.ec2_endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(self.invalid(
                "report.ec2_endpoint_url",
                format!("{url:?} must start with http:// or https://"),
            ));
        }
        if let Err(message) = check_tag_prefix(&self.report.tag_prefix) {
            return Err(self.invalid("report.tag_prefix", message));
        }
        if let Some(file) = &self.report.metrics_file
            && (!file.is_absolute() || file.file_name().is_none())
        {
            return Err(self.invalid(
                "report.metrics_file",
                format!("{} must be an absolute path to a file", file.display()),
            ));
        }
        if !self.triggers.trusted_group.is_empty() {
            self.trusted_gid()?;
        }
        Ok(())
    }

    /// `[containers]` values serde cannot check: capability names, object names, limits.
    fn validate_containers(&self) -> Result<(), ConfigError> {
        let c = &self.containers;
        if let Some(cap) = c
            .cap_drop
            .iter()
            .find(|n| normalize_capability(n).is_none())
        {
            return Err(self.invalid(
                "containers.cap_drop",
                format!("{cap:?} is not a Linux capability (for example \"NET_RAW\", or \"ALL\")"),
            ));
        }
        if let Some(name) = c.allowed_external.iter().find(|n| {
            let mut chars = n.chars();
            matches!(n.as_str(), "host" | "none")
                || !matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
                || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        }) {
            return Err(self.invalid(
                "containers.allowed_external",
                format!("{name:?} must be a plain volume or network name (not host, none, container:..., or a path)"),
            ));
        }
        if let Some(p) = c
            .profiles
            .iter()
            .find(|p| p.is_empty() || p.contains([',', ' ']))
        {
            return Err(self.invalid(
                "containers.profiles",
                format!("{p:?} must be a profile name without spaces or commas"),
            ));
        }
        if c.pids_limit < 1 {
            return Err(self.invalid("containers.pids_limit", "must be at least 1"));
        }
        Ok(())
    }

    /// Every path under `state_dir` and `runtime_dir`.
    pub fn paths(&self) -> crate::contract::host::Paths {
        crate::contract::host::Paths::new(&self.state_dir, &self.runtime_dir)
    }

    /// The numeric id of `[triggers] trusted_group`, if one is configured.
    pub fn trusted_gid(&self) -> Result<Option<u32>, ConfigError> {
        let name = &self.triggers.trusted_group;
        if name.is_empty() {
            return Ok(None);
        }
        match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Ok(Some(g.gid.as_raw())),
            Ok(None) => Err(self.invalid(
                "triggers.trusted_group",
                format!("names group {name:?}, which does not exist on this host"),
            )),
            Err(e) => Err(self.invalid(
                "triggers.trusted_group",
                format!("group {name:?} could not be looked up: {e}"),
            )),
        }
    }
}

/// Linux capabilities, as Docker names them (without `CAP_`).
const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
];

/// A capability name as Docker wants it (`net_raw`, `CAP_NET_RAW` → `NET_RAW`; `ALL`), or
/// `None` when it is not one.
pub fn normalize_capability(name: &str) -> Option<String> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    (bare == "ALL" || CAPABILITIES.contains(&bare)).then(|| bare.to_string())
}

/// Checks `[report] tag_prefix`: the prefix plus the longest tag name must be a valid EC2 tag
/// key, including on instances that expose tags in instance metadata (no spaces, no `/`).
fn check_tag_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Err("must not be empty (deployd would overwrite tags such as `status`)".into());
    }
    if prefix.to_ascii_lowercase().starts_with("aws:") {
        return Err(format!("{prefix:?} starts with `aws:`, which AWS reserves"));
    }
    if prefix.chars().count() + "updated".len() > 128 {
        return Err(format!(
            "{prefix:?} is too long: tag keys are at most 128 characters"
        ));
    }
    if let Some(c) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "+-=.,_:@".contains(*c)))
    {
        return Err(format!(
            "{prefix:?} contains {c:?}: use letters, digits and + - = . , _ : @"
        ));
    }
    Ok(())
}

/// Turns a TOML error into one line naming the file, the line and (where it can be found) the
/// dotted key, rather than the multi-line snippet `toml` prints.
fn toml_error(path: &Path, text: &str, err: &toml::de::Error) -> ConfigError {
    let offset = err.span().map(|s| s.start).unwrap_or(0).min(text.len());
    let line_no = text[..offset].matches('\n').count() + 1;
    let mut table = String::new();
    let mut key = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if i + 1 > line_no {
            break;
        }
        if trimmed.starts_with('[') {
            table = trimmed
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
            key = None;
        }
        if i + 1 == line_no
            && let Some((k, _)) = trimmed.split_once('=')
        {
            let k = k.trim().trim_matches('"');
            key = Some(if table.is_empty() {
                k.to_string()
            } else {
                format!("{table}.{k}")
            });
        }
    }
    ConfigError::Parse {
        path: path.to_path_buf(),
        line: line_no,
        key,
        message: err.message().trim().replace('\n', " "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/deployd/deployd.toml"))
    }

    #[test]
    fn defaults_match_the_design() {
        let c = parse("").unwrap();
        assert_eq!(c.app, "express-api");
        assert_eq!(c.source.wait_for_artifact.0, Duration::from_secs(300));
        assert_eq!(c.source.max_artifact_size.0, 4 << 30);
        assert_eq!(c.unpack.max_bytes.0, 16 << 30);
        assert_eq!(c.releases.keep, 5);
        assert_eq!(c.containers.health_timeout.0, Duration::from_secs(120));
        assert_eq!(c.triggers.poll_interval.0, Duration::ZERO);
    }

    #[test]
    fn one_or_several_public_keys() {
        let a = minisign::KeyPair::generate_unencrypted_keypair()
            .unwrap()
            .pk
            .to_base64();
        let b = minisign::KeyPair::generate_unencrypted_keypair()
            .unwrap()
            .pk
            .to_base64();
        let one = parse(&format!("[source]\npublic_key = \"{a}\"\n")).unwrap();
        assert_eq!(one.source.trusted_keys().unwrap().unwrap().len(), 1);
        let two = parse(&format!(
            "[source]\npublic_key = [\"{a}\", \"{b}\"]\nmax_pointer_age = \"7d\"\n"
        ))
        .unwrap();
        assert_eq!(two.source.trusted_keys().unwrap().unwrap().len(), 2);
        let msg = parse(&format!("[source]\npublic_key = [\"{a}\", \"RWQx\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("entry 2"), "{msg}");
        assert!(parse("").unwrap().source.trusted_keys().unwrap().is_none());
    }

    #[test]
    fn unknown_key_names_the_key_and_line() {
        let err = parse("app = \"x\"\n[source]\nbukket = \"b\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("source.bukket"), "{msg}");
        assert_eq!(err.exit_code(), 78);
    }

    #[test]
    fn bad_duration_and_size_are_named() {
        for (toml, key, why) in [
            (
                "[source]\nwait_for_artifact = \"5 parsecs\"\n",
                "source.wait_for_artifact",
                "invalid duration",
            ),
            (
                "[unpack]\nmax_bytes = \"lots\"\n",
                "unpack.max_bytes",
                "invalid size",
            ),
        ] {
            let msg = parse(toml).unwrap_err().to_string();
            assert!(msg.contains(key) && msg.contains(why), "{msg}");
        }
        let c = parse("[unpack]\nmax_bytes = \"512MiB\"\nmax_entries = 10\n").unwrap();
        assert_eq!(c.unpack.max_bytes.0, 512 << 20);
    }

    #[test]
    fn values_are_validated() {
        for (text, key) in [
            ("app = \"a b\"", "app"),
            ("state_dir = \"relative\"", "state_dir"),
            ("[source]\nbucket = \"b\"", "source.bucket"),
            ("[releases]\nkeep = 1", "releases.keep"),
            (
                "[containers]\ncompose_file = \"../x.yml\"",
                "containers.compose_file",
            ),
            ("[s3]\nendpoint_url = \"127.0.0.1:9000\"", "s3.endpoint_url"),
            ("[s3]\nattempts = 0", "s3.attempts"),
            ("[s3]\nread_timeout = \"0s\"", "s3.read_timeout"),
            (
                "[containers]\nbuild_timeout = \"0s\"",
                "containers.build_timeout",
            ),
            ("[report]\ntag_prefix = \"aws:x\"", "report.tag_prefix"),
            ("[report]\ntag_prefix = \"my app/\"", "report.tag_prefix"),
            ("[report]\nmetrics_file = \"x.prom\"", "report.metrics_file"),
            (
                "[report]\nec2_endpoint_url = \"localhost:5000\"",
                "report.ec2_endpoint_url",
            ),
            (
                "[triggers]\ntrusted_group = \"no-such-group-deployd\"",
                "triggers.trusted_group",
            ),
            (
                "[containers]\ncap_drop = [\"NET_RAWR\"]",
                "containers.cap_drop",
            ),
            (
                "[containers]\nallowed_external = [\"container:db\"]",
                "containers.allowed_external",
            ),
            (
                "[containers]\nallowed_external = [\"host\"]",
                "containers.allowed_external",
            ),
            ("[containers]\nprofiles = [\"a,b\"]", "containers.profiles"),
            ("[containers]\npids_limit = 0", "containers.pids_limit"),
            ("[source]\npublic_key = []", "source.public_key"),
            ("[source]\npublic_key = [\"RWQnope\"]", "source.public_key"),
            (
                "[source]\nmax_pointer_age = \"1d\"",
                "source.max_pointer_age",
            ),
            (
                "[source]\nallowed_buckets = [\"Not_A_Bucket\"]",
                "source.allowed_buckets",
            ),
            (
                "[s3]\nexpected_bucket_owner = \"1234\"",
                "s3.expected_bucket_owner",
            ),
        ] {
            let msg = parse(text).unwrap_err().to_string();
            assert!(msg.contains(key), "{text:?} gave {msg}");
        }
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_tag_prefix("deployd:").is_ok());
        assert!(check_tag_prefix("acme.deployd-").is_ok());
        for bad in [
            "",
            "aws:deployd:",
            "AWS:x",
            "with space",
            "a/b",
            &"x".repeat(125),
        ] {
            assert!(check_tag_prefix(bad).is_err(), "{bad:?} accepted");
        }
    }
}
