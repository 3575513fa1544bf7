//! Acknowledgements of what members have read: buffered in memory and
//! written in batches, so the log can be compacted behind the slowest
//! member.

use std::collections::{HashMap, HashSet};

use huddle_core::GroupId;
use tracing::warn;

use crate::store::StoreError;

use super::Service;

impl Service {
    /// Records that `user` processed `group` up to `seq` (flushed later by
    /// [`Service::flush_acks`]).
    pub fn ack(&self, user: &str, group: GroupId, seq: u64) {
        let Some(h) = self.group(&group) else { return };
        // A departed member acknowledges what it read up to its removal.
        let allowed = h.with_view(|v| {
            v.members
                .get(user)
                .is_some_and(|m| seq <= m.readable_until(v.head))
        });
        if !allowed {
            return;
        }
        let mut acks = self.acks.lock().expect("acks lock");
        let e = acks.entry((group, user.to_owned())).or_insert(0);
        *e = (*e).max(seq);
    }

    /// Writes the acknowledged positions gathered since the last call, in
    /// one transaction, then compacts logs every member has acknowledged.
    pub async fn flush_acks(&self) {
        let acks: Vec<_> = std::mem::take(&mut *self.acks.lock().expect("acks lock"))
            .into_iter()
            .map(|((g, u), s)| (g, u, s))
            .collect();
        if acks.is_empty() {
            return;
        }
        let touched: HashSet<GroupId> = acks.iter().map(|(g, _, _)| *g).collect();
        let r = self.blocking(move |s| s.save_cursors(&acks)).await;
        if let Ok(Err(e)) | Err(e) = r.map_err(|e| StoreError::Io(e.message)) {
            warn!(error = %e, "saving cursors failed");
            return;
        }
        let now = self.now_ms();
        let retention = self.config.departed_retention.as_millis() as u64;
        for g in touched {
            let Some(h) = self.group(&g) else { continue };
            let view = h.view();
            let floor = self
                .blocking(move |s| s.cursors(&g))
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|cursors| {
                    let c: HashMap<String, u64> = cursors.into_iter().collect();
                    view.members
                        .iter()
                        .filter_map(|(u, m)| {
                            let cursor = c.get(u).copied().unwrap_or(0).max(m.joined_seq);
                            m.holds_log(cursor, now, retention).then_some(cursor)
                        })
                        .min()
                        .unwrap_or(view.head)
                        .min(view.head)
                });
            if let Some(floor) = floor {
                if floor > view.compacted {
                    h.compact(floor);
                }
            }
        }
    }
}
