//! The README walkthrough, driven through the `huddle` binary exactly as a
//! user types it (server in-process on 127.0.0.1:0).
#![allow(clippy::unwrap_used)]
mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough() {
    let server = TestServer::start().await;
    let cert = server.cert().to_str().unwrap().to_owned();
    let home = |n: &str| server.dir.path().join(n);
    let (alice, bob, carol) = (home("alice"), home("bob"), home("carol"));
    let addr = server.addr.clone();
    // Blocking child processes: run them off the runtime's worker.
    tokio::task::spawn_blocking(move || {
        for (h, n) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
            let out = ok(
                h,
                &["register", n, "--server", &addr, "--server-cert", &cert],
            );
            assert!(out.contains(&format!("registered {n}")), "{out}");
        }
        let who = json_lines(&ok(&alice, &["--json", "whoami"]));
        assert_eq!(who[0]["name"], "alice");
        let st = json_lines(&ok(&bob, &["--json", "status"]));
        assert!(st[0]["key_packages"].as_u64().unwrap() >= 20);

        let created = json_lines(&ok(&alice, &["--json", "group", "create", "friends"]));
        assert_eq!(created[0]["name"], "friends");
        let gid = created[0]["group"].as_str().unwrap().to_owned();
        ok(&alice, &["group", "add", "friends", "bob", "carol"]);
        ok(&alice, &["send", "friends", "hello both"]);

        let ev = json_lines(&ok(&bob, &["--json", "sync"]));
        assert_eq!(ev[0]["type"], "joined");
        assert_eq!(ev[0]["group"], gid.as_str());
        assert_eq!(ev[0]["from"], "alice");
        // The joined event names the group (its name arrives in the log).
        assert_eq!(ev[0]["group_name"], "friends");
        let text: Vec<_> = ev.iter().filter(|e| e["type"] == "text").collect();
        assert_eq!(text.len(), 1);
        assert_eq!(text[0]["text"], "hello both");
        assert_eq!(text[0]["from"], "alice");
        // Human output too.
        let out = ok(&carol, &["sync"]);
        assert!(out.contains("[friends] alice: hello both"), "{out}");

        ok(&bob, &["send", &gid, "hi!"]);
        let members = json_lines(&ok(&alice, &["--json", "group", "members", "friends"]));
        assert_eq!(
            members[0]["members"],
            serde_json::json!(["alice", "bob", "carol"])
        );
        assert_eq!(members[0]["group"], gid.as_str());
        assert_eq!(members[0]["name"], "friends");

        let removed = json_lines(&ok(
            &alice,
            &["--json", "group", "remove", "friends", "carol"],
        ));
        assert_eq!(removed[0]["type"], "member_removed");
        assert_eq!(removed[0]["members"], serde_json::json!(["carol"]));
        ok(&alice, &["send", "friends", "carol cannot read this"]);

        let ev = json_lines(&ok(&carol, &["--json", "sync"]));
        assert!(ev.iter().any(|e| e["type"] == "text" && e["text"] == "hi!"));
        assert!(ev.iter().any(|e| e["type"] == "member_removed"));
        assert!(!ev.iter().any(|e| e["text"] == "carol cannot read this"));
        // Carol can no longer send.
        let (success, _, stderr) = huddle(&carol, &["send", "friends", "hello?"]);
        assert!(!success);
        assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");

        let ev = json_lines(&ok(&bob, &["--json", "sync"]));
        assert!(ev.iter().any(|e| e["text"] == "carol cannot read this"));
        let history = json_lines(&ok(&bob, &["--json", "messages", "friends"]));
        let texts: Vec<_> = history
            .iter()
            .filter(|e| e["type"] == "text")
            .map(|e| e["text"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(texts, vec!["hello both", "hi!", "carol cannot read this"]);
        let list = json_lines(&ok(&bob, &["--json", "group", "list"]));
        assert_eq!(list[0]["members"], 2);
    })
    .await
    .unwrap();
}

#[test]
fn errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path().join("nobody");
    for args in [
        &["whoami"][..],
        &["status"],
        &["send", "g", "x"],
        &["group", "list"],
    ] {
        let (success, stdout, stderr) = huddle(&h, args);
        assert!(!success, "{args:?}");
        assert!(stdout.is_empty());
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains("not registered"), "{stderr}");
    }
    // An unreachable server.
    let (success, _, stderr) = huddle(
        &h,
        &[
            "register",
            "zed",
            "--server",
            "127.0.0.1:9",
            "--server-cert",
            "/nonexistent.pem",
        ],
    );
    assert!(!success);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// Linking a laptop as a script playing the user does it: `link --json`
/// prints the code first and waits; `device approve CODE` on the phone;
/// `link` exits 0 once the laptop is in the user's groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_linked_approved_listed_and_revoked_from_the_command_line() {
    use std::io::BufRead as _;
    let server = TestServer::start().await;
    let cert = server.cert().to_str().unwrap().to_owned();
    let home = |n: &str| server.dir.path().join(n);
    let (phone, laptop, zed) = (home("phone"), home("laptop"), home("zed"));
    let addr = server.addr.clone();
    tokio::task::spawn_blocking(move || {
        ok(
            &phone,
            &["register", "yan", "--server", &addr, "--server-cert", &cert],
        );
        ok(
            &zed,
            &["register", "zed", "--server", &addr, "--server-cert", &cert],
        );
        ok(&zed, &["group", "create", "pals"]);
        ok(&zed, &["group", "add", "pals", "yan"]);
        ok(&phone, &["sync"]);
        let mut link = std::process::Command::new(env!("CARGO_BIN_EXE_huddle"))
            .arg("--home")
            .arg(&laptop)
            .args([
                "--json",
                "link",
                "yan",
                "--server",
                &addr,
                "--server-cert",
                &cert,
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(link.stdout.take().unwrap()).lines();
        let first: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        let code = first["code"].as_str().unwrap().to_owned();
        let approved = json_lines(&ok(&phone, &["--json", "device", "approve", &code]));
        assert_eq!(approved[0]["approved"], 2);
        assert_eq!(approved[0]["fingerprint"], first["fingerprint"]);
        let rest: Vec<String> = lines.map(Result::unwrap).collect();
        assert!(link.wait().unwrap().success(), "{rest:?}");
        let last: serde_json::Value = serde_json::from_str(rest.last().unwrap()).unwrap();
        assert_eq!(
            (last["linked"].as_str(), last["groups"].as_u64()),
            (Some("yan"), Some(1))
        );

        let listed = json_lines(&ok(&phone, &["--json", "device", "list"]));
        assert_eq!(listed.len(), 2);
        for d in &listed {
            assert!(d["device"].is_u64() && d["fingerprint"].is_string(), "{d}");
            assert!(d["last_seen"].is_u64(), "{d}");
        }
        let ev = json_lines(&ok(&zed, &["--json", "sync"]));
        assert!(ev.iter().any(|e| e["type"] == "device_added"), "{ev:?}");
        let members = json_lines(&ok(&zed, &["--json", "group", "members", "pals"]));
        assert_eq!(members[0]["devices"]["yan"], 2);
        ok(&zed, &["send", "pals", "hi laptop"]);
        let ev = json_lines(&ok(&laptop, &["--json", "sync"]));
        assert!(ev.iter().any(|e| e["text"] == "hi laptop"), "{ev:?}");

        // Revoked from the phone: the laptop is told, in one line.
        ok(&phone, &["device", "remove", "2"]);
        let (success, _, err) = huddle(&laptop, &["sync"]);
        assert!(!success);
        assert!(err.contains("revoked"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    })
    .await
    .unwrap();
}

/// Roles, settings and invites as a script drives them: `group role`,
/// `group policy --set`, `group members` with roles, `group invite` with
/// `--uses` (JSON `{"invite": TOKEN}`), `group join TOKEN`, `--revoke`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_settings_and_invites_from_the_command_line() {
    let server = TestServer::start().await;
    let cert = server.cert().to_str().unwrap().to_owned();
    let home = |n: &str| server.dir.path().join(n);
    let names = ["alice", "bob", "carol", "dave", "erin", "frank"];
    let homes: Vec<_> = names.iter().map(|n| home(n)).collect();
    let addr = server.addr.clone();
    tokio::task::spawn_blocking(move || {
        for (h, n) in homes.iter().zip(names) {
            ok(
                h,
                &["register", n, "--server", &addr, "--server-cert", &cert],
            );
        }
        let [alice, bob, carol, dave, erin, frank] = [0, 1, 2, 3, 4, 5].map(|i| &homes[i]);
        ok(alice, &["group", "create", "club"]);
        ok(alice, &["group", "add", "club", "bob"]);
        ok(bob, &["sync"]);
        // Bob may not make an invite, nor promote himself: one clear line.
        for args in [
            &["group", "invite", "club"][..],
            &["group", "role", "club", "bob", "admin"][..],
        ] {
            let (success, _, stderr) = huddle(bob, args);
            assert!(!success, "{args:?}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(
                stderr.contains("bob is a member in this group and may not"),
                "{stderr}"
            );
        }
        let made = json_lines(&ok(
            alice,
            &["--json", "group", "role", "club", "bob", "admin"],
        ));
        assert_eq!(made[0]["type"], "role_changed");
        assert_eq!(made[0]["role"], "admin");
        let members = json_lines(&ok(alice, &["--json", "group", "members", "club"]));
        assert_eq!(
            members[0]["roles"],
            serde_json::json!({"alice": "owner", "bob": "admin"})
        );
        let out = ok(alice, &["group", "members", "club"]);
        assert!(
            out.contains("alice (owner)") && out.contains("bob (admin)"),
            "{out}"
        );
        // An invite for two: carol and dave join, erin is refused.
        let inv = json_lines(&ok(
            alice,
            &[
                "--json",
                "group",
                "invite",
                "club",
                "--uses",
                "2",
                "--expires",
                "1d",
            ],
        ));
        let token = inv[0]["invite"].as_str().unwrap().to_owned();
        assert!(token.starts_with("huddle://join/"), "{token}");
        for h in [carol, dave] {
            let ev = json_lines(&ok(h, &["--json", "group", "join", &token]));
            assert_eq!(ev[0]["type"], "joined", "{ev:?}");
            assert_eq!(ev[0]["from"], "alice", "added by the invite's maker");
        }
        let (success, _, stderr) = huddle(erin, &["group", "join", &token]);
        assert!(!success);
        assert!(stderr.contains("used up"), "{stderr}");
        let ev = json_lines(&ok(bob, &["--json", "sync"]));
        let joins: Vec<_> = ev
            .iter()
            .filter(|e| e["type"] == "joined_by_invite")
            .collect();
        assert_eq!(joins.len(), 2, "{ev:?}");
        assert_eq!(joins[0]["members"], serde_json::json!(["carol"]));
        // The joiners learn the group's name from a member.
        ok(alice, &["sync"]);
        let ev = json_lines(&ok(carol, &["--json", "sync"]));
        assert!(
            !ev.iter().any(|e| e["type"] == "joined"),
            "reported once: {ev:?}"
        );
        let list = json_lines(&ok(carol, &["--json", "group", "list"]));
        assert_eq!(list[0]["name"], "club", "{ev:?}");
        // Revoked: erin is refused with another invite revoked too.
        let inv = json_lines(&ok(alice, &["--json", "group", "invite", "club"]));
        let token = inv[0]["invite"].as_str().unwrap().to_owned();
        let id = inv[0]["id"].as_str().unwrap().to_owned();
        let listed = json_lines(&ok(bob, &["--json", "group", "invite", "club", "--list"]));
        assert!(
            listed.iter().any(|i| i["invite"] == id.as_str()),
            "{listed:?}"
        );
        ok(bob, &["group", "invite", "club", "--revoke", &id]);
        let (success, _, stderr) = huddle(erin, &["group", "join", &token]);
        assert!(!success);
        assert!(stderr.contains("revoked"), "{stderr}");
        // An invite that needs approval: erin asks, bob (an admin) sees
        // her waiting and adds her; one waiting is all it takes.
        let inv = json_lines(&ok(
            alice,
            &[
                "--json",
                "group",
                "invite",
                "club",
                "--approval",
                "--uses",
                "1",
            ],
        ));
        let token = inv[0]["invite"].as_str().unwrap().to_owned();
        let asked = json_lines(&ok(erin, &["--json", "group", "join", &token]));
        assert_eq!(asked[0]["type"], "join_requested");
        let (success, _, stderr) = huddle(frank, &["group", "join", &token]);
        assert!(!success);
        assert!(stderr.contains("used up"), "{stderr}");
        let (success, _, stderr) = huddle(carol, &["group", "requests", "club"]);
        assert!(!success, "a member may not see who waits");
        assert!(stderr.contains("may not add users"), "{stderr}");
        let waiting = json_lines(&ok(bob, &["--json", "group", "requests", "club"]));
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0]["user"], "erin");
        let added = json_lines(&ok(bob, &["--json", "group", "accept", "club", "erin"]));
        assert_eq!(added[0]["type"], "member_added");
        let ev = json_lines(&ok(erin, &["--json", "sync"]));
        assert_eq!(ev[0]["type"], "joined", "{ev:?}");
        assert!(json_lines(&ok(bob, &["--json", "group", "requests", "club"])).is_empty());
        // Frank may ask now (erin no longer waits), and is turned down.
        ok(frank, &["group", "join", &token]);
        ok(bob, &["group", "decline", "club", "frank"]);
        assert!(json_lines(&ok(bob, &["--json", "group", "requests", "club"])).is_empty());
        // An announcement group: carol's message is refused.
        ok(
            alice,
            &["group", "policy", "club", "--set", "announcement=on"],
        );
        ok(carol, &["sync"]);
        let (success, _, stderr) = huddle(carol, &["send", "club", "hi"]);
        assert!(!success);
        assert!(stderr.contains("may not send messages"), "{stderr}");
        let policy = json_lines(&ok(carol, &["--json", "group", "policy", "club"]));
        assert_eq!(policy[0]["announcement"], true);
    })
    .await
    .unwrap();
}
