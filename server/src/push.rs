//! The push stream of one connection ([`huddle_core::proto::Request::Subscribe`]).
//!
//! The server writes [`Event`] frames; the client writes [`Control`] frames
//! (acks and watches) on the other half. Group tasks put pre-encoded frames
//! into this connection's bounded queue; when it is full they stop pushing
//! that group and raise a gap, which the client fills by reading the log.
//! A client that stops reading entirely is disconnected after
//! `push_stall_timeout`, so it cannot pin server memory. Writes are spaced
//! at least `push_interval` apart (`Pacer`), so rounds that arrive in
//! between go out together.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use huddle_core::frame;
use huddle_core::proto::{self, Control, ErrorBody, ErrorCode, Event, Response, MAX_PAGE};
use huddle_core::GroupId;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::group::WatchResult;
use crate::service::{Service, Session};
use crate::subscriber::{Signals, Subscriber};

/// Runs a subscription until the client closes it, the connection drops or
/// the server shuts down.
pub async fn run(
    svc: Arc<Service>,
    session: Arc<Session>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    groups: Vec<(GroupId, u64)>,
    inbox_after: u64,
    shutdown: CancellationToken,
) -> Result<(), quinn::WriteError> {
    let Some(user) = session.user() else {
        let e = ErrorBody::new(ErrorCode::NotAuthenticated, "authenticate first");
        send.write_all(&proto::encode_frame(&Response::Error(e)))
            .await?;
        let _ = send.finish();
        return Ok(());
    };
    let max_groups = svc.config().max_subscribe_groups;
    if groups.len() > max_groups {
        let e = ErrorBody::new(
            ErrorCode::TooLarge,
            format!("a push stream watches at most {max_groups} groups"),
        );
        send.write_all(&proto::encode_frame(&Response::Error(e)))
            .await?;
        let _ = send.finish();
        return Ok(());
    }
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let sub_id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Bytes>(svc.config().push_queue);
    let signals = Arc::new(Signals::default());
    let sub = Subscriber {
        id: sub_id,
        user: user.clone(),
        frames: tx,
        signals: signals.clone(),
    };
    send.write_all(&proto::encode_frame(&Response::Subscribed))
        .await?;
    // Register for live Welcomes first, then send the backlog: an item may
    // then arrive twice, never not at all (clients skip what they have).
    svc.hub.register(sub.clone());
    let mut watched = HashSet::new();
    let stall = svc.config().push_stall_timeout;
    let result = async {
        let u = user.clone();
        let store = svc.store().clone();
        let backlog =
            tokio::task::spawn_blocking(move || store.read_inbox(&u, inbox_after, MAX_PAGE))
                .await
                .ok()
                .and_then(|r| r.ok());
        if let Some((items, head)) = backlog {
            let more = items.last().is_some_and(|i| i.seq < head);
            for item in items {
                write_or_stall(&mut send, &proto::encode_frame(&Event::Inbox(item)), stall).await?;
            }
            if more {
                write_or_stall(
                    &mut send,
                    &proto::encode_frame(&Event::InboxGap { head }),
                    stall,
                )
                .await?;
            }
        }
        for (g, after) in groups {
            watch(&svc, &sub, &mut watched, &signals, g, after).await;
        }
        let mut decoder = frame::Decoder::new(svc.config().max_frame);
        let mut buf = vec![0u8; 4096];
        let mut pacer = Pacer::new(svc.config().push_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                f = rx.recv() => {
                    let Some(f) = f else { break };
                    if let Some(at) = pacer.next_write().filter(|at| *at > Instant::now()) {
                        tokio::time::sleep_until(at).await;
                    }
                    let started = Instant::now();
                    // Whatever else is already queued goes out in the same
                    // write: under load that turns many one-frame packets
                    // into few full ones.
                    let mut batch = vec![f];
                    while batch.len() < PUSH_BATCH {
                        match rx.try_recv() {
                            Ok(f) => batch.push(f),
                            Err(_) => break,
                        }
                    }
                    let full = batch.len() == PUSH_BATCH;
                    write_batch_or_stall(&mut send, &mut batch, stall).await?;
                    pacer.wrote(started, full);
                }
                _ = signals.notified() => {
                    for e in signals.take() {
                        if let Event::Unwatched { group, .. } | Event::Gap { group, .. } = &e {
                            watched.remove(group);
                        }
                        write_or_stall(&mut send, &proto::encode_frame(&e), stall).await?;
                    }
                }
                n = recv.read(&mut buf) => {
                    let n = match n {
                        Ok(Some(n)) => n,
                        Ok(None) | Err(_) => break,
                    };
                    decoder.extend(&buf[..n]);
                    loop {
                        match decoder.next_frame() {
                            Ok(Some(body)) => match proto::decode::<Control>(&body) {
                                Ok(Control::Ack { group, seq }) => svc.ack(&user, group, seq),
                                Ok(Control::AckInbox { seq }) => {
                                    // Processed: delete them.
                                    let (u, store) = (user.clone(), svc.store().clone());
                                    let _ = tokio::task::spawn_blocking(move || {
                                        store.delete_inbox(&u, seq.min(u64::MAX - 2))
                                    })
                                    .await;
                                }
                                Ok(Control::Watch { group, after }) => {
                                    watch(&svc, &sub, &mut watched, &signals, group, after).await;
                                }
                                Err(e) => {
                                    debug!(conn = session.conn, error = %e, "bad control frame");
                                    let _ = send.reset(quinn::VarInt::from_u32(1));
                                    return Ok(());
                                }
                            },
                            Ok(None) => break,
                            Err(e) => {
                                debug!(conn = session.conn, error = %e, "bad control frame");
                                let _ = send.reset(quinn::VarInt::from_u32(1));
                                return Ok(());
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    svc.hub.unregister(&user, sub_id);
    for g in watched {
        if let Some(h) = svc.group(&g) {
            h.unwatch(sub_id);
        }
    }
    if result.is_ok() {
        let _ = send.finish();
    }
    result
}

async fn watch(
    svc: &Service,
    sub: &Subscriber,
    watched: &mut HashSet<GroupId>,
    signals: &Signals,
    group: GroupId,
    after: u64,
) {
    let not_member = || Event::Unwatched {
        group,
        reason: ErrorBody::new(
            ErrorCode::NotMember,
            format!("{} is not a member of group {group}", sub.user),
        ),
    };
    let Ok(Some(mut h)) = svc.load_group(&group).await else {
        signals.raise(not_member());
        return;
    };
    svc.fresh(&h, &sub.user).await;
    let mut r = h.watch(sub.clone(), after).await;
    if r == WatchResult::NotMember && h.is_stopped() {
        // Unloaded in between: once more, on the group loaded anew.
        let Ok(Some(again)) = svc.load_group(&group).await else {
            signals.raise(not_member());
            return;
        };
        h = again;
        r = h.watch(sub.clone(), after).await;
    }
    let _ = &h;
    match r {
        WatchResult::Watching => {
            watched.insert(group);
        }
        WatchResult::CatchUp { head } => signals.raise(Event::Gap { group, head }),
        WatchResult::NotMember => signals.raise(not_member()),
    }
}

/// Most queued frames written in one call.
const PUSH_BATCH: usize = 64;

/// When a push stream may be written next. Each write takes everything
/// queued (up to [`PUSH_BATCH`] items), so spacing the writes turns one
/// small packet per member per commit round into fewer, fuller ones: the
/// DS and every member pay per datagram, and at a steady rate below the
/// DS's maximum the rounds are small. A stream that has not been written
/// for `interval` is written at once, and one whose last write left items
/// queued (a full batch) is not held back, so the spacing never makes a
/// member fall behind its queue.
#[derive(Debug)]
struct Pacer {
    interval: Duration,
    next: Option<Instant>,
}

impl Pacer {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            next: None,
        }
    }

    /// The earliest time the next write may start; `None`: at once.
    fn next_write(&self) -> Option<Instant> {
        self.next
    }

    /// A write began at `at`; `full`: it took a whole batch, so more may be
    /// queued.
    fn wrote(&mut self, at: Instant, full: bool) {
        self.next = (!full && !self.interval.is_zero()).then(|| at + self.interval);
    }
}

async fn write_batch_or_stall(
    send: &mut quinn::SendStream,
    batch: &mut [Bytes],
    stall: Duration,
) -> Result<(), quinn::WriteError> {
    crate::metrics::COUNTERS.push_write(batch.len());
    match tokio::time::timeout(stall, send.write_all_chunks(batch)).await {
        Ok(r) => r,
        Err(_) => {
            let _ = send.reset(quinn::VarInt::from_u32(3));
            Err(quinn::WriteError::Stopped(quinn::VarInt::from_u32(3)))
        }
    }
}

async fn write_or_stall(
    send: &mut quinn::SendStream,
    frame: &[u8],
    stall: Duration,
) -> Result<(), quinn::WriteError> {
    crate::metrics::COUNTERS.push_write(1);
    match tokio::time::timeout(stall, send.write_all(frame)).await {
        Ok(r) => r,
        Err(_) => {
            let _ = send.reset(quinn::VarInt::from_u32(3));
            Err(quinn::WriteError::Stopped(quinn::VarInt::from_u32(3)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_stream_never_written_is_written_at_once() {
        assert_eq!(Pacer::new(25 * MS).next_write(), None);
    }

    #[test]
    fn the_next_write_waits_out_the_interval_from_the_last_one() {
        let mut p = Pacer::new(25 * MS);
        let t = Instant::now();
        p.wrote(t, false);
        assert_eq!(p.next_write(), Some(t + 25 * MS));
        p.wrote(t + 40 * MS, false);
        assert_eq!(p.next_write(), Some(t + 65 * MS));
    }

    #[test]
    fn a_write_that_left_items_queued_is_followed_at_once() {
        let mut p = Pacer::new(25 * MS);
        let t = Instant::now();
        p.wrote(t, true);
        assert_eq!(p.next_write(), None, "a full batch: more may be queued");
        p.wrote(t + MS, false);
        assert_eq!(p.next_write(), Some(t + 26 * MS));
    }

    #[test]
    fn a_zero_interval_never_waits() {
        let mut p = Pacer::new(Duration::ZERO);
        p.wrote(Instant::now(), false);
        assert_eq!(p.next_write(), None);
    }
}
