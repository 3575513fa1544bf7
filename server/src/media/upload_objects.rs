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
use super::{err, upload_lease, BlobStore, ACTIVE_WAIT, UPLOAD_LEASE};

/// A part on its way to the store: its ETag and chaining value, or why
/// it failed.
type Storing = JoinHandle<Result<(String, [u8; 32]), ErrorBody>>;

/// The stream's hold on its item: the item's upload lease, renewed with
/// every record written, so that two streams of one item (on two nodes of
/// a cluster) never both write it.
struct Hold {
    holder: u64,
}

/// Records the item as it stands, renewing the stream's lease first; a
/// record that cannot be written stops the upload (what is not recorded is
/// not progress), and so does an item deleted meanwhile (the sweep) or
/// taken over by another stream (whose lease this one's lapsed into).
async fn record(
    blobs: &BlobStore,
    hold: &Hold,
    id: MediaId,
    rec: &mut MediaRecord,
) -> Result<(), ErrorBody> {
    rec.updated_ms = (blobs.config.clock)();
    let (r, holder) = (rec.clone(), hold.holder);
    let written = blobs
        .blocking(move |s| {
            if !s.lease(&upload_lease(&id), holder, UPLOAD_LEASE)? {
                return Ok(None);
            }
            s.update_media(&id, &r).map(Some)
        })
        .await?
        .map_err(ErrorBody::from)?;
    match written {
        Some(true) => Ok(()),
        Some(false) => Err(err(
            ErrorCode::NotFound,
            "the upload was deleted while it ran (it expired); send the file again",
        )),
        None => Err(err(
            ErrorCode::OutOfOrder,
            "a newer upload of this item took it over; this one stopped",
        )),
    }
}

/// Receives the rest of an upload of an item (recorded) into the
/// object store, then checks and completes it; first waits (up to 10 s)
/// for any other stream of the item, on any node, to end.
pub(super) async fn receive(
    blobs: &BlobStore,
    o: &Objects,
    req: &UploadRequest,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    stop: &CancellationToken,
) -> Result<Option<Response>, ErrorBody> {
    let id = req.media;
    let hold = Hold {
        holder: rand::random(),
    };
    let deadline = tokio::time::Instant::now() + ACTIVE_WAIT;
    while !blobs.lock(id, hold.holder).await {
        if tokio::time::Instant::now() >= deadline {
            return Err(err(
                ErrorCode::OutOfOrder,
                "an earlier upload of this item is still running on another node; try again shortly",
            ));
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            () = stop.cancelled() => return Ok(None),
        }
    }
    let r = locked(blobs, o, &hold, req, send, recv, stop).await;
    blobs.unlock(id, hold.holder).await;
    r
}

/// [`receive`], holding the item.
#[allow(clippy::too_many_arguments)]
async fn locked(
    blobs: &BlobStore,
    o: &Objects,
    hold: &Hold,
    req: &UploadRequest,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    stop: &CancellationToken,
) -> Result<Option<Response>, ErrorBody> {
    let id = req.media;
    let total = req.total_len;
    // Read again now that no other stream writes it: another node's
    // stream may have stored more parts, or completed the item, or the
    // sweep deleted it.
    let mut rec = match blobs
        .blocking(move |s| s.media(&id))
        .await?
        .map_err(ErrorBody::from)?
    {
        Some(r) if r.state == MediaState::Complete => {
            return Ok(Some(Response::Upload {
                offset: total,
                complete: true,
            }))
        }
        Some(r) => r,
        None => {
            return Err(err(
                ErrorCode::NotFound,
                "the upload was deleted (it expired); send the file again",
            ))
        }
    };
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
    let mut busy = false;
    while pos < total {
        // A part buffer, within the DS's and the user's limits; waiting for
        // one holds the sender back.
        let taken = tokio::select! {
            p = tokio::time::timeout(stall, o.buffer(&rec.uploader)) => match p {
                Ok(p) => p,
                Err(_) => {
                    busy = true;
                    break;
                }
            },
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
            stored_part(blobs, hold, id, &mut rec, s, at, total).await?;
        }
        if rec.multipart.is_none() {
            let upload = o.begin(&id).await?;
            rec.multipart = Some(Multipart {
                upload: upload.clone(),
                parts: Vec::new(),
            });
            if let Err(e) = record(blobs, hold, id, &mut rec).await {
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
        stored_part(blobs, hold, id, &mut rec, s, at, total).await?;
    }
    let MediaState::Uploading { offset: durable } = rec.state else {
        unreachable!("uploading")
    };
    if busy {
        return Err(err(
            ErrorCode::Unavailable,
            format!("the server is storing as many uploads as it holds at once; resume from {durable} later"),
        ));
    }
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
    record(blobs, hold, id, &mut rec).await?;
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
    permit: super::objects::Permits,
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
    hold: &Hold,
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
    record(blobs, hold, id, rec).await
}

/// Waits for a part still being stored (its outcome no longer matters).
async fn finish(storing: Option<(Storing, u64)>) {
    if let Some((s, _)) = storing {
        let _ = s.await;
    }
}
