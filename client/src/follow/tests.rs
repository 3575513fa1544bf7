//! Tests of following a group: members with in-memory MLS state and a
//! log, no I/O.

use std::collections::HashMap;

use huddle_core::mls;
use openmls::prelude::tls_codec::Serialize as _;
use openmls_rust_crypto::OpenMlsRustCrypto;

use super::*;
use crate::identity::Identity;

const T0: u64 = 1_000_000;

/// Keys and media as a member's database would remember them, and the
/// device logs it fetched.
#[derive(Default)]
struct Remembered {
    keys: HashMap<String, Vec<u8>>,
    media: Vec<MediaInfo>,
    devices: HashMap<String, huddle_core::devices::DeviceSet>,
}

impl Memory for Remembered {
    fn keys_seen(&mut self, keys: &[(String, Vec<u8>)]) -> Result<Vec<String>> {
        let mut changed = Vec::new();
        for (name, key) in keys {
            match self.keys.get(name) {
                Some(k) if k != key => changed.push(name.clone()),
                Some(_) => {}
                None => {
                    self.keys.insert(name.clone(), key.clone());
                }
            }
        }
        Ok(changed)
    }

    fn media_announced(&mut self, _: &GroupId, info: &MediaInfo) -> Result<()> {
        self.media.push(info.clone());
        Ok(())
    }

    fn check_device(&mut self, principal: &str, key: &[u8]) -> Result<()> {
        let user = user_part(principal);
        match self.devices.get(user) {
            None => Err(ClientError::NeedDevices(user.to_owned())),
            Some(set) if crate::client::devices::certifies(set, principal, key) => Ok(()),
            Some(_) => Err(ClientError::DeviceRefused(principal.to_owned())),
        }
    }
}

/// One member: its keys, its in-memory MLS storage, its view of the
/// group and of the log.
struct Member {
    name: &'static str,
    id: Identity,
    p: OpenMlsRustCrypto,
    group: Option<MlsGroup>,
    row: GroupRow,
    memory: Remembered,
}

impl Member {
    fn new(name: &'static str) -> Self {
        Member {
            name,
            id: Identity::generate(name),
            p: OpenMlsRustCrypto::default(),
            group: None,
            row: GroupRow {
                name: "team".into(),
                state: GroupState::Active,
                cursor: 0,
                pending_commit: None,
                proposals_since_ms: None,
                releave: false,
            },
            memory: Remembered::default(),
        }
    }

    fn key_package(&self) -> KeyPackage {
        KeyPackage::builder()
            .leaf_node_capabilities(mls::capabilities())
            .build(mls::CIPHERSUITE, &self.p, &self.id, self.id.credential())
            .unwrap()
            .key_package()
            .clone()
    }

    fn g(&mut self) -> &mut MlsGroup {
        self.group.as_mut().unwrap()
    }

    /// The group, the provider and the signer, borrowed apart.
    fn parts(&mut self) -> (&mut MlsGroup, &OpenMlsRustCrypto, &Identity) {
        (self.group.as_mut().unwrap(), &self.p, &self.id)
    }

    /// Applies a log entry as the client does.
    fn apply(&mut self, e: &LogEntry) -> Result<Vec<Event>> {
        let id = GroupId([7; 16]);
        let group = self.group.as_mut().unwrap();
        self.row.cursor = e.seq;
        apply(
            &self.p,
            group,
            &mut self.row,
            &id,
            self.name,
            e,
            &mut self.memory,
        )
    }

    fn duty(&self, force: bool, now_ms: u64) -> Duty {
        committer_duty(
            self.group.as_ref().unwrap(),
            self.row.proposals_since_ms,
            force,
            now_ms,
        )
    }
}

/// The log: entries numbered from 1.
#[derive(Default)]
struct Log(Vec<LogEntry>);

impl Log {
    fn append(&mut self, kind: EntryKind, m: &MlsMessageOut) -> LogEntry {
        let seq = self.0.len() as u64 + 1;
        let e = LogEntry {
            seq,
            epoch: 0,
            kind,
            timestamp_ms: T0 + seq,
            data: m.tls_serialize_detached().unwrap().into(),
        };
        self.0.push(e.clone());
        e
    }
}

/// `names[0]` creates a group and adds the others in one commit; all
/// join by Welcome.
fn group(names: &[&'static str]) -> Vec<Member> {
    let mut ms: Vec<Member> = names.iter().map(|n| Member::new(n)).collect();
    let kps: Vec<KeyPackage> = ms[1..].iter().map(Member::key_package).collect();
    let creator = &mut ms[0];
    let mut g = MlsGroup::new(
        &creator.p,
        &creator.id,
        &mls::create_config(names[0]),
        creator.id.credential(),
    )
    .unwrap();
    let (_, welcome, _) = g.add_members(&creator.p, &creator.id, &kps).unwrap();
    g.merge_pending_commit(&creator.p).unwrap();
    let tree: RatchetTreeIn = g.export_ratchet_tree().into();
    creator.group = Some(g);
    let welcome = welcome.tls_serialize_detached().unwrap();
    for m in &mut ms[1..] {
        let MlsMessageBodyIn::Welcome(w) = MlsMessageIn::tls_deserialize_exact(&welcome)
            .unwrap()
            .extract()
        else {
            panic!("not a Welcome")
        };
        let g = StagedWelcome::new_from_welcome(&m.p, &mls::join_config(), w, Some(tree.clone()))
            .unwrap()
            .into_group(&m.p)
            .unwrap();
        m.group = Some(g);
    }
    ms
}

/// A DS that lets a commit add a device its user never linked (a key
/// of the DS's own under the name `bob/2`) cannot get it past a
/// member: the member stays in its epoch. The same device with the key
/// bob's log certifies is accepted and shown as bob's new device.
#[test]
fn a_device_that_its_users_log_does_not_certify_is_refused() {
    use huddle_core::devices::{DeviceChange, DeviceSet};
    let mut ms = group(&["alice", "bob", "carol"]);
    let bob_root = ms[1].id.public();
    let bob_key = ed25519_dalek::SigningKey::from_bytes(&ms[1].id.seed());
    // Bob links device 2: his log certifies its key.
    let phone = Member::new("bob/2");
    let mut log_of_bob = DeviceSet::new("bob", bob_root);
    let entry = log_of_bob.next_entry(
        1,
        &bob_key,
        DeviceChange::Add {
            device: 2,
            key: phone.id.public(),
        },
        T0,
    );
    log_of_bob.apply(&entry, 8).unwrap();
    // The DS's own "bob/2".
    let fake = Member::new("bob/2");
    let mut log = Log::default();
    let (alice, _) = ms.split_at_mut(1);
    let (g, p, s) = alice[0].parts();
    let (commit, _, _) = g
        .add_members_without_update(p, s, &[fake.key_package()])
        .unwrap();
    g.clear_pending_commit(p.storage()).unwrap();
    let forged = log.append(EntryKind::Commit, &commit);
    let carol = &mut ms[2];
    let epoch = carol.g().epoch().as_u64();
    // Without bob's log: fetch it first, nothing applied.
    assert!(matches!(
        carol.apply(&forged),
        Err(ClientError::NeedDevices(u)) if u == "bob"
    ));
    carol.memory.devices.insert("bob".into(), log_of_bob);
    assert!(matches!(
        carol.apply(&forged),
        Err(ClientError::DeviceRefused(p)) if p == "bob/2"
    ));
    assert_eq!(
        carol.g().epoch().as_u64(),
        epoch,
        "carol stays in her epoch"
    );
    // The real phone: accepted, and shown as a device of bob's.
    let (g, p, s) = ms[0].parts();
    let (commit, _, _) = g
        .add_members_without_update(p, s, &[phone.key_package()])
        .unwrap();
    g.merge_pending_commit(p).unwrap();
    let real = log.append(EntryKind::Commit, &commit);
    let events = ms[2].apply(&real).unwrap();
    assert_eq!(events[0].kind, "device_added");
    assert_eq!(events[0].members(), ["bob/2"]);
    assert_eq!(ms[2].g().epoch().as_u64(), epoch + 1);
}

#[test]
fn another_members_message_shows_as_text_from_them() {
    let mut ms = group(&["alice", "bob"]);
    let mut log = Log::default();
    let text = AppMessage::Text { text: "hi".into() }.encode();
    let (a, b) = ms.split_at_mut(1);
    let m = {
        let (g, p, id) = a[0].parts();
        g.create_message(p, id, &text)
    }
    .unwrap();
    let e = log.append(EntryKind::Application, &m);
    let events = b[0].apply(&e).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].kind.as_str(), events[0].from.as_str()),
        ("text", "alice")
    );
    assert_eq!(events[0].text(), Some("hi"));
    assert_eq!(events[0].seq, 1);
}

#[test]
fn an_add_shows_the_new_member_and_a_changed_key_is_reported_first() {
    let mut ms = group(&["alice", "bob"]);
    let carol = Member::new("carol");
    let mut log = Log::default();
    // Bob has seen another key for "carol" before.
    ms[1].memory.keys.insert("carol".into(), vec![1; 32]);
    let kp = carol.key_package();
    let (a, b) = ms.split_at_mut(1);
    let (commit, _, _) = {
        let (g, p, id) = a[0].parts();
        g.add_members(p, id, &[kp])
    }
    .unwrap();
    {
        let (g, p, _) = a[0].parts();
        g.merge_pending_commit(p)
    }
    .unwrap();
    let e = log.append(EntryKind::Commit, &commit);
    let events = b[0].apply(&e).unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["key_changed", "member_added"]);
    assert_eq!(events[1].members(), &["carol".to_string()][..]);
    assert_eq!(events[1].epoch(), Some(2));
    assert_eq!(b[0].g().epoch().as_u64(), 2);
    assert_eq!(b[0].row.state, GroupState::Active);
}

#[test]
fn a_removal_of_this_member_ends_its_membership() {
    let mut ms = group(&["alice", "bob", "carol"]);
    let mut log = Log::default();
    let (a, rest) = ms.split_at_mut(1);
    let bob_leaf = rest[0].g().own_leaf_index();
    let (commit, _, _) = {
        let (g, p, id) = a[0].parts();
        g.remove_members(p, id, &[bob_leaf])
    }
    .unwrap();
    {
        let (g, p, _) = a[0].parts();
        g.merge_pending_commit(p)
    }
    .unwrap();
    let e = log.append(EntryKind::Commit, &commit);
    let bob_events = rest[0].apply(&e).unwrap();
    assert_eq!(rest[0].row.state, GroupState::Removed);
    assert_eq!(bob_events[0].kind, "member_removed");
    assert_eq!(bob_events[0].from, "alice");
    let carol_events = rest[1].apply(&e).unwrap();
    assert_eq!(carol_events[0].members(), &["bob".to_string()][..]);
    assert_eq!(rest[1].row.state, GroupState::Active);
}

#[test]
fn a_leave_is_committed_by_the_designated_member_at_once_and_by_others_after_the_grace() {
    let mut ms = group(&["alice", "bob", "carol"]);
    let mut log = Log::default();
    let carol = &mut ms[2];
    let leave = {
        let (g, p, id) = carol.parts();
        g.leave_group(p, id)
    }
    .unwrap();
    let e = log.append(EntryKind::Proposal, &leave);
    for m in &mut ms[..2] {
        assert!(m.apply(&e).unwrap().is_empty(), "a proposal shows nothing");
        assert_eq!(m.row.proposals_since_ms, Some(e.timestamp_ms));
    }
    let appended = e.timestamp_ms;
    let grace = PROPOSAL_GRACE.as_millis() as u64;
    // Alice has the lowest leaf: hers to commit, at once.
    assert_eq!(ms[0].duty(false, appended), Duty::Commit);
    // Bob waits for her, until the grace has passed or he is told to.
    assert_eq!(ms[1].duty(false, appended + grace - 1), Duty::Wait);
    assert_eq!(ms[1].duty(false, appended + grace), Duty::Commit);
    assert_eq!(ms[1].duty(true, appended), Duty::Commit);
    // Carol never commits her own removal.
    assert_eq!(ms[2].duty(true, appended + grace), Duty::Wait);

    let alice = &mut ms[0];
    let (commit, _, _) = {
        let (g, p, id) = alice.parts();
        g.commit_to_pending_proposals(p, id)
    }
    .unwrap();
    {
        let (g, p, _) = alice.parts();
        g.merge_pending_commit(p)
    }
    .unwrap();
    let e = log.append(EntryKind::Commit, &commit);
    let bob_events = ms[1].apply(&e).unwrap();
    assert_eq!(bob_events[0].kind, "left");
    assert_eq!(bob_events[0].from, "carol");
    assert_eq!(ms[1].row.proposals_since_ms, None);
    assert_eq!(ms[1].duty(false, appended + grace), Duty::Nothing);
    ms[2].row.state = GroupState::Leaving;
    ms[2].apply(&e).unwrap();
    assert_eq!(ms[2].row.state, GroupState::Left);
}

#[test]
fn a_commit_that_leaves_out_this_members_leave_makes_it_void() {
    let mut ms = group(&["alice", "bob"]);
    let mut log = Log::default();
    // Bob asked to leave; Alice commits a key update without it.
    ms[1].row.state = GroupState::Leaving;
    let alice = &mut ms[0];
    let bundle = {
        let (g, p, id) = alice.parts();
        g.self_update(p, id, LeafNodeParameters::default())
    }
    .unwrap();
    let (commit, _, _) = bundle.into_messages();
    {
        let (g, p, _) = alice.parts();
        g.merge_pending_commit(p)
    }
    .unwrap();
    let e = log.append(EntryKind::Commit, &commit);
    ms[1].apply(&e).unwrap();
    assert_eq!(ms[1].row.state, GroupState::Active);
    assert!(ms[1].row.releave, "the leave must be asked for again");
}

#[test]
fn another_members_commit_voids_this_devices_pending_one() {
    let mut ms = group(&["alice", "bob"]);
    let mut log = Log::default();
    let bob = &mut ms[1];
    let (own, _, _) = {
        let (g, p, id) = bob.parts();
        g.self_update(p, id, LeafNodeParameters::default())
    }
    .unwrap()
    .into_messages();
    bob.row.pending_commit = Some(own.tls_serialize_detached().unwrap());
    let alice = &mut ms[0];
    let (commit, _, _) = {
        let (g, p, id) = alice.parts();
        g.self_update(p, id, LeafNodeParameters::default())
    }
    .unwrap()
    .into_messages();
    {
        let (g, p, _) = alice.parts();
        g.merge_pending_commit(p)
    }
    .unwrap();
    let e = log.append(EntryKind::Commit, &commit);
    ms[1].apply(&e).unwrap();
    assert_eq!(ms[1].row.pending_commit, None);
    assert!(ms[1].g().pending_commit().is_none());
    assert_eq!(ms[1].g().epoch(), ms[0].g().epoch());
}

#[test]
fn an_entry_that_does_not_parse_is_an_error_and_changes_nothing() {
    let mut ms = group(&["alice", "bob"]);
    let e = LogEntry {
        seq: 1,
        epoch: 1,
        kind: EntryKind::Commit,
        timestamp_ms: T0,
        data: vec![0xff; 8].into(),
    };
    assert!(ms[1].apply(&e).is_err());
    assert_eq!(ms[1].g().epoch().as_u64(), 1);
    assert_eq!(ms[1].row.state, GroupState::Active);
}

fn ds(epoch: u64, head: u64, info: Option<u64>) -> Option<DsGroupState> {
    Some(DsGroupState {
        epoch,
        head,
        group_info_epoch: info,
    })
}

#[test]
fn fork_signs_name_members_with_another_authenticator_and_a_device_left_behind() {
    let mine = [1; 32];
    let published = vec![
        ("me".to_string(), [9; 32]),
        ("zoe".to_string(), [2; 32]),
        ("bob".to_string(), mine),
    ];
    // Our own entry is never a sign, whatever it says; Zoe's is.
    let s = fork_signs("me", 4, &mine, published.clone(), 10, ds(4, 10, Some(4)));
    assert_eq!(s.differ, ["zoe"]);
    assert!(!s.behind && !s.info_missing);
    // The whole log read and still at another epoch: behind.
    let s = fork_signs("me", 4, &mine, vec![], 10, ds(5, 10, Some(5)));
    assert_eq!(s.differ, ["the group (epoch 5)"]);
    assert!(s.behind);
    // Not all of the log read yet: no sign.
    let s = fork_signs("me", 4, &mine, vec![], 9, ds(5, 10, Some(5)));
    assert_eq!(s, ForkSigns::default());
    // All agrees, but the DS keeps no GroupInfo for this epoch.
    let s = fork_signs("me", 4, &mine, vec![], 10, ds(4, 10, Some(3)));
    assert!(s.info_missing && s.differ.is_empty());
}

/// A member's commit of the group's extensions with `policy`.
fn policy_commit(m: &mut Member, policy: &Policy) -> MlsMessageOut {
    let (g, p, s) = m.parts();
    let bundle = g
        .commit_builder()
        .propose_group_context_extensions(policy.extensions())
        .unwrap()
        .load_psks(p.storage())
        .unwrap()
        .build(p.rand(), p.crypto(), s, |_| true)
        .unwrap()
        .stage_commit(p)
        .unwrap();
    bundle.into_messages().0
}

/// A member's application message with `aad`.
fn message_with(m: &mut Member, msg: &AppMessage, aad: &[u8]) -> MlsMessageOut {
    let (g, p, s) = m.parts();
    g.set_aad(aad.to_vec());
    g.create_message(p, s, &msg.encode()).unwrap()
}

/// A DS that lets through what the group's policy forbids (a member
/// removing another, making itself admin, renaming) changes nothing: each
/// member refuses it and stays in its epoch. What the owner commits is
/// applied and shown.
#[test]
fn what_the_policy_forbids_is_refused_by_the_members_whatever_the_ds_forwards() {
    let mut ms = group(&["alice", "bob", "carol"]);
    let mut log = Log::default();
    let epoch = ms[2].g().epoch().as_u64();
    // Bob, a member, removes carol.
    let carol_leaf = ms[2].g().own_leaf_index();
    let (c, _, _) = {
        let (g, p, s) = ms[1].parts();
        let r = g.remove_members(p, s, &[carol_leaf]).unwrap();
        g.clear_pending_commit(p.storage()).unwrap();
        r
    };
    let e = log.append(EntryKind::Commit, &c);
    for i in [0, 2] {
        assert!(
            matches!(ms[i].apply(&e), Err(ClientError::Policy(m)) if m.contains("may not remove others")),
            "member {i}"
        );
        assert_eq!(ms[i].g().epoch().as_u64(), epoch);
    }
    // Bob adds dave.
    let dave = Member::new("dave");
    let (c, _, _) = {
        let (g, p, s) = ms[1].parts();
        let r = g.add_members(p, s, &[dave.key_package()]).unwrap();
        g.clear_pending_commit(p.storage()).unwrap();
        r
    };
    let e = log.append(EntryKind::Commit, &c);
    assert!(
        matches!(ms[2].apply(&e), Err(ClientError::Policy(m)) if m.contains("may not add users"))
    );
    assert_eq!(ms[2].g().epoch().as_u64(), epoch);
    // Bob makes himself admin.
    let mut p = policy_of(ms[1].g()).unwrap().unwrap();
    p.set_role("bob", Role::Admin);
    let c = policy_commit(&mut ms[1], &p);
    {
        let (g, p, _) = ms[1].parts();
        g.clear_pending_commit(p.storage()).unwrap();
    }
    let e = log.append(EntryKind::Commit, &c);
    assert!(
        matches!(ms[0].apply(&e), Err(ClientError::Policy(m)) if m.contains("may not make bob an admin"))
    );
    assert_eq!(ms[0].g().epoch().as_u64(), epoch);
    // Bob renames the group; and the same content under another kind.
    let rename = AppMessage::Rename {
        name: "bob's".into(),
    };
    for aad in [huddle_core::policy::AAD_RENAME, b"".as_slice()] {
        let m = message_with(&mut ms[1], &rename, aad);
        let e = log.append(EntryKind::Application, &m);
        assert!(matches!(ms[2].apply(&e), Err(ClientError::Policy(_))));
        assert_eq!(ms[2].row.name, "team");
    }
    // Alice, the owner, makes bob admin: applied, and shown.
    let mut p = policy_of(ms[0].g()).unwrap().unwrap();
    p.set_role("bob", Role::Admin);
    let c = policy_commit(&mut ms[0], &p);
    {
        let (g, p, _) = ms[0].parts();
        g.merge_pending_commit(p).unwrap();
    }
    let e = log.append(EntryKind::Commit, &c);
    for i in [1, 2] {
        let events = ms[i].apply(&e).unwrap();
        assert_eq!(events[0].kind, "role_changed");
        assert_eq!(events[0].members(), ["bob"]);
        assert_eq!(ms[i].g().epoch().as_u64(), epoch + 1);
    }
    // Now his rename goes.
    let m = message_with(&mut ms[1], &rename, huddle_core::policy::AAD_RENAME);
    let e = log.append(EntryKind::Application, &m);
    let events = ms[2].apply(&e).unwrap();
    assert_eq!(events[0].kind, "renamed");
    assert_eq!(ms[2].row.name, "bob's");
}

/// A reader's message, and a member's in an announcement group, are
/// dropped by the members; the last owner's leave proposal is refused.
#[test]
fn readers_and_the_last_owner_are_held_to_the_policy_by_the_members() {
    let mut ms = group(&["alice", "bob", "carol"]);
    let mut log = Log::default();
    let mut p = policy_of(ms[0].g()).unwrap().unwrap();
    p.set_role("carol", Role::Reader);
    p.settings.announcement = true;
    let c = policy_commit(&mut ms[0], &p);
    {
        let (g, p, _) = ms[0].parts();
        g.merge_pending_commit(p).unwrap();
    }
    let e = log.append(EntryKind::Commit, &c);
    let events = ms[1].apply(&e).unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["role_changed", "policy_changed"]);
    ms[2].apply(&e).unwrap();
    let text = AppMessage::Text { text: "hi".into() };
    for i in [1, 2] {
        let m = message_with(&mut ms[i], &text, b"");
        let e = log.append(EntryKind::Application, &m);
        let other = if i == 1 { 2 } else { 1 };
        assert!(
            matches!(ms[other].apply(&e), Err(ClientError::Policy(m)) if m.contains("may not send messages"))
        );
        assert!(matches!(ms[0].apply(&e), Err(ClientError::Policy(_))));
    }
    let m = message_with(&mut ms[0], &text, b"");
    let e = log.append(EntryKind::Application, &m);
    assert_eq!(ms[1].apply(&e).unwrap()[0].kind, "text");
    // Alice, the only owner, proposes to leave.
    let leave = {
        let (g, p, s) = ms[0].parts();
        g.leave_group(p, s).unwrap()
    };
    let e = log.append(EntryKind::Proposal, &leave);
    assert!(matches!(ms[1].apply(&e), Err(ClientError::Policy(m)) if m.contains("last owner")));
    assert!(ms[1].g().pending_proposals().next().is_none());
}

/// `joiner`'s external commit into `owner`'s group, with `aad`.
fn external_commit(owner: &mut Member, joiner: &mut Member, aad: Vec<u8>) -> MlsMessageOut {
    let (g, p, s) = owner.parts();
    let info = g.export_group_info(p.crypto(), s, false).unwrap();
    let tree: RatchetTreeIn = g.export_ratchet_tree().into();
    let bytes = info.tls_serialize_detached().unwrap();
    let MlsMessageBodyIn::GroupInfo(vgi) = MlsMessageIn::tls_deserialize_exact(&bytes)
        .unwrap()
        .extract()
    else {
        panic!()
    };
    let (group, bundle) = MlsGroup::external_commit_builder()
        .with_aad(aad)
        .with_ratchet_tree(tree)
        .with_config(mls::join_config())
        .build_group(&joiner.p, vgi, joiner.id.credential())
        .unwrap()
        .leaf_node_parameters(
            LeafNodeParameters::builder()
                .with_capabilities(mls::capabilities())
                .build(),
        )
        .load_psks(joiner.p.storage())
        .unwrap()
        .build(joiner.p.rand(), joiner.p.crypto(), &joiner.id, |_| true)
        .unwrap()
        .finalize(&joiner.p)
        .unwrap();
    joiner.group = Some(group);
    bundle.commit().clone()
}

/// A DS that lets a stranger in by external commit gets nowhere: without
/// an invite of the group's policy in its authenticated data the members
/// refuse the join; with one, they show it as a join by that invite.
#[test]
fn a_join_by_external_commit_needs_an_invite_the_members_can_check() {
    let mut ms = group(&["alice", "bob"]);
    let mut log = Log::default();
    let gid = GroupId([7; 16]);
    let mut carol = Member::new("carol");
    let epoch = ms[1].g().epoch().as_u64();
    let c = external_commit(&mut ms[0], &mut carol, Vec::new());
    let e = log.append(EntryKind::Commit, &c);
    assert!(
        matches!(ms[1].apply(&e), Err(ClientError::Policy(m)) if m.contains("needs an invite"))
    );
    assert_eq!(ms[1].g().epoch().as_u64(), epoch);
    // The owner makes an invite; carol joins with its secret.
    let secret = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let mut p = policy_of(ms[0].g()).unwrap().unwrap();
    p.add_invite(
        huddle_core::policy::Invite {
            key: secret.verifying_key().to_bytes(),
            by: "alice".into(),
            expires_ms: T0 + 1000,
            max_uses: 0,
            approval: false,
        },
        0,
    )
    .unwrap();
    let c = policy_commit(&mut ms[0], &p);
    {
        let (g, p, _) = ms[0].parts();
        g.merge_pending_commit(p).unwrap();
    }
    let e = log.append(EntryKind::Commit, &c);
    ms[1].apply(&e).unwrap();
    // A proof made with another secret, or for another joiner, is refused.
    let epoch = ms[1].g().epoch().as_u64();
    let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
    for aad in [
        huddle_core::policy::join_aad(&other, gid.as_bytes(), epoch, "carol"),
        huddle_core::policy::join_aad(&secret, gid.as_bytes(), epoch, "dave"),
    ] {
        let mut carol = Member::new("carol");
        let c = external_commit(&mut ms[0], &mut carol, aad);
        let e = log.append(EntryKind::Commit, &c);
        assert!(matches!(ms[1].apply(&e), Err(ClientError::Policy(_))));
        assert_eq!(ms[1].g().epoch().as_u64(), epoch);
    }
    let mut carol = Member::new("carol");
    let aad = huddle_core::policy::join_aad(&secret, gid.as_bytes(), epoch, "carol");
    let c = external_commit(&mut ms[0], &mut carol, aad);
    let e = log.append(EntryKind::Commit, &c);
    let events = ms[1].apply(&e).unwrap();
    assert_eq!(events[0].kind, "joined_by_invite");
    assert_eq!(events[0].members(), ["carol"]);
    assert_eq!(ms[1].g().epoch().as_u64(), epoch + 1);
}
