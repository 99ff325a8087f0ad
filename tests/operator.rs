//! What an operator sees: `deployd deploy`'s terminal view, run under a real pseudo-terminal
//! (`script` from util-linux) and read back as a screen (`vt100`), against the structured logs
//! it must leave unchanged without a terminal, with `-v` and with `--log-format json`; and
//! `deployd releases`, the list a rollback target is picked from, against what `status` and
//! `rollback` see.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::os::unix::ffi::OsStrExt;
use std::process::Command;

use common::{Host, Run, app};

const ROWS: u16 = 60;
const COLS: u16 = 160;

/// Single-quotes `arg` for `sh`.
fn quote(arg: &[u8]) -> String {
    format!("'{}'", String::from_utf8_lossy(arg).replace('\'', r"'\''"))
}

/// Runs `deployd ARGS` for `host` under a pseudo-terminal of ROWS×COLS, as a person at a
/// terminal would (no `RUST_LOG`, no journal); returns the exit code, the screen's non-empty
/// lines (a line the terminal wrapped counts once), trailing spaces trimmed, and the raw output.
fn on_terminal(host: &Host, args: &[&str]) -> (i32, Vec<String>, String) {
    let inner = host.command(args);
    let mut line = format!("stty rows {ROWS} cols {COLS}; exec");
    line.push(' ');
    line.push_str(&quote(inner.get_program().as_bytes()));
    for a in inner.get_args() {
        line.push(' ');
        line.push_str(&quote(a.as_bytes()));
    }
    let mut cmd = Command::new("script");
    cmd.args(["--quiet", "--return", "--command", &line, "/dev/null"]);
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .env("TERM", "xterm-256color")
        .env("SHELL", "/bin/sh")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script(1) from util-linux");
    let size = |n: u16| std::num::NonZeroU16::new(n).unwrap();
    let mut screen = vt100::Parser::new(size(ROWS), size(COLS), 0);
    screen.process(&out.stdout);
    let lines: Vec<String> = screen
        .screen()
        .contents()
        .lines()
        .map(|l| l.trim_end().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), lines, raw)
}

fn stage_lines(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.starts_with("  ✓ ") || l.starts_with("  ✗ "))
        .cloned()
        .collect()
}

/// The stage name of a stage line: `  ✓ fetching   0.0s  ...` → `fetching`.
fn stage_of(line: &str) -> String {
    line[6..].split("  ").next().unwrap().trim().to_string()
}

#[test]
fn deploy_in_a_terminal_shows_one_line_per_stage_and_a_summary() {
    let host = Host::new();
    let commit = "1111111a2b3c4d5e6f708192a3b4c5d6e7f80910";
    host.upload("web/v1.tar.gz", &app("v1").gz(), commit);
    let (code, lines, raw) = on_terminal(
        &host,
        &["deploy", "--bucket", &host.bucket, "--key", "web/v1.tar.gz"],
    );
    let screen = lines.join("\n");
    assert_eq!(code, 0, "{screen}\n{raw}");
    let release = host.current().unwrap();

    // One line per stage, in order, each with its duration.
    let stages = stage_lines(&lines);
    let names: Vec<String> = stages.iter().map(|l| stage_of(l)).collect();
    assert_eq!(
        names,
        ["resolving", "verifying", "fetching", "activating"],
        "{screen}"
    );
    for l in &stages {
        assert!(l.starts_with("  ✓ "), "{l}");
        let secs = l[6..]
            .split_whitespace()
            .find(|w| w.ends_with('s'))
            .unwrap();
        assert!(
            secs.trim_end_matches('s').parse::<f64>().is_ok(),
            "a duration on {l:?}"
        );
    }
    assert!(stages[1].contains(&format!("s3://{}/web/v1.tar.gz", host.bucket)));
    assert!(stages[3].contains(&release), "{}", stages[3]);

    // The summary: release, commit, what serves; then the command's own stdout line.
    let summary: Vec<&String> = lines
        .iter()
        .skip_while(|l| !l.starts_with("deployed "))
        .collect();
    assert!(
        summary[0].starts_with(&format!("deployed {release} in ")),
        "{screen}"
    );
    assert_eq!(summary[1].as_str(), format!("  commit    {commit}"));
    assert_eq!(
        summary[2].as_str(),
        format!("  serving   {release} (commit 1111111a)")
    );
    assert_eq!(summary[3].as_str(), format!("deployed release {release}"));
    // Nothing else: no log lines, no leftover bars.
    assert_eq!(lines.len(), 4 + 4, "{screen}");
    assert!(!raw.contains("INFO") && !raw.contains("stage="), "{raw}");

    // A failure: the stage that failed is marked, the summary says what still serves, and the
    // one-sentence error follows.
    let body = app("v2").gz();
    host.s3.put(
        &host.bucket,
        "web/v2.tar.gz",
        &body,
        &[("sha256", &"0".repeat(64)), ("commit-sha", "2222222b")],
    );
    let (code, lines, _) = on_terminal(
        &host,
        &["deploy", "--bucket", &host.bucket, "--key", "web/v2.tar.gz"],
    );
    let screen = lines.join("\n");
    assert_eq!(code, 65, "{screen}");
    let stages = stage_lines(&lines);
    let last = stages.last().unwrap();
    assert!(
        last.starts_with("  ✗ fetching") && last.ends_with("failed"),
        "{screen}"
    );
    assert_eq!(stages.len(), 3, "{screen}");
    let failed = lines
        .iter()
        .position(|l| l.starts_with("failed after "))
        .unwrap();
    assert_eq!(
        lines[failed + 1],
        format!("  serving   {release} (commit 1111111a)")
    );
    assert!(
        lines[failed + 2].starts_with("deployd: error: checksum mismatch"),
        "{screen}"
    );
    assert_eq!(lines.len(), failed + 3, "{screen}");
}

#[test]
fn logs_stay_structured_without_a_terminal_with_v_and_with_json() {
    let host = Host::new();
    host.upload("web/v1.tar.gz", &app("v1").gz(), "1111111a2b3c4d5e");
    let deploy = ["deploy", "--bucket", &host.bucket, "--key", "web/v1.tar.gz"];

    // No terminal (as under systemd without the journal, or piped): today's log lines.
    let mut cmd = host.command(&deploy);
    cmd.env_remove("RUST_LOG").env_remove("JOURNAL_STREAM");
    let run = Run::from(cmd.output().unwrap());
    run.ok();
    assert!(
        run.stderr.contains(" INFO ")
            && run.stderr.contains("stage=\"fetching\"")
            && run.stderr.contains("release activated"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains('✓') && !run.stderr.contains("  serving   "));

    // -v in a terminal: the logs (debug included), no stage lines, no summary.
    let (code, lines, raw) = on_terminal(&host, &[&deploy[..], &["--force", "-v"]].concat());
    assert_eq!(code, 0, "{raw}");
    let text = lines.join("\n");
    assert!(
        text.contains("stage=\"fetching\"") && text.contains("DEBUG"),
        "{text}"
    );
    assert!(stage_lines(&lines).is_empty(), "{}", lines.join("\n"));
    assert!(!lines.iter().any(|l| l.starts_with("  serving   ")));

    // --log-format json in a terminal: one JSON object per log line.
    let (code, lines, raw) = on_terminal(
        &host,
        &[&deploy[..], &["--force", "--log-format", "json"]].concat(),
    );
    assert_eq!(code, 0, "{raw}");
    let events: Vec<serde_json::Value> = raw
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        events.iter().any(|e| e["fields"]["stage"] == "fetching"),
        "{raw}"
    );
    assert!(stage_lines(&lines).is_empty(), "{raw}");
}

fn releases_json(host: &Host) -> Vec<serde_json::Value> {
    let run = host.run(&["releases", "--json"]);
    run.ok();
    serde_json::from_str::<serde_json::Value>(&run.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn releases_lists_what_status_and_rollback_see() {
    let host = Host::new();
    let run = host.run(&["releases"]);
    run.ok();
    assert!(
        run.stdout.starts_with("no releases under "),
        "{}",
        run.stdout
    );

    let mut ids = Vec::new();
    for (v, commit) in [
        ("v1", "1111111a2b3c4d5e"),
        ("v2", "2222222b2b3c4d5e"),
        ("v3", "3333333c2b3c4d5e"),
    ] {
        let key = format!("web/{v}.tar.gz");
        host.upload(&key, &app(v).gz(), commit);
        host.deploy(&key, &[]).ok();
        ids.push(host.current().unwrap());
    }

    // Newest first, with commit, key, sizes and marks matching status.
    let list = releases_json(&host);
    let listed: Vec<&str> = list.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [&ids[2], &ids[1], &ids[0]]);
    let status: serde_json::Value =
        serde_json::from_str(&host.run(&["status", "--json"]).stdout).unwrap();
    let state = &status["state"];
    assert_eq!(list[0]["serving"], true);
    assert_eq!(list[0]["id"], state["current"]["id"]);
    assert_eq!(list[0]["activated_at"], state["current"]["activated_at"]);
    assert_eq!(list[0]["commit"], "3333333c2b3c4d5e");
    assert_eq!(list[0]["key"], "web/v3.tar.gz");
    assert_eq!(list[0]["bucket"], host.bucket.as_str());
    assert_eq!(list[1]["previous_good"], true);
    assert_eq!(list[1]["id"], state["previous_good"]["id"]);
    assert_eq!(list[2]["serving"], false);
    assert_eq!(list[2]["previous_good"], false);
    assert!(list[2]["activated_at"].is_string(), "{}", list[2]);
    for r in &list {
        assert!(r["unpacked_bytes"].as_u64().unwrap() > 0, "{r}");
        assert!(r["artifact_bytes"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["incomplete"], serde_json::Value::Null);
    }

    // The table: a header and one row per release, marks in the STATUS column.
    let table = host.run(&["releases"]);
    table.ok();
    let rows: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(rows.len(), 4, "{}", table.stdout);
    assert!(rows[0].starts_with("RELEASE") && rows[0].contains("ACTIVATED"));
    assert!(
        rows[1].starts_with(&ids[2]) && rows[1].contains(" serving "),
        "{}",
        rows[1]
    );
    assert!(rows[2].contains(" previous "), "{}", rows[2]);
    assert!(rows[3].contains("web/v1.tar.gz"), "{}", rows[3]);

    // An id from the list is what rollback takes; afterwards the marks follow.
    host.run(&["rollback", &ids[0]]).ok();
    let list = releases_json(&host);
    assert_eq!(list[2]["id"], ids[0].as_str());
    assert_eq!(list[2]["serving"], true);
    assert_eq!(list[0]["previous_good"], true, "the release that served");
    assert_eq!(host.current().as_deref(), Some(ids[0].as_str()));
    let status = host.run(&["status"]);
    assert!(
        status
            .stdout
            .contains(&format!("serving        {}", ids[0])),
        "{}",
        status.stdout
    );

    // A wrong id names the command that lists the right ones.
    host.run(&["rollback", "no-such-release"])
        .fails_with(64, "`deployd releases` lists the releases on disk");
}

#[test]
fn a_container_deploy_in_a_terminal_shows_the_build_and_its_cache_hits() {
    if !common::docker::engine_answers() {
        return;
    }
    let app = common::docker::App::new("tty");
    let mut host = Host::new();
    host.app = app.project.clone();
    host.write_config(
        "",
        "[containers]\nenabled = true\nhealth_timeout = \"20s\"\nhealth_grace = \"1s\"\n",
    );
    host.write_env(&format!("HOST_PORT={}\n", app.port));
    let mut screens = Vec::new();
    for v in ["v1", "v2"] {
        let mut variant = common::docker::Variant::new(v);
        variant.multistage = true;
        // busybox httpd ignores SIGTERM as PID 1: let the restart stop it at once.
        variant.extra_dockerfile = "STOPSIGNAL SIGKILL\n".into();
        let body = common::tar_gz_dir(&app.release(v, &variant));
        let key = format!("web/{v}.tar.gz");
        host.s3
            .publish(&host.bucket, &key, &body, &format!("{v}{v}abcdef0123"));
        let (code, lines, raw) =
            on_terminal(&host, &["deploy", "--bucket", &host.bucket, "--key", &key]);
        assert_eq!(code, 0, "{raw}");
        // The build's bar counted steps while it ran.
        assert!(raw.contains("backend: step "), "{raw}");
        screens.push(lines);
    }
    let v2 = &screens[1];
    let screen = v2.join("\n");
    let names: Vec<String> = stage_lines(v2).iter().map(|l| stage_of(l)).collect();
    assert_eq!(
        names,
        [
            "resolving",
            "verifying",
            "fetching",
            "activating",
            "waiting for docker",
            "building",
            "starting"
        ],
        "{screen}"
    );
    let building = v2.iter().find(|l| l.contains(" building ")).unwrap();
    let hits: u64 = building
        .split("  ")
        .last()
        .and_then(|d| d.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("`N of M steps from cache` on {building:?}"));
    assert!(hits > 0, "{building}");
    assert!(building.ends_with("steps from cache"), "{building}");
    let release = host.current().unwrap();
    assert!(
        v2.iter()
            .any(|l| l.starts_with("  build     ") && l.ends_with("steps from cache")),
        "{screen}"
    );
    assert!(
        v2.iter()
            .any(|l| *l == format!("  serving   {release} (commit v2v2abcd), containers healthy")),
        "{screen}"
    );
}
