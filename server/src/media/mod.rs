//! Encrypted media blobs: resumable uploads, range downloads, quota and
//! retention.
//!
//! A blob is the ciphertext of one media item in the format of
//! `docs/MEDIA.md`; the DS never sees its key. It checks what it can without
//! one: that the header names the item and group of the upload, that the
//! length matches the header's layout, and, for an upload that was resumed,
//! that the BLAKE3 hash of the whole blob is the one announced (the bytes
//! of the attempts belong together; receivers check the hash of every
//! blob). Only then does the blob become fetchable, and only by current
//! members of its group.
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

use huddle_core::proto::{ErrorBody, ErrorCode};
use huddle_core::MediaId;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ServerConfig;
use crate::error::Context as _;
use crate::service::Service;
use crate::store::{MediaRecord, MediaState, Store};

mod admission;
mod disk;
mod download;
pub mod objects;
mod shared;
mod upload;
mod upload_objects;

use admission::{boundary, check_header};
use disk::{persist, BlobWriter, ENOSPC};
pub use download::download;
use upload::respond;
pub use upload::upload;

/// Bytes moved per read or write.
const BUF: usize = 1 << 20;

/// How long an upload's lease on its item lasts unless renewed (at every
/// part stored). A stream whose node died holds its item this long.
const UPLOAD_LEASE: std::time::Duration = std::time::Duration::from_secs(60);

/// The name of the lease an upload of `id` holds (with an object store).
fn upload_lease(id: &MediaId) -> String {
    format!("upload:{id}")
}

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
    pub(crate) room: Room,
    /// Direct I/O for blob files unless `HUDDLE_BLOB_IO=buffered`.
    io_mode: huddle_io::Mode,
    /// Blobs on an object store (`--blobs s3://…`) instead of `dir`.
    objects: Option<objects::Objects>,
    /// Spans of blobs on disk read once for the downloads of the same file
    /// running at once.
    shared: Arc<shared::SharedReads>,
    /// The memory transfers hold, per user and for the whole DS
    /// (`transfer_memory_*`).
    memory: crate::budget::Budgets,
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

/// One running transfer, counted until dropped, and the memory it may
/// hold ([`BlobStore::hold`]).
struct Transfer {
    counts: Arc<Mutex<(HashMap<String, usize>, usize)>>,
    user: String,
    /// Given back when the transfer ends.
    _memory: Option<crate::budget::Lease>,
}

/// What a transfer holds besides its buffers: the aligned reads of a short
/// range, its task and descriptors.
const TRANSFER_OVERHEAD: usize = 64 << 10;

/// The most an upload of an item of `len` bytes holds in the DS's memory:
/// the received batches queued for the blob writer and the one being
/// gathered, its two aligned blob buffers, and what QUIC buffers for the
/// stream (its receive window). A small item holds no more than itself in
/// each.
fn upload_memory(len: u64) -> usize {
    let l = usize::try_from(len).unwrap_or(usize::MAX);
    l.min((disk::WRITE_QUEUE + 1) * BUF)
        + l.min(2 * disk::BLOB_BUFFER)
        + l.min(crate::tls::STREAM_RECEIVE_WINDOW as usize)
        + TRANSFER_OVERHEAD
}

/// The most a download of `len` bytes holds: its reads in flight, and the
/// pieces QUIC holds until they are acknowledged (the connection's send
/// window, and the piece that reaches past it).
fn download_memory(len: u64) -> usize {
    let l = usize::try_from(len).unwrap_or(usize::MAX);
    l.min(download::READ_AHEAD * BUF)
        + l.min(crate::tls::SEND_WINDOW as usize + BUF)
        + TRANSFER_OVERHEAD
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
            _memory: None,
        })
    }

    /// Reserves `bytes`, the most `transfer` can hold in memory, from its
    /// user's and the DS's transfer memory, waiting up to
    /// `transfer_memory_wait` for running transfers to end.
    async fn hold(&self, transfer: &mut Transfer, bytes: usize) -> Result<(), ErrorBody> {
        let lease = self
            .memory
            .reserve(None, Some(&transfer.user), bytes)
            .await?;
        transfer._memory = Some(lease);
        Ok(())
    }

    /// Bytes of memory running transfers have reserved, DS-wide.
    pub fn transfer_memory(&self) -> usize {
        self.memory.in_flight(self.config.transfer_memory_total)
    }

    /// Forgets the transfer memory budgets of users with nothing running.
    pub fn prune(&self) {
        self.memory.prune();
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
    pub fn open(
        config: Arc<ServerConfig>,
        store: Arc<dyn Store>,
    ) -> Result<Self, crate::error::StartError> {
        let dir = config.data_dir.join("blobs");
        let partial = dir.join("partial");
        std::fs::create_dir_all(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        let records = store
            .all_media()
            .map_err(|e| crate::error::StartError::msg(format!("reading media records: {e}")))?;
        let known: HashSet<String> = records.iter().map(|(id, _)| id.to_string()).collect();
        let listing = |d: &std::path::Path| {
            std::fs::read_dir(d).with_context(|| format!("reading {}", d.display()))
        };
        for entry in listing(&partial)?.chain(listing(&dir)?) {
            let entry = entry.context("reading the blob directories")?;
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
                std::fs::rename(&part, &blob)
                    .with_context(|| format!("moving {} into place", part.display()))?;
            }
        }
        let used = if store.counts_media() {
            0
        } else {
            records.iter().map(|(_, r)| r.total_len).sum()
        };
        let objects = config
            .blobs_url
            .as_deref()
            .map(|url| {
                objects::Objects::open(
                    url,
                    config.blob_keys.as_ref(),
                    config.object_part_buffers,
                    config.object_part_buffers_per_user,
                )
            })
            .transpose()
            .map_err(crate::error::StartError::msg)?;
        let shared = shared::SharedReads::new(config.shared_read_bytes);
        let memory = crate::budget::Budgets::for_transfers(&config);
        Ok(Self {
            dir,
            partial,
            store,
            config,
            active: Mutex::new(HashMap::new()),
            transfers: Arc::default(),
            used: AtomicU64::new(used),
            room: Room::default(),
            io_mode: huddle_io::Mode::from_env(),
            objects,
            shared,
            memory,
        })
    }

    fn blob_path(&self, id: &MediaId) -> PathBuf {
        self.dir.join(format!("{id}.blob"))
    }

    fn partial_path(&self, id: &MediaId) -> PathBuf {
        self.partial.join(format!("{id}.part"))
    }

    /// Bytes reserved by stored and in-progress items (counted here when
    /// the store leaves the count to this process; otherwise the store's
    /// count is the one that holds, and this stays 0).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Records a new item, within the media quota: counted by the store
    /// when several processes share it (so the quota holds for all of
    /// them together), else here.
    async fn admit(&self, id: MediaId, r: &MediaRecord) -> Result<(), ErrorBody> {
        let r2 = r.clone();
        if self.store.counts_media() {
            let quota = self.config.media_quota;
            let fits = self
                .blocking(move |s| s.reserve_media(&id, &r2, quota))
                .await?
                .map_err(ErrorBody::from)?;
            return if fits {
                Ok(())
            } else {
                Err(admission::quota_used_up())
            };
        }
        admission::reserve(&self.used, r.total_len, self.config.media_quota)?;
        if let Err(e) = self.blocking(move |s| s.put_media(&id, &r2)).await? {
            self.used.fetch_sub(r.total_len, Ordering::Relaxed);
            return Err(ErrorBody::from(e));
        }
        Ok(())
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> R + Send + 'static,
    ) -> Result<R, ErrorBody> {
        crate::store::blocking(&self.store, f).await
    }

    /// Deletes an item's bytes and record and releases its space. On an
    /// object store, a record whose bytes could not be deleted is kept, so
    /// that the next sweep tries again.
    async fn forget(&self, id: MediaId, rec: &MediaRecord) {
        if let Some(o) = &self.objects {
            let mut gone = o.delete(&id).await;
            if let (Ok(()), Some(m)) = (&gone, &rec.multipart) {
                gone = o.abort(&id, &m.upload).await;
            }
            if gone.is_err() {
                return;
            }
        } else {
            let _ = tokio::fs::remove_file(self.partial_path(&id)).await;
            let _ = tokio::fs::remove_file(self.blob_path(&id)).await;
        }
        // Only what was deleted gives bytes back: a second forget of one
        // item finds nothing.
        if let Ok(Ok(Some(len))) = self.blocking(move |s| s.delete_media(&id)).await {
            if !self.store.counts_media() {
                let _ = self
                    .used
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                        Some(u.saturating_sub(len))
                    });
            }
        }
    }

    /// Takes the item `id` for `holder` unless an upload stream holds it on
    /// another node of a cluster (with an object store, each upload stream
    /// holds its item's lease; this node's streams are in `active`). A
    /// `true` must be followed by [`BlobStore::unlock`].
    async fn lock(&self, id: MediaId, holder: u64) -> bool {
        if self.objects.is_none() {
            return true;
        }
        matches!(
            self.blocking(move |s| s.lease(&upload_lease(&id), holder, UPLOAD_LEASE))
                .await,
            Ok(Ok(true))
        )
    }

    /// Gives the upload lease of `id` up.
    async fn unlock(&self, id: MediaId, holder: u64) {
        if self.objects.is_some() {
            let _ = self
                .blocking(move |s| s.release(&upload_lease(&id), holder))
                .await;
        }
    }

    /// One retention pass at time `now` (ms): deletes expired items, stale
    /// unfinished uploads, and items of groups that have no current member
    /// left. Returns how many items were deleted.
    pub async fn sweep(&self, svc: &Service, now: u64) -> usize {
        if let Ok(Err(e)) = self.blocking(|s| s.recount_media()).await {
            warn!(error = %e, "recounting the media quota failed");
        }
        let Ok(Ok(records)) = self.blocking(|s| s.all_media()).await else {
            return 0;
        };
        let retention = self.config.media_retention.as_millis() as u64;
        let stale = self.config.stale_upload.as_millis() as u64;
        let mut deleted = 0;
        let holder: u64 = rand::random();
        for (id, listed) in records {
            if self.active.lock().expect("active lock").contains_key(&id) {
                continue;
            }
            // Whether the group still has members is asked first (it may
            // wait); the item is then locked against uploads and read
            // again, so what is decided is about the item as it is.
            let unreachable = match svc.load_group(&listed.group).await {
                Ok(g) => g.is_none_or(|g| g.with_view(|v| v.current_members().is_empty())),
                // Not now: the group could not be read.
                Err(_) => false,
            };
            if !self.lock(id, holder).await {
                continue;
            }
            if self.active.lock().expect("active lock").contains_key(&id) {
                self.unlock(id, holder).await;
                continue;
            }
            let rec = match self.blocking(move |s| s.media(&id)).await {
                Ok(Ok(Some(r))) => r,
                _ => {
                    self.unlock(id, holder).await;
                    continue;
                }
            };
            let expired = now.saturating_sub(rec.created_ms) >= retention;
            let abandoned = matches!(rec.state, MediaState::Uploading { .. })
                && now.saturating_sub(rec.updated_ms) >= stale;
            if expired || abandoned || unreachable {
                info!(media = %id, expired, abandoned, unreachable, "deleting media");
                self.forget(id, &rec).await;
                deleted += 1;
            }
            self.unlock(id, holder).await;
        }
        deleted
    }
}
