//! A loopback HTTP proxy in front of a server (moto on TCP, or the Docker engine on its unix
//! socket). It forwards the bytes of every connection as they come, records each request it
//! forwarded (method, path, headers and the status of the answer), and misbehaves on purpose
//! as its [`Behaviour`] says, so that "the body breaks off midway", "S3 answers 503 SlowDown
//! three times", "the answer stalls for a minute" or "the engine restarts mid-build" happen
//! when a test wants them.
//!
//! Recording follows HTTP/1.1 message framing (`Content-Length`, chunked, bodiless answers to
//! `HEAD`, 204 and 304) over keep-alive connections. It only watches: a stream it cannot follow
//! is still forwarded as it is, and only the recording of that connection stops. Clients send
//! a request only once the previous answer on the connection is complete (no pipelining), so
//! every byte the server sends after a request arrived belongs to that request's answer: a
//! fault tied to the request is applied to those bytes.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does to the traffic it forwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Behaviour {
    /// Forwards everything unchanged.
    #[default]
    PassThrough,
    /// Lets at most `bytes_per_second` through from the server to the client, on each
    /// connection.
    Throttle { bytes_per_second: u64 },
    /// The first connection to carry more than `bytes` from the server to the client gets
    /// exactly `bytes` and is then closed; every other connection passes through.
    CutAfter { bytes: u64 },
    /// Requests with `method` whose path contains `path`, numbered from 0 in the order they
    /// arrive: numbers `from..from + count` meet `fault`; every other request passes.
    Faulty {
        method: &'static str,
        path: &'static str,
        from: usize,
        count: usize,
        fault: Fault,
    },
}

/// A fault tied to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The proxy answers itself with this status (503 is S3's `SlowDown`, anything else an
    /// `InternalError`) and closes the connection; the server never sees the request.
    Status(u16),
    /// The connection is reset as soon as the request has arrived; nothing is answered.
    Reset,
    /// The first `bytes` of the answer (head included) pass, then the connection is reset.
    ResetAfter { bytes: u64 },
    /// The first `bytes` of the answer pass, then nothing for `secs` seconds, then the
    /// connection closes.
    Stall { bytes: u64, secs: u64 },
    /// The answer's `Content-Length` announces `delta` bytes more (or fewer) than its body
    /// has; as much of the body as announced passes (all of it when more is announced), then
    /// the connection closes.
    WrongLength { delta: i64 },
    /// The first `bytes` of the answer pass (`u64::MAX`: all of it, head and Content-Length
    /// body); then every open connection is closed, and for `secs` seconds every new one is
    /// closed as soon as it is accepted: a server restarting.
    Outage { bytes: u64, secs: u64 },
}

/// A request the proxy forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target as sent: path and query.
    pub path: String,
    /// In the order sent, names as sent.
    pub headers: Vec<(String, String)>,
    /// The status of the answer, once its head has passed back (or the proxy's own).
    pub status: Option<u16>,
    /// The fault the proxy applied to it.
    pub fault: Option<Fault>,
}

impl Request {
    /// The first value of header `name`, whatever its case.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

pub struct Proxy {
    /// `http://127.0.0.1:PORT`, or the socket's path for a unix proxy.
    pub endpoint: String,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Every request forwarded so far, in the order they arrived.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// How many connections a [`Behaviour::CutAfter`] has cut.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
    }

    /// How many requests met the fault of a [`Behaviour::Faulty`].
    pub fn faults(&self) -> usize {
        self.requests().iter().filter(|r| r.fault.is_some()).count()
    }
}

/// A connection the proxy can forward, close and reset.
pub trait Conn: Read + Write + Send + Sized + 'static {
    fn clone_conn(&self) -> io::Result<Self>;
    fn close(&self);
    /// Closes with a reset (RST) where the transport has one, else plainly.
    fn reset(self);
}

impl Conn for TcpStream {
    fn clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn reset(self) {
        use std::os::fd::AsRawFd;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on a descriptor this stream owns, with a pointer to a live
        // `linger` of the size passed; closing with SO_LINGER 0 sends a reset.
        #[allow(unsafe_code)]
        unsafe {
            libc::setsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
}

impl Conn for UnixStream {
    fn clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn reset(self) {
        self.close();
    }
}

type Closer = Box<dyn Fn() + Send>;

struct Shared {
    behaviour: Behaviour,
    requests: Mutex<Vec<Request>>,
    cuts: AtomicU64,
    cut_done: AtomicBool,
    /// Requests that matched a `Faulty` behaviour's method and path so far.
    matched: AtomicUsize,
    /// Until when new connections are refused (an outage).
    outage_until: Mutex<Option<Instant>>,
    /// Closes each connection opened so far (for an outage).
    open: Mutex<Vec<Closer>>,
}

impl Shared {
    fn new(behaviour: Behaviour) -> Arc<Shared> {
        Arc::new(Shared {
            behaviour,
            requests: Mutex::new(Vec::new()),
            cuts: AtomicU64::new(0),
            cut_done: AtomicBool::new(false),
            matched: AtomicUsize::new(0),
            outage_until: Mutex::new(None),
            open: Mutex::new(Vec::new()),
        })
    }

    /// The fault for a request, counting it when it matches.
    fn fault_for(&self, method: &str, target: &str) -> Option<Fault> {
        let Behaviour::Faulty {
            method: m,
            path,
            from,
            count,
            fault,
        } = self.behaviour
        else {
            return None;
        };
        if m != method || !target.contains(path) {
            return None;
        }
        let n = self.matched.fetch_add(1, Ordering::SeqCst);
        (from..from + count).contains(&n).then_some(fault)
    }

    fn in_outage(&self) -> bool {
        self.outage_until
            .lock()
            .unwrap()
            .is_some_and(|until| Instant::now() < until)
    }

    fn start_outage(&self, secs: u64) {
        *self.outage_until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(secs));
        for close in self.open.lock().unwrap().drain(..) {
            close();
        }
    }
}

/// Starts a proxy on a free loopback port in front of `upstream` (`http://host:port`).
pub fn start(upstream: &str, behaviour: Behaviour) -> Proxy {
    let upstream = upstream.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let shared = Shared::new(behaviour);
    let sh = shared.clone();
    std::thread::spawn(move || serve(listener.incoming(), || TcpStream::connect(&upstream), &sh));
    Proxy { endpoint, shared }
}

/// Starts a proxy listening on the unix socket `listen` in front of the one at `upstream`
/// (the Docker engine's, say).
pub fn start_unix(upstream: &Path, listen: &Path, behaviour: Behaviour) -> Proxy {
    let listener = UnixListener::bind(listen).unwrap();
    let upstream = upstream.to_path_buf();
    let shared = Shared::new(behaviour);
    let sh = shared.clone();
    std::thread::spawn(move || serve(listener.incoming(), || UnixStream::connect(&upstream), &sh));
    Proxy {
        endpoint: listen.display().to_string(),
        shared,
    }
}

fn serve<C: Conn>(
    incoming: impl Iterator<Item = io::Result<C>>,
    connect: impl Fn() -> io::Result<C>,
    shared: &Arc<Shared>,
) {
    for client in incoming {
        let Ok(client) = client else { continue };
        if shared.in_outage() {
            client.close();
            continue;
        }
        let Ok(server) = connect() else {
            continue;
        };
        let (Ok(c1), Ok(s1)) = (client.clone_conn(), server.clone_conn()) else {
            continue;
        };
        shared.open.lock().unwrap().push(Box::new(move || {
            c1.close();
            s1.close();
        }));
        // Requests on this connection whose answer has not begun: index and method.
        let pending = Arc::new(Mutex::new(VecDeque::new()));
        // A fault the next answer on this connection meets.
        let armed = Arc::new(Mutex::new(None));
        let (c2, s2) = (client.clone_conn().unwrap(), server.clone_conn().unwrap());
        let (sh, p, a) = (shared.clone(), pending.clone(), armed.clone());
        std::thread::spawn(move || forward_requests(c2, s2, &sh, &p, &a));
        let sh = shared.clone();
        std::thread::spawn(move || forward_answers(server, client, &sh, &pending, &armed));
    }
}

type Pending = Mutex<VecDeque<(usize, String)>>;
type Armed = Mutex<Option<Fault>>;

/// Client to server: records each request head and forwards everything, unless the request
/// meets a fault the proxy applies itself.
fn forward_requests<C: Conn>(
    mut from: C,
    mut to: C,
    shared: &Shared,
    pending: &Pending,
    armed: &Armed,
) {
    let mut framing = Framing::default();
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut faulty = None;
        framing.follow(&buf[..n], |head| {
            let (start, headers) = parse_head(head)?;
            let mut parts = start.split(' ');
            let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
            let body = delimited(&headers, Body::Length(0))?;
            let fault = shared.fault_for(&method, &path);
            let mut log = shared.requests.lock().unwrap();
            faulty = fault.map(|f| (log.len(), f));
            if !matches!(fault, Some(Fault::Status(_) | Fault::Reset)) {
                pending
                    .lock()
                    .unwrap()
                    .push_back((log.len(), method.clone()));
            }
            log.push(Request {
                method,
                path,
                headers,
                status: match fault {
                    Some(Fault::Status(code)) => Some(code),
                    _ => None,
                },
                fault,
            });
            Some(body)
        });
        match faulty {
            Some((_, Fault::Status(code))) => {
                let _ = from.write_all(error_answer(code).as_bytes());
                break;
            }
            Some((_, Fault::Reset)) => {
                to.close();
                from.reset();
                return;
            }
            // Armed before the request reaches the server: its answer meets the fault.
            Some((_, fault)) => *armed.lock().unwrap() = Some(fault),
            None => {}
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    to.close();
    from.close();
}

/// An error answer with `status`, closing the connection: S3's `SlowDown` for 503, else a
/// JSON message as the Docker engine sends.
fn error_answer(status: u16) -> String {
    let (reason, kind, body) = match status {
        503 => (
            "Slow Down",
            "application/xml",
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>injected by the test proxy</Message><RequestId>0</RequestId></Error>",
        ),
        _ => (
            "Internal Server Error",
            "application/json",
            "{\"message\":\"injected by the test proxy\"}",
        ),
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Server to client: applies the behaviour, notes each answer's status on its request.
fn forward_answers<C: Conn>(
    mut from: C,
    mut to: C,
    shared: &Shared,
    pending: &Pending,
    armed: &Armed,
) {
    let mut framing = Framing::default();
    let mut buf = [0u8; 16 << 10];
    let mut sent = 0u64;
    let start = Instant::now();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(fault) = armed.lock().unwrap().take() {
            misbehave(buf[..n].to_vec(), from, to, fault, shared, pending);
            return;
        }
        let mut chunk = &buf[..n];
        let mut cut = false;
        if let Behaviour::CutAfter { bytes } = shared.behaviour
            && sent + n as u64 > bytes
            && !shared.cut_done.swap(true, Ordering::SeqCst)
        {
            chunk = &chunk[..(bytes - sent) as usize];
            cut = true;
        }
        framing.follow(chunk, |head| {
            let status = note_status(head, shared, pending)?;
            let (_, headers) = parse_head(head)?;
            match status {
                // An interim answer (100 Continue): the final one is still to come.
                (100..=199, _) => Some(Body::Length(0)),
                (204 | 304, _) => Some(Body::Length(0)),
                (_, method) if method == "HEAD" => Some(Body::Length(0)),
                _ => delimited(&headers, Body::UntilClose),
            }
        });
        let written = to.write_all(chunk);
        if cut {
            shared.cuts.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if written.is_err() {
            break;
        }
        sent += n as u64;
        if let Behaviour::Throttle { bytes_per_second } = shared.behaviour {
            let due = Duration::from_secs_f64(sent as f64 / bytes_per_second as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    to.close();
    from.close();
}

/// Notes the status of an answer head on its request: `(status, method)`; an interim answer
/// does not use up the request.
fn note_status(head: &str, shared: &Shared, pending: &Pending) -> Option<(u16, String)> {
    let (start, _) = parse_head(head)?;
    let status: u16 = start.split(' ').nth(1)?.parse().ok()?;
    if (100..200).contains(&status) {
        return Some((status, String::new()));
    }
    let (index, method) = pending.lock().unwrap().pop_front()?;
    shared.requests.lock().unwrap()[index].status = Some(status);
    Some((status, method))
}

/// Applies an answer-side `fault` to the rest of the connection, whose answer starts with
/// `got`; the connection ends here.
fn misbehave<C: Conn>(
    mut got: Vec<u8>,
    mut from: C,
    mut to: C,
    fault: Fault,
    shared: &Shared,
    pending: &Pending,
) {
    let mut buf = [0u8; 16 << 10];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break got.len(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
    let _ = note_status(&head, shared, pending);
    let length: u64 = parse_head(&head)
        .and_then(|(_, h)| header(&h, "content-length")?.parse().ok())
        .unwrap_or(0);
    // Passes the first `n` bytes of what is left of the answer (from `got`, then the server).
    let mut pass = |mut got: Vec<u8>, n: u64, to: &mut C| {
        let mut left = n;
        loop {
            let take = left.min(got.len() as u64) as usize;
            if to.write_all(&got[..take]).is_err() {
                return;
            }
            left -= take as u64;
            if left == 0 {
                return;
            }
            got = match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf[..n].to_vec(),
            };
        }
    };
    match fault {
        Fault::ResetAfter { bytes } => {
            pass(got, bytes, &mut to);
            to.reset();
        }
        Fault::Stall { bytes, secs } => {
            pass(got, bytes, &mut to);
            std::thread::sleep(Duration::from_secs(secs));
            to.close();
        }
        Fault::WrongLength { delta } => {
            let announced = (length as i64 + delta).max(0) as u64;
            let head = head
                .lines()
                .map(|l| match l.split_once(':') {
                    Some((k, _)) if k.eq_ignore_ascii_case("content-length") => {
                        format!("{k}: {announced}")
                    }
                    _ => l.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\r\n");
            let _ = to.write_all(format!("{}\r\n\r\n", head.trim_end()).as_bytes());
            pass(got[head_end..].to_vec(), length.min(announced), &mut to);
            to.close();
        }
        Fault::Outage { bytes, secs } => {
            let n = if bytes == u64::MAX {
                head_end as u64 + length
            } else {
                bytes
            };
            pass(got, n, &mut to);
            to.close();
            shared.start_outage(secs);
        }
        Fault::Status(_) | Fault::Reset => unreachable!("applied to the request"),
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked,
    UntilClose,
}

/// Where a byte stream stands in its sequence of HTTP/1.1 messages.
#[derive(Debug)]
enum Framing {
    /// A head, what has come of it.
    Head(Vec<u8>),
    /// So many body bytes still to come.
    Length(u64),
    /// A chunk-size line, what has come of it.
    ChunkSize(Vec<u8>),
    /// So many bytes of chunk data, then its CRLF, still to come.
    ChunkData(u64),
    /// A trailer line after the last chunk, what has come of it.
    Trailer(Vec<u8>),
    /// The body runs until the connection closes.
    UntilClose,
    /// Something this parser does not follow: it stops looking.
    Lost,
}

impl Default for Framing {
    fn default() -> Self {
        Framing::Head(Vec::new())
    }
}

const MAX_HEAD: usize = 64 << 10;

impl Framing {
    /// Follows `bytes`, calling `on_head` with each complete message head; `on_head` says how
    /// the body that follows is delimited, or `None` when it cannot tell.
    fn follow(&mut self, mut bytes: &[u8], mut on_head: impl FnMut(&str) -> Option<Body>) {
        while !bytes.is_empty() {
            let state = std::mem::replace(self, Framing::Lost);
            *self = match state {
                Framing::Head(mut head) => {
                    let (line, rest, _) = line(bytes);
                    bytes = rest;
                    head.extend_from_slice(line);
                    if head == b"\r\n" || head == b"\n" {
                        // A stray line break between messages.
                        Framing::default()
                    } else if !(head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n")) {
                        if head.len() > MAX_HEAD {
                            Framing::Lost
                        } else {
                            Framing::Head(head)
                        }
                    } else {
                        match std::str::from_utf8(&head).ok().and_then(&mut on_head) {
                            Some(Body::Length(0)) => Framing::default(),
                            Some(Body::Length(n)) => Framing::Length(n),
                            Some(Body::Chunked) => Framing::ChunkSize(Vec::new()),
                            Some(Body::UntilClose) => Framing::UntilClose,
                            None => Framing::Lost,
                        }
                    }
                }
                Framing::Length(left) => {
                    let take = left.min(bytes.len() as u64);
                    bytes = &bytes[take as usize..];
                    if take == left {
                        Framing::default()
                    } else {
                        Framing::Length(left - take)
                    }
                }
                Framing::ChunkSize(mut so_far) => {
                    let (part, rest, done) = line(bytes);
                    bytes = rest;
                    so_far.extend_from_slice(part);
                    if !done {
                        Framing::ChunkSize(so_far)
                    } else {
                        let text = String::from_utf8_lossy(&so_far);
                        let size = text.split(';').next().unwrap_or("").trim();
                        match u64::from_str_radix(size, 16) {
                            Ok(0) => Framing::Trailer(Vec::new()),
                            // The data, then its CRLF.
                            Ok(n) => Framing::ChunkData(n + 2),
                            Err(_) => Framing::Lost,
                        }
                    }
                }
                Framing::ChunkData(left) => {
                    let take = left.min(bytes.len() as u64);
                    bytes = &bytes[take as usize..];
                    if take == left {
                        Framing::ChunkSize(Vec::new())
                    } else {
                        Framing::ChunkData(left - take)
                    }
                }
                Framing::Trailer(mut so_far) => {
                    let (part, rest, done) = line(bytes);
                    bytes = rest;
                    so_far.extend_from_slice(part);
                    match (done, so_far.as_slice()) {
                        (true, b"\r\n" | b"\n") => Framing::default(),
                        (true, _) => Framing::Trailer(Vec::new()),
                        (false, _) => Framing::Trailer(so_far),
                    }
                }
                Framing::UntilClose => Framing::UntilClose,
                Framing::Lost => Framing::Lost,
            };
            if matches!(self, Framing::UntilClose | Framing::Lost) {
                return;
            }
        }
    }
}

/// Splits `bytes` after its first line break: (the line, the rest, whether the line ended).
fn line(bytes: &[u8]) -> (&[u8], &[u8], bool) {
    match bytes.iter().position(|&b| b == b'\n') {
        Some(i) => (&bytes[..=i], &bytes[i + 1..], true),
        None => (bytes, &[], false),
    }
}

/// The start line and the headers of a message head.
fn parse_head(head: &str) -> Option<(&str, Vec<(String, String)>)> {
    let mut lines = head.lines();
    let start = lines.next()?.trim_end();
    let headers = lines
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((start, headers))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// How the body after a head with `headers` is delimited: `otherwise` when they do not say,
/// `None` when they say it in a way this parser does not follow.
fn delimited(headers: &[(String, String)], otherwise: Body) -> Option<Body> {
    let chunked = header(headers, "transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    match header(headers, "content-length") {
        _ if chunked => Some(Body::Chunked),
        None => Some(otherwise),
        Some(v) => v.parse().ok().map(Body::Length),
    }
}
