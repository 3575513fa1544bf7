//! Validation of posts: application messages by their envelope, proposals
//! and commits by the public MLS state (sender, signature, epoch, the
//! proposals allowed, leaf and tree limits, Welcome routing). No I/O:
//! identity keys are looked up through a function passed in.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use huddle_core::mls::{principal_of, MAX_PAST_EPOCHS};
use huddle_core::proto::{EntryKind, ErrorBody, ErrorCode, LogEntry};
use openmls::prelude::{tls_codec::Deserialize as _, tls_codec::Serialize as _, *};
use openmls_rust_crypto::RustCrypto;

use crate::store::{MemberRecord, NewInboxItem, StoreError};

use super::{policy_error, Actor, Changes, GroupView, MlsState, Post};

impl Actor {
    /// Checks a GroupInfo published by `user`: it names this group and its
    /// current epoch, carries the external public key a rejoining member
    /// needs, is signed with `user`'s leaf key, and its group context is
    /// exactly the one the DS tracks. (The DS cannot check the confirmation
    /// tag or the external key, which derive from secrets it never has; a
    /// member who publishes a bad one makes the rejoin fail, which the
    /// rejoining member detects.) Returns the epoch.
    pub(super) fn check_group_info(
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
        let leaf = mls
            .public
            .members()
            .find(|m| principal_of(&m.credential).as_deref() == Some(user))
            .ok_or_else(|| invalid(format!("{user} has no leaf in the group")))?;
        // The signer named inside must be the publisher's own leaf: a
        // rejoining member verifies the signature with that leaf's key.
        if huddle_core::mls::group_info_signer(bytes) != Some(leaf.index.u32()) {
            return Err(invalid(
                "the GroupInfo's signer is not the publishing member's leaf".into(),
            ));
        }
        let key = leaf.signature_key;
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

    /// Validates one post against the working view; on success returns the
    /// log entry (and records side effects in `changes`).
    pub(super) async fn validate(
        &mut self,
        view: &mut GroupView,
        user: &str,
        post: Post,
        seq: u64,
        changes: &mut Changes,
    ) -> Result<LogEntry, ErrorBody> {
        // A device of a member's user, or a holder of an invite, joins by
        // an external commit (checked in `process_handshake`).
        let invites = view
            .policy
            .as_ref()
            .is_some_and(|p| !p.invites().is_empty());
        let joining = matches!(post, Post::Commit { .. }) && (view.may_join(user) || invites);
        if !view.is_member(user) && !joining {
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
                // The poster's role must let it send this (PROTOCOL.md
                // 13.10); the kind is in the authenticated data, which the
                // DS reads and the members check against the content.
                let ProtocolMessage::PrivateMessage(private) = &pm else {
                    return Err(invalid("expected a PrivateMessage".into()));
                };
                view.check_message(user, private.aad())?;
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
            }
        }
        Ok(LogEntry {
            seq,
            epoch: msg_epoch,
            kind,
            timestamp_ms: now,
            data,
        })
    }
}

/// What an accepted commit changes.
pub(super) struct HandshakeOutcome {
    pub(super) epoch: u64,
    pub(super) members: Vec<(String, MemberRecord)>,
    pub(super) welcomes: Vec<NewInboxItem>,
    pub(super) tree: Option<(u64, Bytes)>,
}

/// The limits a handshake is checked against.
#[derive(Debug, Clone, Copy)]
pub(super) struct HandshakeLimits {
    pub(super) max_leaf_node: usize,
    pub(super) max_pending_proposals: usize,
}

/// Looks up a registered user's identity key (`None`: no such user).
pub(super) type IdentityLookup<'a> = dyn Fn(&str) -> Result<Option<[u8; 32]>, StoreError> + 'a;

#[allow(clippy::too_many_arguments)]
pub(super) fn process_handshake(
    mls: &mut MlsState,
    identity_key: &IdentityLookup<'_>,
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
    if sender_leaf.is_some() && !view.is_member(user) {
        return Err(ErrorBody::new(
            ErrorCode::NotMember,
            format!("{user} is not a member of this group"),
        ));
    }
    let aad = processed.aad().to_vec();
    if principal_of(processed.credential()).as_deref() != Some(user) {
        return Err(invalid(
            "the message is signed by another member than the authenticated user".into(),
        ));
    }
    let identity_of = |name: &str| -> Result<[u8; 32], ErrorBody> {
        match identity_key(name) {
            Ok(Some(k)) => Ok(k),
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
        if principal_of(leaf.credential()).as_deref() != Some(expect) {
            return Err(invalid(format!(
                "a leaf must keep the credential of {expect}"
            )));
        }
        if leaf.signature_key().as_slice() != identity_of(expect)?.as_slice() {
            return Err(invalid(format!(
                "the signature key of {expect}'s leaf is not its registered identity key"
            )));
        }
        huddle_core::mls::check_capabilities(leaf.capabilities())
            .map_err(|e| invalid(format!("{expect}'s leaf: {e}")))?;
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
            let queued_now = mls
                .public
                .queued_proposals(&mls.storage)
                .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("{e:?}")))?;
            if let (Proposal::Remove(r), Some(policy)) = (queued.proposal(), mls.policy.as_deref())
            {
                let pending = queued_now.iter().filter_map(|(_, q)| match q.proposal() {
                    Proposal::Remove(r) => Some(r.removed().u32()),
                    _ => None,
                });
                huddle_core::policy::check_remove_proposal(
                    policy,
                    &leaves(mls),
                    user,
                    r.removed().u32(),
                    pending,
                )
                .map_err(policy_error)?;
            }
            let pending = queued_now.len();
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
            // Only the proposal types Huddle uses (PROTOCOL.md 13.4); an
            // external_init only in an external commit, which openmls checks.
            for q in staged.queued_proposals() {
                match q.proposal() {
                    Proposal::Add(_)
                    | Proposal::Update(_)
                    | Proposal::Remove(_)
                    | Proposal::GroupContextExtensions(_)
                    | Proposal::ExternalInit(_) => {}
                    other => {
                        return Err(invalid(format!(
                            "a commit may not carry a proposal of type {:?} (PROTOCOL.md 13.4)",
                            other.proposal_type()
                        )))
                    }
                }
            }
            // Leaf index -> user, before the commit.
            let by_leaf: HashMap<u32, String> = mls
                .public
                .members()
                .filter_map(|m| principal_of(&m.credential).map(|u| (m.index.u32(), u)))
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
            let joins = sender_leaf.is_none() && !view.is_member(user);
            if joins {
                // A device of a member's user joins (the caller checked
                // that another device of its user is a member): its own
                // leaf and nothing else.
                if staged.remove_proposals().next().is_some()
                    || staged.add_proposals().next().is_some()
                    || staged.update_proposals().next().is_some()
                    || welcome.is_some()
                {
                    return Err(invalid(
                        "an external commit by a joining device may only add that device".into(),
                    ));
                }
                let leaf = staged
                    .update_path_leaf_node()
                    .ok_or_else(|| invalid("an external commit needs a path".into()))?;
                check_leaf(leaf, user)?;
                if !names.insert(user.to_owned()) {
                    return Err(invalid(format!("{user} is already a member")));
                }
            } else if sender_leaf.is_none() {
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
            let group: [u8; 16] = mls
                .public
                .group_id()
                .as_slice()
                .try_into()
                .map_err(|_| invalid("a group id of another length".into()))?;
            let group = &group;
            let facts = huddle_core::policy::check_staged_commit(
                mls.policy.as_deref(),
                &leaves(mls),
                user,
                &staged,
                huddle_core::policy::Context {
                    group,
                    aad: &aad,
                    now_ms: now,
                },
            )
            .map_err(|e| match e {
                // Not a member, and no invite: as for any other non-member.
                huddle_core::policy::PolicyError::Forbidden(m)
                    if joins_unasked(view, user)
                        && !aad.starts_with(huddle_core::policy::AAD_INVITE) =>
                {
                    ErrorBody::new(ErrorCode::NotMember, m)
                }
                e => policy_error(e),
            })?;
            if let Some(i) = &facts.invite {
                super::actor::check_uses(mls, i)?;
            }
            let mut added = Vec::new();
            let mut added_refs = HashSet::new();
            let mut ref_of: HashMap<String, Vec<u8>> = HashMap::new();
            for a in staged.add_proposals() {
                let kp = a.add_proposal().key_package();
                let name = principal_of(kp.leaf_node().credential())
                    .ok_or_else(|| invalid("an added member has no valid user name".into()))?;
                if let Err(span) = huddle_core::mls::check_lifetime_span(kp.life_time()) {
                    return Err(invalid(format!(
                        "the key package adding {name} is valid for {span} s, longer than {} s",
                        huddle_core::mls::MAX_KEY_PACKAGE_LIFETIME_SECS
                    )));
                }
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
                let split = huddle_core::welcome::split(bytes)
                    .map_err(|e| invalid(format!("Welcome: {e}")))?;
                shared_part = split.shared;
                per_member = split.own.into_iter().collect();
            }
            let old_epoch = mls.public.group_context().epoch().as_u64();
            mls.public
                .merge_commit(&mls.storage, *staged)
                .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("merge: {e:?}")))?;
            let epoch = mls.public.group_context().epoch().as_u64();
            debug_assert_eq!(epoch, old_epoch + 1);
            // The policy of the new epoch, as checked above.
            mls.set_policy(facts.after.clone());
            if let Some(i) = &facts.invite {
                *mls.invite_uses.entry(i.key).or_default() += 1;
            }
            let after: HashSet<String> = mls
                .public
                .members()
                .filter_map(|m| principal_of(&m.credential))
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
            if joins {
                members.push((
                    user.to_owned(),
                    MemberRecord {
                        joined_seq: seq,
                        removed_seq: None,
                        removed_ms: None,
                    },
                ));
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

/// Whether `principal` joining by external commit is neither a device of
/// a member's user nor a current member.
fn joins_unasked(view: &GroupView, principal: &str) -> bool {
    !view.is_member(principal) && !view.may_join(principal)
}

/// Each leaf's principal.
fn leaves(mls: &MlsState) -> HashMap<u32, String> {
    huddle_core::policy::leaves_of(mls.public.members())
}
