//! The push stream of one connection ([`huddle_core::proto::Request::Subscribe`]).
//!
//! The server writes [`Event`] frames; the client writes [`Control`] frames
//! (acks and watches) on the other half. Group tasks put pre-encoded frames
//! into this connection's bounded queue; when it is full they stop pushing
//! that group and raise a gap, which the client fills by reading the log.
//! A client that stops reading entirely is disconnected after
//! `push_stall_timeout`, so it cannot pin server memory.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use huddle_core::frame;
use huddle_core::proto::{self, Control, ErrorBody, ErrorCode, Event, Response, MAX_PAGE};
use huddle_core::GroupId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::group::{Signals, Subscriber, WatchResult};
use crate::service::{Service, Session};

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
                send.write_all(&proto::encode_frame(&Event::Inbox(item)))
                    .await?;
            }
            if more {
                send.write_all(&proto::encode_frame(&Event::InboxGap { head }))
                    .await?;
            }
        }
        for (g, after) in groups {
            watch(&svc, &sub, &mut watched, &signals, g, after).await;
        }
        let stall = svc.config().push_stall_timeout;
        let mut decoder = frame::Decoder::new(svc.config().max_frame);
        let mut buf = vec![0u8; 4096];
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                f = rx.recv() => {
                    let Some(f) = f else { break };
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
                    write_batch_or_stall(&mut send, &mut batch, stall).await?;
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
                                Ok(Control::AckInbox { .. }) => {}
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
    let Some(h) = svc.group(&group) else {
        signals.raise(not_member());
        return;
    };
    match h.watch(sub.clone(), after).await {
        WatchResult::Watching => {
            watched.insert(group);
        }
        WatchResult::CatchUp { head } => signals.raise(Event::Gap { group, head }),
        WatchResult::NotMember => signals.raise(not_member()),
    }
}

/// Most queued frames written in one call.
const PUSH_BATCH: usize = 64;

async fn write_batch_or_stall(
    send: &mut quinn::SendStream,
    batch: &mut [Bytes],
    stall: std::time::Duration,
) -> Result<(), quinn::WriteError> {
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
    stall: std::time::Duration,
) -> Result<(), quinn::WriteError> {
    match tokio::time::timeout(stall, send.write_all(frame)).await {
        Ok(r) => r,
        Err(_) => {
            let _ = send.reset(quinn::VarInt::from_u32(3));
            Err(quinn::WriteError::Stopped(quinn::VarInt::from_u32(3)))
        }
    }
}
