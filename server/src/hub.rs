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

impl Hub {
    /// Tells `user`'s push streams here that their inbox holds item `seq`
    /// (stored by another node): they fetch it.
    pub fn announce(&self, user: &str, seq: u64) {
        let users = self.users.lock().expect("hub lock");
        for sub in users.get(user).into_iter().flatten() {
            gap(&sub.signals, seq);
        }
    }

    /// The users with push streams here.
    pub fn users(&self) -> Vec<String> {
        self.users
            .lock()
            .expect("hub lock")
            .keys()
            .cloned()
            .collect()
    }
}

/// Cluster mode: routes other nodes' inbox notices to this node's push
/// streams until `stop`. While the bus is unreachable it polls instead:
/// every `cluster_poll`, the inbox head of each user with a push stream
/// here, announced when it moved; and once the bus is back every such user
/// is told to fetch its inbox, for the notices lost meanwhile.
pub async fn follow_cluster(
    svc: Arc<crate::service::Service>,
    bus: Arc<crate::bus::Bus>,
    stop: tokio_util::sync::CancellationToken,
) {
    // Subscribed in a task of its own: while the bus is away its client's
    // queue may be full, and the polls must go on meanwhile.
    let subscribe =
        |bus: Arc<crate::bus::Bus>| tokio::spawn(async move { bus.watch_inboxes().await });
    let mut subscribing = Some(subscribe(bus.clone()));
    let mut notices: Option<crate::bus::Notices<crate::bus::InboxNotice>> = None;
    let mut tick = tokio::time::interval(svc.config().cluster_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Inbox heads read while the bus was down.
    let mut heads: HashMap<String, u64> = HashMap::new();
    let mut was_down = false;
    loop {
        let notice = async {
            match &mut notices {
                Some(n) => n.next().await,
                None => std::future::pending().await,
            }
        };
        let subscribed = async {
            match &mut subscribing {
                Some(s) => s.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => {
                if let Some(s) = subscribing.take() {
                    s.abort();
                }
                return;
            }
            n = notice => match n {
                Some(n) => svc.hub.announce(&n.user, n.seq),
                None => notices = None,
            },
            r = subscribed => {
                subscribing = None;
                match r {
                    Ok(Ok(n)) => notices = Some(n),
                    Ok(Err(e)) => tracing::warn!(error = %e, "subscribing to inbox notices; polling meanwhile"),
                    Err(_) => {}
                }
            }
            _ = tick.tick() => {
                if notices.is_none() && subscribing.is_none() && bus.is_connected() {
                    subscribing = Some(subscribe(bus.clone()));
                }
                if bus.is_connected() && notices.is_some() {
                    if was_down {
                        was_down = false;
                        heads.clear();
                        for user in svc.hub.users() {
                            svc.hub.announce(&user, 0);
                        }
                    }
                    continue;
                }
                was_down = true;
                let users = svc.hub.users();
                let read = crate::store::blocking(svc.store(), move |s| {
                    users
                        .into_iter()
                        .filter_map(|u| s.read_inbox(&u, u64::MAX, 0).ok().map(|(_, h)| (u, h)))
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
                for (user, head) in read {
                    if heads.insert(user.clone(), head) != Some(head) {
                        svc.hub.announce(&user, head);
                    }
                }
            }
        }
    }
}

fn gap(signals: &Arc<Signals>, head: u64) {
    signals.raise(Event::InboxGap { head });
}
