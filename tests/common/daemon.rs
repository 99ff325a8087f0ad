//! `deployd run` as a real child process of a [`Host`], as systemd starts it: optionally with a
//! `NOTIFY_SOCKET` bound here, stderr in a log file under the host's directory, killed when
//! dropped.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::{Host, poll, unique};

/// Where the daemon's `NOTIFY_SOCKET` points.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Notify {
    /// No `NOTIFY_SOCKET`: the daemon runs as it would outside systemd.
    #[default]
    Off,
    /// A datagram socket file in the host's directory.
    Path,
    /// A socket in the abstract namespace (`@name`).
    Abstract,
}

/// How to start `deployd run`: the notify socket, environment variables, and arguments after
/// `run`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    notify: Notify,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl Options {
    pub fn notify(mut self, notify: Notify) -> Self {
        self.notify = notify;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }
}

pub struct Daemon {
    child: Child,
    sock: Option<UnixDatagram>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `deployd run` for `host`.
    pub fn start(host: &Host, options: Options) -> Daemon {
        let (sock, address) = match options.notify {
            Notify::Off => (None, None),
            Notify::Abstract => {
                let name = format!("deployd-test-{}", unique("notify"));
                let addr = SocketAddr::from_abstract_name(&name).unwrap();
                (
                    Some(UnixDatagram::bind_addr(&addr).unwrap()),
                    Some(format!("@{name}")),
                )
            }
            Notify::Path => {
                let path = host.dir.path().join(format!("{}.sock", unique("notify")));
                let sock = UnixDatagram::bind(&path).unwrap();
                (Some(sock), Some(path.display().to_string()))
            }
        };
        if let Some(sock) = &sock {
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
        }
        let log = host.dir.path().join(format!("{}.log", unique("daemon")));
        let mut cmd = host.command(&["run"]);
        cmd.args(&options.args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(address) = address {
            cmd.env("NOTIFY_SOCKET", address);
        }
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        Daemon {
            child: cmd.spawn().unwrap(),
            sock,
            log,
        }
    }

    /// Collects notifications until one satisfies `done`; panics after `limit`.
    pub fn until(&self, limit: Duration, done: impl Fn(&str) -> bool) -> Vec<String> {
        let sock = self
            .sock
            .as_ref()
            .expect("the daemon was started without a notify socket");
        let start = Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while start.elapsed() < limit {
            if let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let stop = done(&msg);
                seen.push(msg);
                if stop {
                    return seen;
                }
            }
        }
        panic!(
            "no matching notification within {limit:?}; saw {seen:?}\nlog:\n{}",
            self.log()
        );
    }

    /// Notifications up to and including the next `READY=1`.
    pub fn ready(&self) -> Vec<String> {
        self.ready_within(Duration::from_secs(30))
    }

    pub fn ready_within(&self, limit: Duration) -> Vec<String> {
        self.until(limit, |m| m.lines().any(|l| l == "READY=1"))
    }

    pub fn signal(&self, sig: i32) {
        let sig = nix::sys::signal::Signal::try_from(sig).unwrap();
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Everything the daemon has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for `done` while the daemon runs; panics naming `what`, with the log, after
    /// `limit`.
    #[track_caller]
    pub fn wait_for(&self, limit: Duration, what: &str, done: impl FnMut() -> bool) -> Duration {
        match poll(limit, Duration::from_millis(25), done) {
            Some(took) => took,
            None => panic!("timed out waiting for {what}\nlog:\n{}", self.log()),
        }
    }

    /// Waits for the process to exit; returns its code and how long it took.
    #[track_caller]
    pub fn wait_exit(&mut self, limit: Duration) -> (i32, Duration) {
        let mut code = None;
        let took = poll(limit, Duration::from_millis(20), || {
            code = self
                .child
                .try_wait()
                .unwrap()
                .map(|s| s.code().unwrap_or(-1));
            code.is_some()
        });
        match (code, took) {
            (Some(code), Some(took)) => (code, took),
            _ => panic!("daemon did not exit within {limit:?}\n{}", self.log()),
        }
    }

    /// SIGTERM, then waits for the exit; returns the exit code.
    #[track_caller]
    pub fn stop(&mut self, limit: Duration) -> i32 {
        self.signal(libc::SIGTERM);
        self.wait_exit(limit).0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
