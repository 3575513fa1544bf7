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

/// `--stats-file`: SIGUSR1 writes the work counters; they count what a
/// message cost (a round, a transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_writes_the_work_counters() {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let server = Process::start_args(
        &dir.path().join("ds"),
        "127.0.0.1:0",
        &["--stats-file", stats.to_str().unwrap()],
    );
    let dump = |n: u64| -> serde_json::Value {
        let _ = std::process::Command::new("kill")
            .args(["-USR1", &server.child.id().to_string()])
            .status();
        for _ in 0..2000 {
            if let Some(v) = std::fs::read(&stats)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .filter(|v| v["dump"] == n)
            {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        panic!("no stats dump {n} in {}", stats.display());
    };
    let before = dump(1);
    let mut alice = Client::register(
        Home::new(dir.path().join("a")),
        "alice",
        &server.addr,
        Some(&server.cert_path()),
    )
    .await
    .unwrap();
    alice.create_group("g").await.unwrap();
    for i in 0..3 {
        alice.send_text("g", &format!("m{i}")).await.unwrap();
    }
    let after = dump(2);
    let grew = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert!(grew("entries") >= 3, "{after}");
    assert!(
        grew("rounds") >= 1 && grew("rounds") <= grew("entries"),
        "{after}"
    );
    assert!(grew("transactions") >= 1, "{after}");
    assert!(grew("group_writes") >= grew("rounds"), "{after}");
    alice.close().await;
}
