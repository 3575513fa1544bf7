//! An upload to the object store: the stream's bytes gathered into parts,
//! each part hashed (its BLAKE3 chaining value) and stored while the next
//! is received, progress recorded part by part, the whole blob's hash
//! checked from the parts' values, and the upload completed only then.

use bytes::Bytes;
use huddle_core::proto::{ErrorBody, ErrorCode, Response, UploadRequest};
use huddle_core::MediaId;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::store::{MediaRecord, MediaState, Multipart};

use super::objects::{part_cv, parts_of, tree_hash, Objects, PartBuf, PART};
use super::upload::{gather, read_trailer, respond, Gathered, HeadCheck, Trailer};
use super::{err, BlobStore};

/// A part on its way to the store: its ETag and chaining value, or why
/// it failed.
type Storing = JoinHandle<Result<(String, [u8; 32]), ErrorBody>>;

/// Records the item as it stands; a record that cannot be written stops
/// the upload (what is not recorded is not progress).
async fn record(blobs: &BlobStore, id: MediaId, rec: &mut MediaRecord) -> Result<(), ErrorBody> {
    rec.updated_ms = (blobs.config.clock)();
    let r = rec.clone();
    blobs
        .blocking(move |s| s.put_media(&id, &r))
        .await?
        .map_err(ErrorBody::from)
}

/// Receives the rest of an upload whose record is `rec` (new or resumed)
/// into the object store, then checks and completes it.
pub(super) async fn receive(
    blobs: &BlobStore,
    o: &Objects,
    req: &UploadRequest,
    mut rec: MediaRecord,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    stop: &CancellationToken,
) -> Result<Option<Response>, ErrorBody> {
    let id = req.media;
    let total = req.total_len;
    let stall = blobs.config.transfer_stall_timeout;
    // The stored parts say where to go on. A record without an upload (a
    // new item, or one begun on the data-directory backend) starts over.
    let stored = rec.multipart.as_ref().map_or(0, |m| m.parts.len());
    let start = (stored as u64 * PART).min(total);
    rec.state = MediaState::Uploading { offset: start };
    // The header was checked when the first part came in.
    let mut head = HeadCheck::new(Vec::new(), req)?;
    if !respond(
        send,
        &Response::Upload {
            offset: start,
            complete: false,
        },
    )
    .await
    {
        return Ok(None);
    }
    let mut pos = start;
    let mut storing: Option<(Storing, u64)> = None;
    let mut interrupted = None;
    while pos < total {
        // A part buffer, within the DS's limit; waiting for one holds the
        // sender back.
        let taken = tokio::select! {
            p = tokio::time::timeout(stall, o.buffer()) => p.map_err(|_| err(
                ErrorCode::Unavailable,
                "the server is storing as many uploads as it holds at once; the upload keeps its progress, try again",
            ))?,
            () = stop.cancelled() => {
                interrupted = Some(Gathered::TakenOver);
                break;
            }
        };
        let end = (pos + PART).min(total);
        let want = (end - pos) as usize;
        let PartBuf {
            permit,
            buf: mut part,
        } = taken;
        let mut why = Gathered::Full;
        while part.len() < want {
            let mut batch = Vec::new();
            let (_, w) = gather(recv, want - part.len(), stall, stop, &mut batch).await;
            if pos == 0 {
                if let Err(e) = head.feed(&batch, req) {
                    finish(storing.take()).await;
                    blobs.forget(id, &rec).await;
                    return Err(e);
                }
            }
            for b in &batch {
                part.extend_from_slice(b);
            }
            if !matches!(w, Gathered::Full) {
                why = w;
                break;
            }
        }
        if part.len() < want {
            // Bytes short of a whole part are not kept: the upload resumes
            // at the end of the last stored part.
            interrupted = Some(why);
            break;
        }
        // One part is stored at a time: the one before must be recorded
        // first, so that progress is always a run of parts from the start.
        if let Some((s, at)) = storing.take() {
            stored_part(blobs, id, &mut rec, s, at, total).await?;
        }
        if rec.multipart.is_none() {
            let upload = o.begin(&id).await?;
            rec.multipart = Some(Multipart {
                upload: upload.clone(),
                parts: Vec::new(),
            });
            if let Err(e) = record(blobs, id, &mut rec).await {
                let _ = o.abort(&id, &upload).await;
                return Err(e);
            }
        }
        let upload = rec
            .multipart
            .as_ref()
            .map(|m| m.upload.clone())
            .expect("begun above");
        let index = (pos / PART) as usize;
        storing = Some((
            store_part(o, id, upload, index, pos, part.freeze(), total, permit),
            end,
        ));
        pos = end;
    }
    if let Some((s, at)) = storing.take() {
        stored_part(blobs, id, &mut rec, s, at, total).await?;
    }
    let MediaState::Uploading { offset: durable } = rec.state else {
        unreachable!("uploading")
    };
    match interrupted {
        None => {}
        Some(Gathered::TakenOver) => {
            return Err(err(
                ErrorCode::OutOfOrder,
                "a newer upload of this item by the same user took it over; this one stopped",
            ))
        }
        Some(Gathered::Gone) => return Ok(None),
        Some(_) => {
            return Err(err(
                ErrorCode::BadRequest,
                format!("the upload stopped before {total} bytes; resume from {durable}"),
            ))
        }
    }
    let announced = match read_trailer(recv, stall, stop).await {
        Trailer::Hash(h) => h,
        Trailer::Gone => return Ok(None),
        Trailer::Refused(e, discard) => {
            if discard {
                blobs.forget(id, &rec).await;
            }
            return Err(e);
        }
    };
    if rec.hash != announced {
        blobs.forget(id, &rec).await;
        return Err(err(
            ErrorCode::IntegrityError,
            "the uploaded bytes do not match the announced hash; the upload was discarded",
        ));
    }
    let m = rec.multipart.clone().expect("every part is stored");
    let etags = m.parts.into_iter().map(|(etag, _)| etag).collect();
    o.complete(&id, &m.upload, etags, total).await?;
    rec.state = MediaState::Complete;
    rec.multipart = None;
    record(blobs, id, &mut rec).await?;
    info!(media = %id, bytes = total, "media stored");
    Ok(Some(Response::Upload {
        offset: total,
        complete: true,
    }))
}

/// Hashes part `index` (bytes `data` at `offset`) and stores it at once,
/// in a task of its own that holds its buffer's permit until then. The
/// value is the part's chaining value, or for a blob of one part its hash.
#[allow(clippy::too_many_arguments)]
fn store_part(
    o: &Objects,
    id: MediaId,
    upload: String,
    index: usize,
    offset: u64,
    data: Bytes,
    total: u64,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Storing {
    let o = o.clone();
    tokio::spawn(async move {
        let keep = data.clone();
        let hashed = data.clone();
        let hashing = tokio::task::spawn_blocking(move || {
            if parts_of(total) == 1 {
                *blake3::hash(&hashed).as_bytes()
            } else {
                part_cv(offset, &hashed)
            }
        });
        let (etag, cv) = tokio::join!(o.put_part(&id, &upload, index, data), hashing);
        o.recycle(keep);
        drop(permit);
        let cv = cv.map_err(|_| err(ErrorCode::Internal, "internal error"))?;
        Ok((etag?, cv))
    })
}

/// Waits for a part's task and records the part: its ETag and chaining
/// value join the record, and the durable offset moves to `end`. Once the
/// last part is stored, the whole blob's hash is computed and recorded.
async fn stored_part(
    blobs: &BlobStore,
    id: MediaId,
    rec: &mut MediaRecord,
    storing: Storing,
    end: u64,
    total: u64,
) -> Result<(), ErrorBody> {
    let (etag, cv) = storing
        .await
        .map_err(|_| err(ErrorCode::Internal, "internal error"))??;
    let m = rec.multipart.as_mut().expect("begun before any part");
    m.parts.push((etag, cv));
    rec.state = MediaState::Uploading { offset: end };
    if end == total && parts_of(total) == 1 {
        rec.hash = cv;
    } else if end == total {
        let cvs: Vec<[u8; 32]> = m.parts.iter().map(|(_, cv)| *cv).collect();
        rec.hash = tree_hash(&cvs, total, PART).ok_or_else(|| {
            err(
                ErrorCode::Internal,
                "the stored parts do not make up the item",
            )
        })?;
    }
    debug!(media = %id, end, "part stored");
    record(blobs, id, rec).await
}

/// Waits for a part still being stored (its outcome no longer matters).
async fn finish(storing: Option<(Storing, u64)>) {
    if let Some((s, _)) = storing {
        let _ = s.await;
    }
}
