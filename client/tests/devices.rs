//! Several devices per user, end to end against a real server on
//! 127.0.0.1:0: linking, groups with every device, revocation.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use huddle_client::Client;
use huddle_core::proto::{ErrorCode, Request, Response};

/// Links a new device of `user` (home `home`), approved by `approver`.
async fn link(server: &TestServer, user: &str, home: &str, approver: &mut Client) -> Client {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    let cert = server.cert();
    let linking = Client::link(server.home(home), user, &server.addr, Some(&cert), |c| {
        tx.take().unwrap().send(c.clone()).unwrap();
    });
    let approving = async {
        let code = rx.await.unwrap();
        let (key, fingerprint) = approver.pending_device(&code.code).await.unwrap();
        assert_eq!(
            fingerprint, code.fingerprint,
            "both devices show the same key"
        );
        approver.approve_device(&code.code, key).await.unwrap();
    };
    let (linked, ()) = tokio::join!(linking, approving);
    linked.unwrap().0
}

fn kinds(events: &[huddle_client::Event]) -> Vec<String> {
    events.iter().map(|e| e.kind.as_str().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_of_a_user_in_a_ten_user_group_all_see_everything() {
    let server = TestServer::start().await;
    let mut alice = server.register("alice").await;
    let mut alice2 = link(&server, "alice", "alice2", &mut alice).await;
    let mut alice3 = link(&server, "alice", "alice3", &mut alice2).await;
    assert_eq!(
        (alice2.principal(), alice3.principal()),
        ("alice/2", "alice/3")
    );
    let listed = alice3.device_list().await.unwrap();
    assert_eq!(
        listed.iter().map(|d| d.device).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(listed[2].this_device && listed.iter().all(|d| d.last_seen.is_some()));

    let mut others = Vec::new();
    for i in 0..9 {
        others.push(server.register(&format!("user{i}")).await);
    }
    // Alice creates the group on device 1: her other devices are in it from
    // the start, and adding users adds each of their devices.
    let g = alice.create_group("team").await.unwrap().to_string();
    let names: Vec<String> = (0..9).map(|i| format!("user{i}")).collect();
    alice.add(&g, &names).await.unwrap();
    for c in [&mut alice2, &mut alice3] {
        let ev = c.sync().await.unwrap();
        assert!(kinds(&ev).contains(&"joined".to_owned()), "{ev:?}");
    }
    for c in others.iter_mut() {
        c.sync().await.unwrap();
    }
    assert_eq!(alice.members(&g).unwrap().len(), 10, "ten users");
    assert_eq!(
        alice.member_devices(&g).unwrap()[0],
        ("alice".to_owned(), 3),
        "alice with three devices"
    );

    // A message from device 2 shows on devices 1 and 3 and on every other
    // member; one from a member shows on all three of alice's devices.
    alice2.send_text(&g, "from my laptop").await.unwrap();
    others[4].send_text(&g, "hello alice").await.unwrap();
    for c in [&mut alice, &mut alice3] {
        c.sync().await.unwrap();
        let t = texts(&c.messages(&g, 100).unwrap());
        assert_eq!(t, ["alice/2: from my laptop", "user4: hello alice"]);
    }
    alice2.sync().await.unwrap();
    assert_eq!(texts(&alice2.messages(&g, 100).unwrap()).len(), 2);
    for c in others.iter_mut() {
        c.sync().await.unwrap();
        let t = texts(&c.messages(&g, 100).unwrap());
        assert_eq!(t, ["alice/2: from my laptop", "user4: hello alice"]);
    }

    // Removing a user removes all its devices in one commit (an owner
    // removes the creator, who made it owner).
    alice
        .set_role(&g, "user0", huddle_core::policy::Role::Owner)
        .await
        .unwrap();
    others[0].sync().await.unwrap();
    others[0].remove(&g, &["alice".to_owned()]).await.unwrap();
    for c in [&mut alice, &mut alice2, &mut alice3] {
        c.sync().await.unwrap();
        let g_state = c.groups().unwrap();
        assert_eq!(g_state[0].state, "removed", "{}", c.principal());
    }
    assert_eq!(others[0].members(&g).unwrap().len(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_joins_every_group_of_its_user_by_itself() {
    let server = TestServer::start().await;
    let mut bob = server.register("bob").await;
    let mut carol = server.register("carol").await;
    let mut groups = Vec::new();
    for i in 0..3 {
        let g = carol
            .create_group(&format!("g{i}"))
            .await
            .unwrap()
            .to_string();
        carol.add(&g, &["bob".to_owned()]).await.unwrap();
        groups.push(g);
    }
    bob.sync().await.unwrap();
    // Nobody but the new device acts after the approval.
    let mut bob2 = link(&server, "bob", "bob2", &mut bob).await;
    let listing = bob2.groups().unwrap();
    assert_eq!(listing.len(), 3, "{listing:?}");
    assert!(listing.iter().all(|g| g.state == "active"));
    // Carol sees a device of bob join, and bob's new device reads what
    // follows.
    let ev = carol.sync().await.unwrap();
    let added: Vec<_> = ev.iter().filter(|e| e.kind == "device_added").collect();
    assert_eq!(added.len(), 3, "{ev:?}");
    assert_eq!(added[0].members(), ["bob/2"]);
    carol
        .send_text(&groups[1], "welcome, new phone")
        .await
        .unwrap();
    bob2.sync().await.unwrap();
    assert_eq!(
        texts(&bob2.messages(&groups[1], 10).unwrap()),
        ["carol: welcome, new phone"]
    );
    // Bob's first device tells the new one the groups' names.
    bob.sync().await.unwrap();
    assert_eq!(
        bob.member_devices(&groups[0]).unwrap()[0],
        ("bob".into(), 2)
    );
    bob2.sync().await.unwrap();
    let mut names: Vec<String> = bob2.groups().unwrap().into_iter().map(|g| g.name).collect();
    names.sort();
    assert_eq!(names, ["g0", "g1", "g2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_reads_nothing_afterwards_in_any_group() {
    let server = TestServer::start().await;
    let mut dave = server.register("dave").await;
    let mut erin = server.register("erin").await;
    let mut dave2 = link(&server, "dave", "dave2", &mut dave).await;
    let g1 = erin.create_group("one").await.unwrap().to_string();
    erin.add(&g1, &["dave".to_owned()]).await.unwrap();
    let g2 = dave.create_group("two").await.unwrap().to_string();
    dave.add(&g2, &["erin".to_owned()]).await.unwrap();
    dave.sync().await.unwrap();
    dave2.sync().await.unwrap();
    erin.sync().await.unwrap();
    assert_eq!(dave2.groups().unwrap().len(), 2);

    // The phone is lost: dave revokes it from his first device.
    let ev = dave.remove_device(2).await.unwrap();
    assert_eq!(
        ev.iter().filter(|e| e.kind == "device_removed").count(),
        2,
        "{ev:?}"
    );
    erin.send_text(&g1, "after the revocation").await.unwrap();
    dave.send_text(&g2, "also after").await.unwrap();
    // The revoked device is not let in any more...
    match dave2.sync().await {
        Err(huddle_client::ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::AuthFailed, "{e:?}")
        }
        other => panic!("a revoked device must be refused: {other:?}"),
    }
    // Not on a new connection either.
    let mut again = Client::open(server.home("dave2")).unwrap();
    match again.sync().await {
        Err(huddle_client::ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::AuthFailed, "{e:?}");
            assert!(e.message.contains("revoked"), "{e:?}");
        }
        other => panic!("a revoked device must be refused: {other:?}"),
    }
    // ...and what it kept cannot open what followed: its leaf is gone from
    // both groups.
    let ev = erin.sync().await.unwrap();
    assert!(ev.iter().any(|e| e.kind == "device_removed"), "{ev:?}");
    for g in [&g1, &g2] {
        assert_eq!(erin.member_devices(g).unwrap()[0], ("dave".into(), 1));
    }
    assert!(texts(&dave2.messages(&g1, 10).unwrap()).is_empty());
    assert_eq!(dave.device_list().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_added_only_with_a_signature_of_a_current_device() {
    let server = TestServer::start().await;
    let mut frank = server.register("frank").await;
    let mut mallory = server.register("mallory").await;
    // Mallory asks to be frank's device and tries to approve herself: the
    // DS refuses an entry for frank's log from mallory's connection...
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    let cert = server.cert();
    let linking = Client::link(
        server.home("fake"),
        "frank",
        &server.addr,
        Some(&cert),
        |c| {
            tx.take().unwrap().send(c.clone()).unwrap();
        },
    );
    let attempts = async {
        let code = rx.await.unwrap();
        match mallory.pending_device(&code.code).await {
            Err(huddle_client::ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::NotFound),
            other => panic!("another user's link is not shown: {other:?}"),
        }
        code
    };
    // The link waits for an approval that never comes: stop it once the
    // attempts are made.
    let code = tokio::select! {
        r = linking => panic!("the link cannot finish: {:?}", r.map(|_| ())),
        code = attempts => code,
    };
    // ...and an entry signed by a key that is not one of frank's devices.
    let forged = {
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let root: [u8; 32] = match frank
            .net()
            .await
            .unwrap()
            .request(&Request::Devices {
                user: "frank".into(),
            })
            .await
            .unwrap()
        {
            Response::Devices { root_key, .. } => root_key,
            other => panic!("{other:?}"),
        };
        huddle_core::devices::DeviceSet::new("frank", root).next_entry(
            1,
            &key,
            huddle_core::devices::DeviceChange::Add {
                device: 2,
                key: key.verifying_key().to_bytes(),
            },
            0,
        )
    };
    match frank
        .net()
        .await
        .unwrap()
        .request(&Request::AppendDevice {
            entry: forged.into(),
            code: Some(code.code.clone()),
        })
        .await
    {
        Err(huddle_client::ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::InvalidMessage);
            assert!(e.message.contains("bad signature"), "{e:?}");
        }
        other => panic!("a forged entry is refused: {other:?}"),
    }
    assert_eq!(frank.device_list().await.unwrap().len(), 1);
    // When frank's devices were last online is told to frank's devices only.
    let ask = Request::Devices {
        user: "frank".into(),
    };
    let seen = |r: Response| match r {
        Response::Devices { last_seen, .. } => last_seen.len(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        seen(frank.net().await.unwrap().request(&ask).await.unwrap()),
        1
    );
    assert_eq!(
        seen(mallory.net().await.unwrap().request(&ask).await.unwrap()),
        0
    );
}

/// A device linked while one of its user's groups is in the middle of a
/// membership change (a member's leave proposed, its commit not made yet)
/// still joins, and the group converges: the leave is committed after,
/// and every remaining device reads what follows at the same epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_linked_while_a_group_is_mid_commit_converges() {
    let server = TestServer::start().await;
    let mut bob = server.register("bob").await;
    let mut carol = server.register("carol").await;
    let mut dave = server.register("dave").await;
    let g = carol.create_group("busy").await.unwrap().to_string();
    carol
        .add(&g, &["bob".to_owned(), "dave".to_owned()])
        .await
        .unwrap();
    bob.sync().await.unwrap();
    dave.sync().await.unwrap();
    // Dave asks to leave; nobody has committed it yet.
    dave.leave(&g).await.unwrap();
    let mut bob2 = link(&server, "bob", "bob2", &mut bob).await;
    assert_eq!(
        bob2.groups().unwrap().len(),
        1,
        "joined despite the pending change"
    );
    // Everyone carries on; within a few rounds the leave is committed (by
    // the designated committer at once, by anyone after the grace).
    let deadline = std::time::Instant::now() + 4 * huddle_client::client::PROPOSAL_GRACE;
    loop {
        for c in [&mut carol, &mut dave, &mut bob, &mut bob2] {
            c.sync().await.unwrap();
        }
        let settled = dave.groups().unwrap()[0].state == "left"
            && carol.member_devices(&g).unwrap().len() == 2;
        if settled || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for c in [&mut carol, &mut bob, &mut bob2] {
        c.sync().await.unwrap();
    }
    let epochs: Vec<u64> = [&carol, &bob, &bob2]
        .iter()
        .map(|c| c.epoch_authenticator(&g).unwrap().0)
        .collect();
    assert!(epochs.iter().all(|e| *e == epochs[0]), "{epochs:?}");
    let auths: Vec<Vec<u8>> = [&carol, &bob, &bob2]
        .iter()
        .map(|c| c.epoch_authenticator(&g).unwrap().1)
        .collect();
    assert!(
        auths.iter().all(|a| *a == auths[0]),
        "one state of the group"
    );
    assert_eq!(
        carol.member_devices(&g).unwrap(),
        [("bob".to_owned(), 2), ("carol".to_owned(), 1)]
    );
    assert_eq!(dave.groups().unwrap()[0].state, "left");
    carol.send_text(&g, "all settled").await.unwrap();
    bob2.sync().await.unwrap();
    assert_eq!(
        texts(&bob2.messages(&g, 10).unwrap()),
        ["carol: all settled"]
    );
}

/// Leaving is a user's act: leaving on one device takes all the user's
/// devices out of the group, and each of them sees it as leaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_on_one_device_takes_all_the_users_devices_out() {
    let server = TestServer::start().await;
    let mut gina = server.register("gina").await;
    let mut hal = server.register("hal").await;
    let mut gina2 = link(&server, "gina", "gina2", &mut gina).await;
    let g = hal.create_group("club").await.unwrap().to_string();
    hal.add(&g, &["gina".to_owned()]).await.unwrap();
    gina.sync().await.unwrap();
    gina2.sync().await.unwrap();
    assert!(
        !gina2.leave(&g).await.unwrap(),
        "a leave waits for its commit"
    );
    let ev = hal.sync().await.unwrap();
    let left: Vec<_> = ev.iter().filter(|e| e.kind == "left").collect();
    assert_eq!(left.len(), 1, "{ev:?}");
    assert_eq!(left[0].members(), ["gina"]);
    assert_eq!(hal.member_devices(&g).unwrap(), [("hal".to_owned(), 1)]);
    for c in [&mut gina, &mut gina2] {
        c.sync().await.unwrap();
        assert_eq!(c.groups().unwrap()[0].state, "left", "{}", c.principal());
    }
}
