//! Who may do what in a group (PROTOCOL.md 13.10): changing roles and
//! settings, renaming, and the one way this device builds a commit, which
//! keeps the group's policy consistent (a removed user's role goes with
//! it) and checks the commit against the policy before it is sent.

use std::collections::BTreeSet;

use huddle_core::devices::user_part;
use huddle_core::policy::{self, Capability, Invite, Policy, Role};
use huddle_core::proto::{Request, Response};
use huddle_core::GroupId;
use openmls::prelude::*;

use crate::app::AppMessage;
use crate::db::history::Origin;
use crate::db::Provider;
use crate::error::{ClientError, Result};
use crate::event::Event;
use crate::follow::policy_of;
use crate::identity::Identity;

use super::membership::Change;
use super::{check_group_name, Client, CommitOut};

/// What `join_invite` did.
#[derive(Debug)]
pub enum InviteJoin {
    /// Joined: the events of the join.
    Joined(Vec<Event>),
    /// The invite needs an admin's approval: the request waits in the
    /// group's queue; the Welcome comes when an admin adds this user.
    Waiting(GroupId),
}

/// What one commit of this device does besides committing the pending
/// proposals.
#[derive(Default)]
pub(super) struct CommitPlan {
    /// Leaves to add.
    pub(super) adds: Vec<KeyPackage>,
    /// Leaves to remove.
    pub(super) removes: Vec<LeafNodeIndex>,
    /// The policy to set (before the clean-up of removed users' roles).
    pub(super) policy: Option<Policy>,
    /// Send a path (new keys for this device) even if nothing needs one.
    pub(super) self_update: bool,
}

/// Builds this device's commit of `plan` and the pending proposals, with
/// a GroupContextExtensions proposal when the policy changes (it names
/// only users who keep a leaf). The commit is checked against the
/// group's policy as the DS and the members check it; a refusal leaves no
/// pending commit.
pub(super) fn build_commit(
    g: &mut MlsGroup,
    p: &Provider<'_>,
    s: &Identity,
    plan: CommitPlan,
) -> Result<CommitOut> {
    let before = policy_of(g)?;
    let leaves = policy::leaves_of(g.members());
    let mut gone: BTreeSet<u32> = plan.removes.iter().map(|l| l.u32()).collect();
    gone.extend(g.pending_proposals().filter_map(|q| match q.proposal() {
        Proposal::Remove(r) => Some(r.removed().u32()),
        _ => None,
    }));
    let mut users_after: BTreeSet<String> = leaves
        .iter()
        .filter(|(l, _)| !gone.contains(l))
        .map(|(_, p)| user_part(p).to_owned())
        .collect();
    users_after.extend(plan.adds.iter().filter_map(|kp| {
        huddle_core::mls::principal_of(kp.leaf_node().credential())
            .map(|p| user_part(&p).to_owned())
    }));
    let target = plan
        .policy
        .or_else(|| before.clone())
        .map(|p| p.retain(&users_after));
    let mut b = g
        .commit_builder()
        .propose_adds(plan.adds)
        .propose_removals(plan.removes)
        .force_self_update(plan.self_update);
    if target != before {
        if let Some(t) = &target {
            b = b
                .propose_group_context_extensions(t.extensions())
                .map_err(ClientError::mls)?;
        }
    }
    let bundle = b
        .load_psks(p.storage())
        .map_err(ClientError::mls)?
        .build(p.rand(), p.crypto(), s, |_| true)
        .map_err(ClientError::mls)?
        .stage_commit(p)
        .map_err(ClientError::mls)?;
    let (commit, welcome, _) = bundle.into_messages();
    let staged = g
        .pending_commit()
        .ok_or_else(|| ClientError::Mls("the staged commit is missing".into()))?;
    let group: [u8; 16] = g
        .group_id()
        .as_slice()
        .try_into()
        .map_err(|_| ClientError::Mls("a group id of another length".into()))?;
    let cx = policy::Context {
        group: &group,
        aad: &[],
        now_ms: super::now_ms(),
    };
    if let Err(e) = policy::check_staged_commit(before.as_ref(), &leaves, &s.name, staged, cx) {
        g.clear_pending_commit(p.storage())
            .map_err(ClientError::mls)?;
        return Err(e.into());
    }
    Ok((commit, welcome))
}

impl Client {
    /// The group's policy (`None`: a group made before policies, where
    /// every member may do everything).
    pub fn policy(&self, group: &str) -> Result<Option<Policy>> {
        let id = self.resolve_group(group)?;
        self.active_group(&id)?;
        policy_of(&self.load_group(&self.db, &id)?)
    }

    /// [`Client::policy`] after bringing the group up to date.
    pub async fn fresh_policy(&mut self, group: &str) -> Result<Option<Policy>> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.policy(&id.to_string())
    }

    /// The group's users, sorted, each with its number of devices in the
    /// group and its role.
    pub fn member_roles(&self, group: &str) -> Result<Vec<(String, usize, Role)>> {
        let policy = self.policy(group)?;
        Ok(self
            .member_devices(group)?
            .into_iter()
            .map(|(u, n)| {
                let role = policy.as_ref().map_or(Role::Member, |p| p.role(&u));
                (u, n, role)
            })
            .collect())
    }

    /// Gives `user` (a member) `role`, in one commit.
    pub async fn set_role(&mut self, group: &str, user: &str, role: Role) -> Result<Vec<Event>> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.active_group(&id)?;
        if !self.members(group)?.iter().any(|m| m == user) {
            return Err(ClientError::Usage(format!("{user} is not a member")));
        }
        let mut policy = self.group_policy(&id)?;
        if policy.role(user) == role {
            return Err(ClientError::Usage(format!("{user} is {role} already")));
        }
        policy.set_role(user, role);
        let report = (Change::Role(role), vec![user.to_owned()]);
        self.commit_policy(&id, policy, Some(report)).await
    }

    /// Changes the group's settings: each of `sets` is a setting's name
    /// and its new value (`announcement=on`), all in one commit.
    pub async fn set_policy(
        &mut self,
        group: &str,
        sets: &[(String, String)],
    ) -> Result<Vec<Event>> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.active_group(&id)?;
        let mut policy = self.group_policy(&id)?;
        for (name, value) in sets {
            policy
                .settings
                .set(name, value)
                .map_err(ClientError::Usage)?;
        }
        if Some(&policy) == policy_of(&self.load_group(&self.db, &id)?)?.as_ref() {
            return Err(ClientError::Usage("the settings are so already".into()));
        }
        let report = (Change::Settings, vec![policy.settings.to_string()]);
        self.commit_policy(&id, policy, Some(report)).await
    }

    /// Renames the group, for every member.
    pub async fn rename(&mut self, group: &str, name: &str) -> Result<Event> {
        check_group_name(name)?;
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.sending_group(&id)?;
        let msg = AppMessage::Rename {
            name: name.to_owned(),
        };
        let (_, event) = self.send_app(&id, &msg).await?;
        crate::db::groups::set_name(&self.db, &id, name)?;
        event.ok_or_else(|| ClientError::Protocol("a rename shows as an event".into()))
    }

    /// The policy of group `id`, which must have one.
    fn group_policy(&self, id: &GroupId) -> Result<Policy> {
        policy_of(&self.load_group(&self.db, id)?)?.ok_or_else(|| {
            ClientError::Usage(
                "this group was made before roles existed: it has no policy to change".into(),
            )
        })
    }

    /// Commits `policy` as the group's.
    async fn commit_policy(
        &mut self,
        id: &GroupId,
        policy: Policy,
        report: Option<(Change, Vec<String>)>,
    ) -> Result<Vec<Event>> {
        let events = self
            .commit_with_retry(id, report, Origin::Own, move |g, p, s| {
                build_commit(
                    g,
                    p,
                    s,
                    CommitPlan {
                        policy: Some(policy.clone()),
                        ..CommitPlan::default()
                    },
                )
            })
            .await?;
        Ok(events)
    }

    /// Makes an invite to the group: whoever holds the token it returns
    /// may join (`approval`: ask to join) within `valid_for`, at most
    /// `uses` users (0: no limit but the group's). The invite is in the
    /// group's policy, so every member sees it; the token holds its secret.
    pub async fn create_invite(
        &mut self,
        group: &str,
        uses: u32,
        valid_for: std::time::Duration,
        approval: bool,
    ) -> Result<(String, Invite)> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.active_group(&id)?;
        self.require(&id, Capability::Invite)?;
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        let secret = ed25519_dalek::SigningKey::from_bytes(&seed);
        let now = super::now_ms();
        let invite = Invite {
            key: secret.verifying_key().to_bytes(),
            by: self.name().to_owned(),
            expires_ms: now.saturating_add(valid_for.as_millis() as u64),
            max_uses: uses,
            approval,
        };
        let mut policy = self.group_policy(&id)?;
        policy.add_invite(invite.clone(), now)?;
        self.commit_policy(&id, policy, None).await?;
        Ok((policy::invite_token(id.as_bytes(), &secret), invite))
    }

    /// Revokes the invites whose id starts with `invite`; returns how many.
    pub async fn revoke_invite(&mut self, group: &str, invite: &str) -> Result<usize> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.active_group(&id)?;
        let mut policy = self.group_policy(&id)?;
        let n = policy.revoke_invites(invite);
        if n == 0 || invite.is_empty() {
            return Err(ClientError::Usage(format!(
                "no invite {invite:?} in this group (see `huddle group invite GROUP --list`)"
            )));
        }
        self.commit_policy(&id, policy, None).await?;
        Ok(n)
    }

    /// Joins the group an invite token is for, by an external commit the
    /// invite's proof rides in; or, if the invite needs an admin's
    /// approval, asks to be added ([`InviteJoin::Waiting`]).
    pub async fn join_invite(&mut self, token: &str) -> Result<InviteJoin> {
        let (group, secret) = policy::parse_invite_token(token).map_err(ClientError::Usage)?;
        let id = GroupId(group);
        if let Some(row) = crate::db::groups::load(&self.db, &id)? {
            if row.state.is_current() {
                return Err(ClientError::Usage(format!(
                    "you are in group {} already",
                    super::short_id(&id)
                )));
            }
        }
        let proof = policy::info_proof(&secret, id.as_bytes(), self.principal());
        let asked = self
            .request(&Request::InviteInfo {
                group: id,
                proof: proof.into(),
            })
            .await?;
        match asked {
            Response::JoinRequested { .. } => Ok(InviteJoin::Waiting(id)),
            Response::JoinInfo { .. } => Ok(InviteJoin::Joined(
                self.join_externally(
                    &id,
                    "joined with an invite",
                    super::recovery::Join::Invite(&secret),
                )
                .await?,
            )),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// The users waiting for an admin to add them to the group (with
    /// invites that need approval): (user, invite id, when it asked).
    pub async fn join_requests(&mut self, group: &str) -> Result<Vec<(String, String, u64)>> {
        let id = self.resolve_group(group)?;
        match self.request(&Request::JoinRequests { group: id }).await? {
            Response::JoinRequests { requests } => Ok(requests),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Adds users who asked to join (each must be waiting), in one commit.
    pub async fn accept_joins(&mut self, group: &str, users: &[String]) -> Result<Vec<Event>> {
        let waiting = self.join_requests(group).await?;
        for u in users {
            if !waiting.iter().any(|(w, _, _)| w == u) {
                return Err(ClientError::Usage(format!(
                    "{u} is not waiting to join (see `huddle group requests GROUP`)"
                )));
            }
        }
        self.add(group, users).await
    }

    /// Turns down `user`'s request to join the group; returns those still
    /// waiting.
    pub async fn decline_join(
        &mut self,
        group: &str,
        user: &str,
    ) -> Result<Vec<(String, String, u64)>> {
        let id = self.resolve_group(group)?;
        let before = self.join_requests(group).await?;
        if !before.iter().any(|(u, _, _)| u == user) {
            return Err(ClientError::Usage(format!("{user} is not waiting to join")));
        }
        match self
            .request(&Request::DeclineJoin {
                group: id,
                user: user.to_owned(),
            })
            .await?
        {
            Response::JoinRequests { requests } => Ok(requests),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// `Ok` if this device's user may `cap` in group `id`, else the
    /// refusal the DS would give, before anything is sent.
    pub(super) fn require(&self, id: &GroupId, cap: Capability) -> Result<()> {
        match policy_of(&self.load_group(&self.db, id)?)? {
            Some(p) => Ok(p.require(self.name(), cap)?),
            None => Ok(()),
        }
    }

    /// `Ok` unless this device's user is the last owner of group `id` with
    /// other users in it: it must hand over before it leaves.
    pub(super) fn check_may_leave(&self, id: &GroupId) -> Result<()> {
        let g = self.load_group(&self.db, id)?;
        let Some(p) = policy_of(&g)? else {
            return Ok(());
        };
        let others: BTreeSet<String> = crate::follow::member_devices(&g)
            .into_iter()
            .map(|(u, _)| u)
            .filter(|u| u != self.name())
            .collect();
        Ok(policy::check_owners(&p.retain(&others), &others)?)
    }
}
