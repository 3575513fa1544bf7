//! Joining a group with an invite (PROTOCOL.md 10.3, 13.10): what a
//! holder needs to join by external commit, and for invites that need
//! approval, the queue of users an admin may add.

use bytes::Bytes;
use huddle_core::devices::user_part;
use huddle_core::policy::{check_info_proof, Capability};
use huddle_core::proto::{ErrorBody, ErrorCode, Response};
use huddle_core::GroupId;

use crate::group::{policy_error, GroupView};
use crate::store::{JoinRequest, StoreError};

use super::Service;

impl Service {
    /// For a holder of an invite of `group`'s policy: what joining needs
    /// (`JoinInfo`), or, if the invite needs an admin's approval, the
    /// request recorded (`JoinRequested`).
    pub(super) async fn invite_info(
        &self,
        user: String,
        group: GroupId,
        proof: Bytes,
    ) -> Result<Response, ErrorBody> {
        let handle = self.group_for(&group, &user).await?;
        let view = handle.view();
        let policy = view
            .policy
            .clone()
            .ok_or_else(|| ErrorBody::new(ErrorCode::Forbidden, "this group takes no invites"))?;
        let invite = check_info_proof(&policy, group.as_bytes(), &proof, &user, self.now_ms())
            .map_err(policy_error)?
            .clone();
        if !invite.approval {
            return self.join_info(user, group, Some(proof)).await;
        }
        let name = user_part(&user).to_owned();
        if is_user_in(&view, &name) {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                format!("{name} is in group {group} already"),
            ));
        }
        let waiting = self.waiting(group, &view).await?;
        if invite.max_uses > 0 {
            let used = waiting
                .iter()
                .filter(|r| r.invite == invite.key && r.user != name)
                .count();
            if used >= invite.max_uses as usize {
                return Err(ErrorBody::new(
                    ErrorCode::Forbidden,
                    format!(
                        "the invite was used up ({used} of {} waiting)",
                        invite.max_uses
                    ),
                ));
            }
        }
        let req = JoinRequest {
            user: name,
            invite: invite.key,
            at_ms: self.now_ms(),
        };
        let max = self.config.max_join_requests_per_group;
        self.blocking(move |s| s.put_join_request(&group, &req, max))
            .await?
            .map_err(|e| match e {
                StoreError::Conflict(m) => ErrorBody::new(ErrorCode::QuotaExceeded, m),
                e => e.into(),
            })?;
        Ok(Response::JoinRequested { group })
    }

    /// The users waiting to join `group`, for a member who may add users.
    pub(super) async fn join_requests(
        &self,
        user: String,
        group: GroupId,
    ) -> Result<Response, ErrorBody> {
        let view = self.admitting(&user, &group).await?;
        self.listing(group, &view).await
    }

    /// Turns down `who`'s request to join `group`.
    pub(super) async fn decline_join(
        &self,
        user: String,
        group: GroupId,
        who: String,
    ) -> Result<Response, ErrorBody> {
        let view = self.admitting(&user, &group).await?;
        self.blocking(move |s| s.drop_join_requests(&group, &[who]))
            .await?
            .map_err(ErrorBody::from)?;
        self.listing(group, &view).await
    }

    /// The view of `group` for `user`, a current member who may add users.
    async fn admitting(&self, user: &str, group: &GroupId) -> Result<GroupView, ErrorBody> {
        let handle = self.group_for(group, user).await?;
        let view = handle.view();
        if !view.is_member(user) {
            return Err(Self::not_member(user, group));
        }
        if let Some(p) = &view.policy {
            p.require(user_part(user), Capability::Add)
                .map_err(policy_error)?;
        }
        Ok(view)
    }

    /// The requests still waiting, as sent.
    async fn listing(&self, group: GroupId, view: &GroupView) -> Result<Response, ErrorBody> {
        let requests = self
            .waiting(group, view)
            .await?
            .into_iter()
            .map(|r| (r.user, hex::encode(&r.invite[..4]), r.at_ms))
            .collect();
        Ok(Response::JoinRequests { requests })
    }

    /// The requests waiting to join `group`: those of users who are in the
    /// group now (an admin added them) or whose invite is no longer in
    /// force are dropped.
    async fn waiting(
        &self,
        group: GroupId,
        view: &GroupView,
    ) -> Result<Vec<JoinRequest>, ErrorBody> {
        let all = self
            .blocking(move |s| s.join_requests(&group))
            .await?
            .map_err(ErrorBody::from)?;
        let now = self.now_ms();
        let (keep, gone): (Vec<JoinRequest>, Vec<JoinRequest>) = all.into_iter().partition(|r| {
            !is_user_in(view, &r.user)
                && view
                    .policy
                    .as_ref()
                    .and_then(|p| p.invite(&r.invite))
                    .is_some_and(|i| i.expires_ms >= now)
        });
        if !gone.is_empty() {
            let users: Vec<String> = gone.into_iter().map(|r| r.user).collect();
            self.blocking(move |s| s.drop_join_requests(&group, &users))
                .await?
                .map_err(ErrorBody::from)?;
        }
        Ok(keep)
    }
}

/// Whether a device of `user` is a current member.
fn is_user_in(view: &GroupView, user: &str) -> bool {
    view.members
        .iter()
        .any(|(p, m)| m.is_current() && user_part(p) == user)
}
