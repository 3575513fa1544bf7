//! Roles and the group's policy end to end against a real server on
//! 127.0.0.1:0, as a user meets them: who may add, remove, rename and
//! send, handing a group over, and a device of a user with a role.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use huddle_client::{Client, ClientError};
use huddle_core::policy::Role;

fn kinds(events: &[huddle_client::Event]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

fn policy_refusal<T: std::fmt::Debug>(r: Result<T, ClientError>, says: &str) {
    match r {
        Err(ClientError::Policy(m)) => assert!(m.contains(says), "{m}"),
        other => panic!("expected a refusal saying {says:?}, got {other:?}"),
    }
}

async fn three(server: &TestServer) -> (Client, Client, Client, String) {
    let mut alice = server.register("alice").await;
    let mut bob = server.register("bob").await;
    let mut carol = server.register("carol").await;
    let g = alice.create_group("team").await.unwrap().to_string();
    alice
        .add(&g, &["bob".to_owned(), "carol".to_owned()])
        .await
        .unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    (alice, bob, carol, g)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_creator_owns_the_group_and_members_are_held_to_their_roles() {
    let server = TestServer::start().await;
    let (mut alice, mut bob, mut carol, g) = three(&server).await;
    let _dave = server.register("dave").await;
    let roles: Vec<(String, Role)> = bob
        .member_roles(&g)
        .unwrap()
        .into_iter()
        .map(|(u, _, r)| (u, r))
        .collect();
    assert_eq!(
        roles,
        [
            ("alice".to_owned(), Role::Owner),
            ("bob".to_owned(), Role::Member),
            ("carol".to_owned(), Role::Member)
        ]
    );
    // Bob may neither remove the creator nor add, make himself admin or
    // rename; nothing reaches the group.
    policy_refusal(
        bob.remove(&g, &["alice".to_owned()]).await,
        "may not remove others",
    );
    policy_refusal(bob.add(&g, &["dave".to_owned()]).await, "may not add users");
    policy_refusal(
        bob.set_role(&g, "bob", Role::Admin).await,
        "may not make bob an admin",
    );
    policy_refusal(bob.rename(&g, "bob's").await, "may not rename the group");
    assert_eq!(alice.members(&g).unwrap(), ["alice", "bob", "carol"]);
    // Alice makes him admin: every member sees it, and now he may.
    let ev = alice.set_role(&g, "bob", Role::Admin).await.unwrap();
    assert_eq!(kinds(&ev), ["role_changed"]);
    let ev = carol.sync().await.unwrap();
    assert!(
        ev.iter()
            .any(|e| e.kind == "role_changed" && e.members() == ["bob"] && e.from == "alice"),
        "{ev:?}"
    );
    bob.sync().await.unwrap();
    bob.add(&g, &["dave".to_owned()]).await.unwrap();
    bob.rename(&g, "our team").await.unwrap();
    let ev = carol.sync().await.unwrap();
    assert!(ev.iter().any(|e| e.kind == "renamed"), "{ev:?}");
    assert_eq!(carol.group_state(&g).unwrap().0, "our team");
    // An admin removes a member but not the owner.
    policy_refusal(
        bob.remove(&g, &["alice".to_owned()]).await,
        "bob is an admin and may not remove alice, an owner",
    );
    bob.remove(&g, &["carol".to_owned()]).await.unwrap();
    alice.sync().await.unwrap();
    assert_eq!(alice.members(&g).unwrap(), ["alice", "bob", "dave"]);
    // Removing an admin drops his role with him: added again, he is a
    // member.
    alice.remove(&g, &["bob".to_owned()]).await.unwrap();
    assert!(alice.policy(&g).unwrap().unwrap().role("bob") == Role::Member);
    bob.sync().await.unwrap();
    alice.add(&g, &["bob".to_owned()]).await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(bob.policy(&g).unwrap().unwrap().role("bob"), Role::Member);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announcement_group_and_the_last_owner() {
    let server = TestServer::start().await;
    let (mut alice, mut bob, mut carol, g) = three(&server).await;
    alice
        .set_policy(&g, &[("announcement".to_owned(), "on".to_owned())])
        .await
        .unwrap();
    bob.sync().await.unwrap();
    policy_refusal(bob.send_text(&g, "may I?").await, "may not send messages");
    let file = server.dir.path().join("note.txt");
    std::fs::write(&file, b"a note").unwrap();
    policy_refusal(
        bob.send_file(&g, &file, "", &mut huddle_client::Quiet)
            .await,
        "may not upload media",
    );
    alice.send_text(&g, "news").await.unwrap();
    let ev = carol.sync().await.unwrap();
    assert!(ev.iter().any(|e| e.kind == "policy_changed"), "{ev:?}");
    assert!(texts(&ev).contains(&"alice: news".to_owned()), "{ev:?}");
    // Alice, the only owner, may not leave until she hands over.
    policy_refusal(alice.leave(&g).await, "last owner");
    alice.set_role(&g, "carol", Role::Owner).await.unwrap();
    assert!(!alice.leave(&g).await.unwrap());
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    alice.sync().await.unwrap();
    assert_eq!(carol.members(&g).unwrap(), ["bob", "carol"]);
    assert_eq!(
        carol
            .policy(&g)
            .unwrap()
            .unwrap()
            .owners()
            .collect::<Vec<_>>(),
        ["carol"]
    );
}
