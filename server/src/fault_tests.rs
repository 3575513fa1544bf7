//! The disk fills up under a running delivery service: writes are refused
//! with a clear error, nothing acknowledged before is lost, reads go on,
//! and once there is room again the group carries on from where its
//! durable state was (the sequencer rolls its MLS view back).
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use huddle_client::{Client, Event, Home};
use huddle_core::proto::{ErrorCode, InboxItem, LogEntry};
use huddle_core::{GroupId, MediaId};

use crate::server::start_with_store;
use crate::store::{
    Claimed, DeviceWrite, GroupWrite, MediaRecord, PendingLink, RegisterOutcome, Store, StoreError,
    StoredGroup, StoredKeyPackage, UserRecord,
};
use crate::ServerConfig;

/// A store whose group writes fail with [`StoreError::Full`] while `full`
/// is set, as the redb backend reports a full disk.
struct FillingDisk {
    inner: Arc<dyn Store>,
    full: Arc<AtomicBool>,
}

impl Store for FillingDisk {
    fn close(&self) {
        self.inner.close()
    }
    fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.inner.user(name)
    }
    fn register_user(
        &self,
        name: &str,
        record: &UserRecord,
    ) -> Result<RegisterOutcome, StoreError> {
        self.inner.register_user(name, record)
    }
    fn registered(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.inner.registered(name)
    }
    fn device_log(&self, user: &str) -> Result<Vec<Bytes>, StoreError> {
        self.inner.device_log(user)
    }
    fn append_device(
        &self,
        user: &str,
        seq: u32,
        entry: &[u8],
        write: DeviceWrite<'_>,
    ) -> Result<bool, StoreError> {
        self.inner.append_device(user, seq, entry, write)
    }
    fn put_link(
        &self,
        user: &str,
        code: &str,
        link: &PendingLink,
        now_ms: u64,
        max: usize,
    ) -> Result<(), StoreError> {
        self.inner.put_link(user, code, link, now_ms, max)
    }
    fn link(&self, user: &str, code: &str, now_ms: u64) -> Result<Option<PendingLink>, StoreError> {
        self.inner.link(user, code, now_ms)
    }
    fn put_join_request(
        &self,
        group: &GroupId,
        req: &crate::store::JoinRequest,
        max: usize,
    ) -> Result<(), StoreError> {
        self.inner.put_join_request(group, req, max)
    }
    fn join_requests(&self, group: &GroupId) -> Result<Vec<crate::store::JoinRequest>, StoreError> {
        self.inner.join_requests(group)
    }
    fn drop_join_requests(&self, group: &GroupId, users: &[String]) -> Result<(), StoreError> {
        self.inner.drop_join_requests(group, users)
    }
    fn expire_links(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.inner.expire_links(now_ms)
    }
    fn seen(&self, principal: &str, ms: u64) -> Result<(), StoreError> {
        self.inner.seen(principal, ms)
    }
    fn last_seen(&self, principal: &str) -> Result<Option<u64>, StoreError> {
        self.inner.last_seen(principal)
    }
    fn add_key_packages(
        &self,
        user: &str,
        packages: &[(Vec<u8>, StoredKeyPackage)],
        last_resort: Option<&StoredKeyPackage>,
        max: u32,
        now: u64,
    ) -> Result<(), StoreError> {
        self.inner
            .add_key_packages(user, packages, last_resort, max, now)
    }
    fn claim_key_packages(
        &self,
        users: &[String],
        now: u64,
    ) -> Result<Vec<Option<Claimed>>, StoreError> {
        self.inner.claim_key_packages(users, now)
    }
    fn key_package_count(&self, user: &str, valid_until: u64) -> Result<(u32, bool), StoreError> {
        self.inner.key_package_count(user, valid_until)
    }
    fn groups(&self) -> Result<Vec<StoredGroup>, StoreError> {
        self.inner.groups()
    }
    fn group(&self, id: &GroupId) -> Result<Option<StoredGroup>, StoreError> {
        self.inner.group(id)
    }
    fn user_groups(&self, user: &str) -> Result<Vec<GroupId>, StoreError> {
        self.inner.user_groups(user)
    }
    fn delete_inbox(&self, user: &str, upto: u64) -> Result<(), StoreError> {
        self.inner.delete_inbox(user, upto)
    }
    fn expire_inbox(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.inner.expire_inbox(before_ms)
    }
    fn apply(&self, writes: &[GroupWrite]) -> Result<Vec<Vec<u64>>, StoreError> {
        if self.full.load(Ordering::SeqCst) {
            return Err(StoreError::Full);
        }
        self.inner.apply(writes)
    }
    fn read_log(
        &self,
        group: &GroupId,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<LogEntry>, StoreError> {
        self.inner.read_log(group, after, until, limit)
    }
    fn read_inbox(
        &self,
        user: &str,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<InboxItem>, u64), StoreError> {
        self.inner.read_inbox(user, after, limit)
    }
    fn tree(&self, group: &GroupId, seq: u64) -> Result<Option<Bytes>, StoreError> {
        self.inner.tree(group, seq)
    }
    fn group_info(&self, group: &GroupId) -> Result<Option<(u64, Bytes)>, StoreError> {
        self.inner.group_info(group)
    }
    fn save_cursors(&self, cursors: &[(GroupId, String, u64)]) -> Result<(), StoreError> {
        self.inner.save_cursors(cursors)
    }
    fn cursors(&self, group: &GroupId) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.cursors(group)
    }
    fn media(&self, id: &MediaId) -> Result<Option<MediaRecord>, StoreError> {
        self.inner.media(id)
    }
    fn put_media(&self, id: &MediaId, record: &MediaRecord) -> Result<(), StoreError> {
        self.inner.put_media(id, record)
    }
    fn delete_media(&self, id: &MediaId) -> Result<Option<u64>, StoreError> {
        self.inner.delete_media(id)
    }
    fn update_media(&self, id: &MediaId, record: &MediaRecord) -> Result<bool, StoreError> {
        self.inner.update_media(id, record)
    }
    fn counts_media(&self) -> bool {
        self.inner.counts_media()
    }
    fn reserve_media(
        &self,
        id: &MediaId,
        record: &MediaRecord,
        quota: u64,
    ) -> Result<bool, StoreError> {
        self.inner.reserve_media(id, record, quota)
    }
    fn lease(&self, name: &str, holder: u64, ttl: std::time::Duration) -> Result<bool, StoreError> {
        self.inner.lease(name, holder, ttl)
    }
    fn release(&self, name: &str, holder: u64) -> Result<(), StoreError> {
        self.inner.release(name, holder)
    }
    fn recount_media(&self) -> Result<(), StoreError> {
        self.inner.recount_media()
    }
    fn all_media(&self) -> Result<Vec<(MediaId, MediaRecord)>, StoreError> {
        self.inner.all_media()
    }
    fn publish_epoch_authenticator(
        &self,
        group: &GroupId,
        epoch: u64,
        user: &str,
        hash: [u8; 32],
    ) -> Result<Vec<(String, [u8; 32])>, StoreError> {
        self.inner
            .publish_epoch_authenticator(group, epoch, user, hash)
    }
}

/// A DS over `dir` with its store passed through `wrap`, and Alice and
/// Bob registered, both in Alice's group "g".
async fn alice_and_bob(
    dir: &std::path::Path,
    wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
) -> (crate::server::Running, Client, Client) {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("ds"),
        ..ServerConfig::default()
    };
    let running = start_with_store(config, wrap).await.unwrap();
    let addr = running.addr.to_string();
    let cert = dir.join("ds").join("cert.pem");
    let home = |n: &str| Home::new(dir.join(n));
    let mut alice = Client::register(home("a"), "alice", &addr, Some(&cert))
        .await
        .unwrap();
    let bob = Client::register(home("b"), "bob", &addr, Some(&cert))
        .await
        .unwrap();
    alice.create_group("g").await.unwrap();
    alice.add("g", &["bob".into()]).await.unwrap();
    (running, alice, bob)
}

fn texts(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.kind == "text")
        .map(|e| format!("{}: {}", e.from, e.text().unwrap_or("")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_clearly_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let full = Arc::new(AtomicBool::new(false));
    let filling = full.clone();
    let (running, mut alice, mut bob) = alice_and_bob(dir.path(), move |inner| {
        Arc::new(FillingDisk {
            inner,
            full: filling,
        })
    })
    .await;
    alice.send_text("g", "one").await.unwrap();

    full.store(true, Ordering::SeqCst);
    let e = alice.send_text("g", "two").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::QuotaExceeded), "{e}");
    assert!(e.to_string().contains("storage is full"), "{e}");
    // A refused commit: the sequencer must not keep its epoch.
    let e = alice.update("g").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::QuotaExceeded), "{e}");
    // Reading goes on: Bob joins and reads what was acknowledged.
    assert_eq!(texts(&bob.sync().await.unwrap()), vec!["alice: one"]);

    full.store(false, Ordering::SeqCst);
    alice.send_text("g", "three").await.unwrap();
    alice.update("g").await.unwrap();
    alice.send_text("g", "four").await.unwrap();
    assert_eq!(
        texts(&bob.sync().await.unwrap()),
        vec!["alice: three", "alice: four"]
    );
    bob.send_text("g", "five").await.unwrap();
    assert_eq!(texts(&alice.sync().await.unwrap()), vec!["bob: five"]);
    drop(running);
}

/// Notes where a transfer started.
struct StartedAt(Option<u64>);

impl huddle_client::Progress for StartedAt {
    fn start(&mut self, _: &str, _: u64, done: u64) {
        self.0 = Some(done);
    }
    fn advance(&mut self, _: u64) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filling_up_during_an_upload_refuses_it_clearly_and_keeps_what_was_stored() {
    use huddle_client::Quiet;
    let dir = tempfile::tempdir().unwrap();
    let (running, mut alice, mut bob) = alice_and_bob(dir.path(), |inner| inner).await;
    let file = |name: &str, len: usize, seed: u8| {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        let path = dir.path().join(name);
        std::fs::write(&path, &data).unwrap();
        (path, data)
    };
    let (small, small_data) = file("small.bin", 300_000, 1);
    let stored = alice.send_file("g", &small, "", &mut Quiet).await.unwrap();

    // 2 MiB of room left; the next item is 40 MiB, more than twice what
    // the DS takes in before it stops reading (the stream's 8 MiB window,
    // its writer's queue of 4 MiB and two blob buffers of 2 MiB), so the
    // client is still sending then.
    *running.blob_room.0.lock().unwrap() = Some(2 << 20);
    let (big, big_data) = file("big.bin", 40 << 20, 2);
    let e = alice
        .send_file("g", &big, "", &mut Quiet)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::QuotaExceeded), "{e}");
    assert!(e.to_string().contains("disk is full"), "{e}");

    // The item stored before is whole, and the group goes on.
    bob.sync().await.unwrap();
    let out = dir.path().join("small.out");
    bob.download(stored.media_id().unwrap(), Some(&out), &mut Quiet)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == small_data);
    alice.send_text("g", "still here").await.unwrap();
    assert_eq!(texts(&bob.sync().await.unwrap()), vec!["alice: still here"]);

    // Room again: the same upload goes on from what fit (a chunk boundary
    // within the 2 MiB the disk took, which the DS flushed).
    *running.blob_room.0.lock().unwrap() = None;
    let mut resumed = StartedAt(None);
    let sent = alice.send_file("g", &big, "", &mut resumed).await.unwrap();
    assert!(
        resumed.0.is_some_and(|at| at > 0 && at <= 2 << 20),
        "{:?}",
        resumed.0
    );
    bob.sync().await.unwrap();
    let out = dir.path().join("big.out");
    bob.download(sent.media_id().unwrap(), Some(&out), &mut Quiet)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == big_data);
    drop(running);
}
