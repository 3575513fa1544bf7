mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat() {
    let server = TestServer::start().await;
    let mut alice = server.register("alice").await;
    let mut bob = server.register("bob").await;
    let st = alice.status().await.unwrap();
    assert!(st.key_packages >= 20);
    let g = alice.create_group("friends").await.unwrap();
    let ev = alice.add(&g.to_string(), &["bob".into()]).await.unwrap();
    assert_eq!(ev[0].kind, "member_added");
    alice.send_text("friends", "hello bob").await.unwrap();
    let got = bob.sync().await.unwrap();
    println!("{got:#?}");
    assert_eq!(got[0].kind, "joined");
    assert_eq!(texts(&got), vec!["alice: hello bob"]);
    bob.send_text("friends", "hi alice").await.unwrap();
    let got = alice.sync().await.unwrap();
    assert_eq!(texts(&got), vec!["bob: hi alice"]);
    assert_eq!(
        alice.epoch_authenticator("friends").unwrap(),
        bob.epoch_authenticator("friends").unwrap()
    );
}
