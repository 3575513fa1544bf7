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
//! The DS follows each group with openmls `PublicGroup` (module `state`): it sees every
//! handshake message in the clear (PublicMessage), verifies the sender's
//! signature and membership and the epoch, and learns the membership from
//! the tree. It never has a key that opens an application message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use huddle_core::policy::{Capability, Policy, PolicyError};
use huddle_core::proto::{ErrorBody, ErrorCode};
use huddle_core::GroupId;
use tokio::sync::{mpsc, oneshot};

use crate::config::ServerConfig;
use crate::store::{MemberRecord, Store};
use crate::writer::Writer;

mod actor;
mod cluster;
mod fanout;
mod state;
mod validate;

pub use crate::subscriber::{Signals, Subscriber};
pub use actor::spawn;
use actor::{Actor, Changes};
use fanout::Tail;
#[cfg(any(test, feature = "fuzzing"))]
pub use state::restore_state_for_fuzzing;
pub use state::validate_new_group;
use state::MlsState;
use validate::{process_handshake, HandshakeLimits};

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
    /// The group's policy at `epoch` (`None`: a group made before
    /// policies, where every member may do everything).
    pub policy: Option<Arc<Policy>>,
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

    /// `Ok` if `principal`, a current member, may post an application
    /// message with additional authenticated data `aad` (its role allows
    /// it; PROTOCOL.md 13.10).
    pub fn check_message(&self, principal: &str, aad: &[u8]) -> Result<(), ErrorBody> {
        huddle_core::policy::check_message(
            self.policy.as_deref(),
            huddle_core::devices::user_part(principal),
            aad,
        )
        .map_err(policy_error)
    }

    /// `Ok` if `principal`, a current member, may upload media to the
    /// group (its role allows it).
    pub fn check_upload(&self, principal: &str) -> Result<(), ErrorBody> {
        match &self.policy {
            Some(p) => p
                .require(
                    huddle_core::devices::user_part(principal),
                    Capability::Upload,
                )
                .map_err(policy_error),
            None => Ok(()),
        }
    }

    /// Whether `principal` may join by an external commit: it is not a
    /// current member, and another device of its user is.
    pub fn may_join(&self, principal: &str) -> bool {
        let user = huddle_core::devices::user_part(principal);
        !self.is_member(principal)
            && self.members.iter().any(|(p, m)| {
                m.is_current() && p != principal && huddle_core::devices::user_part(p) == user
            })
    }
}

/// The error a policy refusal is sent as.
pub(crate) fn policy_error(e: PolicyError) -> ErrorBody {
    let code = match e {
        PolicyError::Forbidden(_) => ErrorCode::Forbidden,
        PolicyError::Invalid(_) | PolicyError::Malformed(_) => ErrorCode::InvalidMessage,
    };
    ErrorBody::new(code, e.to_string())
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
        /// A proof of holding an invite (for a user that is not a member).
        invite: Option<Bytes>,
        reply: oneshot::Sender<JoinInfoResult>,
    },
    /// Cluster mode: compare the head with the database's, and read the
    /// group anew if another node wrote it.
    Refresh {
        reply: oneshot::Sender<()>,
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
            Cmd::Refresh { .. } => f.write_str("Refresh"),
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

/// The message of a post refused because another DS node had written the
/// group since this node's task last read it: the task has read it anew,
/// and the post may be sent again.
pub const STALE: &str = "the group changed on another node; send it again";

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
    /// current member who lost its group state, a device of a member's
    /// user, or a holder of an invite (`invite`: its proof).
    pub async fn join_info(&self, user: String, invite: Option<Bytes>) -> JoinInfoResult {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::JoinInfo {
                user,
                invite,
                reply,
            })
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

    /// Cluster mode: brings the task up to the database (another node may
    /// have written the group); returns once it has looked.
    pub async fn refresh(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Cmd::Refresh { reply }).await.is_ok() {
            let _ = rx.await;
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
    /// Cluster mode: the bus to the other nodes.
    pub bus: Option<Arc<crate::bus::Bus>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// Why a group could not be created.
#[derive(Debug)]
pub struct CreateError(pub ErrorBody);
