//! Fetch: download exactly the verified bytes, streaming, hashing as they arrive.
//!
//! One GET, pinned with `If-Match: <etag>` and `versionId` when the bucket is versioned, so a
//! key that CI overwrites after `verify` yields a 412 instead of a mix of two artifacts. The
//! SDK retries the request itself; if the body breaks off midway, the download resumes with a
//! `Range` request under the same pin (a bounded number of times). The body is hashed with
//! SHA-256 on the fly and handed to the unpacker through a bounded channel, so memory stays
//! flat whatever the artifact's size.
//!
//! [`ChannelReader`] is the blocking side of that channel: the unpacker reads from it like a
//! file. If the download stops early it reports an error instead of a clean end of file, so a
//! cut-off download can never look like a complete archive.

use std::io::{self, Read};
use std::time::Duration;

use aws_sdk_s3::Client;
use bytes::{Buf, Bytes};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::deploy::verify::Verified;
use crate::error::{error_chain, exit_codes};
use crate::s3::{self, S3Failure, S3Object};

/// How often a broken body may be resumed before the download gives up.
const MAX_RESUMES: u32 = 5;
/// Chunks in flight between the download and the unpacker.
pub const CHANNEL_DEPTH: usize = 64;

/// One message from the download to the unpacker.
#[derive(Debug)]
pub enum Chunk {
    /// Bytes of the body, in order.
    Data(Bytes),
    /// The whole object has been received.
    End,
}

/// The download's result.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// Lower-case hex SHA-256 of the bytes received.
    pub sha256: String,
    /// Bytes received.
    pub bytes: u64,
    /// How often a broken body was resumed with a range request.
    pub resumes: u32,
}

/// The download failed; nothing partial is ever used.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The ETag pin no longer holds (412 or 404): the key was overwritten.
    #[error(
        "{0} changed after it was verified (ETag {etag} no longer matches); nothing from it was used", etag = .0.etag()
    )]
    Replaced(S3Object),
    /// The GET failed after the SDK retries and the resumes.
    #[error("downloading {object} failed: {reason}")]
    Unavailable {
        /// The S3 object concerned.
        object: S3Object,
        /// Why, as one clause.
        reason: String,
    },
    /// The body was longer or shorter than head-object said.
    #[error("downloading {object} returned {got} bytes where head-object reported {expected}")]
    SizeMismatch {
        /// The S3 object concerned.
        object: S3Object,
        /// What was expected.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// The unpacker stopped reading (it failed); its error is the one to report.
    #[error("the unpacker stopped reading")]
    ConsumerGone,
}

exit_codes!(FetchError {
    Replaced(_) => TEMPFAIL,
    Unavailable { .. } => UNAVAILABLE,
    SizeMismatch { .. } => DATAERR,
    ConsumerGone => SOFTWARE,
});

/// How long a download may wait for the next bytes, and take in all.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Silence between two pieces of the body (`[s3] read_timeout`): the body is resumed.
    pub read: Duration,
    /// The whole download, resumes included (`[s3] download_deadline`).
    pub deadline: Duration,
}

impl Timeouts {
    /// The timeouts `[s3]` configures.
    pub fn from_config(cfg: &crate::config::S3Config) -> Timeouts {
        Timeouts {
            read: cfg.read_timeout.0,
            deadline: cfg.download_deadline.0,
        }
    }
}

/// Downloads `v` into `tx`, calling `progress(bytes_so_far)` as data arrives.
pub async fn download(
    s3: &Client,
    v: &Verified,
    timeouts: Timeouts,
    tx: mpsc::Sender<Chunk>,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<Downloaded, FetchError> {
    let sink = Sink {
        tx,
        progress,
        observe: &mut |_| {},
    };
    download_observed(s3, v, timeouts, sink).await
}

/// [`download`], also handing every byte, in order and exactly once, to `sink.observe` (a
/// signature verifier, for example) as it is hashed.
pub async fn download_observed(
    s3: &Client,
    v: &Verified,
    timeouts: Timeouts,
    sink: Sink<'_>,
) -> Result<Downloaded, FetchError> {
    let deadline = timeouts.deadline;
    tokio::time::timeout(deadline, download_within(s3, v, timeouts.read, sink))
        .await
        .unwrap_or_else(|_| {
            Err(FetchError::Unavailable {
                object: v.object.clone(),
                reason: format!(
                    "it did not finish within {} ([s3] download_deadline)",
                    humantime::format_duration(deadline)
                ),
            })
        })
}

/// Where downloaded bytes go: the unpacker's channel, the progress display, an observer.
pub struct Sink<'a> {
    /// The unpacker's (or spool's) channel.
    pub tx: mpsc::Sender<Chunk>,
    /// Called with the bytes received so far.
    pub progress: &'a mut (dyn FnMut(u64) + Send),
    /// Called with every chunk, in order, exactly once.
    pub observe: &'a mut (dyn FnMut(&[u8]) + Send),
}

async fn download_within(
    s3: &Client,
    v: &Verified,
    read_timeout: Duration,
    sink: Sink<'_>,
) -> Result<Downloaded, FetchError> {
    let Sink {
        tx,
        progress,
        observe,
    } = sink;
    let unavailable = |reason: String| FetchError::Unavailable {
        object: v.object.clone(),
        reason,
    };
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    let mut resumes = 0u32;
    loop {
        let object = &v.object;
        let mut req = s3.get_object().bucket(&object.bucket).key(&object.key);
        if let Some(etag) = &object.etag {
            req = req.if_match(etag);
        }
        if let Some(version) = &object.version_id {
            req = req.version_id(version);
        }
        if offset > 0 {
            req = req.range(format!("bytes={offset}-"));
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                return Err(match s3::classify(&e) {
                    S3Failure::PreconditionFailed | S3Failure::NotFound => {
                        FetchError::Replaced(object.clone())
                    }
                    other => unavailable(other.to_string()),
                });
            }
        };
        if offset > 0 {
            let expected = format!("bytes {offset}-");
            if !resp
                .content_range()
                .is_some_and(|r| r.starts_with(&expected))
            {
                return Err(unavailable(format!(
                    "the server ignored the Range request when resuming at byte {offset}"
                )));
            }
        }
        let mut body = resp.body;
        let broken = loop {
            let Ok(next) = tokio::time::timeout(read_timeout, body.next()).await else {
                break Some(format!(
                    "no data for {} ([s3] read_timeout)",
                    humantime::format_duration(read_timeout)
                ));
            };
            match next {
                Some(Ok(mut chunk)) => {
                    if offset + chunk.len() as u64 > v.size {
                        return Err(FetchError::SizeMismatch {
                            object: v.object.clone(),
                            expected: v.size,
                            got: offset + chunk.len() as u64,
                        });
                    }
                    hasher.update(&chunk);
                    observe(&chunk);
                    offset += chunk.len() as u64;
                    progress(offset);
                    let data = chunk.copy_to_bytes(chunk.len());
                    tx.send(Chunk::Data(data))
                        .await
                        .map_err(|_| FetchError::ConsumerGone)?;
                }
                Some(Err(e)) => break Some(error_chain(&e)),
                None => break None,
            }
        };
        match broken {
            // Every byte arrived; an error after the last one changes nothing, since the digest
            // of what arrived is checked against the expected one.
            trailing if offset == v.size => {
                if let Some(reason) = trailing {
                    tracing::debug!(error = %reason, "body ended with an error after the last byte");
                }
                tx.send(Chunk::End)
                    .await
                    .map_err(|_| FetchError::ConsumerGone)?;
                return Ok(Downloaded {
                    sha256: hex::encode(hasher.finalize()),
                    bytes: offset,
                    resumes,
                });
            }
            // A body that ends cleanly but short (a proxy or server that closed early, a wrong
            // Content-Length) is resumed like one that broke off: the pin guarantees the rest
            // is of the same object, and the digest checks the whole.
            broken if resumes < MAX_RESUMES => {
                let reason = broken
                    .unwrap_or_else(|| format!("the body ended at byte {offset} of {}", v.size));
                resumes += 1;
                tracing::warn!(
                    bucket = %object.bucket,
                    key = %object.key,
                    offset,
                    resumes,
                    error = %reason,
                    "download broke off, resuming with a range request"
                );
                tokio::time::sleep(Duration::from_millis(200 * u64::from(resumes))).await;
            }
            None => {
                return Err(FetchError::SizeMismatch {
                    object: v.object.clone(),
                    expected: v.size,
                    got: offset,
                });
            }
            Some(reason) => {
                return Err(unavailable(format!(
                    "{reason} (after {resumes} resumed attempts, at byte {offset})"
                )));
            }
        }
    }
}

/// The unpacker's end of the download channel, read like a file from a blocking thread.
pub struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    current: Bytes,
    done: bool,
}

impl ChannelReader {
    /// Reads what the download sends into `rx`.
    pub fn new(rx: mpsc::Receiver<Chunk>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
            done: false,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(b)) => self.current = b,
                Some(Chunk::End) => self.done = true,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the download stopped before the end of the artifact",
                    ));
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}
