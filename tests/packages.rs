//! The `.deb` and `.rpm` packages, built from the debug binary that `cargo test` has just
//! built (no second release build): file lists, modes, conffiles and scriptlets, and a real
//! install, reinstall, removal and purge of the `.deb` with `dpkg --root` into a scratch root,
//! which runs the maintainer scripts there. A missing tool fails the test when `CI` is set and
//! skips it otherwise; `packaging/check.sh --install-deps` installs them.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

#[path = "support/packaging.rs"]
mod support;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::*;

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
    generate_assets(&bin);
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
    let generated = generated_paths("/usr/share/zsh/vendor-completions");
    let generated = generated.iter().map(|p| (format!(".{p}"), "-rw-r--r--"));
    for (path, perms) in [
        ("./usr/bin/deployd".to_string(), "-rwxr-xr-x"),
        (
            "./usr/lib/systemd/system/deployd.service".into(),
            "-rw-r--r--",
        ),
        ("./usr/lib/tmpfiles.d/deployd.conf".into(), "-rw-r--r--"),
        ("./etc/deployd/deployd.toml".into(), "-rw-r--r--"),
    ]
    .into_iter()
    .chain(generated)
    {
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
    assert_installed_docs_work(&root);
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

/// The installed man page is a gzipped page for `deployd` listing the commands, and bash
/// loads the installed completion for `deployd`.
fn assert_installed_docs_work(root: &Path) {
    let gz = fs::read(root.join("usr/share/man/man1/deployd.1.gz")).expect("read the man page");
    let mut page = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut page)
        .expect("the man page is gzip");
    assert!(page.contains(".TH deployd 1"), "{page}");
    assert!(
        page.contains("deployd\\-releases"),
        "the page lists the commands:\n{page}"
    );
    if !have("bash", &["--version"]) {
        return;
    }
    let completion = root.join("usr/share/bash-completion/completions/deployd");
    let spec = stdout(&run(Command::new("bash")
        .arg("-c")
        .arg("source \"$1\" && complete -p deployd")
        .arg("bash")
        .arg(&completion)));
    assert!(spec.contains("deployd"), "bash completion spec: {spec}");
}

#[test]
fn rpm_package_has_files_config_flags_and_scriptlets() {
    if !have(&cargo(), &["generate-rpm", "--version"]) || !have("rpm", &["--version"]) {
        return;
    }
    let bin = deployd_binary();
    generate_assets(&bin);
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
    let generated = generated_paths("/usr/share/zsh/site-functions");
    for (path, perms) in [
        ("/usr/bin/deployd", "-rwxr-xr-x"),
        ("/usr/lib/systemd/system/deployd.service", "-rw-r--r--"),
        ("/usr/lib/tmpfiles.d/deployd.conf", "-rw-r--r--"),
        ("/etc/deployd/deployd.toml", "-rw-r--r--"),
    ]
    .into_iter()
    .chain(generated.iter().map(|p| (p.as_str(), "-rw-r--r--")))
    {
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
