//! Blob bytes on disk: the writer thread that writes, hashes (when the
//! upload was resumed) and syncs an upload while the network side
//! receives, and the durable offset kept in the item's record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use huddle_core::MediaId;

use crate::store::{MediaRecord, MediaState};

use huddle_io::{BlobFile, BlobReader, Mode, SyncPace};

use super::{BlobStore, Room, BUF};

/// Writes received batches to the partial blob file (direct I/O, see
/// [`huddle_io::blob`]) and, given a hasher, hashes them, each in a short
/// blocking task, while the network side receives the next; now and then
/// ([`SyncPace`]: at least 16 MiB and, direct, a second apart) it makes
/// what it wrote durable and publishes that offset, the resume point. No
/// thread waits for the network: the task that drives them is async.
pub(super) struct BlobWriter {
    data: tokio::sync::mpsc::Sender<Vec<bytes::Bytes>>,
    synced: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<std::io::Result<(std::fs::File, Option<blake3::Hasher>)>>,
}

/// Batches the writer may hold while the network keeps receiving: enough
/// to cover a sync without stalling the sender.
pub(super) const WRITE_QUEUE: usize = 4;

/// Each of the two aligned buffers of an upload's blob file. With the
/// queue above, an upload holds at most 8 MiB however fast it is sent.
pub(super) const BLOB_BUFFER: usize = 2 << 20;

impl BlobWriter {
    pub(super) fn start(blob: BlobFile, hasher: Option<blake3::Hasher>, room: Room) -> Self {
        let (data, mut rx) = tokio::sync::mpsc::channel::<Vec<bytes::Bytes>>(WRITE_QUEUE);
        let synced = Arc::new(AtomicU64::new(blob.len()));
        let s2 = synced.clone();
        let task = tokio::spawn(async move {
            let mut pace = SyncPace::new(blob.len());
            let mut pair = (blob, hasher);
            while let Some(batch) = rx.recv().await {
                let room = room.clone();
                let (back, r) = tokio::task::spawn_blocking(move || {
                    let (mut blob, mut hasher) = pair;
                    let r = write_batch(&mut blob, &mut hasher, &batch, &room)
                        .and_then(|()| pace.due(&blob).then(|| blob.sync()).transpose());
                    // On failure, what the disk took is whole: make it
                    // durable, so the upload resumes from there (a full disk
                    // usually still takes the buffered tail; if not, what
                    // already reached the file counts).
                    let r = r.map_err(|e| (e, blob.sync().or_else(|_| blob.sync_written()).ok()));
                    ((blob, hasher), r)
                })
                .await
                .map_err(|_| std::io::Error::other("writer task failed"))?;
                pair = back;
                match r {
                    Ok(Some(at)) => {
                        pace.synced(at);
                        s2.fetch_max(at, Ordering::Release);
                    }
                    Ok(None) => {}
                    Err((e, durable)) => {
                        if let Some(at) = durable {
                            s2.fetch_max(at, Ordering::Release);
                        }
                        return Err(e);
                    }
                }
            }
            let (blob, hasher) = pair;
            let (file, at) = tokio::task::spawn_blocking(move || {
                let at = blob.len();
                blob.finish().map(|f| (f, at))
            })
            .await
            .map_err(|_| std::io::Error::other("sync task failed"))??;
            s2.store(at, Ordering::Release);
            Ok((file, hasher))
        });
        Self { data, synced, task }
    }

    /// Hands a batch over; false if the writer has failed.
    pub(super) async fn write(&self, batch: Vec<bytes::Bytes>) -> bool {
        self.data.send(batch).await.is_ok()
    }

    /// The newest synced position.
    pub(super) fn synced(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
    }

    /// Waits for everything handed over to be written and synced.
    pub(super) async fn finish(
        self,
    ) -> (
        std::io::Result<(std::fs::File, Option<blake3::Hasher>)>,
        u64,
    ) {
        drop(self.data);
        let r = match self.task.await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::other("writer task failed")),
        };
        (r, self.synced.load(Ordering::Acquire))
    }
}

/// Appends one received batch and, given a hasher, hashes it. The batch is
/// gathered into the aligned buffer in one copy and hashed there: received
/// chunks are packet-sized, and BLAKE3 reaches its SIMD speed only on long
/// contiguous input.
fn write_batch(
    blob: &mut BlobFile,
    hasher: &mut Option<blake3::Hasher>,
    batch: &[bytes::Bytes],
    room: &Room,
) -> std::io::Result<()> {
    let total: usize = batch.iter().map(|b| b.len()).sum();
    let fits = room.take(total);
    if fits < total {
        // The disk takes part of it, then is full.
        let mut left = fits;
        for b in batch {
            let n = left.min(b.len());
            blob.write(&b[..n])?;
            left -= n;
        }
        return Err(std::io::Error::from_raw_os_error(ENOSPC));
    }
    let written = blob.write_gather(batch)?;
    if let Some(h) = hasher {
        h.update(written);
    }
    Ok(())
}

/// `errno` of a full disk.
pub(super) const ENOSPC: i32 = 28;

/// Records `offset` (already synced) as the resume point.
pub(super) async fn persist(blobs: &BlobStore, id: MediaId, rec: &mut MediaRecord, offset: u64) {
    rec.state = MediaState::Uploading { offset };
    rec.updated_ms = (blobs.config.clock)();
    let r = rec.clone();
    // Progress of an item the sweep deleted meanwhile is not written back.
    let _ = blobs.blocking(move |s| s.update_media(&id, &r)).await;
}

/// Opens the partial file of an upload at durable offset `start`: drops
/// anything past it (it may be torn), and re-hashes (and re-reads the
/// header of) what is kept, reading past the page cache. Returns the blob
/// ready to append at `start`, the hash so far and the first header bytes.
///
/// The hash is `None` for an upload that starts at 0: one received whole
/// in one stream is not hashed (PROTOCOL.md 16.1, "the hash check"). An
/// upload that resumes joins bytes of two attempts, and only the whole
/// blob's hash shows that they belong together, so it is hashed from the
/// first byte.
pub(super) fn reopen_partial(
    p: &std::path::Path,
    start: u64,
    mode: Mode,
) -> std::io::Result<(BlobFile, Option<blake3::Hasher>, Vec<u8>)> {
    let blob = BlobFile::open_at_sized(p, start, mode, BLOB_BUFFER)?;
    if start == 0 {
        return Ok((blob, None, Vec::new()));
    }
    let mut hasher = blake3::Hasher::new();
    let mut head = Vec::with_capacity(huddle_core::media::HEADER_LEN);
    let mut reader = BlobReader::open(p, mode)?;
    let mut at = 0u64;
    while at < start {
        let b = reader.read_at(at, BUF.min((start - at) as usize))?;
        if b.is_empty() {
            return Err(std::io::Error::other(
                "stored upload is shorter than recorded",
            ));
        }
        if head.len() < huddle_core::media::HEADER_LEN {
            let take = (huddle_core::media::HEADER_LEN - head.len()).min(b.len());
            head.extend_from_slice(&b[..take]);
        }
        hasher.update(&b);
        at += b.len() as u64;
    }
    Ok((blob, Some(hasher), head))
}
