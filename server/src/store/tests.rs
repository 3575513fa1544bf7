//! Contract tests for [`Store`]: each runs against the redb backend and,
//! when `HUDDLE_TEST_POSTGRES` names a database, against PostgreSQL (each
//! test in a schema of its own); without it the PostgreSQL runs say they
//! were skipped. Then tests of what only one backend has.

use super::redb::RedbStore;
use super::*;
use ::redb::ReadableTableMetadata as _;
use huddle_core::proto::EntryKind;

fn store() -> (tempfile::TempDir, RedbStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("db.redb")).unwrap();
    (dir, s)
}

fn user(k: u8) -> UserRecord {
    UserRecord {
        identity_key: [k; 32],
        registered_ms: 1,
    }
}

fn kp(n: u8, not_after: u64) -> (Vec<u8>, StoredKeyPackage) {
    (
        vec![n; 8],
        StoredKeyPackage {
            not_after,
            bytes: vec![n; 20],
        },
    )
}

fn entry(seq: u64) -> LogEntry {
    LogEntry {
        seq,
        epoch: 0,
        kind: EntryKind::Application,
        timestamp_ms: seq,
        data: Bytes::from(vec![seq as u8; 4]),
    }
}

fn write(group: GroupId, create: bool, head: u64, entries: Vec<LogEntry>) -> GroupWrite {
    let mut w = GroupWrite::create(group, "alice", 0, vec![1, 2, 3]);
    w.create = create;
    w.meta.head = head;
    w.entries = entries;
    w
}

fn names_are_unique_per_key(s: &dyn Store) {
    assert_eq!(
        s.register_user("alice", &user(1)).unwrap(),
        RegisterOutcome::Created
    );
    assert_eq!(
        s.register_user("alice", &user(1)).unwrap(),
        RegisterOutcome::Existing
    );
    assert_eq!(
        s.register_user("alice", &user(2)).unwrap(),
        RegisterOutcome::Taken
    );
    assert_eq!(s.user("alice").unwrap(), Some(user(1)));
    assert_eq!(s.user("bob").unwrap(), None);
}

fn key_packages_are_handed_out_once_then_last_resort(s: &dyn Store) {
    s.add_key_packages(
        "bob",
        &[kp(1, 100), kp(2, 100), kp(3, 5)],
        Some(&kp(9, 100).1),
        10,
        1,
    )
    .unwrap();
    assert_eq!(s.key_package_count("bob", 1).unwrap(), (3, true));
    // Only two stay valid until 50; the last resort until 100, not 101.
    assert_eq!(s.key_package_count("bob", 50).unwrap(), (2, true));
    assert_eq!(s.key_package_count("bob", 101).unwrap(), (0, false));
    // Repeated upload of the same package does not double it.
    s.add_key_packages("bob", &[kp(1, 100)], None, 10, 1)
        .unwrap();
    assert_eq!(s.key_package_count("bob", 1).unwrap(), (3, true));
    let users = vec!["bob".to_string()];
    let mut seen = Vec::new();
    for _ in 0..2 {
        let c = s
            .claim_key_packages(&users, 50)
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        assert!(!c.last_resort);
        seen.push(c.bytes);
    }
    assert_ne!(seen[0], seen[1]);
    // The third package expired at 5 < now = 50: skipped, last resort given.
    let c = s
        .claim_key_packages(&users, 50)
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    assert!(c.last_resort);
    assert_eq!(&c.bytes[..], &[9; 20]);
    assert_eq!(s.key_package_count("bob", 50).unwrap(), (0, true));
    // An expired last-resort package is not handed out.
    assert_eq!(s.claim_key_packages(&users, 101).unwrap(), vec![None]);
    // All or nothing: with one user lacking a package, nobody's is taken.
    s.add_key_packages("carol", &[kp(4, 100)], None, 10, 1)
        .unwrap();
    let both = vec!["carol".to_string(), "nobody".to_string()];
    assert_eq!(s.claim_key_packages(&both, 50).unwrap()[1], None);
    assert_eq!(s.key_package_count("carol", 50).unwrap(), (1, false));
}

fn expired_key_packages_leave_the_pool_when_new_ones_come(s: &dyn Store) {
    s.add_key_packages("bob", &[kp(1, 10), kp(2, 10)], None, 3, 1)
        .unwrap();
    // At 20 both have expired: they do not count against the cap.
    s.add_key_packages("bob", &[kp(3, 100), kp(4, 100), kp(5, 100)], None, 3, 20)
        .unwrap();
    assert_eq!(s.key_package_count("bob", 0).unwrap(), (3, false));
}

fn key_package_pool_is_capped(s: &dyn Store) {
    let err = s
        .add_key_packages("bob", &[kp(1, 9), kp(2, 9), kp(3, 9)], None, 2, 1)
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)));
    assert_eq!(s.key_package_count("bob", 0).unwrap(), (0, false));
}

fn log_is_contiguous_and_atomic(s: &dyn Store) {
    let g = GroupId([1; 16]);
    s.apply(&[write(g, true, 0, vec![])]).unwrap();
    assert!(matches!(
        s.apply(&[write(g, true, 0, vec![])]),
        Err(StoreError::Conflict(_))
    ));
    s.apply(&[write(g, false, 2, vec![entry(1), entry(2)])])
        .unwrap();
    // A gap is refused, and the whole batch with it.
    let g2 = GroupId([2; 16]);
    let batch = [
        write(g2, true, 0, vec![]),
        write(g, false, 4, vec![entry(4)]),
    ];
    assert!(matches!(s.apply(&batch), Err(StoreError::Conflict(_))));
    assert_eq!(s.groups().unwrap().len(), 1);
    let log = s.read_log(&g, 0, 10, 100).unwrap();
    assert_eq!(log.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(s.read_log(&g, 1, 10, 100).unwrap(), vec![entry(2)]);
    assert_eq!(s.read_log(&g, 0, 1, 100).unwrap(), vec![entry(1)]);
    assert_eq!(s.read_log(&g, 0, 10, 1).unwrap().len(), 1);
    assert_eq!(s.user_groups("alice").unwrap(), vec![g]);
}

fn inbox_numbers_items_per_user(s: &dyn Store) {
    let g = GroupId([1; 16]);
    let mut w = write(g, true, 0, vec![]);
    for u in ["bob", "carol", "bob"] {
        w.welcomes.push(welcome(u, 0, 0));
    }
    let created = s.apply(&[w]).unwrap();
    assert_eq!(created[0], vec![1, 1, 2]);
    let (items, head) = s.read_inbox("bob", 0, 10).unwrap();
    assert_eq!((items.len(), head), (2, 2));
    let (items, head) = s.read_inbox("bob", 1, 10).unwrap();
    assert_eq!((items.len(), head), (1, 2));
}

/// A Welcome whose shared part is `SHARED` and own part names `user`.
fn welcome(user: &str, commit_seq: u64, timestamp_ms: u64) -> NewInboxItem {
    NewInboxItem {
        user: user.into(),
        commit_seq,
        timestamp_ms,
        shared: Bytes::from_static(SHARED),
        own: Bytes::from(format!("secrets of {user}").into_bytes()),
    }
}

/// Header (6 bytes) and an encrypted GroupInfo standing in for a big one.
const SHARED: &[u8] = b"HEAD..the encrypted group info, the same for every joiner";

/// `shared_rows` counts the stored shared parts of Welcomes.
fn a_welcome_shared_by_many_joiners_is_stored_once_and_rebuilt_per_joiner(
    s: &dyn Store,
    shared_rows: &dyn Fn() -> u64,
) {
    let g = GroupId([1; 16]);
    let mut w = write(g, true, 0, vec![]);
    for i in 0..50 {
        w.welcomes.push(welcome(&format!("u{i}"), 7, 1));
    }
    s.apply(&[w]).unwrap();
    let (items, _) = s.read_inbox("u3", 0, 10).unwrap();
    let own = b"secrets of u3";
    let mut want = SHARED[..6].to_vec();
    want.push(own.len() as u8);
    want.extend_from_slice(own);
    want.extend_from_slice(&SHARED[6..]);
    assert_eq!(items[0].welcome.as_ref(), want.as_slice());
    assert_eq!(items[0].commit_seq, 7);
    // Stored once: one shared row, with 50 references.
    assert_eq!(shared_rows(), 1);
    // Deleted with its last reference.
    for i in 0..49 {
        s.delete_inbox(&format!("u{i}"), 1).unwrap();
    }
    assert_eq!(shared_rows(), 1);
    s.delete_inbox("u49", 1).unwrap();
    assert_eq!(shared_rows(), 0);
}

fn inboxes_are_capped_acknowledged_and_expired_and_keep_their_numbering(s: &dyn Store) {
    let g = GroupId([1; 16]);
    let mut w = write(g, true, 0, vec![]);
    w.inbox_cap = 3;
    for t in 0..5 {
        w.welcomes.push(welcome("bob", t, 100 + t));
    }
    assert_eq!(s.apply(&[w]).unwrap()[0], vec![1, 2, 3, 4, 5]);
    // The two oldest made room.
    let seqs = |s: &dyn Store| -> Vec<u64> {
        s.read_inbox("bob", 0, 10)
            .unwrap()
            .0
            .iter()
            .map(|i| i.seq)
            .collect()
    };
    assert_eq!(seqs(s), vec![3, 4, 5]);
    s.delete_inbox("bob", 3).unwrap();
    assert_eq!(seqs(s), vec![4, 5]);
    assert_eq!(s.expire_inbox(104).unwrap(), 1);
    assert_eq!(seqs(s), vec![5]);
    s.delete_inbox("bob", 5).unwrap();
    // Empty, and the next one is still number 6.
    assert_eq!(s.read_inbox("bob", 0, 10).unwrap(), (vec![], 5));
    let mut w = write(g, false, 0, vec![]);
    w.welcomes.push(welcome("bob", 9, 200));
    assert_eq!(s.apply(&[w]).unwrap()[0], vec![6]);
}

#[test]
fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let g = GroupId([3; 16]);
    {
        let s = RedbStore::open(&path).unwrap();
        s.register_user("alice", &user(1)).unwrap();
        s.apply(&[write(g, true, 1, vec![entry(1)])]).unwrap();
        s.save_cursors(&[(g, "alice".into(), 1)]).unwrap();
    }
    let s = RedbStore::open(&path).unwrap();
    assert_eq!(s.user("alice").unwrap(), Some(user(1)));
    let groups = s.groups().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].meta.head, 1);
    assert_eq!(groups[0].state, vec![1, 2, 3]);
    assert_eq!(groups[0].members[0].0, "alice");
    assert_eq!(s.cursors(&g).unwrap(), vec![("alice".to_string(), 1)]);
}

fn cursors_only_move_forward_and_compaction_drops_entries(s: &dyn Store) {
    let g = GroupId([1; 16]);
    s.apply(&[write(g, true, 3, vec![entry(1), entry(2), entry(3)])])
        .unwrap();
    s.save_cursors(&[(g, "alice".into(), 3)]).unwrap();
    s.save_cursors(&[(g, "alice".into(), 1)]).unwrap();
    assert_eq!(s.cursors(&g).unwrap(), vec![("alice".to_string(), 3)]);
    let mut w = write(g, false, 3, vec![]);
    w.meta.compacted = 2;
    w.compact_upto = Some(2);
    s.apply(&[w]).unwrap();
    assert_eq!(s.read_log(&g, 0, 3, 10).unwrap(), vec![entry(3)]);
    assert_eq!(s.groups().unwrap()[0].meta.compacted, 2);
}

fn epoch_authenticators_are_collected_per_epoch(s: &dyn Store) {
    let g = GroupId([1; 16]);
    s.publish_epoch_authenticator(&g, 1, "a", [1; 32]).unwrap();
    s.publish_epoch_authenticator(&g, 2, "a", [2; 32]).unwrap();
    let all = s.publish_epoch_authenticator(&g, 1, "b", [1; 32]).unwrap();
    assert_eq!(all, vec![("a".into(), [1; 32]), ("b".into(), [1; 32])]);
}

#[test]
fn the_head_follows_the_log_when_only_messages_were_appended() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let g = GroupId([5; 16]);
    {
        let s = RedbStore::open(&path).unwrap();
        s.apply(&[write(g, true, 0, vec![])]).unwrap();
        // Same epoch, nothing compacted: only the head moves.
        for seq in 1..=3 {
            s.apply(&[write(g, false, seq, vec![entry(seq)])]).unwrap();
        }
        assert!(matches!(
            s.apply(&[write(g, false, 3, vec![entry(3)])]),
            Err(StoreError::Conflict(_))
        ));
    }
    let s = RedbStore::open(&path).unwrap();
    assert_eq!(s.groups().unwrap()[0].meta.head, 3);
    s.apply(&[write(g, false, 4, vec![entry(4)])]).unwrap();
    // Everything compacted: the head is still known.
    let mut w = write(g, false, 4, vec![]);
    w.meta.compacted = 4;
    w.compact_upto = Some(4);
    s.apply(&[w]).unwrap();
    drop(s);
    let s = RedbStore::open(&path).unwrap();
    let meta = &s.groups().unwrap()[0].meta;
    assert_eq!((meta.head, meta.compacted), (4, 4));
    assert!(s.read_log(&g, 0, 10, 10).unwrap().is_empty());
    assert!(matches!(
        s.apply(&[write(g, false, 5, vec![entry(4)])]),
        Err(StoreError::Conflict(_))
    ));
    let mut next = write(g, false, 5, vec![entry(5)]);
    next.meta.compacted = 4;
    s.apply(&[next]).unwrap();
    assert_eq!(s.groups().unwrap()[0].meta.head, 5);
}

#[test]
fn member_records_written_before_removal_times_were_kept_still_load() {
    #[derive(Serialize)]
    struct Old {
        joined_seq: u64,
        removed_seq: Option<u64>,
    }
    let old = postcard::to_allocvec(&Old {
        joined_seq: 3,
        removed_seq: Some(9),
    })
    .unwrap();
    let m = super::redb::dec_member(&old).unwrap();
    assert_eq!(
        (m.joined_seq, m.removed_seq, m.removed_ms),
        (3, Some(9), None)
    );
    let new = MemberRecord {
        joined_seq: 3,
        removed_seq: Some(9),
        removed_ms: Some(77),
    };
    let bytes = postcard::to_allocvec(&new).unwrap();
    assert_eq!(super::redb::dec_member(&bytes).unwrap(), new);
    assert!(super::redb::dec_member(&[0xff]).is_err());
}

#[test]
fn media_records_written_before_multipart_uploads_were_kept_still_load() {
    #[derive(Serialize)]
    struct Old {
        group: GroupId,
        uploader: String,
        total_len: u64,
        hash: [u8; 32],
        state: MediaState,
        created_ms: u64,
        updated_ms: u64,
    }
    let old = postcard::to_allocvec(&Old {
        group: GroupId([4; 16]),
        uploader: "alice".into(),
        total_len: 5000,
        hash: [0; 32],
        state: MediaState::Uploading { offset: 4096 },
        created_ms: 1,
        updated_ms: 2,
    })
    .unwrap();
    let r = super::dec_media(&old).unwrap();
    assert_eq!(r.state, MediaState::Uploading { offset: 4096 });
    assert_eq!(
        (r.uploader.as_str(), r.updated_ms, r.multipart),
        ("alice", 2, None)
    );
    let new = MediaRecord {
        multipart: Some(Multipart {
            upload: "u-1".into(),
            parts: vec![("etag".into(), [9; 32])],
        }),
        ..super::dec_media(&old).unwrap()
    };
    let bytes = postcard::to_allocvec(&new).unwrap();
    assert_eq!(super::dec_media(&bytes).unwrap(), new);
    assert!(super::dec_media(&[0xff]).is_err());
}

#[test]
fn a_departed_member_holds_the_log_until_it_read_up_to_its_removal_or_retention_passed() {
    let current = MemberRecord {
        joined_seq: 2,
        removed_seq: None,
        removed_ms: None,
    };
    assert!(current.holds_log(0, u64::MAX, 0));
    let removed = MemberRecord {
        joined_seq: 2,
        removed_seq: Some(10),
        removed_ms: Some(1_000),
    };
    // Has not read up to its removal, within retention.
    assert!(removed.holds_log(5, 1_500, 1_000));
    // Read up to it.
    assert!(!removed.holds_log(10, 1_500, 1_000));
    // Retention passed.
    assert!(!removed.holds_log(5, 2_000, 1_000));
    // Its join counts as read.
    assert!(!MemberRecord {
        joined_seq: 10,
        ..removed
    }
    .holds_log(0, 1_500, 1_000));
    // A removal from before removal times were kept: until read.
    let legacy = MemberRecord {
        removed_ms: None,
        ..removed
    };
    assert!(legacy.holds_log(5, u64::MAX, 0));
    assert!(!legacy.holds_log(10, u64::MAX, 0));
}

/// Runs each contract test on both backends.
/// Progress writes update a record only while it exists, and deleting a
/// record says how many bytes it gives back, once.
fn media_records_are_updated_only_while_they_exist(s: &dyn Store) {
    let id = MediaId([8; 16]);
    let rec = MediaRecord {
        group: GroupId([2; 16]),
        uploader: "alice".into(),
        total_len: 4096,
        hash: [0; 32],
        state: MediaState::Uploading { offset: 0 },
        created_ms: 1,
        updated_ms: 1,
        multipart: None,
    };
    assert!(
        !s.update_media(&id, &rec).unwrap(),
        "no record: nothing written"
    );
    assert_eq!(s.media(&id).unwrap(), None);
    s.put_media(&id, &rec).unwrap();
    let later = MediaRecord {
        state: MediaState::Uploading { offset: 2048 },
        ..rec.clone()
    };
    assert!(s.update_media(&id, &later).unwrap());
    assert_eq!(s.media(&id).unwrap(), Some(later.clone()));
    assert_eq!(s.delete_media(&id).unwrap(), Some(4096));
    assert_eq!(
        s.delete_media(&id).unwrap(),
        None,
        "a second delete gives nothing back"
    );
    assert!(
        !s.update_media(&id, &later).unwrap(),
        "a deleted record stays deleted"
    );
    assert_eq!(s.media(&id).unwrap(), None);
}

fn join_requests_wait_per_group_up_to_a_bound(s: &dyn Store) {
    let (g, other) = (GroupId([1; 16]), GroupId([2; 16]));
    let req = |user: &str, at_ms| JoinRequest {
        user: user.into(),
        invite: [7; 32],
        at_ms,
    };
    s.put_join_request(&g, &req("carol", 20), 2).unwrap();
    s.put_join_request(&g, &req("bob", 10), 2).unwrap();
    // Asking again replaces, and does not count against the bound.
    s.put_join_request(&g, &req("carol", 30), 2).unwrap();
    assert!(matches!(
        s.put_join_request(&g, &req("dave", 40), 2),
        Err(StoreError::Conflict(_))
    ));
    s.put_join_request(&other, &req("dave", 50), 2).unwrap();
    assert_eq!(
        s.join_requests(&g).unwrap(),
        [req("bob", 10), req("carol", 30)],
        "oldest first"
    );
    s.drop_join_requests(&g, &["bob".into(), "nobody".into()])
        .unwrap();
    assert_eq!(s.join_requests(&g).unwrap(), [req("carol", 30)]);
    assert_eq!(s.join_requests(&other).unwrap(), [req("dave", 50)]);
    s.put_join_request(&g, &req("dave", 40), 2).unwrap();
}

fn device_logs_grow_one_entry_at_a_time_and_revoke_for_good(s: &dyn Store) {
    assert_eq!(
        s.register_user("alice", &user(1)).unwrap(),
        RegisterOutcome::Created
    );
    assert!(s.device_log("alice").unwrap().is_empty());
    // A link waits; the code of a live one cannot be taken twice.
    let link = PendingLink {
        device_key: [2; 32],
        expires_ms: 1_000,
    };
    s.put_link("alice", "11111111", &link, 10, 2).unwrap();
    assert!(matches!(
        s.put_link("alice", "11111111", &link, 10, 2),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.link("alice", "11111111", 10).unwrap(), Some(link.clone()));
    assert_eq!(s.link("bob", "11111111", 10).unwrap(), None);
    assert_eq!(s.link("alice", "11111111", 1_000).unwrap(), None, "lapsed");
    // Entry 2 before entry 1 is refused, and writes nothing.
    let add = DeviceWrite::Add {
        principal: "alice/2",
        record: &user(2),
        code: "11111111",
    };
    assert!(!s.append_device("alice", 2, b"second", add).unwrap());
    assert_eq!(s.user("alice/2").unwrap(), None);
    assert!(s.append_device("alice", 1, b"first", add).unwrap());
    assert_eq!(s.user("alice/2").unwrap(), Some(user(2)));
    assert_eq!(
        s.link("alice", "11111111", 10).unwrap(),
        None,
        "the link is used up"
    );
    assert!(!s.append_device("alice", 1, b"again", add).unwrap());
    // Revoking device 1 hides it, keeps its root key, and keeps its name.
    let remove = DeviceWrite::Remove { principal: "alice" };
    assert!(s.append_device("alice", 2, b"removal", remove).unwrap());
    assert_eq!(
        s.device_log("alice").unwrap(),
        [Bytes::from_static(b"first"), Bytes::from_static(b"removal")]
    );
    assert_eq!(s.user("alice").unwrap(), None);
    assert_eq!(s.registered("alice").unwrap(), Some(user(1)));
    assert_eq!(
        s.register_user("alice", &user(1)).unwrap(),
        RegisterOutcome::Taken
    );
    // At most `max` live links per user: the oldest make room.
    let at = |expires_ms| PendingLink {
        device_key: [3; 32],
        expires_ms,
    };
    s.put_link("alice", "22222222", &at(2_000), 10, 2).unwrap();
    s.put_link("alice", "33333333", &at(3_000), 10, 2).unwrap();
    s.put_link("alice", "44444444", &at(4_000), 10, 2).unwrap();
    assert_eq!(
        s.link("alice", "22222222", 10).unwrap(),
        None,
        "the oldest made room"
    );
    assert_eq!(s.link("alice", "33333333", 10).unwrap(), Some(at(3_000)));
    assert_eq!(s.link("alice", "44444444", 10).unwrap(), Some(at(4_000)));
    assert_eq!(s.expire_links(3_500).unwrap(), 1);
    assert_eq!(s.link("alice", "44444444", 10).unwrap(), Some(at(4_000)));
    // Last seen.
    assert_eq!(s.last_seen("alice/2").unwrap(), None);
    s.seen("alice/2", 7).unwrap();
    s.seen("alice/2", 9).unwrap();
    assert_eq!(s.last_seen("alice/2").unwrap(), Some(9));
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_redb {
            $(
                #[test]
                fn $name() {
                    let (_d, s) = super::store();
                    super::$name(&s);
                }
            )*
        }
        mod on_postgres {
            $(
                #[test]
                fn $name() {
                    if let Some(s) = super::super::postgres::testing::store(stringify!($name)) {
                        super::$name(&*s);
                    }
                }
            )*
        }
    };
}

on_both_backends!(
    names_are_unique_per_key,
    key_packages_are_handed_out_once_then_last_resort,
    expired_key_packages_leave_the_pool_when_new_ones_come,
    key_package_pool_is_capped,
    log_is_contiguous_and_atomic,
    inbox_numbers_items_per_user,
    inboxes_are_capped_acknowledged_and_expired_and_keep_their_numbering,
    cursors_only_move_forward_and_compaction_drops_entries,
    epoch_authenticators_are_collected_per_epoch,
    media_records_are_updated_only_while_they_exist,
    device_logs_grow_one_entry_at_a_time_and_revoke_for_good,
    join_requests_wait_per_group_up_to_a_bound,
);

#[test]
fn a_welcome_shared_by_many_joiners_is_stored_once_on_redb() {
    let (_d, s) = store();
    let rows = || {
        let txn = s.read_for_tests();
        let t = txn.open_table(super::redb::WELCOME_SHARED).unwrap();
        t.len().unwrap()
    };
    a_welcome_shared_by_many_joiners_is_stored_once_and_rebuilt_per_joiner(&s, &rows);
}

#[test]
fn a_welcome_shared_by_many_joiners_is_stored_once_on_postgres() {
    let Some(s) = super::postgres::testing::store("a_welcome_shared_by_many_joiners") else {
        return;
    };
    let rows = || s.count_rows_for_tests("welcome_shared");
    a_welcome_shared_by_many_joiners_is_stored_once_and_rebuilt_per_joiner(&*s, &rows);
}
