//! Reading a group's log and a user's inbox of Welcomes, and expiring
//! inboxes nobody reads.

use huddle_core::proto::{ErrorBody, ErrorCode, Response, MAX_PAGE};
use huddle_core::GroupId;
use tracing::{info, warn};

use super::Service;

impl Service {
    /// Welcomes for `user` after `after`; asking for what follows `after` acknowledges the items up to it, which are deleted.
    pub(super) async fn fetch_inbox(
        &self,
        user: String,
        after: u64,
        limit: u32,
    ) -> Result<Response, ErrorBody> {
        let limit = limit.clamp(1, MAX_PAGE);
        // Asking for what follows `after` acknowledges the items up
        // to it: they are deleted.
        let (items, head) = self
            .blocking(move |s| {
                s.delete_inbox(&user, after.min(u64::MAX - 2))?;
                s.read_inbox(&user, after, limit)
            })
            .await?
            .map_err(ErrorBody::from)?;
        Ok(Response::Inbox { items, head })
    }

    pub(super) async fn fetch_log(
        &self,
        user: String,
        group: GroupId,
        after: u64,
        limit: u32,
    ) -> Result<Response, ErrorBody> {
        let handle = self.group_for(&group, &user).await?;
        let (member, head, compacted) =
            handle.with_view(|v| (v.members.get(&user).copied(), v.head, v.compacted));
        let Some(member) = member else {
            return Err(Self::not_member(&user, &group));
        };
        let until = member.readable_until(head);
        if !member.is_current() && after >= until {
            // It has read everything it may: compaction need not wait for
            // it any longer.
            self.ack(&user, group, until);
            return Err(ErrorBody::new(
                ErrorCode::NotMember,
                format!("{user} was removed from group {group} at {until}"),
            ));
        }
        let after = after.max(member.joined_seq);
        if after < compacted {
            return Err(ErrorBody::new(
                ErrorCode::Compacted,
                format!("entries up to {compacted} of group {group} were compacted"),
            ));
        }
        self.ack(&user, group, after);
        let limit = limit.clamp(1, MAX_PAGE);
        let entries = self
            .blocking(move |s| s.read_log(&group, after, until, limit))
            .await?
            .map_err(ErrorBody::from)?;
        Ok(Response::Log {
            entries,
            head: until,
        })
    }

    /// Whether this node runs the retention sweeps now: it takes or renews
    /// the `sweep` lease, so that of the nodes of a cluster one sweeps
    /// (one process on the embedded store always does). The lease lasts
    /// three sweep intervals, so a node that died is replaced by then.
    pub async fn holds_sweep_lease(&self) -> bool {
        let node = self.node;
        let ttl = self.config.media_sweep_interval * 3;
        match self.blocking(move |s| s.lease("sweep", node, ttl)).await {
            Ok(Ok(held)) => held,
            Ok(Err(e)) => {
                warn!(error = %e, "the sweep lease could not be taken; not sweeping");
                false
            }
            Err(_) => false,
        }
    }

    /// Deletes Welcomes older than the inbox retention, and lapsed device
    /// link requests.
    pub async fn expire_inboxes(&self) {
        let before = self
            .now_ms()
            .saturating_sub(self.config.inbox_retention.as_millis() as u64);
        match self.blocking(move |s| s.expire_inbox(before)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(items = n, "expired Welcomes deleted"),
            Ok(Err(e)) => warn!(error = %e, "expiring Welcomes failed"),
            Err(_) => {}
        }
        let now = self.now_ms();
        match self.blocking(move |s| s.expire_links(now)).await {
            Ok(Ok(0)) | Err(_) => {}
            Ok(Ok(n)) => info!(links = n, "lapsed device link requests deleted"),
            Ok(Err(e)) => warn!(error = %e, "expiring device link requests failed"),
        }
    }
}
