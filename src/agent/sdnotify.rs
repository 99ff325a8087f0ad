//! systemd service notifications (`sd_notify(3)` protocol).
//!
//! `deployd run` is started by systemd as `Type=notify-reload` (or `Type=notify` on systemd
//! releases before 253) and tells the service manager what it is doing by sending short
//! datagrams of `KEY=value` lines to the socket named in `NOTIFY_SOCKET`:
//!
//! | when | datagram |
//! |---|---|
//! | host reconciled and first deployment finished | `READY=1` (usually with `STATUS=`) |
//! | every stage of a deployment | `STATUS=<one line>` |
//! | SIGHUP / `systemctl reload` | `RELOADING=1` + `MONOTONIC_USEC=<CLOCK_MONOTONIC in µs>` |
//! | the reload's deployment is queued | `READY=1` again |
//! | SIGTERM | `STOPPING=1` |
//! | main loop, every [`Notifier::watchdog_interval`] | `WATCHDOG=1` |
//! | a long first deployment | `EXTEND_TIMEOUT_USEC=<µs>` |
//!
//! `NOTIFY_SOCKET` is either a filesystem path (`/run/systemd/notify`) or an abstract socket
//! name written as `@name`. Both are reached through one code path: a std [`UnixDatagram`]
//! sending to a [`SocketAddr`] built from the path or from the abstract name.
//!
//! Notifications are best effort by design. When `NOTIFY_SOCKET` is not set (deployd started
//! by hand, in a container, or by tests) every call is a no-op. When a send fails, the failure
//! is logged as a `tracing` warning, at most once a minute with a count of the failures in
//! between, and the caller carries on: a broken notification socket never stops a deployment.
//! The environment variable is left as it is.
//!
//! `STATUS=` lines are de-duplicated: a status identical to the last one systemd received is
//! not sent again, so a loop that reports the same stage repeatedly does not flood the
//! manager. Status text is made single-line (a newline would start a new `KEY=` assignment)
//! and capped at [`MAX_STATUS_LEN`] bytes.
//!
//! ```no_run
//! use deployd::sdnotify::Notifier;
//!
//! let notifier = Notifier::from_env();
//! notifier.status("fetching express-api/pr-51/3f2a9c1e-20261105-120000");
//! notifier.ready_with_status("serving 3f2a9c1e");
//! if let Some(every) = notifier.watchdog_interval() {
//!     // send notifier.watchdog() from the main loop at this period
//!     let _ = every;
//! }
//! ```

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest `STATUS=` text sent, in bytes; longer text is cut at a character boundary.
pub const MAX_STATUS_LEN: usize = 1024;

/// How often a persistently failing socket is reported in the log.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// How long one send may block when the manager does not drain its socket.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Where notifications go: the value of `NOTIFY_SOCKET`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddress {
    /// A socket in the filesystem, e.g. `/run/systemd/notify`.
    Path(PathBuf),
    /// A Linux abstract socket; `NOTIFY_SOCKET=@name` gives the name `name` (without the `@`).
    Abstract(Vec<u8>),
}

impl NotifyAddress {
    /// Parses a `NOTIFY_SOCKET` value: an absolute path or `@name`.
    ///
    /// Returns `None` for an empty value and for address families deployd does not speak
    /// (such as systemd's `vsock:` addresses).
    pub fn parse(value: &OsStr) -> Option<Self> {
        let bytes = value.as_bytes();
        match bytes.first()? {
            b'/' => Some(Self::Path(PathBuf::from(value))),
            b'@' if bytes.len() > 1 => Some(Self::Abstract(bytes[1..].to_vec())),
            _ => None,
        }
    }

    fn socket_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Path(path) => SocketAddr::from_pathname(path),
            Self::Abstract(name) => SocketAddr::from_abstract_name(name),
        }
    }
}

impl fmt::Display for NotifyAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(path) => write!(f, "{}", path.display()),
            Self::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        }
    }
}

/// One assignment in a notification datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyState {
    /// `READY=1`: startup (or a reload) finished.
    Ready,
    /// `RELOADING=1` plus `MONOTONIC_USEC=` read from `CLOCK_MONOTONIC` when the datagram is built.
    Reloading,
    /// `STOPPING=1`: shutdown began.
    Stopping,
    /// `STATUS=<text>`: free-form, single-line status shown by `systemctl status`.
    Status(String),
    /// `WATCHDOG=1`: the main loop is alive.
    Watchdog,
    /// `EXTEND_TIMEOUT_USEC=<µs>`: startup, reload or stop needs this much longer.
    ExtendTimeout(Duration),
}

/// Sends service notifications to systemd; a no-op when deployd was not started by systemd.
///
/// The notifier is `Send + Sync` and every method takes `&self`, so one instance can be shared
/// (e.g. in an `Arc`) by the main loop, the signal handlers and the deployment pipeline.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Target {
    address: NotifyAddress,
    state: Mutex<SendState>,
}

#[derive(Debug, Default)]
struct SendState {
    /// Created on first use; dropped after a failure so the next send starts afresh.
    socket: Option<UnixDatagram>,
    /// The last `STATUS=` text the socket accepted.
    last_status: Option<String>,
    /// When a failure was last logged.
    last_warning: Option<Instant>,
    /// Failures since the last warning.
    suppressed: u64,
}

impl Notifier {
    /// Builds a notifier from `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    ///
    /// Without `NOTIFY_SOCKET` every call is a no-op. An address deployd cannot use is logged
    /// once here and also makes the notifier a no-op. The variables are not unset.
    pub fn from_env() -> Self {
        let watchdog = watchdog_interval_from(
            std::env::var_os("WATCHDOG_USEC").as_deref(),
            std::env::var_os("WATCHDOG_PID").as_deref(),
            std::process::id(),
        );
        let Some(raw) = std::env::var_os("NOTIFY_SOCKET") else {
            tracing::debug!("NOTIFY_SOCKET is not set; systemd notifications are off");
            return Self {
                target: None,
                watchdog,
            };
        };
        match NotifyAddress::parse(&raw) {
            Some(address) => Self::new(address).with_watchdog(watchdog),
            None => {
                tracing::warn!(
                    notify_socket = %raw.to_string_lossy(),
                    "NOTIFY_SOCKET is neither an absolute path nor an @abstract name, so systemd notifications are off; check the unit's Type= and NotifyAccess= settings"
                );
                Self {
                    target: None,
                    watchdog,
                }
            }
        }
    }

    /// Builds a notifier that sends to `address`, with no watchdog.
    pub fn new(address: NotifyAddress) -> Self {
        Self {
            target: Some(Target {
                address,
                state: Mutex::new(SendState::default()),
            }),
            watchdog: None,
        }
    }

    /// A notifier on which every call is a no-op.
    pub fn disabled() -> Self {
        Self {
            target: None,
            watchdog: None,
        }
    }

    /// Replaces the watchdog interval reported by [`Notifier::watchdog_interval`].
    pub fn with_watchdog(mut self, interval: Option<Duration>) -> Self {
        self.watchdog = interval;
        self
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The socket notifications go to, if any.
    pub fn address(&self) -> Option<&NotifyAddress> {
        self.target.as_ref().map(|t| &t.address)
    }

    /// How often to call [`Notifier::watchdog`]: half of `WatchdogSec=`, or `None` when the
    /// unit has no watchdog (or it is meant for another process).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `READY=1`.
    pub fn ready(&self) {
        self.notify(&[NotifyState::Ready]);
    }

    /// Sends `READY=1` and `STATUS=<status>` in one datagram.
    pub fn ready_with_status(&self, status: &str) {
        self.with_status(NotifyState::Ready, status);
    }

    /// Sends `RELOADING=1` and `MONOTONIC_USEC=<now>` in one datagram.
    pub fn reloading(&self) {
        self.notify(&[NotifyState::Reloading]);
    }

    /// Sends `STOPPING=1` and `STATUS=<status>` in one datagram.
    pub fn stopping_with_status(&self, status: &str) {
        self.with_status(NotifyState::Stopping, status);
    }

    fn with_status(&self, state: NotifyState, status: &str) {
        self.notify(&[state, NotifyState::Status(status.to_owned())]);
    }

    /// Sends `STATUS=<status>`, unless it equals the last status systemd received.
    pub fn status(&self, status: &str) {
        self.notify(&[NotifyState::Status(status.to_owned())]);
    }

    /// Sends `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.notify(&[NotifyState::Watchdog]);
    }

    /// Sends `EXTEND_TIMEOUT_USEC=<by>`: the current start, reload or stop needs `by` longer.
    pub fn extend_timeout(&self, by: Duration) {
        self.notify(&[NotifyState::ExtendTimeout(by)]);
    }

    /// Sends all `states` in one datagram, in order.
    ///
    /// A `STATUS=` equal to the last one delivered is left out; if nothing remains, nothing is
    /// sent. Failures are logged (rate-limited), never returned.
    pub fn notify(&self, states: &[NotifyState]) {
        let Some(target) = &self.target else {
            return;
        };
        // A poisoned lock only means another thread panicked mid-send; the state is still usable.
        let mut state = target
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());

        let mut message = String::new();
        let mut new_status = None;
        for item in states {
            match item {
                NotifyState::Ready => message.push_str("READY=1\n"),
                NotifyState::Reloading => {
                    message.push_str("RELOADING=1\n");
                    message.push_str(&format!("MONOTONIC_USEC={}\n", monotonic_usec()));
                }
                NotifyState::Stopping => message.push_str("STOPPING=1\n"),
                NotifyState::Watchdog => message.push_str("WATCHDOG=1\n"),
                NotifyState::ExtendTimeout(by) => {
                    message.push_str(&format!("EXTEND_TIMEOUT_USEC={}\n", by.as_micros()));
                }
                NotifyState::Status(text) => {
                    let text = sanitize_status(text);
                    if state.last_status.as_deref() == Some(text.as_str()) {
                        continue;
                    }
                    message.push_str("STATUS=");
                    message.push_str(&text);
                    message.push('\n');
                    new_status = Some(text);
                }
            }
        }
        if message.is_empty() {
            return;
        }
        // The protocol takes newline-separated assignments; drop the final separator.
        message.pop();

        match state.send(&target.address, message.as_bytes()) {
            Ok(()) => {
                if state.suppressed > 0 || state.last_warning.is_some() {
                    tracing::info!(
                        notify_socket = %target.address,
                        failed_sends = state.suppressed,
                        "systemd notification socket accepts messages again"
                    );
                    state.suppressed = 0;
                    state.last_warning = None;
                }
                if let Some(text) = new_status {
                    state.last_status = Some(text);
                }
                tracing::trace!(notify_socket = %target.address, notification = %message, "sent systemd notification");
            }
            Err(error) => {
                state.socket = None;
                let now = Instant::now();
                let due = state
                    .last_warning
                    .is_none_or(|at| now.duration_since(at) >= WARN_EVERY);
                if due {
                    tracing::warn!(
                        notify_socket = %target.address,
                        error = %error,
                        failed_sends_since_last_warning = state.suppressed,
                        notification = %message.replace('\n', " "),
                        "could not send a notification to systemd; deployd keeps running, but systemctl may show a stale state"
                    );
                    state.last_warning = Some(now);
                    state.suppressed = 0;
                } else {
                    state.suppressed += 1;
                }
            }
        }
    }
}

impl SendState {
    fn send(&mut self, address: &NotifyAddress, message: &[u8]) -> io::Result<()> {
        let addr = address.socket_addr()?;
        let socket = match &self.socket {
            Some(socket) => socket,
            None => {
                let socket = UnixDatagram::unbound()?;
                socket.set_write_timeout(Some(SEND_TIMEOUT))?;
                self.socket.insert(socket)
            }
        };
        let sent = socket.send_to_addr(message, &addr)?;
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", message.len()),
            ));
        }
        Ok(())
    }
}

/// Half of `WATCHDOG_USEC`, when it is a positive number and `WATCHDOG_PID` (if set) is `our_pid`.
///
/// systemd kills the service when no `WATCHDOG=1` arrives within `WATCHDOG_USEC`; pinging at
/// half that period leaves room for one late tick.
pub fn watchdog_interval_from(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    our_pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.to_str()?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        let pid: u32 = pid.to_str()?.trim().parse().ok()?;
        if pid != our_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

/// `CLOCK_MONOTONIC` now, in microseconds, as systemd expects in `MONOTONIC_USEC=`.
pub fn monotonic_usec() -> u64 {
    // CLOCK_MONOTONIC is always available on Linux; both fields are non-negative.
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    (ts.tv_sec() as u64) * 1_000_000 + (ts.tv_nsec() as u64) / 1_000
}

/// One line, at most [`MAX_STATUS_LEN`] bytes, cut at a character boundary.
fn sanitize_status(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    if line.len() > MAX_STATUS_LEN {
        let mut cut = MAX_STATUS_LEN;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            NotifyAddress::parse(OsStr::new("/run/systemd/notify")),
            Some(NotifyAddress::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            NotifyAddress::parse(OsStr::new("@sd-notify-1")),
            Some(NotifyAddress::Abstract(b"sd-notify-1".to_vec()))
        );
        assert_eq!(NotifyAddress::parse(OsStr::new("")), None);
        assert_eq!(NotifyAddress::parse(OsStr::new("@")), None);
        assert_eq!(NotifyAddress::parse(OsStr::new("vsock:2:1234")), None);
        assert_eq!(NotifyAddress::parse(OsStr::new("relative/sock")), None);
    }

    #[test]
    fn watchdog_interval_is_half_and_checks_pid() {
        let some = |s: &'static str| Some(OsStr::new(s));
        assert_eq!(
            watchdog_interval_from(some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval_from(some("30000000"), some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval_from(some("30000000"), some("8"), 7), None);
        assert_eq!(watchdog_interval_from(some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(some("abc"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, some("7"), 7), None);
    }

    #[test]
    fn status_is_single_line_and_bounded() {
        assert_eq!(sanitize_status("a\nREADY=1\r"), "a READY=1 ");
        let long = "é".repeat(MAX_STATUS_LEN);
        let cut = sanitize_status(&long);
        assert!(cut.len() <= MAX_STATUS_LEN && cut.len() >= MAX_STATUS_LEN - 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
