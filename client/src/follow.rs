//! Following a group: what one log entry does to this device's MLS state
//! and group row, which events it shows, whether this device must commit
//! pending proposals (the designated-committer rule), and the signs of a
//! fork. No database, network or clock: the MLS provider, what must be
//! remembered beyond the MLS state ([`Memory`]) and the time come in as
//! arguments, so every rule here is tested without a server.

use std::collections::HashSet;

use huddle_core::devices::{parse_principal, user_part};
use huddle_core::mls::principal_of;
use huddle_core::policy::{Policy, Role};
use huddle_core::proto::{EntryKind, LogEntry};
use huddle_core::GroupId;
use openmls::prelude::{tls_codec::Deserialize as _, *};

use crate::app::{AppMessage, MediaInfo};
use crate::db::groups::{GroupRow, GroupState};
use crate::error::{ClientError, Result};
use crate::event::{Event, EventKind};

/// How long pending proposals wait for the designated committer before any
/// remaining member commits them.
pub const PROPOSAL_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// What following a group must remember beyond the MLS state.
pub trait Memory {
    /// Remembers identity keys seen for the first time (trust on first
    /// use); returns the users whose key differs from the one remembered.
    fn keys_seen(&mut self, keys: &[(String, Vec<u8>)]) -> Result<Vec<String>>;
    /// Records a media item announced in group `id`, so that its key can be
    /// found when it is downloaded.
    fn media_announced(&mut self, id: &GroupId, info: &MediaInfo) -> Result<()>;
    /// Checks that `key` is the key of `principal`, a device (N ≥ 2) of
    /// its user, in that user's device log: [`ClientError::NeedDevices`]
    /// when the log must be fetched first, [`ClientError::DeviceRefused`]
    /// when the log does not certify it.
    fn check_device(&mut self, principal: &str, key: &[u8]) -> Result<()>;
}

/// Applies one log entry (the next in sequence, not this device's own) to
/// the group's MLS state and row, and returns the events it shows.
///
/// Another member's commit voids this device's own pending one; a commit
/// that removes this device (or that it cannot follow) ends its
/// membership; a commit that leaves out this device's leave proposal makes
/// it void, flagged in `row.releave` so that it is made again.
pub fn apply<P: OpenMlsProvider>(
    provider: &P,
    group: &mut MlsGroup,
    row: &mut GroupRow,
    id: &GroupId,
    me: &str,
    entry: &LogEntry,
    memory: &mut dyn Memory,
) -> Result<Vec<Event>> {
    let gid = id.to_string();
    let gid = gid.as_str();
    let msg = MlsMessageIn::tls_deserialize_exact(entry.data.as_ref()).map_err(ClientError::mls)?;
    let pm = msg.try_into_protocol_message().map_err(ClientError::mls)?;
    if entry.kind == EntryKind::Commit && group.pending_commit().is_some() {
        // Another member's commit won this epoch: ours is void.
        group
            .clear_pending_commit(provider.storage())
            .map_err(ClientError::mls)?;
        row.pending_commit = None;
    }
    // The rules of the group as they stand before this entry (PROTOCOL.md
    // 13.10): whatever the DS let through, this device applies them itself.
    let policy = policy_of(group)?;
    // Each leaf's principal, for handshakes only (an application message
    // in a large group should not cost a walk of the tree).
    let leaves_before = if entry.kind == EntryKind::Application {
        Default::default()
    } else {
        huddle_core::policy::leaves_of(group.members())
    };
    let processed = group
        .process_message(provider, pm)
        .map_err(ClientError::mls)?;
    let from = principal_of(processed.credential()).unwrap_or_else(|| "?".into());
    let processed_sender = processed.sender().clone();
    let aad = processed.aad().to_vec();
    let mut events = Vec::new();
    let ev = |kind: EventKind| Event::new(kind, gid, &from, entry.seq, entry.timestamp_ms);
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(app) => {
            let msg = AppMessage::decode(&app.into_bytes()).map_err(ClientError::Mls)?;
            // The kind the DS checked (in the authenticated data) must be
            // the kind of the content, and the sender's role must allow it.
            if !msg.kind_matches(&aad) {
                return Err(ClientError::Policy(format!(
                    "a message from {from} whose authenticated data does not match its content"
                )));
            }
            huddle_core::policy::check_message(policy.as_ref(), user_part(&from), &aad)?;
            match &msg {
                // The name the group had when this device joined stays
                // until a member whose role may rename it does.
                AppMessage::GroupName { name } if row.name.is_empty() => row.name = name.clone(),
                AppMessage::GroupName { .. } => {}
                AppMessage::Rename { name } => {
                    crate::client::check_group_name(name)?;
                    row.name = name.clone();
                }
                AppMessage::Media(info) => memory.media_announced(id, info)?,
                AppMessage::Text { .. } => {}
            }
            events.extend(app_event(&msg, id, &from, entry.seq, entry.timestamp_ms));
        }
        ProcessedMessageContent::ProposalMessage(p) => {
            if let (Proposal::Remove(r), Some(policy)) = (p.proposal(), policy.as_ref()) {
                let pending = group
                    .pending_proposals()
                    .filter_map(|q| match q.proposal() {
                        Proposal::Remove(r) => Some(r.removed().u32()),
                        _ => None,
                    });
                huddle_core::policy::check_remove_proposal(
                    policy,
                    &leaves_before,
                    &from,
                    r.removed().u32(),
                    pending,
                )?;
            }
            group
                .store_pending_proposal(provider.storage(), *p)
                .map_err(ClientError::mls)?;
            if row.proposals_since_ms.is_none() {
                row.proposals_since_ms = Some(entry.timestamp_ms);
            }
        }
        ProcessedMessageContent::StagedCommitMessage(staged) => {
            let mut removed = Vec::new();
            let mut left = Vec::new();
            let mut rejoined = Vec::new();
            for q in staged.queued_proposals() {
                let Proposal::Remove(r) = q.proposal() else {
                    continue;
                };
                let leaf = r.removed();
                let Some(name) = group
                    .member_at(leaf)
                    .and_then(|m| principal_of(&m.credential))
                else {
                    continue;
                };
                if leaves_itself(group, q, leaf, &name) {
                    left.push(name);
                } else if matches!(q.sender(), Sender::NewMemberCommit) && name == from {
                    // An external commit replacing the sender's own
                    // leaf: a member rejoining with new state.
                    rejoined.push(name);
                } else {
                    removed.push(name);
                }
            }
            let added_keys: Vec<(String, Vec<u8>)> = staged
                .add_proposals()
                .filter_map(|a| {
                    let leaf = a.add_proposal().key_package().leaf_node();
                    principal_of(leaf.credential())
                        .map(|u| (u, leaf.signature_key().as_slice().to_vec()))
                })
                .collect();
            let mut added_keys = added_keys;
            // A device joining by itself (an external commit that replaces
            // no leaf of its own).
            let joined_device =
                matches!(processed_sender, Sender::NewMemberCommit) && !rejoined.contains(&from);
            if joined_device {
                if let Some(leaf) = staged.update_path_leaf_node() {
                    added_keys.push((from.clone(), leaf.signature_key().as_slice().to_vec()));
                }
            }
            // A device other than a user's first must be in its user's
            // device log with that key: a DS cannot slip in a device of its
            // own making.
            for (p, key) in &added_keys {
                if parse_principal(p).is_some_and(|(_, n)| n != 1) {
                    memory.check_device(p, key)?;
                }
            }
            let facts = huddle_core::policy::check_staged_commit(
                policy.as_ref(),
                &leaves_before,
                &from,
                &staged,
                huddle_core::policy::Context {
                    group: id.as_bytes(),
                    aad: &aad,
                    now_ms: entry.timestamp_ms,
                },
            )?;
            let policy_after = facts.after;
            let invite = facts.invite;
            let added: Vec<String> = added_keys.iter().map(|(u, _)| u.clone()).collect();
            let changed = memory.keys_seen(&added_keys)?;
            let self_removed = staged.self_removed();
            let users_before = users_of(group);
            group
                .merge_staged_commit(provider, *staged)
                .map_err(ClientError::mls)?;
            row.proposals_since_ms = None;
            let epoch = group.epoch().as_u64();
            let users_after = users_of(group);
            if !changed.is_empty() {
                events.push(ev(EventKind::KeyChanged { members: changed }));
            }
            // Users new to the group, and devices of users already in it.
            let (devices_added, users_added): (Vec<String>, Vec<String>) = added
                .into_iter()
                .partition(|p| users_before.contains(user_part(p)));
            let users_added = dedup_users(users_added);
            match &invite {
                Some(i) if !users_added.is_empty() => events.push(ev(EventKind::JoinedByInvite {
                    members: users_added,
                    invite: i.id(),
                    epoch,
                })),
                _ if !users_added.is_empty() => events.push(ev(EventKind::MemberAdded {
                    members: users_added,
                    epoch,
                })),
                _ => {}
            }
            if !devices_added.is_empty() {
                events.push(ev(EventKind::DeviceAdded {
                    members: devices_added,
                    epoch,
                }));
            }
            // Devices removed while their user stays, and users gone.
            let (devices_removed, users_removed): (Vec<String>, Vec<String>) = removed
                .into_iter()
                .partition(|p| users_after.contains(user_part(p)));
            let users_removed = dedup_users(users_removed);
            if !users_removed.is_empty() {
                events.push(ev(EventKind::MemberRemoved {
                    members: users_removed,
                    epoch: Some(epoch),
                    text: None,
                }));
            }
            if !devices_removed.is_empty() {
                events.push(ev(EventKind::DeviceRemoved {
                    members: devices_removed,
                    epoch,
                }));
            }
            if let (Some(before), Some(after)) = (&policy, &policy_after) {
                events.extend(
                    policy_events(before, after, &users_after, epoch)
                        .into_iter()
                        .map(ev),
                );
            }
            if !rejoined.is_empty() {
                events.push(ev(EventKind::Rejoined {
                    members: rejoined,
                    epoch,
                    text: None,
                }));
            }
            if !left.is_empty() {
                let (partly, gone): (Vec<String>, Vec<String>) = left
                    .iter()
                    .cloned()
                    .partition(|p| users_after.contains(user_part(p)));
                let gone = dedup_users(gone);
                let from = gone.first().or(partly.first()).cloned().unwrap_or_default();
                let members = gone.into_iter().chain(partly).collect();
                let mut e = ev(EventKind::Left {
                    members,
                    epoch: Some(epoch),
                    text: None,
                });
                e.from = from;
                events.push(e);
            }
            if self_removed || !group.is_active() {
                row.state = if left.iter().any(|l| l == me) {
                    GroupState::Left
                } else {
                    GroupState::Removed
                };
            } else if row.state == GroupState::Leaving {
                // Our leave proposal was not part of this commit: it is
                // void in the new epoch and must be made again.
                row.state = GroupState::Active;
                row.proposals_since_ms = None;
                row.releave = true;
            }
        }
        _ => {}
    }
    Ok(events)
}

/// The policy group `g`'s context carries (`None`: a group made before
/// policies).
pub fn policy_of(g: &MlsGroup) -> Result<Option<Policy>> {
    Ok(Policy::from_extensions(g.extensions())?)
}

/// The events a change of policy shows as: each new role (of users who
/// stay), and the settings if they changed.
fn policy_events(
    before: &Policy,
    after: &Policy,
    users_after: &HashSet<String>,
    epoch: u64,
) -> Vec<EventKind> {
    let mut by_role: std::collections::BTreeMap<Role, Vec<String>> = Default::default();
    let named: std::collections::BTreeSet<&str> = before
        .roles()
        .chain(after.roles())
        .map(|(u, _)| u)
        .collect();
    for u in named {
        let to = after.role(u);
        if users_after.contains(u) && before.role(u) != to {
            by_role.entry(to).or_default().push(u.to_owned());
        }
    }
    let mut out: Vec<EventKind> = by_role
        .into_iter()
        .rev()
        .map(|(role, members)| EventKind::RoleChanged {
            members,
            role: role.name().to_owned(),
            epoch,
        })
        .collect();
    if before.settings != after.settings {
        out.push(EventKind::PolicyChanged {
            text: after.settings.to_string(),
            epoch,
        });
    }
    out
}

/// What an application message shows as: `text`, `media` and `renamed`
/// events; a group's name for joiners shows as nothing.
pub fn app_event(msg: &AppMessage, id: &GroupId, from: &str, seq: u64, ts: u64) -> Option<Event> {
    let kind = match msg {
        AppMessage::Text { text } => EventKind::Text { text: text.clone() },
        AppMessage::Media(info) => EventKind::Media {
            media_id: hex::encode(info.media_id),
            name: info.name.clone(),
            size: info.size,
            mime: info.mime.clone(),
            text: info.caption.clone(),
        },
        AppMessage::Rename { name } => EventKind::Renamed { name: name.clone() },
        AppMessage::GroupName { .. } => return None,
    };
    Some(Event::new(kind, &id.to_string(), from, seq, ts))
}

/// Whether the removal of `leaf` (principal `name`) by proposal `q` is its
/// user leaving: proposed by that leaf itself, or proposed (not committed
/// inline) by another device of the same user, which leaves with all its
/// user's devices. A device of the user that removes another in a commit
/// of its own (a revocation) is not a leaving.
pub(crate) fn leaves_itself(
    group: &MlsGroup,
    q: &QueuedProposal,
    leaf: LeafNodeIndex,
    name: &str,
) -> bool {
    match q.sender() {
        Sender::Member(s) if *s == leaf => true,
        Sender::Member(s) => {
            q.proposal_or_ref_type() == ProposalOrRefType::Reference
                && group
                    .member_at(*s)
                    .and_then(|m| principal_of(&m.credential))
                    .is_some_and(|p| user_part(&p) == user_part(name))
        }
        _ => false,
    }
}

/// The users with a leaf in `group`.
fn users_of(group: &MlsGroup) -> HashSet<String> {
    group
        .members()
        .filter_map(|m| principal_of(&m.credential))
        .map(|p| user_part(&p).to_owned())
        .collect()
}

/// The users of `principals`, each once, in order.
fn dedup_users(principals: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in principals {
        let u = user_part(&p);
        if !out.iter().any(|o| o == u) {
            out.push(u.to_owned());
        }
    }
    out
}

pub fn member_keys(group: &MlsGroup) -> Vec<(String, Vec<u8>)> {
    group
        .members()
        .filter_map(|m| principal_of(&m.credential).map(|u| (u, m.signature_key.clone())))
        .collect()
}

pub fn member_names(group: &MlsGroup) -> Vec<String> {
    member_devices(group).into_iter().map(|(u, _)| u).collect()
}

/// The users of a group, sorted, each with how many devices (leaves) it
/// has in it.
pub fn member_devices(group: &MlsGroup) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for m in group.members() {
        if let Some(p) = principal_of(&m.credential) {
            *counts.entry(user_part(&p).to_owned()).or_default() += 1;
        }
    }
    counts.into_iter().collect()
}

/// What a member must do about pending proposals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duty {
    /// None are pending.
    Nothing,
    /// Leave them to the designated committer (for now).
    Wait,
    /// Commit them.
    Commit,
}

/// The designated-committer rule: pending proposals are committed by the
/// member with the lowest leaf index that is not being removed, at once;
/// by any remaining member once they are [`PROPOSAL_GRACE`] old
/// (`proposals_since_ms` is when the oldest was appended), or when
/// `force`d. A member being removed never commits its own removal.
pub fn committer_duty(
    group: &MlsGroup,
    proposals_since_ms: Option<u64>,
    force: bool,
    now_ms: u64,
) -> Duty {
    if group.pending_proposals().next().is_none() {
        return Duty::Nothing;
    }
    let removing: HashSet<u32> = group
        .pending_proposals()
        .filter_map(|p| match p.proposal() {
            Proposal::Remove(r) => Some(r.removed().u32()),
            _ => None,
        })
        .collect();
    let designated = group
        .members()
        .map(|m| m.index.u32())
        .filter(|i| !removing.contains(i))
        .min();
    let mine = group.own_leaf_index().u32();
    let old = proposals_since_ms
        .is_some_and(|t| now_ms.saturating_sub(t) >= PROPOSAL_GRACE.as_millis() as u64);
    if removing.contains(&mine) || !(force || old || designated == Some(mine)) {
        Duty::Wait
    } else {
        Duty::Commit
    }
}

/// What the DS says of a group's log, for [`fork_signs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsGroupState {
    /// The group's current epoch.
    pub epoch: u64,
    /// The last log position.
    pub head: u64,
    /// The epoch of the GroupInfo the DS keeps, if any.
    pub group_info_epoch: Option<u64>,
}

/// Signs that this device's view of a group differs from the others'.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ForkSigns {
    /// Members that published another epoch authenticator for this epoch,
    /// and "the group (epoch N)" when this device is behind; sorted.
    pub differ: Vec<String>,
    /// This device read the whole log and is still not at the group's
    /// epoch: a commit it could not process.
    pub behind: bool,
    /// All is well, but the DS keeps no GroupInfo for the current epoch
    /// (this member should publish one).
    pub info_missing: bool,
}

/// Compares this device's epoch and epoch-authenticator hash with what the
/// other members published and with the DS's state of the group; `cursor`
/// is how far this device has read the log.
pub fn fork_signs(
    me: &str,
    epoch: u64,
    hash: &[u8; 32],
    published: Vec<(String, [u8; 32])>,
    cursor: u64,
    ds: Option<DsGroupState>,
) -> ForkSigns {
    let mut signs = ForkSigns {
        differ: published
            .into_iter()
            .filter(|(u, h)| u != me && h != hash)
            .map(|(u, _)| u)
            .collect(),
        ..ForkSigns::default()
    };
    if let Some(ds) = ds {
        if cursor >= ds.head && ds.epoch != epoch {
            signs.differ.push(format!("the group (epoch {})", ds.epoch));
            signs.behind = true;
        }
        signs.info_missing =
            cursor >= ds.head && ds.epoch == epoch && ds.group_info_epoch != Some(epoch);
    }
    signs.differ.sort();
    signs
}

#[cfg(test)]
mod tests;
