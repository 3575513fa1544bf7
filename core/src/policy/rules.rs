//! The rules a commit, a `Remove` proposal and an application message are
//! checked by, against the policy before them: the same code on the DS
//! and in every member's client.

use std::collections::{BTreeSet, HashMap, HashSet};

use openmls::prelude::{LeafNodeIndex, Member, Proposal, Sender, StagedCommit};

use super::invites::{check_invite, JOIN_LABEL};
use super::{Capability, Invite, Policy, PolicyError, Role, AAD_NAME, AAD_RENAME};
use crate::devices::user_part;
use crate::mls::principal_of;

/// What a commit changes, at the level of users, for [`check_commit`].
#[derive(Debug, Clone, Default)]
pub struct CommitFacts {
    /// The user who commits (for an external commit, the joiner's user).
    pub committer: String,
    /// Users with a leaf before the commit.
    pub users_before: BTreeSet<String>,
    /// Users with a leaf after it.
    pub users_after: BTreeSet<String>,
    /// Each removed leaf: (the user who proposed its removal, its user).
    pub removals: Vec<(String, String)>,
    /// The users of the added leaves (all proposed by the committer).
    pub added: Vec<String>,
    /// The policy after the commit (from the new group context).
    pub after: Option<Policy>,
    /// An external commit by a user that had no leaf before: a join by
    /// invite.
    pub joins: bool,
    /// The invite that join presented, checked (signature, expiry).
    pub invite: Option<Invite>,
}

/// Checks a commit against the policy before it (`None`: a group made
/// before policies, where any change goes but installing a policy).
///
/// - A user removes its own devices freely; another user's only as
///   [`Policy::may_remove`] allows (checked against each removal's
///   proposer).
/// - Adding a user new to the group needs [`Capability::Add`]; adding a
///   device of a user already in it does not. `max_members` bounds the
///   users after a commit that adds.
/// - The policy after may differ in settings only with
///   [`Capability::ChangeSettings`], and in a role only as
///   [`Policy::may_change_role`] allows; a removed user's role is dropped
///   (and must be: the policy names only users with a leaf).
/// - At least one owner remains.
pub fn check_commit(before: Option<&Policy>, f: &CommitFacts) -> Result<(), PolicyError> {
    let Some(before) = before else {
        return match f.after {
            _ if f.joins => Err(PolicyError::Forbidden(format!(
                "{} may not join a group made without a policy by itself",
                f.committer
            ))),
            None => Ok(()),
            Some(_) => Err(PolicyError::Invalid(
                "a group made without a policy cannot be given one".into(),
            )),
        };
    };
    let Some(after) = &f.after else {
        return Err(PolicyError::Invalid(
            "a commit may not drop the group's policy".into(),
        ));
    };
    for (by, user) in &f.removals {
        before.may_remove(by, user)?;
    }
    let new_users: Vec<&String> = f
        .added
        .iter()
        .filter(|u| !f.users_before.contains(*u))
        .collect();
    if f.joins {
        match &f.invite {
            Some(i) if !i.approval => {}
            Some(_) => {
                return Err(PolicyError::Forbidden(
                    "this invite needs an admin's approval: ask to join instead".into(),
                ))
            }
            None => {
                return Err(PolicyError::Forbidden(format!(
                    "{} may join only with an invite",
                    f.committer
                )))
            }
        }
    }
    if !new_users.is_empty() || f.joins {
        if !f.joins {
            before.require(&f.committer, Capability::Add)?;
        }
        let max = after.settings.max_members;
        if max > 0 && f.users_after.len() > max as usize {
            return Err(PolicyError::Forbidden(format!(
                "the group takes at most {max} users (its max_members setting)"
            )));
        }
    }
    if after.settings != before.settings {
        before.require(&f.committer, Capability::ChangeSettings)?;
    }
    if after.invites != before.invites {
        before.require(&f.committer, Capability::Invite)?;
    }
    let named: BTreeSet<&String> = before.roles.keys().chain(after.roles.keys()).collect();
    for user in named {
        let to = after.role(user);
        if !f.users_after.contains(user) {
            if to != Role::Member {
                return Err(PolicyError::Invalid(format!(
                    "the policy names {user}, who has no device in the group: a commit that \
                     removes a user must drop its role"
                )));
            }
            continue;
        }
        let from = if f.users_before.contains(user) {
            before.role(user)
        } else {
            Role::Member
        };
        before.may_change_role(&f.committer, user, from, to)?;
    }
    check_owners(after, &f.users_after)
}

/// `Ok` if `policy` leaves an owner among `users` (those who keep a leaf).
pub fn check_owners(policy: &Policy, users: &BTreeSet<String>) -> Result<(), PolicyError> {
    if users.is_empty() || policy.owners().any(|o| users.contains(o)) {
        Ok(())
    } else {
        Err(PolicyError::Invalid(
            "the group would lose its last owner: make another member owner first \
             (`huddle group role GROUP USER owner`)"
                .into(),
        ))
    }
}

/// Checks an application message from `user` whose additional
/// authenticated data is `aad`: a rename ([`AAD_RENAME`]) needs
/// [`Capability::Rename`]; the group's name for joiners ([`AAD_NAME`])
/// goes from anyone; anything else (empty, or bytes of the sender's own,
/// such as a timestamp) is an ordinary message and needs
/// [`Capability::Send`].
pub fn check_message(policy: Option<&Policy>, user: &str, aad: &[u8]) -> Result<(), PolicyError> {
    let cap = match aad {
        AAD_RENAME => Capability::Rename,
        AAD_NAME => return Ok(()),
        _ => Capability::Send,
    };
    match policy {
        Some(p) => p.require(user, cap),
        None => Ok(()),
    }
}

/// Each leaf's principal, from a group's members.
pub fn leaves_of(members: impl Iterator<Item = Member>) -> HashMap<u32, String> {
    members
        .filter_map(|m| principal_of(&m.credential).map(|p| (m.index.u32(), p)))
        .collect()
}

/// Checks a Remove proposal by `proposer` (a principal) of `leaf` against
/// `policy`: its role may remove that user, and the removal of `leaf` and
/// every leaf already proposed for removal (`pending`) leaves an owner (a
/// last owner's leave proposal would stall every commit after it).
/// `leaves` is each leaf's principal.
pub fn check_remove_proposal(
    policy: &Policy,
    leaves: &HashMap<u32, String>,
    proposer: &str,
    leaf: u32,
    pending: impl Iterator<Item = u32>,
) -> Result<(), PolicyError> {
    let target = leaves
        .get(&leaf)
        .ok_or_else(|| PolicyError::Invalid("the removal of a leaf that is not there".into()))?;
    policy.may_remove(user_part(proposer), user_part(target))?;
    let mut removed: HashSet<u32> = pending.collect();
    removed.insert(leaf);
    let remaining: BTreeSet<String> = leaves
        .iter()
        .filter(|(l, _)| !removed.contains(l))
        .map(|(_, p)| user_part(p).to_owned())
        .collect();
    check_owners(&policy.retain(&remaining), &remaining)
}

/// What staged commit `staged` by `committer` (a principal) changes, in
/// users; `leaves` is each leaf's principal before it.
pub fn commit_facts(
    leaves: &HashMap<u32, String>,
    committer: &str,
    staged: &StagedCommit,
) -> Result<CommitFacts, PolicyError> {
    let committer = user_part(committer).to_owned();
    let user_of = |l: LeafNodeIndex| leaves.get(&l.u32()).map(|p| user_part(p).to_owned());
    let mut removals = Vec::new();
    let mut removed_leaves = HashSet::new();
    for q in staged.queued_proposals() {
        let Proposal::Remove(r) = q.proposal() else {
            continue;
        };
        let by = match q.sender() {
            Sender::Member(l) => user_of(*l),
            Sender::NewMemberCommit => Some(committer.clone()),
            _ => None,
        };
        let (Some(by), Some(user)) = (by, user_of(r.removed())) else {
            return Err(PolicyError::Invalid(
                "a removal of an unknown leaf or by an unknown sender".into(),
            ));
        };
        removed_leaves.insert(r.removed().u32());
        removals.push((by, user));
    }
    let added: Vec<String> = staged
        .add_proposals()
        .filter_map(|a| principal_of(a.add_proposal().key_package().leaf_node().credential()))
        .map(|p| user_part(&p).to_owned())
        .collect();
    let users_before: BTreeSet<String> = leaves.values().map(|p| user_part(p).to_owned()).collect();
    let mut users_after: BTreeSet<String> = leaves
        .iter()
        .filter(|(l, _)| !removed_leaves.contains(l))
        .map(|(_, p)| user_part(p).to_owned())
        .collect();
    users_after.extend(added.iter().cloned());
    let external = staged
        .queued_proposals()
        .any(|q| matches!(q.proposal(), Proposal::ExternalInit(_)));
    if external {
        users_after.insert(committer.clone());
    }
    let joins = external && !users_before.contains(&committer);
    let after = Policy::from_extensions(staged.group_context().extensions())?;
    Ok(CommitFacts {
        committer,
        users_before,
        users_after,
        removals,
        added,
        after,
        joins,
        invite: None,
    })
}

/// Where and when a commit is checked: what a join by invite is checked
/// against.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The group's id.
    pub group: &'a [u8; 16],
    /// The commit's `authenticated_data`.
    pub aad: &'a [u8],
    /// The time of the check (the DS's clock; for a member, the DS's
    /// timestamp of the entry), ms since the Unix epoch.
    pub now_ms: u64,
}

/// [`check_commit`] of a staged commit by `committer` (a principal), whose
/// group's leaves were `leaves` and policy `before`. Returns the policy
/// after it.
pub fn check_staged_commit(
    before: Option<&Policy>,
    leaves: &HashMap<u32, String>,
    committer: &str,
    staged: &StagedCommit,
    cx: Context<'_>,
) -> Result<CommitFacts, PolicyError> {
    let mut facts = commit_facts(leaves, committer, staged)?;
    if let (true, Some(policy)) = (facts.joins, before) {
        // The epoch the commit was made in.
        let epoch = staged.group_context().epoch().as_u64().saturating_sub(1);
        facts.invite = Some(check_invite(policy, JOIN_LABEL, cx, epoch, committer)?.clone());
    }
    check_commit(before, &facts)?;
    Ok(facts)
}
