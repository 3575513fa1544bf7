//! Group messaging end to end, against a real server on 127.0.0.1:0.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use huddle_client::Client;
use huddle_core::proto::{ErrorCode, Request, Response};

async fn setup(n: usize) -> (TestServer, Vec<Client>, String) {
    let server = TestServer::start().await;
    let mut clients = Vec::new();
    for i in 0..n {
        clients.push(server.register(&format!("user{i}")).await);
    }
    let g = clients[0].create_group("team").await.unwrap().to_string();
    let others: Vec<String> = (1..n).map(|i| format!("user{i}")).collect();
    if !others.is_empty() {
        clients[0].add(&g, &others).await.unwrap();
    }
    for c in clients.iter_mut().skip(1) {
        let ev = c.sync().await.unwrap();
        assert_eq!(ev[0].kind, "joined");
    }
    (server, clients, g)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_users_see_every_message_once_in_the_same_order() {
    let (_s, mut c, g) = setup(5).await;
    // Everyone joined with the same view of the group.
    for x in &c {
        assert_eq!(x.members(&g).unwrap().len(), 5);
        assert_eq!(x.group_state(&g).unwrap().0, "team");
    }
    for round in 0..3 {
        for (i, x) in c.iter_mut().enumerate() {
            x.send_text(&g, &format!("m{round}-{i}")).await.unwrap();
        }
    }
    for x in c.iter_mut() {
        x.sync().await.unwrap();
    }
    let histories: Vec<Vec<String>> = c
        .iter()
        .map(|x| texts(&x.messages(&g, 1000).unwrap()))
        .collect();
    assert_eq!(histories[0].len(), 15);
    for h in &histories {
        assert_eq!(h, &histories[0], "every member sees the same order");
    }
    let unique: std::collections::HashSet<_> = histories[0].iter().collect();
    assert_eq!(unique.len(), 15, "no message is shown twice");
    // Syncing again brings nothing new.
    for x in c.iter_mut() {
        assert!(x.sync().await.unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_reads_nothing_afterwards() {
    let (_s, mut c, g) = setup(4).await;
    let (e0, _) = c[0].epoch_authenticator(&g).unwrap();
    let ev = c[0].remove(&g, &["user3".into()]).await.unwrap();
    assert_eq!(ev[0].kind, "member_removed");
    c[1].send_text(&g, "secret after removal").await.unwrap();
    // The removed member learns it was removed, and nothing else.
    let ev = c[3].sync().await.unwrap();
    assert!(ev
        .iter()
        .any(|e| e.kind == "member_removed" && e.members() == &["user3".to_string()][..]));
    assert!(texts(&ev).is_empty(), "{ev:?}");
    assert_eq!(c[3].group_state(&g).unwrap().1, "removed");
    // The DS refuses it the log after its removal...
    let gid = g.parse().unwrap();
    let (_, _, cursor) = c[3].group_state(&g).unwrap();
    let r = c[3]
        .net()
        .await
        .unwrap()
        .request(&Request::FetchLog {
            group: gid,
            after: cursor,
            limit: 100,
        })
        .await;
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::NotMember));
    // ... and posting to the group.
    assert!(c[3].send_text(&g, "let me in").await.is_err());
    // Even handed the ciphertext by someone, its old keys do not open it.
    let entries = match c[1]
        .net()
        .await
        .unwrap()
        .request(&Request::FetchLog {
            group: gid,
            after: cursor,
            limit: 100,
        })
        .await
        .unwrap()
    {
        Response::Log { entries, .. } => entries,
        other => panic!("{other:?}"),
    };
    assert!(!entries.is_empty());
    let leaked = c[3].process_entries(&gid, &entries).unwrap();
    assert!(texts(&leaked).is_empty());
    // The rest continue, in agreement on the new epoch.
    for x in c.iter_mut().take(3) {
        x.sync().await.unwrap();
    }
    let (e1, auth) = c[0].epoch_authenticator(&g).unwrap();
    assert_eq!(e1, e0 + 1);
    for x in c.iter().take(3) {
        assert_eq!(x.epoch_authenticator(&g).unwrap(), (e1, auth.clone()));
        assert_eq!(x.members(&g).unwrap().len(), 3);
    }
    assert_eq!(
        texts(&c[2].messages(&g, 10).unwrap()),
        vec!["user1: secret after removal"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_commits_resolve_to_one_history() {
    let (_s, mut c, g) = setup(5).await;
    let (e0, _) = c[0].epoch_authenticator(&g).unwrap();
    // Everyone rotates keys at the same moment.
    {
        let [a, b, cc, d, e] = &mut c[..] else {
            unreachable!()
        };
        let (r1, r2, r3, r4, r5) = tokio::join!(
            a.update(&g),
            b.update(&g),
            cc.update(&g),
            d.update(&g),
            e.update(&g)
        );
        for r in [r1, r2, r3, r4, r5] {
            r.unwrap();
        }
    }
    for x in c.iter_mut() {
        x.sync().await.unwrap();
    }
    // Each of the five changes landed in its own epoch.
    let (e1, auth) = c[0].epoch_authenticator(&g).unwrap();
    assert_eq!(e1, e0 + 5);
    for x in &c {
        assert_eq!(x.epoch_authenticator(&g).unwrap(), (e1, auth.clone()));
    }
    // And the group still works.
    c[4].send_text(&g, "still in sync").await.unwrap();
    for x in c.iter_mut().take(4) {
        assert_eq!(
            texts(&x.sync().await.unwrap()),
            vec!["user4: still in sync"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_member_catches_up_in_order() {
    let (s, mut c, g) = setup(3).await;
    let mut expected = Vec::new();
    for i in 0..500 {
        let who = i % 2;
        c[who].send_text(&g, &format!("n{i}")).await.unwrap();
        expected.push(format!("user{who}: n{i}"));
        if i == 200 {
            c[0].update(&g).await.unwrap();
        }
        if i == 350 {
            let mut dave = s.register("dave").await;
            c[0].add(&g, &["dave".into()]).await.unwrap();
            dave.sync().await.unwrap();
        }
    }
    let events = c[2].sync().await.unwrap();
    assert_eq!(texts(&events), expected);
    assert!(events.iter().any(|e| e.kind == "member_added"));
    let (e, auth) = c[0].epoch_authenticator(&g).unwrap();
    c[1].sync().await.unwrap();
    assert_eq!(c[2].epoch_authenticator(&g).unwrap(), (e, auth.clone()));
    assert_eq!(c[1].epoch_authenticator(&g).unwrap(), (e, auth));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_is_committed_by_a_remaining_member() {
    let (_s, mut c, g) = setup(3).await;
    c[2].leave(&g).await.unwrap();
    assert_eq!(c[2].group_state(&g).unwrap().1, "leaving");
    // user0 has the lowest leaf index: its sync commits the removal at once.
    let ev = c[0].sync().await.unwrap();
    assert!(ev.iter().any(|e| e.kind == "left"), "{ev:?}");
    let ev = c[1].sync().await.unwrap();
    assert!(
        ev.iter().any(|e| e.kind == "left" && e.from == "user2"),
        "{ev:?}"
    );
    c[2].sync().await.unwrap();
    assert_eq!(c[2].group_state(&g).unwrap().1, "left");
    assert_eq!(c[0].members(&g).unwrap(), vec!["user0", "user1"]);
    // The remaining two still talk.
    c[1].send_text(&g, "just us").await.unwrap();
    assert_eq!(texts(&c[0].sync().await.unwrap()), vec!["user1: just us"]);
}

/// `client.listen` as a future that ends when the returned sender fires,
/// and a receiver of every event it reports.
fn listening(
    client: &mut Client,
) -> (
    impl std::future::Future<Output = ()> + '_,
    tokio::sync::mpsc::UnboundedReceiver<huddle_client::Event>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = async move {
        client
            .listen(
                move |e| {
                    let _ = tx.send(e.clone());
                },
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
            .unwrap();
    };
    (listener, rx, stop_tx)
}

/// Waits (bounded) for `listen` to report that it is subscribed: from then
/// on it learns of new entries only from its push stream (it reads a log
/// only when a push tells it to: a gap, or an entry out of order).
async fn subscribed(rx: &mut tokio::sync::mpsc::UnboundedReceiver<huddle_client::Event>) {
    loop {
        let e = tokio::time::timeout(std::time::Duration::from_secs(20), rx.recv())
            .await
            .expect("listen subscribes within 20 s")
            .unwrap();
        if e.kind == "listening" {
            return;
        }
    }
}

/// The next text event's text (bounded wait).
async fn next_text(rx: &mut tokio::sync::mpsc::UnboundedReceiver<huddle_client::Event>) -> String {
    loop {
        let e = tokio::time::timeout(std::time::Duration::from_secs(20), rx.recv())
            .await
            .expect("a message within 20 s")
            .unwrap();
        if e.kind == "text" {
            return e.text().unwrap().to_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_shows_messages_as_they_arrive() {
    let (_s, mut c, g) = setup(2).await;
    let mut b = c.pop().unwrap();
    let mut a = c.pop().unwrap();
    let (listener, mut rx, stop_tx) = listening(&mut b);
    let talker = async {
        // Sent once the listener is subscribed, so they reach it by push:
        // it read the log once, before subscribing, and does not poll.
        subscribed(&mut rx).await;
        for i in 0..3 {
            a.send_text(&g, &format!("live {i}")).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(next_text(&mut rx).await);
        }
        stop_tx.send(()).unwrap();
        got
    };
    let ((), got) = tokio::join!(listener, talker);
    assert_eq!(got, vec!["live 0", "live 1", "live 2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_reconnects_after_the_server_restarts() {
    let (mut s, mut c, g) = setup(2).await;
    let mut b = c.pop().unwrap();
    let mut a = c.pop().unwrap();
    let (listener, mut rx, stop_tx) = listening(&mut b);
    let talker = async {
        subscribed(&mut rx).await;
        a.send_text(&g, "before").await.unwrap();
        let first = next_text(&mut rx).await;
        // The restart closes every connection, the listener's push stream
        // among them; it must come back by itself.
        s.restart().await;
        a.send_text(&g, "after").await.unwrap();
        let second = next_text(&mut rx).await;
        stop_tx.send(()).unwrap();
        (first, second)
    };
    let ((), got) = tokio::join!(listener, talker);
    assert_eq!(got, ("before".to_string(), "after".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_restarted_mid_sync_resumes_where_it_stopped() {
    let (s, mut c, g) = setup(2).await;
    for i in 0..30 {
        c[0].send_text(&g, &format!("t{i}")).await.unwrap();
    }
    let mut bob = c.pop().unwrap();
    let gid = g.parse().unwrap();
    let (_, _, cursor) = bob.group_state(&g).unwrap();
    let entries = match bob
        .net()
        .await
        .unwrap()
        .request(&Request::FetchLog {
            group: gid,
            after: cursor,
            limit: 1000,
        })
        .await
        .unwrap()
    {
        Response::Log { entries, .. } => entries,
        other => panic!("{other:?}"),
    };
    // Bob processes the first twelve and then "crashes" (no clean close)
    // before it reported them.
    let first = bob.process_entries(&gid, &entries[..12]).unwrap();
    assert_eq!(texts(&first).len(), 12);
    drop(bob);
    let mut bob = Client::open(s.home("user1")).unwrap();
    // The next sync processes the rest and reports all thirty, each once:
    // what was processed but never reported is reported now.
    let all = texts(&bob.sync().await.unwrap());
    let expected: Vec<String> = (0..30).map(|i| format!("user0: t{i}")).collect();
    assert_eq!(all, expected);
    assert!(bob.sync().await.unwrap().is_empty());
    // Feeding the same entries again changes nothing.
    assert!(bob.process_entries(&gid, &entries).unwrap().is_empty());
    assert_eq!(texts(&bob.messages(&g, 100).unwrap()), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_keeps_every_message_of_a_long_burst() {
    // Long enough to span several of the listener's timer ticks, so a frame
    // read interrupted by a tick would show up as a lost or garbled message.
    let (_s, mut c, g) = setup(2).await;
    let mut b = c.pop().unwrap();
    let mut a = c.pop().unwrap();
    // Large messages span many packets, so the listener is often in the
    // middle of a frame when its timer fires.
    let n = 60;
    let pad = "x".repeat(60_000);
    let (listener, mut rx, stop_tx) = listening(&mut b);
    let talker = async {
        subscribed(&mut rx).await;
        for i in 0..n {
            a.send_text(&g, &format!("burst {i} {pad}")).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < n {
            got.push(next_text(&mut rx).await);
        }
        stop_tx.send(()).unwrap();
        got
    };
    let ((), got) = tokio::join!(listener, talker);
    let expected: Vec<String> = (0..n).map(|i| format!("burst {i} {pad}")).collect();
    assert_eq!(got, expected);
}
