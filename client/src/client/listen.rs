//! `listen`: the push stream, reconnecting with back-off, and reporting
//! what arrives as it arrives.

use std::time::Duration;

use huddle_core::proto::{Control, Event as Pushed, LogEntry, Request};
use huddle_core::GroupId;

use crate::db::groups::GroupState;
use crate::db::history::Origin;
use crate::db::{self};
use crate::error::{ClientError, Result};
use crate::event::{Event, EventKind};
use crate::net::{self};

use super::{now_ms, Client};

impl Client {
    /// Stays connected and reports events as they arrive until `stop`
    /// completes. New entries are pushed by the DS; gaps are filled from the
    /// log. This user's own messages are reported too (sent from another
    /// process of the home, they arrive like anyone's). Once the push
    /// stream is open the first time, a `listening` event says so.
    ///
    /// A connection lost after listening began (the server restarted, the
    /// network went away) is retried with a growing pause, from
    /// [`RECONNECT_MIN`] up to [`RECONNECT_MAX`], and a warning for each
    /// attempt; each new session starts with a sync, so nothing pushed in
    /// between is missed. Failing to reach the server the first time is an
    /// error, as is anything other than a lost connection.
    pub async fn listen<F, S>(&mut self, on_event: F, stop: S) -> Result<()>
    where
        F: FnMut(&Event),
        S: std::future::Future<Output = ()>,
    {
        self.listen_with(on_event, |_| {}, stop).await
    }

    /// [`Client::listen`], also telling `on_link` each time the push stream
    /// opens and each time the connection is lost (for a page that shows
    /// "reconnecting…").
    pub async fn listen_with<F, L, S>(
        &mut self,
        mut on_event: F,
        mut on_link: L,
        stop: S,
    ) -> Result<()>
    where
        F: FnMut(&Event),
        L: FnMut(Link),
        S: std::future::Future<Output = ()>,
    {
        tokio::pin!(stop);
        // This listen's own place in the history (see `recorded_after`).
        let mut shown = 0i64;
        let mut listened = false;
        let mut pause = RECONNECT_MIN;
        loop {
            let started = tokio::time::Instant::now();
            let mut subscribed = false;
            let err = match self
                .listen_session(
                    &mut on_event,
                    stop.as_mut(),
                    &mut subscribed,
                    &mut on_link,
                    !listened,
                    &mut shown,
                )
                .await
            {
                Ok(()) => return Ok(()),
                Err(e @ ClientError::Connect { .. }) if listened || subscribed => e,
                Err(e) => return Err(e),
            };
            listened = true;
            self.net = None;
            if started.elapsed() > RECONNECT_MAX {
                // That session lasted: this is a new outage.
                pause = RECONNECT_MIN;
            }
            tracing::warn!("{err}; reconnecting in {} s", pause.as_secs());
            on_link(Link::Lost {
                reason: err.to_string(),
                retry_in_s: pause.as_secs(),
            });
            tokio::select! {
                _ = stop.as_mut() => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(RECONNECT_MAX);
        }
    }

    /// One connection's worth of [`Client::listen`]: returns `Ok` when
    /// `stop` completes; sets `subscribed` once the push stream is open
    /// (and reports `listening` then if `first`).
    pub(super) async fn listen_session<F, S>(
        &mut self,
        on_event: &mut F,
        mut stop: std::pin::Pin<&mut S>,
        subscribed: &mut bool,
        on_link: &mut dyn FnMut(Link),
        first: bool,
        shown: &mut i64,
    ) -> Result<()>
    where
        F: FnMut(&Event),
        S: std::future::Future<Output = ()>,
    {
        let lost = |what: String, server: &str| ClientError::Connect {
            addr: server.to_owned(),
            reason: format!("push stream: {what}"),
        };
        let server = self.server().to_owned();
        // What it missed, as `sync` reports it; from then on, everything
        // recorded, its user's own messages too, as it is recorded.
        let (events, covered) = self.sync_reporting().await?;
        if first {
            *shown = covered;
            for e in events {
                on_event(&e);
            }
        } else {
            // Back after a lost connection: everything since this listen
            // last showed, its user's own messages sent meanwhile too.
            for e in events.iter().filter(|e| !e.recorded()) {
                on_event(e);
            }
            let (events, upto) = self.recorded_after(*shown, Origin::Own)?;
            *shown = upto;
            for e in events {
                on_event(&e);
            }
        }
        let groups: Vec<(GroupId, u64)> = self
            .group_ids()?
            .into_iter()
            .filter(|(_, s)| matches!(s, GroupState::Active | GroupState::Leaving))
            .filter_map(|(id, _)| {
                db::groups::load(&self.db, &id)
                    .ok()
                    .flatten()
                    .map(|r| (id, r.cursor))
            })
            .collect();
        let inbox_after = db::settings::get(&self.db, "inbox_cursor")?;
        let net = self.net().await?;
        let remote = net.quic().remote_address();
        let (mut send, mut recv, _) = net
            .open(&Request::Subscribe {
                groups,
                inbox_after,
            })
            .await?;
        *subscribed = true;
        on_link(Link::Connected {
            server: server.clone(),
        });
        // A server killed without a word: noticed in a second or two (on
        // a host that says so), not after QUIC's idle timeout.
        let gone = net::gone(remote);
        tokio::pin!(gone);
        if first {
            let text = server.clone();
            let e = Event::new(EventKind::Listening { text }, "", self.name(), 0, now_ms());
            on_event(&e);
        }
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        // Frames are reassembled here from cancel-safe chunk reads, so the
        // timer branch below can never cut a frame in half.
        let mut decoder = huddle_core::frame::Decoder::new(net::MAX_FRAME);
        let mut ready: std::collections::VecDeque<Pushed> = std::collections::VecDeque::new();
        loop {
            let pushed = match ready.pop_front() {
                Some(p) => p,
                None => {
                    tokio::select! {
                        _ = stop.as_mut() => break,
                        () = gone.as_mut() => {
                            if let Some(n) = &self.net {
                                return Err(n.went_away());
                            }
                            return Err(lost("the server went away".into(), &server));
                        }
                        _ = tick.tick() => {
                            for (id, state) in self.group_ids()? {
                                if matches!(state, GroupState::Active | GroupState::Leaving) {
                                    let r = self.maybe_commit_proposals(&id, false).await;
                                    for e in self.isolate(&id, r)?.into_iter().filter(|e| !e.recorded()) {
                                        on_event(&e);
                                    }
                                }
                            }
                            // What other processes of the home did.
                            let (events, upto) = self.recorded_after(*shown, Origin::Own)?;
                            *shown = upto;
                            for e in events {
                                on_event(&e);
                            }
                        }
                        chunk = recv.read_chunk(64 * 1024, true) => {
                            let chunk = chunk
                                .map_err(|e| lost(e.to_string(), &server))?
                                .ok_or_else(|| lost("closed by the server".into(), &server))?;
                            decoder.extend(&chunk.bytes);
                            // Take everything that has already arrived too
                            // (each read returns about one packet's worth),
                            // so entries that came in while the last batch
                            // was processed go into one transaction.
                            let mut taken = chunk.bytes.len();
                            while taken < MAX_DRAIN {
                                let Some(more) = now_or_never(recv.read_chunk(64 * 1024, true)) else {
                                    break;
                                };
                                let more = more
                                    .map_err(|e| lost(e.to_string(), &server))?
                                    .ok_or_else(|| lost("closed by the server".into(), &server))?;
                                taken += more.bytes.len();
                                decoder.extend(&more.bytes);
                            }
                            while let Some(body) = decoder
                                .next_frame()
                                .map_err(|e| ClientError::Protocol(e.to_string()))?
                            {
                                ready.push_back(
                                    huddle_core::proto::decode(&body)
                                        .map_err(|e| ClientError::Protocol(e.to_string()))?,
                                );
                            }
                        }
                    }
                    continue;
                }
            };
            let mut batch = Vec::new();
            if let Pushed::Entry { group, .. } = &pushed {
                // Everything already here for this group goes into one
                // transaction.
                let group = *group;
                while let Some(Pushed::Entry { group: g, .. }) = ready.front() {
                    if *g != group {
                        break;
                    }
                    if let Some(Pushed::Entry { entry, .. }) = ready.pop_front() {
                        batch.push(entry);
                    }
                }
            }
            let group = match &pushed {
                Pushed::Entry { group, .. }
                | Pushed::Gap { group, .. }
                | Pushed::Unwatched { group, .. } => Some(*group),
                Pushed::Inbox(_) | Pushed::InboxGap { .. } => None,
            };
            let r = self.on_pushed(pushed, batch, &mut send, &server).await;
            let events = match group {
                Some(g) => self.isolate(&g, r)?,
                None => r?,
            };
            for e in events.iter().filter(|e| !e.recorded()) {
                on_event(e);
            }
            if let Some(g) = group {
                let r = self.maybe_commit_proposals(&g, false).await;
                for e in self.isolate(&g, r)?.into_iter().filter(|e| !e.recorded()) {
                    on_event(&e);
                }
            }
            let (events, upto) = self.recorded_after(*shown, Origin::Own)?;
            *shown = upto;
            for e in events {
                on_event(&e);
            }
            if let Some(g) = group {
                if let Some(r) = db::groups::load(&self.db, &g)? {
                    write_control(
                        &mut send,
                        &server,
                        &Control::Ack {
                            group: g,
                            seq: r.cursor,
                        },
                    )
                    .await?;
                }
            }
        }
        let _ = send.finish();
        Ok(())
    }

    /// Handles one pushed event (with `batch`, the entries of the same
    /// group that followed it) and returns what it shows.
    pub(super) async fn on_pushed(
        &mut self,
        pushed: Pushed,
        mut batch: Vec<LogEntry>,
        send: &mut quinn::SendStream,
        server: &str,
    ) -> Result<Vec<Event>> {
        Ok(match pushed {
            Pushed::Entry { group, entry } => {
                batch.insert(0, entry);
                let cursor = db::groups::load(&self.db, &group)?
                    .map(|r| r.cursor)
                    .unwrap_or(0);
                let evs = if batch[0].seq <= cursor + 1 {
                    let mut evs = self.process_entries(&group, &batch)?;
                    if !self.need_devices.is_empty() {
                        // Processing stopped before a new device whose
                        // user's device log is needed: sync fetches it and
                        // reads on.
                        self.need_devices.clear();
                        evs.extend(self.sync_group(&group).await?);
                    }
                    evs
                } else {
                    self.sync_group(&group).await?
                };
                self.tell_name_to_new_devices(&group, &evs).await?;
                evs
            }
            Pushed::Inbox(_) | Pushed::InboxGap { .. } => {
                let evs = self.sync_inbox().await?;
                for e in &evs {
                    if e.kind == "joined" {
                        if let Ok(g) = e.group.parse::<GroupId>() {
                            let after = db::groups::load(&self.db, &g)?
                                .map(|r| r.cursor)
                                .unwrap_or(0);
                            write_control(send, server, &Control::Watch { group: g, after })
                                .await?;
                        }
                    }
                }
                evs
            }
            Pushed::Gap { group, .. } => {
                let evs = self.sync_group(&group).await?;
                let after = db::groups::load(&self.db, &group)?
                    .map(|r| r.cursor)
                    .unwrap_or(0);
                write_control(send, server, &Control::Watch { group, after }).await?;
                evs
            }
            Pushed::Unwatched { group, .. } => self.sync_group(&group).await?,
        })
    }
}

/// The state of `listen`'s connection, as [`Client::listen_with`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Link {
    /// The push stream is open: what is posted arrives as it is posted.
    Connected {
        /// The server's address.
        server: String,
    },
    /// The connection was lost; the next attempt is in `retry_in_s`
    /// seconds.
    Lost {
        /// Why.
        reason: String,
        /// Seconds until the next attempt.
        retry_in_s: u64,
    },
}

async fn write_control(send: &mut quinn::SendStream, server: &str, c: &Control) -> Result<()> {
    send.write_all(&huddle_core::proto::encode_frame(c))
        .await
        .map_err(|e| ClientError::Connect {
            addr: server.to_owned(),
            reason: format!("push stream: {e}"),
        })
}

/// First pause before `listen` reconnects after losing its connection.
pub const RECONNECT_MIN: Duration = Duration::from_secs(1);

/// Longest pause between `listen`'s reconnection attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Most pushed bytes taken in one go before processing them.
const MAX_DRAIN: usize = 1 << 20;

/// Polls `f` once: its output if it is ready now, `None` otherwise. Only
/// for cancel-safe futures (the future is dropped when pending).
fn now_or_never<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}
