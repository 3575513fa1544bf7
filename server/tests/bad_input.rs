//! Malformed and hostile input gets a clear error and harms nobody else.
#![allow(clippy::unwrap_used)]
mod common;

use std::time::Duration;

use common::*;
use huddle_client::net::read_message;
use huddle_core::proto::{ErrorCode, Request, Response};

/// Writes raw bytes on a new stream and reads the server's answer.
async fn raw(c: &huddle_client::net::Connection, bytes: &[u8], finish: bool) -> Response {
    let (mut send, mut recv) = c.quic().open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    read_message::<Response>(&mut recv).await.unwrap()
}

fn err_code(r: Response) -> ErrorCode {
    match r {
        Response::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn garbage_oversized_unknown_and_truncated_frames() {
    let s = InProcess::start().await;
    let (c, _) = s.user("alice").await;
    // A frame announcing 4 GiB: refused from the header alone.
    assert_eq!(
        err_code(raw(&c, &[0xff, 0xff, 0xff, 0xff], false).await),
        ErrorCode::FrameTooLarge
    );
    // A well-framed body with an unknown message type.
    assert_eq!(
        err_code(raw(&c, &huddle_core::frame::encode(&[0x7f, 1, 2]), true).await),
        ErrorCode::UnknownMessageType
    );
    // Garbage in a well-formed frame: a known type with nonsense fields.
    assert_eq!(
        err_code(
            raw(
                &c,
                &huddle_core::frame::encode(&[1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
                true
            )
            .await
        ),
        ErrorCode::BadRequest
    );
    // A frame cut short by the end of the stream.
    assert_eq!(
        err_code(raw(&c, &[0, 0, 0, 10, 1, 2], true).await),
        ErrorCode::BadRequest
    );
    // Trailing bytes after a valid request.
    let mut body = huddle_core::proto::encode_body(&Request::KeyPackageCount);
    body.push(0);
    assert_eq!(
        err_code(raw(&c, &huddle_core::frame::encode(&body), true).await),
        ErrorCode::BadRequest
    );
    // The same connection still works.
    assert_eq!(kp_count(&c).await, (0, false));
}

#[tokio::test]
async fn a_flood_of_streams_does_not_starve_others() {
    let s = InProcess::start_with(|c| c.max_streams_per_connection = 16).await;
    let (flooder, _) = s.user("flood").await;
    let (other, _) = s.user("other").await;
    // The flooder opens streams and never completes a request on them,
    // holding every slot it is allowed; QUIC flow control stops it at the
    // limit.
    let mut held = Vec::new();
    loop {
        let open = tokio::time::timeout(Duration::from_millis(300), flooder.quic().open_bi()).await;
        let Ok(Ok((mut send, recv))) = open else {
            break;
        };
        // A stream only reaches the server once something is sent on it.
        send.write_all(&[0]).await.unwrap();
        held.push((send, recv));
        assert!(held.len() <= 16, "the stream limit was not enforced");
    }
    assert!(
        held.len() >= 10,
        "only {} streams could be opened",
        held.len()
    );
    // Thousands of requests from the flooder's other connection, at once...
    let flood2 = s.connect().await;
    let burst = async {
        let mut n = 0;
        let reqs: Vec<_> = (0..2000)
            .map(|_| flood2.request(&Request::KeyPackageCount))
            .collect();
        for r in futures_lite(reqs).await {
            if matches!(r, Err(huddle_client::ClientError::Server(_))) {
                n += 1;
            }
        }
        n
    };
    // ... while another user is served normally.
    let (refused, count) = tokio::join!(burst, kp_count(&other));
    assert_eq!(
        refused, 2000,
        "unauthenticated flood requests must all be refused"
    );
    assert_eq!(count, (0, false));
    drop(held);
}

/// Awaits all futures concurrently on this task.
async fn futures_lite<F: std::future::Future>(fs: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::with_capacity(fs.len());
    let mut set = Vec::new();
    for f in fs {
        set.push(Box::pin(f));
    }
    // Poll them all together.
    let results = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let joined = async {
        let mut handles = Vec::new();
        for (i, f) in set.into_iter().enumerate() {
            let results = results.clone();
            handles.push(async move {
                let r = f.await;
                results.lock().unwrap().push((i, r));
            });
        }
        join_all(handles).await;
    };
    joined.await;
    let mut r = std::mem::take(&mut *results.lock().unwrap());
    r.sort_by_key(|(i, _)| *i);
    out.extend(r.into_iter().map(|(_, v)| v));
    out
}

async fn join_all<F: std::future::Future<Output = ()>>(fs: Vec<F>) {
    let mut fs: Vec<_> = fs.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        fs.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if fs.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_with_a_reason() {
    let s = InProcess::start_with(|c| c.max_connections = 2).await;
    let a = s.connect().await;
    let b = s.connect().await;
    // Answered on both: the server has counted both.
    a.request(&Request::Challenge).await.unwrap();
    b.request(&Request::Challenge).await.unwrap();
    let c = s.connect().await;
    let r = c.request(&Request::Challenge).await;
    let msg = format!("{:?}", r.unwrap_err());
    assert!(msg.contains("connection limit"), "{msg}");
}

#[tokio::test]
async fn malformed_mls_messages_are_refused() {
    let s = InProcess::start().await;
    let mut alice = s.client("alice").await;
    let g = alice.create_group("g").await.unwrap();
    let net = alice.net().await.unwrap();
    for bad in [vec![], vec![0u8; 10], vec![0, 1, 0, 1, 0, 0]] {
        let r = net
            .request(&Request::Commit {
                group: g,
                commit: bad.clone().into(),
                welcome: None,
            })
            .await;
        assert_eq!(code(r), ErrorCode::InvalidMessage);
        let r = net
            .request(&Request::Message {
                group: g,
                message: bad.into(),
            })
            .await;
        assert_eq!(code(r), ErrorCode::InvalidMessage);
    }
    // The group still works.
    alice.send_text("g", "still here").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_drains_its_push_stream_is_cut_off() {
    let s = InProcess::start_with(|c| {
        c.push_queue = 16;
        c.push_stall_timeout = Duration::from_millis(800);
    })
    .await;
    let mut alice = s.client("alice").await;
    let mut bob = s.client("bob").await;
    let mut slow = s.client("slow").await;
    let g = alice.create_group("g").await.unwrap();
    alice
        .add(&g.to_string(), &["bob".into(), "slow".into()])
        .await
        .unwrap();
    bob.sync().await.unwrap();
    slow.sync().await.unwrap();
    // Slow subscribes and then never reads a byte.
    let (_send, _recv) = subscribe_raw(&mut slow, g).await;
    let quic = slow.net().await.unwrap().quic().clone();
    // Far more than the client's stream window (8 MiB) plus what the DS
    // buffers per connection (8 MiB).
    let pad = "x".repeat(60_000);
    for i in 0..350 {
        alice
            .send_text(&g.to_string(), &format!("{i} {pad}"))
            .await
            .unwrap();
    }
    // The DS gives up on the slow reader...
    let mut reason = None;
    for _ in 0..200 {
        if let Some(r) = quic.close_reason() {
            reason = Some(r.to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reason = reason.expect("the slow reader's connection is closed");
    assert!(reason.contains("push stream not read"), "{reason}");
    // ... while everyone else got everything.
    let got = bob.sync().await.unwrap();
    assert_eq!(got.iter().filter(|e| e.kind == "text").count(), 350);
    // And the slow member can come back and catch up from the log.
    let mut slow = huddle_client::Client::open(s.home("slow")).unwrap();
    let caught = slow.sync().await.unwrap();
    assert_eq!(caught.iter().filter(|e| e.kind == "text").count(), 350);
}
