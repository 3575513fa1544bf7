//! QUIC transport settings between the DS and the reference client.
#![allow(clippy::unwrap_used)]
mod common;

use std::time::{Duration, Instant};

use common::*;
use huddle_client::net::Connection;
use huddle_core::frame::Decoder;
use huddle_core::proto::{self, EntryKind, Event, Request, MAX_UDP_PAYLOAD};

/// quinn's default largest UDP payload an endpoint accepts (its MTU
/// discovery's default bound is lower still, 1,452): the largest packet a
/// connection could use if either side kept quinn's defaults.
const QUINN_DEFAULT_MTU: u16 = 1472;

#[tokio::test]
async fn packets_grow_past_ethernet_size_on_loopback() {
    let s = InProcess::start().await;
    let c = s.connect().await;
    // Path MTU discovery probes upwards from 1,200 bytes after the
    // handshake; loopback carries 64 KiB datagrams, so it climbs towards
    // our bound. Bounded wait.
    let mut mtu = 0;
    for _ in 0..250 {
        let _ = c.request(&Request::Challenge).await;
        mtu = c.quic().stats().path.current_mtu;
        if mtu > QUINN_DEFAULT_MTU {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        mtu > QUINN_DEFAULT_MTU && mtu <= MAX_UDP_PAYLOAD,
        "path MTU {mtu}: the DS must accept, and the client probe for, datagrams up to {MAX_UDP_PAYLOAD}"
    );
}

#[tokio::test]
async fn a_reconnection_reuses_the_endpoint() {
    let s = InProcess::start().await;
    let first = s.connect().await;
    let endpoint = first.endpoint().clone();
    first.close().await;
    let second = Connection::connect_on(Some(&endpoint), &s.addr, s.trust())
        .await
        .unwrap();
    assert_eq!(
        second.endpoint().local_addr().unwrap(),
        endpoint.local_addr().unwrap(),
        "a second socket (and receive buffer) was opened"
    );
    // And it works: the server answers on the new connection.
    assert!(second.request(&Request::Challenge).await.is_ok());
    // Without an endpoint, a connection gets its own.
    let third = s.connect().await;
    assert_ne!(
        third.endpoint().local_addr().unwrap(),
        endpoint.local_addr().unwrap()
    );
}

/// Reads a push stream until `n` application entries arrived; when each did.
async fn application_arrivals(recv: &mut quinn::RecvStream, n: usize) -> Vec<Instant> {
    let mut decoder = Decoder::new(huddle_client::net::MAX_FRAME);
    let mut at = Vec::new();
    while at.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(20), recv.read_chunk(1 << 16, true))
            .await
            .expect("pushes within 20 s")
            .unwrap()
            .expect("push stream open");
        let now = Instant::now();
        decoder.extend(&chunk.bytes);
        while let Some(body) = decoder.next_frame().unwrap() {
            if let Event::Entry { entry, .. } = proto::decode::<Event>(&body).unwrap() {
                if entry.kind == EntryKind::Application {
                    at.push(now);
                }
            }
        }
    }
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_to_a_busy_member_are_spaced_and_an_idle_one_is_not_held_back() {
    const INTERVAL: Duration = Duration::from_millis(1500);
    let s = InProcess::start_with(|c| c.push_interval = INTERVAL).await;
    let mut alice = s.client("alice").await;
    let mut bob = s.client("bob").await;
    let g = alice.create_group("g").await.unwrap();
    alice.add(&g.to_string(), &["bob".into()]).await.unwrap();
    bob.sync().await.unwrap();
    let (_send, mut recv) = subscribe_raw(&mut bob, g).await;
    let arrivals = tokio::spawn(async move { application_arrivals(&mut recv, 3).await });
    // Three messages, each its own commit round: each send waits until the
    // DS made it durable.
    let t0 = Instant::now();
    for i in 0..3 {
        alice
            .send_text(&g.to_string(), &format!("m{i}"))
            .await
            .unwrap();
    }
    assert!(
        t0.elapsed() < INTERVAL,
        "the three sends took {:?}; the test needs them within one interval",
        t0.elapsed()
    );
    let at = arrivals.await.unwrap();
    // Bob's stream had carried no entry yet: the first goes out at once.
    assert!(
        at[0] - t0 < INTERVAL / 2,
        "an idle member's first push was held back {:?}",
        at[0] - t0
    );
    // The next rounds came while the first push was fresh: they wait out
    // the interval and go out in one write.
    assert!(
        at[1] - at[0] >= INTERVAL - Duration::from_millis(500),
        "the second round was pushed {:?} after the first (interval {INTERVAL:?})",
        at[1] - at[0]
    );
    assert!(
        at[2] - at[1] < INTERVAL / 2,
        "rounds queued during the interval were not pushed together: {:?} apart",
        at[2] - at[1]
    );
}
