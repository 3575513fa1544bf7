//! Recovery: groups this device lost, forks detected by epoch
//! authenticators, GroupInfo publication and rejoining by external commit.

use std::time::Duration;

use bytes::Bytes;
use huddle_core::mls::{self};
use huddle_core::proto::{ErrorCode, Request, Response};
use huddle_core::GroupId;
use openmls::prelude::{tls_codec::Deserialize as _, *};
use tracing::{debug, warn};

use crate::db::groups::{GroupRow, GroupState};
use crate::db::history::Origin;
use crate::db::{self, Provider};
use crate::error::{ClientError, Result};
use crate::event::{Event, EventKind};
use crate::follow::{self, DsGroupState, ForkSigns};
use crate::follow::{member_keys, member_names};

use super::{mls_gid, now_ms, serialize, Client, COMMIT_ATTEMPTS, REJOIN_PAUSE};

impl Client {
    /// Groups the DS counts this user a member of but this device has no
    /// state for (for example after its database was lost): reported once
    /// each as `fork_detected`.
    pub(super) async fn check_lost_groups(&mut self) -> Result<Vec<Event>> {
        let Response::Groups { groups } = self.request(&Request::ListGroups).await? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for g in groups {
            let id = g.group;
            // A group this device follows is settled by its log; one it
            // has no state for, or believes it left, while the DS counts
            // it in (a Welcome lost or expired), is rejoined.
            let following = |r: Option<GroupRow>| {
                r.is_some_and(|r| {
                    matches!(
                        r.state,
                        GroupState::Active
                            | GroupState::Leaving
                            | GroupState::Creating
                            | GroupState::Rejoining
                    )
                })
            };
            if following(db::groups::load(&self.db, &id)?) {
                continue;
            }
            // Another process of the home may be joining it right now.
            let _lock = self.locks.lock(&id).await?;
            if following(db::groups::load(&self.db, &id)?) {
                continue;
            }
            warn!(group = %id, "this device has no state for a group it is a member of; rejoining");
            match self
                .rejoin(&id, "this device had no state for the group")
                .await
            {
                Ok(evs) => {
                    out.extend(evs);
                    continue;
                }
                Err(err) => {
                    warn!(group = %id, error = %err, "rejoin failed; trying again at the next sync");
                    let key = format!("lost_reported:{id}");
                    if db::settings::get(&self.db, &key)? == 1 {
                        continue;
                    }
                    db::settings::set(&self.db, &key, 1)?;
                    let e = Event::new(
                        EventKind::ForkDetected {
                            epoch: g.epoch,
                            members: Vec::new(),
                            text: Some(format!(
                                "this device has no state for this group; rejoining failed ({err}) and is retried at the next sync"
                            )),
                        },
                        &id.to_string(),
                        self.name(),
                        g.head,
                        now_ms(),
                    );
                    db::history::record_note(&self.db, &id, &e)?;
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    /// Publishes this member's epoch authenticator (hashed) for the current
    /// epoch and returns what the other members published.
    pub async fn compare_epoch(
        &mut self,
        group: &str,
    ) -> Result<(u64, [u8; 32], Vec<(String, [u8; 32])>)> {
        let id = self.resolve_group(group)?;
        let (epoch, auth) = self.epoch_authenticator(group)?;
        let hash = *blake3::hash(&auth).as_bytes();
        match self
            .request(&Request::EpochAuthenticator {
                group: id,
                epoch,
                hash,
            })
            .await?
        {
            Response::EpochAuthenticators { published } => Ok((epoch, hash, published)),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Publishes this member's epoch authenticator (hashed) for the group's
    /// current epoch and compares it with what other members published for
    /// the same epoch. Members who computed another value have another view
    /// of the group (a fork): reported as a `fork_detected` event naming
    /// them, once per epoch.
    ///
    /// When this device is the one that diverged it rejoins the group by an
    /// external commit on its own, on evidence other members cannot forge:
    /// it has read the whole log and is still behind the group's epoch (a
    /// commit it could not process), or the GroupInfo the DS keeps for its
    /// epoch (whose group context the DS checked against the commits it
    /// accepted) carries another transcript than its own. What others
    /// publish only makes it look: a few members publishing false values
    /// cannot push it into rejoining. It rejoins at most once per
    /// [`REJOIN_PAUSE`] per group. Otherwise, if the DS holds no GroupInfo
    /// for the current epoch, this member publishes one, so that others can
    /// rejoin.
    pub async fn check_fork(&mut self, id: &GroupId) -> Result<Vec<Event>> {
        if !db::groups::load(&self.db, id)?
            .is_some_and(|r| matches!(r.state, GroupState::Active | GroupState::Leaving))
        {
            return Ok(Vec::new());
        }
        let (epoch, hash, published) = self.compare_epoch(&id.to_string()).await?;
        let key = format!("fork_checked:{id}");
        let ds = match self.request(&Request::GroupState { group: *id }).await? {
            Response::GroupState {
                epoch,
                head,
                group_info_epoch,
                ..
            } => Some(DsGroupState {
                epoch,
                head,
                group_info_epoch,
            }),
            _ => None,
        };
        let cursor = db::groups::load(&self.db, id)?
            .map(|r| r.cursor)
            .unwrap_or(0);
        let ForkSigns {
            differ,
            behind,
            info_missing,
        } = follow::fork_signs(self.principal(), epoch, &hash, published, cursor, ds);
        if differ.is_empty() {
            if info_missing {
                self.publish_group_info(id).await;
            }
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        // Reported once per epoch, not on every sync.
        if db::settings::get(&self.db, &key)? != epoch + 1 {
            db::settings::set(&self.db, &key, epoch + 1)?;
            warn!(group = %id, epoch, members = ?differ, "epoch authenticators differ: the group has forked");
            let cursor = db::groups::load(&self.db, id)?
                .map(|r| r.cursor)
                .unwrap_or(0);
            let mut e = Event::new(
                EventKind::ForkDetected {
                    epoch,
                    members: differ,
                    text: None,
                },
                &id.to_string(),
                self.name(),
                cursor,
                now_ms(),
            );
            e.group_name = db::groups::load(&self.db, id)?
                .map(|r| r.name)
                .unwrap_or_default();
            db::history::record_note(&self.db, id, &e)?;
            out.push(e);
        }
        let diverged = behind || self.differs_from_ds_group_info(id, epoch).await?;
        let last = db::settings::get(&self.db, &format!("rejoined_at:{id}"))?;
        let paused = now_ms().saturating_sub(last) < REJOIN_PAUSE.as_millis() as u64;
        if diverged && paused {
            warn!(group = %id, epoch, "this device's state of the group diverged; it rejoined a moment ago, so it waits before it rejoins again");
        }
        if diverged && !paused {
            warn!(group = %id, epoch, "this device's state of the group diverged; rejoining");
            match self
                .rejoin(id, "this device's state had diverged from the group's")
                .await
            {
                Ok(evs) => out.extend(evs),
                Err(err) => {
                    warn!(group = %id, error = %err, "rejoin failed; trying again at the next sync")
                }
            }
        }
        Ok(out)
    }

    /// Whether the GroupInfo the DS keeps for `epoch` of the group carries
    /// another confirmed transcript than this device's state: its group
    /// context is the one the DS computed from the commits it accepted
    /// (checked when the GroupInfo was published), so no member alone can
    /// make it differ. `false` when the DS keeps none for this epoch.
    pub(super) async fn differs_from_ds_group_info(
        &mut self,
        id: &GroupId,
        epoch: u64,
    ) -> Result<bool> {
        let info = match self.request(&Request::JoinInfo { group: *id }).await {
            Ok(Response::JoinInfo {
                epoch: e,
                group_info,
                ..
            }) if e == epoch => group_info,
            Ok(_) | Err(ClientError::Server(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let Ok(msg) = MlsMessageIn::tls_deserialize_exact(info.as_ref()) else {
            return Ok(false);
        };
        let MlsMessageBodyIn::GroupInfo(vgi) = msg.extract() else {
            return Ok(false);
        };
        // This device's own context, read the same way.
        let g = self.load_group(&self.db, id)?;
        let mine = g
            .export_group_info(&self.crypto, &self.identity, false)
            .map_err(ClientError::mls)?;
        let mine = MlsMessageIn::tls_deserialize_exact(serialize(&mine)?.as_ref())
            .map_err(ClientError::mls)?;
        let MlsMessageBodyIn::GroupInfo(mine) = mine.extract() else {
            return Ok(false);
        };
        Ok(vgi.epoch().as_u64() == epoch
            && vgi.group_context().confirmed_transcript_hash()
                != mine.group_context().confirmed_transcript_hash())
    }

    /// Publishes a GroupInfo for the group's current epoch (best effort: a
    /// failure only means a rejoining member waits for the next one).
    pub async fn publish_group_info(&mut self, id: &GroupId) {
        let info = (|| -> Result<Bytes> {
            let provider = Provider::new(&self.crypto, &self.db);
            let g = self.load_group(&self.db, id)?;
            let info = g
                .export_group_info(provider.crypto(), &self.identity, false)
                .map_err(ClientError::mls)?;
            serialize(&info)
        })();
        let r = match info {
            Ok(group_info) => {
                self.request(&Request::PublishGroupInfo {
                    group: *id,
                    group_info,
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            debug!(group = %id, error = %e, "GroupInfo not published");
        }
    }

    /// Rejoins a group this user is a member of but this device has no
    /// usable state for (lost, or diverged): an external commit built from
    /// the GroupInfo and ratchet tree the DS keeps for the current epoch. It
    /// replaces this user's old leaf, so the group moves to a new epoch whose
    /// secrets the old state never knew. Messages sent before it are not
    /// readable by the new state; everything after is.
    pub async fn rejoin(&mut self, id: &GroupId, why: &str) -> Result<Vec<Event>> {
        self.join_externally(id, why, Join::Rejoin).await
    }

    /// An external commit into group `id`: a rejoin, or the first join of
    /// a newly linked device or of a holder of an invite, reported as
    /// `joined`.
    pub(super) async fn join_externally(
        &mut self,
        id: &GroupId,
        why: &str,
        how: Join<'_>,
    ) -> Result<Vec<Event>> {
        let _lock = self.locks.lock(id).await?;
        let first = !matches!(how, Join::Rejoin);
        for attempt in 0..COMMIT_ATTEMPTS {
            let ask = match how {
                Join::Invite(secret) => Request::InviteInfo {
                    group: *id,
                    proof: huddle_core::policy::info_proof(secret, id.as_bytes(), self.principal())
                        .into(),
                },
                _ => Request::JoinInfo { group: *id },
            };
            let (epoch, info, tree) = match self.request(&ask).await? {
                Response::JoinInfo {
                    epoch,
                    group_info,
                    tree,
                    ..
                } => (epoch, group_info, tree),
                other => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
            };
            let commit = {
                let tx = self.db.unchecked_transaction()?;
                let provider = Provider::new(&self.crypto, &tx);
                if let Some(mut old) =
                    MlsGroup::load(provider.storage(), &mls_gid(id)).map_err(ClientError::mls)?
                {
                    old.delete(provider.storage()).map_err(ClientError::mls)?;
                }
                let msg =
                    MlsMessageIn::tls_deserialize_exact(info.as_ref()).map_err(ClientError::mls)?;
                let MlsMessageBodyIn::GroupInfo(vgi) = msg.extract() else {
                    return Err(ClientError::Protocol("the DS sent no GroupInfo".into()));
                };
                if vgi.group_id().as_slice() != id.as_bytes() || vgi.epoch().as_u64() != epoch {
                    return Err(ClientError::Protocol(
                        "the DS sent a GroupInfo for another group or epoch".into(),
                    ));
                }
                let tree = RatchetTreeIn::tls_deserialize_exact(tree.as_ref())
                    .map_err(ClientError::mls)?;
                // Verifies the GroupInfo's signature against the tree and
                // the tree against the group context's tree hash.
                let aad = match how {
                    // The invite's proof, which the DS and every member
                    // check (PROTOCOL.md 13.10).
                    Join::Invite(secret) => huddle_core::policy::join_aad(
                        secret,
                        id.as_bytes(),
                        epoch,
                        self.principal(),
                    ),
                    _ => Vec::new(),
                };
                let (group, bundle) = MlsGroup::external_commit_builder()
                    .with_aad(aad)
                    .with_ratchet_tree(tree)
                    .with_config(mls::join_config())
                    .build_group(&provider, vgi, self.identity.credential())
                    .map_err(ClientError::mls)?
                    .leaf_node_parameters(
                        LeafNodeParameters::builder()
                            .with_capabilities(mls::capabilities())
                            .build(),
                    )
                    .load_psks(provider.storage())
                    .map_err(ClientError::mls)?
                    .build(provider.rand(), provider.crypto(), &self.identity, |_| true)
                    .map_err(ClientError::mls)?
                    .finalize(&provider)
                    .map_err(ClientError::mls)?;
                let commit = serialize(bundle.commit())?;
                let changed = db::users::remember_keys(&tx, &member_keys(&group), now_ms())?;
                if !changed.is_empty() {
                    warn!(group = %id, users = ?changed, "identity keys differ from the ones first seen");
                }
                db::groups::start_rejoin(&tx, id, now_ms())?;
                tx.commit()?;
                commit
            };
            let r = self
                .request(&Request::Commit {
                    group: *id,
                    commit,
                    welcome: None,
                })
                .await;
            match r {
                Ok(Response::Appended { seq, epoch }) => {
                    let tx = self.db.unchecked_transaction()?;
                    db::groups::rejoined(&tx, id, seq)?;
                    db::history::mark_own(&tx, id, seq)?;
                    let g = self.load_group(&tx, id)?;
                    let members = member_names(&g);
                    // Joined with an invite: shown as added by the member
                    // who made it; the event is reported here, not again
                    // by the next `sync`.
                    let (from, origin) = match how {
                        Join::Invite(secret) => (
                            crate::follow::policy_of(&g)?
                                .and_then(|p| {
                                    p.invite(secret.verifying_key().as_bytes())
                                        .map(|i| i.by.clone())
                                })
                                .unwrap_or_else(|| self.name().to_owned()),
                            Origin::Own,
                        ),
                        _ => (self.name().to_owned(), Origin::Others),
                    };
                    drop(g);
                    let kind = if first {
                        EventKind::Joined { members, epoch }
                    } else {
                        EventKind::Rejoined {
                            members,
                            epoch,
                            text: Some(why.to_owned()),
                        }
                    };
                    let mut e = Event::new(kind, &id.to_string(), &from, seq, now_ms());
                    e.group_name = db::groups::load(&tx, id)?
                        .map(|r| r.name)
                        .unwrap_or_default();
                    db::history::record(&tx, id, std::slice::from_ref(&e), origin)?;
                    tx.commit()?;
                    db::settings::set(&self.db, &format!("lost_reported:{id}"), 0)?;
                    db::settings::set(&self.db, &format!("rejoined_at:{id}"), now_ms())?;
                    debug!(group = %id, seq, epoch, attempt, "rejoined by external commit");
                    self.publish_group_info(id).await;
                    return Ok(vec![e]);
                }
                Ok(other) => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
                // Someone committed first: the GroupInfo is stale. The state
                // row stays 'rejoining'; try again with the new one.
                Err(ClientError::Server(e)) if e.code == ErrorCode::StaleEpoch => {
                    debug!(group = %id, attempt, "rejoin lost the epoch; retrying");
                    tokio::time::sleep(Duration::from_millis(20 * (attempt as u64 + 1))).await;
                    continue;
                }
                Err(e @ ClientError::Server(_)) if matches!(how, Join::Invite(_)) => {
                    // Refused: this device was never in the group.
                    let tx = self.db.unchecked_transaction()?;
                    let provider = Provider::new(&self.crypto, &tx);
                    if let Some(mut g) = MlsGroup::load(provider.storage(), &mls_gid(id))
                        .map_err(ClientError::mls)?
                    {
                        g.delete(provider.storage()).map_err(ClientError::mls)?;
                    }
                    db::groups::forget(&tx, id)?;
                    tx.commit()?;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Contended(
            "other members kept committing first while this device rejoined".into(),
        ))
    }
}

/// What an external commit is for.
#[derive(Clone, Copy)]
pub(super) enum Join<'a> {
    /// This device lost or forked its state.
    Rejoin,
    /// A newly linked device joins its user's group.
    Device,
    /// A holder of an invite joins: the invite's secret.
    Invite(&'a ed25519_dalek::SigningKey),
}
