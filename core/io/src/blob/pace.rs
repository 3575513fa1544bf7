//! When a blob being written is made durable.
//!
//! A sync waits for the write in flight and stops whoever writes the blob
//! meanwhile. Direct writes have left the process and the page cache when
//! they return, so a killed process keeps them anyway; a sync makes them
//! and the file's length durable against a power cut, and lets the DS
//! record a resume point. So a blob written direct is synced at least
//! [`SYNC_EVERY`] bytes and at least [`SYNC_INTERVAL`] apart: a power cut
//! costs about a second of the transfer. Written through the page cache
//! (where the file system refuses direct I/O) it is synced every
//! [`SYNC_EVERY`] bytes, which keeps the dirty pages few.

use std::time::{Duration, Instant};

use super::{BlobFile, Mode};

/// Least bytes between two syncs of a blob being written.
pub const SYNC_EVERY: u64 = 16 << 20;

/// Least time between two syncs of a blob written direct.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Where and when a blob being written was last made durable.
#[derive(Debug, Clone, Copy)]
pub struct SyncPace {
    len: u64,
    at: Instant,
    every: u64,
    interval: Duration,
}

impl SyncPace {
    /// A blob durable up to `len` bytes now, synced at [`SYNC_EVERY`] and
    /// [`SYNC_INTERVAL`].
    pub fn new(len: u64) -> Self {
        Self::with(len, SYNC_EVERY, SYNC_INTERVAL)
    }

    /// The same with other spacings.
    pub fn with(len: u64, every: u64, interval: Duration) -> Self {
        Self {
            len,
            at: Instant::now(),
            every,
            interval,
        }
    }

    /// Whether `blob` should be made durable now.
    pub fn due(&self, blob: &BlobFile) -> bool {
        blob.len().saturating_sub(self.len) >= self.every
            && (blob.mode() == Mode::Buffered || self.at.elapsed() >= self.interval)
    }

    /// Records that the blob was made durable up to `len` bytes now.
    pub fn synced(&mut self, len: u64) {
        self.len = len;
        self.at = Instant::now();
    }

    /// Makes `blob` durable if it is due; returns its durable length then.
    pub fn sync_if_due(&mut self, blob: &mut BlobFile) -> std::io::Result<Option<u64>> {
        if !self.due(blob) {
            return Ok(None);
        }
        let at = blob.sync()?;
        self.synced(at);
        Ok(Some(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_written_direct_waits_for_the_interval_and_a_buffered_one_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("blob");
        let mut f = BlobFile::open_at(&p, 0, Mode::Direct).expect("open");
        let mut slow = SyncPace::with(0, 1 << 20, Duration::from_secs(3600));
        let mut fast = SyncPace::with(0, 1 << 20, Duration::ZERO);
        f.write(&vec![7u8; (1 << 20) - 1]).expect("write");
        assert!(!fast.due(&f), "fewer bytes than the spacing");
        f.write(&[7u8; 2]).expect("write");
        // One sync settles which path this file system takes.
        assert_eq!(fast.sync_if_due(&mut f).expect("sync"), Some((1 << 20) + 1));
        assert!(!fast.due(&f), "synced just now, nothing new");
        f.write(&vec![7u8; 1 << 20]).expect("write");
        assert!(fast.due(&f));
        if f.mode() == Mode::Direct {
            assert!(!slow.due(&f), "direct: the interval has not passed");
            assert_eq!(slow.sync_if_due(&mut f).expect("sync"), None);
        } else {
            assert!(slow.due(&f), "buffered: every so many bytes");
        }
        slow.synced(f.len());
        assert!(!slow.due(&f));
    }
}
