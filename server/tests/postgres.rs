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

/// The database goes away under a running DS: requests that need it are
/// refused with `Unavailable` (nothing stored, nothing half-done), the DS
/// keeps running, and once the database is back it serves again without a
/// restart of its own, with nothing acknowledged lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_is_refused_clearly_and_the_ds_recovers_without_a_restart() {
    let Some(db) = PgSchema::new("a_lost_database_is_refused_clearly") else {
        return;
    };
    let mut proxy = Cuttable::start(db.target().await).await;
    let url = db.url_via(proxy.port);
    let s = InProcess::start_with(|c| c.store_url = Some(url)).await;
    let mut alice = s.client("alice").await;
    let mut bob = s.client("bob").await;
    let g = alice.create_group("g").await.unwrap();
    alice.add(&g.to_string(), &["bob".into()]).await.unwrap();
    alice.send_text("g", "before").await.unwrap();

    proxy.cut();
    match alice.send_text("g", "while the database is away").await {
        Err(huddle_client::ClientError::Server(e)) => {
            assert_eq!(
                e.code,
                huddle_core::proto::ErrorCode::Unavailable,
                "{}",
                e.message
            );
            assert!(
                e.message.contains("database is unavailable"),
                "{}",
                e.message
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }

    proxy.resume().await;
    alice.send_text("g", "after").await.unwrap();
    assert_eq!(
        texts(&bob.sync().await.unwrap()),
        vec!["alice: before", "alice: after"]
    );
    drop(s);
}

/// Two DS processes on one database, each serving one member. A node's
/// group task holds the group's state in memory; when the other node has
/// written the group since, the database refuses the stale node's write
/// (the head moved), and that node loads the group again and goes on: a
/// message is accepted after the other node's, and a commit built on the
/// old epoch is refused as stale, so its member syncs and commits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_group_state_is_behind_the_database_reloads_it() {
    let Some(db) = PgSchema::new("a_node_whose_group_state_is_behind") else {
        return;
    };
    let a = InProcess::start_with(|c| c.store_url = Some(db.url.clone())).await;
    let b = InProcess::start_with(|c| c.store_url = Some(db.url.clone())).await;
    let mut alice = a.client("alice").await;
    let mut bob = b.client("bob").await;
    let _carol = a.client("carol").await;
    let g = alice.create_group("g").await.unwrap();
    alice.add(&g.to_string(), &["bob".into()]).await.unwrap();
    alice.send_text("g", "from a").await.unwrap();
    // Node b loads the group when bob first needs it, from the database.
    assert_eq!(texts(&bob.sync().await.unwrap()), vec!["alice: from a"]);
    bob.send_text("g", "from b").await.unwrap();
    // Node a's task still holds the head before bob's message.
    alice.send_text("g", "from a again").await.unwrap();
    assert_eq!(texts(&alice.sync().await.unwrap()), vec!["bob: from b"]);
    // Bob moves the group to a new epoch through b; alice's next commit,
    // through a, is built on the epoch before, refused as stale, and made
    // again after a sync.
    bob.update("g").await.unwrap();
    let epoch_before = alice.epoch_authenticator("g").unwrap().0;
    alice.add("g", &["carol".into()]).await.unwrap();
    let epoch_after = alice.epoch_authenticator("g").unwrap().0;
    assert_eq!(epoch_after, epoch_before + 2, "bob's update, then the add");
    assert_eq!(alice.members("g").unwrap().len(), 3);
    drop((a, b));
}
