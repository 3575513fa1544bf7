//! The DS on PostgreSQL (`--store postgres://…`) as a process: what it
//! acknowledged survives SIGKILL, and a database it cannot reach is
//! reported clearly. Skipped (and said so) without `HUDDLE_TEST_POSTGRES`.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use huddle_client::{Client, Home};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_on_postgres_survives_kill_9() {
    let Some(db) = PgSchema::new("state_on_postgres_survives_kill_9") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ds");
    let store = ["--store", db.url.as_str()];
    let server = Process::start_args(&data, "127.0.0.1:0", &store);
    let addr = server.addr.clone();
    let cert = server.cert_path();
    let mut alice = Client::register(Home::new(dir.path().join("a")), "alice", &addr, Some(&cert))
        .await
        .unwrap();
    let bob = Client::register(Home::new(dir.path().join("b")), "bob", &addr, Some(&cert))
        .await
        .unwrap();
    let g = alice.create_group("g").await.unwrap();
    alice.add(&g.to_string(), &["bob".into()]).await.unwrap();
    alice.send_text("g", "before the crash").await.unwrap();
    alice.close().await;
    bob.close().await;
    server.kill9();
    // Everything is in the database, nothing in the data directory's
    // embedded store.
    assert!(!data.join("huddle.redb").exists());
    assert_eq!(db.count("SELECT count(*) FROM users"), 2);
    // The add commit, the group's name, the text.
    assert_eq!(db.count("SELECT count(*) FROM log"), 3);

    let server = Process::start_args(&data, &addr, &store);
    let mut alice = Client::open(Home::new(dir.path().join("a"))).unwrap();
    let mut bob = Client::open(Home::new(dir.path().join("b"))).unwrap();
    let events = bob.sync().await.unwrap();
    assert_eq!(texts(&events), vec!["alice: before the crash"]);
    bob.send_text("g", "after the crash").await.unwrap();
    assert_eq!(
        texts(&alice.sync().await.unwrap()),
        vec!["bob: after the crash"]
    );
    drop(server);
}

/// A DS told to use a database it cannot reach says so and exits, instead
/// of serving without its state.
#[test]
fn an_unreachable_database_is_a_clear_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_huddle-server"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--store", "postgres://nobody@127.0.0.1:9/nothing"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("opening the database"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_huddle-server"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--store", "mysql://x@y/z"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected a PostgreSQL address"), "{err}");
}
