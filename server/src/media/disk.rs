//! Blob bytes on disk: the writer thread that writes, hashes and syncs an
//! upload while the network side receives, and the durable offset kept in
//! the item's record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use huddle_core::MediaId;

use crate::store::{MediaRecord, MediaState};

use super::{BlobStore, Room, BUF};

/// Progress is made durable at least this often (in bytes).
pub(super) const SYNC_EVERY: u64 = 16 << 20;

/// Writes received buffers to the partial file and hashes them, each in a
/// short blocking task, while the network side receives the next; every
/// [`SYNC_EVERY`] bytes it starts a sync of the file in another blocking
/// task, so writing goes on while the disk flushes. No thread waits for
/// the network: the task that drives them is async.
pub(super) struct BlobWriter {
    data: tokio::sync::mpsc::Sender<Vec<bytes::Bytes>>,
    synced: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<std::io::Result<(std::fs::File, blake3::Hasher)>>,
}

/// Batches the writer may hold while the network keeps receiving: enough to
/// cover a sync of [`SYNC_EVERY`] bytes without stalling the sender.
pub(super) const WRITE_QUEUE: usize = 8;

/// A sync in flight and the position it makes durable.
pub(super) type Syncing = (tokio::task::JoinHandle<std::io::Result<()>>, u64);

impl BlobWriter {
    pub(super) fn start(
        file: std::fs::File,
        hasher: blake3::Hasher,
        start: u64,
        room: Room,
    ) -> Self {
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
    pub(super) async fn write(&self, batch: Vec<bytes::Bytes>) -> bool {
        self.data.send(batch).await.is_ok()
    }

    /// The newest synced position.
    pub(super) fn synced(&self) -> Option<u64> {
        Some(self.synced.load(Ordering::Acquire))
    }

    /// Waits for everything handed over to be written and synced.
    pub(super) async fn finish(self) -> (std::io::Result<(std::fs::File, blake3::Hasher)>, u64) {
        drop(self.data);
        let r = match self.task.await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::other("writer task failed")),
        };
        (r, self.synced.load(Ordering::Acquire))
    }
}

/// `errno` of a full disk.
pub(super) const ENOSPC: i32 = 28;

/// Records `offset` (already synced) as the resume point.
pub(super) async fn persist(blobs: &BlobStore, id: MediaId, rec: &mut MediaRecord, offset: u64) {
    rec.state = MediaState::Uploading { offset };
    rec.updated_ms = (blobs.config.clock)();
    let r = rec.clone();
    let _ = blobs.blocking(move |s| s.put_media(&id, &r)).await;
}

/// Opens the partial file of an upload at durable offset `start`: drops
/// anything past it (it may be torn), and re-hashes (and re-reads the
/// header of) what is kept. Returns the file positioned at `start`, the
/// hash so far and the first header bytes.
pub(super) fn reopen_partial(
    p: &std::path::Path,
    start: u64,
) -> std::io::Result<(std::fs::File, blake3::Hasher, Vec<u8>)> {
    use std::io::{Read as _, Seek as _};
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(p)?;
    file.set_len(start)?;
    let mut hasher = blake3::Hasher::new();
    let mut head = Vec::with_capacity(huddle_core::media::HEADER_LEN);
    let mut buf = vec![0u8; BUF];
    let mut left = start;
    while left > 0 {
        let n = file.read(&mut buf[..BUF.min(left as usize)])?;
        if n == 0 {
            return Err(std::io::Error::other(
                "stored upload is shorter than recorded",
            ));
        }
        if head.len() < huddle_core::media::HEADER_LEN {
            let take = (huddle_core::media::HEADER_LEN - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    file.seek(std::io::SeekFrom::Start(start))?;
    Ok((file, hasher, head))
}
