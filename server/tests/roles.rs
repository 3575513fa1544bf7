//! Roles and the group's policy as the DS enforces them (PROTOCOL.md
//! 13.10): each test builds MLS messages by hand so that a member can send
//! what an honest client would refuse to build.
#![allow(clippy::unwrap_used)]
mod common;

use bytes::Bytes;
use common::raw::*;
use common::*;
use huddle_core::mls;
use huddle_core::policy::{Policy, Role, AAD_RENAME};
use huddle_core::proto::{ErrorCode, Request, Response};
use huddle_core::GroupId;
use openmls::prelude::{tls_codec::Deserialize as _, *};

/// A group of raw members, each with its own MLS state.
struct Group {
    id: GroupId,
    members: Vec<(Raw, MlsGroup)>,
}

impl Group {
    /// `names[0]` creates the group (its owner) and adds the others.
    async fn new(s: &InProcess, names: &[&str]) -> Group {
        let mut raws = Vec::new();
        for n in names {
            raws.push(Raw::new(s, n).await);
        }
        let (id, mut g0) = raws[0].create().await;
        let mut kps = Vec::new();
        for n in &names[1..] {
            kps.push(raws[0].claim(n).await);
        }
        let (c, w, _) = g0
            .add_members(&raws[0].provider, &raws[0].id, &kps)
            .unwrap();
        raws[0]
            .commit(id, bytes(&c), Some(bytes(&w)))
            .await
            .unwrap();
        g0.merge_pending_commit(&raws[0].provider).unwrap();
        let w = bytes(&w);
        let mut it = raws.into_iter();
        let first = it.next().unwrap();
        let mut members = vec![(first, g0)];
        for r in it {
            let g = r.join_from(id, 1, &w).await;
            members.push((r, g));
        }
        Group { id, members }
    }

    fn leaf(&self, user: &str) -> LeafNodeIndex {
        self.members[0]
            .1
            .members()
            .find(|m| mls::principal_of(&m.credential).as_deref() == Some(user))
            .unwrap()
            .index
    }

    fn policy(&self) -> Policy {
        Policy::from_extensions(self.members[0].1.extensions())
            .unwrap()
            .unwrap()
    }

    /// Member `i` commits what `build` stages; on acceptance every member
    /// merges or processes it, on refusal `i` drops it.
    async fn commit(
        &mut self,
        i: usize,
        build: impl FnOnce(&mut MlsGroup, &Raw) -> (MlsMessageOut, Option<MlsMessageOut>),
    ) -> huddle_client::Result<Response> {
        let (c, w) = {
            let (raw, g) = &mut self.members[i];
            build(g, raw)
        };
        let (raw, _) = &self.members[i];
        let r = raw.commit(self.id, bytes(&c), w.as_ref().map(bytes)).await;
        let accepted = r.is_ok();
        for (j, (raw, g)) in self.members.iter_mut().enumerate() {
            if j == i {
                if accepted {
                    g.merge_pending_commit(&raw.provider).unwrap();
                } else {
                    g.clear_pending_commit(raw.provider.storage()).unwrap();
                }
            } else if accepted {
                let pm = MlsMessageIn::tls_deserialize_exact(bytes(&c).as_ref())
                    .unwrap()
                    .try_into_protocol_message()
                    .unwrap();
                let p = g.process_message(&raw.provider, pm).unwrap();
                if let ProcessedMessageContent::StagedCommitMessage(st) = p.into_content() {
                    if !st.self_removed() {
                        g.merge_staged_commit(&raw.provider, *st).unwrap();
                    }
                }
            }
        }
        r
    }

    /// Member `i` commits `policy` as the group's.
    async fn set_policy(&mut self, i: usize, policy: Policy) -> huddle_client::Result<Response> {
        self.commit(i, |g, raw| {
            let b = g
                .commit_builder()
                .propose_group_context_extensions(policy.extensions())
                .unwrap()
                .load_psks(raw.provider.storage())
                .unwrap()
                .build(raw.provider.rand(), raw.provider.crypto(), &raw.id, |_| {
                    true
                })
                .unwrap()
                .stage_commit(&raw.provider)
                .unwrap();
            let (c, w, _) = b.into_messages();
            (c, w)
        })
        .await
    }

    /// Member `i` removes the leaves of `users` by a commit of its own.
    async fn remove(&mut self, i: usize, users: &[&str]) -> huddle_client::Result<Response> {
        let leaves: Vec<LeafNodeIndex> = users.iter().map(|u| self.leaf(u)).collect();
        self.commit(i, |g, raw| {
            let (c, w, _) = g.remove_members(&raw.provider, &raw.id, &leaves).unwrap();
            (c, w)
        })
        .await
    }

    /// Member `i` sends an application message with `aad`.
    async fn message(&mut self, i: usize, aad: &[u8]) -> huddle_client::Result<Response> {
        let (raw, g) = &mut self.members[i];
        g.set_aad(aad.to_vec());
        let m = g.create_message(&raw.provider, &raw.id, b"x").unwrap();
        raw.net
            .request(&Request::Message {
                group: self.id,
                message: bytes(&m),
            })
            .await
    }
}

/// A member can neither add, remove, change roles nor rename; an admin
/// can, but not remove or demote the owner.
#[tokio::test]
async fn a_member_without_the_capability_is_refused_and_an_admin_is_not() {
    let s = InProcess::start().await;
    let mut g = Group::new(&s, &["alice", "bob", "carol"]).await;
    let _dave = Raw::new(&s, "dave").await;
    // Bob, a member, adds dave.
    let kp = g.members[1].0.claim("dave").await;
    let add = |kp: KeyPackage| {
        move |g: &mut MlsGroup, raw: &Raw| {
            let (c, w, _) = g.add_members(&raw.provider, &raw.id, &[kp]).unwrap();
            (c, Some(w))
        }
    };
    let r = g.commit(1, add(kp)).await;
    refused(
        r,
        ErrorCode::Forbidden,
        "bob is a member in this group and may not add users",
    );
    // Removes carol, or alice.
    let r = g.remove(1, &["carol"]).await;
    refused(
        r,
        ErrorCode::Forbidden,
        "bob is a member in this group and may not remove others",
    );
    let r = g.remove(1, &["alice"]).await;
    refused(r, ErrorCode::Forbidden, "may not remove others");
    // Proposes alice's removal for someone else to commit.
    let alice_leaf = g.leaf("alice");
    let (raw, gb) = &mut g.members[1];
    let (p, _) = gb
        .propose_remove_member(&raw.provider, &raw.id, alice_leaf)
        .unwrap();
    let r = raw
        .net
        .request(&Request::Proposal {
            group: g.id,
            proposal: bytes(&p),
        })
        .await;
    refused(r, ErrorCode::Forbidden, "may not remove others");
    gb.clear_pending_proposals(raw.provider.storage()).unwrap();
    // Makes himself admin, or changes a setting.
    let mut p = g.policy();
    p.set_role("bob", Role::Admin);
    let r = g.set_policy(1, p).await;
    refused(
        r,
        ErrorCode::Forbidden,
        "bob is a member in this group and may not make bob an admin",
    );
    let mut p = g.policy();
    p.settings.members_may_add = true;
    let r = g.set_policy(1, p).await;
    refused(
        r,
        ErrorCode::Forbidden,
        "may not change the group's settings",
    );
    // Renames the group.
    let r = g.message(1, AAD_RENAME).await;
    refused(r, ErrorCode::Forbidden, "may not rename the group");
    // His ordinary message goes.
    g.message(1, b"").await.unwrap();
    // Alice, the owner, makes him admin: now he adds and removes.
    let mut p = g.policy();
    p.set_role("bob", Role::Admin);
    g.set_policy(0, p).await.unwrap();
    assert_eq!(g.policy().role("bob"), Role::Admin);
    let kp = g.members[1].0.claim("dave").await;
    g.commit(1, add(kp)).await.unwrap();
    g.message(1, AAD_RENAME).await.unwrap();
    // An admin removes a member (and the commit must drop no role: carol
    // has none) but not the owner, nor demotes her.
    g.remove(1, &["carol"]).await.unwrap();
    let r = g.remove(1, &["alice"]).await;
    refused(
        r,
        ErrorCode::Forbidden,
        "bob is an admin and may not remove alice, an owner",
    );
    let mut p = g.policy();
    p.set_role("alice", Role::Member);
    let r = g.set_policy(1, p).await;
    refused(r, ErrorCode::Forbidden, "may not make alice a member");
}

/// A commit that removes a user must drop its role with it, and a group
/// keeps at least one owner.
#[tokio::test]
async fn a_removed_users_role_goes_with_it_and_the_last_owner_stays() {
    let s = InProcess::start().await;
    let mut g = Group::new(&s, &["alice", "bob", "carol"]).await;
    let mut p = g.policy();
    p.set_role("bob", Role::Admin);
    g.set_policy(0, p).await.unwrap();
    // Removing bob while the policy still names him.
    let r = g.remove(0, &["bob"]).await;
    refused(
        r,
        ErrorCode::InvalidMessage,
        "a commit that removes a user must drop its role",
    );
    // The last owner steps down, or proposes its own leaving.
    let mut p = g.policy();
    p.set_role("alice", Role::Admin);
    let r = g.set_policy(0, p).await;
    refused(
        r,
        ErrorCode::InvalidMessage,
        "the group would lose its last owner",
    );
    let (raw, ga) = &mut g.members[0];
    let leave = ga.leave_group(&raw.provider, &raw.id).unwrap();
    let r = raw
        .net
        .request(&Request::Proposal {
            group: g.id,
            proposal: bytes(&leave),
        })
        .await;
    refused(
        r,
        ErrorCode::InvalidMessage,
        "the group would lose its last owner",
    );
    ga.clear_pending_proposals(raw.provider.storage()).unwrap();
    // After handing over, she may leave.
    let mut p = g.policy();
    p.set_role("carol", Role::Owner);
    g.set_policy(0, p).await.unwrap();
    let (raw, ga) = &mut g.members[0];
    let leave = ga.leave_group(&raw.provider, &raw.id).unwrap();
    raw.net
        .request(&Request::Proposal {
            group: g.id,
            proposal: bytes(&leave),
        })
        .await
        .unwrap();
}

/// In an announcement group only admins and owners post and upload; a
/// reader never does.
#[tokio::test]
async fn an_announcement_group_refuses_a_members_message_and_upload() {
    let s = InProcess::start().await;
    let mut g = Group::new(&s, &["alice", "bob", "carol"]).await;
    let mut p = g.policy();
    p.set_role("carol", Role::Reader);
    g.set_policy(0, p).await.unwrap();
    let r = g.message(2, b"").await;
    refused(
        r,
        ErrorCode::Forbidden,
        "carol is a reader in this group and may not send messages",
    );
    g.message(1, b"").await.unwrap();
    let mut p = g.policy();
    p.settings.announcement = true;
    g.set_policy(0, p).await.unwrap();
    let r = g.message(1, b"").await;
    refused(
        r,
        ErrorCode::Forbidden,
        "bob is a member in this group and may not send messages",
    );
    g.message(0, b"").await.unwrap();
    let upload = Request::BeginUpload(huddle_core::proto::UploadRequest {
        group: g.id,
        media: huddle_core::MediaId(rand_id()),
        total_len: 1000,
    });
    let r = g.members[1].0.net.open(&upload).await.map(|(_, _, r)| r);
    refused(r, ErrorCode::Forbidden, "may not upload media");
    // The group's name for joiners goes from anyone.
    g.message(1, huddle_core::policy::AAD_NAME).await.unwrap();
    // Bytes of the sender's own there: an ordinary message.
    let r = g.message(1, b"other").await;
    refused(r, ErrorCode::Forbidden, "may not send messages");
}

/// A new group must carry a policy that names its creator the only owner.
#[tokio::test]
async fn a_new_group_names_its_creator_the_only_owner() {
    let s = InProcess::start().await;
    let alice = Raw::new(&s, "alice").await;
    let create = |policy: Option<Policy>| {
        let gid = GroupId(rand_id());
        let mut b = MlsGroup::builder()
            .with_group_id(openmls::group::GroupId::from_slice(gid.as_bytes()))
            .ciphersuite(mls::CIPHERSUITE)
            .with_capabilities(mls::capabilities())
            .use_ratchet_tree_extension(false);
        if let Some(p) = policy {
            b = b.with_group_context_extensions(p.extensions());
        }
        let g = b
            .build(&alice.provider, &alice.id, alice.id.credential())
            .unwrap();
        let info = g
            .export_group_info(alice.provider.crypto(), &alice.id, false)
            .unwrap();
        Request::CreateGroup {
            group: gid,
            group_info: bytes(&info),
            ratchet_tree: openmls::prelude::tls_codec::Serialize::tls_serialize_detached(
                &g.export_ratchet_tree(),
            )
            .unwrap()
            .into(),
        }
    };
    let r = alice.net.request(&create(None)).await;
    refused(
        r,
        ErrorCode::InvalidMessage,
        "a new group must carry a policy",
    );
    let r = alice
        .net
        .request(&create(Some(Policy::new_group("bob"))))
        .await;
    refused(
        r,
        ErrorCode::InvalidMessage,
        "must name its creator, alice, the only owner",
    );
    let mut two = Policy::new_group("alice");
    two.set_role("mallory", Role::Admin);
    let r = alice.net.request(&create(Some(two))).await;
    refused(r, ErrorCode::InvalidMessage, "and nobody else");
    let r = alice
        .net
        .request(&create(Some(Policy::new_group("alice"))))
        .await;
    assert!(
        matches!(r, Ok(Response::Appended { seq: 0, epoch: 0 })),
        "{r:?}"
    );
}

/// `who` fetches what joining needs with the invite `secret` and posts an
/// external commit carrying the invite's proof; with `info` given, it
/// builds from that GroupInfo and tree instead of asking.
async fn join_with(
    who: &Raw,
    gid: GroupId,
    secret: &ed25519_dalek::SigningKey,
    info: Option<(Bytes, Bytes)>,
) -> huddle_client::Result<Response> {
    let (info, tree) = match info {
        Some(v) => v,
        None => {
            let proof = huddle_core::policy::info_proof(secret, gid.as_bytes(), &who.id.name);
            match who
                .net
                .request(&Request::InviteInfo {
                    group: gid,
                    proof: proof.into(),
                })
                .await?
            {
                Response::JoinInfo {
                    group_info, tree, ..
                } => (group_info, tree),
                other => panic!("{other:?}"),
            }
        }
    };
    let MlsMessageBodyIn::GroupInfo(vgi) = MlsMessageIn::tls_deserialize_exact(info.as_ref())
        .unwrap()
        .extract()
    else {
        panic!()
    };
    let epoch = vgi.epoch().as_u64();
    let aad = huddle_core::policy::join_aad(secret, gid.as_bytes(), epoch, &who.id.name);
    let (_, bundle) = MlsGroup::external_commit_builder()
        .with_aad(aad)
        .with_ratchet_tree(RatchetTreeIn::tls_deserialize_exact(tree.as_ref()).unwrap())
        .with_config(mls::join_config())
        .build_group(&who.provider, vgi, who.id.credential())
        .unwrap()
        .leaf_node_parameters(
            LeafNodeParameters::builder()
                .with_capabilities(mls::capabilities())
                .build(),
        )
        .load_psks(who.provider.storage())
        .unwrap()
        .build(who.provider.rand(), who.provider.crypto(), &who.id, |_| {
            true
        })
        .unwrap()
        .finalize(&who.provider)
        .unwrap();
    who.commit(gid, bytes(bundle.commit()), None).await
}

fn secret() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&rand_id().repeat(2).try_into().unwrap())
}

impl Group {
    /// The owner's GroupInfo and tree of the current epoch (what a
    /// holder of an invite would be handed).
    fn info(&self) -> (Bytes, Bytes) {
        let (raw, g) = &self.members[0];
        let info = g
            .export_group_info(raw.provider.crypto(), &raw.id, false)
            .unwrap();
        let tree = openmls::prelude::tls_codec::Serialize::tls_serialize_detached(
            &g.export_ratchet_tree(),
        )
        .unwrap();
        (bytes(&info), tree.into())
    }

    /// The owner publishes the current epoch's GroupInfo.
    async fn publish(&self) {
        let (info, _) = self.info();
        self.members[0]
            .0
            .net
            .request(&Request::PublishGroupInfo {
                group: self.id,
                group_info: info,
            })
            .await
            .unwrap();
    }

    /// Processes an accepted external commit (the newest log entry) on
    /// every member.
    async fn follow_join(&mut self) {
        let (raw, _) = &self.members[0];
        let Response::Log { entries, .. } = raw
            .net
            .request(&Request::FetchLog {
                group: self.id,
                after: 0,
                limit: 1000,
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        let last = entries.last().unwrap().data.clone();
        for (raw, g) in &mut self.members {
            let pm = MlsMessageIn::tls_deserialize_exact(last.as_ref())
                .unwrap()
                .try_into_protocol_message()
                .unwrap();
            let p = g.process_message(&raw.provider, pm).unwrap();
            let ProcessedMessageContent::StagedCommitMessage(st) = p.into_content() else {
                panic!()
            };
            g.merge_staged_commit(&raw.provider, *st).unwrap();
        }
    }
}

/// An invite for two admits two users and refuses the third; a member
/// cannot make one; a wrong secret, a revoked and an expired invite are
/// refused.
#[tokio::test]
async fn an_invite_admits_as_many_users_as_it_says_while_it_is_in_force() {
    let s = InProcess::start().await;
    let mut g = Group::new(&s, &["alice", "bob"]).await;
    let [carol, dave, erin, frank] = [
        Raw::new(&s, "carol").await,
        Raw::new(&s, "dave").await,
        Raw::new(&s, "erin").await,
        Raw::new(&s, "frank").await,
    ];
    let key = secret();
    let invite = huddle_core::policy::Invite {
        key: key.verifying_key().to_bytes(),
        by: "alice".into(),
        expires_ms: u64::MAX,
        max_uses: 2,
        approval: false,
    };
    // Bob, a member, may not add it.
    let mut p = g.policy();
    p.add_invite(invite.clone(), 0).unwrap();
    refused(
        g.set_policy(1, p.clone()).await,
        ErrorCode::Forbidden,
        "may not make or revoke invites",
    );
    // Without an invite in force, a stranger's external commit is a
    // non-member's post.
    refused(
        join_with(&carol, g.id, &key, Some(g.info())).await,
        ErrorCode::NotMember,
        "carol is not a member of group",
    );
    g.set_policy(0, p).await.unwrap();
    // A wrong secret.
    let wrong = secret();
    let r = join_with(&carol, g.id, &wrong, Some(g.info())).await;
    refused(
        r,
        ErrorCode::Forbidden,
        "the invite was revoked or never existed",
    );
    let proof = huddle_core::policy::info_proof(&wrong, g.id.as_bytes(), "carol");
    let r = carol
        .net
        .request(&Request::InviteInfo {
            group: g.id,
            proof: proof.into(),
        })
        .await;
    refused(
        r,
        ErrorCode::Forbidden,
        "the invite was revoked or never existed",
    );
    // Two joins, then the third is refused, asking and committing.
    g.publish().await;
    join_with(&carol, g.id, &key, None).await.unwrap();
    g.follow_join().await;
    g.publish().await;
    join_with(&dave, g.id, &key, None).await.unwrap();
    g.follow_join().await;
    g.publish().await;
    let r = join_with(&erin, g.id, &key, Some(g.info())).await;
    refused(
        r,
        ErrorCode::Forbidden,
        "the invite was used up (2 of 2 uses)",
    );
    let proof = huddle_core::policy::info_proof(&key, g.id.as_bytes(), "erin");
    let r = erin
        .net
        .request(&Request::InviteInfo {
            group: g.id,
            proof: proof.into(),
        })
        .await;
    refused(r, ErrorCode::Forbidden, "used up");
    let Response::GroupState { members, .. } = g.members[0]
        .0
        .net
        .request(&Request::GroupState { group: g.id })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(members, ["alice", "bob", "carol", "dave"]);
    // A revoked invite, and an expired one.
    let key2 = secret();
    let mut p = g.policy();
    p.revoke_invites(&hex::encode(invite.key));
    p.add_invite(
        huddle_core::policy::Invite {
            key: key2.verifying_key().to_bytes(),
            expires_ms: 1,
            max_uses: 0,
            ..invite.clone()
        },
        0,
    )
    .unwrap();
    g.set_policy(0, p).await.unwrap();
    let r = join_with(&frank, g.id, &key, Some(g.info())).await;
    refused(
        r,
        ErrorCode::Forbidden,
        "the invite was revoked or never existed",
    );
    let r = join_with(&frank, g.id, &key2, Some(g.info())).await;
    refused(r, ErrorCode::Forbidden, "the invite has expired");
}
