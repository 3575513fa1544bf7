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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use openmls::prelude::{
    Extension, ExtensionType, Extensions, GroupContext, RequiredCapabilitiesExtension,
    UnknownExtension,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

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

mod invites;
mod rules;

pub use invites::*;
pub use rules::*;

#[cfg(test)]
mod tests;
