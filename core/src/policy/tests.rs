//! The policy's encoding and rules.

use super::*;

fn set(users: &[&str]) -> BTreeSet<String> {
    users.iter().map(|u| u.to_string()).collect()
}

fn policy() -> Policy {
    let mut p = Policy::new_group("alice");
    p.set_role("bob", Role::Admin);
    p.set_role("dave", Role::Reader);
    p
}

fn facts(committer: &str, after: &Policy) -> CommitFacts {
    let all = set(&["alice", "bob", "carol", "dave"]);
    CommitFacts {
        committer: committer.into(),
        users_before: all.clone(),
        users_after: all,
        after: Some(after.clone()),
        ..CommitFacts::default()
    }
}

#[test]
fn the_encoding_round_trips_and_is_the_only_one() {
    let mut p = policy();
    p.settings.max_members = 300;
    p.settings.announcement = true;
    let bytes = p.encode();
    assert_eq!(Policy::decode(&bytes).unwrap(), p);
    // Unsorted users.
    let wire = Wire {
        roles: vec![("bob".into(), Role::Admin), ("alice".into(), Role::Owner)],
        settings: Settings::default(),
        invites: vec![],
    };
    let mut b = vec![VERSION];
    b.extend(postcard::to_allocvec(&wire).unwrap());
    assert!(Policy::decode(&b).is_err());
    // A listed member.
    let wire = Wire {
        roles: vec![("alice".into(), Role::Member)],
        settings: Settings::default(),
        invites: vec![],
    };
    let mut b = vec![VERSION];
    b.extend(postcard::to_allocvec(&wire).unwrap());
    assert!(Policy::decode(&b).is_err());
    // Trailing bytes, another version, nothing.
    let mut b = bytes.clone();
    b.push(0);
    assert!(Policy::decode(&b).is_err());
    let mut b = bytes;
    b[0] = 2;
    assert!(Policy::decode(&b).is_err());
    assert!(Policy::decode(&[]).is_err());
    // The extension round-trips; without required capabilities it is
    // refused.
    let ext = policy().extensions();
    assert_eq!(Policy::from_extensions(&ext).unwrap(), Some(policy()));
    let bare = Extensions::single(Extension::Unknown(
        POLICY_EXTENSION,
        UnknownExtension(policy().encode()),
    ))
    .unwrap();
    assert!(Policy::from_extensions(&bare).is_err());
    assert_eq!(Policy::from_extensions(&Extensions::empty()).unwrap(), None);
}

#[test]
fn roles_decide_who_sends_adds_and_renames() {
    let mut p = policy();
    assert!(p.may("carol", Capability::Send));
    assert!(!p.may("dave", Capability::Send), "a reader");
    assert!(!p.may("carol", Capability::Add));
    assert!(p.may("bob", Capability::Add));
    assert!(!p.may("carol", Capability::Rename));
    p.settings.members_may_add = true;
    p.settings.members_may_rename = true;
    assert!(p.may("carol", Capability::Add));
    assert!(p.may("carol", Capability::Rename));
    assert!(!p.may("dave", Capability::Add), "a reader never adds");
    p.settings.announcement = true;
    assert!(!p.may("carol", Capability::Send));
    assert!(!p.may("carol", Capability::Upload));
    assert!(p.may("bob", Capability::Send));
    assert!(check_message(Some(&p), "carol", b"").is_err());
    assert!(check_message(Some(&p), "carol", AAD_NAME).is_ok());
    assert!(check_message(Some(&p), "carol", AAD_RENAME).is_ok());
    assert!(check_message(Some(&p), "dave", AAD_RENAME).is_err());
    // Other bytes are an ordinary message.
    assert!(check_message(Some(&p), "bob", b"other").is_ok());
    assert!(check_message(Some(&p), "carol", b"other").is_err());
    assert!(check_message(None, "dave", b"").is_ok());
}

#[test]
fn removals_need_rank_except_of_ones_own_devices() {
    let p = policy();
    let remove = |by: &str, user: &str| {
        let mut f = facts(by, &p.retain(&set(&["alice", "bob", "carol", "dave"])));
        f.removals = vec![(by.into(), user.into())];
        f.users_after.remove(user);
        f.after = Some(p.retain(&f.users_after));
        check_commit(Some(&p), &f)
    };
    assert!(
        remove("carol", "alice").is_err(),
        "a member removes the owner"
    );
    assert!(
        remove("carol", "dave").is_err(),
        "a member removes a reader"
    );
    assert!(remove("bob", "carol").is_ok(), "an admin removes a member");
    assert!(remove("bob", "dave").is_ok());
    assert!(
        remove("bob", "alice").is_err(),
        "an admin removes the owner"
    );
    assert!(remove("alice", "bob").is_ok(), "the owner removes an admin");
    assert!(remove("carol", "carol").is_ok(), "leaving");
    assert!(
        matches!(remove("alice", "alice"), Err(PolicyError::Invalid(_))),
        "the last owner leaves"
    );
    // A removed user's role must go with it.
    let mut f = facts("alice", &p);
    f.removals = vec![("alice".into(), "bob".into())];
    f.users_after.remove("bob");
    assert!(matches!(
        check_commit(Some(&p), &f),
        Err(PolicyError::Invalid(_))
    ));
}

#[test]
fn role_and_setting_changes_follow_the_rank_rules() {
    let p = policy();
    let change = |by: &str, user: &str, to: Role| {
        let mut after = p.clone();
        after.set_role(user, to);
        check_commit(Some(&p), &facts(by, &after))
    };
    assert!(
        change("carol", "carol", Role::Admin).is_err(),
        "a member promotes itself"
    );
    assert!(change("carol", "dave", Role::Member).is_err());
    assert!(
        change("bob", "carol", Role::Admin).is_ok(),
        "an admin makes an admin"
    );
    assert!(change("bob", "dave", Role::Member).is_ok());
    assert!(
        change("bob", "carol", Role::Owner).is_err(),
        "an admin makes an owner"
    );
    assert!(
        change("bob", "alice", Role::Member).is_err(),
        "an admin demotes the owner"
    );
    assert!(change("alice", "bob", Role::Owner).is_ok());
    assert!(
        matches!(
            change("alice", "alice", Role::Admin),
            Err(PolicyError::Invalid(_))
        ),
        "the last owner steps down"
    );
    let mut settings = p.clone();
    settings.settings.announcement = true;
    assert!(check_commit(Some(&p), &facts("carol", &settings)).is_err());
    assert!(check_commit(Some(&p), &facts("bob", &settings)).is_ok());
    // No policy after, or a policy for a group without one.
    let mut f = facts("alice", &p);
    f.after = None;
    assert!(check_commit(Some(&p), &f).is_err());
    assert!(check_commit(None, &facts("alice", &p)).is_err());
    f.after = None;
    assert!(check_commit(None, &f).is_ok());
    // Nobody joins such a group by itself.
    f.joins = true;
    assert!(check_commit(None, &f).is_err());
}

#[test]
fn adding_users_needs_the_capability_and_room() {
    let mut p = policy();
    let add = |p: &Policy, by: &str, user: &str| {
        let mut f = facts(by, p);
        f.added = vec![user.into()];
        f.users_after.insert(user.into());
        check_commit(Some(p), &f)
    };
    assert!(add(&p, "carol", "erin").is_err());
    assert!(add(&p, "bob", "erin").is_ok());
    // A device of a user already in the group.
    assert!(add(&p, "carol", "dave").is_ok());
    p.settings.max_members = 4;
    assert!(add(&p, "bob", "erin").is_err(), "a fifth user");
    // A new user given a role in the commit that adds it.
    let mut after = p.clone();
    after.settings.max_members = 0;
    after.set_role("erin", Role::Admin);
    let mut f = facts("bob", &after);
    f.added = vec!["erin".into()];
    f.users_after.insert("erin".into());
    assert!(check_commit(Some(&p), &f).is_ok(), "an admin adds an admin");
    // A member who may add may not add an admin.
    p.settings.members_may_add = true;
    after.settings.members_may_add = true;
    let mut f = facts("carol", &after);
    f.added = vec!["erin".into()];
    f.users_after.insert("erin".into());
    assert!(check_commit(Some(&p), &f).is_err());
    after.set_role("erin", Role::Member);
    after.settings.max_members = 4;
    let mut f = facts("carol", &after);
    f.added = vec!["erin".into()];
    f.users_after.insert("erin".into());
    p.settings.max_members = 5;
    after.settings.max_members = 5;
    f.after = Some(after.clone());
    assert!(check_commit(Some(&p), &f).is_ok());
}
