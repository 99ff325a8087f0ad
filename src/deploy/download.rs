//! Fetch and unpack together: the artifact's bytes from S3 into a staging tree.
//!
//! Unsigned, the two overlap: the download streams into a bounded channel that the unpacker
//! reads on a blocking thread, so the artifact never lands on disk whole. Signed, the artifact
//! is spooled to a file under `staging/` while its SHA-256 and signature are computed, and
//! unpacked from that file only once both verified, so bytes nobody signed never reach the
//! decompressor or the tar parser (at the cost of the overlap, and of the artifact's size in
//! disk space while it runs).

use tokio::sync::mpsc;

use super::fetch::{self, ChannelReader, Downloaded, FetchError};
use super::release::Staging;
use super::unpack::{self, Compression, Stats, UnpackError};
use super::verify::Verified;
use super::{DeployError, Deployer, check_sha256};
use crate::contract::signature::Signed;
use crate::contract::state::Stage;
use crate::files::{free_space, human_bytes, is_no_space};

/// Bytes of the files under `dir` (what a failed unpack had written).
fn tree_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// A fetched, unpacked, checksummed tree waiting to be installed.
pub(super) struct Staged {
    pub(super) staging: Staging,
    pub(super) downloaded: Downloaded,
    pub(super) compression: Compression,
    pub(super) stats: Stats,
}

impl Deployer {
    fn fetch_timeouts(&self) -> fetch::Timeouts {
        fetch::Timeouts::from_config(&self.cfg.s3)
    }

    fn unpack_limits(&self) -> unpack::Limits {
        unpack::Limits {
            max_entries: self.cfg.unpack.max_entries,
            max_bytes: self.cfg.unpack.max_bytes.0,
            max_path_len: self.cfg.unpack.max_path_len,
            keep_group_world_write: self.cfg.unpack.keep_group_world_write,
        }
    }

    /// The deployment error for a failed unpack into `staging`: a full disk says how much
    /// the release had taken when it filled up (read before the staging tree is removed).
    fn unpack_error(v: &Verified, staging: &Staging, source: UnpackError) -> DeployError {
        match source {
            UnpackError::Io { path, source, .. } if is_no_space(&source) => DeployError::NoSpace {
                action: format!("unpacking {}", v.object),
                needed: format!(
                    "more than the {} it had unpacked",
                    human_bytes(tree_size(staging.path()))
                ),
                free: human_bytes(free_space(&path).unwrap_or(0)),
                path,
            },
            source => DeployError::Unpack {
                object: v.object.clone(),
                source,
            },
        }
    }

    /// Downloads and unpacks into a new staging directory: concurrently, or, with a
    /// signature to check, download, verify, then unpack.
    pub(super) async fn fetch_and_unpack(
        &self,
        v: &Verified,
        signed: Option<&Signed>,
    ) -> Result<Staged, DeployError> {
        if let Some(signed) = signed {
            return self.fetch_verify_unpack(v, signed).await;
        }
        let staging = self.layout.new_staging()?;
        let dest = staging.path().to_path_buf();
        let limits = self.unpack_limits();
        let (tx, rx) = mpsc::channel(fetch::CHANNEL_DEPTH);
        // The staging guard travels with the unpacker, so that even if this future is dropped
        // (shutdown) the tree is removed only after the unpacker has stopped writing into it.
        let unpacker = tokio::task::spawn_blocking(move || {
            let result = unpack::unpack(ChannelReader::new(rx), &dest, &limits);
            (staging, result)
        });
        let size = v.size;
        let mut progress = |done: u64| self.reporter.progress(done, size);
        // On cancellation the download is dropped, which closes the channel; the unpacker then
        // stops with an error and removes its staging tree before the join below returns.
        let fetched = tokio::select! {
            r = fetch::download(&self.s3, v, self.fetch_timeouts(), tx, &mut progress) => Some(r),
            _ = self.cancelled() => None,
        };
        let (staging, unpacked) = unpacker
            .await
            .map_err(|e| DeployError::Internal(format!("unpacking ({e})")))?;
        let Some(fetched) = fetched else {
            drop(staging);
            return Err(DeployError::Cancelled);
        };
        match (fetched, unpacked) {
            (Ok(downloaded), Ok((compression, stats))) => Ok(Staged {
                staging,
                downloaded,
                compression,
                stats,
            }),
            (Err(FetchError::ConsumerGone), Err(e)) | (Ok(_), Err(e)) => {
                Err(Self::unpack_error(v, &staging, e))
            }
            (Err(e), _) => Err(e.into()),
        }
    }

    /// The signed path: spool, verify signature and digest, then unpack the spooled file.
    async fn fetch_verify_unpack(
        &self,
        v: &Verified,
        signed: &Signed,
    ) -> Result<Staged, DeployError> {
        let spool = self.layout.new_staging()?;
        let spool_file = spool.path().join("artifact");
        let (tx, rx) = mpsc::channel(fetch::CHANNEL_DEPTH);
        let writer = {
            let path = spool_file.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
                let mut out =
                    std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
                let n = std::io::copy(&mut ChannelReader::new(rx), &mut out)?;
                out.into_inner()
                    .map_err(std::io::IntoInnerError::into_error)?;
                Ok(n)
            })
        };
        let size = v.size;
        let mut progress = |done: u64| self.reporter.progress(done, size);
        let mut verifier = signed.verifier()?;
        let mut observe = |chunk: &[u8]| verifier.update(chunk);
        let sink = fetch::Sink {
            tx,
            progress: &mut progress,
            observe: &mut observe,
        };
        let fetched = tokio::select! {
            r = fetch::download_observed(&self.s3, v, self.fetch_timeouts(), sink) => Some(r),
            _ = self.cancelled() => None,
        };
        let written = writer
            .await
            .map_err(|e| DeployError::Internal(format!("spooling the artifact ({e})")))?;
        let spool_err = |e: std::io::Error| {
            if is_no_space(&e) {
                DeployError::NoSpace {
                    path: spool_file.clone(),
                    action: format!("spooling {} for its signature check", v.object),
                    needed: human_bytes(v.size),
                    free: human_bytes(free_space(&spool_file).unwrap_or(0)),
                }
            } else {
                DeployError::Internal(format!("writing {} ({e})", spool_file.display()))
            }
        };
        let downloaded = match (fetched, written) {
            (None, _) => return Err(DeployError::Cancelled),
            // The spool stopped reading (a full disk, say): its error is the one that explains.
            (Some(Err(FetchError::ConsumerGone)), Err(e)) | (Some(Ok(_)), Err(e)) => {
                return Err(spool_err(e));
            }
            (Some(Err(e)), _) => return Err(e.into()),
            (Some(Ok(downloaded)), Ok(_)) => downloaded,
        };
        signed.finish(verifier)?;
        tracing::info!(artifact = %v.object, "signature verified");
        check_sha256(v, &downloaded)?;
        self.check_cancel()?;

        self.reporter
            .stage(Stage::Unpacking, Some(v.object.to_string()));
        let staging = self.layout.new_staging()?;
        let dest = staging.path().to_path_buf();
        let limits = self.unpack_limits();
        let (staging, unpacked) = tokio::task::spawn_blocking(move || {
            let result = std::fs::File::open(&spool_file)
                .map_err(|source| UnpackError::Io {
                    action: "open",
                    path: spool_file.clone(),
                    source,
                })
                .and_then(|f| {
                    unpack::unpack(
                        std::io::BufReader::with_capacity(1 << 20, f),
                        &dest,
                        &limits,
                    )
                });
            (staging, result)
        })
        .await
        .map_err(|e| DeployError::Internal(format!("unpacking ({e})")))?;
        drop(spool);
        let (compression, stats) = unpacked.map_err(|e| Self::unpack_error(v, &staging, e))?;
        Ok(Staged {
            staging,
            downloaded,
            compression,
            stats,
        })
    }
}
