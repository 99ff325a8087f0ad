//! What the packaging tests share: where the repository and the binary under test are, and
//! running the tools a distribution would run, skipping (or, under CI, failing) when one is
//! missing.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The highest `systemd-analyze security` exposure level accepted for the unit
/// (0 = fully locked down, 10 = unconfined).
pub const MAX_EXPOSURE: f64 = 5.0;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The binary cargo built for this test run (`target/debug/deployd` for a
/// plain `cargo test`).
pub fn deployd_binary() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_deployd"));
    assert!(
        bin.is_file(),
        "the deployd binary {} is missing; build it with `cargo build` (cargo test normally does)",
        bin.display()
    );
    bin
}

/// The man pages and shell completions the packages ship, written by `bin` itself into
/// `<profile directory>/generated` (where Cargo.toml's package assets take them from), once
/// per test process.
pub fn generate_assets(bin: &Path) {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let out = bin
            .parent()
            .expect("the binary lives in a profile directory")
            .join("generated");
        run(Command::new(bin)
            .args(["generate", "all", "--out"])
            .arg(&out));
    });
}

/// What the packages install besides the binary, the unit and the config: the man pages and
/// the completions, by installed path (zsh's directory differs between Debian and Fedora).
pub fn generated_paths(zsh_dir: &str) -> Vec<String> {
    vec![
        "/usr/share/man/man1/deployd.1.gz".into(),
        "/usr/share/man/man1/deployd-deploy.1.gz".into(),
        "/usr/share/man/man1/deployd-releases.1.gz".into(),
        "/usr/share/man/man1/deployd-rollback.1.gz".into(),
        "/usr/share/bash-completion/completions/deployd".into(),
        format!("{zsh_dir}/_deployd"),
        "/usr/share/fish/vendor_completions.d/deployd.fish".into(),
    ]
}

/// The cargo target directory and profile name that produced `bin`
/// (`<target>/debug/deployd` comes from the `dev` profile).
pub fn target_dir_and_profile(bin: &Path) -> (PathBuf, String) {
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
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

pub fn on_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// True when `program --version` (or the given probe) runs. When it does not,
/// fails the test on CI and returns false (test skipped) elsewhere.
pub fn have(program: &str, probe: &[&str]) -> bool {
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

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd`, panicking with its output unless it exits 0.
pub fn run(cmd: &mut Command) -> Output {
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

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{} is missing: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}
