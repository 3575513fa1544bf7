//! Hostile members and non-members against the sequencer. Each test builds
//! MLS messages by hand (openmls with in-memory state) so it can send what
//! an honest client never would.
#![allow(clippy::unwrap_used)]
mod common;

use bytes::Bytes;
use common::raw::*;
use common::*;
use huddle_client::identity::Identity;
use huddle_client::net::Connection;
use huddle_core::mls;
use huddle_core::proto::{ErrorCode, Request, Response};
use huddle_core::GroupId;
use openmls::prelude::{tls_codec::Deserialize as _, *};
use openmls_rust_crypto::OpenMlsRustCrypto;

/// Alice creates a group and adds Bob; returns both members' groups.
async fn alice_and_bob(s: &InProcess) -> (Raw, Raw, GroupId, MlsGroup, MlsGroup) {
    let alice = Raw::new(s, "alice").await;
    let bob = Raw::new(s, "bob").await;
    let (gid, mut ga) = alice.create().await;
    let kp = alice.claim("bob").await;
    let (c, w, _) = ga.add_members(&alice.provider, &alice.id, &[kp]).unwrap();
    alice.commit(gid, bytes(&c), Some(bytes(&w))).await.unwrap();
    ga.merge_pending_commit(&alice.provider).unwrap();
    let gb = bob.join_from(gid, 1, bytes(&w).as_ref()).await;
    (alice, bob, gid, ga, gb)
}

#[tokio::test]
async fn non_members_can_neither_post_nor_read() {
    let s = InProcess::start().await;
    let (alice, _bob, gid, mut ga, _gb) = alice_and_bob(&s).await;
    let mallory = Raw::new(&s, "mallory").await;
    // A perfectly valid commit and message, posted by a non-member.
    let c = ga
        .self_update(&alice.provider, &alice.id, LeafNodeParameters::default())
        .unwrap();
    let r = mallory.commit(gid, bytes(c.commit()), None).await;
    assert_eq!(code(r), ErrorCode::NotMember);
    ga.clear_pending_commit(alice.provider.storage()).unwrap();
    let m = ga
        .create_message(&alice.provider, &alice.id, b"hi")
        .unwrap();
    let r = mallory
        .net
        .request(&Request::Message {
            group: gid,
            message: bytes(&m),
        })
        .await;
    assert_eq!(code(r), ErrorCode::NotMember);
    for req in [
        Request::FetchLog {
            group: gid,
            after: 0,
            limit: 10,
        },
        Request::GroupState { group: gid },
        Request::RatchetTree { group: gid, seq: 1 },
    ] {
        assert_eq!(code(mallory.net.request(&req).await), ErrorCode::NotMember);
    }
}

#[tokio::test]
async fn a_removed_member_can_neither_post_nor_read_what_follows() {
    let s = InProcess::start().await;
    let (alice, bob, gid, mut ga, mut gb) = alice_and_bob(&s).await;
    // Bob prepares a commit and a message while still a member.
    let bobs_update = gb
        .self_update(&bob.provider, &bob.id, LeafNodeParameters::default())
        .unwrap();
    let bobs_commit = bytes(bobs_update.commit());
    gb.clear_pending_commit(bob.provider.storage()).unwrap();
    let bobs_message = bytes(&gb.create_message(&bob.provider, &bob.id, b"late").unwrap());
    // Alice removes him.
    let bob_leaf = ga
        .members()
        .find(|m| mls::principal_of(&m.credential).as_deref() == Some("bob"))
        .unwrap()
        .index;
    let (c, _, _) = ga
        .remove_members(&alice.provider, &alice.id, &[bob_leaf])
        .unwrap();
    let Response::Appended {
        seq: removed_at, ..
    } = alice.commit(gid, bytes(&c), None).await.unwrap()
    else {
        panic!()
    };
    ga.merge_pending_commit(&alice.provider).unwrap();
    // His commit and message, built as a member, are refused now.
    assert_eq!(
        code(bob.commit(gid, bobs_commit, None).await),
        ErrorCode::NotMember
    );
    let r = bob
        .net
        .request(&Request::Message {
            group: gid,
            message: bobs_message,
        })
        .await;
    assert_eq!(code(r), ErrorCode::NotMember);
    // He may still read up to his removal, and nothing after it.
    let m = ga
        .create_message(&alice.provider, &alice.id, b"after")
        .unwrap();
    alice
        .net
        .request(&Request::Message {
            group: gid,
            message: bytes(&m),
        })
        .await
        .unwrap();
    let Response::Log { entries, head } = bob
        .net
        .request(&Request::FetchLog {
            group: gid,
            after: 0,
            limit: 100,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(head, removed_at);
    assert_eq!(entries.last().map(|e| e.seq), Some(removed_at));
    let r = bob
        .net
        .request(&Request::FetchLog {
            group: gid,
            after: removed_at,
            limit: 100,
        })
        .await;
    assert_eq!(code(r), ErrorCode::NotMember);
    for req in [
        Request::GroupState { group: gid },
        Request::JoinInfo { group: gid },
    ] {
        assert_eq!(code(bob.net.request(&req).await), ErrorCode::NotMember);
    }
}

#[tokio::test]
async fn forged_and_stale_commits_are_refused_and_leave_state_unchanged() {
    let s = InProcess::start().await;
    let (alice, bob, gid, mut ga, mut gb) = alice_and_bob(&s).await;
    // A commit with one flipped byte in its signature. A member's
    // PublicMessage commit ends with the signature (1 + 64 bytes), the
    // confirmation tag (1 + 32) and the membership tag (1 + 32); only the
    // signature can be checked without group secrets.
    let c = ga
        .self_update(&alice.provider, &alice.id, LeafNodeParameters::default())
        .unwrap();
    let mut forged = bytes(c.commit()).to_vec();
    let n = forged.len();
    forged[n - 100] ^= 0x40;
    let r = alice.commit(gid, forged.into(), None).await;
    refused(r, ErrorCode::InvalidMessage, "handshake message refused");
    ga.clear_pending_commit(alice.provider.storage()).unwrap();
    // Bob posting Alice's (valid) commit: the signer is not the caller.
    let c = ga
        .self_update(&alice.provider, &alice.id, LeafNodeParameters::default())
        .unwrap();
    let alices = bytes(c.commit());
    let r = bob.commit(gid, alices.clone(), None).await;
    refused(r, ErrorCode::InvalidMessage, "signed by another member");
    // Bob commits first; Alice's commit for the same epoch is stale, and the
    // error carries the current epoch.
    let cb = gb
        .self_update(&bob.provider, &bob.id, LeafNodeParameters::default())
        .unwrap();
    let Response::Appended { epoch, .. } = bob.commit(gid, bytes(cb.commit()), None).await.unwrap()
    else {
        panic!()
    };
    let r = alice.commit(gid, alices, None).await;
    match r {
        Err(huddle_client::ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::StaleEpoch);
            assert_eq!(e.epoch, Some(epoch));
        }
        other => panic!("{other:?}"),
    }
    // The log holds exactly the add and Bob's update.
    let Response::GroupState {
        epoch: now, head, ..
    } = alice
        .net
        .request(&Request::GroupState { group: gid })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!((now, head), (epoch, 2));
}

#[tokio::test]
async fn welcomes_must_go_to_exactly_the_added_members() {
    let s = InProcess::start().await;
    let (alice, _bob, gid, mut ga, _gb) = alice_and_bob(&s).await;
    let _carol = Raw::new(&s, "carol").await;
    let _dave = Raw::new(&s, "dave").await;
    // A Welcome made for Dave (in a scratch group) sent with a commit adding Carol.
    let (_, mut scratch) = alice.create().await;
    let kp_dave = alice.claim("dave").await;
    let (_, w_dave, _) = scratch
        .add_members(&alice.provider, &alice.id, &[kp_dave])
        .unwrap();
    let kp_carol = alice.claim("carol").await;
    let (c, _w_carol, _) = ga
        .add_members(&alice.provider, &alice.id, &[kp_carol])
        .unwrap();
    let r = alice.commit(gid, bytes(&c), Some(bytes(&w_dave))).await;
    refused(r, ErrorCode::InvalidMessage, "exactly the added members");
    // An add without its Welcome.
    let r = alice.commit(gid, bytes(&c), None).await;
    refused(r, ErrorCode::InvalidMessage, "needs their Welcome");
    ga.clear_pending_commit(alice.provider.storage()).unwrap();
    // A Welcome with a commit that adds nobody.
    let u = ga
        .self_update(&alice.provider, &alice.id, LeafNodeParameters::default())
        .unwrap();
    let r = alice
        .commit(gid, bytes(u.commit()), Some(bytes(&w_dave)))
        .await;
    refused(r, ErrorCode::InvalidMessage, "adds nobody");
    // Nobody got anything in their inbox.
    let Response::Inbox { items, .. } = _carol
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
    assert!(items.is_empty());
}

#[tokio::test]
async fn an_added_leaf_must_carry_the_registered_identity_key() {
    let s = InProcess::start().await;
    let (alice, _bob, gid, mut ga, _gb) = alice_and_bob(&s).await;
    let _carol = Raw::new(&s, "carol").await;
    // Mallory makes a key package that claims to be Carol, signed with
    // Mallory's own key, and a member adds it.
    let mallory = Identity::generate("carol");
    let provider = OpenMlsRustCrypto::default();
    let fake = KeyPackage::builder()
        .leaf_node_capabilities(mls::capabilities())
        .build(mls::CIPHERSUITE, &provider, &mallory, mallory.credential())
        .unwrap();
    let (c, w, _) = ga
        .add_members(&alice.provider, &alice.id, &[fake.key_package().clone()])
        .unwrap();
    let r = alice.commit(gid, bytes(&c), Some(bytes(&w))).await;
    refused(
        r,
        ErrorCode::InvalidMessage,
        "not its registered identity key",
    );
}

#[tokio::test]
async fn only_encrypted_application_messages_within_the_epoch_window_are_accepted() {
    let s = InProcess::start().await;
    let (alice, _bob, gid, mut ga, _gb) = alice_and_bob(&s).await;
    // A handshake message sent as if it were an application message.
    let c = ga
        .self_update(&alice.provider, &alice.id, LeafNodeParameters::default())
        .unwrap();
    let r = alice
        .net
        .request(&Request::Message {
            group: gid,
            message: bytes(c.commit()),
        })
        .await;
    refused(r, ErrorCode::InvalidMessage, "must be encrypted");
    ga.clear_pending_commit(alice.provider.storage()).unwrap();
    // A message for another group id.
    let (other, mut go) = alice.create().await;
    let m = go.create_message(&alice.provider, &alice.id, b"x").unwrap();
    let r = alice
        .net
        .request(&Request::Message {
            group: gid,
            message: bytes(&m),
        })
        .await;
    refused(r, ErrorCode::InvalidMessage, "for another group");
    let _ = other;
    // A message from too many epochs ago is stale.
    let old = ga
        .create_message(&alice.provider, &alice.id, b"old")
        .unwrap();
    for _ in 0..=mls::MAX_PAST_EPOCHS {
        let u = ga
            .self_update(&alice.provider, &alice.id, LeafNodeParameters::default())
            .unwrap();
        alice.commit(gid, bytes(u.commit()), None).await.unwrap();
        ga.merge_pending_commit(&alice.provider).unwrap();
    }
    let r = alice
        .net
        .request(&Request::Message {
            group: gid,
            message: bytes(&old),
        })
        .await;
    assert_eq!(code(r), ErrorCode::StaleEpoch);
}

/// Uploads `blob` for `media` in `group` with `trailer` as the announced
/// hash, from the offset the DS names (the bytes before it were sent by an
/// earlier attempt).
async fn raw_upload(
    net: &Connection,
    group: GroupId,
    media: huddle_core::MediaId,
    blob: &[u8],
    trailer: [u8; 32],
) -> huddle_client::Result<Response> {
    let (mut send, mut recv, offset) = begin_raw_upload(net, group, media, blob).await;
    send.write_all(&blob[offset..]).await.unwrap();
    send.write_all(&huddle_core::frame::encode(&trailer))
        .await
        .unwrap();
    send.finish().unwrap();
    match huddle_client::net::read_message::<Response>(&mut recv).await? {
        Response::Error(e) => Err(huddle_client::ClientError::Server(e)),
        r => Ok(r),
    }
}

/// Sends the first `n` bytes of `blob` and ends the stream without a
/// trailer: an interrupted upload, which the DS keeps to be resumed.
async fn raw_upload_cut(
    net: &Connection,
    group: GroupId,
    media: huddle_core::MediaId,
    blob: &[u8],
    n: usize,
) -> Response {
    let (mut send, mut recv, offset) = begin_raw_upload(net, group, media, blob).await;
    assert_eq!(offset, 0);
    send.write_all(&blob[..n]).await.unwrap();
    send.finish().unwrap();
    huddle_client::net::read_message::<Response>(&mut recv)
        .await
        .unwrap()
}

/// Asks for the whole of `media`.
async fn whole_download(
    net: &Connection,
    media: huddle_core::MediaId,
) -> huddle_client::Result<(quinn::SendStream, quinn::RecvStream, Response)> {
    net.open(&Request::Download {
        media,
        offset: 0,
        len: 0,
    })
    .await
}

async fn begin_raw_upload(
    net: &Connection,
    group: GroupId,
    media: huddle_core::MediaId,
    blob: &[u8],
) -> (quinn::SendStream, quinn::RecvStream, usize) {
    let req = Request::BeginUpload(huddle_core::proto::UploadRequest {
        group,
        media,
        total_len: blob.len() as u64,
    });
    let (send, recv, first) = net.open(&req).await.unwrap();
    let Response::Upload {
        offset,
        complete: false,
    } = first
    else {
        panic!("{first:?}")
    };
    (send, recv, offset as usize)
}

#[tokio::test]
async fn uploads_must_match_their_header_and_hash() {
    use huddle_core::media::{seal_blob, Header, ItemKey, MIN_CHUNK_SIZE};
    let s = InProcess::start().await;
    let (alice, _bob, gid, _ga, _gb) = alice_and_bob(&s).await;
    let media = huddle_core::MediaId(rand_id());
    let key = ItemKey::from_bytes([7; 32]);
    let seal_item = |media, group: GroupId| {
        let h = Header::new(media, group, [3; 32], MIN_CHUNK_SIZE, 100_000).unwrap();
        seal_blob(&key, h, &vec![5u8; 100_000]).unwrap()
    };
    let seal = |group: GroupId| seal_item(media, group);
    let blob = seal(gid);
    let hash = *blake3::hash(&blob).as_bytes();
    // An upload resumed with a wrong hash (its attempts' bytes do not form
    // the announced blob): refused and discarded.
    let r = raw_upload_cut(&alice.net, gid, media, &blob, 80_000).await;
    assert!(
        matches!(&r, Response::Error(e) if e.code == ErrorCode::BadRequest),
        "{r:?}"
    );
    let r = raw_upload(&alice.net, gid, media, &blob, [0; 32]).await;
    assert_eq!(code(r), ErrorCode::IntegrityError);
    if let Some(s3) = &s.objects {
        // On an object store: the upload was aborted, its part deleted.
        assert_eq!(s3.upload_files(), 0, "a refused upload left parts");
        assert!(!s3.object_path(&media.to_string()).exists());
    }
    // A header that names another group: refused.
    let other = seal(GroupId([1; 16]));
    let r = raw_upload(
        &alice.net,
        gid,
        media,
        &other,
        *blake3::hash(&other).as_bytes(),
    )
    .await;
    refused(r, ErrorCode::BadRequest, "names another item or group");
    // Nothing of either is fetchable.
    let r = whole_download(&alice.net, media).await;
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::NotFound));
    // The real thing is accepted, and can then be fetched whole.
    let r = raw_upload(&alice.net, gid, media, &blob, hash)
        .await
        .unwrap();
    assert!(matches!(r, Response::Upload { complete: true, .. }));
    let (_s, mut recv, head) = whole_download(&alice.net, media).await.unwrap();
    assert!(matches!(head, Response::Download { hash: h, .. } if h == hash));
    let got = recv.read_to_end(1 << 20).await.unwrap();
    assert_eq!(got, blob);

    // A wrong hash in an upload received whole in one stream: a DS that
    // keeps blobs on an object store checks it; one that keeps them in its
    // data dir does not, and serves the hash as announced, which every
    // receiver checks (PROTOCOL.md 16.1, the hash check).
    let media = huddle_core::MediaId(rand_id());
    let blob = seal_item(media, gid);
    let r = raw_upload(&alice.net, gid, media, &blob, [9; 32]).await;
    if s.objects.is_some() {
        assert_eq!(code(r), ErrorCode::IntegrityError);
    } else {
        assert!(matches!(r, Ok(Response::Upload { complete: true, .. })));
        let (_s, _recv, head) = whole_download(&alice.net, media).await.unwrap();
        assert!(matches!(head, Response::Download { hash: h, .. } if h == [9; 32]));
    }
}

/// The DS reads a download ahead of what it sends; a stored file cut short
/// (damaged outside the DS) still ends the stream exactly where its bytes
/// end, after the reads that ran past it.
#[tokio::test]
async fn a_stored_blob_shorter_than_its_record_ends_the_download_where_it_ends() {
    use huddle_core::media::{seal_blob, Header, ItemKey, MIN_CHUNK_SIZE};
    let s = InProcess::start().await;
    if s.objects.is_some() {
        return; // blobs on an object store are not files here
    }
    let (alice, _bob, gid, _ga, _gb) = alice_and_bob(&s).await;
    let media = huddle_core::MediaId(rand_id());
    let plain = 3 << 20;
    let h = Header::new(media, gid, [3; 32], MIN_CHUNK_SIZE, plain).unwrap();
    let blob = seal_blob(&ItemKey::from_bytes([7; 32]), h, &vec![5u8; plain as usize]).unwrap();
    let hash = *blake3::hash(&blob).as_bytes();
    let r = raw_upload(&alice.net, gid, media, &blob, hash)
        .await
        .unwrap();
    assert!(matches!(r, Response::Upload { complete: true, .. }));
    // Cut inside the second MiB: the first read is whole, the second short,
    // the third (already asked for) finds nothing.
    let kept = (3 << 19) + 100;
    let path = s
        .dir
        .path()
        .join("ds")
        .join("blobs")
        .join(format!("{media}.blob"));
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(kept as u64).unwrap();
    let (_s, mut recv, head) = whole_download(&alice.net, media).await.unwrap();
    assert!(matches!(head, Response::Download { len, .. } if len == blob.len() as u64));
    let got = recv.read_to_end(8 << 20).await.unwrap();
    assert_eq!(got.len(), kept);
    assert!(got[..] == blob[..kept]);
}

async fn publish(who: &Raw, gid: GroupId, info: Bytes) -> huddle_client::Result<Response> {
    who.net
        .request(&Request::PublishGroupInfo {
            group: gid,
            group_info: info,
        })
        .await
}

/// Builds an external commit (a rejoin) from what the DS serves.
fn external_commit(id: &Identity, info: &Bytes, tree: &Bytes) -> Bytes {
    let provider = OpenMlsRustCrypto::default();
    let MlsMessageBodyIn::GroupInfo(vgi) = MlsMessageIn::tls_deserialize_exact(info.as_ref())
        .unwrap()
        .extract()
    else {
        panic!()
    };
    let (_, bundle) = MlsGroup::external_commit_builder()
        .with_ratchet_tree(RatchetTreeIn::tls_deserialize_exact(tree.as_ref()).unwrap())
        .with_config(mls::join_config())
        .build_group(&provider, vgi, id.credential())
        .unwrap()
        .leaf_node_parameters(
            LeafNodeParameters::builder()
                .with_capabilities(mls::capabilities())
                .build(),
        )
        .load_psks(provider.storage())
        .unwrap()
        .build(provider.rand(), provider.crypto(), id, |_| true)
        .unwrap()
        .finalize(&provider)
        .unwrap();
    bytes(bundle.commit())
}

#[tokio::test]
async fn only_a_member_may_rejoin_and_only_with_a_group_info_it_signed() {
    let s = InProcess::start().await;
    let (alice, bob, gid, mut ga, gb) = alice_and_bob(&s).await;
    let mallory = Raw::new(&s, "mallory").await;
    let alices = bytes(
        &ga.export_group_info(alice.provider.crypto(), &alice.id, false)
            .unwrap(),
    );
    let bobs = bytes(
        &gb.export_group_info(bob.provider.crypto(), &bob.id, false)
            .unwrap(),
    );
    // The signer each names, read from the framing: their own leaves.
    assert_eq!(mls::group_info_signer(&alices), Some(0));
    assert_eq!(mls::group_info_signer(&bobs), Some(1));
    // Only a member may publish, and only a GroupInfo it signed itself.
    assert_eq!(
        code(publish(&mallory, gid, alices.clone()).await),
        ErrorCode::NotMember
    );
    refused(
        publish(&bob, gid, alices.clone()).await,
        ErrorCode::InvalidMessage,
        "signer is not the publishing member's leaf",
    );
    let mut forged = bobs.to_vec();
    let n = forged.len();
    forged[n - 1] ^= 1;
    refused(
        publish(&bob, gid, forged.into()).await,
        ErrorCode::InvalidMessage,
        "not signed by the publishing member",
    );
    publish(&alice, gid, alices.clone()).await.unwrap();
    // Only a member may read it.
    let join = Request::JoinInfo { group: gid };
    assert_eq!(code(mallory.net.request(&join).await), ErrorCode::NotMember);
    let Response::JoinInfo {
        epoch,
        group_info,
        tree,
        ..
    } = bob.net.request(&join).await.unwrap()
    else {
        panic!()
    };
    assert_eq!((epoch, &group_info), (1, &alices));
    // A non-member who got hold of it (from a member) cannot join with it.
    let r = mallory
        .commit(gid, external_commit(&mallory.id, &group_info, &tree), None)
        .await;
    assert_eq!(code(r), ErrorCode::NotMember);
    // Nor can a member add a second leaf for itself with another key: an
    // external commit must replace the sender's own leaf.
    let other_bob = Identity::generate("bob");
    let r = bob
        .commit(gid, external_commit(&other_bob, &group_info, &tree), None)
        .await;
    refused(
        r,
        ErrorCode::InvalidMessage,
        "replace the sender's own leaf",
    );
    // Bob rejoining with his own key replaces his leaf: accepted, and Alice
    // processes it. The membership is unchanged; the epoch moves on.
    let Response::Appended { epoch: e2, seq } = bob
        .commit(gid, external_commit(&bob.id, &group_info, &tree), None)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(e2, 2);
    let Response::Log { entries, .. } = alice
        .net
        .request(&Request::FetchLog {
            group: gid,
            after: seq - 1,
            limit: 1,
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let pm = MlsMessageIn::tls_deserialize_exact(entries[0].data.as_ref())
        .unwrap()
        .try_into_protocol_message()
        .unwrap();
    let p = ga.process_message(&alice.provider, pm).unwrap();
    let ProcessedMessageContent::StagedCommitMessage(staged) = p.into_content() else {
        panic!()
    };
    ga.merge_staged_commit(&alice.provider, *staged).unwrap();
    assert_eq!(ga.epoch().as_u64(), 2);
    assert_eq!(ga.members().count(), 2);
    // The epoch-1 GroupInfo is stale now: refused, and not handed out.
    let r = publish(&alice, gid, alices).await;
    assert_eq!(code(r), ErrorCode::StaleEpoch);
    assert_eq!(code(bob.net.request(&join).await), ErrorCode::NotFound);
}

/// PROTOCOL.md 13.10: a group_context_extensions proposal may change the
/// group's policy but not drop it (here: every extension, the required
/// capabilities with it), which openmls alone would accept.
#[tokio::test]
async fn a_commit_may_not_drop_the_groups_policy() {
    let s = InProcess::start().await;
    let (alice, _bob, gid, mut ga, _gb) = alice_and_bob(&s).await;
    let (c, _, _) = ga
        .update_group_context_extensions(&alice.provider, Extensions::empty(), &alice.id)
        .unwrap();
    let r = alice.commit(gid, bytes(&c), None).await;
    refused(
        r,
        ErrorCode::InvalidMessage,
        "a commit may not drop the group's policy",
    );
    // The group goes on: the same member's ordinary commit is accepted.
    ga.clear_pending_commit(alice.provider.storage()).unwrap();
    let c = ga
        .self_update(&alice.provider, &alice.id, LeafNodeParameters::default())
        .unwrap();
    alice.commit(gid, bytes(c.commit()), None).await.unwrap();
}

/// PROTOCOL.md 13.2: every leaf lists the last_resort extension among its
/// capabilities, also one brought in by an add commit.
#[tokio::test]
async fn an_added_leaf_must_list_the_huddle_capabilities() {
    let s = InProcess::start().await;
    let (alice, _bob, gid, mut ga, _gb) = alice_and_bob(&s).await;
    let carol = Raw::new(&s, "carol").await;
    let plain = KeyPackage::builder()
        .leaf_node_capabilities(Capabilities::new(
            None,
            Some(&[mls::CIPHERSUITE]),
            // The policy extension every group requires, which openmls
            // checks itself, and not last_resort, which only the DS does.
            Some(&[ExtensionType::Unknown(
                huddle_core::policy::POLICY_EXTENSION,
            )]),
            None,
            None,
        ))
        .build(
            mls::CIPHERSUITE,
            &carol.provider,
            &carol.id,
            carol.id.credential(),
        )
        .unwrap();
    let (c, w, _) = ga
        .add_members(&alice.provider, &alice.id, &[plain.key_package().clone()])
        .unwrap();
    let r = alice.commit(gid, bytes(&c), Some(bytes(&w))).await;
    refused(
        r,
        ErrorCode::InvalidMessage,
        "carol's leaf: the leaf's capabilities do not list extension last_resort",
    );
}

/// Sends `CreateGroup` for a group `who` built with `builder`.
async fn create_built(who: &Raw, builder: MlsGroupBuilder) -> huddle_client::Result<Response> {
    let gid = GroupId(rand_id());
    let g = builder
        .with_group_id(openmls::group::GroupId::from_slice(gid.as_bytes()))
        .ciphersuite(mls::CIPHERSUITE)
        .use_ratchet_tree_extension(false)
        .build(&who.provider, &who.id, who.id.credential())
        .unwrap();
    let info = g
        .export_group_info(who.provider.crypto(), &who.id, false)
        .unwrap();
    who.net
        .request(&Request::CreateGroup {
            group: gid,
            group_info: bytes(&info),
            ratchet_tree: openmls::prelude::tls_codec::Serialize::tls_serialize_detached(
                &g.export_ratchet_tree(),
            )
            .unwrap()
            .into(),
        })
        .await
}

/// PROTOCOL.md 13.5 and 13.2: the creator's leaf keeps to the lifetime
/// bound and lists the capabilities, like any leaf from a key package.
#[tokio::test]
async fn the_creators_leaf_keeps_the_lifetime_bound_and_capabilities() {
    let s = InProcess::start().await;
    let alice = Raw::new(&s, "alice").await;
    let r = create_built(
        &alice,
        MlsGroup::builder()
            .with_capabilities(mls::capabilities())
            .lifetime(Lifetime::new(100 * 24 * 3600)),
    )
    .await;
    refused(
        r,
        ErrorCode::InvalidMessage,
        "the creator's leaf is valid for",
    );
    let r = create_built(&alice, MlsGroup::builder()).await;
    refused(
        r,
        ErrorCode::InvalidMessage,
        "the creator's leaf: the leaf's capabilities do not list extension last_resort",
    );
    // The same with the reference client's settings is accepted.
    let r = create_built(
        &alice,
        MlsGroup::builder()
            .with_capabilities(mls::capabilities())
            .with_group_context_extensions(
                huddle_core::policy::Policy::new_group("alice").extensions(),
            ),
    )
    .await;
    assert!(
        matches!(r, Ok(Response::Appended { seq: 0, epoch: 0 })),
        "{r:?}"
    );
}

/// Links device 2 of `owner` (a raw member): the new device asks with a
/// proof of its key, the owner signs its addition; returns it connected
/// and authenticated as `USER/2`, with key packages published.
async fn link_device(s: &InProcess, owner: &Raw, user: &str) -> Raw {
    use huddle_core::auth::{proof_message, Purpose};
    use huddle_core::devices::{DeviceChange, DeviceSet};
    let phone = Identity::generate(&format!("{user}/2"));
    let net = s.connect().await;
    let Response::Challenge { nonce } = net.request(&Request::Challenge).await.unwrap() else {
        panic!()
    };
    let mut exporter = [0u8; 32];
    net.quic()
        .export_keying_material(&mut exporter, huddle_core::proto::EXPORTER_LABEL, b"")
        .unwrap();
    let proof = phone.sign_raw(&proof_message(Purpose::Link, user, &nonce, &exporter));
    let Response::LinkCode { code, .. } = net
        .request(&Request::RequestLink {
            user: user.into(),
            device_key: phone.public(),
            proof: proof.into(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let Response::PendingLink { device_key, .. } = owner
        .net
        .request(&Request::PendingLink { code: code.clone() })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(device_key, phone.public());
    let entry = DeviceSet::new(user, owner.id.public()).next_entry(
        1,
        owner.id.signing_key(),
        DeviceChange::Add {
            device: 2,
            key: device_key,
        },
        0,
    );
    owner
        .net
        .request(&Request::AppendDevice {
            entry: entry.into(),
            code: Some(code),
        })
        .await
        .unwrap();
    let net = s.connect().await;
    net.authenticate(&phone, false).await.unwrap();
    Raw::with(net, phone).await
}

/// A device joins a group by an external commit only while another device
/// of its user is a member, and then only with its own leaf; a device of a
/// user who is not a member is refused, as is one whose key is not in its
/// user's device log.
#[tokio::test]
async fn a_device_joins_by_itself_only_while_its_user_is_a_member() {
    let s = InProcess::start().await;
    let (alice, bob, gid, ga, _gb) = alice_and_bob(&s).await;
    let mallory = Raw::new(&s, "mallory").await;
    let bob2 = link_device(&s, &bob, "bob").await;
    let mallory2 = link_device(&s, &mallory, "mallory").await;
    let info = bytes(
        &ga.export_group_info(alice.provider.crypto(), &alice.id, false)
            .unwrap(),
    );
    publish(&alice, gid, info).await.unwrap();
    let join = Request::JoinInfo { group: gid };
    // Mallory's device: her user is not a member.
    assert_eq!(
        code(mallory2.net.request(&join).await),
        ErrorCode::NotMember
    );
    let Response::JoinInfo {
        group_info, tree, ..
    } = bob2.net.request(&join).await.unwrap()
    else {
        panic!()
    };
    let r = mallory2
        .commit(gid, external_commit(&mallory2.id, &group_info, &tree), None)
        .await;
    assert_eq!(code(r), ErrorCode::NotMember);
    // A key bob's log does not name, under the name bob/2.
    let forged = Identity::generate("bob/2");
    let r = bob2
        .commit(gid, external_commit(&forged, &group_info, &tree), None)
        .await;
    refused(
        r,
        ErrorCode::InvalidMessage,
        "not its registered identity key",
    );
    // Bob's real second device joins: one more leaf, same users.
    let Response::Appended { epoch, .. } = bob2
        .commit(gid, external_commit(&bob2.id, &group_info, &tree), None)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(epoch, 2);
    let Response::GroupState { members, .. } = alice
        .net
        .request(&Request::GroupState { group: gid })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(members, ["alice", "bob", "bob/2"]);
}
