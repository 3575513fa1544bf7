//! Cluster mode: a group's task following the rounds other nodes commit.
//!
//! Another node's round reaches this task as a bus notice. A round of
//! application messages that follows on from this task's head is applied
//! as it came (the head moves, the entries are pushed); anything else — a
//! commit or proposal, which changes the public state, or a gap in the
//! sequence numbers — makes the task read the group anew from the
//! database, which is the source of truth. The task also polls the
//! database's head (`cluster_poll` while the bus is unreachable,
//! `cluster_poll_connected` while it is up), so a lost notice delays
//! delivery and loses nothing; and requests that decide by membership
//! (reads, trees, watches) make it look first when the bus is down or
//! when the view says no (a joiner's Welcome may arrive before its add).

use std::sync::Arc;
use std::time::Duration;

use huddle_core::proto::{self, EntryKind, Event, LogEntry};
use huddle_core::GroupId;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::warn;

use crate::bus::{Bus, BusError, Notices, RoundNotice};
use crate::metrics::COUNTERS;
use crate::store::{self, StoreError};

use super::{Actor, GroupView, MlsState};

/// What woke a following task.
pub(super) enum Hint {
    /// Another node's notice.
    Notice(RoundNotice),
    /// Time to compare the head with the database's.
    Poll,
}

/// A task's feed of other nodes' rounds: its subscription and its poll.
pub(super) struct Feed {
    bus: Arc<Bus>,
    group: GroupId,
    notices: Option<Notices<RoundNotice>>,
    /// A subscription being made, in a task of its own: while the bus is
    /// away its client's queue may be full, and the group's task must not
    /// wait for it.
    subscribing: Option<JoinHandle<Result<Notices<RoundNotice>, BusError>>>,
    /// When the head was last polled (`None`: not yet).
    polled: Option<Instant>,
    poll: Duration,
    poll_connected: Duration,
}

impl Drop for Feed {
    fn drop(&mut self) {
        if let Some(s) = self.subscribing.take() {
            s.abort();
        }
    }
}

impl Feed {
    /// Starts subscribing to `group`'s rounds; until that is done (or if
    /// it fails) the poll follows the group.
    pub(super) fn start(
        bus: Arc<Bus>,
        group: GroupId,
        poll: Duration,
        poll_connected: Duration,
    ) -> Self {
        let mut feed = Self {
            bus,
            group,
            notices: None,
            subscribing: None,
            // The first poll comes at once: a round may have landed between
            // loading the group and subscribing.
            polled: None,
            poll,
            poll_connected,
        };
        feed.subscribe();
        feed
    }

    fn subscribe(&mut self) {
        let (bus, group) = (self.bus.clone(), self.group);
        self.subscribing = Some(tokio::spawn(async move { bus.watch_group(&group).await }));
    }

    /// The next hint.
    pub(super) async fn next(&mut self) -> Hint {
        loop {
            // The period follows the bus's state: the wait is cut into
            // steps of the short period, so a bus lost during a long wait
            // shortens it.
            let period = if self.bus.is_connected() {
                self.poll_connected
            } else {
                self.poll
            };
            let due = self.polled.map_or_else(Instant::now, |t| t + period);
            let step = due.min(Instant::now() + self.poll);
            let notice = async {
                match &mut self.notices {
                    Some(n) => n.next().await,
                    None => std::future::pending().await,
                }
            };
            let subscribed = async {
                match &mut self.subscribing {
                    Some(s) => s.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                n = notice => match n {
                    Some(n) => return Hint::Notice(n),
                    // The bus client is gone (the node is stopping).
                    None => self.notices = None,
                },
                r = subscribed => {
                    self.subscribing = None;
                    match r {
                        Ok(Ok(n)) => self.notices = Some(n),
                        // Tried again at the next poll.
                        Ok(Err(e)) => warn!(group = %self.group, error = %e, "subscribing to the group's rounds"),
                        Err(_) => {}
                    }
                }
                _ = tokio::time::sleep_until(step) => {
                    if Instant::now() >= due {
                        self.polled = Some(Instant::now());
                        if self.notices.is_none() && self.subscribing.is_none() && self.bus.is_connected() {
                            self.subscribe();
                        }
                        return Hint::Poll;
                    }
                }
            }
        }
    }
}

/// Whether `entries` are application messages of `epoch` numbered on from
/// `head` and ending at `last`: a round that changes nothing but the head.
pub(super) fn follows_on(entries: &[LogEntry], head: u64, epoch: u64, last: u64) -> bool {
    !entries.is_empty()
        && entries.last().map(|e| e.seq) == Some(last)
        && entries.iter().enumerate().all(|(i, e)| {
            e.seq == head + 1 + i as u64 && e.kind == EntryKind::Application && e.epoch == epoch
        })
}

impl Actor {
    /// Acts on a hint: applies another node's round, or reads the group
    /// anew when this task cannot follow on from what it holds.
    pub(super) async fn follow(&mut self, hint: Hint) {
        match hint {
            Hint::Notice(n) => {
                if n.head < self.meta.head || (n.head == self.meta.head && !n.group_info) {
                    return;
                }
                if follows_on(&n.entries, self.meta.head, self.meta.epoch, n.head) {
                    COUNTERS.followed();
                    self.advance(n.entries);
                } else {
                    self.reload().await;
                }
            }
            Hint::Poll => {
                let id = self.id;
                match store::blocking(&self.shared.store, move |s| s.head(&id)).await {
                    Ok(Ok(Some(head))) if head > self.meta.head => self.reload().await,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!(group = %self.id, error = %e, "polling the group's head"),
                    Err(e) => {
                        warn!(group = %self.id, error = %e.message, "polling the group's head")
                    }
                }
            }
        }
    }

    /// Moves the head over `entries` (application messages that follow on)
    /// and pushes them.
    fn advance(&mut self, entries: Vec<LogEntry>) {
        let Some(handle) = self.handle.upgrade() else {
            return;
        };
        let Some(head) = entries.last().map(|e| e.seq) else {
            return;
        };
        self.meta.head = head;
        let view = {
            let mut v = handle.view.write().expect("view lock");
            v.head = head;
            v.clone()
        };
        let frames = self.frames(entries);
        self.push(&view, frames);
    }

    fn frames(&self, entries: Vec<LogEntry>) -> Vec<(u64, bytes::Bytes)> {
        entries
            .into_iter()
            .map(|entry| {
                (
                    entry.seq,
                    proto::encode_frame(&Event::Entry {
                        group: self.id,
                        entry,
                    }),
                )
            })
            .collect()
    }

    /// Reads the group anew from the database: its state, members and
    /// GroupInfo, and the entries this task has not seen, which it pushes.
    /// When those are more than the tail holds, watchers are told of a gap
    /// and read the log themselves.
    pub(super) async fn reload(&mut self) {
        COUNTERS.reloaded();
        let (id, after) = (self.id, self.meta.head);
        let limit = u32::try_from(self.shared.config.tail_entries).unwrap_or(u32::MAX);
        let read = store::blocking(&self.shared.store, move |store| -> Result<_, StoreError> {
            let Some(g) = store.group(&id)? else {
                return Ok(None);
            };
            let info = store.group_info(&id)?;
            let entries = if g.meta.head > after {
                store.read_log(&id, after, g.meta.head, limit)?
            } else {
                Vec::new()
            };
            Ok(Some((g, info, entries)))
        })
        .await;
        let (g, info, entries) = match read {
            Ok(Ok(Some(v))) => v,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                warn!(group = %self.id, error = %e, "reading the group anew");
                return;
            }
            Err(e) => {
                warn!(group = %self.id, error = %e.message, "reading the group anew");
                return;
            }
        };
        // The database is the truth even when it is behind this task (which
        // only a forged notice could have moved ahead).
        if g.state != self.durable_state {
            match MlsState::restore(&self.id, &g.state) {
                Ok(mls) => {
                    self.mls = Some(mls);
                    self.durable_state = g.state;
                }
                Err(e) => {
                    warn!(group = %self.id, error = %e, "the stored group state does not load");
                    return;
                }
            }
        }
        let Some(handle) = self.handle.upgrade() else {
            return;
        };
        self.meta = g.meta;
        if info.is_some() {
            self.group_info = info;
        }
        let view = GroupView {
            epoch: self.meta.epoch,
            head: self.meta.head,
            compacted: self.meta.compacted,
            members: Arc::new(g.members.into_iter().collect()),
            group_info_epoch: self.group_info.as_ref().map(|(e, _)| *e),
            policy: self.mls.as_ref().and_then(|m| m.policy.clone()),
        };
        *handle.view.write().expect("view lock") = view.clone();
        let complete = view.head > after
            && entries.first().map(|e| e.seq) == Some(after + 1)
            && entries.last().map(|e| e.seq) == Some(view.head)
            && entries
                .iter()
                .enumerate()
                .all(|(i, e)| e.seq == after + 1 + i as u64);
        if view.head == after {
            // Only the state or the GroupInfo changed.
        } else if complete {
            let frames = self.frames(entries);
            self.push(&view, frames);
        } else {
            // The tail must hold consecutive entries.
            self.tail.clear();
            for sub in self.subscribers.values() {
                sub.signals.raise(Event::Gap {
                    group: self.id,
                    head: view.head,
                });
            }
            self.subscribers.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(seq: u64, epoch: u64, kind: EntryKind) -> LogEntry {
        LogEntry {
            seq,
            epoch,
            kind,
            timestamp_ms: 0,
            data: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn only_application_rounds_that_follow_on_are_applied_as_they_came() {
        let app = |seq| entry(seq, 3, EntryKind::Application);
        assert!(follows_on(&[app(11), app(12)], 10, 3, 12));
        // A gap before, within, or a head past the entries.
        assert!(!follows_on(&[app(12)], 10, 3, 12));
        assert!(!follows_on(&[app(11), app(13)], 10, 3, 13));
        assert!(!follows_on(&[app(11)], 10, 3, 12));
        // Entries the notice left out.
        assert!(!follows_on(&[], 10, 3, 12));
        // A commit or proposal changes the state; another epoch means a
        // commit was missed.
        assert!(!follows_on(
            &[app(11), entry(12, 3, EntryKind::Commit)],
            10,
            3,
            12
        ));
        assert!(!follows_on(&[entry(11, 3, EntryKind::Proposal)], 10, 3, 11));
        assert!(!follows_on(
            &[entry(11, 4, EntryKind::Application)],
            10,
            3,
            11
        ));
    }
}
