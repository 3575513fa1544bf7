//! The embedded default [`Store`]: one redb file in the data directory.
//!
//! redb is an ACID, copy-on-write B-tree store in pure Rust; commits use
//! `Durability::Immediate` (fsync before `commit` returns), which is what
//! lets the DS acknowledge a write as soon as `commit` returns. Values are
//! postcard-encoded.

use std::path::Path;

use ::redb::{Database, ReadableTable, TableDefinition};
use bytes::Bytes;
use huddle_core::proto::{InboxItem, LogEntry, MAX_PAGE_BYTES};
use huddle_core::{GroupId, MediaId};
use serde::{de::DeserializeOwned, Serialize};

use super::*;

mod devices;
mod inbox;
mod log;
mod write;

use inbox::{inbox_head, InboxTables, StoredInboxItem};
use write::stored_group;

const USERS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("users");

const KP_POOL: TableDefinition<'_, (&str, &[u8]), &[u8]> = TableDefinition::new("kp_pool");

const KP_LAST: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kp_last_resort");

const GROUPS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("groups");

const GROUP_STATE: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("group_state");

const MEMBERS: TableDefinition<'_, (&[u8], &str), &[u8]> = TableDefinition::new("members");

const USER_GROUPS: TableDefinition<'_, (&str, &[u8]), ()> = TableDefinition::new("user_groups");

/// Inbox items as stored before Welcomes were split (whole Welcomes); read
/// and deleted, never written.
const INBOX: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("inbox");

/// Inbox items: the recipient's own part of the Welcome.
const INBOX_ITEMS: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("inbox_items");

/// The newest inbox sequence number of each user (items are deleted, the
/// numbering goes on).
const INBOX_HEAD: TableDefinition<'_, &str, u64> = TableDefinition::new("inbox_head");

/// The shared part of each commit's Welcome, (group, commit seq) →
/// references (u32, big-endian) followed by the bytes.
pub(crate) const WELCOME_SHARED: TableDefinition<'_, (&[u8], u64), &[u8]> =
    TableDefinition::new("welcome_shared");

const TREES: TableDefinition<'_, (&[u8], u64), &[u8]> = TableDefinition::new("trees");

const CURSORS: TableDefinition<'_, (&[u8], &str), u64> = TableDefinition::new("cursors");

const EPOCH_AUTH: TableDefinition<'_, (&[u8], u64, &str), &[u8]> =
    TableDefinition::new("epoch_auth");

const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

const MEDIA: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("media");

/// group id -> epoch (8 bytes, big endian) followed by the GroupInfo.
const GROUP_INFO: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("group_info");

/// On-disk layout version; bumped on incompatible changes.
/// 2: a group's row keeps its head only as of its last change other than
/// an append; the log's newest entry is the head. Version 1 data (the row
/// always current) reads the same and is marked 2 on open; a build that
/// reads only 1 refuses version 2 instead of trusting a stale head.
/// 3: large log entries live in [`log::LOG_LARGE`] (an empty value in
/// [`log::LOG`]). Version 1 and 2 data (every entry in `log`) reads the same and is
/// marked 3 on open; a build that reads only 2 refuses version 3.
const SCHEMA_VERSION: u64 = 3;

/// The redb-backed store.
#[derive(Debug)]
pub struct RedbStore {
    /// `None` once closed.
    db: std::sync::RwLock<Option<Database>>,
}

fn closed() -> StoreError {
    StoreError::Io("the store is closed".into())
}

fn err<E: Into<::redb::Error>>(e: E) -> StoreError {
    let e: ::redb::Error = e.into();
    if let ::redb::Error::Io(io) = &e {
        if io.raw_os_error() == Some(28) || io.kind() == std::io::ErrorKind::StorageFull {
            return StoreError::Full;
        }
    }
    StoreError::Io(e.to_string())
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("serialising to a Vec cannot fail")
}

fn dec<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A member record in either stored form.
pub(crate) fn dec_member(bytes: &[u8]) -> Result<MemberRecord, StoreError> {
    // The current form has one more field at the end: the older one ends
    // early and fails to decode as the current one.
    match postcard::from_bytes::<MemberRecord>(bytes) {
        Ok(m) => Ok(m),
        Err(_) => dec::<MemberRecordV1>(bytes, "member").map(MemberRecord::from),
    }
}

/// How long opening waits for another process to release the store: longer
/// than a stopping DS takes (its grace for requests in flight, 10 s, and
/// its final flushes).
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Page cache of a store opened with [`RedbStore::open`].
pub const DEFAULT_CACHE: usize = 256 << 20;

impl RedbStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE)
    }

    /// Opens the store at `path` with a page cache of at most
    /// `cache_bytes` (redb's own default is 1 GiB).
    ///
    /// A DS restarted right after the previous one stopped may find the
    /// file still locked by the old process while it exits: it waits up to
    /// [`LOCK_WAIT`] for it.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match ::redb::Builder::new()
                .set_cache_size(cache_bytes)
                .create(path)
            {
                Err(::redb::DatabaseError::DatabaseAlreadyOpen)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                r => break r.map_err(err)?,
            }
        };
        let txn = db.begin_write().map_err(err)?;
        {
            // Create every table so that readers never meet a missing one.
            txn.open_table(USERS).map_err(err)?;
            txn.open_table(KP_POOL).map_err(err)?;
            txn.open_table(KP_LAST).map_err(err)?;
            txn.open_table(GROUPS).map_err(err)?;
            txn.open_table(GROUP_STATE).map_err(err)?;
            txn.open_table(log::LOG).map_err(err)?;
            txn.open_table(log::LOG_LARGE).map_err(err)?;
            txn.open_table(MEMBERS).map_err(err)?;
            txn.open_table(USER_GROUPS).map_err(err)?;
            txn.open_table(INBOX).map_err(err)?;
            txn.open_table(INBOX_ITEMS).map_err(err)?;
            txn.open_table(INBOX_HEAD).map_err(err)?;
            txn.open_table(WELCOME_SHARED).map_err(err)?;
            txn.open_table(TREES).map_err(err)?;
            txn.open_table(CURSORS).map_err(err)?;
            txn.open_table(EPOCH_AUTH).map_err(err)?;
            txn.open_table(MEDIA).map_err(err)?;
            txn.open_table(GROUP_INFO).map_err(err)?;
            txn.open_table(devices::DEVICE_LOG).map_err(err)?;
            txn.open_table(devices::REVOKED).map_err(err)?;
            txn.open_table(devices::LINKS).map_err(err)?;
            txn.open_table(devices::SEEN).map_err(err)?;
            txn.open_table(devices::JOIN_REQUESTS).map_err(err)?;
            let mut meta = txn.open_table(META).map_err(err)?;
            let version = meta.get("schema_version").map_err(err)?.map(|v| v.value());
            match version {
                None | Some(1) | Some(2) => {
                    meta.insert("schema_version", SCHEMA_VERSION).map_err(err)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(StoreError::Corrupt(format!(
                        "data dir has schema version {other}, this build reads {SCHEMA_VERSION}"
                    )))
                }
            }
        }
        txn.commit().map_err(err)?;
        Ok(Self {
            db: std::sync::RwLock::new(Some(db)),
        })
    }

    /// A read transaction, for tests that look at tables directly.
    #[cfg(test)]
    pub(crate) fn read_for_tests(&self) -> ::redb::ReadTransaction {
        self.read().expect("a read transaction")
    }
}

impl Store for RedbStore {
    fn close(&self) {
        self.db.write().expect("db lock").take();
    }

    fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        if self.is_revoked(name)? {
            return Ok(None);
        }
        self.registered_record(name)
    }

    fn registered(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.registered_record(name)
    }

    fn device_log(&self, user: &str) -> Result<Vec<Bytes>, StoreError> {
        self.read_device_log(user)
    }

    fn append_device(
        &self,
        user: &str,
        seq: u32,
        entry: &[u8],
        write: DeviceWrite<'_>,
    ) -> Result<bool, StoreError> {
        self.append_device_entry(user, seq, entry, write)
    }

    fn put_link(
        &self,
        user: &str,
        code: &str,
        link: &PendingLink,
        now_ms: u64,
        max: usize,
    ) -> Result<(), StoreError> {
        self.put_pending_link(user, code, link, now_ms, max)
    }

    fn link(&self, user: &str, code: &str, now_ms: u64) -> Result<Option<PendingLink>, StoreError> {
        self.pending_link(user, code, now_ms)
    }

    fn expire_links(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.expire_pending_links(now_ms)
    }

    fn put_join_request(
        &self,
        group: &GroupId,
        req: &crate::store::JoinRequest,
        max: usize,
    ) -> Result<(), StoreError> {
        self.put_join(group, req, max)
    }

    fn join_requests(&self, group: &GroupId) -> Result<Vec<crate::store::JoinRequest>, StoreError> {
        self.joins(group)
    }

    fn drop_join_requests(&self, group: &GroupId, users: &[String]) -> Result<(), StoreError> {
        self.drop_joins(group, users)
    }

    fn seen(&self, principal: &str, ms: u64) -> Result<(), StoreError> {
        self.set_seen(principal, ms)
    }

    fn last_seen(&self, principal: &str) -> Result<Option<u64>, StoreError> {
        self.get_seen(principal)
    }

    fn register_user(
        &self,
        name: &str,
        record: &UserRecord,
    ) -> Result<RegisterOutcome, StoreError> {
        let txn = self.write()?;
        let outcome = {
            let mut t = txn.open_table(USERS).map_err(err)?;
            let existing: Option<UserRecord> = match t.get(name).map_err(err)? {
                Some(v) => Some(dec(v.value(), "user")?),
                None => None,
            };
            let revoked = txn
                .open_table(devices::REVOKED)
                .map_err(err)?
                .get(name)
                .map_err(err)?
                .is_some();
            match existing {
                Some(_) if revoked => RegisterOutcome::Taken,
                Some(u) if u.identity_key == record.identity_key => RegisterOutcome::Existing,
                Some(_) => RegisterOutcome::Taken,
                None => {
                    t.insert(name, enc(record).as_slice()).map_err(err)?;
                    RegisterOutcome::Created
                }
            }
        };
        if outcome == RegisterOutcome::Created {
            txn.commit().map_err(err)?;
        } else {
            txn.abort().map_err(err)?;
        }
        Ok(outcome)
    }

    fn add_key_packages(
        &self,
        user: &str,
        packages: &[(Vec<u8>, StoredKeyPackage)],
        last_resort: Option<&StoredKeyPackage>,
        max: u32,
        now: u64,
    ) -> Result<(), StoreError> {
        let txn = self.write()?;
        {
            let mut pool = txn.open_table(KP_POOL).map_err(err)?;
            let mut expired = Vec::new();
            for row in pool.range((user, [].as_slice())..).map_err(err)? {
                let (k, v) = row.map_err(err)?;
                if k.value().0 != user {
                    break;
                }
                let kp: StoredKeyPackage = dec(v.value(), "key package")?;
                if kp.not_after < now {
                    expired.push(k.value().1.to_vec());
                }
            }
            for hash in expired {
                pool.remove((user, hash.as_slice())).map_err(err)?;
            }
            for (hash, kp) in packages {
                pool.insert((user, hash.as_slice()), enc(kp).as_slice())
                    .map_err(err)?;
            }
            if count_pool(&pool, user, 0)? > max {
                return Err(StoreError::Conflict(format!(
                    "at most {max} key packages may be stored per user"
                )));
            }
            if let Some(lr) = last_resort {
                let mut t = txn.open_table(KP_LAST).map_err(err)?;
                t.insert(user, enc(lr).as_slice()).map_err(err)?;
            }
        }
        txn.commit().map_err(err)?;
        Ok(())
    }

    fn claim_key_packages(
        &self,
        users: &[String],
        now: u64,
    ) -> Result<Vec<Option<Claimed>>, StoreError> {
        let txn = self.write()?;
        let mut out = Vec::with_capacity(users.len());
        {
            let mut pool = txn.open_table(KP_POOL).map_err(err)?;
            let last = txn.open_table(KP_LAST).map_err(err)?;
            for user in users {
                let user = user.as_str();
                let mut found = None;
                loop {
                    // The first package of the user, if any: keys sort by
                    // (user, hash), so the range starts at the user's first.
                    let first = pool
                        .range((user, [].as_slice())..)
                        .map_err(err)?
                        .next()
                        .transpose()
                        .map_err(err)?
                        .filter(|(k, _)| k.value().0 == user)
                        .map(|(k, v)| (k.value().1.to_vec(), v.value().to_vec()));
                    let Some((hash, value)) = first else { break };
                    pool.remove((user, hash.as_slice())).map_err(err)?;
                    let kp: StoredKeyPackage = dec(&value, "key package")?;
                    if kp.not_after >= now {
                        found = Some(Claimed {
                            bytes: Bytes::from(kp.bytes),
                            last_resort: false,
                        });
                        break;
                    }
                }
                if found.is_none() {
                    if let Some(v) = last.get(user).map_err(err)? {
                        let kp: StoredKeyPackage = dec(v.value(), "key package")?;
                        if kp.not_after >= now {
                            found = Some(Claimed {
                                bytes: Bytes::from(kp.bytes),
                                last_resort: true,
                            });
                        }
                    }
                }
                out.push(found);
            }
        }
        if out.iter().any(Option::is_none) {
            txn.abort().map_err(err)?;
        } else {
            txn.commit().map_err(err)?;
        }
        Ok(out)
    }

    fn key_package_count(&self, user: &str, valid_until: u64) -> Result<(u32, bool), StoreError> {
        let txn = self.read()?;
        let pool = txn.open_table(KP_POOL).map_err(err)?;
        let last = txn.open_table(KP_LAST).map_err(err)?;
        let last_resort = match last.get(user).map_err(err)? {
            Some(v) => dec::<StoredKeyPackage>(v.value(), "key package")?.not_after >= valid_until,
            None => false,
        };
        Ok((count_pool(&pool, user, valid_until)?, last_resort))
    }

    fn groups(&self) -> Result<Vec<StoredGroup>, StoreError> {
        let txn = self.read()?;
        let groups = txn.open_table(GROUPS).map_err(err)?;
        let mut out = Vec::new();
        for row in groups.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let id = GroupId::from_slice(k.value())
                .ok_or_else(|| StoreError::Corrupt("group id length".into()))?;
            out.push(stored_group(&txn, id, v.value())?);
        }
        Ok(out)
    }

    fn group(&self, id: &GroupId) -> Result<Option<StoredGroup>, StoreError> {
        let txn = self.read()?;
        let groups = txn.open_table(GROUPS).map_err(err)?;
        let Some(v) = groups.get(id.as_bytes().as_slice()).map_err(err)? else {
            return Ok(None);
        };
        stored_group(&txn, *id, v.value()).map(Some)
    }

    fn user_groups(&self, user: &str) -> Result<Vec<GroupId>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(USER_GROUPS).map_err(err)?;
        let mut out = Vec::new();
        for row in t.range((user, [].as_slice())..).map_err(err)? {
            let (k, _) = row.map_err(err)?;
            let (u, g) = k.value();
            if u != user {
                break;
            }
            out.extend(GroupId::from_slice(g));
        }
        Ok(out)
    }

    fn apply(&self, writes: &[GroupWrite]) -> Result<Vec<Vec<u64>>, StoreError> {
        let txn = self.write()?;
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            out.push(Self::apply_one(&txn, w)?);
        }
        txn.commit().map_err(err)?;
        Ok(out)
    }

    fn read_log(
        &self,
        group: &GroupId,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<LogEntry>, StoreError> {
        if after >= until {
            return Ok(Vec::new());
        }
        log::read(&self.read()?, group, after, until, limit)
    }

    fn delete_inbox(&self, user: &str, upto: u64) -> Result<(), StoreError> {
        // Most calls find nothing to delete: look before taking a write
        // transaction (and a disk flush).
        {
            let txn = self.read()?;
            let first = |t: ::redb::ReadOnlyTable<(&'static str, u64), &'static [u8]>| {
                t.range((user, 0)..=(user, upto))
                    .map_err(err)
                    .map(|mut r| r.next().is_some())
            };
            if !first(txn.open_table(INBOX).map_err(err)?)?
                && !first(txn.open_table(INBOX_ITEMS).map_err(err)?)?
            {
                return Ok(());
            }
        }
        let txn = self.write()?;
        {
            let mut t = InboxTables::open(&txn)?;
            while let Some(first) = t.first(user)? {
                if first > upto {
                    break;
                }
                t.drop_item(user, first)?;
            }
        }
        txn.commit().map_err(err)?;
        Ok(())
    }

    fn expire_inbox(&self, before_ms: u64) -> Result<usize, StoreError> {
        let txn = self.write()?;
        let mut n = 0;
        {
            let mut t = InboxTables::open(&txn)?;
            let mut old: Vec<(String, u64)> = Vec::new();
            for row in t.legacy.iter().map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let item: InboxItem = dec(v.value(), "inbox item")?;
                if item.timestamp_ms < before_ms {
                    old.push((k.value().0.to_owned(), k.value().1));
                }
            }
            for row in t.items.iter().map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let item: StoredInboxItem = dec(v.value(), "inbox item")?;
                if item.timestamp_ms < before_ms {
                    old.push((k.value().0.to_owned(), k.value().1));
                }
            }
            for (user, seq) in old {
                t.drop_item(&user, seq)?;
                n += 1;
            }
        }
        txn.commit().map_err(err)?;
        Ok(n)
    }

    fn read_inbox(
        &self,
        user: &str,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<InboxItem>, u64), StoreError> {
        let txn = self.read()?;
        let legacy = txn.open_table(INBOX).map_err(err)?;
        let items = txn.open_table(INBOX_ITEMS).map_err(err)?;
        let heads = txn.open_table(INBOX_HEAD).map_err(err)?;
        let shared = txn.open_table(WELCOME_SHARED).map_err(err)?;
        let head = inbox_head(&heads, &legacy, user)?;
        let mut out = Vec::new();
        if after >= u64::MAX - 1 {
            return Ok((out, head));
        }
        let mut bytes = 0;
        let full = |out: &Vec<InboxItem>, bytes: usize| {
            out.len() >= limit as usize || bytes >= MAX_PAGE_BYTES
        };
        // Items written before Welcomes were split come first (their
        // numbers are lower).
        for row in legacy
            .range((user, after + 1)..=(user, u64::MAX))
            .map_err(err)?
        {
            if full(&out, bytes) {
                return Ok((out, head));
            }
            let (_, v) = row.map_err(err)?;
            let item: InboxItem = dec(v.value(), "inbox item")?;
            bytes += item.welcome.len();
            out.push(item);
        }
        for row in items
            .range((user, after + 1)..=(user, u64::MAX))
            .map_err(err)?
        {
            if full(&out, bytes) {
                break;
            }
            let (k, v) = row.map_err(err)?;
            let item: StoredInboxItem = dec(v.value(), "inbox item")?;
            let part = shared
                .get((item.group.as_bytes().as_slice(), item.commit_seq))
                .map_err(err)?
                .ok_or_else(|| StoreError::Corrupt("an inbox item lost its Welcome".into()))?;
            let welcome = huddle_core::welcome::join(&part.value()[4..], &item.own);
            bytes += welcome.len();
            out.push(InboxItem {
                seq: k.value().1,
                group: item.group,
                commit_seq: item.commit_seq,
                timestamp_ms: item.timestamp_ms,
                welcome,
            });
        }
        Ok((out, head))
    }

    fn tree(&self, group: &GroupId, seq: u64) -> Result<Option<Bytes>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(TREES).map_err(err)?;
        Ok(t.get((group.as_bytes().as_slice(), seq))
            .map_err(err)?
            .map(|v| Bytes::copy_from_slice(v.value())))
    }

    fn group_info(&self, group: &GroupId) -> Result<Option<(u64, Bytes)>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(GROUP_INFO).map_err(err)?;
        let Some(v) = t.get(group.as_bytes().as_slice()).map_err(err)? else {
            return Ok(None);
        };
        let v = v.value();
        let (epoch, info) = v
            .split_first_chunk::<8>()
            .ok_or_else(|| StoreError::Corrupt("group info record is truncated".into()))?;
        Ok(Some((
            u64::from_be_bytes(*epoch),
            Bytes::copy_from_slice(info),
        )))
    }

    fn save_cursors(&self, cursors: &[(GroupId, String, u64)]) -> Result<(), StoreError> {
        if cursors.is_empty() {
            return Ok(());
        }
        let txn = self.write()?;
        {
            let mut t = txn.open_table(CURSORS).map_err(err)?;
            for (g, user, seq) in cursors {
                let key = (g.as_bytes().as_slice(), user.as_str());
                let old = t.get(key).map_err(err)?.map(|v| v.value()).unwrap_or(0);
                if *seq > old {
                    t.insert(key, *seq).map_err(err)?;
                }
            }
        }
        txn.commit().map_err(err)
    }

    fn cursors(&self, group: &GroupId) -> Result<Vec<(String, u64)>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(CURSORS).map_err(err)?;
        let gid = group.as_bytes().as_slice();
        let mut out = Vec::new();
        for row in t.range((gid, "")..).map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let (g, user) = k.value();
            if g != gid {
                break;
            }
            out.push((user.to_owned(), v.value()));
        }
        Ok(out)
    }

    fn media(&self, id: &MediaId) -> Result<Option<MediaRecord>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(MEDIA).map_err(err)?;
        match t.get(id.as_bytes().as_slice()).map_err(err)? {
            Some(v) => Ok(Some(crate::store::dec_media(v.value())?)),
            None => Ok(None),
        }
    }

    fn put_media(&self, id: &MediaId, record: &MediaRecord) -> Result<(), StoreError> {
        let txn = self.write()?;
        {
            let mut t = txn.open_table(MEDIA).map_err(err)?;
            t.insert(id.as_bytes().as_slice(), enc(record).as_slice())
                .map_err(err)?;
        }
        txn.commit().map_err(err)
    }

    fn update_media(&self, id: &MediaId, record: &MediaRecord) -> Result<bool, StoreError> {
        let txn = self.write()?;
        let found = {
            let mut t = txn.open_table(MEDIA).map_err(err)?;
            let key = id.as_bytes().as_slice();
            let found = t.get(key).map_err(err)?.is_some();
            if found {
                t.insert(key, enc(record).as_slice()).map_err(err)?;
            }
            found
        };
        txn.commit().map_err(err)?;
        Ok(found)
    }

    fn delete_media(&self, id: &MediaId) -> Result<Option<u64>, StoreError> {
        let txn = self.write()?;
        let gone = {
            let mut t = txn.open_table(MEDIA).map_err(err)?;
            let old = t.remove(id.as_bytes().as_slice()).map_err(err)?;
            old.map(|v| crate::store::dec_media(v.value()).map(|r| r.total_len))
                .transpose()?
        };
        txn.commit().map_err(err)?;
        Ok(gone)
    }

    fn all_media(&self) -> Result<Vec<(MediaId, MediaRecord)>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(MEDIA).map_err(err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let id = MediaId::from_slice(k.value())
                .ok_or_else(|| StoreError::Corrupt("media id length".into()))?;
            out.push((id, crate::store::dec_media(v.value())?));
        }
        Ok(out)
    }

    fn publish_epoch_authenticator(
        &self,
        group: &GroupId,
        epoch: u64,
        user: &str,
        hash: [u8; 32],
    ) -> Result<Vec<(String, [u8; 32])>, StoreError> {
        let txn = self.write()?;
        let gid = group.as_bytes().as_slice();
        let out = {
            let mut t = txn.open_table(EPOCH_AUTH).map_err(err)?;
            t.insert((gid, epoch, user), hash.as_slice()).map_err(err)?;
            let mut out = Vec::new();
            for row in t.range((gid, epoch, "")..).map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let (g, e, u) = k.value();
                if g != gid || e != epoch {
                    break;
                }
                let h: [u8; 32] = v
                    .value()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("epoch authenticator length".into()))?;
                out.push((u.to_owned(), h));
            }
            out
        };
        txn.commit().map_err(err)?;
        Ok(out)
    }
}

/// `user`'s one-time packages valid at `valid_until` (seconds; 0 counts
/// them all).
fn count_pool<T: ReadableTable<(&'static str, &'static [u8]), &'static [u8]>>(
    pool: &T,
    user: &str,
    valid_until: u64,
) -> Result<u32, StoreError> {
    let mut n = 0u32;
    for row in pool.range((user, [].as_slice())..).map_err(err)? {
        let (k, v) = row.map_err(err)?;
        if k.value().0 != user {
            break;
        }
        if valid_until == 0
            || dec::<StoredKeyPackage>(v.value(), "key package")?.not_after >= valid_until
        {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
