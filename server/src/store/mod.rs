//! Durable state of the delivery service, behind one narrow trait.
//!
//! [`Store`] is everything the DS keeps across restarts: users, key
//! packages, groups (public MLS state, members, log), Welcome inboxes,
//! ratchet-tree snapshots and cursors. Every method that changes state is
//! atomic and durable when it returns `Ok`: the DS acknowledges nothing
//! before that. [`redb::RedbStore`] is the embedded default; [`postgres::PgStore`]
//! keeps the same state in PostgreSQL.
//!
//! Group writes are batched: [`Store::apply`] takes the writes of many
//! groups and commits them in one transaction, so one disk flush
//! acknowledges many messages (see [`crate::writer`]).

pub mod postgres;
pub mod redb;
#[cfg(test)]
mod tests;

use bytes::Bytes;
use huddle_core::proto::{ErrorBody, ErrorCode, InboxItem, LogEntry};
use huddle_core::{GroupId, MediaId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Storage failures.
#[derive(Debug, Error, Clone)]
pub enum StoreError {
    /// The disk is full; nothing of the failed write was stored.
    #[error("storage is full")]
    Full,
    /// A write conflicted with existing data (for example a group id that
    /// is already taken).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The storage backend cannot be reached (a database that is down or
    /// restarting); nothing was stored, and trying again later may work.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Any other storage failure.
    #[error("storage failure: {0}")]
    Io(String),
}

impl From<StoreError> for ErrorBody {
    /// What a client is told of a storage failure: a full disk as such (the
    /// client may retry later), anything else as an internal error, logged
    /// here with its detail.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Full => ErrorBody::new(
                ErrorCode::QuotaExceeded,
                "the server's storage is full; nothing was stored",
            ),
            StoreError::Unavailable(detail) => {
                tracing::warn!(%detail, "storage unavailable");
                ErrorBody::new(
                    ErrorCode::Unavailable,
                    "the server's database is unavailable; nothing was stored; try again later",
                )
            }
            other => {
                tracing::warn!(error = %other, "storage failure");
                ErrorBody::new(ErrorCode::Internal, "storage failure; nothing was stored")
            }
        }
    }
}

/// Runs `f` on `store` in a blocking task (the store's calls wait on
/// disk), so no async worker waits for it.
pub async fn blocking<R: Send + 'static>(
    store: &std::sync::Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> R + Send + 'static,
) -> Result<R, ErrorBody> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&*store))
        .await
        .map_err(|_| ErrorBody::new(ErrorCode::Internal, "internal error"))
}

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Ed25519 identity key (also the user's MLS signature key).
    pub identity_key: [u8; 32],
    /// Registration time, ms since the Unix epoch.
    pub registered_ms: u64,
}

/// Result of [`Store::register_user`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// The name was free and is now bound to the key.
    Created,
    /// The name was already bound to the same key (a repeated registration).
    Existing,
    /// The name is bound to another key.
    Taken,
}

/// A stored one-time key package.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredKeyPackage {
    /// End of validity, seconds since the Unix epoch.
    pub not_after: u64,
    /// TLS-serialised key package.
    pub bytes: Vec<u8>,
}

/// A key package handed out by [`Store::claim_key_packages`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// TLS-serialised key package.
    pub bytes: Bytes,
    /// True when it is the user's last-resort package.
    pub last_resort: bool,
}

/// A group member's rights to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Log position of the commit that added the member (0 for the
    /// creator). The member may read entries after it.
    pub joined_seq: u64,
    /// Log position of the commit that removed the member, if any. The
    /// member may read entries up to and including it, and nothing after.
    pub removed_seq: Option<u64>,
    /// When that commit was appended (ms since the Unix epoch): a departed
    /// member holds back compaction of what it may still read for
    /// [`crate::ServerConfig::departed_retention`] from then. `None` for
    /// current members, and for removals recorded before this was kept
    /// (those hold it back until read).
    pub removed_ms: Option<u64>,
}

/// [`MemberRecord`] as stored before `removed_ms` existed.
#[derive(Debug, Clone, Copy, Deserialize)]
pub(crate) struct MemberRecordV1 {
    joined_seq: u64,
    removed_seq: Option<u64>,
}

impl From<MemberRecordV1> for MemberRecord {
    fn from(m: MemberRecordV1) -> Self {
        Self {
            joined_seq: m.joined_seq,
            removed_seq: m.removed_seq,
            removed_ms: None,
        }
    }
}

impl MemberRecord {
    /// Whether the member is still in the group.
    pub fn is_current(&self) -> bool {
        self.removed_seq.is_none()
    }

    /// Highest sequence number this member may read, given the log head.
    pub fn readable_until(&self, head: u64) -> u64 {
        self.removed_seq.map_or(head, |r| r.min(head))
    }

    /// Whether compaction must keep what this member, acknowledged up to
    /// `cursor`, may still read: a current member always, a departed one
    /// until it read up to its removal or `retention_ms` passed since.
    pub fn holds_log(&self, cursor: u64, now_ms: u64, retention_ms: u64) -> bool {
        match (self.removed_seq, self.removed_ms) {
            (None, _) => true,
            (Some(r), at) => {
                cursor.max(self.joined_seq) < r
                    && at.is_none_or(|t| now_ms.saturating_sub(t) < retention_ms)
            }
        }
    }
}

/// Per-group facts kept beside the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Current MLS epoch.
    pub epoch: u64,
    /// Newest sequence number in the log. As stored with the group's row
    /// it may lag (a backend need not rewrite the row for a write that only
    /// appends); [`Store::groups`] returns the true head.
    pub head: u64,
    /// Entries up to this sequence number have been compacted away.
    pub compacted: u64,
}

/// A group as loaded at start-up.
#[derive(Debug, Clone)]
pub struct StoredGroup {
    /// Id.
    pub id: GroupId,
    /// Facts.
    pub meta: GroupMeta,
    /// Serialised public MLS state (opaque to the store).
    pub state: Vec<u8>,
    /// Every member record, including removed members.
    pub members: Vec<(String, MemberRecord)>,
}

/// Where a media item stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MediaState {
    /// Bytes up to `offset` (a chunk boundary) are durable in the partial
    /// file; the uploader resumes from there.
    Uploading {
        /// Durable bytes.
        offset: u64,
    },
    /// Complete, hash-checked and fetchable.
    Complete,
}

/// A media item (an encrypted blob) known to the DS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRecord {
    /// The group whose current members may fetch it.
    pub group: GroupId,
    /// Who uploads it (only they may resume the upload).
    pub uploader: String,
    /// Ciphertext length.
    pub total_len: u64,
    /// BLAKE3 of the whole ciphertext, checked at completion (zero before).
    pub hash: [u8; 32],
    /// Upload progress.
    pub state: MediaState,
    /// When the upload began, ms since the Unix epoch.
    pub created_ms: u64,
    /// Last progress or completion, ms since the Unix epoch.
    pub updated_ms: u64,
    /// On an object store: the multipart upload that holds the bytes so
    /// far (`None` before it began, and once complete).
    pub multipart: Option<Multipart>,
}

/// A multipart upload on the object store, as far as it got: the parts
/// stored, in order, each [`crate::media::objects::PART`] bytes but the
/// last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Multipart {
    /// The object store's id of the upload.
    pub upload: String,
    /// Each stored part's ETag (what completing the upload names it by)
    /// and the BLAKE3 chaining value of its bytes as a subtree of the
    /// whole blob, from which the blob's hash is computed.
    pub parts: Vec<(String, [u8; 32])>,
}

/// [`MediaRecord`] as stored before `multipart` existed.
#[derive(Debug, Clone, Deserialize)]
struct MediaRecordV1 {
    group: GroupId,
    uploader: String,
    total_len: u64,
    hash: [u8; 32],
    state: MediaState,
    created_ms: u64,
    updated_ms: u64,
}

/// Decodes a media record in either stored form.
pub(crate) fn dec_media(bytes: &[u8]) -> Result<MediaRecord, StoreError> {
    // The current form has one more field at the end: the older one ends
    // early and fails to decode as the current one.
    if let Ok(r) = postcard::from_bytes::<MediaRecord>(bytes) {
        return Ok(r);
    }
    let r = postcard::from_bytes::<MediaRecordV1>(bytes)
        .map_err(|e| StoreError::Corrupt(format!("media record: {e}")))?;
    Ok(MediaRecord {
        group: r.group,
        uploader: r.uploader,
        total_len: r.total_len,
        hash: r.hash,
        state: r.state,
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
        multipart: None,
    })
}

/// A Welcome to put in a user's inbox; the store assigns its sequence number.
///
/// A Welcome is one part per joiner (its encrypted group secrets) and one
/// part for all of them (the encrypted GroupInfo, up to a frame): the
/// shared part is stored once per commit, however many joiners it has.
#[derive(Debug, Clone)]
pub struct NewInboxItem {
    /// Recipient.
    pub user: String,
    /// Log position of the commit that added the recipient.
    pub commit_seq: u64,
    /// When, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The part of the Welcome all joiners of the commit share
    /// ([`huddle_core::welcome`]).
    pub shared: Bytes,
    /// The recipient's own `EncryptedGroupSecrets`.
    pub own: Bytes,
}

/// Everything one sequencer step changes in one group. Applied atomically.
#[derive(Debug, Clone)]
pub struct GroupWrite {
    /// The group.
    pub group: GroupId,
    /// True when this write creates the group; it fails with
    /// [`StoreError::Conflict`] if the id exists.
    pub create: bool,
    /// New facts.
    pub meta: GroupMeta,
    /// New public MLS state, when it changed.
    pub state: Option<Vec<u8>>,
    /// Entries appended to the log, in order, right after the old head.
    pub entries: Vec<LogEntry>,
    /// Member records to insert or replace.
    pub members: Vec<(String, MemberRecord)>,
    /// Welcomes to deliver.
    pub welcomes: Vec<NewInboxItem>,
    /// Most Welcomes one inbox holds; delivering one more drops the oldest
    /// (its recipient, a member without a Welcome, rejoins on its own).
    pub inbox_cap: usize,
    /// Ratchet-tree snapshots to keep for joiners: (commit seq, tree).
    pub trees: Vec<(u64, Bytes)>,
    /// Delete log entries up to here (and tree snapshots before it);
    /// `meta.compacted` must say the same.
    pub compact_upto: Option<u64>,
    /// A new signed GroupInfo for rejoining members: (epoch, `MlsMessage`
    /// bytes). Replaces the one kept before.
    pub group_info: Option<(u64, Bytes)>,
}

impl GroupWrite {
    /// The write that creates `group` at epoch 0 with one member, its
    /// creator `user`, and public MLS state `state`.
    pub fn create(group: GroupId, user: &str, created_ms: u64, state: Vec<u8>) -> Self {
        Self {
            group,
            create: true,
            meta: GroupMeta {
                created_ms,
                epoch: 0,
                head: 0,
                compacted: 0,
            },
            state: Some(state),
            entries: vec![],
            members: vec![(
                user.to_owned(),
                MemberRecord {
                    joined_seq: 0,
                    removed_seq: None,
                    removed_ms: None,
                },
            )],
            welcomes: vec![],
            inbox_cap: usize::MAX,
            trees: vec![],
            compact_upto: None,
            group_info: None,
        }
    }
}

/// A device's request to be linked to a user, waiting for approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLink {
    /// The new device's key.
    pub device_key: [u8; 32],
    /// When the request lapses, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// A user waiting for an admin to add it to a group, with an invite that
/// needs approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// Who asks.
    pub user: String,
    /// The key of the invite it holds.
    pub invite: [u8; 32],
    /// When it asked, ms since the Unix epoch.
    pub at_ms: u64,
}

/// What an appended device-log entry does besides being stored.
#[derive(Debug, Clone, Copy)]
pub enum DeviceWrite<'a> {
    /// Registers the new device's principal with its key, and drops the
    /// pending link `code`.
    Add {
        /// `USER/N`.
        principal: &'a str,
        /// Its key.
        record: &'a UserRecord,
        /// The link request it answers.
        code: &'a str,
    },
    /// Revokes the principal: [`Store::user`] no longer finds it, and its
    /// name cannot be registered again.
    Remove {
        /// The revoked device's principal.
        principal: &'a str,
    },
}

/// The storage interface of the delivery service. All methods block; call
/// them from a blocking context.
pub trait Store: Send + Sync + 'static {
    /// Releases the backend (files, locks). Every later call fails. Called
    /// once at shutdown, after the last write.
    fn close(&self);

    /// Looks up a user, or a device's principal; a revoked one is not
    /// found.
    fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError>;

    /// Looks up a registered name, revoked or not: the key a user
    /// registered with is the root of its device log.
    fn registered(&self, name: &str) -> Result<Option<UserRecord>, StoreError>;

    /// The entries of `user`'s device log, in order.
    fn device_log(&self, user: &str) -> Result<Vec<Bytes>, StoreError>;

    /// Appends `entry` as entry `seq` (from 1) of `user`'s device log, and
    /// does what `write` says, in one transaction; `false` (and nothing
    /// written) if the log does not hold exactly `seq - 1` entries.
    fn append_device(
        &self,
        user: &str,
        seq: u32,
        entry: &[u8],
        write: DeviceWrite<'_>,
    ) -> Result<bool, StoreError>;

    /// Stores a pending link under (`user`, `code`). Pending links of the
    /// user lapsed at `now_ms` are dropped first, and the oldest ones
    /// beyond `max - 1` (so that a stranger's requests cannot lock a user
    /// out of linking for long); refuses with [`StoreError::Conflict`] if
    /// the code is taken.
    fn put_link(
        &self,
        user: &str,
        code: &str,
        link: &PendingLink,
        now_ms: u64,
        max: usize,
    ) -> Result<(), StoreError>;

    /// The pending link (`user`, `code`), if it has not lapsed at `now_ms`.
    fn link(&self, user: &str, code: &str, now_ms: u64) -> Result<Option<PendingLink>, StoreError>;

    /// Drops every pending link lapsed at `now_ms`; returns how many.
    fn expire_links(&self, now_ms: u64) -> Result<usize, StoreError>;

    /// Records `req` for `group`, replacing the same user's earlier
    /// request; refuses with [`StoreError::Conflict`] if `max` requests of
    /// other users wait already.
    fn put_join_request(
        &self,
        group: &GroupId,
        req: &JoinRequest,
        max: usize,
    ) -> Result<(), StoreError>;

    /// The requests waiting to join `group`, oldest first.
    fn join_requests(&self, group: &GroupId) -> Result<Vec<JoinRequest>, StoreError>;

    /// Drops the requests of `users` to join `group`.
    fn drop_join_requests(&self, group: &GroupId, users: &[String]) -> Result<(), StoreError>;

    /// Records that `principal` authenticated at `ms`.
    fn seen(&self, principal: &str, ms: u64) -> Result<(), StoreError>;

    /// When `principal` last authenticated, if known.
    fn last_seen(&self, principal: &str) -> Result<Option<u64>, StoreError>;

    /// Binds `name` to `record.identity_key` unless it is bound to another key.
    fn register_user(&self, name: &str, record: &UserRecord)
        -> Result<RegisterOutcome, StoreError>;

    /// Adds one-time key packages (keyed by hash reference, so a repeated
    /// upload is harmless) and optionally replaces the last-resort package.
    /// Packages of the user expired at `now` (seconds) are dropped first.
    /// Refuses with [`StoreError::Conflict`] if the pool would exceed `max`.
    fn add_key_packages(
        &self,
        user: &str,
        packages: &[(Vec<u8>, StoredKeyPackage)],
        last_resort: Option<&StoredKeyPackage>,
        max: u32,
        now: u64,
    ) -> Result<(), StoreError>;

    /// Claims one key package for each user, atomically: each one-time
    /// package is removed as it is handed out, so it is never handed out
    /// twice. Packages expired at `now` (seconds) are dropped. When the pool
    /// is empty the last-resort package is returned (and kept) unless it has
    /// expired. If any user has no usable package, nothing is claimed and
    /// the result holds `None` for those users.
    fn claim_key_packages(
        &self,
        users: &[String],
        now: u64,
    ) -> Result<Vec<Option<Claimed>>, StoreError>;

    /// One-time packages of `user` still valid at `valid_until` (seconds),
    /// and whether a last-resort package valid then is stored.
    fn key_package_count(&self, user: &str, valid_until: u64) -> Result<(u32, bool), StoreError>;

    /// Every group.
    fn groups(&self) -> Result<Vec<StoredGroup>, StoreError>;

    /// One group, to load it (groups are loaded when first asked for).
    fn group(&self, id: &GroupId) -> Result<Option<StoredGroup>, StoreError>;

    /// Groups in which `user` has a member record, current or not.
    fn user_groups(&self, user: &str) -> Result<Vec<GroupId>, StoreError>;

    /// The newest sequence number of `group`'s log, if it exists: what a
    /// node of a cluster polls to learn that another node wrote it.
    fn head(&self, group: &GroupId) -> Result<Option<u64>, StoreError> {
        Ok(self.group(group)?.map(|g| g.meta.head))
    }

    /// Applies many group writes in one atomic, durable transaction. Returns,
    /// per write, the inbox sequence number given to each of its Welcomes,
    /// in order.
    fn apply(&self, writes: &[GroupWrite]) -> Result<Vec<Vec<u64>>, StoreError>;

    /// Log entries of `group` with `after < seq <= until`, at most `limit`.
    fn read_log(
        &self,
        group: &GroupId,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<LogEntry>, StoreError>;

    /// Deletes `user`'s inbox items up to `upto` (they were processed).
    fn delete_inbox(&self, user: &str, upto: u64) -> Result<(), StoreError>;

    /// Deletes every inbox item delivered before `before_ms`; returns how
    /// many.
    fn expire_inbox(&self, before_ms: u64) -> Result<usize, StoreError>;

    /// Inbox items of `user` after `after`, at most `limit`, and the inbox head.
    fn read_inbox(
        &self,
        user: &str,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<InboxItem>, u64), StoreError>;

    /// The ratchet tree kept for the commit at `seq` in `group`.
    fn tree(&self, group: &GroupId, seq: u64) -> Result<Option<Bytes>, StoreError>;

    /// The newest GroupInfo published for `group`: (epoch, bytes).
    fn group_info(&self, group: &GroupId) -> Result<Option<(u64, Bytes)>, StoreError>;

    /// Records acknowledged positions (group, user, seq); positions only move
    /// forward.
    fn save_cursors(&self, cursors: &[(GroupId, String, u64)]) -> Result<(), StoreError>;

    /// Acknowledged positions of a group's members.
    fn cursors(&self, group: &GroupId) -> Result<Vec<(String, u64)>, StoreError>;

    /// A media record.
    fn media(&self, id: &MediaId) -> Result<Option<MediaRecord>, StoreError>;

    /// Inserts or replaces a media record.
    fn put_media(&self, id: &MediaId, record: &MediaRecord) -> Result<(), StoreError>;

    /// Replaces a media record that exists; `false` (writing nothing) if it
    /// is gone: an upload's progress never brings back an item that the
    /// sweep deleted meanwhile.
    fn update_media(&self, id: &MediaId, record: &MediaRecord) -> Result<bool, StoreError>;

    /// Deletes a media record; returns its item's length if there was one
    /// (the bytes it gives back to the quota).
    fn delete_media(&self, id: &MediaId) -> Result<Option<u64>, StoreError>;

    /// Every media record.
    fn all_media(&self) -> Result<Vec<(MediaId, MediaRecord)>, StoreError>;

    /// Records the hash of an epoch authenticator a member computed and
    /// returns every hash published for that epoch.
    fn publish_epoch_authenticator(
        &self,
        group: &GroupId,
        epoch: u64,
        user: &str,
        hash: [u8; 32],
    ) -> Result<Vec<(String, [u8; 32])>, StoreError>;

    /// Whether the store counts the bytes of media items itself, for all
    /// the processes that share it: then a new item is recorded through
    /// [`Store::reserve_media`], and deleting one releases its bytes. A
    /// store that one process owns leaves the count to that process.
    fn counts_media(&self) -> bool {
        false
    }

    /// Records the new media item `id` if the bytes of every item recorded,
    /// with it, stay within `quota`; `false`, recording nothing, if they
    /// would not. Only for a store that [`Store::counts_media`].
    fn reserve_media(
        &self,
        id: &MediaId,
        record: &MediaRecord,
        quota: u64,
    ) -> Result<bool, StoreError> {
        let _ = (id, record, quota);
        Err(StoreError::Io("this store does not count media".into()))
    }

    /// Counts the bytes of the media items recorded anew, for a store that
    /// [`Store::counts_media`]: what was counted wrong (a record written by
    /// a node of an older version, say) is put right by the next sweep.
    fn recount_media(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Gives up the lease `name` if `holder` holds it.
    fn release(&self, name: &str, holder: u64) -> Result<(), StoreError> {
        let _ = (name, holder);
        Ok(())
    }

    /// Takes or renews the lease `name` for `holder` for `ttl`, and says
    /// whether `holder` holds it now. Work that must run once for the
    /// whole service (retention sweeps) runs only while its node holds
    /// the lease. A store that one process owns grants it always.
    fn lease(&self, name: &str, holder: u64, ttl: std::time::Duration) -> Result<bool, StoreError> {
        let _ = (name, holder, ttl);
        Ok(true)
    }
}
