//! Sending and fetching media: encrypt on this device, upload once, announce
//! the key to the group inside MLS, download and verify chunk by chunk.
//!
//! Uploads and downloads stream through one chunk-sized buffer, so memory
//! does not grow with the file. Both resume: an upload's key, salt and id
//! are kept in the database until it is announced, so running `send-file`
//! again continues where the server stopped; a download keeps its verified
//! plaintext in `HOME/partial/` and continues from the last whole chunk.

use std::path::Path;

use huddle_core::proto::Response;
use huddle_core::GroupId;
use rusqlite::Connection;

use super::{now_ms, Client};
use crate::app::MediaInfo;
use crate::db;
use crate::error::{ClientError, Result};

mod download;
mod send;

pub use download::{check_target, outside_home, safe_name};

/// Progress of a long transfer. `advance` returning `false` aborts the
/// transfer at once (its progress is kept for a later resume).
pub trait Progress {
    /// The transfer starts; `done` bytes of `total` are already there.
    fn start(&mut self, label: &str, total: u64, done: u64);
    /// `n` more bytes were transferred.
    fn advance(&mut self, n: u64) -> bool;
    /// The transfer ended (successfully or not).
    fn finish(&mut self) {}
}

/// No progress reporting.
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: &str, _: u64, _: u64) {}
    fn advance(&mut self, _: u64) -> bool {
        true
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError::Io(format!("{}: {e}", path.display()))
}

/// Checks that a download answer describes the item that was announced:
/// its ciphertext length and hash.
fn check_download_answer(resp: &Response, info: &MediaInfo) -> Result<()> {
    let Response::Download {
        total_len, hash, ..
    } = resp
    else {
        return Err(ClientError::Protocol(format!("unexpected {resp:?}")));
    };
    if *total_len != info.ciphertext_len || *hash != info.hash {
        return Err(integrity(
            "the server's copy is not the item the sender announced",
        ));
    }
    Ok(())
}

/// `f`, or an error if the transfer moves nothing for
/// [`crate::net::TRANSFER_STALL`] (a DS that stops sending must not hang a
/// download or an upload).
async fn stalled<T>(f: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(crate::net::TRANSFER_STALL, f)
        .await
        .map_err(|_| {
            ClientError::Io(format!(
                "the transfer moved nothing for {} s; run the command again to resume",
                crate::net::TRANSFER_STALL.as_secs()
            ))
        })
}

/// Reads sealed chunk `i` of a download into `buf` (its length).
async fn read_sealed(
    recv: &mut quinn::RecvStream,
    buf: &mut [u8],
    i: u32,
    server: &str,
) -> Result<()> {
    stalled(recv.read_exact(buf)).await?.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => {
            integrity(format!("the blob ends inside chunk {i} (truncated)"))
        }
        other => ClientError::Connect {
            addr: server.to_owned(),
            reason: other.to_string(),
        },
    })
}

/// Receives sealed chunk `i` of a download, `n` bytes, as the pieces QUIC
/// holds it in (no copy).
async fn read_sealed_parts(
    recv: &mut quinn::RecvStream,
    n: usize,
    i: u32,
    server: &str,
) -> Result<Vec<bytes::Bytes>> {
    let mut parts = Vec::new();
    let mut got = 0;
    while got < n {
        let chunk = stalled(recv.read_chunk(n - got, true))
            .await?
            .map_err(|e| ClientError::Connect {
                addr: server.to_owned(),
                reason: e.to_string(),
            })?
            .ok_or_else(|| integrity(format!("the blob ends inside chunk {i} (truncated)")))?;
        got += chunk.bytes.len();
        parts.push(chunk.bytes);
    }
    Ok(parts)
}

fn integrity(e: impl std::fmt::Display) -> ClientError {
    ClientError::Integrity(e.to_string())
}

/// Records a media item announced in a group, so `download` can find its
/// key later.
pub fn remember(conn: &Connection, group: &GroupId, info: &MediaInfo) -> Result<()> {
    db::media::remember(conn, group, info)
}

/// A pending upload, as kept in `huddle_uploads`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Pending {
    info: MediaInfo,
    salt: [u8; 32],
}

impl Client {
    /// What this device knows of a media item (from the group message that
    /// announced it).
    ///
    /// `media` is the id or any unique prefix of it.
    pub fn media_info(&self, media: &str) -> Result<(GroupId, MediaInfo)> {
        if media.is_empty() || !media.bytes().all(|b| b.is_ascii_hexdigit()) || media.len() > 32 {
            return Err(ClientError::Usage(format!("{media:?} is not a media id")));
        }
        let rows = db::media::find(&self.db, media)?;
        let (g, info) = match <[_; 1]>::try_from(rows) {
            Ok([one]) => one,
            Err(rows) if rows.is_empty() => {
                return Err(ClientError::Usage(format!(
                    "no media {media} on this device (run `huddle sync` to receive new messages)"
                )))
            }
            Err(_) => {
                return Err(ClientError::Usage(format!(
                    "several media items start with {media}; give more of the id"
                )))
            }
        };
        Ok((g, info))
    }
}
