//! Encrypted media blobs: resumable uploads, range downloads, quota and
//! retention.
//!
//! A blob is the ciphertext of one media item in the format of
//! `docs/MEDIA.md`; the DS never sees its key. It checks what it can without
//! one: that the header names the item and group of the upload, that the
//! length matches the header's layout, and that the BLAKE3 hash of the whole
//! blob is the one announced. Only then does the blob become fetchable, and
//! only by current members of its group.
//!
//! Uploads land in `blobs/partial/ID.part`. Every 16 MiB the file is synced
//! and the last chunk boundary reached is recorded in the store; an
//! interrupted upload resumes from there. A completed blob is renamed to
//! `blobs/ID.blob`. Both directions stream through fixed buffers, so memory
//! does not grow with the item's size.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use huddle_core::frame;
use huddle_core::media::{BlobPosition, Header, HEADER_LEN};
use huddle_core::proto::{self, ErrorBody, ErrorCode, Response, UploadRequest, UPLOAD_TRAILER_LEN};
use huddle_core::MediaId;
use tokio::io::AsyncSeekExt as _;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::ServerConfig;
use crate::service::{now_ms, Service, Session};
use crate::store::{MediaRecord, MediaState, Store, StoreError};

/// Bytes moved per read or write.
const BUF: usize = 1 << 20;
/// How long a new upload of an item waits for an earlier stream of the same
/// item, which it asked to stop, to wind up before it is refused.
const ACTIVE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// An upload in progress on some stream.
#[derive(Debug)]
struct Active {
    uploader: String,
    /// Asks that stream to stop, keeping its durable progress.
    stop: CancellationToken,
}
/// Progress is made durable at least this often (in bytes).
const SYNC_EVERY: u64 = 16 << 20;

/// How many more bytes the blob disk takes before it reports itself full:
/// no limit but the disk's own, except in fault tests, which set one.
#[derive(Clone, Debug, Default)]
pub(crate) struct Room(#[cfg(test)] pub(crate) Arc<std::sync::Mutex<Option<u64>>>);

impl Room {
    /// How much of `n` bytes may be written (less: the disk is full after).
    fn take(&self, n: usize) -> usize {
        #[cfg(test)]
        if let Some(left) = self.0.lock().expect("room lock").as_mut() {
            let k = n.min(usize::try_from(*left).unwrap_or(usize::MAX));
            *left -= k as u64;
            return k;
        }
        n
    }
}

/// The blob directory and its accounting.
pub struct BlobStore {
    dir: PathBuf,
    partial: PathBuf,
    store: Arc<dyn Store>,
    config: Arc<ServerConfig>,
    /// Items with an upload in progress on some stream.
    active: Mutex<HashMap<MediaId, Active>>,
    /// Transfers (uploads and downloads) running, per user and in all.
    transfers: Arc<Mutex<(HashMap<String, usize>, usize)>>,
    /// Bytes reserved by every known item (complete or not).
    used: AtomicU64,
    last_sweep: Mutex<Option<Instant>>,
    pub(crate) room: Room,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

struct ActiveGuard<'a> {
    blobs: &'a BlobStore,
    id: MediaId,
}

/// One running transfer, counted until dropped.
struct Transfer {
    counts: Arc<Mutex<(HashMap<String, usize>, usize)>>,
    user: String,
}

impl Drop for Transfer {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("transfers lock");
        c.1 -= 1;
        if let Some(n) = c.0.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                c.0.remove(&self.user);
            }
        }
    }
}

impl BlobStore {
    /// Counts a transfer of `user`, within the per-user and DS-wide limits.
    fn transfer(&self, user: &str) -> Result<Transfer, ErrorBody> {
        let mut c = self.transfers.lock().expect("transfers lock");
        let (per_user, total) = (
            self.config.max_transfers_per_user,
            self.config.max_transfers_total,
        );
        let mine = c.0.get(user).copied().unwrap_or(0);
        if mine >= per_user {
            return Err(err(
                ErrorCode::QuotaExceeded,
                format!(
                    "{user} has {per_user} transfers running, the most this server allows per user"
                ),
            ));
        }
        if c.1 >= total {
            return Err(err(
                ErrorCode::QuotaExceeded,
                "the server is running as many transfers as it takes; try again soon",
            ));
        }
        c.1 += 1;
        *c.0.entry(user.to_owned()).or_insert(0) += 1;
        Ok(Transfer {
            counts: self.transfers.clone(),
            user: user.to_owned(),
        })
    }

    /// Transfers running now.
    pub fn transfers(&self) -> usize {
        self.transfers.lock().expect("transfers lock").1
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.blobs
            .active
            .lock()
            .expect("active lock")
            .remove(&self.id);
    }
}

fn err(code: ErrorCode, m: impl Into<String>) -> ErrorBody {
    ErrorBody::new(code, m)
}

fn store_err(e: StoreError) -> ErrorBody {
    match e {
        StoreError::Full => err(ErrorCode::QuotaExceeded, "the server's storage is full"),
        other => {
            warn!(error = %other, "storage failure");
            err(ErrorCode::Internal, "storage failure")
        }
    }
}

fn io_err(e: std::io::Error) -> ErrorBody {
    if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(ENOSPC) {
        err(
            ErrorCode::QuotaExceeded,
            "the server's disk is full; the upload keeps its progress and can resume later",
        )
    } else {
        warn!(error = %e, "blob i/o failure");
        err(ErrorCode::Internal, "storage failure")
    }
}

impl BlobStore {
    /// Opens `DATA/blobs`, removes partial files no record points to, and
    /// counts the space in use.
    pub fn open(config: Arc<ServerConfig>, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        let dir = config.data_dir.join("blobs");
        let partial = dir.join("partial");
        std::fs::create_dir_all(&partial)?;
        let records = store
            .all_media()
            .map_err(|e| anyhow::anyhow!("reading media records: {e}"))?;
        let known: HashSet<String> = records.iter().map(|(id, _)| id.to_string()).collect();
        for entry in std::fs::read_dir(&partial)?.chain(std::fs::read_dir(&dir)?) {
            let entry = entry?;
            let path = entry.path();
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if path.is_file() && !known.contains(stem) {
                let _ = std::fs::remove_file(&path);
            }
        }
        for (id, r) in &records {
            let blob = dir.join(format!("{id}.blob"));
            let part = partial.join(format!("{id}.part"));
            if r.state == MediaState::Complete && !blob.exists() && part.exists() {
                std::fs::rename(&part, &blob)?;
            }
        }
        let used = records.iter().map(|(_, r)| r.total_len).sum();
        Ok(Self {
            dir,
            partial,
            store,
            config,
            active: Mutex::new(HashMap::new()),
            transfers: Arc::default(),
            used: AtomicU64::new(used),
            last_sweep: Mutex::new(None),
            room: Room::default(),
        })
    }

    fn blob_path(&self, id: &MediaId) -> PathBuf {
        self.dir.join(format!("{id}.blob"))
    }

    fn partial_path(&self, id: &MediaId) -> PathBuf {
        self.partial.join(format!("{id}.part"))
    }

    /// Bytes reserved by stored and in-progress items.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> R + Send + 'static,
    ) -> Result<R, ErrorBody> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .map_err(|_| err(ErrorCode::Internal, "internal error"))
    }

    /// Deletes an item's files and record and releases its space.
    async fn forget(&self, id: MediaId, rec: &MediaRecord) {
        let _ = tokio::fs::remove_file(self.partial_path(&id)).await;
        let _ = tokio::fs::remove_file(self.blob_path(&id)).await;
        if self.blocking(move |s| s.delete_media(&id)).await.is_ok() {
            self.used.fetch_sub(rec.total_len, Ordering::Relaxed);
        }
    }

    /// Retention: deletes expired items, stale unfinished uploads, and items
    /// of groups that have no current member left. Runs at most once a
    /// minute.
    pub async fn maintenance(&self, svc: &Service) {
        {
            let mut last = self.last_sweep.lock().expect("sweep lock");
            if last.is_some_and(|t| t.elapsed() < self.config.media_sweep_interval) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.sweep(svc, now_ms()).await;
    }

    /// One retention pass at time `now` (ms). Returns how many items were
    /// deleted.
    pub async fn sweep(&self, svc: &Service, now: u64) -> usize {
        let Ok(Ok(records)) = self.blocking(|s| s.all_media()).await else {
            return 0;
        };
        let retention = self.config.media_retention.as_millis() as u64;
        let stale = self.config.stale_upload.as_millis() as u64;
        let mut deleted = 0;
        for (id, rec) in records {
            if self.active.lock().expect("active lock").contains_key(&id) {
                continue;
            }
            let expired = now.saturating_sub(rec.created_ms) >= retention;
            let abandoned = matches!(rec.state, MediaState::Uploading { .. })
                && now.saturating_sub(rec.updated_ms) >= stale;
            let unreachable = match svc.load_group(&rec.group).await {
                Ok(g) => g.is_none_or(|g| g.with_view(|v| v.current_members().is_empty())),
                // Not now: the group could not be read.
                Err(_) => false,
            };
            if expired || abandoned || unreachable {
                info!(media = %id, expired, abandoned, unreachable, "deleting media");
                self.forget(id, &rec).await;
                deleted += 1;
            }
        }
        deleted
    }
}

async fn respond(send: &mut quinn::SendStream, resp: &Response) -> bool {
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

async fn upload_inner(
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
    let _transfer = blobs.transfer(&user)?;
    let group = svc
        .load_group(&req.group)
        .await?
        .ok_or_else(|| err(ErrorCode::UnknownGroup, format!("no group {}", req.group)))?;
    if !group.with_view(|v| v.is_member(&user)) {
        return Err(err(
            ErrorCode::NotMember,
            format!("{user} is not a member of group {}", req.group),
        ));
    }
    if req.total_len > blobs.config.max_media_item {
        return Err(err(
            ErrorCode::TooLarge,
            format!(
                "media items are limited to {} bytes on this server",
                blobs.config.max_media_item
            ),
        ));
    }
    if req.total_len < HEADER_LEN as u64 {
        return Err(err(
            ErrorCode::BadRequest,
            "a media item is at least its header",
        ));
    }
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
    let now = now_ms();
    let existing = blobs
        .blocking(move |s| s.media(&id))
        .await?
        .map_err(store_err)?;
    let mut rec = match existing {
        Some(r) => {
            if r.group != req.group || r.total_len != req.total_len {
                return Err(err(
                    ErrorCode::BadRequest,
                    "this media id is taken by another item",
                ));
            }
            if r.state == MediaState::Complete {
                return Ok(Some(Response::Upload {
                    offset: r.total_len,
                    complete: true,
                }));
            }
            if r.uploader != user {
                return Err(err(
                    ErrorCode::NotMember,
                    "only the uploader may resume an upload",
                ));
            }
            r
        }
        None => {
            let total = req.total_len;
            let before = blobs.used.fetch_add(total, Ordering::Relaxed);
            if before + total > blobs.config.media_quota {
                blobs.used.fetch_sub(total, Ordering::Relaxed);
                return Err(err(
                    ErrorCode::QuotaExceeded,
                    "the server's media storage quota is used up",
                ));
            }
            let r = MediaRecord {
                group: req.group,
                uploader: user.clone(),
                total_len: total,
                hash: [0; 32],
                state: MediaState::Uploading { offset: 0 },
                created_ms: now,
                updated_ms: now,
            };
            let r2 = r.clone();
            if let Err(e) = blobs.blocking(move |s| s.put_media(&id, &r2)).await? {
                blobs.used.fetch_sub(total, Ordering::Relaxed);
                return Err(store_err(e));
            }
            r
        }
    };
    let MediaState::Uploading { offset: start } = rec.state else {
        unreachable!("complete items returned above")
    };
    let path = blobs.partial_path(&id);
    // Open the partial file, drop anything past the durable offset (it may
    // be torn), and re-hash (and re-read the header of) what is kept.
    let p = path.clone();
    let (file, hasher, head_bytes) = tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Seek as _};
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&p)?;
        file.set_len(start)?;
        let mut hasher = blake3::Hasher::new();
        let mut head = Vec::with_capacity(HEADER_LEN);
        let mut buf = vec![0u8; BUF];
        let mut left = start;
        while left > 0 {
            let n = file.read(&mut buf[..BUF.min(left as usize)])?;
            if n == 0 {
                return Err(std::io::Error::other(
                    "stored upload is shorter than recorded",
                ));
            }
            if head.len() < HEADER_LEN {
                let take = (HEADER_LEN - head.len()).min(n);
                head.extend_from_slice(&buf[..take]);
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        file.seek(std::io::SeekFrom::Start(start))?;
        Ok((file, hasher, head))
    })
    .await
    .map_err(|_| err(ErrorCode::Internal, "internal error"))?
    .map_err(io_err)?;
    let mut head_bytes = head_bytes;
    let mut header: Option<Header> = None;
    if head_bytes.len() == HEADER_LEN {
        header = Some(check_header(&head_bytes, req)?);
    }
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

    // The network side fills buffers; a writer thread writes, hashes and
    // periodically syncs them, so disk work overlaps with receiving.
    let writer = Writer::start(file, hasher, start, blobs.room.clone());
    let mut pos = start;
    let mut durable = start;
    let mut ended = false;
    let mut gone = false;
    let mut taken_over = false;
    while pos < req.total_len && !ended && !gone {
        // Gather up to BUF bytes of received chunks (no copy), never past
        // the blob's end, and hand them to the writer in one piece.
        let mut batch: Vec<bytes::Bytes> = Vec::new();
        let mut filled = 0usize;
        let room = BUF.min((req.total_len - pos) as usize);
        while filled < room {
            let chunk = tokio::select! {
                c = tokio::time::timeout(blobs.config.transfer_stall_timeout, recv.read_chunk(room - filled, true)) => c,
                () = stop.cancelled() => {
                    debug!(media = %id, "upload taken over by a newer stream");
                    gone = true;
                    taken_over = true;
                    break;
                }
            };
            let Ok(chunk) = chunk else {
                debug!(media = %id, "upload stalled; its progress is kept");
                gone = true;
                break;
            };
            match chunk {
                Ok(Some(c)) => {
                    filled += c.bytes.len();
                    batch.push(c.bytes);
                }
                Ok(None) => {
                    ended = true;
                    break;
                }
                Err(_) => {
                    gone = true;
                    break;
                }
            }
        }
        for b in &batch {
            if head_bytes.len() >= HEADER_LEN {
                break;
            }
            let take = (HEADER_LEN - head_bytes.len()).min(b.len());
            head_bytes.extend_from_slice(&b[..take]);
            if head_bytes.len() == HEADER_LEN {
                match check_header(&head_bytes, req) {
                    Ok(h) => header = Some(h),
                    Err(e) => {
                        drop(writer.finish().await);
                        blobs.forget(id, &rec).await;
                        return Err(e);
                    }
                }
            }
        }
        pos += filled as u64;
        if filled > 0 && !writer.write(batch).await {
            // The writer failed (for example: the disk is full).
            break;
        }
        if let Some(synced) = writer.synced() {
            let b = boundary(header.as_ref(), synced);
            if b > durable {
                durable = b;
                persist(blobs, id, &mut rec, durable).await;
            }
        }
    }
    let (result, synced) = writer.finish().await;
    let (file, hasher) = match result {
        Ok(v) => v,
        Err(e) => {
            let b = boundary(header.as_ref(), synced);
            persist(blobs, id, &mut rec, b.max(durable)).await;
            return Err(io_err(e));
        }
    };
    if pos < req.total_len {
        let boundary = boundary(header.as_ref(), synced);
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
    let mut trailer = [0u8; frame::HEADER_LEN + UPLOAD_TRAILER_LEN];
    let trailer_read = tokio::select! {
        r = tokio::time::timeout(blobs.config.transfer_stall_timeout, recv.read_exact(&mut trailer)) => r,
        () = stop.cancelled() => return Ok(None),
    };
    let Ok(trailer_read) = trailer_read else {
        return Ok(None);
    };
    match trailer_read {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            return Err(err(
                ErrorCode::BadRequest,
                "the upload ended without its hash trailer; send it to finish",
            ))
        }
        Err(_) => return Ok(None),
    }
    let len_ok = frame::body_len(
        trailer[..frame::HEADER_LEN].try_into().expect("4 bytes"),
        UPLOAD_TRAILER_LEN,
    )
    .is_ok_and(|n| n == UPLOAD_TRAILER_LEN);
    if !len_ok {
        blobs.forget(id, &rec).await;
        return Err(err(
            ErrorCode::TooLarge,
            "more bytes were sent than announced; the upload was discarded",
        ));
    }
    let announced: [u8; 32] = trailer[frame::HEADER_LEN..].try_into().expect("32 bytes");
    if *hasher.finalize().as_bytes() != announced {
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
    rec.updated_ms = now_ms();
    let r = rec.clone();
    blobs
        .blocking(move |s| s.put_media(&id, &r))
        .await?
        .map_err(store_err)?;
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

/// Writes received buffers to the partial file and hashes them, each in a
/// short blocking task, while the network side receives the next; every
/// [`SYNC_EVERY`] bytes it starts a sync of the file in another blocking
/// task, so writing goes on while the disk flushes. No thread waits for
/// the network: the task that drives them is async.
struct Writer {
    data: tokio::sync::mpsc::Sender<Vec<bytes::Bytes>>,
    synced: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<std::io::Result<(std::fs::File, blake3::Hasher)>>,
}

/// Batches the writer may hold while the network keeps receiving: enough to
/// cover a sync of [`SYNC_EVERY`] bytes without stalling the sender.
const WRITE_QUEUE: usize = 8;

/// A sync in flight and the position it makes durable.
type Syncing = (tokio::task::JoinHandle<std::io::Result<()>>, u64);

impl Writer {
    fn start(file: std::fs::File, hasher: blake3::Hasher, start: u64, room: Room) -> Self {
        let (data, mut rx) = tokio::sync::mpsc::channel::<Vec<bytes::Bytes>>(WRITE_QUEUE);
        let synced = Arc::new(AtomicU64::new(start));
        let s2 = synced.clone();
        let task = tokio::spawn(async move {
            let syncer = file.try_clone()?;
            let mut state = Some((file, hasher, Vec::with_capacity(BUF)));
            let mut pos = start;
            let mut last_sync = start;
            let mut syncing: Option<Syncing> = None;
            while let Some(batch) = rx.recv().await {
                let (mut file, mut hasher, mut buf) = state.take().expect("writer state");
                let room = room.clone();
                let (back, written) = tokio::task::spawn_blocking(move || {
                    use std::io::Write as _;
                    // Received chunks are packet-sized; BLAKE3 only reaches
                    // its SIMD speed on long contiguous input.
                    buf.clear();
                    for b in &batch {
                        buf.extend_from_slice(b);
                    }
                    let n = room.take(buf.len());
                    let r = file.write_all(&buf[..n]).and_then(|()| {
                        if n < buf.len() {
                            Err(std::io::Error::from_raw_os_error(ENOSPC))
                        } else {
                            hasher.update(&buf);
                            Ok(buf.len())
                        }
                    });
                    ((file, hasher, buf), r)
                })
                .await
                .map_err(|_| std::io::Error::other("writer task failed"))?;
                let n = match written {
                    Ok(n) => n,
                    Err(e) => {
                        // What was written before this buffer is whole: make
                        // it durable, so the upload resumes from there (a
                        // full disk usually still flushes what it took).
                        if let Some((t, _)) = syncing.take() {
                            let _ = t.await;
                        }
                        let file = back.0;
                        let ok = tokio::task::spawn_blocking(move || file.sync_data())
                            .await
                            .is_ok_and(|r| r.is_ok());
                        if ok {
                            s2.fetch_max(pos, Ordering::Release);
                        }
                        return Err(e);
                    }
                };
                state = Some(back);
                pos += n as u64;
                // A finished sync publishes its position; a new one starts
                // if due (requests made while one runs fold into the next).
                if let Some((t, at)) = syncing.take_if(|(t, _)| t.is_finished()) {
                    t.await
                        .map_err(|_| std::io::Error::other("sync task failed"))??;
                    s2.fetch_max(at, Ordering::Release);
                }
                if syncing.is_none() && pos - last_sync >= SYNC_EVERY {
                    let f = syncer.try_clone()?;
                    syncing = Some((tokio::task::spawn_blocking(move || f.sync_data()), pos));
                    last_sync = pos;
                }
            }
            if let Some((t, _)) = syncing.take() {
                // The file description is shared: an error seen there is not
                // reported again to the final sync, so it fails the upload.
                t.await
                    .map_err(|_| std::io::Error::other("sync task failed"))??;
            }
            let (file, hasher, _) = state.take().expect("writer state");
            let file = tokio::task::spawn_blocking(move || file.sync_data().map(|()| file))
                .await
                .map_err(|_| std::io::Error::other("sync task failed"))??;
            s2.store(pos, Ordering::Release);
            Ok((file, hasher))
        });
        Self { data, synced, task }
    }

    /// Hands a batch over; false if the writer has failed.
    async fn write(&self, batch: Vec<bytes::Bytes>) -> bool {
        self.data.send(batch).await.is_ok()
    }

    /// The newest synced position.
    fn synced(&self) -> Option<u64> {
        Some(self.synced.load(Ordering::Acquire))
    }

    /// Waits for everything handed over to be written and synced.
    async fn finish(self) -> (std::io::Result<(std::fs::File, blake3::Hasher)>, u64) {
        drop(self.data);
        let r = match self.task.await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::other("writer task failed")),
        };
        (r, self.synced.load(Ordering::Acquire))
    }
}

/// `errno` of a full disk.
const ENOSPC: i32 = 28;

/// Records `offset` (already synced) as the resume point.
async fn persist(blobs: &BlobStore, id: MediaId, rec: &mut MediaRecord, offset: u64) {
    rec.state = MediaState::Uploading { offset };
    rec.updated_ms = now_ms();
    let r = rec.clone();
    let _ = blobs.blocking(move |s| s.put_media(&id, &r)).await;
}

/// The last chunk boundary at or before `pos`.
fn boundary(header: Option<&Header>, pos: u64) -> u64 {
    match header.map(|h| h.layout().locate(pos)) {
        Some(Some(BlobPosition::Chunk { within, .. })) => pos - within as u64,
        Some(Some(BlobPosition::End)) => pos,
        _ => 0,
    }
}

fn check_header(bytes: &[u8], req: &UploadRequest) -> Result<Header, ErrorBody> {
    let h = Header::decode(bytes)
        .map_err(|e| err(ErrorCode::BadRequest, format!("media header: {e}")))?;
    if h.media() != req.media || h.group() != req.group {
        return Err(err(
            ErrorCode::BadRequest,
            "the media header names another item or group than the upload",
        ));
    }
    if h.layout().blob_len() != req.total_len {
        return Err(err(
            ErrorCode::BadRequest,
            "the announced length does not match the media header",
        ));
    }
    Ok(h)
}

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
        Ok((resp, file, len, _transfer)) => {
            if !respond(&mut send, &resp).await {
                return;
            }
            // Each buffer is read from disk in a short blocking task while
            // the one before is sent: disk and network overlap, and no
            // thread waits for a slow reader. With what QUIC holds
            // unacknowledged (the send window) that bounds a download's
            // memory whatever the item's size.
            let stall = blobs.config.transfer_stall_timeout;
            let file = file.into_std().await;
            let read = |mut file: std::fs::File, want: usize| {
                tokio::task::spawn_blocking(move || {
                    use std::io::Read as _;
                    let mut buf = Vec::with_capacity(want);
                    let r = (&mut file).take(want as u64).read_to_end(&mut buf);
                    (file, r.map(|_| bytes::Bytes::from(buf)))
                })
            };
            let mut left = len;
            let mut sent = 0u64;
            let mut next = (left > 0).then(|| read(file, BUF.min(left as usize)));
            while let Some(reading) = next.take() {
                let Ok((file, r)) = reading.await else {
                    let _ = send.reset(1u32.into());
                    return;
                };
                let b = match r {
                    Ok(b) if b.is_empty() => break,
                    Ok(b) => b,
                    Err(e) => {
                        warn!(media = %media, error = %e, "reading a stored blob failed");
                        let _ = send.reset(1u32.into());
                        return;
                    }
                };
                left -= (b.len() as u64).min(left);
                sent += b.len() as u64;
                if left > 0 {
                    next = Some(read(file, BUF.min(left as usize)));
                }
                match tokio::time::timeout(stall, send.write_chunk(b)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        debug!(media = %media, "download not read; stream ended");
                        let _ = send.reset(1u32.into());
                        return;
                    }
                }
            }
            if sent < len {
                // Shorter than recorded: end the stream where the data ends;
                // the client's checks name the damage.
                warn!(media = %media, "stored blob is shorter than its record");
            }
            let _ = send.finish();
        }
    }
}

async fn download_head(
    svc: &Arc<Service>,
    blobs: &BlobStore,
    session: &Session,
    media: MediaId,
    offset: u64,
    len: u64,
) -> Result<(Response, tokio::fs::File, u64, Transfer), ErrorBody> {
    let user = session
        .user()
        .ok_or_else(|| err(ErrorCode::NotAuthenticated, "authenticate first"))?;
    let transfer = blobs.transfer(&user)?;
    let rec = blobs
        .blocking(move |s| s.media(&media))
        .await?
        .map_err(store_err)?
        .filter(|r| r.state == MediaState::Complete)
        .ok_or_else(|| err(ErrorCode::NotFound, format!("no media item {media}")))?;
    let member = svc
        .load_group(&rec.group)
        .await?
        .is_some_and(|g| g.with_view(|v| v.is_member(&user)));
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
    let mut file = tokio::fs::File::open(blobs.blob_path(&media))
        .await
        .map_err(io_err)?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(io_err)?;
    Ok((
        Response::Download {
            total_len: rec.total_len,
            hash: rec.hash,
            offset,
            len,
            group: rec.group,
        },
        file,
        len,
        transfer,
    ))
}
