//! An upload stream: admission, taking over an earlier stream of the same
//! uploader, receiving into the disk writer, the hash check and completion.

use std::sync::Arc;
use std::time::Instant;

use huddle_core::frame;
use huddle_core::media::{Header, HEADER_LEN};
use huddle_core::proto::{self, ErrorBody, ErrorCode, Response, UploadRequest, UPLOAD_TRAILER_LEN};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::service::{Service, Session};
use crate::store::{MediaRecord, MediaState};

use super::admission::{self, Existing};
use super::disk::reopen_partial;
use super::{
    boundary, check_header, err, io_err, persist, Active, ActiveGuard, BlobStore, BlobWriter,
    ACTIVE_WAIT, BUF,
};

pub(super) async fn respond(send: &mut quinn::SendStream, resp: &Response) -> bool {
    send.write_all(&proto::encode_frame(resp)).await.is_ok()
}

/// Handles an upload stream: answers where to continue, receives the rest,
/// checks it, answers with the outcome.
pub async fn upload(
    svc: &Arc<Service>,
    blobs: &Arc<BlobStore>,
    session: &Arc<Session>,
    req: UploadRequest,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let result = upload_inner(svc, blobs, session, &req, &mut send, &mut recv).await;
    let resp = match result {
        Ok(Some(r)) => r,
        // The client went away mid-upload; its progress is kept.
        Ok(None) => return,
        Err(e) => {
            debug!(media = %req.media, error = %e.message, "upload refused");
            Response::Error(e)
        }
    };
    if respond(&mut send, &resp).await {
        let _ = send.finish();
    }
    // Whatever the client still sends is not needed.
    let _ = recv.stop(0u32.into());
}

pub(super) async fn upload_inner(
    svc: &Arc<Service>,
    blobs: &BlobStore,
    session: &Session,
    req: &UploadRequest,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<Option<Response>, ErrorBody> {
    let user = session
        .user()
        .ok_or_else(|| err(ErrorCode::NotAuthenticated, "authenticate first"))?;
    let mut transfer = blobs.transfer(&user)?;
    let group = svc
        .load_group(&req.group)
        .await?
        .ok_or_else(|| err(ErrorCode::UnknownGroup, format!("no group {}", req.group)))?;
    svc.fresh(&group, &user).await;
    if !group.with_view(|v| v.is_member(&user)) {
        return Err(err(
            ErrorCode::NotMember,
            format!("{user} is not a member of group {}", req.group),
        ));
    }
    // A reader, or a member of an announcement group, uploads nothing.
    group.with_view(|v| v.check_upload(&user))?;
    admission::check_request(req, blobs.config.max_media_item)?;
    let id = req.media;
    // The uploader resuming takes the upload over: its earlier stream may
    // belong to a process that was killed, on a connection the DS has not
    // yet seen die. That stream is asked to stop; it keeps what is durable
    // and ends, and this one goes on from there.
    let stop = CancellationToken::new();
    let deadline = Instant::now() + ACTIVE_WAIT;
    loop {
        {
            let mut active = blobs.active.lock().expect("active lock");
            match active.get(&id) {
                None => {
                    active.insert(
                        id,
                        Active {
                            uploader: user.clone(),
                            stop: stop.clone(),
                        },
                    );
                    break;
                }
                Some(a) if a.uploader == user => a.stop.cancel(),
                Some(_) => {
                    return Err(err(
                        ErrorCode::NotMember,
                        "only the uploader may resume an upload",
                    ))
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(err(
                ErrorCode::OutOfOrder,
                "an earlier upload of this item did not stop in time; try again",
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let _guard = ActiveGuard { blobs, id };
    // Only now: an earlier stream of this upload that was taken over has
    // given its memory back.
    blobs
        .hold(&mut transfer, super::upload_memory(req.total_len))
        .await?;
    let now = (blobs.config.clock)();
    let existing = blobs
        .blocking(move |s| s.media(&id))
        .await?
        .map_err(ErrorBody::from)?;
    let mut rec = match existing {
        Some(r) => match admission::check_existing(&r, req, &user)? {
            Existing::Complete => {
                return Ok(Some(Response::Upload {
                    offset: r.total_len,
                    complete: true,
                }))
            }
            Existing::Resume => r,
        },
        None => {
            let r = MediaRecord {
                group: req.group,
                uploader: user.clone(),
                total_len: req.total_len,
                hash: [0; 32],
                state: MediaState::Uploading { offset: 0 },
                created_ms: now,
                updated_ms: now,
                multipart: None,
            };
            blobs.admit(id, &r).await?;
            r
        }
    };
    if let Some(objects) = &blobs.objects {
        return super::upload_objects::receive(blobs, objects, req, send, recv, &stop).await;
    }
    let MediaState::Uploading { offset: start } = rec.state else {
        unreachable!("complete items returned above")
    };
    let path = blobs.partial_path(&id);
    // Open the partial file, drop anything past the durable offset (it may
    // be torn), and re-hash (and re-read the header of) what is kept.
    let p = path.clone();
    let mode = blobs.io_mode;
    let (file, hasher, head_bytes) =
        tokio::task::spawn_blocking(move || reopen_partial(&p, start, mode))
            .await
            .map_err(|_| err(ErrorCode::Internal, "internal error"))?
            .map_err(io_err)?;
    let mut head = HeadCheck::new(head_bytes, req)?;
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

    // The network side fills buffers; a writer thread writes, hashes (a
    // resumed upload) and periodically syncs them, so disk work overlaps with receiving.
    let writer = BlobWriter::start(file, hasher, blobs.room.clone());
    let mut pos = start;
    let mut durable = start;
    let mut ended = false;
    let mut gone = false;
    let mut taken_over = false;
    while pos < req.total_len && !ended && !gone {
        // Gather up to BUF bytes of received chunks (no copy), never past
        // the blob's end, and hand them to the writer in one piece.
        let mut batch: Vec<bytes::Bytes> = Vec::new();
        let room = BUF.min((req.total_len - pos) as usize);
        let (filled, why) = gather(
            recv,
            room,
            blobs.config.transfer_stall_timeout,
            &stop,
            &mut batch,
        )
        .await;
        match why {
            Gathered::Full => {}
            Gathered::Ended => ended = true,
            Gathered::Gone => gone = true,
            Gathered::TakenOver => {
                gone = true;
                taken_over = true;
            }
        }
        if let Err(e) = head.feed(&batch, req) {
            drop(writer.finish().await);
            blobs.forget(id, &rec).await;
            return Err(e);
        }
        pos += filled as u64;
        if filled > 0 && !writer.write(batch).await {
            // The writer failed (for example: the disk is full).
            break;
        }
        let b = boundary(head.header.as_ref(), writer.synced());
        if b > durable {
            durable = b;
            persist(blobs, id, &mut rec, durable).await;
        }
    }
    let (result, synced) = writer.finish().await;
    let (file, hasher) = match result {
        Ok(v) => v,
        Err(e) => {
            let b = boundary(head.header.as_ref(), synced);
            persist(blobs, id, &mut rec, b.max(durable)).await;
            return Err(io_err(e));
        }
    };
    if pos < req.total_len {
        let boundary = boundary(head.header.as_ref(), synced);
        persist(blobs, id, &mut rec, boundary).await;
        if taken_over {
            return Err(err(
                ErrorCode::OutOfOrder,
                "a newer upload of this item by the same user took it over; this one stopped",
            ));
        }
        if gone {
            return Ok(None);
        }
        return Err(err(
            ErrorCode::BadRequest,
            format!(
                "the upload stopped at {pos} of {} bytes; resume from {boundary}",
                req.total_len
            ),
        ));
    }
    // Every byte is here and on disk; the trailer names the hash.
    persist(blobs, id, &mut rec, pos).await;
    let announced = match read_trailer(recv, blobs.config.transfer_stall_timeout, &stop).await {
        Trailer::Hash(h) => h,
        Trailer::Gone => return Ok(None),
        Trailer::Refused(e, discard) => {
            if discard {
                blobs.forget(id, &rec).await;
            }
            return Err(e);
        }
    };
    // A resumed upload joins two attempts' bytes: the whole blob's hash
    // must be the announced one. One received whole in one stream was not
    // hashed (see `reopen_partial`); every receiver checks it.
    if hasher.is_some_and(|h| *h.finalize().as_bytes() != announced) {
        blobs.forget(id, &rec).await;
        return Err(err(
            ErrorCode::IntegrityError,
            "the uploaded bytes do not match the announced hash; the upload was discarded",
        ));
    }
    rec.hash = announced;
    tokio::task::spawn_blocking(move || file.sync_all())
        .await
        .map_err(|_| err(ErrorCode::Internal, "internal error"))?
        .map_err(io_err)?;
    // Record completion first, then move the file: a crash in between
    // leaves a complete record and a complete partial file, which start-up
    // moves into place.
    rec.state = MediaState::Complete;
    rec.updated_ms = (blobs.config.clock)();
    let r = rec.clone();
    let kept = blobs
        .blocking(move |s| s.update_media(&id, &r))
        .await?
        .map_err(ErrorBody::from)?;
    if !kept {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(err(
            ErrorCode::NotFound,
            "the upload was deleted while it ran (it expired); send the file again",
        ));
    }
    tokio::fs::rename(&path, blobs.blob_path(&id))
        .await
        .map_err(io_err)?;
    if let Ok(d) = tokio::fs::File::open(&blobs.dir).await {
        let _ = d.sync_all().await;
    }
    info!(media = %id, bytes = req.total_len, "media stored");
    Ok(Some(Response::Upload {
        offset: req.total_len,
        complete: true,
    }))
}

/// Why [`gather`] returned.
pub(super) enum Gathered {
    /// It has the bytes asked for.
    Full,
    /// The sender finished the stream.
    Ended,
    /// The stream was reset, the connection lost, or no byte came for the
    /// stall timeout.
    Gone,
    /// A newer stream of the same uploader took the upload over.
    TakenOver,
}

/// Receives up to `room` bytes into `batch` (the chunks as they came, no
/// copy); returns how many, and why it stopped.
pub(super) async fn gather(
    recv: &mut quinn::RecvStream,
    room: usize,
    stall: std::time::Duration,
    stop: &CancellationToken,
    batch: &mut Vec<bytes::Bytes>,
) -> (usize, Gathered) {
    let mut filled = 0usize;
    while filled < room {
        let chunk = tokio::select! {
            c = tokio::time::timeout(stall, recv.read_chunk(room - filled, true)) => c,
            () = stop.cancelled() => {
                debug!("upload taken over by a newer stream");
                return (filled, Gathered::TakenOver);
            }
        };
        let Ok(chunk) = chunk else {
            debug!("upload stalled; its progress is kept");
            return (filled, Gathered::Gone);
        };
        match chunk {
            Ok(Some(c)) => {
                filled += c.bytes.len();
                batch.push(c.bytes);
            }
            Ok(None) => return (filled, Gathered::Ended),
            Err(_) => return (filled, Gathered::Gone),
        }
    }
    (filled, Gathered::Full)
}

/// What followed the blob's last byte.
pub(super) enum Trailer {
    /// The announced hash of the whole blob.
    Hash([u8; 32]),
    /// Nobody to answer: the stream was reset, stalled or taken over.
    Gone,
    /// A refusal to answer with; `true`: discard the upload (more bytes
    /// than announced).
    Refused(ErrorBody, bool),
}

/// Reads the hash trailer that follows the blob's bytes.
pub(super) async fn read_trailer(
    recv: &mut quinn::RecvStream,
    stall: std::time::Duration,
    stop: &CancellationToken,
) -> Trailer {
    let mut trailer = [0u8; frame::HEADER_LEN + UPLOAD_TRAILER_LEN];
    let read = tokio::select! {
        r = tokio::time::timeout(stall, recv.read_exact(&mut trailer)) => r,
        () = stop.cancelled() => return Trailer::Gone,
    };
    match read {
        Ok(Ok(())) => {}
        Ok(Err(quinn::ReadExactError::FinishedEarly(_))) => {
            return Trailer::Refused(
                err(
                    ErrorCode::BadRequest,
                    "the upload ended without its hash trailer; send it to finish",
                ),
                false,
            )
        }
        Ok(Err(_)) | Err(_) => return Trailer::Gone,
    }
    let len_ok = frame::body_len(
        trailer[..frame::HEADER_LEN].try_into().expect("4 bytes"),
        UPLOAD_TRAILER_LEN,
    )
    .is_ok_and(|n| n == UPLOAD_TRAILER_LEN);
    if !len_ok {
        return Trailer::Refused(
            err(
                ErrorCode::TooLarge,
                "more bytes were sent than announced; the upload was discarded",
            ),
            true,
        );
    }
    Trailer::Hash(trailer[frame::HEADER_LEN..].try_into().expect("32 bytes"))
}

/// The blob's first [`HEADER_LEN`] bytes as they arrive, checked against
/// the request once they are all there.
pub(super) struct HeadCheck {
    bytes: Vec<u8>,
    /// The header, once checked.
    pub header: Option<Header>,
}

impl HeadCheck {
    /// Starts from the header bytes already stored (all of them, or the
    /// first few, or none).
    pub(super) fn new(bytes: Vec<u8>, req: &UploadRequest) -> Result<Self, ErrorBody> {
        let header = if bytes.len() == HEADER_LEN {
            Some(check_header(&bytes, req)?)
        } else {
            None
        };
        Ok(Self { bytes, header })
    }

    /// Takes what `batch` holds of the header; refuses a header that does
    /// not describe the upload.
    pub(super) fn feed(
        &mut self,
        batch: &[bytes::Bytes],
        req: &UploadRequest,
    ) -> Result<(), ErrorBody> {
        for b in batch {
            if self.bytes.len() >= HEADER_LEN {
                break;
            }
            let take = (HEADER_LEN - self.bytes.len()).min(b.len());
            self.bytes.extend_from_slice(&b[..take]);
            if self.bytes.len() == HEADER_LEN {
                self.header = Some(check_header(&self.bytes, req)?);
            }
        }
        Ok(())
    }
}
