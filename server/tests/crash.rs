//! `kill -9` of the server during traffic: nothing acknowledged is lost,
//! nothing is delivered twice, everyone agrees on the order.
#![allow(clippy::unwrap_used)]
mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use huddle_client::{Client, Home};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_traffic_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ds");
    let server = Process::start(&data, "127.0.0.1:0");
    let addr = server.addr.clone();
    let cert = server.cert_path();
    let home = |n: &str| Home::new(dir.path().join(n));
    let mut alice = Client::register(home("alice"), "alice", &addr, Some(&cert))
        .await
        .unwrap();
    let mut bob = Client::register(home("bob"), "bob", &addr, Some(&cert))
        .await
        .unwrap();
    let mut carol = Client::register(home("carol"), "carol", &addr, Some(&cert))
        .await
        .unwrap();
    let g = alice.create_group("g").await.unwrap().to_string();
    alice
        .add(&g, &["bob".into(), "carol".into()])
        .await
        .unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();

    let mut server = Some(server);
    let mut acked = Vec::new();
    let mut kills = 0;
    // Three kills, each while Alice is sending as fast as she can.
    for round in 0..3 {
        // The kill comes once a few of this round's messages were
        // acknowledged, while Alice goes on sending.
        let (sent_tx, mut sent_rx) = tokio::sync::watch::channel(0usize);
        let killer = async {
            let _ = sent_rx.wait_for(|n| *n >= 5).await;
            server.take().unwrap().kill9();
            // Straight back up on the same port and data dir.
            Process::start(&data, &addr)
        };
        let sender = async {
            // Dropped when the round's sending ends, which wakes the killer
            // if fewer than five went through.
            let sent_tx = sent_tx;
            let mut sent = Vec::new();
            for i in 0..40 {
                let text = format!("r{round}-{i}");
                if alice.send_text(&g, &text).await.is_ok() {
                    sent.push(text);
                    let _ = sent_tx.send(sent.len());
                }
            }
            sent
        };
        let (restarted, sent) = tokio::join!(killer, sender);
        kills += 1;
        acked.extend(sent);
        server = Some(restarted);
        // Whatever Alice's last attempts did, she can continue.
        for _ in 0..50 {
            if alice.sync().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(kills, 3);
    assert!(
        acked.len() >= 20,
        "too few messages were acknowledged: {}",
        acked.len()
    );

    let history = |c: &Client| -> Vec<String> {
        c.messages(&g, 100_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "text" && e.from == "alice")
            .map(|e| e.text().unwrap().to_owned())
            .collect()
    };
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    let hb = history(&bob);
    let hc = history(&carol);
    assert_eq!(hb, hc, "both members see the same sequence");
    let unique: HashSet<_> = hb.iter().collect();
    assert_eq!(unique.len(), hb.len(), "a message was delivered twice");
    for a in &acked {
        assert!(unique.contains(a), "acknowledged message {a} was lost");
    }
    // Alice's acknowledged messages appear in the order she sent them.
    let positions: Vec<usize> = acked
        .iter()
        .map(|a| hb.iter().position(|h| h == a).unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    drop(server);
}
