//! Tests of what only the embedded store has.

use super::*;
use ::redb::ReadableTableMetadata as _;
use huddle_core::proto::EntryKind;
use log::{LOG, LOG_LARGE};

fn set_version(path: &Path, v: u64) {
    let db = Database::create(path).unwrap();
    let t = db.begin_write().unwrap();
    t.open_table(META)
        .unwrap()
        .insert("schema_version", v)
        .unwrap();
    t.commit().unwrap();
}

fn version(path: &Path) -> Option<u64> {
    let db = Database::create(path).unwrap();
    let t = db.begin_read().unwrap();
    let meta = t.open_table(META).unwrap();
    let v = meta.get("schema_version").unwrap().map(|v| v.value());
    v
}

/// A DS restarted while the old one is still exiting waits for the
/// file rather than failing at once.
#[test]
fn opening_waits_for_a_store_being_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let first = RedbStore::open(&path).unwrap();
    let p2 = path.clone();
    let second = std::thread::spawn(move || RedbStore::open(&p2).map(|_| ()));
    std::thread::sleep(std::time::Duration::from_millis(300));
    first.close();
    drop(first);
    second.join().unwrap().unwrap();
}

#[test]
fn an_older_data_dir_is_upgraded_and_an_unknown_version_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    drop(RedbStore::open(&path).unwrap());
    assert_eq!(version(&path), Some(SCHEMA_VERSION));
    for old in [1, 2] {
        set_version(&path, old);
        drop(RedbStore::open(&path).unwrap());
        assert_eq!(version(&path), Some(SCHEMA_VERSION));
    }
    set_version(&path, SCHEMA_VERSION + 1);
    assert!(matches!(
        RedbStore::open(&path),
        Err(StoreError::Corrupt(_))
    ));
}

fn sized_entry(seq: u64, len: usize) -> LogEntry {
    LogEntry {
        seq,
        epoch: 0,
        kind: EntryKind::Application,
        timestamp_ms: seq,
        data: Bytes::from(vec![seq as u8; len]),
    }
}

/// Appends `entries` to `group` (created on its first write), whose head
/// is `head`.
fn append(s: &RedbStore, group: GroupId, head: u64, entries: Vec<LogEntry>) {
    let mut w = GroupWrite::create(group, "alice", 0, vec![1, 2, 3]);
    w.create = head == 0;
    w.meta.head = head + entries.len() as u64;
    w.entries = entries;
    s.apply(&[w]).unwrap();
}

/// The rounds of a busy DS: a commit of several KB opens each group's
/// log, then small messages follow, a few per group in each transaction.
fn busy_groups(s: &RedbStore, groups: u8, rounds: u64, per_round: u64) -> Vec<GroupId> {
    let ids: Vec<GroupId> = (1..=groups).map(|g| GroupId([g; 16])).collect();
    for &g in &ids {
        append(s, g, 0, vec![sized_entry(1, 6000)]);
    }
    for r in 0..rounds {
        let writes: Vec<GroupWrite> = ids
            .iter()
            .map(|&g| {
                let head = 1 + r * per_round;
                let mut w = GroupWrite::create(g, "alice", 0, vec![1, 2, 3]);
                w.create = false;
                w.meta.head = head + per_round;
                w.entries = (1..=per_round)
                    .map(|i| sized_entry(head + i, 400))
                    .collect();
                w
            })
            .collect();
        s.apply(&writes).unwrap();
    }
    ids
}

/// Large entries are kept beside the log and read back in place; small
/// entries after a large one share their leaves (one leaf per entry, as
/// redb does after a value of a page or more, wrote 2.5 times the bytes).
#[test]
fn small_entries_after_a_large_one_share_their_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("db.redb")).unwrap();
    let (rounds, per_round) = (30, 4);
    let ids = busy_groups(&s, 4, rounds, per_round);
    let small = ids.len() as u64 * rounds * per_round;
    {
        let txn = s.read_for_tests();
        let log = txn.open_table(LOG).unwrap().stats().unwrap();
        let large = txn.open_table(LOG_LARGE).unwrap();
        assert_eq!(
            large.len().unwrap(),
            ids.len() as u64,
            "one large entry per group"
        );
        // About 9 entries of ~430 bytes fit a 4 KiB leaf; one per leaf
        // would give `small` leaves.
        assert!(
            log.leaf_pages() * 3 < small,
            "{} leaf pages for {small} small entries",
            log.leaf_pages()
        );
    }
    let head = 1 + rounds * per_round;
    for &g in &ids {
        let all = s.read_log(&g, 0, head, 1000).unwrap();
        assert_eq!(all.len() as u64, head);
        assert_eq!(all[0], sized_entry(1, 6000));
        for (i, e) in all.iter().enumerate().skip(1) {
            assert_eq!(*e, sized_entry(i as u64 + 1, 400));
        }
    }
    // Compacting past the large entry removes it from beside the log too.
    let g = ids[0];
    let mut w = GroupWrite::create(g, "alice", 0, vec![1, 2, 3]);
    w.create = false;
    w.meta.head = head;
    w.meta.compacted = 2;
    w.compact_upto = Some(2);
    s.apply(&[w]).unwrap();
    assert_eq!(s.read_log(&g, 0, head, 1000).unwrap()[0].seq, 3);
    let txn = s.read_for_tests();
    let large = txn.open_table(LOG_LARGE).unwrap();
    assert!(large.get((g.as_bytes().as_slice(), 1)).unwrap().is_none());
    assert_eq!(large.len().unwrap(), ids.len() as u64 - 1);
}
