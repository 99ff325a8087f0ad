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

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The highest `systemd-analyze security` exposure level accepted for the unit
/// (0 = fully locked down, 10 = unconfined).
const MAX_EXPOSURE: f64 = 5.0;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The binary cargo built for this test run (`target/debug/deployd` for a
/// plain `cargo test`).
fn deployd_binary() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_deployd"));
    assert!(
        bin.is_file(),
        "the deployd binary {} is missing; build it with `cargo build` (cargo test normally does)",
        bin.display()
    );
    bin
}

/// The cargo target directory and profile name that produced `bin`
/// (`<target>/debug/deployd` comes from the `dev` profile).
fn target_dir_and_profile(bin: &Path) -> (PathBuf, String) {
    let profile_dir = bin
        .parent()
        .expect("the binary lives in a profile directory");
    let target_dir = profile_dir
        .parent()
        .expect("the profile directory lives in the target directory");
    let dir_name = profile_dir
        .file_name()
        .and_then(OsStr::to_str)
        .expect("UTF-8 profile directory");
    let profile = if dir_name == "debug" { "dev" } else { dir_name };
    (target_dir.to_path_buf(), profile.to_string())
}

/// The cargo running this test (cargo sets CARGO), else the one on PATH.
fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

fn on_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// True when `program --version` (or the given probe) runs. When it does not,
/// fails the test on CI and returns false (test skipped) elsewhere.
fn have(program: &str, probe: &[&str]) -> bool {
    let ok = Command::new(program)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let msg = format!(
            "`{program} {}` does not run; `packaging/check.sh --install-deps` installs it",
            probe.join(" ")
        );
        if on_ci() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
    }
    ok
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd`, panicking with its output unless it exits 0.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", show(cmd)));
    assert!(
        out.status.success(),
        "`{}` failed with {}\nstdout:\n{}\nstderr:\n{}",
        show(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{} is missing: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

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
    ("s3.force_path_style", "false"),
    ("unpack.max_entries", "200000"),
    ("unpack.max_bytes", "\"16GiB\""),
    ("unpack.max_path_len", "4096"),
    ("releases.keep", "5"),
    ("containers.enabled", "true"),
    ("containers.compose_file", "\"docker-compose.yml\""),
    ("containers.health_timeout", "\"120s\""),
    (
        "containers.clear_paths",
        "[\".next\", \".turbo\", \"__pycache__\"]",
    ),
    ("report.ec2_tags", "true"),
    ("report.tag_prefix", "\"deployd:\""),
    ("triggers.poll_interval", "\"0s\""),
    ("triggers.trusted_group", "\"\""),
];

/// Keys without a default, shown as indented examples.
const EXAMPLES: &[&str] = &[
    "source.public_key",
    "source.pointer_key",
    "s3.region",
    "s3.endpoint_url",
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

// ----------------------------------------------------------------- packages

fn only_file_in(dir: &Path, ext: &str) -> PathBuf {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read output dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one .{ext} in {}, found {found:?}",
        dir.display()
    );
    found.into_iter().next().expect("checked above")
}

fn assert_same_bytes(packaged: &Path, built: &Path) {
    let a = fs::read(packaged).unwrap_or_else(|e| panic!("read {}: {e}", packaged.display()));
    let b = fs::read(built).unwrap_or_else(|e| panic!("read {}: {e}", built.display()));
    assert!(
        a == b,
        "{} ({} bytes) is not the binary this test run built, {} ({} bytes)",
        packaged.display(),
        a.len(),
        built.display(),
        b.len()
    );
}

/// Runs dpkg on a scratch root. `--force-all` lets it ignore the missing
/// dependencies (libc6, ...) and run the maintainer scripts without chroot,
/// with DPKG_ROOT set to the scratch root, which the scripts honour.
fn dpkg_in(root: &Path, args: &[&OsStr]) -> Output {
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-all", "--force-confold"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

#[test]
fn deb_package_installs_enables_and_purges_cleanly() {
    if !have(&cargo(), &["deb", "--version"])
        || !have("dpkg-deb", &["--version"])
        || !have("dpkg", &["--version"])
    {
        return;
    }
    let bin = deployd_binary();
    let (target_dir, profile) = target_dir_and_profile(&bin);
    let work = tempfile::tempdir().expect("tempdir");
    let out_dir = work.path().join("out");
    fs::create_dir_all(&out_dir).expect("mkdir out");
    // --no-build: package the binary cargo test built. --no-strip keeps it
    // byte-identical so the test can tell it is the right one.
    run(Command::new(cargo())
        .current_dir(repo())
        .args([
            "deb",
            "--no-build",
            "--no-strip",
            "--fast",
            "--profile",
            &profile,
            "--output",
        ])
        .arg(&out_dir)
        .env("CARGO_TARGET_DIR", &target_dir));
    let deb = only_file_in(&out_dir, "deb");

    // File list and modes as recorded in the archive.
    let listing = stdout(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)));
    println!("{listing}");
    for (path, perms) in [
        ("./usr/bin/deployd", "-rwxr-xr-x"),
        ("./usr/lib/systemd/system/deployd.service", "-rw-r--r--"),
        ("./usr/lib/tmpfiles.d/deployd.conf", "-rw-r--r--"),
        ("./etc/deployd/deployd.toml", "-rw-r--r--"),
    ] {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .unwrap_or_else(|| panic!("{path} is not in the .deb:\n{listing}"));
        let owner = line.split_whitespace().nth(1).unwrap_or_default();
        assert!(
            line.starts_with(perms) && (owner == "root/root" || owner == "0/0"),
            "{path} must be {perms} root/root: {line}"
        );
    }

    // conffile and maintainer scripts in the control archive.
    let info = stdout(&run(Command::new("dpkg-deb").arg("-I").arg(&deb)));
    println!("{info}");
    let conffiles = stdout(&run(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles")));
    assert_eq!(
        conffiles.trim(),
        "/etc/deployd/deployd.toml",
        "conffiles of the .deb"
    );
    let control = work.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    for name in ["postinst", "prerm", "postrm"] {
        let packaged = control.join(name);
        assert_eq!(
            mode(&packaged) & 0o111,
            0o111,
            "{name} in the .deb must be executable"
        );
        assert_eq!(
            fs::read_to_string(&packaged).expect("read packaged script"),
            fs::read_to_string(repo().join("packaging/debian").join(name)).expect("read script"),
            "{name} in the .deb differs from packaging/debian/{name}"
        );
    }

    // Install into a scratch root: files, modes, tmpfiles, enablement.
    let root = work.path().join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
        "etc/systemd/system",
    ] {
        fs::create_dir_all(root.join(d)).expect("mkdir dpkg admin dir");
    }
    fs::write(root.join("var/lib/dpkg/status"), "").expect("create dpkg status");
    dpkg_in(&root, &["--install".as_ref(), deb.as_os_str()]);

    assert_same_bytes(&root.join("usr/bin/deployd"), &bin);
    for (path, want) in [
        ("usr/bin/deployd", 0o755),
        ("usr/lib/systemd/system/deployd.service", 0o644),
        ("usr/lib/tmpfiles.d/deployd.conf", 0o644),
        ("etc/deployd", 0o755),
        ("etc/deployd/deployd.toml", 0o644),
        ("run/deployd/triggers", 0o750),
        ("var/lib/deployd", 0o750),
        ("var/lib/deployd/staging", 0o700),
    ] {
        assert_eq!(
            mode(&root.join(path)),
            want,
            "mode of /{path} after install: {:o}",
            mode(&root.join(path))
        );
    }
    let wants = root.join("etc/systemd/system/multi-user.target.wants/deployd.service");
    let link = fs::read_link(&wants)
        .unwrap_or_else(|e| panic!("postinst did not enable deployd.service ({e})"));
    assert!(
        link.ends_with("usr/lib/systemd/system/deployd.service"),
        "enablement link points at {}",
        link.display()
    );

    // An edited config survives a reinstall.
    let config = root.join("etc/deployd/deployd.toml");
    let edited = format!(
        "{}\n[report]\nec2_tags = false\n",
        fs::read_to_string(&config).expect("read config")
    );
    fs::write(&config, &edited).expect("edit config");
    fs::write(root.join("var/lib/deployd/state.json"), "{}").expect("write state");
    dpkg_in(&root, &["--install".as_ref(), deb.as_os_str()]);
    assert_eq!(
        fs::read_to_string(&config).expect("read config"),
        edited,
        "reinstall overwrote the edited config"
    );

    // Remove: unit gone and disabled, config and state kept.
    dpkg_in(&root, &["--remove".as_ref(), "deployd".as_ref()]);
    assert!(
        !root.join("usr/bin/deployd").exists(),
        "remove left /usr/bin/deployd"
    );
    assert!(
        !root.join("usr/lib/systemd/system/deployd.service").exists(),
        "remove left the unit"
    );
    assert!(
        fs::symlink_metadata(&wants).is_err(),
        "remove left deployd.service enabled"
    );
    assert!(
        config.exists(),
        "remove deleted the config file (only purge may)"
    );
    assert!(
        root.join("var/lib/deployd/state.json").exists(),
        "remove deleted the state (only purge may)"
    );

    // Reinstalling a removed (not purged) package enables the unit again.
    dpkg_in(&root, &["--install".as_ref(), deb.as_os_str()]);
    assert!(
        fs::symlink_metadata(&wants).is_ok(),
        "reinstall after remove did not enable deployd.service"
    );
    assert_eq!(
        fs::read_to_string(&config).expect("read config"),
        edited,
        "reinstall overwrote the edited config"
    );
    dpkg_in(&root, &["--remove".as_ref(), "deployd".as_ref()]);

    // Purge: state and config gone.
    dpkg_in(&root, &["--purge".as_ref(), "deployd".as_ref()]);
    assert!(
        !root.join("var/lib/deployd").exists(),
        "purge left /var/lib/deployd"
    );
    assert!(
        !root.join("run/deployd").exists(),
        "purge left /run/deployd"
    );
    assert!(!config.exists(), "purge left /etc/deployd/deployd.toml");
}

#[test]
fn rpm_package_has_files_config_flags_and_scriptlets() {
    if !have(&cargo(), &["generate-rpm", "--version"]) || !have("rpm", &["--version"]) {
        return;
    }
    let bin = deployd_binary();
    let (target_dir, profile) = target_dir_and_profile(&bin);
    let work = tempfile::tempdir().expect("tempdir");
    let rpm_file = work.path().join("deployd.rpm");
    run(Command::new(cargo())
        .current_dir(repo())
        .args([
            "generate-rpm",
            "--payload-compress",
            "none",
            "--profile",
            &profile,
            "--target-dir",
        ])
        .arg(&target_dir)
        .arg("--output")
        .arg(&rpm_file));

    let query = |args: &[&str]| {
        stdout(&run(Command::new("rpm")
            .args(["-qp"])
            .args(args)
            .arg(&rpm_file)))
    };

    let files = query(&[
        "--queryformat",
        "[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEFLAGS:fflags} %{FILENAMES}\\n]",
    ]);
    println!("{files}");
    let entry = |path: &str| -> Vec<String> {
        let line = files
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .unwrap_or_else(|| panic!("{path} is not in the .rpm:\n{files}"));
        line.split_whitespace().map(str::to_string).collect()
    };
    for (path, perms) in [
        ("/usr/bin/deployd", "-rwxr-xr-x"),
        ("/usr/lib/systemd/system/deployd.service", "-rw-r--r--"),
        ("/usr/lib/tmpfiles.d/deployd.conf", "-rw-r--r--"),
        ("/etc/deployd/deployd.toml", "-rw-r--r--"),
    ] {
        let e = entry(path);
        assert_eq!(
            (e[0].as_str(), e[1].as_str()),
            (perms, "root"),
            "{path}: {e:?}"
        );
    }
    // c = %config, n = noreplace.
    assert_eq!(
        entry("/etc/deployd/deployd.toml")[2],
        "cn",
        "deployd.toml must be %config(noreplace)"
    );
    let configfiles = query(&["--configfiles"]);
    assert_eq!(
        configfiles.trim(),
        "/etc/deployd/deployd.toml",
        "rpm --configfiles"
    );
    let listed = query(&["-l"]);
    for path in [
        "/usr/bin/deployd",
        "/usr/lib/systemd/system/deployd.service",
        "/usr/lib/tmpfiles.d/deployd.conf",
    ] {
        assert!(
            listed.lines().any(|l| l == path),
            "rpm -qlp lacks {path}:\n{listed}"
        );
    }

    // Scriptlets are exactly packaging/rpm/*.sh.
    let scripts = query(&["--scripts"]);
    println!("{scripts}");
    for (header, file) in [
        ("postinstall scriptlet", "post.sh"),
        ("preuninstall scriptlet", "preun.sh"),
        ("postuninstall scriptlet", "postun.sh"),
    ] {
        let body =
            fs::read_to_string(repo().join("packaging/rpm").join(file)).expect("read scriptlet");
        let start = scripts
            .find(header)
            .unwrap_or_else(|| panic!("no {header} in the .rpm:\n{scripts}"));
        let section = &scripts[start..];
        let section = &section[section.find('\n').map_or(0, |i| i + 1)..];
        assert!(
            section.starts_with(body.trim_end()),
            "{header} differs from packaging/rpm/{file}:\n{section}"
        );
    }

    // The payload's binary is the one this test run built.
    let root = work.path().join("root");
    fs::create_dir_all(&root).expect("mkdir root");
    run(Command::new("rpm")
        .arg(format!("--root={}", root.display()))
        .args(["--initdb"]));
    run(Command::new("rpm")
        .arg(format!("--root={}", root.display()))
        .args(["--install", "--nodeps", "--noscripts", "--nosignature"])
        .arg(&rpm_file));
    assert_same_bytes(&root.join("usr/bin/deployd"), &bin);
    assert_eq!(mode(&root.join("usr/bin/deployd")), 0o755);
    assert_eq!(mode(&root.join("etc/deployd/deployd.toml")), 0o644);
    assert_eq!(
        fs::metadata(root.join("usr/bin/deployd"))
            .expect("stat")
            .uid(),
        0
    );
}
