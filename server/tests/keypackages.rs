//! The key-package directory: validation on upload, one-time hand-out, last
//! resort, counts, rate limits.
#![allow(clippy::unwrap_used)]
mod common;

use std::collections::HashSet;

use bytes::Bytes;
use common::*;
use huddle_client::identity::Identity;
use huddle_core::mls;
use huddle_core::proto::{ErrorCode, Request, Response};
use openmls::prelude::{tls_codec::Serialize as _, *};
use openmls_rust_crypto::OpenMlsRustCrypto;

/// A key package for `identity`, whose credential names `name`, valid as
/// long as a client makes them.
fn kp(identity: &Identity, name: &str, last_resort: bool) -> Bytes {
    kp_valid_for(identity, name, last_resort, mls::KEY_PACKAGE_LIFETIME_SECS)
}

/// The same, valid for `secs`.
fn kp_valid_for(identity: &Identity, name: &str, last_resort: bool, secs: u64) -> Bytes {
    kp_with(identity, name, last_resort, secs, mls::capabilities())
}

/// The same, with the leaf capabilities `caps`.
fn kp_with(
    identity: &Identity,
    name: &str,
    last_resort: bool,
    secs: u64,
    caps: Capabilities,
) -> Bytes {
    let provider = OpenMlsRustCrypto::default();
    let mut b = KeyPackage::builder()
        .key_package_lifetime(Lifetime::new(secs))
        .leaf_node_capabilities(caps);
    if last_resort {
        b = b.mark_as_last_resort();
    }
    let cred = CredentialWithKey {
        credential: mls::credential_for(name),
        signature_key: identity.public().to_vec().into(),
    };
    let bundle = b
        .build(mls::CIPHERSUITE, &provider, identity, cred)
        .unwrap();
    bundle
        .key_package()
        .tls_serialize_detached()
        .unwrap()
        .into()
}

fn publish(kps: Vec<Bytes>, last_resort: Option<Bytes>) -> Request {
    Request::PublishKeyPackages {
        key_packages: kps,
        last_resort,
    }
}

#[tokio::test]
async fn uploads_are_validated() {
    let s = InProcess::start().await;
    let (c, alice) = s.user("alice").await;
    let (_b, bob) = s.user("bob").await;
    // Garbage.
    let r = c
        .request(&publish(vec![Bytes::from_static(b"nonsense")], None))
        .await;
    refused(r, ErrorCode::InvalidKeyPackage, "does not parse");
    // Credential naming someone else.
    let r = c
        .request(&publish(vec![kp(&alice, "bob", false)], None))
        .await;
    refused(r, ErrorCode::InvalidKeyPackage, "credential names");
    // Signed with another user's key (bob's key, alice's name).
    let r = c
        .request(&publish(vec![kp(&bob, "alice", false)], None))
        .await;
    refused(
        r,
        ErrorCode::InvalidKeyPackage,
        "not the registered identity key",
    );
    // A last-resort package among the one-time ones, and the reverse.
    let r = c
        .request(&publish(vec![kp(&alice, "alice", true)], None))
        .await;
    refused(r, ErrorCode::InvalidKeyPackage, "send it as last_resort");
    let r = c
        .request(&publish(vec![], Some(kp(&alice, "alice", false))))
        .await;
    refused(
        r,
        ErrorCode::InvalidKeyPackage,
        "lacks the last_resort extension",
    );
    // A signature broken by one flipped byte.
    let mut bytes = kp(&alice, "alice", false).to_vec();
    let n = bytes.len();
    bytes[n - 5] ^= 1;
    let r = c.request(&publish(vec![bytes.into()], None)).await;
    refused(r, ErrorCode::InvalidKeyPackage, "does not verify");
    // Valid for longer than PROTOCOL.md 13.5 allows.
    let r = c
        .request(&publish(
            vec![kp_valid_for(&alice, "alice", false, 100 * 24 * 3600)],
            None,
        ))
        .await;
    refused(r, ErrorCode::InvalidKeyPackage, "lifetime");
    // A leaf whose capabilities do not list the last_resort extension
    // (PROTOCOL.md 13.2), as a one-time package, where openmls itself would
    // not mind.
    let no_last_resort = Capabilities::new(None, Some(&[mls::CIPHERSUITE]), None, None, None);
    let r = c
        .request(&publish(
            vec![kp_with(
                &alice,
                "alice",
                false,
                mls::KEY_PACKAGE_LIFETIME_SECS,
                no_last_resort,
            )],
            None,
        ))
        .await;
    refused(
        r,
        ErrorCode::InvalidKeyPackage,
        "capabilities do not list extension last_resort",
    );
    // Nothing was stored by the refused uploads.
    assert_eq!(kp_count(&c).await, (0, false));
    // A good upload.
    let good = publish(
        vec![kp(&alice, "alice", false), kp(&alice, "alice", false)],
        Some(kp(&alice, "alice", true)),
    );
    assert!(matches!(
        c.request(&good).await.unwrap(),
        Response::KeyPackageCount {
            available: 2,
            last_resort: true
        }
    ));
}

#[tokio::test]
async fn concurrent_claims_never_share_a_package() {
    let s = InProcess::start().await;
    let (c, alice) = s.user("alice").await;
    let kps: Vec<Bytes> = (0..30).map(|_| kp(&alice, "alice", false)).collect();
    let last = kp(&alice, "alice", true);
    c.request(&publish(kps, Some(last.clone()))).await.unwrap();
    assert_eq!(kp_count(&c).await, (30, true));
    // Eight claimers, six claims each, all at once: 48 claims for 30 packages.
    let mut claimers = Vec::new();
    for i in 0..8 {
        claimers.push(s.user(&format!("claimer{i}")).await.0);
    }
    let claims = claimers.iter().flat_map(|cl| {
        (0..6).map(move |_| async move {
            match cl
                .request(&Request::ClaimKeyPackages {
                    users: vec!["alice".into()],
                })
                .await
                .unwrap()
            {
                Response::KeyPackages { mut packages } => packages.pop().unwrap(),
                other => panic!("{other:?}"),
            }
        })
    });
    let handed: Vec<_> = join_all(claims.collect()).await;
    let one_time: Vec<_> = handed.iter().filter(|p| !p.last_resort).collect();
    let unique: HashSet<_> = one_time.iter().map(|p| p.key_package.clone()).collect();
    assert_eq!(one_time.len(), 30, "every one-time package is handed out");
    assert_eq!(unique.len(), 30, "no one-time package is handed out twice");
    for p in handed.iter().filter(|p| p.last_resort) {
        assert_eq!(p.key_package, last);
    }
    assert_eq!(handed.len() - one_time.len(), 18);
    assert_eq!(kp_count(&c).await, (0, true));
}

async fn join_all<F: std::future::Future>(fs: Vec<F>) -> Vec<F::Output> {
    let mut fs: Vec<_> = fs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = fs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in fs.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.unwrap()).collect()
}

#[tokio::test]
async fn claims_are_refused_for_unknown_users_and_rate_limited() {
    let s = InProcess::start_with(|c| c.claims_per_minute = 5).await;
    let (c, alice) = s.user("alice").await;
    c.request(&publish(vec![], Some(kp(&alice, "alice", true))))
        .await
        .unwrap();
    let (claimer, _) = s.user("claimer").await;
    let claim = |u: &str| Request::ClaimKeyPackages {
        users: vec![u.to_owned()],
    };
    assert_eq!(
        code(claimer.request(&claim("nobody")).await),
        ErrorCode::UnknownUser
    );
    s.user("nopackages").await;
    assert_eq!(
        code(claimer.request(&claim("nopackages")).await),
        ErrorCode::NoKeyPackage
    );
    // Five claims a minute: the loop runs into the limit.
    let mut limited = false;
    for _ in 0..10 {
        match claimer.request(&claim("alice")).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(ErrorCode::RateLimited) => {
                limited = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(limited, "a claim loop must hit the rate limit");
    // Another claimer is not affected.
    let (other, _) = s.user("other").await;
    other.request(&claim("alice")).await.unwrap();
}

/// A package about to expire does not count as available (so its owner
/// replaces it in time) though it is still handed out; one far larger than
/// a key package is refused before anything is parsed.
#[tokio::test]
async fn packages_count_only_while_valid_long_enough_and_have_a_size_limit() {
    let s = InProcess::start().await;
    let (c, alice) = s.user("alice").await;
    let (bob_c, _bob) = s.user("bob").await;
    // Valid for an hour: stored, not counted; nor is such a last resort.
    c.request(&publish(
        vec![kp_valid_for(&alice, "alice", false, 3600)],
        Some(kp_valid_for(&alice, "alice", true, 3600)),
    ))
    .await
    .unwrap();
    assert_eq!(kp_count(&c).await, (0, false));
    let got = bob_c
        .request(&Request::ClaimKeyPackages {
            users: vec!["alice".into()],
        })
        .await
        .unwrap();
    assert!(matches!(got, Response::KeyPackages { ref packages } if packages.len() == 1));
    // Replaced with packages valid for long: counted.
    c.request(&publish(
        vec![kp(&alice, "alice", false)],
        Some(kp(&alice, "alice", true)),
    ))
    .await
    .unwrap();
    assert_eq!(kp_count(&c).await, (1, true));
    // Size.
    let big = Bytes::from(vec![0u8; 64 * 1024]);
    let r = c.request(&publish(vec![big.clone()], None)).await;
    assert_eq!(code(r), ErrorCode::TooLarge);
    let r = c.request(&publish(vec![], Some(big))).await;
    assert_eq!(code(r), ErrorCode::TooLarge);
}
