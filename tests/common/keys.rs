//! minisign key pairs as people make them: with the `minisign` command line, unencrypted
//! (`minisign -G -W`) or protected by a password. A test that needs the command line skips
//! when it is missing, and fails when `CI` is set (`scripts/test` installs it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

/// A key pair on disk.
#[derive(Debug, Clone)]
pub struct Keys {
    /// The secret key file, for `publish --sign`.
    pub secret: PathBuf,
    /// The `RWQ...` public key, for `[source] public_key`.
    pub public: String,
    /// The secret key's password, if it has one (`DEPLOYD_SIGN_PASSWORD`).
    pub password: Option<String>,
    /// The directory holding the files, when the keys own it (removed with the last clone).
    pub dir: Option<Arc<tempfile::TempDir>>,
}

impl Keys {
    /// The environment `publish` needs for this key.
    pub fn env(&self) -> Vec<(&'static str, &str)> {
        self.password
            .as_deref()
            .map(|p| ("DEPLOYD_SIGN_PASSWORD", p))
            .into_iter()
            .collect()
    }
}

/// True when the `minisign` command line is installed; panics under `CI` when it is not.
pub fn minisign_cli() -> bool {
    let found = Command::new("minisign")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set and the minisign command line is missing (apt-get install minisign)"
        );
        eprintln!("skipping: the minisign command line is not installed");
    }
    found
}

/// A key pair made by `minisign -G` in a directory of its own: unencrypted (`-W`) without a
/// password. `None` (skip) when the command line is missing outside CI.
pub fn ci_keys(name: &str, password: Option<&str>) -> Option<Keys> {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut keys = cli_keys(dir.path(), name, password)?;
    keys.dir = Some(dir);
    Some(keys)
}

/// A key pair made by `minisign -G` in `dir`: unencrypted (`-W`) without a password. `None`
/// (skip) when the command line is missing outside CI.
pub fn cli_keys(dir: &Path, name: &str, password: Option<&str>) -> Option<Keys> {
    if !minisign_cli() {
        return None;
    }
    let secret = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let mut cmd = Command::new("minisign");
    cmd.args(["-G", "-f", "-p"])
        .arg(&public)
        .arg("-s")
        .arg(&secret);
    if password.is_none() {
        cmd.arg("-W");
    }
    // Without a terminal minisign reads the password (and its confirmation) from stdin.
    let confirm = password.map(|pw| format!("{pw}\n{pw}\n"));
    run_with_input(&mut cmd, confirm.as_deref());
    let text = std::fs::read_to_string(&public).unwrap();
    let first = std::fs::read_to_string(&secret).unwrap();
    assert!(first.contains("secret key"), "{first}");
    Some(Keys {
        secret,
        public: text.lines().nth(1).unwrap().trim().to_string(),
        password: password.map(str::to_string),
        dir: None,
    })
}

/// Runs `cmd` with `input` on its stdin; it must succeed.
fn run_with_input(cmd: &mut Command, input: Option<&str>) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run minisign");
    {
        let mut stdin = child.stdin.take().unwrap();
        if let Some(text) = input {
            stdin.write_all(text.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Signs `file` with the minisign command line, its own way (default trusted comment):
/// a valid signature that carries no deployd release identity.
pub fn cli_sign(keys: &Keys, file: &Path) -> String {
    let sig = file.with_extension("minisig");
    let mut cmd = Command::new("minisign");
    cmd.args(["-S", "-s"])
        .arg(&keys.secret)
        .arg("-m")
        .arg(file)
        .arg("-x")
        .arg(&sig);
    let password = keys.password.as_ref().map(|pw| format!("{pw}\n"));
    run_with_input(&mut cmd, password.as_deref());
    std::fs::read_to_string(sig).unwrap()
}
