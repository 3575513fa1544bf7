//! Online users' push streams for Welcomes (the inbox).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use huddle_core::proto::{self, Event, InboxItem};
use huddle_core::GroupId;

use crate::store::NewInboxItem;
use crate::subscriber::{Signals, Subscriber};
use huddle_core::welcome;

/// A Welcome larger than this is announced (`InboxGap`) rather than
/// pushed: the client fetches it, and the DS never holds one copy of it per
/// online joiner.
pub const PUSH_WELCOME_MAX: usize = 64 << 10;

/// Connections of online users that asked for pushes.
#[derive(Debug, Default)]
pub struct Hub {
    users: Mutex<HashMap<String, Vec<Subscriber>>>,
}

impl Hub {
    /// Registers a connection for pushes of `sub.user`'s inbox.
    pub fn register(&self, sub: Subscriber) {
        self.users
            .lock()
            .expect("hub lock")
            .entry(sub.user.clone())
            .or_default()
            .push(sub);
    }

    /// Forgets push stream `sub` of `user`.
    pub fn unregister(&self, user: &str, sub: u64) {
        let mut users = self.users.lock().expect("hub lock");
        if let Some(list) = users.get_mut(user) {
            list.retain(|s| s.id != sub);
            if list.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Pushes a new inbox item (`w`, numbered `seq` in its recipient's
    /// inbox) to its user's online connections.
    pub fn deliver(&self, group: GroupId, w: NewInboxItem, seq: u64) {
        let users = self.users.lock().expect("hub lock");
        let Some(list) = users.get(&w.user) else {
            return;
        };
        if w.shared.len() + w.own.len() > PUSH_WELCOME_MAX {
            for sub in list {
                gap(&sub.signals, seq);
            }
            return;
        }
        let frame = proto::encode_frame(&Event::Inbox(InboxItem {
            seq,
            group,
            commit_seq: w.commit_seq,
            timestamp_ms: w.timestamp_ms,
            welcome: welcome::join(&w.shared, &w.own),
        }));
        for sub in list {
            if sub.frames.try_send(frame.clone()).is_err() {
                gap(&sub.signals, seq);
            }
        }
    }
}

fn gap(signals: &Arc<Signals>, head: u64) {
    signals.raise(Event::InboxGap { head });
}
