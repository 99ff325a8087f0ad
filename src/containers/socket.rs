//! Engine API requests that bollard does not make: the headers of `GET /_ping`, and a BuildKit
//! build (`POST /build?version=2`) whose `moby.buildkit.trace` progress deployd decodes itself.
//!
//! bollard decodes BuildKit progress only with its `buildkit` feature, which also requires a gRPC
//! session for every BuildKit build (31 more crates, among them tonic and axum). deployd sends the
//! context in the request body instead, as `docker build` does with a remote context, and speaks
//! HTTP/1.1 to the engine with hyper (already bollard's HTTP client) over the same socket bollard
//! uses: a unix socket, or plain `tcp://`. Other endpoints (TLS, ssh, named pipes) keep the
//! classic builder; the engine module says so in its builder decision.

use std::convert::Infallible;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// A request body: nothing, or a stream of chunks.
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The default socket of the engine on Linux.
const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Where the engine listens, as far as deployd's own requests can reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// A unix socket.
    Unix(PathBuf),
    /// Plain HTTP on `host:port`.
    Tcp(String),
}

impl Endpoint {
    /// The endpoint bollard connects to: `socket`, else `DOCKER_HOST`, else the default socket.
    /// `Err` says why deployd cannot speak to it directly (TLS or ssh endpoints).
    pub(crate) fn resolve(socket: Option<&Path>) -> Result<Endpoint, String> {
        if let Some(path) = socket {
            return Ok(Endpoint::Unix(path.to_path_buf()));
        }
        match std::env::var("DOCKER_HOST") {
            Err(_) => Ok(Endpoint::Unix(PathBuf::from(DEFAULT_SOCKET))),
            Ok(host) if host.is_empty() => Ok(Endpoint::Unix(PathBuf::from(DEFAULT_SOCKET))),
            Ok(host) => Self::parse(&host, std::env::var_os("DOCKER_TLS_VERIFY").is_some()),
        }
    }

    fn parse(host: &str, tls: bool) -> Result<Endpoint, String> {
        if let Some(path) = host.strip_prefix("unix://") {
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        match host.strip_prefix("tcp://") {
            Some(addr) if !tls => Ok(Endpoint::Tcp(addr.trim_end_matches('/').to_string())),
            Some(_) => Err(format!("DOCKER_HOST={host} with TLS")),
            None => Err(format!("DOCKER_HOST={host}")),
        }
    }

    /// Send one request on a new connection and return the answer's head; its body streams.
    pub(crate) async fn send(
        &self,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, std::io::Error> {
        match self {
            Endpoint::Unix(path) => {
                send_on(tokio::net::UnixStream::connect(path).await?, request).await
            }
            Endpoint::Tcp(addr) => {
                send_on(tokio::net::TcpStream::connect(addr).await?, request).await
            }
        }
    }
}

async fn send_on<S>(io: S, request: Request<Body>) -> Result<Response<Incoming>, std::io::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(std::io::Error::other)?;
    // The connection task ends when the answer's body has been read (or dropped).
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "engine connection closed");
        }
    });
    sender
        .send_request(request)
        .await
        .map_err(std::io::Error::other)
}

/// A request without a body.
pub(crate) fn empty_request(
    method: &str,
    path_and_query: &str,
) -> Result<Request<Body>, std::io::Error> {
    Request::builder()
        .method(method)
        .uri(path_and_query)
        .header("Host", "docker")
        .body(Empty::<Bytes>::new().boxed_unsync())
        .map_err(std::io::Error::other)
}

/// A request whose body is a stream of chunks (sent chunked).
pub(crate) fn streaming_request(
    method: &str,
    path_and_query: &str,
    content_type: &str,
    body: impl Stream<Item = Bytes> + Send + 'static,
) -> Result<Request<Body>, std::io::Error> {
    let body = StreamBody::new(body.map(|chunk| Ok::<_, Infallible>(Frame::data(chunk))));
    Request::builder()
        .method(method)
        .uri(path_and_query)
        .header("Host", "docker")
        .header("Content-Type", content_type)
        .body(BodyExt::boxed_unsync(body))
        .map_err(std::io::Error::other)
}

/// Lines of a streamed answer body, as they complete (the engine ends each JSON message with a
/// newline). `Err` when the connection breaks off.
pub(crate) struct Lines {
    body: Incoming,
    partial: Vec<u8>,
    done: bool,
}

impl Lines {
    pub(crate) fn new(body: Incoming) -> Self {
        Lines {
            body,
            partial: Vec::new(),
            done: false,
        }
    }

    /// The next complete line, without its line end; `None` at the end of the body.
    pub(crate) async fn next(&mut self) -> Option<Result<Vec<u8>, hyper::Error>> {
        loop {
            if let Some(i) = self.partial.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.partial.drain(..=i).collect();
                while line.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
                    line.pop();
                }
                return Some(Ok(line));
            }
            if self.done {
                return (!self.partial.is_empty()).then(|| Ok(std::mem::take(&mut self.partial)));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.partial.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Some(Err(e)),
                None => self.done = true,
            }
        }
    }
}

/// The whole body of a short answer (an error message), at most 64 KiB of it.
pub(crate) async fn read_short(body: Incoming) -> String {
    let mut lines = Lines::new(body);
    let mut text = Vec::new();
    while let Some(Ok(line)) = lines.next().await {
        text.extend_from_slice(&line);
        if text.len() > 64 * 1024 {
            break;
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_forms() {
        assert_eq!(
            Endpoint::parse("unix:///run/user/1000/docker.sock", false),
            Ok(Endpoint::Unix("/run/user/1000/docker.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:2375", false),
            Ok(Endpoint::Tcp("127.0.0.1:2375".into()))
        );
        assert!(Endpoint::parse("tcp://10.0.0.1:2376", true).is_err());
        assert!(Endpoint::parse("ssh://me@host", false).is_err());
        assert_eq!(
            Endpoint::resolve(Some(Path::new("/tmp/d.sock"))),
            Ok(Endpoint::Unix("/tmp/d.sock".into()))
        );
    }
}
