//! QUIC transport settings between the DS and the reference client.
#![allow(clippy::unwrap_used)]
mod common;

use std::time::Duration;

use common::*;
use huddle_client::net::Connection;
use huddle_core::proto::{Request, MAX_UDP_PAYLOAD};

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
