//! A group's log in redb: entries by (group, seq), the large ones in a
//! table beside it.

use ::redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use huddle_core::proto::{LogEntry, MAX_PAGE_BYTES};
use huddle_core::GroupId;

use super::{dec, enc, err, StoreError};

/// (group id, seq) -> `LogEntry`, or an empty value for an entry kept in
/// [`LOG_LARGE`].
pub(super) const LOG: TableDefinition<'_, (&[u8], u64), &[u8]> = TableDefinition::new("log");

/// Log entries whose encoding is longer than [`LARGE_ENTRY`] (commits that
/// carry a path or many proposals, large messages), keyed like [`LOG`],
/// which holds an empty value in their place. A value of a page or more
/// sits alone in its leaf, and redb then starts a new leaf for every entry
/// appended after it in the same group (measured with redb 2.6: each
/// 426-byte message after a 6 KB commit took a 4 KiB page of its own, and
/// a commit of ten groups wrote 2.5 times the bytes). Kept apart, the
/// small entries of a group share their leaves.
pub(super) const LOG_LARGE: TableDefinition<'_, (&[u8], u64), &[u8]> =
    TableDefinition::new("log_large");

/// Log entries encoded longer than this go to [`LOG_LARGE`].
pub(super) const LARGE_ENTRY: usize = 1024;

/// Appends `entries` to the log of `gid`.
pub(super) fn append(
    txn: &WriteTransaction,
    gid: &[u8],
    entries: &[LogEntry],
) -> Result<(), StoreError> {
    let mut t = txn.open_table(LOG).map_err(err)?;
    // Opened only when needed: an open table is written back.
    let mut large = None;
    for e in entries {
        let v = enc(e);
        if v.len() > LARGE_ENTRY {
            let large = match &mut large {
                Some(l) => l,
                None => large.insert(txn.open_table(LOG_LARGE).map_err(err)?),
            };
            large.insert((gid, e.seq), v.as_slice()).map_err(err)?;
            t.insert((gid, e.seq), [].as_slice()).map_err(err)?;
        } else {
            t.insert((gid, e.seq), v.as_slice()).map_err(err)?;
        }
    }
    Ok(())
}

/// Deletes the entries `from..=upto` of `gid`.
pub(super) fn compact(
    txn: &WriteTransaction,
    gid: &[u8],
    from: u64,
    upto: u64,
) -> Result<(), StoreError> {
    let mut log = txn.open_table(LOG).map_err(err)?;
    let mut large_seqs = Vec::new();
    for seq in from..=upto {
        let gone = log.remove((gid, seq)).map_err(err)?;
        if gone.is_some_and(|v| v.value().is_empty()) {
            large_seqs.push(seq);
        }
    }
    if !large_seqs.is_empty() {
        let mut large = txn.open_table(LOG_LARGE).map_err(err)?;
        for seq in large_seqs {
            large.remove((gid, seq)).map_err(err)?;
        }
    }
    Ok(())
}

/// The entries of `group` after `after` up to `until`: at most `limit`,
/// and no more once [`MAX_PAGE_BYTES`] of data are read.
pub(super) fn read(
    txn: &ReadTransaction,
    group: &GroupId,
    after: u64,
    until: u64,
    limit: u32,
) -> Result<Vec<LogEntry>, StoreError> {
    let t = txn.open_table(LOG).map_err(err)?;
    let large = txn.open_table(LOG_LARGE).map_err(err)?;
    let gid = group.as_bytes().as_slice();
    let mut out = Vec::new();
    let mut bytes = 0;
    for row in t.range((gid, after + 1)..=(gid, until)).map_err(err)? {
        if out.len() >= limit as usize || bytes >= MAX_PAGE_BYTES {
            break;
        }
        let (k, v) = row.map_err(err)?;
        let e: LogEntry = if v.value().is_empty() {
            let seq = k.value().1;
            let v = large.get((gid, seq)).map_err(err)?.ok_or_else(|| {
                StoreError::Corrupt(format!("log entry {seq} of {group} is missing"))
            })?;
            dec(v.value(), "log entry")?
        } else {
            dec(v.value(), "log entry")?
        };
        bytes += e.data.len();
        out.push(e);
    }
    Ok(out)
}

/// The sequence number of the newest log entry of `gid`, 0 if none.
pub(super) fn last_seq<T: ReadableTable<(&'static [u8], u64), &'static [u8]>>(
    log: &T,
    gid: &[u8],
) -> Result<u64, StoreError> {
    Ok(log
        .range((gid, 0)..=(gid, u64::MAX))
        .map_err(err)?
        .next_back()
        .transpose()
        .map_err(err)?
        .map_or(0, |(k, _)| k.value().1))
}
