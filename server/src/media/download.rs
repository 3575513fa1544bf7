//! A download stream: access checks, then the blob's header and the
//! requested chunks, read ahead from disk.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;

use huddle_core::proto::{ErrorBody, ErrorCode, Response};
use huddle_core::MediaId;
use huddle_io::BlobReader;
use tracing::{debug, warn};

use crate::service::{Service, Session};
use crate::store::MediaState;

use super::{err, io_err, respond, BlobStore, Transfer, BUF};

/// Handles a download stream: checks access, announces the range, sends it.
#[allow(clippy::too_many_arguments)]
pub async fn download(
    svc: &Arc<Service>,
    blobs: &Arc<BlobStore>,
    session: &Arc<Session>,
    media: MediaId,
    offset: u64,
    len: u64,
    mut send: quinn::SendStream,
) {
    match download_head(svc, blobs, session, media, offset, len).await {
        Err(e) => {
            if respond(&mut send, &Response::Error(e)).await {
                let _ = send.finish();
            }
        }
        Ok((resp, source, len, _transfer)) => {
            if !respond(&mut send, &resp).await {
                return;
            }
            let stall = blobs.config.transfer_stall_timeout;
            let sent = match source {
                Source::File(file) => from_file(file, offset, len, stall, &mut send).await,
                Source::Object(stream) => from_object(stream, stall, &mut send).await,
            };
            match sent {
                Sent::All(sent) => {
                    if sent < len {
                        // Shorter than recorded: end the stream where the
                        // data ends; the client's checks name the damage.
                        warn!(media = %media, "stored blob is shorter than its record");
                    }
                    let _ = send.finish();
                }
                Sent::Failed(e) => {
                    warn!(media = %media, error = %e, "reading a stored blob failed");
                    let _ = send.reset(1u32.into());
                }
                Sent::NotRead => {
                    debug!(media = %media, "download not read; stream ended");
                    let _ = send.reset(1u32.into());
                }
                Sent::Gone => {}
            }
        }
    }
}

/// Where a download's bytes come from.
pub(super) enum Source {
    File(BlobReader),
    /// A ranged GET from the object store, as it arrives.
    Object(BoxStream<'static, std::io::Result<Bytes>>),
}

/// How sending a range ended.
enum Sent {
    /// Every byte the source had (this many).
    All(u64),
    /// The source failed.
    Failed(std::io::Error),
    /// The receiver read nothing for the stall timeout.
    NotRead,
    /// The stream was reset or the connection lost.
    Gone,
}

/// Sends one piece, unless the receiver stopped reading.
async fn send_piece(send: &mut quinn::SendStream, b: Bytes, stall: Duration) -> Option<Sent> {
    match tokio::time::timeout(stall, send.write_chunk(b)).await {
        Ok(Ok(())) => None,
        Ok(Err(_)) => Some(Sent::Gone),
        Err(_) => Some(Sent::NotRead),
    }
}

/// Each buffer is read from disk in a short blocking task while the ones
/// before are sent, [`READ_AHEAD`] reads in flight at once: disk and
/// network overlap, and no thread waits for a slow reader. With what QUIC
/// holds unacknowledged (the send window) that bounds a download's memory
/// whatever the item's size.
async fn from_file(
    file: BlobReader,
    offset: u64,
    len: u64,
    stall: Duration,
    send: &mut quinn::SendStream,
) -> Sent {
    let read = |mut file: BlobReader, at: u64, want: usize| {
        tokio::task::spawn_blocking(move || {
            let r = file.read_at(at, want);
            (file, r)
        })
    };
    // Each read in flight has a reader of its own (one file descriptor
    // each, sharing their buffers); without a second one, one read at once.
    let mut idle = vec![file];
    for _ in 1..READ_AHEAD {
        match idle[0].try_clone() {
            Ok(r) => idle.push(r),
            Err(_) => break,
        }
    }
    let mut reading = std::collections::VecDeque::with_capacity(READ_AHEAD);
    let (mut asked, mut sent) = (0u64, 0u64);
    // Every idle reader asks for the next piece not yet asked for.
    let ask = |idle: &mut Vec<BlobReader>,
               reading: &mut std::collections::VecDeque<_>,
               asked: &mut u64| {
        while *asked < len {
            let Some(file) = idle.pop() else { break };
            let want = BUF.min((len - *asked) as usize);
            reading.push_back(read(file, offset + *asked, want));
            *asked += want as u64;
        }
    };
    ask(&mut idle, &mut reading, &mut asked);
    while let Some(next) = reading.pop_front() {
        let Ok((file, r)) = next.await else {
            return Sent::Failed(std::io::Error::other("reading task failed"));
        };
        idle.push(file);
        // The next read starts before this piece is sent.
        ask(&mut idle, &mut reading, &mut asked);
        let b = match r {
            // The file ends here (shorter than its record): what follows
            // is past its end too.
            Ok(b) if b.is_empty() => break,
            Ok(b) => b,
            Err(e) => return Sent::Failed(e),
        };
        let short = b.len() < BUF.min((len - sent) as usize);
        sent += b.len() as u64;
        if let Some(end) = send_piece(send, b, stall).await {
            return end;
        }
        if short {
            break;
        }
    }
    Sent::All(sent)
}

/// Reads of one download from disk in flight at once: at one, each read
/// waited out the disk's latency (1 MiB reads of a blob ran at 830 MB/s on
/// the benchmark machine, two at once at 1,390 MB/s).
const READ_AHEAD: usize = 2;

/// Forwards a ranged GET as it arrives; the connection to the object
/// store is read only as fast as the client takes the bytes.
async fn from_object(
    mut stream: BoxStream<'static, std::io::Result<Bytes>>,
    stall: Duration,
    send: &mut quinn::SendStream,
) -> Sent {
    let mut sent = 0u64;
    loop {
        let b = match tokio::time::timeout(stall, stream.next()).await {
            Ok(Some(Ok(b))) => b,
            Ok(Some(Err(e))) => return Sent::Failed(e),
            Ok(None) => return Sent::All(sent),
            Err(_) => return Sent::Failed(std::io::Error::other("the media store stalled")),
        };
        sent += b.len() as u64;
        if let Some(end) = send_piece(send, b, stall).await {
            return end;
        }
    }
}

pub(super) async fn download_head(
    svc: &Arc<Service>,
    blobs: &BlobStore,
    session: &Session,
    media: MediaId,
    offset: u64,
    len: u64,
) -> Result<(Response, Source, u64, Transfer), ErrorBody> {
    let user = session
        .user()
        .ok_or_else(|| err(ErrorCode::NotAuthenticated, "authenticate first"))?;
    let transfer = blobs.transfer(&user)?;
    let rec = blobs
        .blocking(move |s| s.media(&media))
        .await?
        .map_err(ErrorBody::from)?
        .filter(|r| r.state == MediaState::Complete)
        .ok_or_else(|| err(ErrorCode::NotFound, format!("no media item {media}")))?;
    let member = match svc.load_group(&rec.group).await? {
        Some(g) => {
            svc.fresh(&g, &user).await;
            g.with_view(|v| v.is_member(&user))
        }
        None => false,
    };
    if !member {
        return Err(err(
            ErrorCode::NotMember,
            format!("{user} is not a member of the group of media item {media}"),
        ));
    }
    let len = if len == 0 {
        rec.total_len.saturating_sub(offset)
    } else {
        len
    };
    if offset > rec.total_len || len > rec.total_len - offset {
        return Err(err(
            ErrorCode::BadRequest,
            format!(
                "range {offset}+{len} is outside the item's {} bytes",
                rec.total_len
            ),
        ));
    }
    let source = match &blobs.objects {
        Some(o) => Source::Object(o.read(&media, offset..offset + len).await?),
        None => {
            let path = blobs.blob_path(&media);
            let mode = blobs.io_mode;
            let file = tokio::task::spawn_blocking(move || BlobReader::open(&path, mode))
                .await
                .map_err(|_| err(ErrorCode::Internal, "internal error"))?
                .map_err(io_err)?;
            Source::File(file)
        }
    };
    Ok((
        Response::Download {
            total_len: rec.total_len,
            hash: rec.hash,
            offset,
            len,
            group: rec.group,
        },
        source,
        len,
        transfer,
    ))
}
