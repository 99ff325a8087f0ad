//! A loopback HTTP proxy in front of a server (moto, usually). It forwards the bytes of every
//! connection as they come, records each request it forwarded (method, path, headers and the
//! status of the answer), and misbehaves on purpose as its [`Behaviour`] says, so that "the
//! body breaks off midway" or "stop in the middle of a download" happen when a test wants them.
//!
//! Recording follows HTTP/1.1 message framing (`Content-Length`, chunked, bodiless answers to
//! `HEAD`, 204 and 304) over keep-alive connections. It only watches: a stream it cannot follow
//! is still forwarded as it is, and only the recording of that connection stops.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    // Faults tied to a request (an error status, a reset or a stall on the Nth one) are new
    // variants: `forward_requests` sees where each request starts and which one it is.
}

/// A request the proxy forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target as sent: path and query.
    pub path: String,
    /// In the order sent, names as sent.
    pub headers: Vec<(String, String)>,
    /// The status of the answer, once its head has passed back.
    pub status: Option<u16>,
}

impl Request {
    /// The first value of header `name`, whatever its case.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

pub struct Proxy {
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
}

struct Shared {
    behaviour: Behaviour,
    requests: Mutex<Vec<Request>>,
    cuts: AtomicU64,
    cut_done: AtomicBool,
}

/// Starts a proxy on a free loopback port in front of `upstream` (`http://host:port`).
pub fn start(upstream: &str, behaviour: Behaviour) -> Proxy {
    let upstream = upstream.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let shared = Arc::new(Shared {
        behaviour,
        requests: Mutex::new(Vec::new()),
        cuts: AtomicU64::new(0),
        cut_done: AtomicBool::new(false),
    });
    let proxy = Proxy {
        endpoint,
        shared: shared.clone(),
    };
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            // Requests on this connection whose answer has not begun: index and method.
            let pending = Arc::new(Mutex::new(VecDeque::new()));
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (sh, p) = (shared.clone(), pending.clone());
            std::thread::spawn(move || forward_requests(c2, s2, &sh, &p));
            let sh = shared.clone();
            std::thread::spawn(move || forward_answers(server, client, &sh, &pending));
        }
    });
    proxy
}

type Pending = Mutex<VecDeque<(usize, String)>>;

/// Client to server: records each request head, forwards everything unchanged.
fn forward_requests(mut from: TcpStream, mut to: TcpStream, shared: &Shared, pending: &Pending) {
    let mut framing = Framing::default();
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        framing.follow(&buf[..n], |head| {
            let (start, headers) = parse_head(head)?;
            let mut parts = start.split(' ');
            let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
            let body = delimited(&headers, Body::Length(0))?;
            let mut log = shared.requests.lock().unwrap();
            pending
                .lock()
                .unwrap()
                .push_back((log.len(), method.clone()));
            log.push(Request {
                method,
                path,
                headers,
                status: None,
            });
            Some(body)
        });
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Server to client: applies the behaviour, notes each answer's status on its request.
fn forward_answers(mut from: TcpStream, mut to: TcpStream, shared: &Shared, pending: &Pending) {
    let mut framing = Framing::default();
    let mut buf = [0u8; 16 << 10];
    let mut sent = 0u64;
    let start = Instant::now();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
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
            let (start, headers) = parse_head(head)?;
            let status: u16 = start.split(' ').nth(1)?.parse().ok()?;
            if (100..200).contains(&status) {
                // An interim answer (100 Continue): the final one is still to come.
                return Some(Body::Length(0));
            }
            let (index, method) = pending.lock().unwrap().pop_front()?;
            shared.requests.lock().unwrap()[index].status = Some(status);
            if method == "HEAD" || status == 204 || status == 304 {
                Some(Body::Length(0))
            } else {
                delimited(&headers, Body::UntilClose)
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
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
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
