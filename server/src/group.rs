//! The sequencer: one task per group owns its log and its public MLS state.
//!
//! Every post to a group (commit, proposal, application message) goes
//! through the group's task, which validates it against the group's current
//! state, assigns the next sequence number and hands the write to the
//! [`Writer`]. Only when the write is durable does the task answer the
//! poster, publish the new [`GroupView`] and push the entry to online
//! members. Posts that queue up while a write is in flight are validated and
//! written together, so a busy group costs one disk flush per batch, not per
//! message.
//!
//! The DS follows each group with openmls [`PublicGroup`]: it sees every
//! handshake message in the clear (PublicMessage), verifies the sender's
//! signature and membership and the epoch, and learns the membership from
//! the tree. It never has a key that opens an application message.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use huddle_core::mls::{user_of, MAX_PAST_EPOCHS};
use huddle_core::proto::{self, EntryKind, ErrorBody, ErrorCode, Event, LogEntry};
use huddle_core::GroupId;
use openmls::prelude::{tls_codec::Deserialize as _, tls_codec::Serialize as _, *};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, warn};

use crate::config::ServerConfig;
use crate::store::{
    GroupMeta, GroupWrite, MemberRecord, NewInboxItem, Store, StoreError, WELCOME_HEAD,
};
use crate::writer::Writer;

/// What readers (fetches, subscriptions) may know of a group without asking
/// its task: only durable facts.
#[derive(Debug, Clone, Default)]
pub struct GroupView {
    /// Current epoch.
    pub epoch: u64,
    /// Newest durable sequence number.
    pub head: u64,
    /// Entries up to here were compacted away.
    pub compacted: u64,
    /// Every member record, including removed members. Shared between
    /// copies of the view: the group task takes a copy each round and only
    /// a commit changes the members (then the map is copied once).
    pub members: Arc<HashMap<String, MemberRecord>>,
    /// Epoch of the newest published GroupInfo.
    pub group_info_epoch: Option<u64>,
}

impl GroupView {
    /// User names of current members, sorted.
    pub fn current_members(&self) -> Vec<String> {
        let mut v: Vec<_> = self
            .members
            .iter()
            .filter(|(_, m)| m.is_current())
            .map(|(u, _)| u.clone())
            .collect();
        v.sort();
        v
    }

    /// Whether `user` is a current member.
    pub fn is_member(&self, user: &str) -> bool {
        self.members.get(user).is_some_and(|m| m.is_current())
    }
}

/// Signals for one connection's push stream that must not be lost when its
/// queue is full: gaps and ends of pushes.
#[derive(Debug, Default)]
pub struct Signals {
    events: Mutex<Vec<Event>>,
    notify: Notify,
}

impl Signals {
    /// Queues an event and wakes the push task.
    pub fn raise(&self, e: Event) {
        self.events.lock().expect("signals lock").push(e);
        self.notify.notify_one();
    }

    /// Takes the queued events.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().expect("signals lock"))
    }

    /// Waits until an event is raised.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

/// One connection that wants pushes.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// Push stream id, unique in this process.
    pub id: u64,
    /// Authenticated user of the connection.
    pub user: String,
    /// Pre-encoded [`Event`] frames.
    pub frames: mpsc::Sender<Bytes>,
    /// Out-of-band signals.
    pub signals: Arc<Signals>,
}

/// What a poster wants appended.
#[derive(Debug, Clone)]
pub enum Post {
    /// A commit, with the Welcome for the members it adds.
    Commit {
        /// `MlsMessage` bytes.
        commit: Bytes,
        /// `MlsMessage` (Welcome) bytes.
        welcome: Option<Bytes>,
    },
    /// A proposal.
    Proposal(Bytes),
    /// An application message.
    Application(Bytes),
}

/// Result of a post: (sequence number, epoch after it).
pub type PostResult = Result<(u64, u64), ErrorBody>;

/// Result of [`GroupHandle::watch`].
#[derive(Debug, PartialEq, Eq)]
pub enum WatchResult {
    /// Pushes start after `after`; anything between was queued.
    Watching,
    /// `after` is older than the in-memory tail: read the log up to `head`
    /// first, then watch again.
    CatchUp {
        /// Newest sequence number.
        head: u64,
    },
    /// The user may not read this group.
    NotMember,
}

enum Cmd {
    Post {
        user: String,
        post: Post,
        reply: oneshot::Sender<PostResult>,
    },
    Watch {
        sub: Subscriber,
        after: u64,
        reply: oneshot::Sender<WatchResult>,
    },
    Unwatch {
        sub: u64,
    },
    Compact {
        upto: u64,
    },
    /// Keep a GroupInfo for rejoining members.
    PublishGroupInfo {
        user: String,
        info: Bytes,
        reply: oneshot::Sender<PostResult>,
    },
    /// Hand out the GroupInfo and tree of the current epoch.
    JoinInfo {
        user: String,
        reply: oneshot::Sender<JoinInfoResult>,
    },
    /// Finish what was received before, then end the task.
    Stop,
}

/// What a rejoining member needs: the current epoch's GroupInfo and ratchet
/// tree, and the log head.
#[derive(Debug, Clone)]
pub struct JoinInfo {
    /// Epoch of both.
    pub epoch: u64,
    /// `MlsMessage` (GroupInfo) bytes.
    pub group_info: Bytes,
    /// TLS-serialised ratchet tree.
    pub tree: Bytes,
    /// Newest log sequence number.
    pub head: u64,
}

/// Result of [`GroupHandle::join_info`].
pub type JoinInfoResult = Result<JoinInfo, ErrorBody>;

/// Handle to a group's sequencer task.
#[derive(Debug)]
pub struct GroupHandle {
    /// The group.
    pub id: GroupId,
    tx: mpsc::Sender<Cmd>,
    view: RwLock<GroupView>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// When the group was last asked for (ms since the Unix epoch): an
    /// idle group is unloaded from memory.
    last_used: std::sync::atomic::AtomicU64,
    /// Push streams watching it (a watched group stays loaded).
    watchers: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Post { user, .. } => write!(f, "Post({user})"),
            Cmd::Watch { sub, after, .. } => write!(f, "Watch({}, {after})", sub.id),
            Cmd::Unwatch { sub } => write!(f, "Unwatch({sub})"),
            Cmd::Compact { upto } => write!(f, "Compact({upto})"),
            Cmd::PublishGroupInfo { user, .. } => write!(f, "PublishGroupInfo({user})"),
            Cmd::JoinInfo { user, .. } => write!(f, "JoinInfo({user})"),
            Cmd::Stop => f.write_str("Stop"),
        }
    }
}

fn stopped() -> ErrorBody {
    ErrorBody::new(ErrorCode::Unavailable, STOPPED)
}

/// The message of a command that reached a group task that had stopped
/// (the server shuts down, or the group was unloaded while idle: then the
/// command is sent again to the group loaded anew).
pub const STOPPED: &str = "the group's task has stopped";

impl GroupHandle {
    /// Notes that the group is in use now (`now_ms`).
    pub fn touch(&self, now_ms: u64) {
        self.last_used
            .store(now_ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the group has been idle, with nobody watching it, since
    /// before `before_ms`.
    pub fn idle_since(&self, before_ms: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.watchers.load(Relaxed) == 0 && self.last_used.load(Relaxed) < before_ms
    }

    /// Whether its task has stopped.
    pub fn is_stopped(&self) -> bool {
        self.tx.is_closed()
    }

    /// A snapshot of the durable view.
    pub fn view(&self) -> GroupView {
        self.view.read().expect("view lock").clone()
    }

    /// Reads the view without cloning it.
    pub fn with_view<R>(&self, f: impl FnOnce(&GroupView) -> R) -> R {
        f(&self.view.read().expect("view lock"))
    }

    /// Appends a post on behalf of authenticated `user`.
    pub async fn post(&self, user: String, post: Post) -> PostResult {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Post { user, post, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Keeps `info`, a GroupInfo signed by `user` for the current epoch, for
    /// members who need to rejoin. Answers the group's (head, epoch).
    pub async fn publish_group_info(&self, user: String, info: Bytes) -> PostResult {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::PublishGroupInfo { user, info, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// The GroupInfo and ratchet tree of the current epoch, for `user`, a
    /// current member who lost its group state.
    pub async fn join_info(&self, user: String) -> JoinInfoResult {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::JoinInfo { user, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Starts pushes to `sub` of entries after `after`.
    pub async fn watch(&self, sub: Subscriber, after: u64) -> WatchResult {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Cmd::Watch { sub, after, reply })
            .await
            .is_err()
        {
            return WatchResult::NotMember;
        }
        rx.await.unwrap_or(WatchResult::NotMember)
    }

    /// Asks the task to drop log entries up to `upto` (every current member
    /// has acknowledged them).
    pub fn compact(&self, upto: u64) {
        let _ = self.tx.try_send(Cmd::Compact { upto });
    }

    /// Ends the task after the commands already queued, and waits for it.
    pub async fn stop(&self) {
        let _ = self.tx.send(Cmd::Stop).await;
        let task = self.task.lock().expect("task lock").take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Stops pushes to push stream `sub`.
    pub fn unwatch(&self, sub: u64) {
        let _ = self.tx.try_send(Cmd::Unwatch { sub });
    }
}

/// Everything a group task needs from the rest of the server.
#[derive(Clone)]
pub struct Shared {
    /// Durable store (for identity keys).
    pub store: Arc<dyn Store>,
    /// Group-commit writer.
    pub writer: Writer,
    /// Where to announce Welcomes to online users.
    pub inboxes: Arc<crate::hub::Hub>,
    /// The limits in force.
    pub config: Arc<ServerConfig>,
    /// Bytes held in the tails of all groups.
    pub tail_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// Clock (ms since the Unix epoch).
    pub now_ms: fn() -> u64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// The public MLS state of a group: openmls' view plus the in-memory
/// storage openmls writes it to, which is what gets persisted.
struct MlsState {
    public: PublicGroup,
    storage: MemoryStorage,
}

impl MlsState {
    fn snapshot(&self) -> Vec<u8> {
        let values = self.storage.values.read().expect("mls storage lock");
        let mut pairs: Vec<(&Vec<u8>, &Vec<u8>)> = values.iter().collect();
        pairs.sort();
        postcard::to_allocvec(&pairs).expect("serialising to a Vec cannot fail")
    }

    fn restore(id: &GroupId, snapshot: &[u8]) -> Result<Self, StoreError> {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = postcard::from_bytes(snapshot)
            .map_err(|e| StoreError::Corrupt(format!("group state: {e}")))?;
        let storage = MemoryStorage::default();
        storage
            .values
            .write()
            .expect("mls storage lock")
            .extend(pairs);
        // openmls' in-memory storage panics on values it cannot decode;
        // a corrupt stored state must be an error, not a dead server.
        let gid = openmls::group::GroupId::from_slice(id.as_bytes());
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            PublicGroup::load(&storage, &gid)
        }))
        .map_err(|_| StoreError::Corrupt(format!("group {id} state does not decode")))?;
        let public = loaded
            .map_err(|e| StoreError::Corrupt(format!("group state: {e:?}")))?
            .ok_or_else(|| StoreError::Corrupt(format!("group {id} state is incomplete")))?;
        Ok(Self { public, storage })
    }
}

/// Cuts a Welcome `MLSMessage` into the part all joiners share (header and
/// encrypted GroupInfo, see [`crate::store::join_welcome`]) and each
/// joiner's encrypted group secrets, by key-package reference. `w` is the
/// same Welcome, parsed.
pub fn split_welcome(
    bytes: &[u8],
    w: &Welcome,
) -> Result<(Bytes, HashMap<Vec<u8>, Bytes>), String> {
    fn varint(b: &[u8]) -> Result<(usize, usize), String> {
        let first = *b.first().ok_or("truncated")?;
        let (len, n) = match first >> 6 {
            0 => (usize::from(first & 0x3f), 1),
            1 => (
                (usize::from(first & 0x3f) << 8) | usize::from(*b.get(1).ok_or("truncated")?),
                2,
            ),
            2 => {
                let v = b.get(..4).ok_or("truncated")?;
                (
                    (usize::from(v[0] & 0x3f) << 24)
                        | (usize::from(v[1]) << 16)
                        | (usize::from(v[2]) << 8)
                        | usize::from(v[3]),
                    4,
                )
            }
            _ => return Err("invalid length".into()),
        };
        Ok((len, n))
    }
    let head = bytes.get(..WELCOME_HEAD).ok_or("truncated")?;
    let (secrets_len, n) = varint(&bytes[WELCOME_HEAD..])?;
    let group_info = bytes
        .get(WELCOME_HEAD + n + secrets_len..)
        .ok_or("truncated")?;
    let mut shared = Vec::with_capacity(head.len() + group_info.len());
    shared.extend_from_slice(head);
    shared.extend_from_slice(group_info);
    let mut own = HashMap::new();
    for s in w.secrets() {
        let entry = s.tls_serialize_detached().map_err(|e| e.to_string())?;
        own.insert(s.new_member().as_slice().to_vec(), Bytes::from(entry));
    }
    Ok((Bytes::from(shared), own))
}

/// Restores a group's public MLS state from snapshot bytes as read from
/// the store, without starting its task: for fuzzing the decoder of stored
/// state. Corrupt bytes give an error.
pub fn restore_state_for_fuzzing(snapshot: &[u8]) -> Result<(), StoreError> {
    MlsState::restore(&GroupId([0; 16]), snapshot).map(|_| ())
}

/// Why a group could not be created.
#[derive(Debug)]
pub struct CreateError(pub ErrorBody);

/// Validates the epoch-0 state of a new group posted by `user` with
/// identity key `identity_key`, returning the write that creates it.
pub fn validate_new_group(
    id: GroupId,
    user: &str,
    identity_key: &[u8; 32],
    group_info: &[u8],
    ratchet_tree: &[u8],
    now_ms: u64,
) -> Result<(GroupWrite, Vec<u8>), ErrorBody> {
    let bad = |m: String| ErrorBody::new(ErrorCode::InvalidMessage, m);
    let msg = MlsMessageIn::tls_deserialize_exact(group_info)
        .map_err(|e| bad(format!("group info does not parse: {e}")))?;
    let MlsMessageBodyIn::GroupInfo(vgi) = msg.extract() else {
        return Err(bad("expected a GroupInfo message".into()));
    };
    let tree = RatchetTreeIn::tls_deserialize_exact(ratchet_tree)
        .map_err(|e| bad(format!("ratchet tree does not parse: {e}")))?;
    let storage = MemoryStorage::default();
    let (public, info) = PublicGroup::from_external(
        &RustCrypto::default(),
        &storage,
        tree,
        vgi,
        ProposalStore::new(),
    )
    .map_err(|e| bad(format!("group state does not verify: {e}")))?;
    if public.group_id().as_slice() != id.as_bytes() {
        return Err(bad(
            "group id of the GroupInfo differs from the request".into()
        ));
    }
    if public.group_context().epoch().as_u64() != 0 {
        return Err(bad("a new group must be at epoch 0".into()));
    }
    if public.ciphersuite() != huddle_core::mls::CIPHERSUITE {
        return Err(bad(format!(
            "unsupported ciphersuite {:?}",
            public.ciphersuite()
        )));
    }
    let members: Vec<Member> = public.members().collect();
    let [only] = members.as_slice() else {
        return Err(bad(
            "a new group must have exactly one member, its creator".into()
        ));
    };
    if user_of(&only.credential).as_deref() != Some(user) {
        return Err(bad(
            "the creator's credential must name the authenticated user".into(),
        ));
    }
    if only.signature_key.as_slice() != identity_key.as_slice() {
        return Err(bad(
            "the creator's signature key must be its registered identity key".into(),
        ));
    }
    // export_group_info carries the external public key: kept for rejoins.
    let info_epoch0 = info
        .extensions()
        .external_pub()
        .is_some()
        .then(|| (0, Bytes::copy_from_slice(group_info)));
    let state = MlsState { public, storage };
    let snapshot = state.snapshot();
    let write = GroupWrite {
        group_info: info_epoch0,
        ..GroupWrite::create(id, user, now_ms, snapshot.clone())
    };
    Ok((write, snapshot))
}

/// Starts the task of a group from its durable state.
pub fn spawn(
    id: GroupId,
    meta: GroupMeta,
    state: &[u8],
    members: Vec<(String, MemberRecord)>,
    group_info: Option<(u64, Bytes)>,
    shared: Shared,
) -> Result<Arc<GroupHandle>, StoreError> {
    let mls = MlsState::restore(&id, state)?;
    let (tx, rx) = mpsc::channel(1024);
    let handle = Arc::new(GroupHandle {
        id,
        tx,
        view: RwLock::new(GroupView {
            epoch: meta.epoch,
            head: meta.head,
            compacted: meta.compacted,
            members: Arc::new(members.into_iter().collect()),
            group_info_epoch: group_info.as_ref().map(|(e, _)| *e),
        }),
        task: Mutex::new(None),
        last_used: std::sync::atomic::AtomicU64::new((shared.now_ms)()),
        watchers: std::sync::atomic::AtomicUsize::new(0),
    });
    let actor = Actor {
        id,
        meta,
        mls: Some(mls),
        durable_state: state.to_vec(),
        handle: Arc::downgrade(&handle),
        tail: Tail::new(shared.tail_bytes.clone()),
        shared,
        subscribers: HashMap::new(),
        group_info,
    };
    *handle.task.lock().expect("task lock") = Some(tokio::spawn(actor.run(rx)));
    Ok(handle)
}

struct Actor {
    id: GroupId,
    meta: GroupMeta,
    /// `None` only while a blocking step owns it.
    mls: Option<MlsState>,
    /// Snapshot matching `meta`, to roll back to if a write fails.
    durable_state: Vec<u8>,
    handle: std::sync::Weak<GroupHandle>,
    shared: Shared,
    /// The newest entries, for watchers that are only a little behind.
    tail: Tail,
    subscribers: HashMap<u64, Subscriber>,
    /// Newest durable GroupInfo: (epoch, bytes).
    group_info: Option<(u64, Bytes)>,
}

/// (seq, pre-encoded `Event::Entry` frame) of a group's newest entries,
/// bounded by count and bytes, and by the bytes of all groups' tails
/// together (`total`): past that, each group keeps only its newest entry,
/// and watchers further behind catch up from the log.
struct Tail {
    entries: VecDeque<(u64, Bytes)>,
    bytes: usize,
    total: Arc<std::sync::atomic::AtomicUsize>,
}

impl Tail {
    fn new(total: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            total,
        }
    }

    fn extend(&mut self, new: &[(u64, Bytes)], max: usize, max_bytes: usize, max_total: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        for e in new {
            self.bytes += e.1.len();
            self.total.fetch_add(e.1.len(), Relaxed);
            self.entries.push_back(e.clone());
        }
        while self.entries.len() > 1
            && (self.entries.len() > max
                || self.bytes > max_bytes
                || self.total.load(Relaxed) > max_total)
        {
            if let Some((_, f)) = self.entries.pop_front() {
                self.bytes -= f.len();
                self.total.fetch_sub(f.len(), Relaxed);
            }
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.total
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An accepted post waiting for its write.
struct Accepted {
    reply: oneshot::Sender<PostResult>,
    entry: LogEntry,
    /// The group's epoch right after this entry.
    epoch: u64,
}

/// What a round of validated posts changes besides the log.
#[derive(Default)]
struct Changes {
    members: Vec<(String, MemberRecord)>,
    welcomes: Vec<NewInboxItem>,
    trees: Vec<(u64, Bytes)>,
    state_changed: bool,
    compact_upto: Option<u64>,
    group_info: Option<(u64, Bytes)>,
    /// Answered once the new GroupInfo is durable.
    info_replies: Vec<oneshot::Sender<PostResult>>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut cmds = Vec::with_capacity(256);
        let mut joins = Vec::new();
        let mut stopping = false;
        while !stopping && rx.recv_many(&mut cmds, 256).await > 0 {
            let mut view = match self.handle.upgrade() {
                Some(h) => h.view(),
                None => return,
            };
            let start_head = view.head;
            let mut accepted: Vec<Accepted> = Vec::new();
            let mut changes = Changes::default();
            for cmd in cmds.drain(..) {
                match cmd {
                    Cmd::Post { user, post, reply } => {
                        let seq = view.head + 1;
                        match self
                            .validate(&mut view, &user, post, seq, &mut changes)
                            .await
                        {
                            Ok(entry) => {
                                view.head = seq;
                                accepted.push(Accepted {
                                    reply,
                                    entry,
                                    epoch: view.epoch,
                                });
                            }
                            Err(e) => {
                                debug!(group = %self.id, %user, error = %e.message, "post refused");
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    Cmd::Watch { sub, after, reply } => {
                        // Durable view: entries accepted in this round are
                        // pushed to the subscriber once written.
                        let durable = self.handle.upgrade().map(|h| h.view()).unwrap_or_default();
                        let _ = reply.send(self.watch(&durable, sub, after));
                    }
                    Cmd::Unwatch { sub } => {
                        self.subscribers.remove(&sub);
                    }
                    Cmd::Compact { upto } => {
                        if upto > self.meta.compacted && upto <= self.meta.head {
                            changes.compact_upto = Some(upto);
                        }
                    }
                    Cmd::PublishGroupInfo { user, info, reply } => {
                        match self.check_group_info(&view, &user, &info) {
                            Ok(epoch) => {
                                view.group_info_epoch = Some(epoch);
                                changes.group_info = Some((epoch, info));
                                changes.info_replies.push(reply);
                            }
                            Err(e) => {
                                debug!(group = %self.id, %user, error = %e.message, "group info refused");
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    Cmd::JoinInfo { user, reply } => joins.push((user, reply)),
                    Cmd::Stop => stopping = true,
                }
            }
            if !accepted.is_empty()
                || changes.compact_upto.is_some()
                || changes.group_info.is_some()
            {
                self.commit(view, start_head, accepted, changes).await;
            }
            // Answered from durable state only.
            for (user, reply) in joins.drain(..) {
                let _ = reply.send(self.join_info(&user));
            }
            if let Some(h) = self.handle.upgrade() {
                h.watchers
                    .store(self.subscribers.len(), std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Checks a GroupInfo published by `user`: it names this group and its
    /// current epoch, carries the external public key a rejoining member
    /// needs, is signed with `user`'s leaf key, and its group context is
    /// exactly the one the DS tracks. (The DS cannot check the confirmation
    /// tag or the external key, which derive from secrets it never has; a
    /// member who publishes a bad one makes the rejoin fail, which the
    /// rejoining member detects.) Returns the epoch.
    fn check_group_info(
        &self,
        view: &GroupView,
        user: &str,
        bytes: &[u8],
    ) -> Result<u64, ErrorBody> {
        if !view.is_member(user) {
            return Err(ErrorBody::new(
                ErrorCode::NotMember,
                format!("{user} is not a member of group {}", self.id),
            ));
        }
        let invalid = |m: String| ErrorBody::new(ErrorCode::InvalidMessage, m);
        let mls = self.mls.as_ref().expect("mls state present");
        let msg = MlsMessageIn::tls_deserialize_exact(bytes)
            .map_err(|e| invalid(format!("group info does not parse: {e}")))?;
        let MlsMessageBodyIn::GroupInfo(vgi) = msg.extract() else {
            return Err(invalid("expected a GroupInfo message".into()));
        };
        if vgi.group_id().as_slice() != self.id.as_bytes() {
            return Err(invalid("the GroupInfo is for another group".into()));
        }
        let epoch = mls.public.group_context().epoch().as_u64();
        if vgi.epoch().as_u64() != epoch {
            return Err(ErrorBody {
                code: ErrorCode::StaleEpoch,
                message: format!(
                    "the GroupInfo is for epoch {} but the group is at epoch {epoch}",
                    vgi.epoch().as_u64()
                ),
                epoch: Some(epoch),
            });
        }
        if vgi.extensions().external_pub().is_none() {
            return Err(invalid("the GroupInfo has no external public key".into()));
        }
        let key = mls
            .public
            .members()
            .find(|m| user_of(&m.credential).as_deref() == Some(user))
            .map(|m| m.signature_key)
            .ok_or_else(|| invalid(format!("{user} has no leaf in the group")))?;
        let key = OpenMlsSignaturePublicKey::new(key.into(), SignatureScheme::ED25519)
            .map_err(|e| invalid(format!("leaf key: {e:?}")))?;
        let info: openmls::messages::group_info::GroupInfo = vgi
            .verify(&RustCrypto::default(), &key)
            .map_err(|_| invalid("the GroupInfo is not signed by the publishing member".into()))?;
        if info.group_context() != mls.public.group_context() {
            return Err(invalid(
                "the GroupInfo's group context differs from the group's".into(),
            ));
        }
        Ok(epoch)
    }

    /// The durable GroupInfo, if it is for the current epoch, with the tree.
    fn join_info(&self, user: &str) -> JoinInfoResult {
        let Some(handle) = self.handle.upgrade() else {
            return Err(stopped());
        };
        let view = handle.view();
        if !view.is_member(user) {
            return Err(ErrorBody::new(
                ErrorCode::NotMember,
                format!("{user} is not a member of group {}", self.id),
            ));
        }
        let mls = self.mls.as_ref().expect("mls state present");
        let epoch = mls.public.group_context().epoch().as_u64();
        let Some((info_epoch, info)) = &self.group_info else {
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                "no GroupInfo was published for this group yet",
            ));
        };
        if *info_epoch != epoch {
            return Err(ErrorBody {
                code: ErrorCode::NotFound,
                message: format!(
                    "the newest GroupInfo is for epoch {info_epoch}, the group is at epoch {epoch}: \
                     wait until a member publishes the current one"
                ),
                epoch: Some(epoch),
            });
        }
        let tree = mls
            .public
            .export_ratchet_tree()
            .tls_serialize_detached()
            .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?;
        Ok(JoinInfo {
            epoch,
            group_info: info.clone(),
            tree: Bytes::from(tree),
            head: view.head,
        })
    }

    /// Validates one post against the working view; on success returns the
    /// log entry (and records side effects in `changes`).
    async fn validate(
        &mut self,
        view: &mut GroupView,
        user: &str,
        post: Post,
        seq: u64,
        changes: &mut Changes,
    ) -> Result<LogEntry, ErrorBody> {
        if !view.is_member(user) {
            return Err(ErrorBody::new(
                ErrorCode::NotMember,
                format!("{user} is not a member of group {}", self.id),
            ));
        }
        let now = (self.shared.now_ms)();
        let invalid = |m: String| ErrorBody::new(ErrorCode::InvalidMessage, m);
        let (data, kind) = match &post {
            Post::Commit { commit, .. } => (commit.clone(), EntryKind::Commit),
            Post::Proposal(p) => (p.clone(), EntryKind::Proposal),
            Post::Application(m) => (m.clone(), EntryKind::Application),
        };
        let msg = MlsMessageIn::tls_deserialize_exact(data.as_ref())
            .map_err(|e| invalid(format!("MLS message does not parse: {e}")))?;
        let pm = msg
            .try_into_protocol_message()
            .map_err(|_| invalid("expected an MLS PublicMessage or PrivateMessage".into()))?;
        if pm.group_id().as_slice() != self.id.as_bytes() {
            return Err(invalid("message is for another group".into()));
        }
        let msg_epoch = pm.epoch().as_u64();
        let stale = |epoch: u64| ErrorBody {
            code: ErrorCode::StaleEpoch,
            message: format!(
                "message is for epoch {msg_epoch} but the group is at epoch {epoch}: sync and retry"
            ),
            epoch: Some(epoch),
        };
        match kind {
            EntryKind::Application => {
                let max = self.shared.config.max_application_message;
                if data.len() > max {
                    return Err(ErrorBody::new(
                        ErrorCode::TooLarge,
                        format!(
                            "an application message of {} bytes; this server takes at most {max}",
                            data.len()
                        ),
                    ));
                }
                if pm.wire_format() != WireFormat::PrivateMessage
                    || pm.content_type() != ContentType::Application
                {
                    return Err(invalid(
                        "application messages must be encrypted (PrivateMessage)".into(),
                    ));
                }
                if msg_epoch > view.epoch || msg_epoch + (MAX_PAST_EPOCHS as u64) < view.epoch {
                    return Err(stale(view.epoch));
                }
                Ok(LogEntry {
                    seq,
                    epoch: msg_epoch,
                    kind,
                    timestamp_ms: now,
                    data,
                })
            }
            EntryKind::Proposal | EntryKind::Commit => {
                let want = if kind == EntryKind::Commit {
                    ContentType::Commit
                } else {
                    ContentType::Proposal
                };
                if pm.wire_format() != WireFormat::PublicMessage || pm.content_type() != want {
                    return Err(invalid(format!(
                        "expected a {want:?} sent as PublicMessage"
                    )));
                }
                if msg_epoch != view.epoch {
                    return Err(stale(view.epoch));
                }
                let welcome = match post {
                    Post::Commit { welcome, .. } => welcome,
                    _ => None,
                };
                self.handshake(view, user, pm, kind, welcome, seq, changes)
                    .await?;
                Ok(LogEntry {
                    seq,
                    epoch: msg_epoch,
                    kind,
                    timestamp_ms: now,
                    data,
                })
            }
        }
    }

    /// Processes a proposal or commit with the public group, in a blocking
    /// task (a commit in a 1,000-member group costs milliseconds of CPU).
    #[allow(clippy::too_many_arguments)]
    async fn handshake(
        &mut self,
        view: &mut GroupView,
        user: &str,
        pm: ProtocolMessage,
        kind: EntryKind,
        welcome: Option<Bytes>,
        seq: u64,
        changes: &mut Changes,
    ) -> Result<(), ErrorBody> {
        let mls = self.mls.take().expect("mls state present");
        // The blocking step reads identity keys from the store.
        let store = self.shared.store.clone();
        let user_owned = user.to_owned();
        let current = view.clone();
        let now = (self.shared.now_ms)();
        let limits = HandshakeLimits {
            max_leaf_node: self.shared.config.max_leaf_node,
            max_pending_proposals: self.shared.config.max_pending_proposals,
        };
        let result = tokio::task::spawn_blocking(move || {
            let mut mls = mls;
            let r = process_handshake(
                &mut mls,
                &*store,
                &current,
                &user_owned,
                pm,
                kind,
                welcome,
                seq,
                now,
                &limits,
            );
            (mls, r)
        })
        .await;
        let (mls, result) = match result {
            Ok(v) => v,
            Err(e) => {
                // The blocking step panicked: rebuild the state from disk.
                warn!(group = %self.id, "handshake processing failed: {e}");
                let mls = MlsState::restore(&self.id, &self.durable_state)
                    .expect("durable group state reloads");
                (
                    mls,
                    Err(ErrorBody::new(ErrorCode::Internal, "internal error")),
                )
            }
        };
        self.mls = Some(mls);
        let outcome = result?;
        if let Some(o) = outcome {
            let members = Arc::make_mut(&mut view.members);
            for (name, rec) in &o.members {
                members.insert(name.clone(), *rec);
            }
            view.epoch = o.epoch;
            changes.members.extend(o.members);
            changes.welcomes.extend(o.welcomes);
            changes.trees.extend(o.tree);
        }
        changes.state_changed = true;
        Ok(())
    }

    fn watch(&mut self, durable: &GroupView, sub: Subscriber, after: u64) -> WatchResult {
        let Some(member) = durable.members.get(&sub.user).copied() else {
            return WatchResult::NotMember;
        };
        let until = member.readable_until(durable.head);
        if !member.is_current() && after >= until {
            return WatchResult::NotMember;
        }
        let after = after.max(member.joined_seq);
        if after < until {
            let tail_start = self.tail.entries.front().map_or(u64::MAX, |(s, _)| *s);
            if after + 1 < tail_start {
                return WatchResult::CatchUp { head: until };
            }
            for (seq, frame) in &self.tail.entries {
                if *seq > after && *seq <= until && sub.frames.try_send(frame.clone()).is_err() {
                    return WatchResult::CatchUp { head: until };
                }
            }
        }
        if member.is_current() {
            self.subscribers.insert(sub.id, sub);
        }
        WatchResult::Watching
    }

    async fn commit(
        &mut self,
        view: GroupView,
        start_head: u64,
        accepted: Vec<Accepted>,
        changes: Changes,
    ) {
        let state = changes
            .state_changed
            .then(|| self.mls.as_ref().expect("mls state present").snapshot());
        let mut meta = self.meta.clone();
        meta.epoch = view.epoch;
        meta.head = view.head;
        if let Some(upto) = changes.compact_upto {
            meta.compacted = meta.compacted.max(upto);
        }
        let mut view = view;
        view.compacted = meta.compacted;
        let write = GroupWrite {
            group: self.id,
            create: false,
            meta: meta.clone(),
            state: state.clone(),
            entries: accepted.iter().map(|a| a.entry.clone()).collect(),
            members: changes.members.clone(),
            welcomes: changes.welcomes.clone(),
            inbox_cap: self.shared.config.max_inbox_items,
            trees: changes.trees,
            compact_upto: changes.compact_upto,
            group_info: changes.group_info.clone(),
        };
        debug_assert_eq!(start_head + accepted.len() as u64, view.head);
        match self.shared.writer.write(write).await {
            Ok(inbox_items) => {
                self.meta = meta;
                if let Some(s) = state {
                    self.durable_state = s;
                }
                let Some(handle) = self.handle.upgrade() else {
                    return;
                };
                *handle.view.write().expect("view lock") = view.clone();
                if let Some(info) = changes.group_info {
                    self.group_info = Some(info);
                }
                for r in changes.info_replies {
                    let _ = r.send(Ok((view.head, view.epoch)));
                }
                let mut frames = Vec::with_capacity(accepted.len());
                let mut replies = Vec::with_capacity(accepted.len());
                for a in accepted {
                    let seq = a.entry.seq;
                    frames.push((
                        seq,
                        proto::encode_frame(&Event::Entry {
                            group: self.id,
                            entry: a.entry,
                        }),
                    ));
                    replies.push((a.reply, seq, a.epoch));
                }
                self.push(&view, frames);
                for (reply, seq, epoch) in replies {
                    let _ = reply.send(Ok((seq, epoch)));
                }
                for (w, seq) in changes.welcomes.into_iter().zip(inbox_items) {
                    self.shared.inboxes.deliver(self.id, w, seq);
                }
                if !changes.members.is_empty() {
                    info!(group = %self.id, epoch = view.epoch, members = view.current_members().len(), "membership changed");
                }
            }
            Err(e) => {
                warn!(group = %self.id, error = %e, "write failed; rolling back");
                let body = match e {
                    StoreError::Full => ErrorBody::new(
                        ErrorCode::QuotaExceeded,
                        "the server's storage is full; nothing was stored",
                    ),
                    _ => ErrorBody::new(ErrorCode::Internal, "storage failure; nothing was stored"),
                };
                if let Ok(mls) = MlsState::restore(&self.id, &self.durable_state) {
                    self.mls = Some(mls);
                }
                for a in accepted {
                    let _ = a.reply.send(Err(body.clone()));
                }
                for r in changes.info_replies {
                    let _ = r.send(Err(body.clone()));
                }
            }
        }
    }

    /// Pushes the entries one round made durable (consecutive sequence
    /// numbers) to every subscriber allowed to read them. A subscriber gets
    /// all of its entries of the round as one queue item, so its push loop
    /// writes them in one call, and under load a round of many messages
    /// costs each member one packet rather than one per message.
    fn push(&mut self, view: &GroupView, entries: Vec<(u64, Bytes)>) {
        let (Some(&(first, _)), Some(&(last, _))) = (entries.first(), entries.last()) else {
            return;
        };
        let c = &self.shared.config;
        self.tail
            .extend(&entries, c.tail_entries, c.tail_bytes, c.tail_bytes_total);
        let all = concat(&entries);
        let mut drop_subs = Vec::new();
        for (id, sub) in &self.subscribers {
            let Some(m) = view.members.get(&sub.user) else {
                drop_subs.push(*id);
                continue;
            };
            let share = RoundShare::of(m, view.head, first, last);
            if let Some(range) = &share.entries {
                let frames = if *range == (first..=last) {
                    all.clone()
                } else {
                    concat(
                        &entries[(range.start() - first) as usize..=(range.end() - first) as usize],
                    )
                };
                if sub.frames.try_send(frames).is_err() {
                    // Too slow (or gone): stop pushing; it catches up from the log.
                    sub.signals.raise(Event::Gap {
                        group: self.id,
                        head: view.head,
                    });
                    drop_subs.push(*id);
                    continue;
                }
            }
            if let Some(removed) = share.removed {
                // Behind the removing commit in the same queue, so the
                // client sees the commit first.
                let unwatched = Event::Unwatched {
                    group: self.id,
                    reason: ErrorBody::new(
                        ErrorCode::NotMember,
                        format!("removed from group {} by the commit at {removed}", self.id),
                    ),
                };
                if sub
                    .frames
                    .try_send(proto::encode_frame(&unwatched))
                    .is_err()
                {
                    sub.signals.raise(unwatched);
                }
            }
            if share.stop {
                drop_subs.push(*id);
            }
        }
        for c in drop_subs {
            self.subscribers.remove(&c);
        }
    }
}

/// What a subscribed member gets of a round's entries `first..=last`.
#[derive(Debug, PartialEq, Eq)]
struct RoundShare {
    /// The entries it may read, if any: after the commit that added it, up
    /// to the one that removed it.
    entries: Option<std::ops::RangeInclusive<u64>>,
    /// The removing commit, when it is among them: the member is told it
    /// was removed, after that commit.
    removed: Option<u64>,
    /// Whether pushing to it ends with this round (removed now or before).
    stop: bool,
}

impl RoundShare {
    fn of(m: &MemberRecord, head: u64, first: u64, last: u64) -> Self {
        let until = m.readable_until(head);
        let lo = (m.joined_seq + 1).max(first);
        let hi = until.min(last);
        let entries = (lo <= hi).then_some(lo..=hi);
        let removed = m.removed_seq.filter(|r| (lo..=hi).contains(r));
        Self {
            entries,
            removed,
            stop: removed.is_some() || last > until,
        }
    }
}

/// `frames` back to back in one buffer (the frame itself when alone).
fn concat(frames: &[(u64, Bytes)]) -> Bytes {
    match frames {
        [(_, one)] => one.clone(),
        _ => {
            let mut out = bytes::BytesMut::with_capacity(frames.iter().map(|(_, f)| f.len()).sum());
            for (_, f) in frames {
                out.extend_from_slice(f);
            }
            out.freeze()
        }
    }
}

/// What an accepted commit changes.
struct HandshakeOutcome {
    epoch: u64,
    members: Vec<(String, MemberRecord)>,
    welcomes: Vec<NewInboxItem>,
    tree: Option<(u64, Bytes)>,
}

/// The limits a handshake is checked against.
#[derive(Debug, Clone, Copy)]
struct HandshakeLimits {
    max_leaf_node: usize,
    max_pending_proposals: usize,
}

#[allow(clippy::too_many_arguments)]
fn process_handshake(
    mls: &mut MlsState,
    store: &dyn Store,
    view: &GroupView,
    user: &str,
    pm: ProtocolMessage,
    kind: EntryKind,
    welcome: Option<Bytes>,
    seq: u64,
    now: u64,
    limits: &HandshakeLimits,
) -> Result<Option<HandshakeOutcome>, ErrorBody> {
    let invalid = |m: String| ErrorBody::new(ErrorCode::InvalidMessage, m);
    let crypto = RustCrypto::default();
    let processed = mls
        .public
        .process_message(&crypto, pm)
        .map_err(|e| invalid(format!("handshake message refused: {e}")))?;
    // `None`: an external commit, by which a member who lost its state
    // rejoins (checked below: it must replace that member's own leaf).
    let sender_leaf = match processed.sender() {
        Sender::Member(leaf) => Some(*leaf),
        Sender::NewMemberCommit if kind == EntryKind::Commit => None,
        _ => return Err(invalid("only members may send handshake messages".into())),
    };
    if user_of(processed.credential()).as_deref() != Some(user) {
        return Err(invalid(
            "the message is signed by another member than the authenticated user".into(),
        ));
    }
    let identity_of = |name: &str| -> Result<[u8; 32], ErrorBody> {
        match store.user(name) {
            Ok(Some(u)) => Ok(u.identity_key),
            Ok(None) => Err(ErrorBody::new(
                ErrorCode::UnknownUser,
                format!("{name} is not a registered user"),
            )),
            Err(e) => Err(ErrorBody::new(ErrorCode::Internal, format!("storage: {e}"))),
        }
    };
    let check_leaf = |leaf: &LeafNode, expect: &str| -> Result<(), ErrorBody> {
        // Every joiner downloads every leaf: a member may not grow the
        // tree with a leaf of its own making.
        let size = leaf.tls_serialized_len();
        if size > limits.max_leaf_node {
            return Err(ErrorBody::new(
                ErrorCode::TooLarge,
                format!(
                    "a leaf node of {size} bytes; this server takes at most {}",
                    limits.max_leaf_node
                ),
            ));
        }
        if user_of(leaf.credential()).as_deref() != Some(expect) {
            return Err(invalid(format!(
                "a leaf must keep the credential of {expect}"
            )));
        }
        if leaf.signature_key().as_slice() != identity_of(expect)?.as_slice() {
            return Err(invalid(format!(
                "the signature key of {expect}'s leaf is not its registered identity key"
            )));
        }
        Ok(())
    };
    match processed.into_content() {
        ProcessedMessageContent::ProposalMessage(queued) => {
            if kind != EntryKind::Proposal {
                return Err(invalid("expected a commit".into()));
            }
            match queued.proposal() {
                Proposal::Remove(_) | Proposal::Update(_) => {}
                other => {
                    return Err(invalid(format!(
                        "proposals of type {:?} are not accepted by reference; commit them",
                        other.proposal_type()
                    )))
                }
            }
            if let Proposal::Update(u) = queued.proposal() {
                check_leaf(u.leaf_node(), user)?;
            }
            let pending = mls
                .public
                .queued_proposals(&mls.storage)
                .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("{e:?}")))?
                .len();
            if pending >= limits.max_pending_proposals {
                return Err(ErrorBody::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "{pending} proposals are waiting in this epoch, the most this server keeps; commit them first"
                    ),
                ));
            }
            mls.public
                .add_proposal(&mls.storage, *queued)
                .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("{e:?}")))?;
            Ok(None)
        }
        ProcessedMessageContent::StagedCommitMessage(staged) => {
            if kind != EntryKind::Commit {
                return Err(invalid("expected a proposal".into()));
            }
            // Leaf index -> user, before the commit.
            let by_leaf: HashMap<u32, String> = mls
                .public
                .members()
                .filter_map(|m| user_of(&m.credential).map(|u| (m.index.u32(), u)))
                .collect();
            let mut names: HashSet<String> = by_leaf.values().cloned().collect();
            for r in staged.remove_proposals() {
                if let Some(n) = by_leaf.get(&r.remove_proposal().removed().u32()) {
                    names.remove(n);
                }
            }
            for u in staged.update_proposals() {
                let sender = match u.sender() {
                    Sender::Member(l) => by_leaf.get(&l.u32()).cloned(),
                    _ => None,
                };
                let sender = sender.ok_or_else(|| invalid("update from a non-member".into()))?;
                check_leaf(u.update_proposal().leaf_node(), &sender)?;
            }
            if sender_leaf.is_none() {
                // A rejoin: the external commit replaces the sender's own
                // leaf and changes nothing else. Anyone else must be added.
                let removed: Vec<&String> = staged
                    .remove_proposals()
                    .filter_map(|r| by_leaf.get(&r.remove_proposal().removed().u32()))
                    .collect();
                if removed != [user] || staged.remove_proposals().count() != 1 {
                    return Err(invalid(
                        "an external commit must replace the sender's own leaf and nothing else \
                         (only a current member may rejoin this way)"
                            .into(),
                    ));
                }
                if staged.add_proposals().next().is_some()
                    || staged.update_proposals().next().is_some()
                    || welcome.is_some()
                {
                    return Err(invalid(
                        "an external commit may not add or update members".into(),
                    ));
                }
                let leaf = staged
                    .update_path_leaf_node()
                    .ok_or_else(|| invalid("an external commit needs a path".into()))?;
                check_leaf(leaf, user)?;
            } else if let Some(leaf) = staged.update_path_leaf_node() {
                let committer = sender_leaf
                    .and_then(|l| by_leaf.get(&l.u32()))
                    .ok_or_else(|| invalid("committer is not in the tree".into()))?;
                check_leaf(leaf, committer)?;
            }
            let mut added = Vec::new();
            let mut added_refs = HashSet::new();
            let mut ref_of: HashMap<String, Vec<u8>> = HashMap::new();
            for a in staged.add_proposals() {
                let kp = a.add_proposal().key_package();
                let name = user_of(kp.leaf_node().credential())
                    .ok_or_else(|| invalid("an added member has no valid user name".into()))?;
                check_leaf(kp.leaf_node(), &name)?;
                if !names.insert(name.clone()) {
                    return Err(invalid(format!("{name} is already a member")));
                }
                let r = kp
                    .hash_ref(&crypto)
                    .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?
                    .as_slice()
                    .to_vec();
                added_refs.insert(r.clone());
                ref_of.insert(name.clone(), r);
                added.push(name);
            }
            // The Welcome goes with the adds, to exactly the added members.
            match (&welcome, added.is_empty()) {
                (Some(_), true) => {
                    return Err(invalid(
                        "a Welcome was sent with a commit that adds nobody".into(),
                    ))
                }
                (None, false) => {
                    return Err(invalid(
                        "a commit that adds members needs their Welcome".into(),
                    ))
                }
                _ => {}
            }
            let mut per_member: HashMap<Vec<u8>, Bytes> = HashMap::new();
            let mut shared_part = Bytes::new();
            if let Some(bytes) = &welcome {
                let msg = MlsMessageIn::tls_deserialize_exact(bytes.as_ref())
                    .map_err(|e| invalid(format!("Welcome does not parse: {e}")))?;
                let MlsMessageBodyIn::Welcome(w) = msg.extract() else {
                    return Err(invalid("expected a Welcome message".into()));
                };
                let targets: HashSet<Vec<u8>> = w
                    .secrets()
                    .iter()
                    .map(|s| s.new_member().as_slice().to_vec())
                    .collect();
                if targets != added_refs || targets.len() != w.secrets().len() {
                    return Err(invalid(
                        "the Welcome must be addressed to exactly the added members".into(),
                    ));
                }
                (shared_part, per_member) =
                    split_welcome(bytes, &w).map_err(|e| invalid(format!("Welcome: {e}")))?;
            }
            let old_epoch = mls.public.group_context().epoch().as_u64();
            mls.public
                .merge_commit(&mls.storage, *staged)
                .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("merge: {e:?}")))?;
            let epoch = mls.public.group_context().epoch().as_u64();
            debug_assert_eq!(epoch, old_epoch + 1);
            let after: HashSet<String> = mls
                .public
                .members()
                .filter_map(|m| user_of(&m.credential))
                .collect();
            let mut members = Vec::new();
            for name in view.current_members() {
                if !after.contains(&name) {
                    members.push((
                        name.clone(),
                        MemberRecord {
                            joined_seq: view.members[&name].joined_seq,
                            removed_seq: Some(seq),
                            removed_ms: Some(now),
                        },
                    ));
                }
            }
            let mut welcomes = Vec::new();
            for name in &added {
                members.push((
                    name.clone(),
                    MemberRecord {
                        joined_seq: seq,
                        removed_seq: None,
                        removed_ms: None,
                    },
                ));
                let own = ref_of
                    .get(name)
                    .and_then(|r| per_member.get(r))
                    .cloned()
                    .ok_or_else(|| invalid(format!("no Welcome secrets for {name}")))?;
                welcomes.push(NewInboxItem {
                    user: name.clone(),
                    commit_seq: seq,
                    timestamp_ms: now,
                    shared: shared_part.clone(),
                    own,
                });
            }
            let tree = if added.is_empty() {
                None
            } else {
                let t = mls
                    .public
                    .export_ratchet_tree()
                    .tls_serialize_detached()
                    .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?;
                Some((seq, Bytes::from(t)))
            };
            Ok(Some(HandshakeOutcome {
                epoch,
                members,
                welcomes,
                tree,
            }))
        }
        _ => Err(invalid("unexpected handshake content".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(joined_seq: u64, removed_seq: Option<u64>) -> MemberRecord {
        MemberRecord {
            joined_seq,
            removed_seq,
            removed_ms: removed_seq.map(|_| 1),
        }
    }

    /// A round of entries 11..=15 (head 15), as each kind of member sees it.
    #[test]
    fn a_round_is_shared_only_within_membership() {
        let share = |m: MemberRecord| RoundShare::of(&m, 15, 11, 15);
        // A member throughout: all of it, and it stays subscribed.
        let all = RoundShare {
            entries: Some(11..=15),
            removed: None,
            stop: false,
        };
        assert_eq!(share(member(3, None)), all);
        // Added by the commit at 12: what follows that commit.
        let added = RoundShare {
            entries: Some(13..=15),
            ..all
        };
        assert_eq!(share(member(12, None)), added);
        // Added by the round's last entry: nothing yet.
        let none = RoundShare {
            entries: None,
            ..added
        };
        assert_eq!(share(member(15, None)), none);
        // Removed by the commit at 13: up to it, told so, and no more.
        let removed = RoundShare {
            entries: Some(11..=13),
            removed: Some(13),
            stop: true,
        };
        assert_eq!(share(member(3, Some(13))), removed);
        // Removed by the round's last entry.
        let last = RoundShare {
            entries: Some(11..=15),
            removed: Some(15),
            stop: true,
        };
        assert_eq!(share(member(3, Some(15))), last);
        // Removed earlier (its Unwatched already went out): nothing.
        let gone = RoundShare {
            entries: None,
            removed: None,
            stop: true,
        };
        assert_eq!(share(member(3, Some(9))), gone);
        // Added and removed within the round.
        let brief = RoundShare {
            entries: Some(13..=14),
            removed: Some(14),
            stop: true,
        };
        assert_eq!(share(member(12, Some(14))), brief);
    }

    /// Found by the `stored_records` fuzz target: stored state whose JSON
    /// openmls' storage cannot decode made it panic.
    #[test]
    fn undecodable_stored_state_is_an_error_not_a_panic() {
        let bytes = include_bytes!("../../fuzz/regressions/stored_records/undecodable-tree-json");
        assert!(matches!(
            restore_state_for_fuzzing(bytes),
            Err(StoreError::Corrupt(_))
        ));
        assert!(restore_state_for_fuzzing(&[]).is_err());
    }
}
