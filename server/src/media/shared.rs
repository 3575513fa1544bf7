//! Spans of a stored blob read from disk once for all the downloads of it
//! that run at the same time.
//!
//! Blob reads skip the page cache ([`huddle_io::BlobReader`]), so nothing
//! but this keeps a popular item from being read from the disk once per
//! download: a video posted to a group of hundreds is fetched by every
//! member's device at about the same moment. A download reads its range in
//! pieces that end at the [`SPAN`] boundaries of the blob. While another
//! download of the same file runs whose range takes in a span it has not
//! yet reached, a download that wants the whole span reads it once, whole:
//! a second download that wants any of it while it is being read waits for
//! that read, and one still before it finds it kept. A small range never
//! has a whole span read for it. A span is kept until every download
//! of the file is past it, within `shared_read_bytes` for the whole DS (past
//! that, the downloads behind read it themselves). A download that is alone
//! reads exactly its range, as before, and keeps nothing.
//!
//! Spans belong to one file, not one name: a blob replaced under the same
//! name (its item deleted and uploaded again) is another file and shares
//! nothing with the old one.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use huddle_core::MediaId;
use tokio::sync::OnceCell;

/// The size of a span, and so of a download's reads.
pub(super) const SPAN: u64 = super::BUF as u64;

/// The file a span is of: the item, and that very file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct FileKey {
    media: MediaId,
    dev: u64,
    ino: u64,
    /// The inode's change time: a number reused by a new file is told apart.
    ctime: (i64, i64),
}

impl FileKey {
    /// The key of the open file `meta` describes, which holds `media`.
    pub(super) fn of(media: MediaId, meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            media,
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

type Cell = Arc<OnceCell<Bytes>>;

/// A span read or being read.
struct Span {
    cell: Cell,
    /// Counted in [`Inner::held`] (read, and kept within the budget).
    counted: bool,
}

/// The downloads of one file and its spans.
#[derive(Default)]
struct FileReads {
    /// Each download: where it has got to (it has every byte of its range
    /// before this offset) and where its range ends.
    readers: HashMap<u64, (u64, u64)>,
    /// By blob offset.
    spans: BTreeMap<u64, Span>,
}

#[derive(Default)]
struct Inner {
    files: HashMap<FileKey, FileReads>,
    /// Bytes of the spans kept.
    held: usize,
    next_reader: u64,
}

/// What [`SharedReads`] did.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    /// Pieces a download read from disk itself.
    pub read: u64,
    /// Pieces taken from a span another download read.
    pub shared: u64,
}

/// The spans of every blob being downloaded, within a byte budget.
pub(super) struct SharedReads {
    inner: Mutex<Inner>,
    budget: usize,
    /// Tests: pieces read from disk, and taken from another download's
    /// read, by this instance (the DS's counters are process-wide).
    #[cfg(test)]
    counts: [std::sync::atomic::AtomicU64; 2],
}

impl SharedReads {
    /// Keeps at most `budget` bytes of spans for downloads behind.
    pub(super) fn new(budget: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::default(),
            budget,
            #[cfg(test)]
            counts: Default::default(),
        })
    }

    /// A download of `range` of `file`.
    pub(super) fn join(self: &Arc<Self>, file: FileKey, range: Range<u64>) -> Reader {
        let mut inner = self.lock();
        let id = inner.next_reader;
        inner.next_reader += 1;
        inner
            .files
            .entry(file)
            .or_default()
            .readers
            .insert(id, (range.start, range.end));
        Reader {
            reads: self.clone(),
            file,
            id,
        }
    }

    /// Bytes of spans kept now.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.lock().held
    }

    /// Files with a download running.
    #[cfg(test)]
    fn files(&self) -> usize {
        self.lock().files.len()
    }

    #[cfg(test)]
    fn counts(&self) -> Counts {
        let [read, shared] = &self.counts;
        Counts {
            read: read.load(std::sync::atomic::Ordering::Relaxed),
            shared: shared.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn count(&self, shared: bool) {
        crate::metrics::COUNTERS.blob_read(shared);
        #[cfg(test)]
        self.counts[usize::from(shared)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Drops the spans of `file` that every download of it is past.
    fn prune(&mut self, file: &FileKey) {
        let Some(f) = self.files.get_mut(file) else {
            return;
        };
        let Some(low) = f.readers.values().map(|&(at, _)| at).min() else {
            return;
        };
        let mut freed = 0;
        f.spans.retain(|start, s| match s.cell.get() {
            Some(b) if start + b.len() as u64 <= low => {
                if s.counted {
                    freed += b.len();
                }
                false
            }
            _ => true,
        });
        self.held -= freed;
    }
}

/// One download's place among the downloads of its file; leaves when
/// dropped.
pub(super) struct Reader {
    reads: Arc<SharedReads>,
    file: FileKey,
    id: u64,
}

impl Reader {
    /// The bytes of `want`, which lies in the span `span` (clipped at the
    /// blob's end): from the span as another download of the file read it,
    /// or read by `read` (the whole span if another download may want it,
    /// else just `want`). Fewer bytes only where the file ends early.
    pub(super) async fn piece<F, Fut>(
        &self,
        span: Range<u64>,
        want: Range<u64>,
        read: F,
    ) -> std::io::Result<Bytes>
    where
        F: FnOnce(Range<u64>) -> Fut,
        Fut: Future<Output = std::io::Result<Bytes>>,
    {
        debug_assert!(span.start <= want.start && want.end <= span.end);
        let Some(pending) = self.shared(&span, &want) else {
            self.reads.count(false);
            return read(want).await;
        };
        let mut mine = false;
        let whole = pending
            .cell
            .get_or_try_init(|| {
                mine = true;
                read(span.clone())
            })
            .await?
            .clone();
        self.reads.count(!mine);
        if mine {
            self.keep(span.start, &pending.cell, whole.len());
        }
        let from = ((want.start - span.start) as usize).min(whole.len());
        let to = ((want.end - span.start) as usize).min(whole.len());
        Ok(whole.slice(from..to))
    }

    /// This download has every byte of its range before `at`.
    pub(super) fn reached(&self, at: u64) {
        let mut inner = self.reads.lock();
        if let Some((reached, _)) = inner
            .files
            .get_mut(&self.file)
            .and_then(|f| f.readers.get_mut(&self.id))
        {
            *reached = at;
        }
        inner.prune(&self.file);
    }

    /// The span `span` to share: if it is read or being read, or if this
    /// download wants all of it and another download of the file, not yet
    /// past it, will want it too (a small range never has a whole span
    /// read for it).
    fn shared(&self, span: &Range<u64>, want: &Range<u64>) -> Option<Pending> {
        let start = span.start;
        let mut inner = self.reads.lock();
        let f = inner.files.get_mut(&self.file)?;
        let cell = match f.spans.get(&start) {
            Some(s) => s.cell.clone(),
            None => {
                let behind = want == span
                    && f.readers.iter().any(|(&id, &(at, end))| {
                        id != self.id && at < span.end && end > span.start
                    });
                if !behind {
                    return None;
                }
                let cell = Cell::default();
                f.spans.insert(
                    start,
                    Span {
                        cell: cell.clone(),
                        counted: false,
                    },
                );
                cell
            }
        };
        Some(Pending {
            reads: self.reads.clone(),
            file: self.file,
            start,
            cell,
        })
    }

    /// Counts the span this download read at `start` as kept, or lets it
    /// go if the budget has no room for it.
    fn keep(&self, start: u64, cell: &Cell, len: usize) {
        let mut guard = self.reads.lock();
        let inner = &mut *guard;
        let room = inner.held + len <= self.reads.budget;
        let Some(f) = inner.files.get_mut(&self.file) else {
            return;
        };
        match f.spans.get_mut(&start) {
            Some(s) if Arc::ptr_eq(&s.cell, cell) && !s.counted => {
                if room {
                    s.counted = true;
                    inner.held += len;
                } else {
                    f.spans.remove(&start);
                }
            }
            _ => return,
        }
        inner.prune(&self.file);
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut inner = self.reads.lock();
        let Some(f) = inner.files.get_mut(&self.file) else {
            return;
        };
        f.readers.remove(&self.id);
        if f.readers.is_empty() {
            let f = inner.files.remove(&self.file).expect("just seen");
            let freed: usize = f
                .spans
                .values()
                .filter(|s| s.counted)
                .filter_map(|s| s.cell.get().map(Bytes::len))
                .sum();
            inner.held -= freed;
        } else {
            inner.prune(&self.file);
        }
    }
}

/// A span some download is waiting for. A read that fails or is dropped
/// before it ends leaves the span unread: the next download that waits
/// reads it, and the last one to give up takes it out of the map.
struct Pending {
    reads: Arc<SharedReads>,
    file: FileKey,
    start: u64,
    cell: Cell,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.cell.initialized() {
            return;
        }
        // Every clone of an unread cell is made and dropped under the lock:
        // two holders are the map and this one.
        let mut inner = self.reads.lock();
        if let Some(f) = inner.files.get_mut(&self.file) {
            // Read meanwhile: kept, and counted by its reader.
            let alone = !self.cell.initialized()
                && f.spans.get(&self.start).is_some_and(|s| {
                    Arc::ptr_eq(&s.cell, &self.cell) && Arc::strong_count(&self.cell) == 2
                });
            if alone {
                f.spans.remove(&self.start);
            }
        }
        // Dropped here, while the lock is held.
        self.cell = Cell::default();
    }
}

#[cfg(test)]
mod tests;
