//! Crash safety and clean shutdown of the server process.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use huddle_client::{Client, Home};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ds");
    let server = Process::start(&data, "127.0.0.1:0");
    let addr = server.addr.clone();
    let cert = server.cert_path();
    let mut alice = Client::register(Home::new(dir.path().join("a")), "alice", &addr, Some(&cert))
        .await
        .unwrap();
    let mut bob = Client::register(Home::new(dir.path().join("b")), "bob", &addr, Some(&cert))
        .await
        .unwrap();
    let g = alice.create_group("g").await.unwrap();
    alice.add(&g.to_string(), &["bob".into()]).await.unwrap();
    alice.send_text("g", "before the crash").await.unwrap();
    let (a_before, _) = alice.key_package_count().await.unwrap();
    let (b_before, _) = bob.key_package_count().await.unwrap();
    alice.close().await;
    bob.close().await;

    server.kill9();
    let server = Process::start(&data, &addr);
    assert_eq!(server.addr, addr);

    let mut alice = Client::open(Home::new(dir.path().join("a"))).unwrap();
    let mut bob = Client::open(Home::new(dir.path().join("b"))).unwrap();
    assert_eq!(alice.key_package_count().await.unwrap().0, a_before);
    assert_eq!(bob.key_package_count().await.unwrap().0, b_before);
    let events = bob.sync().await.unwrap();
    assert_eq!(texts(&events), vec!["alice: before the crash"]);
    bob.send_text("g", "after the crash").await.unwrap();
    assert_eq!(
        texts(&alice.sync().await.unwrap()),
        vec!["bob: after the crash"]
    );
    drop(server);
}

#[test]
fn sigterm_shuts_down_cleanly_and_keeps_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ds");
    let first = Process::start(&data, "127.0.0.1:0");
    let fp = first.fingerprint.clone();
    assert!(!fp.is_empty());
    let status = first.terminate();
    assert!(status.success(), "exit status {status:?}");
    // Same data dir: same certificate, so pinned clients still connect.
    let second = Process::start(&data, "127.0.0.1:0");
    assert_eq!(second.fingerprint, fp);
    let mode = std::fs::metadata(data.join("key.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
}

fn texts(events: &[huddle_client::Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.kind == "text")
        .map(|e| format!("{}: {}", e.from, e.text.as_deref().unwrap_or("")))
        .collect()
}
