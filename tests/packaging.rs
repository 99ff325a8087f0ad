//! Packaging and boot files: the systemd unit, tmpfiles configuration,
//! cloud-init user data, launch and maintainer scripts, the default config
//! file, and the `.deb` / `.rpm` packages built from them.
//!
//! These tests do not link the deployd library; they run the tools a
//! distribution or an operator would run on the files (`systemd-analyze`,
//! `systemd-tmpfiles`, `cloud-init schema`, `bash -n`, `shellcheck`,
//! `cargo deb`, `cargo generate-rpm`, `dpkg`, `rpm`). The packages are built
//! from the debug binary that `cargo test` has just built (no second release
//! build), and the `.deb` is really installed, reinstalled, removed and
//! purged with `dpkg --root` into a scratch root, which runs the maintainer
//! scripts there.
//!
//! A missing tool fails the test when the `CI` environment variable is set
//! and skips it with a printed reason otherwise; `packaging/check.sh
//! --install-deps` installs all of them.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

#[path = "support/packaging.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

// ---------------------------------------------------------------- unit file

/// The unit with `ExecStart=` pointing at the binary this test run built.
///
/// `systemd-analyze verify` checks that the executable exists, and
/// /usr/bin/deployd does not exist on a build machine. Rather than skip that
/// check, the copy points it at the real binary, whose arguments (`run`)
/// are unchanged; every other line is verified as shipped.
fn unit_for_verification(dir: &Path) -> PathBuf {
    let unit = fs::read_to_string(repo().join("systemd/deployd.service"))
        .expect("read systemd/deployd.service");
    let exec_start = "ExecStart=/usr/bin/deployd run";
    assert_eq!(
        unit.lines().filter(|l| l.trim() == exec_start).count(),
        1,
        "systemd/deployd.service must contain exactly one `{exec_start}` line"
    );
    let bin = deployd_binary();
    let rewritten = unit.replace(exec_start, &format!("ExecStart={} run", bin.display()));
    let path = dir.join("deployd.service");
    fs::write(&path, rewritten).expect("write unit copy");
    path
}

/// `[Section] Key=value` settings of a unit file, values of repeated keys joined by
/// "\n".
fn unit_settings(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a unit setting: {line}"));
        map.entry(format!("{section}.{}", k.trim()))
            .and_modify(|old: &mut String| {
                old.push('\n');
                old.push_str(v.trim());
            })
            .or_insert_with(|| v.trim().to_string());
    }
    map
}

#[test]
fn unit_declares_the_service_contract() {
    let text = fs::read_to_string(repo().join("systemd/deployd.service")).expect("read unit");
    let s = unit_settings(&text);
    let expect = [
        ("Service.Type", "notify"),
        ("Service.ExecStart", "/usr/bin/deployd run"),
        ("Service.ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Service.Restart", "on-failure"),
        ("Service.RestartPreventExitStatus", "78"),
        ("Service.EnvironmentFile", "-/etc/deployd/environment"),
        ("Service.StateDirectory", "deployd"),
        ("Service.RuntimeDirectory", "deployd"),
        ("Service.RuntimeDirectoryPreserve", "yes"),
        ("Service.ProtectSystem", "strict"),
        ("Service.NoNewPrivileges", "yes"),
        ("Service.UMask", "0027"),
        ("Install.WantedBy", "multi-user.target"),
    ];
    for (key, want) in expect {
        assert_eq!(
            s.get(key).map(String::as_str),
            Some(want),
            "{key} in systemd/deployd.service"
        );
    }
    for key in ["Unit.After", "Unit.Wants"] {
        let v = s.get(key).unwrap_or_else(|| panic!("{key} missing"));
        for dep in ["network-online.target", "docker.service"] {
            assert!(
                v.split_whitespace().any(|d| d == dep),
                "{key} lacks {dep}: {v}"
            );
        }
    }
    // The daemon drains for 30 s on SIGTERM; systemd must wait longer.
    let stop = s.get("Service.TimeoutStopSec").expect("TimeoutStopSec");
    let secs: u64 = stop
        .trim_end_matches('s')
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        secs > 30,
        "TimeoutStopSec={stop} leaves no room for the 30 s graceful stop"
    );
    assert!(s.contains_key("Service.WatchdogSec"), "WatchdogSec missing");
    // Bounded resources, with room above the measured peak (systemd/deployd.service).
    for key in [
        "Service.MemoryHigh",
        "Service.MemoryMax",
        "Service.TasksMax",
    ] {
        assert!(s.contains_key(key), "{key} missing");
    }
    let mib = |key: &str| -> u64 {
        let v = &s[key];
        v.trim_end_matches('M')
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v} in MiB (NNNM)"))
    };
    assert!(mib("Service.MemoryHigh") >= 128, "MemoryHigh too tight");
    assert!(mib("Service.MemoryMax") > mib("Service.MemoryHigh"));
    assert!(
        s.contains_key("Service.TimeoutStartSec"),
        "TimeoutStartSec missing"
    );
    // Binding the socket file would pin the inode that exists at start.
    assert!(
        !s.get("Service.ReadWritePaths")
            .is_some_and(|v| v.contains("docker.sock")),
        "docker.sock must not be bind-mounted with ReadWritePaths="
    );
}

#[test]
fn unit_passes_systemd_analyze_verify_without_warnings() {
    if !have("systemd-analyze", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_for_verification(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze verify");
    let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    println!("systemd-analyze verify: {} {text}", out.status);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    assert!(
        text.trim().is_empty(),
        "systemd-analyze verify printed warnings:\n{text}"
    );
}

#[test]
fn unit_exposure_level_is_at_most_five() {
    if !have("systemd-analyze", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_for_verification(dir.path());
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit));
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for deployd.service:"))
        .unwrap_or_else(|| panic!("no exposure level in systemd-analyze security output:\n{text}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the exposure level from {line:?}"));
    println!("exposure level of deployd.service: {score:.1} (limit {MAX_EXPOSURE:.1})");
    for finding in text.lines().filter(|l| l.starts_with('✗')) {
        println!(
            "  {}",
            finding.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    assert!(
        score <= MAX_EXPOSURE,
        "deployd.service exposure level {score} is above {MAX_EXPOSURE}:\n{text}"
    );
}

#[test]
fn tmpfiles_create_the_trigger_and_state_directories() {
    if !have("systemd-tmpfiles", &["--version"]) {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let conf_dir = root.path().join("usr/lib/tmpfiles.d");
    fs::create_dir_all(&conf_dir).expect("mkdir tmpfiles.d");
    fs::copy(
        repo().join("systemd/deployd.tmpfiles"),
        conf_dir.join("deployd.conf"),
    )
    .expect("copy tmpfiles");
    run(Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .args(["--create", "deployd.conf"]));
    for (path, want) in [
        ("run/deployd", 0o755),
        ("run/deployd/triggers", 0o750),
        ("var/lib/deployd", 0o750),
        ("var/lib/deployd/releases", 0o750),
        ("var/lib/deployd/staging", 0o700),
    ] {
        let p = root.path().join(path);
        assert!(p.is_dir(), "/{path} was not created");
        assert_eq!(mode(&p), want, "mode of /{path}: {:o}", mode(&p));
    }
}

// --------------------------------------------------------- config file

/// Documented defaults of every config key (`table.key` → TOML value).
const DEFAULTS: &[(&str, &str)] = &[
    ("app", "\"express-api\""),
    ("environment", "\"\""),
    ("state_dir", "\"/var/lib/deployd\""),
    ("runtime_dir", "\"/run/deployd\""),
    ("environment_file", "\"/etc/deployd/environment\""),
    ("source.bucket", "\"\""),
    ("source.key", "\"\""),
    (
        "source.legacy_bucket",
        "\"macro-ai-deployment-artifacts-{account_id}\"",
    ),
    (
        "source.legacy_key",
        "\"express-api/pr-{pr_number}/express-api-deployment.tar.gz\"",
    ),
    ("source.wait_for_artifact", "\"5m\""),
    ("source.max_artifact_size", "\"4GiB\""),
    ("source.required_metadata", "[]"),
    ("source.allowed_buckets", "[]"),
    ("source.max_pointer_age", "\"0s\""),
    ("s3.force_path_style", "false"),
    ("s3.attempts", "5"),
    ("s3.connect_timeout", "\"5s\""),
    ("s3.read_timeout", "\"30s\""),
    ("s3.download_deadline", "\"1h\""),
    ("unpack.max_entries", "200000"),
    ("unpack.max_bytes", "\"16GiB\""),
    ("unpack.max_path_len", "4096"),
    ("unpack.keep_group_world_write", "false"),
    ("releases.keep", "5"),
    ("containers.enabled", "true"),
    ("containers.compose_file", "\"docker-compose.yml\""),
    ("containers.health_timeout", "\"120s\""),
    (
        "containers.clear_paths",
        "[\".next\", \".turbo\", \"__pycache__\"]",
    ),
    ("containers.profiles", "[]"),
    ("containers.allowed_external", "[]"),
    (
        "containers.cap_drop",
        "[\"AUDIT_WRITE\", \"MKNOD\", \"NET_RAW\", \"SETFCAP\"]",
    ),
    ("containers.pids_limit", "4096"),
    ("containers.engine_wait", "\"120s\""),
    ("containers.engine_timeout", "\"5m\""),
    ("containers.build_timeout", "\"1h\""),
    ("report.ec2_tags", "true"),
    ("report.tag_prefix", "\"deployd:\""),
    ("triggers.poll_interval", "\"0s\""),
    ("triggers.idle_poll_interval", "\"0s\""),
    ("triggers.trusted_group", "\"\""),
];

/// Keys without a default, shown as indented examples.
const EXAMPLES: &[&str] = &[
    "source.public_key",
    "source.pointer_key",
    "s3.region",
    "s3.endpoint_url",
    "s3.expected_bucket_owner",
    "report.metrics_file",
    "report.ec2_endpoint_url",
];

#[test]
fn default_config_lists_every_key_with_its_default_and_sets_nothing() {
    let text = fs::read_to_string(repo().join("packaging/deployd.toml"))
        .expect("read packaging/deployd.toml");
    let mut table = String::new();
    let mut defaults = BTreeMap::new();
    let mut examples = Vec::new();
    for line in text.lines() {
        assert!(
            line.is_empty() || line.starts_with('#'),
            "packaging/deployd.toml must set nothing, but has {line:?}"
        );
        if let Some(t) = line.strip_prefix("# [").and_then(|r| r.strip_suffix(']')) {
            table = format!("{t}.");
        } else if let Some(rest) = line.strip_prefix("#   ") {
            if let Some((k, _)) = rest.split_once(" = ") {
                examples.push(format!("{table}{k}"));
            }
        } else if let Some((k, v)) = line.strip_prefix("# ").and_then(|r| r.split_once(" = "))
            && !k.contains(' ')
        {
            let prev = defaults.insert(format!("{table}{k}"), v.to_string());
            assert!(prev.is_none(), "{table}{k} appears twice");
        }
    }
    let want: BTreeMap<String, String> = DEFAULTS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(defaults, want, "defaults in packaging/deployd.toml");
    assert_eq!(examples, EXAMPLES, "examples in packaging/deployd.toml");
}

// ------------------------------------------------------ cloud-init, scripts

#[test]
fn instance_examples_require_signed_releases() {
    // The stock-image, Lightsail and AMI examples set [source] public_key; the EC2 user data
    // for the AMI relies on the key the image carries, and says so.
    for path in [
        "cloud-init/bootstrap-from-s3.yaml",
        "cloud-init/lightsail-launch.sh",
        "packaging/ami/deployd.pkr.hcl",
    ] {
        let text = fs::read_to_string(repo().join(path)).expect("read example");
        assert!(
            text.contains("public_key = \\\"") || text.contains("public_key = \""),
            "{path} must configure [source] public_key"
        );
        assert!(
            text.contains("[source]"),
            "{path}: public_key belongs in [source]"
        );
    }
    let ec2 = fs::read_to_string(repo().join("cloud-init/ec2-user-data.yaml")).expect("read");
    assert!(
        ec2.contains("variable public_key"),
        "ec2-user-data.yaml must name the image's key"
    );
}

/// Files in `dir` whose first line is `first`.
fn files_starting_with(dir: &Path, first: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            fs::read_to_string(p)
                .ok()
                .and_then(|t| t.lines().next().map(|l| l.trim_end() == first))
                .unwrap_or(false)
        })
        .collect();
    found.sort();
    found
}

/// Python that prints, for a cloud-config file, `runcmd-snippet <path>` for
/// each shell string in runcmd (written to files in argv[2]) and
/// `file <path> <permissions> <owner>` for each write_files entry.
const CLOUD_CONFIG_DUMP: &str = r##"
import os, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
for i, cmd in enumerate(doc.get("runcmd") or []):
    if isinstance(cmd, str):
        p = os.path.join(sys.argv[2], "runcmd-%d.sh" % i)
        open(p, "w").write(cmd)
        print("runcmd-snippet", p)
    else:
        print("runcmd-argv", " ".join(cmd))
for f in doc.get("write_files") or []:
    print("file", f["path"], f.get("permissions", "-"), f.get("owner", "-"))
    if f["path"] == "/etc/deployd/environment":
        keys = [l.split("=", 1)[0] for l in f["content"].splitlines() if "=" in l and not l.startswith("#")]
        print("envkeys", " ".join(keys))
"##;

#[test]
fn cloud_config_files_pass_the_cloud_init_schema() {
    if !have("cloud-init", &["--version"]) || !have("python3", &["-c", "import yaml"]) {
        return;
    }
    let dir = repo().join("cloud-init");
    let configs = files_starting_with(&dir, "#cloud-config");
    assert!(
        configs.len() >= 2,
        "expected the cloud-config files in cloud-init/, found {configs:?}"
    );
    let shellcheck = shellcheck_available();
    for cfg in &configs {
        let out = run(Command::new("cloud-init")
            .args(["schema", "--config-file"])
            .arg(cfg));
        println!("{}", stdout(&out).trim());

        let snippets = tempfile::tempdir().expect("tempdir");
        let dump = stdout(&run(Command::new("python3")
            .args(["-c", CLOUD_CONFIG_DUMP])
            .arg(cfg)
            .arg(snippets.path())));
        let env_file = dump
            .lines()
            .find(|l| l.starts_with("file /etc/deployd/environment "))
            .unwrap_or_else(|| panic!("{} does not write /etc/deployd/environment", cfg.display()));
        assert_eq!(
            env_file,
            "file /etc/deployd/environment 0600 root:root",
            "{}: the environment file must be root-only",
            cfg.display()
        );
        let keys = dump
            .lines()
            .find_map(|l| l.strip_prefix("envkeys "))
            .unwrap_or_default();
        for key in ["DEPLOYMENT_BUCKET", "DEPLOYMENT_KEY"] {
            assert!(
                keys.split(' ').any(|k| k == key),
                "{}: environment lacks {key}",
                cfg.display()
            );
        }
        assert!(
            dump.lines()
                .any(|l| l.starts_with("runcmd-argv deployd status --wait")),
            "{}: runcmd must wait with `deployd status --wait`",
            cfg.display()
        );
        for snippet in dump
            .lines()
            .filter_map(|l| l.strip_prefix("runcmd-snippet "))
        {
            run(Command::new("sh").arg("-n").arg(snippet));
            if shellcheck {
                run(Command::new("shellcheck").args(["-s", "sh"]).arg(snippet));
            }
        }
    }
}

fn shellcheck_available() -> bool {
    have("shellcheck", &["--version"])
}

#[test]
fn shell_scripts_parse_and_pass_shellcheck() {
    let r = repo();
    let mut scripts: Vec<(PathBuf, &str)> = vec![
        (r.join("packaging/debian/postinst"), "sh"),
        (r.join("packaging/debian/prerm"), "sh"),
        (r.join("packaging/debian/postrm"), "sh"),
        (r.join("packaging/rpm/post.sh"), "sh"),
        (r.join("packaging/rpm/preun.sh"), "sh"),
        (r.join("packaging/rpm/postun.sh"), "sh"),
        (r.join("packaging/check.sh"), "bash"),
    ];
    for p in [r.join("packaging/boot-test.sh")] {
        if p.exists() {
            scripts.push((p, "bash"));
        }
    }
    for p in files_starting_with(&r.join("cloud-init"), "#!/bin/bash") {
        scripts.push((p, "bash"));
    }
    assert!(
        scripts
            .iter()
            .any(|(p, _)| p.ends_with("lightsail-launch.sh")),
        "cloud-init/lightsail-launch.sh must start with #!/bin/bash"
    );
    let shellcheck = shellcheck_available();
    for (path, shell) in &scripts {
        assert!(path.is_file(), "{} is missing", path.display());
        run(Command::new(shell).arg("-n").arg(path));
        if shellcheck {
            run(Command::new("shellcheck").args(["-s", shell]).arg(path));
        }
    }
    // Maintainer scripts are executed by dpkg directly.
    for name in ["postinst", "prerm", "postrm"] {
        let p = r.join("packaging/debian").join(name);
        assert_eq!(
            mode(&p) & 0o111,
            0o111,
            "{} must be executable",
            p.display()
        );
    }
}

/// Non-comment lines of a maintainer script that would start the service.
fn lines_that_start_the_service(script: &str) -> Vec<String> {
    script
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.contains("systemctl")
                && (l.contains(" start ")
                    || l.contains("--now")
                    || l.contains(" restart ")
                    || l.contains("reload-or-restart"))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn maintainer_scripts_enable_but_never_start_on_install() {
    let r = repo();
    for path in [
        r.join("packaging/debian/postinst"),
        r.join("packaging/rpm/post.sh"),
    ] {
        let text = fs::read_to_string(&path).expect("read script");
        assert!(
            text.contains("daemon-reload"),
            "{} must reload systemd",
            path.display()
        );
        assert!(
            text.contains("enable"),
            "{} must enable the unit",
            path.display()
        );
        assert_eq!(
            lines_that_start_the_service(&text),
            Vec::<String>::new(),
            "{} must not start deployd on install",
            path.display()
        );
    }
    for path in [
        r.join("packaging/debian/prerm"),
        r.join("packaging/rpm/preun.sh"),
    ] {
        let text = fs::read_to_string(&path).expect("read script");
        for word in ["stop", "disable"] {
            assert!(
                text.contains(&format!(" {word} ")),
                "{} must {word} the unit",
                path.display()
            );
        }
    }
}
