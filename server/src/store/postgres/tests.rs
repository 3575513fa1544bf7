//! What only the PostgreSQL store promises: several DS processes on one
//! database cannot fork a group's log, whatever they compute, and the
//! schema is versioned. Skipped (and said so) without
//! `HUDDLE_TEST_POSTGRES`.

use super::testing::store;
use super::*;

fn entry(seq: u64, epoch: u64, kind: EntryKind) -> LogEntry {
    LogEntry {
        seq,
        epoch,
        kind,
        timestamp_ms: seq,
        data: Bytes::from(vec![seq as u8; 4]),
    }
}

fn append(g: GroupId, head: u64, entries: Vec<LogEntry>) -> GroupWrite {
    let mut w = GroupWrite::create(g, "alice", 0, vec![1]);
    w.create = false;
    w.meta.head = head;
    w.entries = entries;
    w
}

/// Two processes that both believe the head is 0 and append seq 1 at the
/// same moment: exactly one lands, the other is told of the conflict.
#[test]
fn two_processes_appending_at_one_head_cannot_both_land() {
    let Some(a) = store("two_processes_appending_at_one_head") else {
        return;
    };
    let b = a.another();
    let g = GroupId([7; 16]);
    a.apply(&[GroupWrite::create(g, "alice", 0, vec![1])])
        .unwrap();
    for round in 0..20u64 {
        let barrier = std::sync::Barrier::new(2);
        let one = |st: &PgStore, tag: u8| {
            let mut e = entry(round + 1, 0, EntryKind::Application);
            e.data = Bytes::from(vec![tag; 4]);
            barrier.wait();
            st.apply(&[append(g, round + 1, vec![e])])
        };
        let (ra, rb) = std::thread::scope(|s| {
            let ha = s.spawn(|| one(&a, 1));
            let hb = s.spawn(|| one(&b, 2));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        assert!(
            ra.is_ok() != rb.is_ok(),
            "round {round}: exactly one must land: {ra:?} {rb:?}"
        );
        let lost = if ra.is_ok() { rb } else { ra };
        assert!(matches!(lost, Err(StoreError::Conflict(_))), "{lost:?}");
    }
    let log = a.read_log(&g, 0, 100, 100).unwrap();
    assert_eq!(
        log.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    assert_eq!(b.group(&g).unwrap().unwrap().meta.head, 20);
}

/// A node that has not seen the newest entries cannot write the group's
/// row from its older view even without entries (a compaction, a
/// GroupInfo): its epoch and state would go back. And compaction never
/// moves back.
#[test]
fn a_write_without_entries_from_an_older_view_is_a_conflict() {
    let Some(s) = store("a_write_without_entries_from_an_older_view") else {
        return;
    };
    let g = GroupId([9; 16]);
    s.apply(&[GroupWrite::create(g, "alice", 0, vec![1])])
        .unwrap();
    let entries = (1..=3)
        .map(|q| entry(q, 0, EntryKind::Application))
        .collect();
    let mut w = append(g, 3, entries);
    w.meta.compacted = 2;
    w.compact_upto = Some(2);
    s.apply(&[w]).unwrap();
    // Made at head 1: refused, and nothing changed.
    let mut stale = append(g, 1, Vec::new());
    stale.meta.epoch = 0;
    stale.state = Some(vec![0xee]);
    assert!(matches!(s.apply(&[stale]), Err(StoreError::Conflict(_))));
    let now = s.group(&g).unwrap().unwrap();
    assert_eq!(
        (now.meta.head, now.meta.compacted, now.state),
        (3, 2, vec![1])
    );
    // At the head, with an older compaction point: the point stays.
    let mut behind = append(g, 3, Vec::new());
    behind.meta.compacted = 1;
    s.apply(&[behind]).unwrap();
    assert_eq!(s.group(&g).unwrap().unwrap().meta.compacted, 2);
}

/// A writer whose own checks are wrong still cannot put two entries at one
/// seq or two commits in one epoch: the schema refuses them.
#[test]
fn the_schema_refuses_two_commits_in_one_epoch_and_two_entries_at_one_seq() {
    let Some(s) = store("the_schema_refuses_two_commits") else {
        return;
    };
    let g = GroupId([8; 16]);
    s.apply(&[GroupWrite::create(g, "alice", 0, vec![1])])
        .unwrap();
    // Two commits of epoch 0 in one write, contiguous as the store checks.
    let r = s.apply(&[append(
        g,
        2,
        vec![
            entry(1, 0, EntryKind::Commit),
            entry(2, 0, EntryKind::Commit),
        ],
    )]);
    assert!(
        matches!(&r, Err(StoreError::Conflict(m)) if m.contains("log_one_commit_per_epoch")),
        "{r:?}"
    );
    assert!(s.read_log(&g, 0, 10, 10).unwrap().is_empty());
    // Commits of successive epochs and messages between them are fine.
    s.apply(&[append(
        g,
        3,
        vec![
            entry(1, 0, EntryKind::Commit),
            entry(2, 1, EntryKind::Application),
            entry(3, 1, EntryKind::Commit),
        ],
    )])
    .unwrap();
    // Past the store's own check, straight into the table.
    let raw = |seq: i64, epoch: i64, kind: i16| {
        s.txn(|t| {
            t.execute(
                "INSERT INTO log (group_id, seq, epoch, kind, timestamp_ms, data)
                 VALUES ($1, $2, $3, $4, 0, '')",
                &[&g.as_bytes().as_slice(), &seq, &epoch, &kind],
            )
            .map_err(pg)
        })
    };
    assert!(matches!(raw(3, 2, 2), Err(StoreError::Conflict(_))));
    assert!(matches!(raw(4, 1, 0), Err(StoreError::Conflict(_))));
    assert!(matches!(raw(0, 2, 2), Err(StoreError::Conflict(_))));
    raw(4, 2, 0).unwrap();
}

#[test]
fn migrations_run_once_and_a_newer_schema_is_refused() {
    let Some(s) = store("migrations_run_once") else {
        return;
    };
    assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as u64);
    // A second process on the same database finds it up to date.
    let again = s.another();
    assert_eq!(again.schema_version().unwrap(), MIGRATIONS.len() as u64);
    s.txn(|t| {
        t.execute("UPDATE huddle_schema SET version = version + 1", &[])
            .map_err(pg)
    })
    .unwrap();
    let r = PgStore::open_with(s.config(), 1);
    assert!(
        matches!(&r, Err(StoreError::Corrupt(m)) if m.contains("schema version")),
        "{r:?}"
    );
}

/// A closed store refuses every call, as the embedded one does.
#[test]
fn a_closed_store_refuses_calls() {
    let Some(s) = store("a_closed_store_refuses_calls") else {
        return;
    };
    s.close();
    assert!(matches!(s.user("alice"), Err(StoreError::Io(_))));
}

/// The maintenance lease: one holder at a time, renewed by its holder,
/// taken over by another node once it lapsed (a holder that died).
#[test]
fn a_lease_has_one_holder_until_it_lapses() {
    let Some(a) = store("a_lease_has_one_holder") else {
        return;
    };
    let b = a.another();
    let hour = Duration::from_secs(3600);
    assert!(
        a.lease("sweep", 1, hour).unwrap(),
        "a free lease is granted"
    );
    assert!(
        !b.lease("sweep", 2, hour).unwrap(),
        "a held lease is refused"
    );
    assert!(a.lease("sweep", 1, hour).unwrap(), "its holder renews it");
    assert!(b.lease("other", 2, hour).unwrap(), "leases are named");
    // Holder 1 renews for no time at all: from the next transaction on,
    // the lease has lapsed and another node takes it.
    assert!(a.lease("sweep", 1, Duration::ZERO).unwrap());
    std::thread::sleep(Duration::from_millis(2));
    assert!(
        b.lease("sweep", 2, hour).unwrap(),
        "a lapsed lease is taken over"
    );
    assert!(
        !a.lease("sweep", 1, hour).unwrap(),
        "and its old holder lost it"
    );
}

fn media(len: u64) -> MediaRecord {
    MediaRecord {
        group: GroupId([3; 16]),
        uploader: "alice".into(),
        total_len: len,
        hash: [0; 32],
        state: MediaState::Uploading { offset: 0 },
        created_ms: 0,
        updated_ms: 0,
        multipart: None,
    }
}

/// The media quota holds for every process on the database together:
/// two reserving at once past it get one yes and one no, and deleting an
/// item gives its bytes back.
#[test]
fn the_media_quota_is_counted_by_the_database_for_every_node() {
    let Some(a) = store("the_media_quota_is_counted_by_the_database") else {
        return;
    };
    let b = a.another();
    assert!(a.counts_media());
    let id = |k: u8| MediaId([k; 16]);
    assert!(a.reserve_media(&id(1), &media(600), 1000).unwrap());
    assert!(
        !b.reserve_media(&id(2), &media(500), 1000).unwrap(),
        "past the quota"
    );
    assert_eq!(b.media(&id(2)).unwrap(), None, "a refusal records nothing");
    // Updating a record does not count it again.
    a.put_media(&id(1), &media(600)).unwrap();
    assert!(
        b.reserve_media(&id(2), &media(400), 1000).unwrap(),
        "exactly at the quota"
    );
    b.delete_media(&id(1)).unwrap();
    b.delete_media(&id(1)).unwrap();
    for round in 3..13u8 {
        let barrier = std::sync::Barrier::new(2);
        let one = |st: &PgStore, k: u8| {
            barrier.wait();
            st.reserve_media(&id(k), &media(350), 1000).unwrap()
        };
        let (ra, rb) = std::thread::scope(|s| {
            let ha = s.spawn(|| one(&a, round));
            let hb = s.spawn(|| one(&b, round + 100));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        // 400 + 350 fits, a second 350 does not.
        assert!(ra != rb, "round {round}: exactly one fits: {ra} {rb}");
        a.delete_media(&id(if ra { round } else { round + 100 }))
            .unwrap();
    }
}

/// A database of schema version 2 (media records without their length)
/// gets each record's length and their sum when migrated.
#[test]
fn migrating_counts_the_media_recorded_before() {
    let Some(s) = store("migrating_counts_the_media") else {
        return;
    };
    s.txn(|t| {
        t.batch_execute(
            "DROP TABLE media_usage; ALTER TABLE media DROP COLUMN total_len;
             DROP TABLE device_log, device_links, device_seen, join_requests;
             ALTER TABLE users DROP COLUMN revoked_ms;
             UPDATE huddle_schema SET version = 2;",
        )
        .map_err(pg)?;
        for (k, len) in [(1u8, 700u64), (2, 250)] {
            let bytes = postcard::to_allocvec(&media(len)).unwrap();
            t.execute(
                "INSERT INTO media (id, record) VALUES ($1, $2)",
                &[&[k; 16].as_slice(), &bytes],
            )
            .map_err(pg)?;
        }
        Ok(())
    })
    .unwrap();
    let again = PgStore::open_with(s.config(), 1).unwrap();
    assert_eq!(again.schema_version().unwrap(), MIGRATIONS.len() as u64);
    assert!(again
        .reserve_media(&MediaId([3; 16]), &media(50), 1000)
        .unwrap());
    assert!(
        !again
            .reserve_media(&MediaId([4; 16]), &media(1), 1000)
            .unwrap(),
        "700 + 250 + 50 is the quota"
    );
    again.delete_media(&MediaId([1; 16])).unwrap();
    assert!(again
        .reserve_media(&MediaId([4; 16]), &media(700), 1000)
        .unwrap());
}

/// A record written without its length (by a node of an older version)
/// is counted by the next recount.
#[test]
fn a_recount_puts_the_media_quota_right() {
    let Some(s) = store("a_recount_puts_the_media_quota_right") else {
        return;
    };
    let bytes = postcard::to_allocvec(&media(900)).unwrap();
    s.txn(|t| {
        t.execute(
            "INSERT INTO media (id, record) VALUES ($1, $2)",
            &[&[5u8; 16].as_slice(), &bytes],
        )
        .map_err(pg)
    })
    .unwrap();
    assert!(
        s.reserve_media(&MediaId([6; 16]), &media(200), 1000)
            .unwrap(),
        "not counted yet"
    );
    s.delete_media(&MediaId([6; 16])).unwrap();
    s.recount_media().unwrap();
    assert!(
        !s.reserve_media(&MediaId([6; 16]), &media(200), 1000)
            .unwrap(),
        "900 counted now"
    );
    assert!(s
        .reserve_media(&MediaId([6; 16]), &media(100), 1000)
        .unwrap());
}
