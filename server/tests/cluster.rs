//! Cluster mode: several DS nodes on one PostgreSQL database, woken by
//! each other through NATS. Members connected to different nodes get each
//! other's messages and commits pushed; two commits for one epoch posted
//! to two nodes at once end in one log; delivery goes on by polling while
//! the bus is stopped; a killed node's clients move on; a restarted
//! database is waited out. Skipped (and said so) without
//! `HUDDLE_TEST_POSTGRES` and `HUDDLE_TEST_NATS`.
#![allow(clippy::unwrap_used)]
mod common;

use std::time::Duration;

use common::*;
use huddle_client::{Client, Event, Home};
use huddle_server::ServerConfig;

/// How long a pushed message may take to arrive.
const PUSHED_WITHIN: Duration = Duration::from_secs(20);

/// Three nodes (or `n`) on one database and one bus, with their own
/// subject prefix (other tests share the NATS server); `tune` adjusts each
/// node's configuration.
async fn nodes(
    test: &str,
    n: usize,
    tune: impl Fn(usize, &mut ServerConfig),
) -> Option<(PgSchema, Vec<InProcess>)> {
    let db = PgSchema::new(test)?;
    let bus = nats(test)?;
    let prefix = format!("t{}", hex::encode(rand::random::<[u8; 6]>()));
    let mut out = Vec::new();
    for i in 0..n {
        let (url, bus, prefix) = (db.url.clone(), bus.clone(), prefix.clone());
        out.push(
            InProcess::start_with(|c| {
                c.store_url = Some(url);
                c.bus_url = Some(bus);
                c.bus_prefix = prefix;
                tune(i, c);
            })
            .await,
        );
    }
    Some((db, out))
}

/// `n` nodes (as [`nodes`]) that keep blobs on an object store of the
/// test's own, and that store.
async fn nodes_on_s3(
    test: &str,
    n: usize,
) -> Option<(services::PrivateS3, PgSchema, Vec<InProcess>)> {
    let s3 = off_runtime(|| services::PrivateS3::start(test))?;
    let (db, nodes) = nodes(test, n, |_, c| s3.apply(c)).await?;
    Some((s3, db, nodes))
}

fn is_text(want: &'static str) -> impl Fn(&Event) -> bool {
    move |e| e.kind == "text" && e.text() == Some(want)
}

/// Members on three nodes: alice's messages, sent through node 0, are
/// pushed to bob on node 1; carol's commit through node 2 (adding dave, on
/// node 0) reaches bob's node, which follows it, and then dave's message.
/// The nodes poll the database only every hour here, so only the bus can
/// have carried them. In the end every member is in the same epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_three_nodes_get_each_others_messages_and_commits_pushed() {
    let Some((_db, n)) = nodes("members_on_three_nodes", 3, |_, c| {
        c.cluster_poll_connected = Duration::from_secs(3600);
    })
    .await
    else {
        return;
    };
    let mut alice = n[0].client("alice").await;
    let bob = n[1].client("bob").await;
    let mut carol = n[2].client("carol").await;
    let mut dave = n[0].client("dave").await;
    let g = alice.create_group("g").await.unwrap();
    alice
        .add(&g.to_string(), &["bob".into(), "carol".into()])
        .await
        .unwrap();
    // Carol adds dave below: she needs the role for it.
    alice
        .set_role(&g.to_string(), "carol", huddle_core::policy::Role::Admin)
        .await
        .unwrap();
    carol.sync().await.unwrap();

    let mut bob = bob;
    let (listener, mut rx, stop) = listening(&mut bob);
    let talk = async {
        next_event(&mut rx, PUSHED_WITHIN, "bob: listening", |e| {
            e.kind == "listening"
        })
        .await;
        for i in 0..3 {
            alice.send_text("g", &format!("hello {i}")).await.unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            let e = next_event(&mut rx, PUSHED_WITHIN, "bob: text", |e| e.kind == "text").await;
            got.push(e.text().unwrap().to_owned());
        }
        assert_eq!(got, ["hello 0", "hello 1", "hello 2"]);

        carol.add("g", &["dave".into()]).await.unwrap();
        let added = next_event(&mut rx, PUSHED_WITHIN, "bob: member_added", |e| {
            e.kind == "member_added"
        })
        .await;
        assert!(added.members().contains(&"dave".to_owned()), "{added:?}");
        dave.sync().await.unwrap();
        dave.send_text("g", "dave here").await.unwrap();
        let e = next_event(&mut rx, PUSHED_WITHIN, "bob: text", |e| e.kind == "text").await;
        assert_eq!(e.text(), Some("dave here"));
        stop.send(()).unwrap();
    };
    tokio::join!(listener, talk);
    // Nothing twice: a sync after listening finds nothing new.
    assert_eq!(texts(&bob.sync().await.unwrap()), Vec::<String>::new());
    alice.sync().await.unwrap();
    carol.sync().await.unwrap();
    let epochs: Vec<_> = [&alice, &bob, &carol, &dave]
        .iter()
        .map(|c| c.epoch_authenticator("g").unwrap())
        .collect();
    assert!(epochs.windows(2).all(|w| w[0] == w[1]), "{epochs:?}");
    drop(n);
}

/// Alice on node 0 and bob on node 1 both commit in the same epoch at the
/// same moment. The database takes one commit for that epoch; the other
/// is refused as stale, and its member syncs and commits again. Both end
/// in the same epoch, two past where they began, with one commit in each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_commits_for_one_epoch_on_two_nodes_end_in_one_log() {
    let Some((db, n)) = nodes("two_commits_for_one_epoch", 2, |_, _| {}).await else {
        return;
    };
    let mut alice = n[0].client("alice").await;
    let mut bob = n[1].client("bob").await;
    let g = alice.create_group("g").await.unwrap();
    alice.add(&g.to_string(), &["bob".into()]).await.unwrap();
    bob.sync().await.unwrap();
    let start = alice.epoch_authenticator("g").unwrap().0;
    assert_eq!(bob.epoch_authenticator("g").unwrap().0, start);
    for _ in 0..3 {
        let (a, b) = tokio::join!(alice.update("g"), bob.update("g"));
        a.unwrap();
        b.unwrap();
    }
    alice.sync().await.unwrap();
    bob.sync().await.unwrap();
    let (ea, eb) = (
        alice.epoch_authenticator("g").unwrap(),
        bob.epoch_authenticator("g").unwrap(),
    );
    assert_eq!(ea, eb);
    assert_eq!(ea.0, start + 6);
    // One statement: compaction may delete entries between two.
    assert_eq!(
        db.count("SELECT count(*) - count(DISTINCT epoch) FROM log WHERE kind = 0"),
        0,
        "two commits in one epoch"
    );
    drop(n);
}

/// Media on an object store all nodes share: alice uploads a 20 MiB file
/// through node 0 (three parts), bob downloads it through node 1 and
/// reads a range through node 2, byte for byte what was sent; a member
/// removed through node 2 is refused the item on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_sent_through_one_node_is_fetched_through_the_others() {
    let test = "a_file_sent_through_one_node_is_fetched_through_the_others";
    let Some((s3, _db, n)) = nodes_on_s3(test, 3).await else {
        return;
    };
    let mut alice = n[0].client("alice").await;
    let mut bob = n[1].client("bob").await;
    let mut carol = n[2].client("carol").await;
    let g = alice.create_group("g").await.unwrap().to_string();
    alice
        .add(&g, &["bob".into(), "carol".into()])
        .await
        .unwrap();
    // Carol removes bob below: she needs the role for it.
    alice
        .set_role(&g, "carol", huddle_core::policy::Role::Admin)
        .await
        .unwrap();
    let data: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let src = n[0].dir.path().join("video.bin");
    std::fs::write(&src, &data).unwrap();
    let sent = alice
        .send_file(&g, &src, "", &mut huddle_client::Quiet)
        .await
        .unwrap();
    let media = sent.media_id().unwrap().to_owned();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    let out = n[1].dir.path().join("video.out");
    bob.download(&media, Some(&out), &mut huddle_client::Quiet)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == data, "bob got other bytes");
    let range = carol
        .read_range(&media, 9_000_000, 9_000_100)
        .await
        .unwrap();
    assert_eq!(range, &data[9_000_000..9_000_100]);
    assert!(s3.object_path(&media).exists(), "the blob is one object");
    assert_eq!(s3.upload_files(), 0, "no part of the upload is left over");

    carol.remove(&g, &["bob".into()]).await.unwrap();
    let again = n[1].dir.path().join("again.out");
    let r = bob
        .download(&media, Some(&again), &mut huddle_client::Quiet)
        .await;
    assert_eq!(
        r.unwrap_err().code(),
        Some(huddle_core::proto::ErrorCode::NotMember),
        "a removed member is refused by the DS"
    );
    drop(n);
}

/// Opens an upload of `blob` as `media` of `group` on `net`; the DS's
/// first answer.
async fn begin_upload(
    net: &huddle_client::net::Connection,
    group: huddle_core::GroupId,
    media: huddle_core::MediaId,
    blob: &[u8],
) -> huddle_client::Result<(
    quinn::SendStream,
    quinn::RecvStream,
    huddle_core::proto::Response,
)> {
    net.open(&huddle_core::proto::Request::BeginUpload(
        huddle_core::proto::UploadRequest {
            group,
            media,
            total_len: blob.len() as u64,
        },
    ))
    .await
}

/// An upload stopped after 17 MiB through node 0 resumes through node 1
/// at the end of the last part stored (16 MiB): the parts are on the
/// shared object store, the progress in the database. While a stream of
/// the item runs on node 0, a second one on node 1 is refused
/// (`OutOfOrder`) rather than both writing it. The blob then downloads
/// whole through either node, and no part is left over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_stopped_on_one_node_resumes_on_another() {
    use huddle_core::media::{seal_blob, Header, ItemKey, DEFAULT_CHUNK_SIZE};
    use huddle_core::proto::{ErrorCode, Response};
    let test = "an_upload_stopped_on_one_node_resumes_on_another";
    let Some((s3, _db, n)) = nodes_on_s3(test, 2).await else {
        return;
    };
    let alice = common::raw::Raw::new(&n[0], "alice").await;
    let (group, _mls) = alice.create().await;
    let on_node1 = n[1].connect().await;
    on_node1.authenticate(&alice.id, false).await.unwrap();
    let media = huddle_core::MediaId(common::raw::rand_id());
    let plain: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
        .collect();
    let header = Header::new(
        media,
        group,
        [4; 32],
        DEFAULT_CHUNK_SIZE,
        plain.len() as u64,
    )
    .unwrap();
    let blob = seal_blob(&ItemKey::from_bytes([9; 32]), header, &plain).unwrap();
    let hash = *blake3::hash(&blob).as_bytes();

    // 17 MiB through node 0; node 1 meanwhile refuses a second stream.
    let (mut send, mut recv, first) = begin_upload(&alice.net, group, media, &blob).await.unwrap();
    assert!(
        matches!(
            first,
            Response::Upload {
                offset: 0,
                complete: false
            }
        ),
        "{first:?}"
    );
    send.write_all(&blob[..17 << 20]).await.unwrap();
    match begin_upload(&on_node1, group, media, &blob).await {
        Err(huddle_client::ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::OutOfOrder, "{}", e.message)
        }
        Err(e) => panic!("{e}"),
        Ok((_, _, r)) => panic!("a second stream on another node was let in: {r:?}"),
    }
    send.finish().unwrap();
    match huddle_client::net::read_message::<Response>(&mut recv)
        .await
        .unwrap()
    {
        Response::Error(e) => assert!(e.message.contains("resume from 16777216"), "{}", e.message),
        other => panic!("{other:?}"),
    }

    // The rest through node 1.
    let (mut send, mut recv, first) = begin_upload(&on_node1, group, media, &blob).await.unwrap();
    let Response::Upload {
        offset,
        complete: false,
    } = first
    else {
        panic!("{first:?}");
    };
    assert_eq!(offset, 16 << 20, "resumes at the last stored part");
    send.write_all(&blob[offset as usize..]).await.unwrap();
    send.write_all(&huddle_core::frame::encode(&hash))
        .await
        .unwrap();
    send.finish().unwrap();
    let done = huddle_client::net::read_message::<Response>(&mut recv)
        .await
        .unwrap();
    assert!(
        matches!(done, Response::Upload { complete: true, .. }),
        "{done:?}"
    );

    for net in [&alice.net, &on_node1] {
        let (_s, mut recv, head) = net
            .open(&huddle_core::proto::Request::Download {
                media,
                offset: 0,
                len: 0,
            })
            .await
            .unwrap();
        assert!(
            matches!(head, Response::Download { hash: h, .. } if h == hash),
            "{head:?}"
        );
        let got = recv.read_to_end(blob.len() + 1).await.unwrap();
        assert!(got == blob, "other bytes came back");
    }
    assert_eq!(s3.upload_files(), 0);
    drop(n);
}

/// A bus that requires a user and password: nodes given them in the
/// address (`nats://USER:PASSWORD@host`) wake each other through it (the
/// nodes poll the database only every hour here, so only the bus can
/// have carried the message); a node given a wrong password is refused by
/// it and, as without a bus, still delivers by polling the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_use_a_bus_that_needs_a_password() {
    let test = "nodes_use_a_bus_that_needs_a_password";
    let Some(bus) =
        off_runtime(|| services::PrivateNats::start_with_password(test, "huddle", "s3cret"))
    else {
        return;
    };
    let good = bus.url().replace("nats://", "nats://huddle:s3cret@");
    let bad = bus.url().replace("nats://", "nats://huddle:wrong@");
    let Some((_db, n)) = nodes(test, 3, |i, c| {
        c.bus_url = Some(if i < 2 { good.clone() } else { bad.clone() });
        c.cluster_poll = Duration::from_millis(200);
        c.cluster_poll_connected = Duration::from_secs(3600);
    })
    .await
    else {
        return;
    };
    let mut alice = n[0].client("alice").await;
    let bob = n[1].client("bob").await;
    let carol = n[2].client("carol").await;
    let g = alice.create_group("g").await.unwrap();
    alice
        .add(&g.to_string(), &["bob".into(), "carol".into()])
        .await
        .unwrap();
    let (mut bob, mut carol) = (bob, carol);
    let (bob_listener, mut bob_rx, stop_bob) = listening(&mut bob);
    let (carol_listener, mut carol_rx, stop_carol) = listening(&mut carol);
    let talk = async {
        for rx in [&mut bob_rx, &mut carol_rx] {
            next_event(rx, PUSHED_WITHIN, "listening", |e| e.kind == "listening").await;
        }
        alice.send_text("g", "through the bus").await.unwrap();
        next_event(
            &mut bob_rx,
            PUSHED_WITHIN,
            "bob: text",
            is_text("through the bus"),
        )
        .await;
        next_event(
            &mut carol_rx,
            PUSHED_WITHIN,
            "carol: text",
            is_text("through the bus"),
        )
        .await;
        stop_bob.send(()).unwrap();
        stop_carol.send(()).unwrap();
    };
    tokio::join!(bob_listener, carol_listener, talk);
    drop(n);
}

/// A bus that speaks only TLS: nodes given `tls://` and the authority
/// of its certificate (`bus_ca`) wake each other through it (their polls
/// run only every hour, so only the bus can have carried the message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_use_a_bus_over_tls() {
    let test = "nodes_use_a_bus_over_tls";
    let certs = tempfile::tempdir().unwrap();
    let made =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (certs.path().join("nats.pem"), certs.path().join("nats.key"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let Some(bus) = off_runtime(|| services::PrivateNats::start_with_tls(test, &cert, &key)) else {
        return;
    };
    let url = bus.url().replace("nats://", "tls://");
    let Some((_db, n)) = nodes(test, 2, |_, c| {
        c.bus_url = Some(url.clone());
        c.bus_ca = Some(cert.clone());
        c.cluster_poll = Duration::from_secs(3600);
        c.cluster_poll_connected = Duration::from_secs(3600);
    })
    .await
    else {
        return;
    };
    let mut alice = n[0].client("alice").await;
    let bob = n[1].client("bob").await;
    let g = alice.create_group("g").await.unwrap();
    alice.add(&g.to_string(), &["bob".into()]).await.unwrap();
    let mut bob = bob;
    let (listener, mut rx, stop) = listening(&mut bob);
    let talk = async {
        next_event(&mut rx, PUSHED_WITHIN, "listening", |e| {
            e.kind == "listening"
        })
        .await;
        alice.send_text("g", "over tls").await.unwrap();
        next_event(&mut rx, PUSHED_WITHIN, "bob: text", is_text("over tls")).await;
        stop.send(()).unwrap();
    };
    tokio::join!(listener, talk);
    drop(n);
}

/// Retention sweeps run on one node of the cluster: with both nodes
/// sweeping every second, the `sweep` lease has one holder, and it keeps
/// it while it lives (the lease lasts three intervals, so only a holder
/// three intervals late would lose it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_of_the_cluster_sweeps() {
    let Some((db, n)) = nodes("one_node_of_the_cluster_sweeps", 2, |_, c| {
        c.media_sweep_interval = Duration::from_secs(1);
    })
    .await
    else {
        return;
    };
    let holder = "SELECT min(holder) FROM leases WHERE name = 'sweep' AND until > now()";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while db.count("SELECT count(*) FROM leases") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nobody took the lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = db.count(holder);
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(db.count(holder), first, "the lease changed hands");
    }
    assert_eq!(db.count("SELECT count(*) FROM leases"), 1);
    drop(n);
}

/// Both nodes use a NATS server of the test's own, which the test stops
/// (SIGKILL) and starts again. While it is down, alice's messages through
/// node 0 and a Welcome for erin (on node 1) still reach node 1's
/// listeners, by polling the database; once it is back, delivery goes on.
/// Nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_goes_on_by_polling_while_the_bus_is_stopped() {
    let test = "delivery_goes_on_by_polling_while_the_bus_is_stopped";
    let Some(mut bus) = off_runtime(|| services::PrivateNats::start(test)) else {
        return;
    };
    let url = bus.url();
    let Some((_db, n)) = nodes(test, 2, |_, c| {
        c.cluster_poll = Duration::from_millis(200);
        c.cluster_poll_connected = Duration::from_secs(3600);
        c.bus_url = Some(url.clone());
    })
    .await
    else {
        return;
    };
    let mut alice = n[0].client("alice").await;
    let bob = n[1].client("bob").await;
    let erin = n[1].client("erin").await;
    let g = alice.create_group("g").await.unwrap();
    alice.add(&g.to_string(), &["bob".into()]).await.unwrap();
    let (mut bob, mut erin) = (bob, erin);
    let (bob_listener, mut bob_rx, stop_bob) = listening(&mut bob);
    let (erin_listener, mut erin_rx, stop_erin) = listening(&mut erin);
    let talk = async {
        next_event(&mut bob_rx, PUSHED_WITHIN, "bob: listening", |e| {
            e.kind == "listening"
        })
        .await;
        next_event(&mut erin_rx, PUSHED_WITHIN, "erin: listening", |e| {
            e.kind == "listening"
        })
        .await;
        alice.send_text("g", "over the bus").await.unwrap();
        next_event(
            &mut bob_rx,
            PUSHED_WITHIN,
            "bob: over the bus",
            is_text("over the bus"),
        )
        .await;

        bus.down();
        alice.send_text("g", "while the bus is away").await.unwrap();
        next_event(
            &mut bob_rx,
            PUSHED_WITHIN,
            "bob: while the bus is away",
            is_text("while the bus is away"),
        )
        .await;
        alice.add("g", &["erin".into()]).await.unwrap();
        next_event(&mut erin_rx, PUSHED_WITHIN, "erin: joined", |e| {
            e.kind == "joined"
        })
        .await;
        alice.send_text("g", "welcome erin").await.unwrap();
        next_event(
            &mut erin_rx,
            PUSHED_WITHIN,
            "erin: welcome erin",
            is_text("welcome erin"),
        )
        .await;

        off_runtime(|| bus.up());
        // The bus is back: delivery goes on (by polling until the nodes'
        // bus clients reconnect by themselves, then by the bus).
        alice.send_text("g", "bus again").await.unwrap();
        next_event(
            &mut bob_rx,
            PUSHED_WITHIN,
            "bob: bus again",
            is_text("bus again"),
        )
        .await;
        next_event(
            &mut erin_rx,
            PUSHED_WITHIN,
            "erin: bus again",
            is_text("bus again"),
        )
        .await;
        stop_bob.send(()).unwrap();
        stop_erin.send(()).unwrap();
    };
    tokio::join!(bob_listener, erin_listener, talk);
    assert_eq!(texts(&bob.sync().await.unwrap()), Vec::<String>::new());
    assert_eq!(texts(&erin.sync().await.unwrap()), Vec::<String>::new());
    drop(n);
}

/// Three nodes as processes, sharing one certificate; alice and bob know
/// all three addresses and are connected to the first. That node is killed
/// (SIGKILL) while bob listens: bob's listen finds it gone and moves to the
/// next node, where it catches up and is pushed what follows; alice's next
/// message, tried on the dead node, is refused before anything was sent
/// (so it is not there twice) and, sent again, goes to the next node. The
/// log holds every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_clients_move_to_another_and_nothing_is_lost_or_doubled() {
    let test = "a_killed_nodes_clients_move";
    let Some(db) = PgSchema::new(test) else {
        return;
    };
    let Some(bus) = nats(test) else {
        return;
    };
    let prefix = format!("t{}", hex::encode(rand::random::<[u8; 6]>()));
    let dir = tempfile::tempdir().unwrap();
    let cluster = [
        "--store",
        db.url.as_str(),
        "--bus",
        bus.as_str(),
        "--bus-prefix",
        prefix.as_str(),
    ];
    let first = Process::start_args(&dir.path().join("n0"), "127.0.0.1:0", &cluster);
    let cert = first.cert_path();
    let key = first.data_dir.join("key.pem");
    let shared: Vec<&str> = cluster
        .iter()
        .copied()
        .chain([
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ])
        .collect();
    let others: Vec<Process> = (1..3)
        .map(|i| Process::start_args(&dir.path().join(format!("n{i}")), "127.0.0.1:0", &shared))
        .collect();
    let servers = std::iter::once(&first)
        .chain(&others)
        .map(|p| p.addr.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let register = |name: &'static str| {
        Client::register(
            Home::new(dir.path().join(name)),
            name,
            &servers,
            Some(&cert),
        )
    };
    let mut alice = register("alice").await.unwrap();
    let mut bob = register("bob").await.unwrap();
    let g = alice.create_group("g").await.unwrap();
    alice.add(&g.to_string(), &["bob".into()]).await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(bob.status().await.unwrap().server, first.addr);

    let (listener, mut rx, stop) = listening(&mut bob);
    let talk = async {
        next_event(&mut rx, PUSHED_WITHIN, "bob: listening", |e| {
            e.kind == "listening"
        })
        .await;
        alice.send_text("g", "before").await.unwrap();
        next_event(&mut rx, PUSHED_WITHIN, "bob: before", is_text("before")).await;
        let dead = first.kill9();
        for i in 0..3 {
            let text = format!("after {i}");
            let mut refused = 0;
            loop {
                match alice.send_text("g", &text).await {
                    Ok(_) => break,
                    Err(huddle_client::ClientError::Connect { addr, reason }) if refused == 0 => {
                        assert_eq!(addr, dead, "{reason}");
                        refused += 1;
                    }
                    Err(e) => panic!("sending {text:?}: {e}"),
                }
            }
        }
        for i in 0..3 {
            let text = format!("after {i}");
            let e = next_event(&mut rx, Duration::from_secs(30), "bob: after", |e| {
                e.kind == "text"
            })
            .await;
            assert_eq!(e.text(), Some(text.as_str()));
        }
        stop.send(()).unwrap();
    };
    tokio::join!(listener, talk);
    assert_eq!(texts(&bob.sync().await.unwrap()), Vec::<String>::new());
    let status = bob.status().await.unwrap();
    assert_ne!(status.server, first_addr(&servers));
    assert_eq!(status.servers.len(), 3);
    // Each message once in bob's history, in order.
    let history: Vec<String> = bob
        .messages("g", 100)
        .unwrap()
        .iter()
        .filter_map(|e| e.text().map(str::to_owned))
        .collect();
    assert_eq!(history, ["before", "after 0", "after 1", "after 2"]);
    drop(others);
}

fn first_addr(servers: &str) -> &str {
    servers.split(',').next().unwrap()
}

/// A node whose bus cannot be reached when it starts still starts and
/// serves: its groups follow the database by polling, and what its
/// members post reaches the other node's listeners (whose node polls
/// too, since no notice comes from the first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_and_serves_without_its_bus() {
    let test = "a_node_starts_and_serves_without_its_bus";
    let Some(_) = nats(test) else {
        return;
    };
    // A port nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("nats://{}", l.local_addr().unwrap())
    };
    let Some((_db, n)) = nodes(test, 2, |i, c| {
        c.cluster_poll = Duration::from_millis(200);
        c.cluster_poll_connected = Duration::from_millis(500);
        if i == 0 {
            c.bus_url = Some(dead.clone());
        }
    })
    .await
    else {
        return;
    };
    let mut alice = n[0].client("alice").await;
    let mut bob = n[1].client("bob").await;
    let g = alice.create_group("g").await.unwrap();
    alice.add(&g.to_string(), &["bob".into()]).await.unwrap();
    let (listener, mut rx, stop) = listening(&mut bob);
    let talk = async {
        next_event(&mut rx, PUSHED_WITHIN, "bob: joined", |e| {
            e.kind == "joined"
        })
        .await;
        for i in 0..3 {
            let text = format!("no bus {i}");
            alice.send_text("g", &text).await.unwrap();
            let e = next_event(&mut rx, PUSHED_WITHIN, "bob: text", |e| e.kind == "text").await;
            assert_eq!(e.text(), Some(text.as_str()));
        }
        stop.send(()).unwrap();
    };
    tokio::join!(listener, talk);
    drop(n);
}

/// Two nodes on a PostgreSQL server of the test's own, which the test
/// stops (`pg_ctl -m fast`, ending every session) and starts again. While
/// it is down both nodes refuse writes with `Unavailable` (nothing
/// stored); once it is back both serve again, without a restart of their
/// own, and a message posted through one is pushed to a listener on the
/// other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_refuse_writes_while_the_database_restarts_and_recover_by_themselves() {
    let test = "nodes_refuse_writes_while_the_database_restarts";
    let Some(pg) = off_runtime(|| services::PrivatePostgres::start(test)) else {
        return;
    };
    let Some(bus) = nats(test) else {
        return;
    };
    let prefix = format!("t{}", hex::encode(rand::random::<[u8; 6]>()));
    let mut n = Vec::new();
    for _ in 0..2 {
        let (url, bus, prefix) = (pg.url(), bus.clone(), prefix.clone());
        n.push(
            InProcess::start_with(|c| {
                c.store_url = Some(url);
                c.bus_url = Some(bus);
                c.bus_prefix = prefix;
            })
            .await,
        );
    }
    let mut alice = n[0].client("alice").await;
    let mut bob = n[1].client("bob").await;
    let g = alice.create_group("g").await.unwrap();
    alice.add(&g.to_string(), &["bob".into()]).await.unwrap();
    bob.sync().await.unwrap();

    off_runtime(|| pg.down());
    for (who, c) in [("alice", &mut alice), ("bob", &mut bob)] {
        match c.send_text("g", "while the database is away").await {
            Err(huddle_client::ClientError::Server(e)) => {
                assert_eq!(
                    e.code,
                    huddle_core::proto::ErrorCode::Unavailable,
                    "{who}: {}",
                    e.message
                );
            }
            other => panic!("{who}: expected Unavailable, got {other:?}"),
        }
    }

    off_runtime(|| pg.up());
    let (listener, mut rx, stop) = listening(&mut bob);
    let talk = async {
        next_event(&mut rx, PUSHED_WITHIN, "bob: listening", |e| {
            e.kind == "listening"
        })
        .await;
        alice.send_text("g", "back").await.unwrap();
        next_event(&mut rx, PUSHED_WITHIN, "bob: back", is_text("back")).await;
        stop.send(()).unwrap();
    };
    tokio::join!(listener, talk);
    bob.send_text("g", "me too").await.unwrap();
    assert_eq!(texts(&alice.sync().await.unwrap()), vec!["bob: me too"]);
    drop(n);
}
