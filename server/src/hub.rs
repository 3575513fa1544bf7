//! Online users' push streams for Welcomes (the inbox).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use huddle_core::proto::{self, Event, InboxItem};

use crate::group::{Signals, Subscriber};

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

    /// Pushes a new inbox item to its user's online connections.
    pub fn deliver(&self, user: &str, item: InboxItem) {
        let users = self.users.lock().expect("hub lock");
        let Some(list) = users.get(user) else {
            return;
        };
        let head = item.seq;
        let frame = proto::encode_frame(&Event::Inbox(item));
        for sub in list {
            if sub.frames.try_send(frame.clone()).is_err() {
                gap(&sub.signals, head);
            }
        }
    }
}

fn gap(signals: &Arc<Signals>, head: u64) {
    signals.raise(Event::InboxGap { head });
}
