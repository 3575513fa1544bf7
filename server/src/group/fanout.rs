//! Fan-out: which entries of a round each subscriber may see
//! (`RoundShare`), the pre-encoded frames pushed, and the bounded in-memory
//! tail for watchers that are only a little behind.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use huddle_core::proto::{self, ErrorBody, ErrorCode, Event};

use crate::store::MemberRecord;

use super::{Actor, GroupView};

/// (seq, pre-encoded `Event::Entry` frame) of a group's newest entries,
/// bounded by count and bytes, and by the bytes of all groups' tails
/// together (`total`): past that, each group keeps only its newest entry,
/// and watchers further behind catch up from the log.
pub(super) struct Tail {
    pub(super) entries: VecDeque<(u64, Bytes)>,
    pub(super) bytes: usize,
    pub(super) total: Arc<std::sync::atomic::AtomicUsize>,
}

impl Tail {
    pub(super) fn new(total: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            total,
        }
    }

    /// Forgets every entry (the next ones do not follow on from them).
    pub(super) fn clear(&mut self) {
        self.total
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
        self.bytes = 0;
        self.entries.clear();
    }

    pub(super) fn extend(
        &mut self,
        new: &[(u64, Bytes)],
        max: usize,
        max_bytes: usize,
        max_total: usize,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        for e in new {
            self.bytes += e.1.len();
            self.total.fetch_add(e.1.len(), Relaxed);
            self.entries.push_back(e.clone());
        }
        while self.entries.len() > 1
            && (self.entries.len() > max
                || self.bytes > max_bytes
                || self.total.load(Relaxed) > max_total)
        {
            if let Some((_, f)) = self.entries.pop_front() {
                self.bytes -= f.len();
                self.total.fetch_sub(f.len(), Relaxed);
            }
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.total
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Actor {
    /// Pushes the entries one round made durable (consecutive sequence
    /// numbers) to every subscriber allowed to read them. A subscriber gets
    /// all of its entries of the round as one queue item, so its push loop
    /// writes them in one call, and under load a round of many messages
    /// costs each member one packet rather than one per message.
    pub(super) fn push(&mut self, view: &GroupView, entries: Vec<(u64, Bytes)>) {
        let (Some(&(first, _)), Some(&(last, _))) = (entries.first(), entries.last()) else {
            return;
        };
        let c = &self.shared.config;
        self.tail
            .extend(&entries, c.tail_entries, c.tail_bytes, c.tail_bytes_total);
        let all = concat(&entries);
        let mut drop_subs = Vec::new();
        for (id, sub) in &self.subscribers {
            let Some(m) = view.members.get(&sub.user) else {
                drop_subs.push(*id);
                continue;
            };
            let share = RoundShare::of(m, view.head, first, last);
            if let Some(range) = &share.entries {
                let frames = if *range == (first..=last) {
                    all.clone()
                } else {
                    concat(
                        &entries[(range.start() - first) as usize..=(range.end() - first) as usize],
                    )
                };
                if sub.frames.try_send(frames).is_err() {
                    // Too slow (or gone): stop pushing; it catches up from the log.
                    sub.signals.raise(Event::Gap {
                        group: self.id,
                        head: view.head,
                    });
                    drop_subs.push(*id);
                    continue;
                }
            }
            if let Some(removed) = share.removed {
                // Behind the removing commit in the same queue, so the
                // client sees the commit first.
                let unwatched = Event::Unwatched {
                    group: self.id,
                    reason: ErrorBody::new(
                        ErrorCode::NotMember,
                        format!("removed from group {} by the commit at {removed}", self.id),
                    ),
                };
                if sub
                    .frames
                    .try_send(proto::encode_frame(&unwatched))
                    .is_err()
                {
                    sub.signals.raise(unwatched);
                }
            }
            if share.stop {
                drop_subs.push(*id);
            }
        }
        for c in drop_subs {
            self.subscribers.remove(&c);
        }
    }
}

/// What a subscribed member gets of a round's entries `first..=last`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct RoundShare {
    /// The entries it may read, if any: after the commit that added it, up
    /// to the one that removed it.
    pub(super) entries: Option<std::ops::RangeInclusive<u64>>,
    /// The removing commit, when it is among them: the member is told it
    /// was removed, after that commit.
    pub(super) removed: Option<u64>,
    /// Whether pushing to it ends with this round (removed now or before).
    pub(super) stop: bool,
}

impl RoundShare {
    pub(super) fn of(m: &MemberRecord, head: u64, first: u64, last: u64) -> Self {
        let until = m.readable_until(head);
        let lo = (m.joined_seq + 1).max(first);
        let hi = until.min(last);
        let entries = (lo <= hi).then_some(lo..=hi);
        let removed = m.removed_seq.filter(|r| (lo..=hi).contains(r));
        Self {
            entries,
            removed,
            stop: removed.is_some() || last > until,
        }
    }
}

/// `frames` back to back in one buffer (the frame itself when alone).
pub(super) fn concat(frames: &[(u64, Bytes)]) -> Bytes {
    match frames {
        [(_, one)] => one.clone(),
        _ => {
            let mut out = bytes::BytesMut::with_capacity(frames.iter().map(|(_, f)| f.len()).sum());
            for (_, f) in frames {
                out.extend_from_slice(f);
            }
            out.freeze()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemberRecord;

    fn member(joined_seq: u64, removed_seq: Option<u64>) -> MemberRecord {
        MemberRecord {
            joined_seq,
            removed_seq,
            removed_ms: removed_seq.map(|_| 1),
        }
    }

    /// A round of entries 11..=15 (head 15), as each kind of member sees it.
    #[test]
    fn a_round_is_shared_only_within_membership() {
        let share = |m: MemberRecord| RoundShare::of(&m, 15, 11, 15);
        // A member throughout: all of it, and it stays subscribed.
        let all = RoundShare {
            entries: Some(11..=15),
            removed: None,
            stop: false,
        };
        assert_eq!(share(member(3, None)), all);
        // Added by the commit at 12: what follows that commit.
        let added = RoundShare {
            entries: Some(13..=15),
            ..all
        };
        assert_eq!(share(member(12, None)), added);
        // Added by the round's last entry: nothing yet.
        let none = RoundShare {
            entries: None,
            ..added
        };
        assert_eq!(share(member(15, None)), none);
        // Removed by the commit at 13: up to it, told so, and no more.
        let removed = RoundShare {
            entries: Some(11..=13),
            removed: Some(13),
            stop: true,
        };
        assert_eq!(share(member(3, Some(13))), removed);
        // Removed by the round's last entry.
        let last = RoundShare {
            entries: Some(11..=15),
            removed: Some(15),
            stop: true,
        };
        assert_eq!(share(member(3, Some(15))), last);
        // Removed earlier (its Unwatched already went out): nothing.
        let gone = RoundShare {
            entries: None,
            removed: None,
            stop: true,
        };
        assert_eq!(share(member(3, Some(9))), gone);
        // Added and removed within the round.
        let brief = RoundShare {
            entries: Some(13..=14),
            removed: Some(14),
            stop: true,
        };
        assert_eq!(share(member(12, Some(14))), brief);
    }
}
