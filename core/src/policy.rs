//! Who may do what in a group: roles, each user's role and the group's
//! settings, kept in the group's MLS state as a GroupContext extension
//! (type [`POLICY_EXTENSION`], required by the group's
//! `required_capabilities`), so that every member and the DS read the same
//! policy at every epoch.
//!
//! The rules are the same on both sides: the DS applies them to every
//! proposal, commit, message and upload it accepts, and every member's
//! client applies them to every entry it processes, so that a DS that lets
//! one through anyway cannot change what the members see (PROTOCOL.md
//! 13.10, SECURITY.md 4.9).
//!
//! Roles belong to users, not devices. A user's role is `member` unless
//! the policy names another one; the policy names only users with a leaf
//! in the group, so a user who is removed and added again starts as a
//! `member`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use openmls::prelude::{
    Extension, ExtensionType, Extensions, GroupContext, LeafNodeIndex, Member, Proposal,
    RequiredCapabilitiesExtension, Sender, StagedCommit, UnknownExtension,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::devices::user_part;
use crate::mls::principal_of;

/// The GroupContext extension type holding a group's policy (from the
/// range RFC 9420 §17.3 leaves to private use).
pub const POLICY_EXTENSION: u16 = 0xF1D0;

/// Version of the policy's encoding.
const VERSION: u8 = 1;

/// Largest encoded policy either side decodes: far above what names every
/// member of the largest group the DS accepts.
pub const MAX_POLICY_BYTES: usize = 256 * 1024;

/// The additional authenticated data (in the clear, authenticated by the
/// message's encryption) of an application message that renames the group.
/// The DS checks the sender may rename; members honour a rename only with
/// it.
pub const AAD_RENAME: &[u8] = b"rename";
/// The additional authenticated data of an application message that tells
/// joiners the group's current name (anyone may send it; it renames
/// nothing for members who know the name).
pub const AAD_NAME: &[u8] = b"name";

/// A user's role, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Reads; may not send, upload, add or remove anyone else.
    Reader,
    /// Sends and uploads (unless the group is an announcement group); adds
    /// or renames only where the settings allow.
    Member,
    /// Adds; removes members and readers; changes roles below admin (to at
    /// most admin); changes settings; renames.
    Admin,
    /// Everything, on anyone, including other owners.
    Owner,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 4] = [Role::Reader, Role::Member, Role::Admin, Role::Owner];

    /// The role's name as the command line and the JSON output spell it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    /// The role named `s`.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The group's base rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Only admins and owners send messages and upload media.
    pub announcement: bool,
    /// Members (not only admins) may add users.
    pub members_may_add: bool,
    /// Members (not only admins) may rename the group.
    pub members_may_rename: bool,
    /// The most users the group may have; 0: only the server's limit.
    pub max_members: u32,
}

impl Settings {
    /// The settings' names, as `group policy --set NAME=VALUE` takes them.
    pub const NAMES: [&'static str; 4] = [
        "announcement",
        "members_may_add",
        "members_may_rename",
        "max_members",
    ];

    /// Sets `name` to `value` (`on`/`off`, `true`/`false` or a number).
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let flag = || match value {
            "on" | "true" | "yes" | "1" => Ok(true),
            "off" | "false" | "no" | "0" => Ok(false),
            _ => Err(format!("{name} takes on or off, not {value:?}")),
        };
        match name.replace('-', "_").as_str() {
            "announcement" => self.announcement = flag()?,
            "members_may_add" => self.members_may_add = flag()?,
            "members_may_rename" => self.members_may_rename = flag()?,
            "max_members" => {
                self.max_members = value
                    .parse()
                    .map_err(|_| format!("max_members takes a number, not {value:?}"))?
            }
            _ => {
                return Err(format!(
                    "no setting {name:?}; the settings are {}",
                    Self::NAMES.join(", ")
                ))
            }
        }
        Ok(())
    }
}

impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        write!(
            f,
            "announcement={}, members_may_add={}, members_may_rename={}, max_members={}",
            on(self.announcement),
            on(self.members_may_add),
            on(self.members_may_rename),
            self.max_members
        )
    }
}

/// What a user may do, beyond what every member may (update its own keys,
/// leave, manage its own devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Send application messages.
    Send,
    /// Upload media.
    Upload,
    /// Add users new to the group.
    Add,
    /// Rename the group.
    Rename,
    /// Change the settings.
    ChangeSettings,
    /// Make and revoke invites.
    Invite,
}

impl Capability {
    fn describe(self) -> &'static str {
        match self {
            Capability::Send => "send messages",
            Capability::Upload => "upload media",
            Capability::Add => "add users",
            Capability::Rename => "rename the group",
            Capability::ChangeSettings => "change the group's settings",
            Capability::Invite => "make or revoke invites",
        }
    }
}

/// Why a change is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    /// The sender's role lacks what the change needs.
    #[error("{0}")]
    Forbidden(String),
    /// The change would leave the policy inconsistent (an owner-less group,
    /// a role for a non-member, a dropped policy).
    #[error("{0}")]
    Invalid(String),
    /// The extension does not decode.
    #[error("the group's policy does not decode: {0}")]
    Malformed(String),
}

/// Most invites a group's policy holds.
pub const MAX_INVITES: usize = 32;

/// An invite: whoever holds its secret key may join the group (or, with
/// `approval`, ask to) until `expires_ms`, at most `max_uses` times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// The Ed25519 public key of the invite's secret.
    pub key: [u8; 32],
    /// The user who made it.
    pub by: String,
    /// When it lapses, ms since the Unix epoch.
    pub expires_ms: u64,
    /// How many users it admits; 0: no limit but the group's.
    pub max_uses: u32,
    /// Joiners wait in a queue until an admin adds them.
    pub approval: bool,
}

impl Invite {
    /// The short id an invite is shown and revoked by: the first 8 hex
    /// digits of its key.
    pub fn id(&self) -> String {
        hex::encode(&self.key[..4])
    }
}

/// A group's policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Users whose role is not `member`.
    roles: BTreeMap<String, Role>,
    /// The base rules.
    pub settings: Settings,
    /// The invites in force (sorted by key).
    invites: Vec<Invite>,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    roles: Vec<(String, Role)>,
    settings: Settings,
    invites: Vec<Invite>,
}

impl Policy {
    /// The policy of a new group: its creator (a user name) is the owner.
    pub fn new_group(creator: &str) -> Policy {
        let mut p = Policy::default();
        p.roles.insert(creator.to_owned(), Role::Owner);
        p
    }

    /// `user`'s role (a user name, not a device's principal).
    pub fn role(&self, user: &str) -> Role {
        self.roles.get(user).copied().unwrap_or(Role::Member)
    }

    /// Sets `user`'s role.
    pub fn set_role(&mut self, user: &str, role: Role) {
        if role == Role::Member {
            self.roles.remove(user);
        } else {
            self.roles.insert(user.to_owned(), role);
        }
    }

    /// The users whose role is not `member`, by name.
    pub fn roles(&self) -> impl Iterator<Item = (&str, Role)> {
        self.roles.iter().map(|(u, r)| (u.as_str(), *r))
    }

    /// The invites in force, by key.
    pub fn invites(&self) -> &[Invite] {
        &self.invites
    }

    /// The invite with public key `key`.
    pub fn invite(&self, key: &[u8; 32]) -> Option<&Invite> {
        self.invites.iter().find(|i| &i.key == key)
    }

    /// Adds an invite, dropping those that lapsed before `now_ms`.
    pub fn add_invite(&mut self, invite: Invite, now_ms: u64) -> Result<(), PolicyError> {
        self.invites.retain(|i| i.expires_ms >= now_ms);
        if self.invites.len() >= MAX_INVITES {
            return Err(PolicyError::Invalid(format!(
                "a group holds at most {MAX_INVITES} invites: revoke one first"
            )));
        }
        self.invites.push(invite);
        self.invites.sort_by_key(|i| i.key);
        Ok(())
    }

    /// Removes the invites whose id (or key, in hex) starts with `id`;
    /// returns how many.
    pub fn revoke_invites(&mut self, id: &str) -> usize {
        let before = self.invites.len();
        self.invites
            .retain(|i| !hex::encode(i.key).starts_with(&id.to_ascii_lowercase()));
        before - self.invites.len()
    }

    /// The owners.
    pub fn owners(&self) -> impl Iterator<Item = &str> {
        self.roles()
            .filter(|(_, r)| *r == Role::Owner)
            .map(|(u, _)| u)
    }

    /// The same policy naming only `users`: what a commit that leaves the
    /// others out must make it.
    pub fn retain(&self, users: &BTreeSet<String>) -> Policy {
        let mut p = self.clone();
        p.roles.retain(|u, _| users.contains(u));
        p
    }

    /// Whether `user` has `cap`.
    pub fn may(&self, user: &str, cap: Capability) -> bool {
        let role = self.role(user);
        let s = &self.settings;
        match cap {
            Capability::Send | Capability::Upload => {
                role >= Role::Admin || (role == Role::Member && !s.announcement)
            }
            Capability::Add => role >= Role::Admin || (role == Role::Member && s.members_may_add),
            Capability::Rename => {
                role >= Role::Admin || (role == Role::Member && s.members_may_rename)
            }
            Capability::ChangeSettings | Capability::Invite => role >= Role::Admin,
        }
    }

    /// `Ok` if `user` has `cap`, else the error that says so.
    pub fn require(&self, user: &str, cap: Capability) -> Result<(), PolicyError> {
        if self.may(user, cap) {
            Ok(())
        } else {
            Err(PolicyError::Forbidden(format!(
                "{user} is {} in this group and may not {}",
                article(self.role(user)),
                cap.describe()
            )))
        }
    }

    /// Whether `by` may remove `user`'s devices: its own always; another
    /// user's if `by` is an owner, or an admin removing a member or reader.
    pub fn may_remove(&self, by: &str, user: &str) -> Result<(), PolicyError> {
        let (rb, ru) = (self.role(by), self.role(user));
        if by == user || rb == Role::Owner || (rb == Role::Admin && ru < Role::Admin) {
            return Ok(());
        }
        Err(PolicyError::Forbidden(if rb < Role::Admin {
            format!(
                "{by} is {} in this group and may not remove others",
                article(rb)
            )
        } else {
            format!(
                "{by} is an admin and may not remove {user}, {}",
                article(ru)
            )
        }))
    }

    /// Whether `by` may change `user`'s role from `from` to `to`: an owner
    /// any role; an admin a reader's or member's, to at most admin.
    pub fn may_change_role(
        &self,
        by: &str,
        user: &str,
        from: Role,
        to: Role,
    ) -> Result<(), PolicyError> {
        let rb = self.role(by);
        if from == to
            || rb == Role::Owner
            || (rb == Role::Admin && from < Role::Admin && to <= Role::Admin)
        {
            return Ok(());
        }
        Err(PolicyError::Forbidden(format!(
            "{by} is {} in this group and may not make {user} {} (from {from})",
            article(rb),
            article(to)
        )))
    }

    /// The encoding carried in the extension: a version byte, then the
    /// roles (sorted by user, `member` left out) and the settings in
    /// postcard (PROTOCOL.md 13.10).
    pub fn encode(&self) -> Vec<u8> {
        let wire = Wire {
            roles: self.roles().map(|(u, r)| (u.to_owned(), r)).collect(),
            settings: self.settings.clone(),
            invites: self.invites.clone(),
        };
        let mut out = vec![VERSION];
        out.extend(postcard::to_allocvec(&wire).expect("serialising to a Vec cannot fail"));
        out
    }

    /// Decodes [`Policy::encode`]'s output, refusing any other encoding of
    /// the same policy (unsorted or repeated users, a `member` entry,
    /// numbers not in their shortest form, trailing bytes) and invalid user
    /// names.
    pub fn decode(bytes: &[u8]) -> Result<Policy, PolicyError> {
        let bad = |m: &str| PolicyError::Malformed(m.to_owned());
        if bytes.len() > MAX_POLICY_BYTES {
            return Err(bad("longer than the largest policy either side takes"));
        }
        let Some((&VERSION, rest)) = bytes.split_first() else {
            return Err(bad("unknown version"));
        };
        let wire: Wire = postcard::from_bytes(rest).map_err(|e| bad(&e.to_string()))?;
        if wire.invites.len() > MAX_INVITES {
            return Err(bad("more invites than a group holds"));
        }
        if wire.invites.windows(2).any(|w| w[0].key >= w[1].key) {
            return Err(bad("invites are not sorted by key or repeat"));
        }
        for i in &wire.invites {
            crate::ids::check_user_name(&i.by).map_err(|e| bad(&e.to_string()))?;
        }
        let mut p = Policy {
            roles: BTreeMap::new(),
            settings: wire.settings,
            invites: wire.invites,
        };
        let mut last: Option<&str> = None;
        for (u, r) in &wire.roles {
            crate::ids::check_user_name(u).map_err(|e| bad(&e.to_string()))?;
            if last.is_some_and(|l| l >= u.as_str()) {
                return Err(bad("users are not sorted or repeat"));
            }
            if *r == Role::Member {
                return Err(bad("a member's role is implied, not listed"));
            }
            last = Some(u);
            p.roles.insert(u.clone(), *r);
        }
        if p.encode() != bytes {
            return Err(bad("not in its one encoding"));
        }
        Ok(p)
    }

    /// The group context extensions of a group with this policy: the
    /// policy, and the required capabilities that make every leaf support
    /// it.
    pub fn extensions(&self) -> Extensions<GroupContext> {
        Extensions::from_vec(vec![
            Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
                &[ExtensionType::Unknown(POLICY_EXTENSION)],
                &[],
                &[],
            )),
            Extension::Unknown(POLICY_EXTENSION, UnknownExtension(self.encode())),
        ])
        .expect("a policy and required capabilities are valid group context extensions")
    }

    /// The policy a group's context extensions carry: `None` in a group
    /// made before policies (every member may do everything there). A
    /// policy the required capabilities do not list is malformed.
    pub fn from_extensions(ext: &Extensions<GroupContext>) -> Result<Option<Policy>, PolicyError> {
        let Some(e) = ext.unknown(POLICY_EXTENSION) else {
            return Ok(None);
        };
        let required = ext.required_capabilities().is_some_and(|r| {
            r.extension_types()
                .contains(&ExtensionType::Unknown(POLICY_EXTENSION))
        });
        if !required {
            return Err(PolicyError::Malformed(
                "the required capabilities do not list the policy extension".into(),
            ));
        }
        Policy::decode(&e.0).map(Some)
    }
}

fn article(r: Role) -> String {
    match r {
        Role::Admin => "an admin".into(),
        Role::Owner => "an owner".into(),
        other => format!("a {other}"),
    }
}

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
/// authenticated data is `aad`: ordinary messages need
/// [`Capability::Send`], renames [`Capability::Rename`]; the group's name
/// for joiners goes from anyone.
pub fn check_message(policy: Option<&Policy>, user: &str, aad: &[u8]) -> Result<(), PolicyError> {
    let cap = match aad {
        [] => Capability::Send,
        AAD_RENAME => Capability::Rename,
        AAD_NAME => return Ok(()),
        _ => {
            return Err(PolicyError::Invalid(
                "unknown additional authenticated data on an application message".into(),
            ))
        }
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

/// The `authenticated_data` of an external commit that joins by invite
/// starts with this, then holds the invite's public key (32 bytes) and
/// its signature (64 bytes) of the join.
pub const AAD_INVITE: &[u8] = b"invite";
const JOIN_LABEL: &[u8] = b"huddle invite join v1";
const INFO_LABEL: &[u8] = b"huddle invite info v1";

/// What an invite's key signs: `label || group || epoch (u64 BE) ||
/// principal`.
fn invite_message(label: &[u8], group: &[u8; 16], epoch: u64, principal: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(label.len() + 24 + principal.len());
    m.extend_from_slice(label);
    m.extend_from_slice(group);
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(principal.as_bytes());
    m
}

/// A proof of holding `secret`: [`AAD_INVITE`], the key, the signature.
fn invite_proof(
    secret: &ed25519_dalek::SigningKey,
    label: &[u8],
    group: &[u8; 16],
    epoch: u64,
    principal: &str,
) -> Vec<u8> {
    use ed25519_dalek::Signer as _;
    let sig = secret.sign(&invite_message(label, group, epoch, principal));
    let mut out = AAD_INVITE.to_vec();
    out.extend_from_slice(secret.verifying_key().as_bytes());
    out.extend_from_slice(&sig.to_bytes());
    out
}

/// The `authenticated_data` of `principal`'s external commit joining
/// group `group` at `epoch` with the invite whose secret is `secret`.
pub fn join_aad(
    secret: &ed25519_dalek::SigningKey,
    group: &[u8; 16],
    epoch: u64,
    principal: &str,
) -> Vec<u8> {
    invite_proof(secret, JOIN_LABEL, group, epoch, principal)
}

/// The proof `principal` sends to fetch what joining group `group` needs
/// with the invite whose secret is `secret` (PROTOCOL.md 10.6).
pub fn info_proof(
    secret: &ed25519_dalek::SigningKey,
    group: &[u8; 16],
    principal: &str,
) -> Vec<u8> {
    invite_proof(secret, INFO_LABEL, group, 0, principal)
}

/// Checks a proof made by [`info_proof`] against `policy` at
/// `cx.now_ms`; returns the invite.
pub fn check_info_proof<'p>(
    policy: &'p Policy,
    group: &[u8; 16],
    proof: &[u8],
    principal: &str,
    now_ms: u64,
) -> Result<&'p Invite, PolicyError> {
    let cx = Context {
        group,
        aad: proof,
        now_ms,
    };
    check_invite(policy, INFO_LABEL, cx, 0, principal)
}

/// Checks an invite proof (`cx.aad`): the key is an invite of `policy`
/// that has not lapsed at `cx.now_ms`, and the signature verifies.
fn check_invite<'p>(
    policy: &'p Policy,
    label: &[u8],
    cx: Context<'_>,
    epoch: u64,
    principal: &str,
) -> Result<&'p Invite, PolicyError> {
    let no = |m: &str| PolicyError::Forbidden(m.to_owned());
    let rest = cx
        .aad
        .strip_prefix(AAD_INVITE)
        .filter(|r| r.len() == 96)
        .ok_or_else(|| no("joining this group needs an invite"))?;
    let key: [u8; 32] = rest[..32].try_into().expect("32 bytes");
    let sig: [u8; 64] = rest[32..].try_into().expect("64 bytes");
    let invite = policy
        .invite(&key)
        .ok_or_else(|| no("the invite was revoked or never existed"))?;
    if invite.expires_ms < cx.now_ms {
        return Err(no("the invite has expired"));
    }
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&key)
        .map_err(|_| no("the invite's key is not a valid key"))?;
    vk.verify_strict(
        &invite_message(label, cx.group, epoch, principal),
        &ed25519_dalek::Signature::from_bytes(&sig),
    )
    .map_err(|_| no("the invite's signature does not verify"))?;
    Ok(invite)
}

/// The link-like token that carries an invite: the group's id and the
/// invite's secret, after `#` so that a link opener never sends it
/// anywhere.
pub fn invite_token(group: &[u8; 16], secret: &ed25519_dalek::SigningKey) -> String {
    format!(
        "huddle://join/{}#{}",
        hex::encode(group),
        hex::encode(secret.to_bytes())
    )
}

/// The group id and secret an invite token carries.
pub fn parse_invite_token(token: &str) -> Result<([u8; 16], ed25519_dalek::SigningKey), String> {
    let bad = || "not a Huddle invite (huddle://join/GROUP#SECRET)".to_owned();
    let rest = token
        .trim()
        .strip_prefix("huddle://join/")
        .ok_or_else(bad)?;
    let (group, secret) = rest.split_once('#').ok_or_else(bad)?;
    let group: [u8; 16] = hex::decode(group)
        .ok()
        .and_then(|g| g.try_into().ok())
        .ok_or_else(bad)?;
    let secret: [u8; 32] = hex::decode(secret)
        .ok()
        .and_then(|g| g.try_into().ok())
        .ok_or_else(bad)?;
    Ok((group, ed25519_dalek::SigningKey::from_bytes(&secret)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(users: &[&str]) -> BTreeSet<String> {
        users.iter().map(|u| u.to_string()).collect()
    }

    fn policy() -> Policy {
        let mut p = Policy::new_group("alice");
        p.set_role("bob", Role::Admin);
        p.set_role("dave", Role::Reader);
        p
    }

    fn facts(committer: &str, after: &Policy) -> CommitFacts {
        let all = set(&["alice", "bob", "carol", "dave"]);
        CommitFacts {
            committer: committer.into(),
            users_before: all.clone(),
            users_after: all,
            after: Some(after.clone()),
            ..CommitFacts::default()
        }
    }

    #[test]
    fn the_encoding_round_trips_and_is_the_only_one() {
        let mut p = policy();
        p.settings.max_members = 300;
        p.settings.announcement = true;
        let bytes = p.encode();
        assert_eq!(Policy::decode(&bytes).unwrap(), p);
        // Unsorted users.
        let wire = Wire {
            roles: vec![("bob".into(), Role::Admin), ("alice".into(), Role::Owner)],
            settings: Settings::default(),
            invites: vec![],
        };
        let mut b = vec![VERSION];
        b.extend(postcard::to_allocvec(&wire).unwrap());
        assert!(Policy::decode(&b).is_err());
        // A listed member.
        let wire = Wire {
            roles: vec![("alice".into(), Role::Member)],
            settings: Settings::default(),
            invites: vec![],
        };
        let mut b = vec![VERSION];
        b.extend(postcard::to_allocvec(&wire).unwrap());
        assert!(Policy::decode(&b).is_err());
        // Trailing bytes, another version, nothing.
        let mut b = bytes.clone();
        b.push(0);
        assert!(Policy::decode(&b).is_err());
        let mut b = bytes;
        b[0] = 2;
        assert!(Policy::decode(&b).is_err());
        assert!(Policy::decode(&[]).is_err());
        // The extension round-trips; without required capabilities it is
        // refused.
        let ext = policy().extensions();
        assert_eq!(Policy::from_extensions(&ext).unwrap(), Some(policy()));
        let bare = Extensions::single(Extension::Unknown(
            POLICY_EXTENSION,
            UnknownExtension(policy().encode()),
        ))
        .unwrap();
        assert!(Policy::from_extensions(&bare).is_err());
        assert_eq!(Policy::from_extensions(&Extensions::empty()).unwrap(), None);
    }

    #[test]
    fn roles_decide_who_sends_adds_and_renames() {
        let mut p = policy();
        assert!(p.may("carol", Capability::Send));
        assert!(!p.may("dave", Capability::Send), "a reader");
        assert!(!p.may("carol", Capability::Add));
        assert!(p.may("bob", Capability::Add));
        assert!(!p.may("carol", Capability::Rename));
        p.settings.members_may_add = true;
        p.settings.members_may_rename = true;
        assert!(p.may("carol", Capability::Add));
        assert!(p.may("carol", Capability::Rename));
        assert!(!p.may("dave", Capability::Add), "a reader never adds");
        p.settings.announcement = true;
        assert!(!p.may("carol", Capability::Send));
        assert!(!p.may("carol", Capability::Upload));
        assert!(p.may("bob", Capability::Send));
        assert!(check_message(Some(&p), "carol", b"").is_err());
        assert!(check_message(Some(&p), "carol", AAD_NAME).is_ok());
        assert!(check_message(Some(&p), "carol", AAD_RENAME).is_ok());
        assert!(check_message(Some(&p), "dave", AAD_RENAME).is_err());
        assert!(check_message(Some(&p), "bob", b"other").is_err());
        assert!(check_message(None, "dave", b"").is_ok());
    }

    #[test]
    fn removals_need_rank_except_of_ones_own_devices() {
        let p = policy();
        let remove = |by: &str, user: &str| {
            let mut f = facts(by, &p.retain(&set(&["alice", "bob", "carol", "dave"])));
            f.removals = vec![(by.into(), user.into())];
            f.users_after.remove(user);
            f.after = Some(p.retain(&f.users_after));
            check_commit(Some(&p), &f)
        };
        assert!(
            remove("carol", "alice").is_err(),
            "a member removes the owner"
        );
        assert!(
            remove("carol", "dave").is_err(),
            "a member removes a reader"
        );
        assert!(remove("bob", "carol").is_ok(), "an admin removes a member");
        assert!(remove("bob", "dave").is_ok());
        assert!(
            remove("bob", "alice").is_err(),
            "an admin removes the owner"
        );
        assert!(remove("alice", "bob").is_ok(), "the owner removes an admin");
        assert!(remove("carol", "carol").is_ok(), "leaving");
        assert!(
            matches!(remove("alice", "alice"), Err(PolicyError::Invalid(_))),
            "the last owner leaves"
        );
        // A removed user's role must go with it.
        let mut f = facts("alice", &p);
        f.removals = vec![("alice".into(), "bob".into())];
        f.users_after.remove("bob");
        assert!(matches!(
            check_commit(Some(&p), &f),
            Err(PolicyError::Invalid(_))
        ));
    }

    #[test]
    fn role_and_setting_changes_follow_the_rank_rules() {
        let p = policy();
        let change = |by: &str, user: &str, to: Role| {
            let mut after = p.clone();
            after.set_role(user, to);
            check_commit(Some(&p), &facts(by, &after))
        };
        assert!(
            change("carol", "carol", Role::Admin).is_err(),
            "a member promotes itself"
        );
        assert!(change("carol", "dave", Role::Member).is_err());
        assert!(
            change("bob", "carol", Role::Admin).is_ok(),
            "an admin makes an admin"
        );
        assert!(change("bob", "dave", Role::Member).is_ok());
        assert!(
            change("bob", "carol", Role::Owner).is_err(),
            "an admin makes an owner"
        );
        assert!(
            change("bob", "alice", Role::Member).is_err(),
            "an admin demotes the owner"
        );
        assert!(change("alice", "bob", Role::Owner).is_ok());
        assert!(
            matches!(
                change("alice", "alice", Role::Admin),
                Err(PolicyError::Invalid(_))
            ),
            "the last owner steps down"
        );
        let mut settings = p.clone();
        settings.settings.announcement = true;
        assert!(check_commit(Some(&p), &facts("carol", &settings)).is_err());
        assert!(check_commit(Some(&p), &facts("bob", &settings)).is_ok());
        // No policy after, or a policy for a group without one.
        let mut f = facts("alice", &p);
        f.after = None;
        assert!(check_commit(Some(&p), &f).is_err());
        assert!(check_commit(None, &facts("alice", &p)).is_err());
        f.after = None;
        assert!(check_commit(None, &f).is_ok());
        // Nobody joins such a group by itself.
        f.joins = true;
        assert!(check_commit(None, &f).is_err());
    }

    #[test]
    fn adding_users_needs_the_capability_and_room() {
        let mut p = policy();
        let add = |p: &Policy, by: &str, user: &str| {
            let mut f = facts(by, p);
            f.added = vec![user.into()];
            f.users_after.insert(user.into());
            check_commit(Some(p), &f)
        };
        assert!(add(&p, "carol", "erin").is_err());
        assert!(add(&p, "bob", "erin").is_ok());
        // A device of a user already in the group.
        assert!(add(&p, "carol", "dave").is_ok());
        p.settings.max_members = 4;
        assert!(add(&p, "bob", "erin").is_err(), "a fifth user");
        // A new user given a role in the commit that adds it.
        let mut after = p.clone();
        after.settings.max_members = 0;
        after.set_role("erin", Role::Admin);
        let mut f = facts("bob", &after);
        f.added = vec!["erin".into()];
        f.users_after.insert("erin".into());
        assert!(check_commit(Some(&p), &f).is_ok(), "an admin adds an admin");
        // A member who may add may not add an admin.
        p.settings.members_may_add = true;
        after.settings.members_may_add = true;
        let mut f = facts("carol", &after);
        f.added = vec!["erin".into()];
        f.users_after.insert("erin".into());
        assert!(check_commit(Some(&p), &f).is_err());
        after.set_role("erin", Role::Member);
        after.settings.max_members = 4;
        let mut f = facts("carol", &after);
        f.added = vec!["erin".into()];
        f.users_after.insert("erin".into());
        p.settings.max_members = 5;
        after.settings.max_members = 5;
        f.after = Some(after.clone());
        assert!(check_commit(Some(&p), &f).is_ok());
    }
}
