//! systemd notifications against real datagram sockets (filesystem and abstract), and
//! `from_env` in a real child process.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::io::{self, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deployd::agent::sdnotify::{Notifier, NotifyAddress, NotifyState, monotonic_usec};

fn recv(socket: &UnixDatagram) -> String {
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; 8192];
    let n = socket.recv(&mut buf).expect("a notification datagram");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

fn assert_silent(socket: &UnixDatagram) {
    socket
        .set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    let mut buf = vec![0u8; 8192];
    match socket.recv(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        Ok(n) => panic!(
            "unexpected datagram {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("recv failed: {e}"),
    }
}

fn abstract_name(tag: &str) -> String {
    format!(
        "deployd-test-{tag}-{}-{}",
        std::process::id(),
        monotonic_usec()
    )
}

/// Every message kind, exact bytes, including de-duplicated STATUS= lines.
fn exercise(notifier: &Notifier, socket: &UnixDatagram) {
    assert!(notifier.is_enabled());

    notifier.ready();
    assert_eq!(recv(socket), "READY=1");

    notifier.status("fetching s3://b/k");
    assert_eq!(recv(socket), "STATUS=fetching s3://b/k");
    // Identical consecutive status: not sent again.
    notifier.status("fetching s3://b/k");
    notifier.status("fetching s3://b/k");
    assert_silent(socket);
    notifier.status("unpacking");
    assert_eq!(recv(socket), "STATUS=unpacking");

    notifier.ready_with_status("serving 3f2a9c1e");
    assert_eq!(recv(socket), "READY=1\nSTATUS=serving 3f2a9c1e");
    // Combined with a repeated status, only the new part goes out.
    notifier.ready_with_status("serving 3f2a9c1e");
    assert_eq!(recv(socket), "READY=1");

    let before = monotonic_usec();
    notifier.reloading();
    let after = monotonic_usec();
    let msg = recv(socket);
    let lines: Vec<&str> = msg.split('\n').collect();
    assert_eq!(lines.len(), 2, "one datagram with two lines: {msg:?}");
    assert_eq!(lines[0], "RELOADING=1");
    let usec: u64 = lines[1]
        .strip_prefix("MONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("MONOTONIC_USEC line in {msg:?}"))
        .parse()
        .unwrap();
    assert!(
        before <= usec && usec <= after,
        "MONOTONIC_USEC={usec} outside [{before}, {after}]"
    );
    println!(
        "MONOTONIC_USEC={usec}, test clock before={before} after={after} (window {} µs)",
        after - before
    );

    notifier.notify(&[
        NotifyState::Reloading,
        NotifyState::Status("reloading: SIGHUP".into()),
    ]);
    let msg = recv(socket);
    assert!(
        msg.starts_with("RELOADING=1\nMONOTONIC_USEC=")
            && msg.ends_with("\nSTATUS=reloading: SIGHUP"),
        "{msg:?}"
    );

    notifier.watchdog();
    assert_eq!(recv(socket), "WATCHDOG=1");

    notifier.extend_timeout(Duration::from_secs(90));
    assert_eq!(recv(socket), "EXTEND_TIMEOUT_USEC=90000000");

    // A newline in the status cannot smuggle in another assignment.
    notifier.status("bad\nREADY=1");
    assert_eq!(recv(socket), "STATUS=bad READY=1");

    notifier.notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping on SIGTERM".into()),
    ]);
    assert_eq!(recv(socket), "STOPPING=1\nSTATUS=stopping on SIGTERM");
    notifier.stopping_with_status("stopped");
    assert_eq!(recv(socket), "STOPPING=1\nSTATUS=stopped");
}

#[test]
fn path_socket_receives_exact_datagrams() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let notifier = Notifier::new(NotifyAddress::Path(path.clone()));
    assert_eq!(notifier.address(), Some(&NotifyAddress::Path(path)));
    exercise(&notifier, &socket);
}

#[test]
fn abstract_socket_receives_exact_datagrams() {
    let name = abstract_name("abstract");
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    let notifier = Notifier::new(NotifyAddress::parse(format!("@{name}").as_ref()).unwrap());
    exercise(&notifier, &socket);
}

#[test]
fn disabled_notifier_is_a_no_op() {
    let notifier = Notifier::disabled();
    assert!(!notifier.is_enabled());
    assert_eq!(notifier.watchdog_interval(), None);
    notifier.ready();
    notifier.reloading();
    notifier.status("x");
    notifier.stopping_with_status("stopped");
    notifier.watchdog();
}

/// Collects formatted tracing output for assertions.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[test]
fn dead_socket_warns_once_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let notifier = Notifier::new(NotifyAddress::Path(path.clone()));
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();

    tracing::subscriber::with_default(subscriber, || {
        // Nobody listens: 500 sends, no panic, no error, one warning.
        notifier.status("waiting for artifact");
        for _ in 0..500 {
            notifier.watchdog();
        }
        let log = captured.text();
        let warnings = log
            .matches("could not send a notification to systemd")
            .count();
        assert_eq!(warnings, 1, "rate-limited warnings, got log:\n{log}");

        // The listener appears: delivery resumes, including the status that failed before.
        let socket = UnixDatagram::bind(&path).unwrap();
        notifier.status("waiting for artifact");
        assert_eq!(recv(&socket), "STATUS=waiting for artifact");
        notifier.ready();
        assert_eq!(recv(&socket), "READY=1");
        let log = captured.text();
        assert!(
            log.contains("accepts messages again") && log.contains("failed_sends=500"),
            "recovery is logged with the suppressed count:\n{log}"
        );
    });
}

/// Runs `from_env` in a child process (this test binary, one ignored test) with the given
/// environment; the child reports what it saw through the socket itself.
fn run_child(env: &[(&str, String)]) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--ignored", "--exact", "from_env_child", "--nocapture"])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "child failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The child side of `from_env_reads_the_environment`; does nothing useful on its own.
#[test]
#[ignore = "run by from_env_reads_the_environment in a child process"]
fn from_env_child() {
    let notifier = Notifier::from_env();
    let socket_kept = std::env::var_os("NOTIFY_SOCKET").is_some();
    notifier.status(&format!(
        "watchdog={:?} socket_kept={socket_kept}",
        notifier.watchdog_interval()
    ));
    notifier.ready();
    assert!(notifier.is_enabled() == socket_kept);
}

#[test]
fn from_env_reads_the_environment() {
    // Abstract address, watchdog for any pid.
    let name = abstract_name("env");
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    run_child(&[
        ("NOTIFY_SOCKET", format!("@{name}")),
        ("WATCHDOG_USEC", "4000000".into()),
    ]);
    assert_eq!(recv(&socket), "STATUS=watchdog=Some(2s) socket_kept=true");
    assert_eq!(recv(&socket), "READY=1");

    // Path address; the watchdog belongs to another pid, so it is not ours.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    run_child(&[
        ("NOTIFY_SOCKET", path.display().to_string()),
        ("WATCHDOG_USEC", "4000000".into()),
        ("WATCHDOG_PID", "1".into()),
    ]);
    assert_eq!(recv(&socket), "STATUS=watchdog=None socket_kept=true");
    assert_eq!(recv(&socket), "READY=1");

    // No NOTIFY_SOCKET: the child runs every call as a no-op and nothing arrives anywhere.
    run_child(&[]);
    assert_silent(&socket);
}
