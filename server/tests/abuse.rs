//! One registered member trying to exhaust the DS: each test plays an
//! attack a hostile client made against an earlier version, and checks
//! that the DS stays within its budget (its own accounting, or the real
//! process's memory and threads read from /proc) and keeps serving an
//! honest user meanwhile. Longer versions (thousands of streams,
//! gigabytes) are `huddle-bench abuse`.
#![allow(clippy::unwrap_used)]
mod common;

use std::time::Duration;

use bytes::Bytes;
use common::raw::*;
use common::*;
use huddle_client::identity::Identity;
use huddle_client::net::{self, Connection};
use huddle_client::{Client, ClientError, Home};
use huddle_core::proto::{self, ErrorCode, Request, Response, UploadRequest};
use huddle_core::{GroupId, MediaId};
use openmls::prelude::{tls_codec::Deserialize as _, *};

/// A full client of `p`, registered as `name`.
async fn client(p: &Process, dir: &std::path::Path, name: &str) -> Client {
    Client::register(
        Home::new(dir.join(name)),
        name,
        &p.addr,
        Some(&p.cert_path()),
    )
    .await
    .unwrap()
}

/// An honest user is served: a fresh connection authenticates and a
/// message goes through.
async fn still_served(dir: &std::path::Path, name: &str, group: &str) {
    let mut c = Client::open(Home::new(dir.join(name))).unwrap();
    c.send_text(group, "still served").await.unwrap();
    c.close().await;
}

/// Alice and mallory registered, mallory a member of alice's group
/// `name`: the two clients and the group's id.
async fn alice_and_mallory(
    p: &Process,
    dir: &std::path::Path,
    name: &str,
) -> (Client, Client, String) {
    let mut alice = client(p, dir, "alice").await;
    let mut mallory = client(p, dir, "mallory").await;
    let g = alice.create_group(name).await.unwrap().to_string();
    alice.add(&g, &["mallory".into()]).await.unwrap();
    mallory.sync().await.unwrap();
    (alice, mallory, g)
}

/// A new connection of `p`, authenticated as the user of `dir/name`.
async fn connect_as(p: &Process, dir: &std::path::Path, name: &str) -> Connection {
    let (_, id) = Home::new(dir.join(name)).load().unwrap();
    let c = Connection::connect(&p.addr, p.trust()).await.unwrap();
    c.authenticate(&id, false).await.unwrap();
    c
}

/// A connection as `id` whose client grants (almost) no flow-control
/// credit: the DS can build answers for it but not send them.
async fn never_reading(p: &Process, id: &Identity) -> Connection {
    let mut t = net::transport();
    t.stream_receive_window(1024u32.into());
    t.receive_window((32u32 * 1024).into());
    let c = Connection::connect_with(None, &p.addr, p.trust(), t)
        .await
        .unwrap();
    c.authenticate(id, false).await.unwrap();
    c
}

/// A hundred log pages asked for on a connection that reads none of them
/// took an earlier DS from 165 MB to 2.59 GB. Now answers are paid for
/// from the connection's budget before they are built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_client_never_reads_stay_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::start_with(
        &dir.path().join("ds"),
        "127.0.0.1:0",
        &["answer_budget_wait=500ms", "answer_write_timeout=5s"],
    );
    let (mut alice, _mallory, g) = alice_and_mallory(&p, dir.path(), "big").await;
    // About 2 MB of log: every page is full (1 MiB).
    for i in 0..32 {
        alice
            .send_text(&g, &format!("{i} {}", "x".repeat(60_000)))
            .await
            .unwrap();
    }
    let (_, id) = Home::new(dir.path().join("mallory")).load().unwrap();
    let conn = never_reading(&p, &id).await;
    let before = p.status("VmRSS");
    let gid: GroupId = g.parse().unwrap();
    let ask = proto::encode_frame(&Request::FetchLog {
        group: gid,
        after: 0,
        limit: 1000,
    });
    let mut unread = Vec::new();
    for _ in 0..100 {
        let (mut send, recv) = conn.quic().open_bi().await.unwrap();
        send.write_all(&ask).await.unwrap();
        let _ = send.finish();
        unread.push((send, recv));
    }
    // The DS has had every request for a while; an honest user is served.
    tokio::time::sleep(Duration::from_secs(2)).await;
    still_served(dir.path(), "alice", &g).await;
    let grown = p.status("VmHWM").saturating_sub(before) / 1024;
    assert!(
        grown < 48,
        "the DS grew by {grown} MiB holding answers nobody reads"
    );
    drop(unread);
}

/// A Welcome's shared part (the encrypted GroupInfo, up to a frame) was
/// copied into every joiner's inbox item: one commit adding a hundred
/// users with it padded to 3.9 MB grew the store by 650 MB. Now it is
/// stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_for_many_joiners_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::start(&dir.path().join("ds"), "127.0.0.1:0");
    let (net, id) = p.user("mallory").await;
    let mallory = Raw::with(net, id).await;
    let mut kps = Vec::new();
    let mut joiners = Vec::new();
    for i in 0..60 {
        let (net, id) = p.user(&format!("u{i}")).await;
        joiners.push(Raw::with(net, id).await);
        kps.push(mallory.claim(&format!("u{i}")).await);
    }
    let (gid, mut g) = mallory.create().await;
    let (commit, welcome, _) = g
        .add_members_without_update(&mallory.provider, &mallory.id, &kps)
        .unwrap();
    let welcome = pad_group_info(&bytes(&welcome), 2 << 20);
    let db = dir.path().join("ds/huddle.redb");
    let size = || std::fs::metadata(&db).unwrap().len() >> 20;
    let (before, rss) = (size(), p.status("VmRSS"));
    mallory
        .commit(gid, bytes(&commit), Some(welcome))
        .await
        .unwrap();
    let grown = size().saturating_sub(before);
    assert!(grown < 24, "the store grew by {grown} MiB for one commit");
    let rss_grown = p.status("VmHWM").saturating_sub(rss) / 1024;
    assert!(rss_grown < 64, "the DS grew by {rss_grown} MiB");
    // Every joiner still gets its own, whole Welcome.
    for j in [&joiners[0], &joiners[59]] {
        let Response::Inbox { items, .. } = j
            .net
            .request(&Request::FetchInbox {
                after: 0,
                limit: 10,
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(items.len(), 1);
        assert!(items[0].welcome.len() > 2 << 20);
        let MlsMessageBodyIn::Welcome(w) =
            MlsMessageIn::tls_deserialize_exact(items[0].welcome.as_ref())
                .unwrap()
                .extract()
        else {
            panic!("not a Welcome")
        };
        assert_eq!(w.secrets().len(), 1, "a joiner gets its own secrets only");
    }
}

/// The Welcome `MLSMessage` bytes with its encrypted GroupInfo replaced by
/// `len` bytes of padding (still a well-formed Welcome: the DS cannot
/// decrypt that part, nor tell).
fn pad_group_info(welcome: &[u8], len: usize) -> Bytes {
    let varint = |b: &[u8]| -> (usize, usize) {
        match b[0] >> 6 {
            0 => (usize::from(b[0] & 0x3f), 1),
            1 => ((usize::from(b[0] & 0x3f) << 8) | usize::from(b[1]), 2),
            _ => (
                (usize::from(b[0] & 0x3f) << 24)
                    | (usize::from(b[1]) << 16)
                    | (usize::from(b[2]) << 8)
                    | usize::from(b[3]),
                4,
            ),
        }
    };
    let (secrets, n) = varint(&welcome[6..]);
    let mut out = welcome[..6 + n + secrets].to_vec();
    out.extend_from_slice(&((len as u32) | 0x8000_0000).to_be_bytes());
    out.resize(out.len() + len, 0xab);
    Bytes::from(out)
}

/// 535 uploads that then sent nothing took an earlier DS to 1,028 threads
/// (each held a blocking thread) until Authenticate timed out. Now a user
/// runs a bounded number of transfers, none holds a thread while it waits,
/// and a silent one ends after the stall timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_hold_no_thread_and_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::start_with(
        &dir.path().join("ds"),
        "127.0.0.1:0",
        &["transfer_stall_timeout=2s"],
    );
    let (_alice, _mallory, g) = alice_and_mallory(&p, dir.path(), "g").await;
    let gid: GroupId = g.parse().unwrap();
    let mut refused = 0;
    let mut held = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..4 {
        let c = connect_as(&p, dir.path(), "mallory").await;
        for _ in 0..50 {
            match begin_upload(&c, gid, 1 << 20).await {
                Ok(streams) => held.push(streams),
                Err(ClientError::Server(e)) if e.code == ErrorCode::QuotaExceeded => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        conns.push(c);
    }
    assert!(refused >= 200 - 16, "only {refused} of 200 uploads refused");
    let threads = p.status("Threads");
    assert!(threads < 64, "the DS runs {threads} threads");
    still_served(dir.path(), "alice", &g).await;
    // Silent uploads end: a new one is taken again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = connect_as(&p, dir.path(), "mallory").await;
    let r = begin_upload(&c, gid, 1 << 20).await;
    assert!(matches!(r, Ok((_, _, Response::Upload { .. }))), "{r:?}");
    drop((held, conns));
}

/// Sixteen uploads of large items took the DS to 311 MB for one user, and
/// the users of a whole DS could take it to tens of GB. Now a transfer
/// reserves the most it can hold before it starts, from its user's and
/// the DS's transfer memory: past either it waits, then is refused, while
/// other users and small items are still served, and an ended transfer
/// gives its memory back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_are_paid_for_from_a_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::start_with(
        &dir.path().join("ds"),
        "127.0.0.1:0",
        &[
            "transfer_memory_per_user=40MiB",
            "transfer_memory_total=60MiB",
            "transfer_memory_wait=300ms",
        ],
    );
    let (mut alice, _mallory, g) = alice_and_mallory(&p, dir.path(), "g").await;
    let gid: GroupId = g.parse().unwrap();
    // A stored item of 3 MiB: downloading it holds about 5 MiB.
    let src = dir.path().join("picture.bin");
    std::fs::write(&src, vec![7u8; 3 << 20]).unwrap();
    let sent = alice
        .send_file(&g, &src, "", &mut huddle_client::Quiet)
        .await
        .unwrap();
    let stored: MediaId = sent.media_id().unwrap().parse().unwrap();
    let download = Request::Download {
        media: stored,
        offset: 0,
        len: 0,
    };
    let refused = |r: Result<_, ClientError>| match r {
        Err(ClientError::Server(e)) if e.code == ErrorCode::QuotaExceeded => e.message,
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("admitted past the transfer memory"),
    };
    // A large item's upload holds about 17 MiB: two fit in 40 MiB.
    const LARGE: u64 = 64 << 20;
    let m = connect_as(&p, dir.path(), "mallory").await;
    let first = MediaId([1; 16]);
    let mut held = vec![
        begin_upload_of(&m, gid, first, LARGE).await.unwrap(),
        begin_upload(&m, gid, LARGE).await.unwrap(),
    ];
    let why = refused(begin_upload(&m, gid, LARGE).await);
    assert!(why.contains("this user"), "{why}");
    // A small item holds little, and still fits; what is left is too
    // little for the download.
    held.push(begin_upload(&m, gid, 1 << 20).await.unwrap());
    let why = refused(m.open(&download).await);
    assert!(why.contains("this user"), "{why}");
    // Another user is served from her own budget, up to the DS's.
    let a = connect_as(&p, dir.path(), "alice").await;
    let hers = begin_upload(&a, gid, LARGE).await.unwrap();
    let why = refused(begin_upload(&a, gid, LARGE).await);
    assert!(why.contains("the server"), "{why}");
    still_served(dir.path(), "alice", &g).await;
    // Its uploader resuming an upload takes the earlier stream over, and
    // its memory with it, however full the budget.
    held[0] = begin_upload_of(&m, gid, first, LARGE).await.unwrap();
    // An upload that ends gives its memory back.
    let (mut send, _recv, _) = held.remove(0);
    send.reset(0u32.into()).unwrap();
    let mut again = None;
    for _ in 0..20 {
        match begin_upload(&m, gid, LARGE).await {
            Ok(u) => {
                again = Some(u);
                break;
            }
            Err(e) => {
                refused(Err(e));
            }
        }
    }
    assert!(
        again.is_some(),
        "the ended upload's memory did not come back"
    );
    // With a second one ended, the download is served.
    let (mut send, _recv, _) = held.remove(0);
    send.reset(0u32.into()).unwrap();
    let mut served = false;
    for _ in 0..20 {
        match m.open(&download).await {
            Ok((_, _, resp)) => {
                assert!(matches!(resp, Response::Download { .. }), "{resp:?}");
                served = true;
                break;
            }
            Err(e) => {
                refused(Err(e));
            }
        }
    }
    assert!(served, "the download was not served once memory was free");
    drop((held, hers, again, m, a));
}

/// Begins an upload of a new item of `total_len` bytes to `group` on `c`.
async fn begin_upload(
    c: &Connection,
    group: GroupId,
    total_len: u64,
) -> huddle_client::Result<(quinn::SendStream, quinn::RecvStream, Response)> {
    let mut media = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut media);
    begin_upload_of(c, group, MediaId(media), total_len).await
}

/// Begins (or resumes) the upload of `media`, `total_len` bytes, to
/// `group` on `c`.
async fn begin_upload_of(
    c: &Connection,
    group: GroupId,
    media: MediaId,
    total_len: u64,
) -> huddle_client::Result<(quinn::SendStream, quinn::RecvStream, Response)> {
    c.open(&Request::BeginUpload(UploadRequest {
        group,
        media,
        total_len,
    }))
    .await
}

/// A connection that never authenticates is closed after the deadline,
/// and connections still authenticating are counted apart, so they cannot
/// take every slot; a user's own connections are bounded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_surplus_connections_are_refused_or_closed() {
    let s = InProcess::start_with(|c| {
        c.auth_timeout = Duration::from_millis(500);
        c.max_unauthenticated = 4;
        c.max_connections_per_user = 3;
    })
    .await;
    let oldest = s.connect().await;
    let mut more = Vec::new();
    for _ in 0..3 {
        more.push(s.connect().await);
    }
    // A fifth, while four wait to authenticate: the one that waited longest
    // makes room (one who holds many open delays others, it does not shut
    // them out), and the fifth can authenticate.
    let fifth = s.connect().await;
    let reason = closed(&oldest).await;
    assert!(reason.contains("this one waited longest"), "{reason}");
    fifth
        .authenticate(&Identity::generate("carol"), true)
        .await
        .unwrap();
    // The others are closed at the deadline.
    let reason = closed(&more[0]).await;
    assert!(reason.contains("authenticate within"), "{reason}");
    drop(more);
    // A user may hold three authenticated connections, not four.
    let (first, id) = s.user("alice").await;
    let mut held = vec![first];
    for _ in 0..2 {
        let c = s.connect().await;
        c.authenticate(&id, false).await.unwrap();
        held.push(c);
    }
    let c = s.connect().await;
    let e = c.authenticate(&id, false).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Server(b) if b.code == ErrorCode::QuotaExceeded),
        "{e}"
    );
    // Another user is served meanwhile, and one closed slot is free again.
    s.user("bob").await;
    held.pop().unwrap().close().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = s.connect().await;
    c.authenticate(&id, false).await.unwrap();
}

/// Waits for the DS to close `c`; its reason.
async fn closed(c: &Connection) -> String {
    for _ in 0..100 {
        if let Some(r) = c.quic().close_reason() {
            return r.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the DS kept the connection open");
}

/// 150 posts of 4 MB each stayed in a group's memory on an earlier DS.
/// Messages are now at most 256 KiB, and the entries kept in memory are
/// bounded in bytes per group and over all groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_groups_keep_in_memory_is_bounded_in_bytes() {
    let s = InProcess::start_with(|c| {
        c.tail_bytes = 1 << 20;
        c.tail_bytes_total = 2 << 20;
    })
    .await;
    let mut alice = s.client("alice").await;
    let mut groups = Vec::new();
    for n in 0..3 {
        groups.push(
            alice
                .create_group(&format!("g{n}"))
                .await
                .unwrap()
                .to_string(),
        );
    }
    let pad = "y".repeat(60_000);
    for i in 0..40 {
        for g in &groups {
            alice.send_text(g, &format!("{i} {pad}")).await.unwrap();
        }
    }
    let held = s.running.as_ref().unwrap().stats().tail_bytes;
    // The bound, plus the newest entry each group always keeps.
    assert!(
        held <= (2 << 20) + 3 * 70_000,
        "groups keep {held} bytes in memory"
    );
    // Too large a message is refused before it is stored.
    let (alice_raw, _bob, gid, mut ga, _gb) = raw_pair(&s).await;
    let big = ga
        .create_message(&alice_raw.provider, &alice_raw.id, &vec![7u8; 300_000])
        .unwrap();
    let r = alice_raw
        .net
        .request(&Request::Message {
            group: gid,
            message: bytes(&big),
        })
        .await;
    assert_eq!(code(r), ErrorCode::TooLarge);
}

/// Two raw members in a group of their own.
async fn raw_pair(s: &InProcess) -> (Raw, Raw, GroupId, MlsGroup, ()) {
    let a = Raw::new(s, "ra").await;
    let b = Raw::new(s, "rb").await;
    let (gid, mut g) = a.create().await;
    let kp = a.claim("rb").await;
    let (c, w, _) = g.add_members(&a.provider, &a.id, &[kp]).unwrap();
    a.commit(gid, bytes(&c), Some(bytes(&w))).await.unwrap();
    g.merge_pending_commit(&a.provider).unwrap();
    (a, b, gid, g, ())
}

/// One member could queue update proposals without end, and make its leaf
/// as large as a frame, which every joiner downloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_per_epoch_and_leaf_sizes_are_bounded() {
    let s = InProcess::start_with(|c| c.max_pending_proposals = 5).await;
    let (a, _b, gid, mut g, ()) = raw_pair(&s).await;
    let mut codes = Vec::new();
    for _ in 0..7 {
        let p = g
            .propose_self_update(&a.provider, &a.id, LeafNodeParameters::default())
            .unwrap();
        let r = a
            .net
            .request(&Request::Proposal {
                group: gid,
                proposal: bytes(&p.0),
            })
            .await;
        codes.push(r.map(|_| ()).map_err(|e| e.code()));
    }
    assert_eq!(codes[..5], [Ok(()); 5]);
    assert_eq!(codes[5], Err(Some(ErrorCode::QuotaExceeded)));
    g.clear_pending_proposals(a.provider.storage()).unwrap();
    // A commit whose new leaf carries 10 KiB of extension.
    let ext = ExtensionType::Unknown(0xff00);
    let params = LeafNodeParameters::builder()
        .with_capabilities(Capabilities::new(
            None,
            None,
            // The group requires the policy extension of every leaf.
            Some(&[
                ext,
                ExtensionType::Unknown(huddle_core::policy::POLICY_EXTENSION),
            ]),
            None,
            None,
        ))
        .with_extensions(
            Extensions::single(Extension::Unknown(
                0xff00,
                UnknownExtension(vec![1; 10 * 1024]),
            ))
            .unwrap(),
        )
        .build();
    let c = g.self_update(&a.provider, &a.id, params).unwrap();
    let r = a.commit(gid, bytes(c.commit()), None).await;
    assert_eq!(code(r), ErrorCode::TooLarge);
}

/// A push stream naming a quarter of a million groups queued an event per
/// id before writing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stream_watches_a_bounded_number_of_groups() {
    let s = InProcess::start_with(|c| c.max_subscribe_groups = 100).await;
    let (c, _) = s.user("alice").await;
    let groups = (0..101u32)
        .map(|i| {
            let mut g = [0u8; 16];
            g[..4].copy_from_slice(&i.to_be_bytes());
            (GroupId(g), 0)
        })
        .collect();
    let r = c
        .open(&Request::Subscribe {
            groups,
            inbox_after: 0,
        })
        .await;
    assert!(
        matches!(&r, Err(ClientError::Server(e)) if e.code == ErrorCode::TooLarge),
        "{r:?}"
    );
}

/// Groups nobody watches or uses are unloaded from memory, and loaded
/// again when asked for: a DS holds the groups in use, not every group it
/// stores (an earlier one loaded them all at start and kept them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_are_unloaded_and_loaded_again_when_used() {
    let s = InProcess::start_with(|c| c.group_idle = Duration::from_millis(300)).await;
    let loaded = || s.running.as_ref().unwrap().stats().groups_loaded;
    let wait_loaded = |n: usize| async move {
        for _ in 0..200 {
            if loaded() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} groups loaded, not {n}", loaded());
    };
    let mut alice = s.client("alice").await;
    let mut bob = s.client("bob").await;
    let g = alice.create_group("g").await.unwrap().to_string();
    alice.add(&g, &["bob".into()]).await.unwrap();
    bob.sync().await.unwrap();
    alice.send_text(&g, "one").await.unwrap();
    wait_loaded(0).await;
    // Used again: loaded, and nothing was lost.
    alice.send_text(&g, "two").await.unwrap();
    assert_eq!(loaded(), 1);
    let texts: Vec<String> = bob
        .sync()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "text")
        .map(|e| e.text().unwrap().to_owned())
        .collect();
    assert_eq!(texts, ["one", "two"]);
    // A watched group stays in memory however long it is quiet.
    let gid: GroupId = g.parse().unwrap();
    let (send, recv) = subscribe_raw(&mut bob, gid).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(loaded(), 1);
    drop((send, recv));
    wait_loaded(0).await;
}
