//! A local IMDSv2 server: `PUT /latest/api/token` hands out a session token, and every `GET`
//! without that token is refused with 401, as on an instance with `HttpTokens=required`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

pub const TOKEN: &str = "deployd-test-token";

pub struct Imds {
    pub endpoint: String,
    /// `METHOD PATH token?` for every request seen.
    pub log: Arc<Mutex<Vec<String>>>,
}

pub fn start(account: &str, region: &str, instance: &str) -> Imds {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let doc = serde_json::json!({
        "accountId": account,
        "region": region,
        "instanceId": instance,
        "availabilityZone": format!("{region}a"),
    })
    .to_string();
    let seen = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut token = None;
            let mut ttl = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    match k.trim().to_ascii_lowercase().as_str() {
                        "x-aws-ec2-metadata-token" => token = Some(v.trim().to_string()),
                        "x-aws-ec2-metadata-token-ttl-seconds" => ttl = Some(v.trim().to_string()),
                        _ => {}
                    }
                }
            }
            let mut parts = request_line.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let path = parts.next().unwrap_or("").to_string();
            seen.lock().unwrap().push(format!(
                "{method} {path} {}",
                if token.as_deref() == Some(TOKEN) {
                    "token"
                } else {
                    "no-token"
                }
            ));
            let (status, headers, body) = match (method.as_str(), path.as_str()) {
                ("PUT", "/latest/api/token") if ttl.is_some() => (
                    "200 OK",
                    format!("x-aws-ec2-metadata-token-ttl-seconds: {}\r\n", ttl.unwrap()),
                    TOKEN.to_string(),
                ),
                ("PUT", _) => ("400 Bad Request", String::new(), String::new()),
                (_, _) if token.as_deref() != Some(TOKEN) => {
                    ("401 Unauthorized", String::new(), String::new())
                }
                ("GET", "/latest/dynamic/instance-identity/document") => {
                    ("200 OK", String::new(), doc.clone())
                }
                _ => ("404 Not Found", String::new(), String::new()),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Imds { endpoint, log }
}
