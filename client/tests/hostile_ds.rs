//! A delivery service that misbehaves on purpose. The test plays the DS's
//! part by handing the client log entries it crafted (tampered, replayed,
//! reordered, dropped, forged) through the same entry point the client uses
//! for what the real DS sends, and checks that the client refuses them with
//! its state intact, and recovers from the real log afterwards.
#![allow(clippy::unwrap_used)]
mod common;

use bytes::Bytes;
use common::*;
use huddle_client::Client;
use huddle_core::proto::{EntryKind, LogEntry, Request, Response};
use huddle_core::GroupId;

async fn two(server: &TestServer) -> (Client, Client, String, GroupId) {
    let mut a = server.register("alice").await;
    let mut b = server.register("bob").await;
    let g = a.create_group("g").await.unwrap();
    a.add(&g.to_string(), &["bob".into()]).await.unwrap();
    b.sync().await.unwrap();
    (a, b, g.to_string(), g)
}

/// The real log of `g` after `after`, as the DS would serve it.
async fn log(c: &mut Client, g: GroupId, after: u64) -> Vec<LogEntry> {
    match c
        .net()
        .await
        .unwrap()
        .request(&Request::FetchLog {
            group: g,
            after,
            limit: 1000,
        })
        .await
        .unwrap()
    {
        Response::Log { entries, .. } => entries,
        other => panic!("{other:?}"),
    }
}

fn cursor(c: &Client, g: &str) -> u64 {
    c.group_state(g).unwrap().2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_ciphertext_is_refused_and_the_rest_still_opens() {
    let s = TestServer::start().await;
    let (mut a, mut b, g, gid) = two(&s).await;
    a.send_text(&g, "one").await.unwrap();
    a.send_text(&g, "two").await.unwrap();
    let at = cursor(&b, &g);
    let mut entries = log(&mut b, gid, at).await;
    let mut bad = entries[0].data.to_vec();
    let n = bad.len();
    bad[n - 20] ^= 0x01;
    entries[0].data = Bytes::from(bad);
    let events = b.process_entries(&gid, &entries).unwrap();
    assert_eq!(
        texts(&events),
        vec!["alice: two"],
        "the tampered message is refused"
    );
    assert_eq!(cursor(&b, &g), at + 2);
    // Later messages are still readable (sync reports what processing
    // above recorded, then what follows).
    a.send_text(&g, "three").await.unwrap();
    assert_eq!(
        texts(&b.sync().await.unwrap()),
        vec!["alice: two", "alice: three"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_message_is_not_shown_twice() {
    let s = TestServer::start().await;
    let (mut a, mut b, g, gid) = two(&s).await;
    a.send_text(&g, "once").await.unwrap();
    let at = cursor(&b, &g);
    let entries = log(&mut b, gid, at).await;
    assert_eq!(
        texts(&b.process_entries(&gid, &entries).unwrap()),
        vec!["alice: once"]
    );
    // The same ciphertext again, under the next sequence number.
    let mut replay = entries[0].clone();
    replay.seq = cursor(&b, &g) + 1;
    let events = b.process_entries(&gid, &[replay]).unwrap();
    assert!(
        texts(&events).is_empty(),
        "a replay must not show again: {events:?}"
    );
    assert_eq!(texts(&b.messages(&g, 10).unwrap()), vec!["alice: once"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_is_detected_and_filled_from_the_log() {
    let s = TestServer::start().await;
    let (mut a, mut b, g, gid) = two(&s).await;
    for t in ["m1", "m2", "m3"] {
        a.send_text(&g, t).await.unwrap();
    }
    let at = cursor(&b, &g);
    let entries = log(&mut b, gid, at).await;
    // The DS drops m2 and sends m3, then m1 after it.
    let events = b
        .process_entries(&gid, &[entries[0].clone(), entries[2].clone()])
        .unwrap();
    assert_eq!(texts(&events), vec!["alice: m1"]);
    assert_eq!(cursor(&b, &g), at + 1, "processing stops at the gap");
    assert!(b
        .process_entries(&gid, &[entries[0].clone()])
        .unwrap()
        .is_empty());
    // Re-fetching from the cursor fills the gap, in order (sync reports
    // m1 too: processed above, not reported yet).
    assert_eq!(
        texts(&b.sync().await.unwrap()),
        vec!["alice: m1", "alice: m2", "alice: m3"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_commit_is_refused_and_the_epoch_stays() {
    let s = TestServer::start().await;
    let (mut a, mut b, g, gid) = two(&s).await;
    let (epoch, auth) = b.epoch_authenticator(&g).unwrap();
    a.update(&g).await.unwrap();
    let at = cursor(&b, &g);
    let real = log(&mut b, gid, at).await;
    assert_eq!(real[0].kind, EntryKind::Commit);
    // One flipped byte in the commit's signature.
    let mut forged = real[0].clone();
    let mut bytes = forged.data.to_vec();
    let n = bytes.len();
    bytes[n - 100] ^= 0x40;
    forged.data = Bytes::from(bytes);
    let events = b.process_entries(&gid, &[forged]).unwrap();
    assert!(events.is_empty());
    assert_eq!(b.epoch_authenticator(&g).unwrap(), (epoch, auth));
    // A commit that claims to be from a member who does not exist: the
    // commit of another group entirely.
    let mut other = server_other_group_commit(&s).await;
    other.seq = cursor(&b, &g) + 1;
    let events = b.process_entries(&gid, &[other]).unwrap();
    assert!(events.is_empty());
    assert_eq!(b.epoch_authenticator(&g).unwrap().0, epoch);
}

/// A valid commit of some other group (a DS trying to pass it off).
async fn server_other_group_commit(s: &TestServer) -> LogEntry {
    let mut c = s.register("carol").await;
    let og = c.create_group("other").await.unwrap();
    c.update(&og.to_string()).await.unwrap();
    log(&mut c, og, 0).await.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_that_does_not_match_the_tree_is_refused() {
    let s = TestServer::start().await;
    let mut a = s.register("alice").await;
    let mut b = s.register("bob").await;
    let g1 = a.create_group("one").await.unwrap();
    let g2 = a.create_group("two").await.unwrap();
    a.add(&g1.to_string(), &["bob".into()]).await.unwrap();
    // The DS hands Bob his Welcome to group one with the tree of group two.
    let Response::Inbox { items, .. } = b
        .net()
        .await
        .unwrap()
        .request(&Request::FetchInbox {
            after: 0,
            limit: 10,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let wrong_tree = {
        let Response::GroupState { .. } = a
            .net()
            .await
            .unwrap()
            .request(&Request::GroupState { group: g2 })
            .await
            .unwrap()
        else {
            panic!()
        };
        // Alice's own view of group two's tree, as a DS could serve it.
        a.export_tree(&g2.to_string()).unwrap()
    };
    assert!(b
        .join_with_tree(&items[0], Some(wrong_tree))
        .unwrap()
        .is_none());
    assert!(b.groups().unwrap().is_empty(), "nothing was joined");
    // No tree at all is refused the same way.
    let mut again = items[0].clone();
    again.seq += 1;
    assert!(b.join_with_tree(&again, None).unwrap().is_none());
    assert!(b.groups().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diverged_and_lost_states_are_detected_and_a_lost_state_rejoins() {
    let s = TestServer::start().await;
    let (mut a, mut b, g, gid) = two(&s).await;
    assert!(a
        .sync()
        .await
        .unwrap()
        .iter()
        .all(|e| e.kind != "fork_detected"));
    // Bob's device publishes an epoch authenticator Alice does not share.
    // With two members neither is outvoted: Alice reports it and keeps her
    // state.
    let (epoch, _) = b.epoch_authenticator(&g).unwrap();
    b.net()
        .await
        .unwrap()
        .request(&Request::EpochAuthenticator {
            group: gid,
            epoch,
            hash: [9; 32],
        })
        .await
        .unwrap();
    let ev = a.sync().await.unwrap();
    let fork: Vec<_> = ev.iter().filter(|e| e.kind == "fork_detected").collect();
    assert_eq!(fork.len(), 1, "{ev:?}");
    assert_eq!(fork[0].members(), &["bob".to_string()][..]);
    assert!(ev.iter().all(|e| e.kind != "rejoined"), "{ev:?}");
    // Reported once per epoch, not on every sync.
    assert!(a
        .sync()
        .await
        .unwrap()
        .iter()
        .all(|e| e.kind != "fork_detected"));
    // Bob loses his database (his identity key file survives): his next
    // sync finds a group the DS counts him in and rejoins it on its own.
    b.close().await;
    let home = s.home("bob");
    for f in ["huddle.db", "huddle.db-wal", "huddle.db-shm"] {
        let _ = std::fs::remove_file(home.dir().join(f));
    }
    let mut b = Client::open(home).unwrap();
    let ev = b.sync().await.unwrap();
    let rejoined: Vec<_> = ev.iter().filter(|e| e.kind == "rejoined").collect();
    assert_eq!(rejoined.len(), 1, "{ev:?}");
    assert_eq!(rejoined[0].group, g);
    let epoch_after = rejoined[0].epoch().unwrap();
    assert_eq!(epoch_after, epoch + 1, "the rejoin is one commit");
    // Alice learns of it as a rejoin, not a removal, and both read what the
    // other sends next.
    let ev = a.sync().await.unwrap();
    assert!(
        ev.iter().any(|e| e.kind == "rejoined" && e.from == "bob"),
        "{ev:?}"
    );
    assert!(ev.iter().all(|e| e.kind != "member_removed"), "{ev:?}");
    assert_eq!(a.members(&g).unwrap(), vec!["alice", "bob"]);
    a.send_text(&g, "welcome back").await.unwrap();
    assert_eq!(texts(&b.sync().await.unwrap()), vec!["alice: welcome back"]);
    b.send_text(&g, "thanks").await.unwrap();
    assert_eq!(texts(&a.sync().await.unwrap()), vec!["bob: thanks"]);
    // Both now compute the same epoch authenticator: no fork reported.
    assert_eq!(
        a.epoch_authenticator(&g).unwrap(),
        b.epoch_authenticator(&g).unwrap()
    );
    assert!(b
        .sync()
        .await
        .unwrap()
        .iter()
        .all(|e| e.kind != "fork_detected" && e.kind != "rejoined"));
}

/// A device restored from an old backup has missed its own commit: it
/// cannot process it, ends up behind the group's epoch with the whole log
/// read, and rejoins on its own; the others keep their state and everyone
/// reads what is sent afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restored_from_an_old_backup_rejoins_on_its_own() {
    let s = TestServer::start().await;
    let mut a = s.register("alice").await;
    let mut b = s.register("bob").await;
    let c = s.register("carol").await;
    let gid = a.create_group("g").await.unwrap();
    let g = gid.to_string();
    a.add(&g, &["bob".into(), "carol".into()]).await.unwrap();
    b.sync().await.unwrap();
    c.close().await;
    let mut c = Client::open(s.home("carol")).unwrap();
    c.sync().await.unwrap();
    a.send_text(&g, "before the backup").await.unwrap();
    assert_eq!(
        texts(&c.sync().await.unwrap()),
        vec!["alice: before the backup"]
    );
    // Back up Carol's database while her client is closed.
    c.close().await;
    let home = s.home("carol");
    let backup = tempfile::tempdir().unwrap();
    let files = ["huddle.db", "huddle.db-wal", "huddle.db-shm"];
    for f in files {
        if home.dir().join(f).exists() {
            std::fs::copy(home.dir().join(f), backup.path().join(f)).unwrap();
        }
    }
    let mut c = Client::open(s.home("carol")).unwrap();
    c.update(&g).await.unwrap();
    c.send_text(&g, "after my update").await.unwrap();
    assert_eq!(
        texts(&a.sync().await.unwrap()),
        vec!["carol: after my update"]
    );
    b.sync().await.unwrap();
    // Restore the backup: Carol's state is one epoch behind and does not
    // know the commit in the log is her own.
    c.close().await;
    for f in files {
        let _ = std::fs::remove_file(home.dir().join(f));
        if backup.path().join(f).exists() {
            std::fs::copy(backup.path().join(f), home.dir().join(f)).unwrap();
        }
    }
    let mut c = Client::open(s.home("carol")).unwrap();
    a.send_text(&g, "while carol was restored").await.unwrap();
    let ev = c.sync().await.unwrap();
    let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
    assert!(kinds.contains(&"fork_detected"), "{ev:?}");
    assert!(kinds.contains(&"rejoined"), "{ev:?}");
    // What was sent in epochs her restored state never had stays unread.
    assert!(texts(&ev).is_empty(), "{ev:?}");
    // From here on, everyone reads everyone.
    let ev = a.sync().await.unwrap();
    assert!(
        ev.iter().any(|e| e.kind == "rejoined" && e.from == "carol"),
        "{ev:?}"
    );
    assert!(b
        .sync()
        .await
        .unwrap()
        .iter()
        .any(|e| e.kind == "rejoined" && e.from == "carol"));
    a.send_text(&g, "welcome back").await.unwrap();
    assert_eq!(texts(&c.sync().await.unwrap()), vec!["alice: welcome back"]);
    c.send_text(&g, "glad to be back").await.unwrap();
    assert_eq!(
        texts(&a.sync().await.unwrap()),
        vec!["carol: glad to be back"]
    );
    assert_eq!(
        texts(&b.sync().await.unwrap()),
        vec!["alice: welcome back", "carol: glad to be back"]
    );
    let (ea, aa) = a.epoch_authenticator(&g).unwrap();
    assert_eq!(c.epoch_authenticator(&g).unwrap(), (ea, aa.clone()));
    assert_eq!(b.epoch_authenticator(&g).unwrap(), (ea, aa));
    assert_eq!(c.members(&g).unwrap(), vec!["alice", "bob", "carol"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_cannot_open_what_was_sent_before_it_joined() {
    let s = TestServer::start().await;
    let (mut a, mut b, g, gid) = two(&s).await;
    a.send_text(&g, "before carol").await.unwrap();
    let at = cursor(&b, &g);
    let before = log(&mut b, gid, at).await;
    assert_eq!(before.len(), 1);
    // Adding commits carry no update path; the new epoch must still be
    // out of the joiner's reach backwards.
    let mut c = s.register("carol").await;
    a.add(&g, &["carol".into()]).await.unwrap();
    let joined = c.sync().await.unwrap();
    assert!(joined.iter().any(|e| e.kind == "joined"), "{joined:?}");
    assert!(texts(&joined).is_empty(), "{joined:?}");
    // What is sent after the add reaches the joiner.
    b.send_text(&g, "after carol").await.unwrap();
    assert_eq!(texts(&c.sync().await.unwrap()), vec!["bob: after carol"]);
    // A DS hands the joiner the earlier ciphertext as if it were new.
    let mut replay = before[0].clone();
    replay.seq = cursor(&c, &g) + 1;
    let events = c.process_entries(&gid, &[replay]).unwrap();
    assert!(
        texts(&events).is_empty(),
        "an earlier epoch's message must not open: {events:?}"
    );
    assert_eq!(
        texts(&c.messages(&g, 10).unwrap()),
        vec!["bob: after carol"]
    );
}

/// Members publishing a false epoch authenticator, more of them than share
/// the honest value, cannot push an honest member into rejoining (each
/// rejoin moves the whole group to a new epoch): what members publish only
/// makes it look, and the GroupInfo the DS checked agrees with its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_publishing_false_authenticators_cannot_force_a_rejoin() {
    let s = TestServer::start().await;
    let mut a = s.register("alice").await;
    let g = a.create_group("g").await.unwrap().to_string();
    let gid: huddle_core::GroupId = g.parse().unwrap();
    let names: Vec<String> = (0..3).map(|i| format!("liar{i}")).collect();
    let mut liars = Vec::new();
    for n in &names {
        liars.push(s.register(n).await);
    }
    a.add(&g, &names).await.unwrap();
    for l in &mut liars {
        l.sync().await.unwrap();
    }
    // A GroupInfo of the current epoch is on the DS (Alice published one).
    a.sync().await.unwrap();
    let (epoch, _) = a.epoch_authenticator(&g).unwrap();
    for l in &mut liars {
        l.net()
            .await
            .unwrap()
            .request(&Request::EpochAuthenticator {
                group: gid,
                epoch,
                hash: [7; 32],
            })
            .await
            .unwrap();
    }
    let ev = a.sync().await.unwrap();
    assert!(ev.iter().any(|e| e.kind == "fork_detected"), "{ev:?}");
    assert!(ev.iter().all(|e| e.kind != "rejoined"), "{ev:?}");
    assert_eq!(a.epoch_authenticator(&g).unwrap().0, epoch, "no new epoch");
    // The liars' own messages still reach her: nobody's state moved.
    liars[0].send_text(&g, "hi").await.unwrap();
    assert_eq!(texts(&a.sync().await.unwrap()), vec!["liar0: hi"]);
}
