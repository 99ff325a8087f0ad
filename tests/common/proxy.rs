//! A TCP proxy in front of the S3 server that can slow responses down or cut one off, so that
//! "stop in the middle of a download" and "the body breaks off midway" happen on purpose.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    /// Server-to-client bytes per second, per connection.
    pub rate: Option<u64>,
    /// Close the first connection that has sent more than this many bytes to the client.
    pub cut_after: Option<u64>,
}

pub struct Proxy {
    pub endpoint: String,
    pub cuts: Arc<AtomicU64>,
}

pub fn start(upstream: &str, behaviour: Behaviour) -> Proxy {
    let upstream = upstream.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let cuts = Arc::new(AtomicU64::new(0));
    let cut_done = Arc::new(AtomicBool::new(false));
    let counter = cuts.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            // client -> server, unthrottled
            std::thread::spawn(move || pipe(c2, s2, Behaviour::default(), None, None));
            let (cut_done, counter) = (cut_done.clone(), counter.clone());
            std::thread::spawn(move || {
                pipe(server, client, behaviour, Some(cut_done), Some(counter))
            });
        }
    });
    Proxy { endpoint, cuts }
}

fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    b: Behaviour,
    cut_done: Option<Arc<AtomicBool>>,
    cuts: Option<Arc<AtomicU64>>,
) {
    let mut buf = [0u8; 16 << 10];
    let mut sent = 0u64;
    let start = Instant::now();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let (Some(limit), Some(done)) = (b.cut_after, &cut_done)
            && sent + n as u64 > limit
            && !done.swap(true, Ordering::SeqCst)
        {
            let _ = to.write_all(&buf[..(limit - sent) as usize]);
            if let Some(c) = &cuts {
                c.fetch_add(1, Ordering::SeqCst);
            }
            break;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        if let Some(rate) = b.rate {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
