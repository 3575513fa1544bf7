//! Registration and connection authentication.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use huddle_client::identity::Identity;
use huddle_core::auth::Purpose;
use huddle_core::proto::{ErrorCode, Request, Response, EXPORTER_LABEL};

async fn challenge(c: &huddle_client::net::Connection) -> ([u8; 32], [u8; 32]) {
    let Response::Challenge { nonce } = c.request(&Request::Challenge).await.unwrap() else {
        panic!()
    };
    let mut exporter = [0u8; 32];
    c.quic()
        .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .unwrap();
    (nonce, exporter)
}

#[tokio::test]
async fn requests_before_authentication_are_refused() {
    let s = InProcess::start().await;
    let c = s.connect().await;
    assert_eq!(
        code(c.request(&Request::KeyPackageCount).await),
        ErrorCode::NotAuthenticated
    );
    assert_eq!(
        code(c.request(&Request::ListGroups).await),
        ErrorCode::NotAuthenticated
    );
    // Authenticating without asking for a challenge first is out of order.
    let id = Identity::generate("alice");
    let req = Request::Register {
        name: "alice".into(),
        identity_key: id.public(),
        proof: vec![0; 64].into(),
    };
    assert_eq!(code(c.request(&req).await), ErrorCode::OutOfOrder);
}

#[tokio::test]
async fn names_are_unique() {
    let s = InProcess::start().await;
    s.user("alice").await;
    let c = s.connect().await;
    let other = Identity::generate("alice");
    let err = c.authenticate(&other, true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NameTaken));
    // Registering again with the same key is fine (a retried registration).
    let (c2, id) = s.user("bob").await;
    drop(c2);
    s.connect().await.authenticate(&id, true).await.unwrap();
}

#[tokio::test]
async fn wrong_key_and_unknown_user_are_refused() {
    let s = InProcess::start().await;
    let (_c, _alice) = s.user("alice").await;
    // Someone else's key under alice's name.
    let mallory = Identity::generate("alice");
    let c = s.connect().await;
    let err = c.authenticate(&mallory, false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AuthFailed));
    // A name nobody registered.
    let ghost = Identity::generate("ghost");
    let err = c.authenticate(&ghost, false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownUser));
    // The refused connection is still unauthenticated.
    assert_eq!(
        code(c.request(&Request::KeyPackageCount).await),
        ErrorCode::NotAuthenticated
    );
}

#[tokio::test]
async fn a_proof_is_bound_to_its_connection_and_nonce() {
    let s = InProcess::start().await;
    let (_c, alice) = s.user("alice").await;

    // A valid proof made on connection A ...
    let a = s.connect().await;
    let (nonce_a, exp_a) = challenge(&a).await;
    let proof = alice.proof(Purpose::Authenticate, &nonce_a, &exp_a);
    let req = Request::Authenticate {
        name: "alice".into(),
        proof: proof.clone().into(),
    };
    // ... replayed on connection B (after B asked for its own challenge) is refused.
    let b = s.connect().await;
    challenge(&b).await;
    assert_eq!(code(b.request(&req).await), ErrorCode::AuthFailed);
    assert_eq!(
        code(b.request(&Request::KeyPackageCount).await),
        ErrorCode::NotAuthenticated
    );
    // On A it works, once: the nonce is consumed.
    a.request(&req).await.unwrap();
    assert_eq!(code(a.request(&req).await), ErrorCode::OutOfOrder);
    // A proof for registration is not a proof for authentication.
    let c = s.connect().await;
    let (nonce_c, exp_c) = challenge(&c).await;
    let reg = alice.proof(Purpose::Register, &nonce_c, &exp_c);
    let req = Request::Authenticate {
        name: "alice".into(),
        proof: reg.into(),
    };
    assert_eq!(code(c.request(&req).await), ErrorCode::AuthFailed);
}

#[tokio::test]
async fn a_server_with_another_certificate_is_refused() {
    let s1 = InProcess::start().await;
    let s2 = InProcess::start().await;
    // Pin s2's certificate, talk to s1.
    let err = huddle_client::net::Connection::connect(&s1.addr, s2.trust())
        .await
        .unwrap_err();
    assert!(
        matches!(err, huddle_client::ClientError::CertificateMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("pinned"), "{err}");
}
