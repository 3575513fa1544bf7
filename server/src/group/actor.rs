//! The group's task: takes commands from its queue in rounds, validates
//! the posts of a round, writes them in one durable write, then answers
//! the posters and pushes the entries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use huddle_core::proto::{self, EntryKind, ErrorBody, ErrorCode, Event, LogEntry};
use huddle_core::GroupId;
use openmls::prelude::{tls_codec::Serialize as _, *};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::store::{GroupMeta, GroupWrite, MemberRecord, NewInboxItem, StoreError};

use super::cluster::Feed;
use super::{
    process_handshake, stopped, Cmd, GroupHandle, GroupView, HandshakeLimits, JoinInfo,
    JoinInfoResult, MlsState, PostResult, Shared, Subscriber, Tail, WatchResult,
};

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
            policy: mls.policy.clone(),
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
        busy: None,
    };
    *handle.task.lock().expect("task lock") = Some(tokio::spawn(actor.run(rx)));
    Ok(handle)
}

pub(super) struct Actor {
    pub(super) id: GroupId,
    pub(super) meta: GroupMeta,
    /// `None` only while a blocking step owns it.
    pub(super) mls: Option<MlsState>,
    /// Snapshot matching `meta`, to roll back to if a write fails.
    pub(super) durable_state: Vec<u8>,
    pub(super) handle: std::sync::Weak<GroupHandle>,
    pub(super) shared: Shared,
    /// The newest entries, for watchers that are only a little behind.
    pub(super) tail: Tail,
    pub(super) subscribers: HashMap<u64, Subscriber>,
    /// Newest durable GroupInfo: (epoch, bytes).
    pub(super) group_info: Option<(u64, Bytes)>,
    /// Held from the writer's last answer until the next write is handed
    /// in or the queue is found empty (the writer waits for busy tasks).
    pub(super) busy: Option<crate::writer::Busy>,
}

/// An accepted post waiting for its write.
pub(super) struct Accepted {
    pub(super) reply: oneshot::Sender<PostResult>,
    pub(super) entry: LogEntry,
    /// The group's epoch right after this entry.
    pub(super) epoch: u64,
}

/// What a round of validated posts changes besides the log.
#[derive(Default)]
pub(super) struct Changes {
    pub(super) members: Vec<(String, MemberRecord)>,
    pub(super) welcomes: Vec<NewInboxItem>,
    pub(super) trees: Vec<(u64, Bytes)>,
    pub(super) state_changed: bool,
    pub(super) compact_upto: Option<u64>,
    pub(super) group_info: Option<(u64, Bytes)>,
    /// Answered once the new GroupInfo is durable.
    pub(super) info_replies: Vec<oneshot::Sender<PostResult>>,
}

impl Actor {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut cmds = Vec::with_capacity(256);
        let mut joins = Vec::new();
        let mut refreshes = Vec::new();
        let mut stopping = false;
        let mut feed = self.shared.bus.as_ref().map(|bus| {
            Feed::start(
                bus.clone(),
                self.id,
                self.shared.config.cluster_poll,
                self.shared.config.cluster_poll_connected,
            )
        });
        while !stopping {
            if rx.is_empty() {
                // Nothing to hand in soon: the writer need not wait.
                self.busy = None;
            }
            let received = match &mut feed {
                None => rx.recv_many(&mut cmds, 256).await,
                Some(feed) => {
                    tokio::select! {
                        biased;
                        n = rx.recv_many(&mut cmds, 256) => n,
                        hint = feed.next() => {
                            self.follow(hint).await;
                            continue;
                        }
                    }
                }
            };
            if received == 0 {
                break;
            }
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
                    Cmd::JoinInfo {
                        user,
                        invite,
                        reply,
                    } => joins.push((user, invite, reply)),
                    Cmd::Refresh { reply } => refreshes.push(reply),
                    Cmd::Stop => stopping = true,
                }
            }
            if !accepted.is_empty()
                || changes.compact_upto.is_some()
                || changes.group_info.is_some()
            {
                crate::metrics::COUNTERS.round(accepted.len());
                self.commit(view, start_head, accepted, changes).await;
            }
            if !refreshes.is_empty() {
                use super::cluster::Hint;
                self.follow(Hint::Poll).await;
                for r in refreshes.drain(..) {
                    let _ = r.send(());
                }
            }
            // Answered from durable state only.
            for (user, invite, reply) in joins.drain(..) {
                let _ = reply.send(self.join_info(&user, invite.as_deref()));
            }
            if let Some(h) = self.handle.upgrade() {
                h.watchers
                    .store(self.subscribers.len(), std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// The durable GroupInfo, if it is for the current epoch, with the tree.
    pub(super) fn join_info(&self, user: &str, invite: Option<&[u8]>) -> JoinInfoResult {
        let Some(handle) = self.handle.upgrade() else {
            return Err(stopped());
        };
        let view = handle.view();
        let mls = self.mls.as_ref().expect("mls state present");
        if let Some(proof) = invite {
            // A holder of an invite: it must be in force and not used up.
            let policy = mls.policy.as_deref().ok_or_else(|| {
                ErrorBody::new(ErrorCode::Forbidden, "this group takes no invites")
            })?;
            let now = (self.shared.now_ms)();
            let i =
                huddle_core::policy::check_info_proof(policy, self.id.as_bytes(), proof, user, now)
                    .map_err(super::policy_error)?;
            check_uses(mls, i)?;
        } else if !view.is_member(user) && !view.may_join(user) {
            return Err(ErrorBody::new(
                ErrorCode::NotMember,
                format!("{user} is not a member of group {}", self.id),
            ));
        }
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

    /// Processes a proposal or commit with the public group, in a blocking
    /// task (a commit in a 1,000-member group costs milliseconds of CPU).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn handshake(
        &mut self,
        view: &mut GroupView,
        user: &str,
        pm: ProtocolMessage,
        kind: EntryKind,
        welcome: Option<Bytes>,
        seq: u64,
        changes: &mut Changes,
    ) -> Result<(), ErrorBody> {
        // Milliseconds of work for a large group: the writer must not wait
        // for this task's write meanwhile.
        self.busy = None;
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
            let identity_key = |name: &str| store.user(name).map(|u| u.map(|u| u.identity_key));
            let r = process_handshake(
                &mut mls,
                &identity_key,
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
        view.policy = mls.policy.clone();
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

    pub(super) fn watch(
        &mut self,
        durable: &GroupView,
        sub: Subscriber,
        after: u64,
    ) -> WatchResult {
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

    /// Writes a round, then answers its posters and pushes its entries.
    pub(super) async fn commit(
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
        // Cluster mode: what the notice of this round carries.
        let write_entries = match &self.shared.bus {
            Some(_) => write.entries.clone(),
            None => Vec::new(),
        };
        let (written, busy) = self.shared.writer.write_next(write, self.busy.take()).await;
        self.busy = Some(busy);
        match written {
            Ok(inbox_items) => {
                self.meta = meta;
                if let Some(s) = state {
                    self.durable_state = s;
                }
                let Some(handle) = self.handle.upgrade() else {
                    return;
                };
                *handle.view.write().expect("view lock") = view.clone();
                let info_published = changes.group_info.is_some();
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
                if let Some(bus) = &self.shared.bus {
                    let info = info_published;
                    if !write_entries.is_empty() || info {
                        bus.publish_round(&self.id, view.head, &write_entries, info);
                    }
                }
                self.push(&view, frames);
                for (reply, seq, epoch) in replies {
                    let _ = reply.send(Ok((seq, epoch)));
                }
                for (w, seq) in changes.welcomes.into_iter().zip(inbox_items) {
                    if let Some(bus) = &self.shared.bus {
                        bus.publish_inbox(&w.user, seq);
                    }
                    self.shared.inboxes.deliver(self.id, w, seq);
                }
                if !changes.members.is_empty() {
                    info!(group = %self.id, epoch = view.epoch, members = view.current_members().len(), "membership changed");
                }
            }
            Err(StoreError::Conflict(detail)) => {
                // The database holds a newer state of the group than this
                // task (another node wrote it): read it anew (which also
                // pushes what this task's watchers missed), and have the
                // round's posts sent again, to be checked against it.
                // Expected in cluster mode whenever members post to one
                // group through several nodes at once: not a warning.
                debug!(group = %self.id, %detail, "the stored group is newer than this task's; reading it anew");
                if let Ok(mls) = MlsState::restore(&self.id, &self.durable_state) {
                    self.mls = Some(mls);
                }
                self.reload().await;
                let body = ErrorBody::new(ErrorCode::Unavailable, super::STALE);
                for a in accepted {
                    let _ = a.reply.send(Err(body.clone()));
                }
                for r in changes.info_replies {
                    let _ = r.send(Err(body.clone()));
                }
            }
            Err(e) => {
                warn!(group = %self.id, error = %e, "write failed; rolling back");
                let body = ErrorBody::from(e);
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
}

/// `Ok` unless invite `i` admitted as many users as it may.
pub(super) fn check_uses(mls: &MlsState, i: &huddle_core::policy::Invite) -> Result<(), ErrorBody> {
    if i.max_uses > 0 && mls.invite_uses(&i.key) >= i.max_uses {
        return Err(ErrorBody::new(
            ErrorCode::Forbidden,
            format!(
                "the invite was used up ({} of {} uses)",
                mls.invite_uses(&i.key),
                i.max_uses
            ),
        ));
    }
    Ok(())
}
