//! The test proxy itself: it records what it forwards, request by request, over keep-alive
//! connections, whatever frames the bodies.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

use common::proxy::{self, Behaviour};
use common::{S3, moto, unique};

#[test]
fn records_method_path_headers_and_status_of_sdk_requests() {
    let proxy = proxy::start(&moto().endpoint, Behaviour::PassThrough);
    let s3 = S3::at(&proxy.endpoint);
    let bucket = unique("proxy");
    s3.create_bucket(&bucket, false);
    s3.put(&bucket, "a.txt", b"hello", &[("commit-sha", "abc123")]);
    s3.head(&bucket, "a.txt");
    assert_eq!(s3.get(&bucket, "a.txt"), b"hello");
    let missing = s3.rt.block_on(
        s3.client
            .get_object()
            .bucket(&bucket)
            .key("missing.txt")
            .send(),
    );
    assert!(missing.is_err());

    let seen: Vec<_> = proxy
        .requests()
        .into_iter()
        .map(|r| {
            let path = r.path.split('?').next().unwrap().to_string();
            (r.method, path, r.status)
        })
        .collect();
    let object = format!("/{bucket}/a.txt");
    let expected = [
        ("PUT", format!("/{bucket}/"), Some(200)),
        ("PUT", object.clone(), Some(200)),
        ("HEAD", object.clone(), Some(200)),
        ("GET", object, Some(200)),
        ("GET", format!("/{bucket}/missing.txt"), Some(404)),
    ]
    .map(|(m, p, s)| (m.to_string(), p, s));
    assert_eq!(seen, expected);

    let put = &proxy.requests()[1];
    assert_eq!(put.header("X-Amz-Meta-Commit-Sha"), Some("abc123"));
    assert!(put.header("authorization").is_some(), "{put:#?}");
    assert_eq!(proxy.cuts(), 0);
}

/// A server that answers every request with a chunked body that has an extension and a
/// trailer, and keeps the connection open for the next one.
fn chunked_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || answer_chunked(stream));
        }
    });
    endpoint
}

fn answer_chunked(mut stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    loop {
        let mut line = String::new();
        // The request line, after any stray line breaks.
        while line.trim().is_empty() {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
        }
        let (mut length, mut chunked) = (0, false);
        while line != "\r\n" {
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            chunked |= lower.starts_with("transfer-encoding: chunked");
            line.clear();
            reader.read_line(&mut line).unwrap();
        }
        if chunked {
            // The bodies sent here are one chunk on one line, then the last chunk.
            while line != "0\r\n" {
                line.clear();
                reader.read_line(&mut line).unwrap();
            }
            reader.read_line(&mut line).unwrap();
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let answer = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                      4\r\nsome\r\n6;ext=1\r\n\r\n\r\nab\r\n0\r\nX-Trailer: 1\r\n\r\n";
        if stream.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// Reads one chunked answer, as [`chunked_server`] writes it.
fn read_answer(reader: &mut impl BufRead) -> String {
    let mut text = String::new();
    while !text.ends_with("X-Trailer: 1\r\n\r\n") {
        assert!(reader.read_line(&mut text).unwrap() > 0, "{text}");
    }
    text
}

#[test]
fn follows_chunked_bodies_and_stray_line_breaks_on_one_connection() {
    let proxy = proxy::start(&chunked_server(), Behaviour::PassThrough);
    let mut client = TcpStream::connect(proxy.endpoint.trim_start_matches("http://")).unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let requests: [&[u8]; 3] = [
        b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"\r\nPUT /second?part=2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          3\r\nabc\r\n0\r\n\r\n",
        b"GET /third HTTP/1.1\r\nHost: x\r\nX-Probe: yes\r\n\r\n",
    ];
    for request in requests {
        client.write_all(request).unwrap();
        let answer = read_answer(&mut reader);
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    }
    let seen: Vec<_> = proxy
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path, r.status))
        .collect();
    assert_eq!(
        seen,
        [
            ("POST".to_string(), "/first".to_string(), Some(200)),
            ("PUT".to_string(), "/second?part=2".to_string(), Some(200)),
            ("GET".to_string(), "/third".to_string(), Some(200)),
        ]
    );
    assert_eq!(proxy.requests()[2].header("x-probe"), Some("yes"));
}
