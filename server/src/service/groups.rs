//! Groups: loading and unloading their tasks, creation, posts, and what a
//! member may read of a group's state (trees, GroupInfo, epoch
//! authenticators, the list of its groups).

use std::sync::Arc;

use bytes::Bytes;
use huddle_core::proto::{ErrorBody, ErrorCode, GroupSummary, Response};
use huddle_core::GroupId;
use tracing::{info, warn};

use crate::group::{self, GroupHandle, Post};
use crate::store::StoreError;

use super::Service;

impl Service {
    /// The task of group `id` if the group is in memory (see
    /// [`Service::load_group`]).
    pub fn group(&self, id: &GroupId) -> Option<Arc<GroupHandle>> {
        let h = self.groups.read().expect("groups lock").get(id).cloned();
        if let Some(h) = &h {
            h.touch(self.now_ms());
        }
        h
    }

    /// The task of group `id`, loading the group from the store if it is
    /// not in memory; `None` if there is no such group.
    pub async fn load_group(&self, id: &GroupId) -> Result<Option<Arc<GroupHandle>>, ErrorBody> {
        let loaded = || self.group(id).filter(|h| !h.is_stopped());
        if let Some(h) = loaded() {
            return Ok(Some(h));
        }
        let _loading = self.loading.lock().await;
        if let Some(h) = loaded() {
            return Ok(Some(h));
        }
        if self.closing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(ErrorBody::new(
                ErrorCode::Unavailable,
                "the server is shutting down",
            ));
        }
        let gid = *id;
        let Some(g) = self
            .blocking(move |s| s.group(&gid))
            .await?
            .map_err(ErrorBody::from)?
        else {
            return Ok(None);
        };
        let info = match self.blocking(move |s| s.group_info(&gid)).await? {
            Ok(i) => i,
            Err(e) => {
                warn!(group = %gid, error = %e, "stored GroupInfo unreadable");
                None
            }
        };
        let handle = group::spawn(g.id, g.meta, &g.state, g.members, info, self.shared.clone())
            .map_err(|e| {
                tracing::error!(group = %gid, error = %e, "group not loaded");
                ErrorBody::new(
                    ErrorCode::Internal,
                    "the group's stored state does not load",
                )
            })?;
        self.groups
            .write()
            .expect("groups lock")
            .insert(gid, handle.clone());
        Ok(Some(handle))
    }

    /// Unloads the groups nobody watched or asked for during
    /// `group_idle`; they are loaded again when next asked for.
    pub async fn unload_idle(&self) {
        let before = self
            .now_ms()
            .saturating_sub(self.config.group_idle.as_millis() as u64);
        let idle: Vec<(GroupId, Arc<GroupHandle>)> = self
            .groups
            .read()
            .expect("groups lock")
            .iter()
            .filter(|(_, h)| h.idle_since(before))
            .map(|(id, h)| (*id, h.clone()))
            .collect();
        for (id, h) in idle {
            let _loading = self.loading.lock().await;
            if !h.idle_since(before) {
                continue;
            }
            self.groups.write().expect("groups lock").remove(&id);
            // Finishes what it was given; a command that comes later finds
            // it stopped and goes to the group loaded anew.
            h.stop().await;
        }
    }

    /// Groups in memory now.
    pub fn loaded_groups(&self) -> usize {
        self.groups.read().expect("groups lock").len()
    }

    /// Whether `e` says a group's task stopped under a command while the
    /// server goes on (the group was unloaded), or read the group anew
    /// because another node wrote it: the command may be sent again.
    pub(super) fn retry_after(&self, e: &ErrorBody) -> bool {
        e.code == ErrorCode::Unavailable
            && (e.message == group::STOPPED || e.message == group::STALE)
            && !self.closing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The task of group `id` for a request by `user` that its view
    /// decides (membership, head), brought up to the database first in
    /// cluster mode when the view cannot be trusted to be current: the bus
    /// is down, or the view says `user` is not a member (a joiner's
    /// Welcome may reach it before the commit that added it).
    pub async fn group_for(&self, id: &GroupId, user: &str) -> Result<Arc<GroupHandle>, ErrorBody> {
        let h = self.group_or_err(id).await?;
        self.fresh(&h, user).await;
        Ok(h)
    }

    /// Like [`Service::group_for`], for a task already in hand.
    pub async fn fresh(&self, h: &GroupHandle, user: &str) {
        if let Some(bus) = &self.shared.bus {
            if !bus.is_connected() || !h.with_view(|v| v.is_member(user)) {
                h.refresh().await;
            }
        }
    }

    pub(super) async fn group_or_err(&self, id: &GroupId) -> Result<Arc<GroupHandle>, ErrorBody> {
        self.load_group(id)
            .await?
            .ok_or_else(|| ErrorBody::new(ErrorCode::UnknownGroup, format!("no group {id}")))
    }

    pub(super) fn not_member(user: &str, id: &GroupId) -> ErrorBody {
        ErrorBody::new(
            ErrorCode::NotMember,
            format!("{user} is not a member of group {id}"),
        )
    }

    /// The ratchet tree after the add commit at `seq`, for a member that joined by it.
    pub(super) async fn ratchet_tree(
        &self,
        user: String,
        group: GroupId,
        seq: u64,
    ) -> Result<Response, ErrorBody> {
        let handle = self.group_for(&group, &user).await?;
        let allowed = handle.with_view(|v| {
            v.members
                .get(&user)
                .is_some_and(|m| m.joined_seq <= seq && seq <= m.readable_until(v.head))
        });
        if !allowed {
            return Err(Self::not_member(&user, &group));
        }
        let tree = self
            .blocking(move |s| s.tree(&group, seq))
            .await?
            .map_err(ErrorBody::from)?
            .ok_or_else(|| {
                ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("no tree kept for commit {seq}"),
                )
            })?;
        Ok(Response::RatchetTree { tree })
    }

    /// A member publishes the GroupInfo of the current epoch (for rejoins).
    pub(super) async fn publish_group_info(
        &self,
        user: String,
        group: GroupId,
        group_info: Bytes,
    ) -> Result<Response, ErrorBody> {
        let mut r = self
            .group_or_err(&group)
            .await?
            .publish_group_info(user.clone(), group_info.clone())
            .await;
        if r.as_ref().is_err_and(|e| self.retry_after(e)) {
            r = self
                .group_or_err(&group)
                .await?
                .publish_group_info(user, group_info)
                .await;
        }
        let (seq, epoch) = r?;
        Ok(Response::Appended { seq, epoch })
    }

    /// What a member needs to rejoin by external commit.
    pub(super) async fn join_info(
        &self,
        user: String,
        group: GroupId,
        invite: Option<Bytes>,
    ) -> Result<Response, ErrorBody> {
        let mut j = self
            .group_or_err(&group)
            .await?
            .join_info(user.clone(), invite.clone())
            .await;
        if j.as_ref().is_err_and(|e| self.retry_after(e)) {
            j = self
                .group_or_err(&group)
                .await?
                .join_info(user, invite)
                .await;
        }
        let j = j?;
        Ok(Response::JoinInfo {
            epoch: j.epoch,
            group_info: j.group_info,
            tree: j.tree,
            head: j.head,
        })
    }

    /// The group's epoch, head and members, for a member.
    pub(super) async fn group_state(
        &self,
        user: String,
        group: GroupId,
    ) -> Result<Response, ErrorBody> {
        let handle = self.group_for(&group, &user).await?;
        let view = handle.view();
        if !view.is_member(&user) {
            return Err(Self::not_member(&user, &group));
        }
        Ok(Response::GroupState {
            epoch: view.epoch,
            head: view.head,
            members: view.current_members(),
            group_info_epoch: view.group_info_epoch,
        })
    }

    /// The groups `user` is a member of.
    pub(super) async fn list_groups(&self, user: String) -> Result<Response, ErrorBody> {
        let u = user.clone();
        let ids = self
            .blocking(move |s| s.user_groups(&u))
            .await?
            .map_err(ErrorBody::from)?;
        let mut groups = Vec::new();
        for id in ids {
            if let Some(h) = self.load_group(&id).await? {
                self.fresh(&h, &user).await;
                h.with_view(|v| {
                    if v.is_member(&user) {
                        groups.push(GroupSummary {
                            group: id,
                            epoch: v.epoch,
                            head: v.head,
                        });
                    }
                });
            }
        }
        Ok(Response::Groups { groups })
    }

    /// Publishes `user`'s epoch-authenticator hash for `epoch` and returns what the members published.
    pub(super) async fn epoch_authenticator(
        &self,
        user: String,
        group: GroupId,
        epoch: u64,
        hash: [u8; 32],
    ) -> Result<Response, ErrorBody> {
        let handle = self.group_for(&group, &user).await?;
        let (member, current) = handle.with_view(|v| (v.is_member(&user), v.epoch));
        if !member {
            return Err(Self::not_member(&user, &group));
        }
        if epoch > current {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                format!("group {group} is only at epoch {current}"),
            ));
        }
        let published = self
            .blocking(move |s| s.publish_epoch_authenticator(&group, epoch, &user, hash))
            .await?
            .map_err(ErrorBody::from)?;
        Ok(Response::EpochAuthenticators { published })
    }

    pub(super) async fn create_group(
        &self,
        user: String,
        id: GroupId,
        group_info: Bytes,
        ratchet_tree: Bytes,
    ) -> Result<Response, ErrorBody> {
        if self.group(&id).is_some() {
            return Err(ErrorBody::new(
                ErrorCode::GroupExists,
                format!("group {id} exists"),
            ));
        }
        let key = self.identity_key(&user).await?;
        let u = user.clone();
        let clock = self.config.clock;
        let (write, state) = tokio::task::spawn_blocking(move || {
            group::validate_new_group(id, &u, &key, &group_info, &ratchet_tree, clock())
        })
        .await
        .map_err(|_| ErrorBody::new(ErrorCode::Internal, "internal error"))??;
        let meta = write.meta.clone();
        let members = write.members.clone();
        let info = write.group_info.clone();
        let _guard = self.create.lock().await;
        if self.group(&id).is_some() {
            return Err(ErrorBody::new(
                ErrorCode::GroupExists,
                format!("group {id} exists"),
            ));
        }
        self.shared.writer.write(write).await.map_err(|e| match e {
            StoreError::Conflict(_) => {
                ErrorBody::new(ErrorCode::GroupExists, format!("group {id} exists"))
            }
            other => ErrorBody::from(other),
        })?;
        let handle = group::spawn(id, meta, &state, members, info, self.shared.clone())
            .map_err(ErrorBody::from)?;
        self.groups.write().expect("groups lock").insert(id, handle);
        info!(group = %id, creator = %user, "group created");
        Ok(Response::Appended { seq: 0, epoch: 0 })
    }

    pub(super) async fn post(
        &self,
        user: String,
        group: GroupId,
        post: Post,
    ) -> Result<Response, ErrorBody> {
        let mut r = self
            .group_or_err(&group)
            .await?
            .post(user.clone(), post.clone())
            .await;
        // A post that reached a task being unloaded was not taken: it goes
        // to the group loaded anew.
        if r.as_ref().is_err_and(|e| self.retry_after(e)) {
            r = self.group_or_err(&group).await?.post(user, post).await;
        }
        let (seq, epoch) = r?;
        Ok(Response::Appended { seq, epoch })
    }
}
