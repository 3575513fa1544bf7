//! Changing who is in a group: adds, removals, key updates, leaving,
//! committing others' proposals, and the commit-and-retry loop under them.

use std::collections::HashSet;

use huddle_core::mls::{self, principal_of};
use huddle_core::proto::{ClaimedKeyPackage, ErrorCode, Request, Response, UserInfo};
use huddle_core::GroupId;
use openmls::prelude::*;
use tracing::debug;

use crate::app::AppMessage;
use crate::db::groups::GroupState;
use crate::db::history::Origin;
use crate::db::{self, Provider};
use crate::error::{ClientError, Result};
use crate::event::{Event, EventKind};
use crate::follow::{self, Duty};
use crate::identity::Identity;

use super::roles::{build_commit, CommitPlan};
use super::{now_ms, serialize, Client, CommitOut, COMMIT_ATTEMPTS};

impl Client {
    /// Adds users to a group in one commit.
    pub async fn add(&mut self, group: &str, users: &[String]) -> Result<Vec<Event>> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.active_group(&id)?;
        let current: HashSet<String> = self.members(group)?.into_iter().collect();
        let mut wanted: Vec<String> = Vec::new();
        for u in users {
            huddle_core::ids::check_user_name(u).map_err(|e| ClientError::Usage(e.to_string()))?;
            if current.contains(u) {
                return Err(ClientError::Usage(format!("{u} is already a member")));
            }
            if !wanted.contains(u) {
                wanted.push(u.clone());
            }
        }
        if wanted.is_empty() {
            return Err(ClientError::Usage("name at least one user to add".into()));
        }
        // Before any key package is claimed.
        self.require(&id, huddle_core::policy::Capability::Add)?;
        // Every current device of each user, with its key from the user's
        // device log (checked from the key first seen for the user).
        let mut infos = Vec::new();
        for u in &wanted {
            let set = match self.verified_devices(u).await {
                Err(ClientError::Server(e)) if e.code == ErrorCode::UnknownUser => {
                    return Err(ClientError::Usage(format!(
                        "{u} is not registered on this server"
                    )))
                }
                r => r?,
            };
            for d in set.devices() {
                infos.push(UserInfo {
                    name: huddle_core::devices::principal(u, d.device),
                    identity_key: d.key,
                });
            }
        }
        self.add_devices(&id, infos, (Change::Added, wanted)).await
    }

    /// Adds the devices `infos` (principals with their keys from their
    /// users' device logs) to group `id` in one commit, reported as the
    /// addition of `users`, then tells everyone the group's name.
    pub(super) async fn add_devices(
        &mut self,
        id: &GroupId,
        infos: Vec<UserInfo>,
        report: (Change, Vec<String>),
    ) -> Result<Vec<Event>> {
        let id = *id;
        self.check_known_keys(&infos)?;
        let Response::KeyPackages { packages } = self
            .request(&Request::ClaimKeyPackages {
                users: infos.iter().map(|i| i.name.clone()).collect(),
            })
            .await?
        else {
            return Err(ClientError::Protocol("expected KeyPackages".into()));
        };
        let kps = check_claimed(&self.crypto, &packages, &infos, now_ms() / 1000)?;
        let events = self
            .commit_with_retry(&id, Some(report), Origin::Own, move |g, p, s| {
                // No UpdatePath (RFC 9420 §12.4): an add-only commit still
                // starts a new epoch the joiners cannot reach back from, and
                // without a path it stays small in a large group (every
                // member downloads it). See docs/SECURITY.md §6.6.
                build_commit(
                    g,
                    p,
                    s,
                    CommitPlan {
                        adds: kps.clone(),
                        ..CommitPlan::default()
                    },
                )
            })
            .await?;
        // Tell everyone (joiners included) the group's name.
        let name = db::groups::load(&self.db, &id)?
            .map(|r| r.name)
            .unwrap_or_default();
        if !name.is_empty() {
            self.send_app(&id, &AppMessage::GroupName { name }).await?;
        }
        Ok(events)
    }

    /// Removes users from a group in one commit.
    pub async fn remove(&mut self, group: &str, users: &[String]) -> Result<Vec<Event>> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.active_group(&id)?;
        if users
            .iter()
            .any(|u| u == self.name() || u == self.principal())
        {
            return Err(ClientError::Usage(
                "to remove yourself, use `huddle group leave`".into(),
            ));
        }
        // A user name removes every device of that user; `USER/N` one device.
        let g = self.load_group(&self.db, &id)?;
        let mut principals = Vec::new();
        for u in users {
            let found: Vec<String> = g
                .members()
                .filter_map(|m| principal_of(&m.credential))
                .filter(|p| p == u || (!u.contains('/') && huddle_core::devices::user_part(p) == u))
                .collect();
            if found.is_empty() {
                return Err(ClientError::Usage(format!("{u} is not a member")));
            }
            principals.extend(found);
        }
        drop(g);
        let report = if users.iter().all(|u| !u.contains('/')) {
            (Change::Removed, users.to_vec())
        } else {
            (Change::DevicesRemoved, principals.clone())
        };
        self.remove_principals(&id, &principals, report).await
    }

    /// Removes the leaves of `principals` from group `id` in one commit,
    /// reported as `report` says.
    pub(super) async fn remove_principals(
        &mut self,
        id: &GroupId,
        principals: &[String],
        report: (Change, Vec<String>),
    ) -> Result<Vec<Event>> {
        let users = principals.to_vec();
        self.commit_with_retry(id, Some(report), Origin::Own, move |g, p, s| {
            let mut leaves = Vec::new();
            for u in &users {
                let m = g
                    .members()
                    .find(|m| principal_of(&m.credential).as_deref() == Some(u.as_str()))
                    .ok_or_else(|| ClientError::Usage(format!("{u} is not a member")))?;
                leaves.push(m.index);
            }
            build_commit(
                g,
                p,
                s,
                CommitPlan {
                    removes: leaves,
                    ..CommitPlan::default()
                },
            )
        })
        .await
    }

    /// Rotates this device's keys in the group.
    pub async fn update(&mut self, group: &str) -> Result<Vec<Event>> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.active_group(&id)?;
        self.commit_with_retry(&id, None, Origin::Own, |g, p, s| {
            build_commit(
                g,
                p,
                s,
                CommitPlan {
                    self_update: true,
                    ..CommitPlan::default()
                },
            )
        })
        .await
    }

    /// Asks to leave the group: posts a proposal removing this device, which
    /// a remaining member commits. The group shows as `leaving` until then.
    /// Returns whether the group was left at once (this device was its only
    /// member: nobody is left to commit).
    pub async fn leave(&mut self, group: &str) -> Result<bool> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.active_group(&id)?;
        if self.load_group(&self.db, &id)?.members().count() == 1 {
            db::groups::set_state(&self.db, &id, GroupState::Left)?;
            return Ok(true);
        }
        self.check_may_leave(&id)?;
        self.propose_leave(&id).await?;
        Ok(false)
    }

    pub(super) async fn propose_leave(&mut self, id: &GroupId) -> Result<()> {
        let _lock = self.locks.lock(id).await?;
        for _ in 0..COMMIT_ATTEMPTS {
            let proposal = {
                let tx = self.db.unchecked_transaction()?;
                let provider = Provider::new(&self.crypto, &tx);
                let mut g = self.load_group(&tx, id)?;
                let mut out = vec![serialize(
                    &g.leave_group(&provider, &self.identity)
                        .map_err(ClientError::mls)?,
                )?];
                // A user leaves with all its devices: this one proposes the
                // removal of the others too.
                let me = self.principal().to_owned();
                let siblings: Vec<LeafNodeIndex> = g
                    .members()
                    .filter(|m| {
                        principal_of(&m.credential).is_some_and(|p| {
                            p != me && huddle_core::devices::user_part(&p) == self.name()
                        })
                    })
                    .map(|m| m.index)
                    .collect();
                for leaf in siblings {
                    let (msg, _) = g
                        .propose_remove_member(&provider, &self.identity, leaf)
                        .map_err(ClientError::mls)?;
                    out.push(serialize(&msg)?);
                }
                // The proposals are also kept in our own proposal store; the
                // transaction is not committed, the DS's copy is what counts.
                out
            };
            let mut posted = Ok(());
            for proposal in proposal {
                posted = self
                    .request(&Request::Proposal {
                        group: *id,
                        proposal,
                    })
                    .await
                    .map(|_| ());
                if posted.is_err() {
                    break;
                }
            }
            match posted {
                Ok(()) => {
                    db::groups::set_state(&self.db, id, GroupState::Leaving)?;
                    return Ok(());
                }
                Err(ClientError::Server(e)) if e.code == ErrorCode::StaleEpoch => {
                    self.sync_group(id).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Contended(
            "the group kept changing while the leave request was posted".into(),
        ))
    }

    /// Builds a commit with `make`, posts it, merges it when accepted, and
    /// retries after syncing when another commit won the epoch.
    pub(super) async fn commit_with_retry<F>(
        &mut self,
        id: &GroupId,
        event: Option<(Change, Vec<String>)>,
        origin: Origin,
        make: F,
    ) -> Result<Vec<Event>>
    where
        F: Fn(&mut MlsGroup, &Provider<'_>, &Identity) -> Result<CommitOut>,
    {
        // No other process of the home may replace our pending commit
        // before it is merged or discarded.
        let _lock = self.locks.lock(id).await?;
        for attempt in 0..COMMIT_ATTEMPTS {
            let (commit, welcome) = {
                let tx = self.db.unchecked_transaction()?;
                let provider = Provider::new(&self.crypto, &tx);
                let mut g = self.load_group(&tx, id)?;
                if g.pending_commit().is_some() {
                    g.clear_pending_commit(provider.storage())
                        .map_err(ClientError::mls)?;
                }
                let (c, w) = make(&mut g, &provider, &self.identity)?;
                let commit = serialize(&c)?;
                let welcome = w.as_ref().map(serialize).transpose()?;
                db::groups::set_pending_commit(&tx, id, Some(commit.as_ref()))?;
                tx.commit()?;
                (commit, welcome)
            };
            let r = self
                .request(&Request::Commit {
                    group: *id,
                    commit,
                    welcome,
                })
                .await;
            match r {
                Ok(Response::Appended { seq, epoch }) => {
                    let tx = self.db.unchecked_transaction()?;
                    let provider = Provider::new(&self.crypto, &tx);
                    let mut g = self.load_group(&tx, id)?;
                    g.merge_pending_commit(&provider)
                        .map_err(ClientError::mls)?;
                    db::groups::commit_merged(&tx, id)?;
                    db::history::mark_own(&tx, id, seq)?;
                    let mut events = Vec::new();
                    if let Some((change, members)) = &event {
                        let kind = change.event(members.clone(), epoch);
                        let mut e = Event::new(kind, &id.to_string(), self.name(), seq, now_ms());
                        e.group_name = db::groups::load(&tx, id)?
                            .map(|r| r.name)
                            .unwrap_or_default();
                        events.push(e);
                    }
                    db::history::record(&tx, id, &events, origin)?;
                    tx.commit()?;
                    debug!(group = %id, seq, epoch, attempt, "commit accepted");
                    self.publish_group_info(id).await;
                    return Ok(events);
                }
                Ok(other) => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
                Err(ClientError::Server(e)) => {
                    self.discard_pending_commit(id)?;
                    if e.code == ErrorCode::StaleEpoch {
                        debug!(group = %id, attempt, "commit lost the epoch; syncing and retrying");
                        self.sync_group(id).await?;
                        self.active_group(id)?;
                        continue;
                    }
                    return Err(ClientError::Server(e));
                }
                // A connection failure: the commit may or may not have landed.
                // The pending commit stays; the next sync settles it.
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Contended(
            "other members kept committing first".into(),
        ))
    }

    /// A pending commit that is not in the log read up to its head: the DS
    /// never took it, unless the process that made it is still waiting for
    /// the answer. Only when no process of the home holds the group's lock
    /// is it abandoned, and discarded.
    pub(super) fn discard_abandoned_commit(&mut self, id: &GroupId) -> Result<()> {
        let Some(_lock) = self.locks.try_lock(id)? else {
            return Ok(());
        };
        self.discard_pending_commit(id)
    }

    pub(super) fn discard_pending_commit(&mut self, id: &GroupId) -> Result<()> {
        let tx = self.db.unchecked_transaction()?;
        let provider = Provider::new(&self.crypto, &tx);
        let mut g = self.load_group(&tx, id)?;
        g.clear_pending_commit(provider.storage())
            .map_err(ClientError::mls)?;
        db::groups::set_pending_commit(&tx, id, None)?;
        tx.commit()?;
        Ok(())
    }

    /// Commits pending proposals if this device is the designated committer
    /// (the member with the lowest leaf index that is not being removed), or
    /// if `force`, or once the proposals are older than [`PROPOSAL_GRACE`](follow::PROPOSAL_GRACE).
    pub async fn maybe_commit_proposals(
        &mut self,
        id: &GroupId,
        force: bool,
    ) -> Result<Vec<Event>> {
        let Some(row) = db::groups::load(&self.db, id)? else {
            return Ok(Vec::new());
        };
        // A leaving member never commits its own removal.
        if row.state != GroupState::Active {
            return Ok(Vec::new());
        }
        // Every stored proposal sets proposals_since_ms in the transaction
        // that stores it, and merging a commit clears both: without it there
        // is nothing to commit, and no need to load the group's state (which
        // grows with the group) after every batch and every tick.
        if row.proposals_since_ms.is_none() {
            return self.maybe_releave(id).await;
        }
        let g = self.load_group(&self.db, id)?;
        match follow::committer_duty(&g, row.proposals_since_ms, force, now_ms()) {
            Duty::Nothing => return self.maybe_releave(id).await,
            Duty::Wait => return Ok(Vec::new()),
            Duty::Commit => {}
        }
        self.commit_pending_proposals(id).await
    }

    pub(super) async fn maybe_releave(&mut self, id: &GroupId) -> Result<Vec<Event>> {
        let key = format!("releave:{id}");
        if db::settings::get(&self.db, &key)? == 1 {
            db::settings::set(&self.db, &key, 0)?;
            if db::groups::load(&self.db, id)?.is_some_and(|r| r.state == GroupState::Active) {
                self.propose_leave(id).await?;
            }
        }
        Ok(Vec::new())
    }

    pub(super) async fn commit_pending_proposals(&mut self, id: &GroupId) -> Result<Vec<Event>> {
        let g = self.load_group(&self.db, id)?;
        let mut all_self = true;
        let leaving: Vec<String> = g
            .pending_proposals()
            .filter_map(|p| match p.proposal() {
                Proposal::Remove(r) => {
                    let name = g
                        .member_at(r.removed())
                        .and_then(|m| principal_of(&m.credential))?;
                    all_self &= crate::follow::leaves_itself(&g, p, r.removed(), &name);
                    Some(name)
                }
                _ => None,
            })
            .collect();
        if g.pending_proposals().next().is_none() {
            return Ok(Vec::new());
        }
        let kind = if all_self {
            Change::Left
        } else {
            Change::Removed
        };
        // A user all of whose devices go is reported once, by name.
        let leaving = {
            use huddle_core::devices::user_part;
            let all = crate::follow::member_devices(&g);
            let mut out: Vec<String> = Vec::new();
            for p in &leaving {
                let u = user_part(p);
                let going = leaving.iter().filter(|q| user_part(q) == u).count();
                let whole = all.iter().any(|(name, n)| name == u && *n == going);
                let shown = if whole { u.to_owned() } else { p.clone() };
                if !out.contains(&shown) {
                    out.push(shown);
                }
            }
            out
        };
        let r = self
            .commit_with_retry(id, Some((kind, leaving)), Origin::Others, |g, p, s| {
                if g.pending_proposals().next().is_none() {
                    return Err(ClientError::NothingToCommit);
                }
                build_commit(g, p, s, CommitPlan::default())
            })
            .await;
        match r {
            // Someone else committed them while we synced.
            Err(ClientError::NothingToCommit) => Ok(Vec::new()),
            other => other,
        }
    }
}

/// The membership change a commit of this device makes, for the event
/// that reports it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Change {
    Added,
    Removed,
    Left,
    DevicesAdded,
    DevicesRemoved,
    /// The members named were given this role.
    Role(huddle_core::policy::Role),
    /// The settings changed: the one "member" named is the settings as
    /// they are now.
    Settings,
}

impl Change {
    fn event(self, members: Vec<String>, epoch: u64) -> EventKind {
        match self {
            Change::Added => EventKind::MemberAdded { members, epoch },
            Change::DevicesAdded => EventKind::DeviceAdded { members, epoch },
            Change::DevicesRemoved => EventKind::DeviceRemoved { members, epoch },
            Change::Removed => EventKind::MemberRemoved {
                members,
                epoch: Some(epoch),
                text: None,
            },
            Change::Left => EventKind::Left {
                members,
                epoch: Some(epoch),
                text: None,
            },
            Change::Role(role) => EventKind::RoleChanged {
                members,
                role: role.name().to_owned(),
                epoch,
            },
            Change::Settings => EventKind::PolicyChanged {
                text: members.join(", "),
                epoch,
            },
        }
    }
}

/// The key packages the DS handed out for `infos`' users, refused unless
/// each passes the checks the DS applied when it was published (PROTOCOL.md
/// 10.1) with this device's clock `now` (seconds), for the user it was
/// claimed for and with that user's identity key: a DS that hands out
/// another user's package, or one that no longer holds, is not believed.
pub(crate) fn check_claimed(
    crypto: &impl OpenMlsCrypto,
    packages: &[ClaimedKeyPackage],
    infos: &[UserInfo],
    now: u64,
) -> Result<Vec<KeyPackage>> {
    let mut out = Vec::new();
    for p in packages {
        let key = infos
            .iter()
            .find(|i| i.name == p.user)
            .map(|i| i.identity_key)
            .ok_or_else(|| {
                ClientError::Protocol(format!("unexpected key package for {}", p.user))
            })?;
        let kp =
            mls::verify_key_package(crypto, &p.key_package, &p.user, &key, now).map_err(|e| {
                ClientError::Mls(format!(
                    "the key package handed out for {} is refused: {e}",
                    p.user
                ))
            })?;
        out.push(kp);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identity::Identity;
    use openmls::prelude::tls_codec::Serialize as _;
    use openmls_rust_crypto::{OpenMlsRustCrypto, RustCrypto};

    const NOW_SLACK: u64 = 60;

    fn package(who: &Identity, name: &str, caps: Capabilities) -> ClaimedKeyPackage {
        let provider = OpenMlsRustCrypto::default();
        let cred = CredentialWithKey {
            credential: mls::credential_for(name),
            signature_key: who.public().to_vec().into(),
        };
        let kp = KeyPackage::builder()
            .key_package_lifetime(Lifetime::new(mls::KEY_PACKAGE_LIFETIME_SECS))
            .leaf_node_capabilities(caps)
            .build(mls::CIPHERSUITE, &provider, who, cred)
            .unwrap();
        ClaimedKeyPackage {
            user: "bob".into(),
            key_package: kp.key_package().tls_serialize_detached().unwrap().into(),
            last_resort: false,
        }
    }

    fn info(who: &Identity) -> UserInfo {
        UserInfo {
            name: "bob".into(),
            identity_key: who.public(),
        }
    }

    fn refusal(r: Result<Vec<KeyPackage>>) -> String {
        match r {
            Err(ClientError::Mls(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn claimed_packages_are_checked_as_the_ds_checks_them() {
        let crypto = RustCrypto::default();
        let now = now_ms() / 1000 + NOW_SLACK;
        let bob = Identity::generate("bob");
        let good = package(&bob, "bob", mls::capabilities());
        assert_eq!(
            check_claimed(&crypto, std::slice::from_ref(&good), &[info(&bob)], now)
                .unwrap()
                .len(),
            1
        );
        // Bob's identity key, but capabilities without last_resort.
        let plain = Capabilities::new(None, Some(&[mls::CIPHERSUITE]), None, None, None);
        let m = refusal(check_claimed(
            &crypto,
            &[package(&bob, "bob", plain)],
            &[info(&bob)],
            now,
        ));
        assert!(m.contains("do not list extension last_resort"), "{m}");
        // Carol's package handed out as Bob's.
        let carol = Identity::generate("carol");
        let m = refusal(check_claimed(
            &crypto,
            &[package(&carol, "carol", mls::capabilities())],
            &[info(&bob)],
            now,
        ));
        assert!(m.contains("credential names"), "{m}");
        // Bob's name under another key than the one the DS lists for him.
        let m = refusal(check_claimed(
            &crypto,
            &[package(&carol, "bob", mls::capabilities())],
            &[info(&bob)],
            now,
        ));
        assert!(m.contains("not the registered identity key"), "{m}");
        // Past its end on this device's clock.
        let later = now + mls::KEY_PACKAGE_LIFETIME_SECS + 1;
        let m = refusal(check_claimed(&crypto, &[good], &[info(&bob)], later));
        assert!(m.contains("expired"), "{m}");
    }
}
