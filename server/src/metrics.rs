//! Counters of the DS's work per message: sequencer rounds, durable
//! writer transactions, push writes. They make the cost of a message
//! visible in a benchmark (how many rounds, transactions and writes it
//! took), not only its time.
//!
//! The counters are process-wide (a test process running several DSs sums
//! them) and only ever increase; `huddle-server --stats-file PATH` writes a
//! [`Snapshot`] there as JSON whenever the process gets `SIGUSR1`.

use std::sync::atomic::{AtomicU64, Ordering};

/// The counters.
#[derive(Debug, Default)]
pub struct Counters {
    rounds: AtomicU64,
    entries: AtomicU64,
    transactions: AtomicU64,
    group_writes: AtomicU64,
    push_writes: AtomicU64,
    pushed: AtomicU64,
    bus_dropped: AtomicU64,
    followed: AtomicU64,
    reloaded: AtomicU64,
    blob_reads: AtomicU64,
    blob_reads_shared: AtomicU64,
}

/// The process's counters.
pub static COUNTERS: Counters = Counters {
    rounds: AtomicU64::new(0),
    entries: AtomicU64::new(0),
    transactions: AtomicU64::new(0),
    group_writes: AtomicU64::new(0),
    push_writes: AtomicU64::new(0),
    pushed: AtomicU64::new(0),
    bus_dropped: AtomicU64::new(0),
    followed: AtomicU64::new(0),
    reloaded: AtomicU64::new(0),
    blob_reads: AtomicU64::new(0),
    blob_reads_shared: AtomicU64::new(0),
};

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    /// Sequencer rounds that wrote something (one per group per batch of
    /// commands taken from its queue).
    pub rounds: u64,
    /// Log entries those rounds appended.
    pub entries: u64,
    /// Durable store transactions of the writer thread (each one flush).
    pub transactions: u64,
    /// Group writes those transactions carried (one per round).
    pub group_writes: u64,
    /// Writes on push streams (each may carry several entries).
    pub push_writes: u64,
    /// Entries (and other frames) those writes carried.
    pub pushed: u64,
    /// Cluster mode: notices not published because the bus's queue was
    /// full (the other nodes' polls find what they announced).
    pub bus_dropped: u64,
    /// Cluster mode: rounds of another node applied from its notice alone.
    pub followed: u64,
    /// Cluster mode: times a group was read anew from the database (a
    /// commit, a gap in the notices, or a poll that found it behind).
    pub reloaded: u64,
    /// Pieces of downloads read from a blob on disk.
    pub blob_reads: u64,
    /// Pieces of downloads taken from a span another download of the same
    /// file read (`shared_read_bytes`).
    pub blob_reads_shared: u64,
}

impl Counters {
    /// A sequencer round appended `entries` entries (0: it wrote only state).
    pub(crate) fn round(&self, entries: usize) {
        self.rounds.fetch_add(1, Ordering::Relaxed);
        self.entries.fetch_add(entries as u64, Ordering::Relaxed);
    }

    /// The writer committed one transaction of `writes` group writes.
    pub(crate) fn transaction(&self, writes: usize) {
        self.transactions.fetch_add(1, Ordering::Relaxed);
        self.group_writes
            .fetch_add(writes as u64, Ordering::Relaxed);
    }

    /// A push stream was written `frames` frames at once.
    pub(crate) fn push_write(&self, frames: usize) {
        self.push_writes.fetch_add(1, Ordering::Relaxed);
        self.pushed.fetch_add(frames as u64, Ordering::Relaxed);
    }

    /// A bus notice was dropped.
    pub(crate) fn bus_dropped(&self) {
        self.bus_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Another node's round was applied from its notice.
    pub(crate) fn followed(&self) {
        self.followed.fetch_add(1, Ordering::Relaxed);
    }

    /// A group was read anew from the database.
    pub(crate) fn reloaded(&self) {
        self.reloaded.fetch_add(1, Ordering::Relaxed);
    }

    /// A download piece was read from disk, or taken from another
    /// download's read (`shared`).
    pub(crate) fn blob_read(&self, shared: bool) {
        let c = if shared {
            &self.blob_reads_shared
        } else {
            &self.blob_reads
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            rounds: self.rounds.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
            transactions: self.transactions.load(Ordering::Relaxed),
            group_writes: self.group_writes.load(Ordering::Relaxed),
            push_writes: self.push_writes.load(Ordering::Relaxed),
            pushed: self.pushed.load(Ordering::Relaxed),
            bus_dropped: self.bus_dropped.load(Ordering::Relaxed),
            followed: self.followed.load(Ordering::Relaxed),
            reloaded: self.reloaded.load(Ordering::Relaxed),
            blob_reads: self.blob_reads.load(Ordering::Relaxed),
            blob_reads_shared: self.blob_reads_shared.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up() {
        let c = Counters::default();
        c.round(3);
        c.round(0);
        c.transaction(2);
        c.push_write(5);
        c.followed();
        c.reloaded();
        c.reloaded();
        c.blob_read(false);
        c.blob_read(true);
        c.blob_read(true);
        assert_eq!(
            c.snapshot(),
            Snapshot {
                rounds: 2,
                entries: 3,
                transactions: 1,
                group_writes: 2,
                push_writes: 1,
                pushed: 5,
                bus_dropped: 0,
                followed: 1,
                reloaded: 2,
                blob_reads: 1,
                blob_reads_shared: 2,
            }
        );
    }
}
