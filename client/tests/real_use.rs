//! Real use through the `huddle` binary, as people use it: two terminals on
//! one home, a member removed while offline, an upload interrupted and run
//! again, a failed registration retried, output piped into `head`, a
//! server whose certificate changed.
#![allow(clippy::unwrap_used)]
mod common;

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use huddle_client::{Client, ClientError, Home};
use huddle_core::proto::{ErrorCode, Request};
use huddle_core::GroupId;
use serde_json::Value;

/// Registers `name` in `home` through the binary.
fn register(home: &Path, name: &str, addr: &str, cert: &Path) {
    ok(
        home,
        &[
            "register",
            name,
            "--server",
            addr,
            "--server-cert",
            cert.to_str().unwrap(),
        ],
    );
}

fn group_id(home: &Path, name: &str) -> String {
    let list = json_lines(&ok(home, &["--json", "group", "list"]));
    list.iter()
        .find(|g| g["name"] == name)
        .unwrap_or_else(|| panic!("no group {name}: {list:?}"))["group"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Alice and Bob registered through the binary, Bob added to the group
/// `group` Alice made; their homes.
fn pair(dir: &Path, addr: &str, cert: &Path, group: &str) -> (PathBuf, PathBuf) {
    let (alice, bob) = (dir.join("alice"), dir.join("bob"));
    register(&alice, "alice", addr, cert);
    register(&bob, "bob", addr, cert);
    ok(&alice, &["group", "create", group]);
    ok(&alice, &["group", "add", group, "bob"]);
    (alice, bob)
}

/// `huddle --json listen` running in the background, its lines collected.
struct Listener {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<Value>,
}

impl Listener {
    fn start(home: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_huddle"))
            .arg("--home")
            .arg(home)
            .args(["--json", "listen"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Collects events until one satisfies `done`.
    fn wait_for(&mut self, what: &str, done: impl Fn(&Value) -> bool) -> &[Value] {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let v: Value = serde_json::from_str(&l).unwrap();
                    let hit = done(&v);
                    self.seen.push(v);
                    if hit {
                        return &self.seen;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let out = self.child.wait_with_output_ref();
                    panic!(
                        "listen never showed {what}; it printed {:?}; stderr: {out}",
                        self.seen
                    );
                }
            }
        }
    }

    fn still_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

trait StderrOf {
    fn wait_with_output_ref(&mut self) -> String;
}

impl StderrOf for Child {
    fn wait_with_output_ref(&mut self) -> String {
        let _ = self.wait();
        let mut s = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn texts_from(events: &[Value], from: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "text" && e["from"] == from)
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect()
}

/// `listen` in one terminal, and in others of the same home 50 `send`s
/// and 3 `group update`s, while another member sends and commits too: every
/// command succeeds, `listen` keeps running, and it shows every message,
/// its user's own included, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_runs_beside_sends_and_commits_from_the_same_home() {
    let server = TestServer::start().await;
    let (addr, cert) = (server.addr.clone(), server.cert());
    let alice = server.dir.path().join("alice");
    let bob = server.dir.path().join("bob");
    tokio::task::spawn_blocking(move || {
        register(&alice, "alice", &addr, &cert);
        register(&bob, "bob", &addr, &cert);
        ok(&alice, &["group", "create", "chat"]);
        ok(&alice, &["group", "add", "chat", "bob"]);
        ok(&bob, &["sync"]);

        let mut listen = Listener::start(&bob);
        listen.wait_for("that it listens", |e| e["type"] == "listening");
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..50 {
                    ok(&bob, &["send", "chat", &format!("b{i}")]);
                }
            });
            s.spawn(|| {
                for _ in 0..3 {
                    ok(&bob, &["group", "update", "chat"]);
                }
            });
            s.spawn(|| {
                for i in 0..20 {
                    ok(&alice, &["send", "chat", &format!("a{i}")]);
                    if i % 7 == 3 {
                        // A commit from the other side while bob's
                        // processes commit and process commits.
                        ok(&alice, &["group", "update", "chat"]);
                    }
                }
            });
        });
        ok(&alice, &["send", "chat", "done"]);
        let seen = listen
            .wait_for("alice's last message", |e| e["text"] == "done")
            .to_vec();
        assert!(listen.still_running(), "listen exited");
        let mut mine = texts_from(&seen, "bob");
        mine.sort_by_key(|t| t[1..].parse::<u32>().unwrap());
        let want: Vec<String> = (0..50).map(|i| format!("b{i}")).collect();
        assert_eq!(mine, want, "bob's own messages, each once");
        let theirs = texts_from(&seen, "alice");
        let mut want: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
        want.push("done".into());
        assert_eq!(theirs, want, "alice's messages, each once and in order");
        assert!(
            !seen.iter().any(|e| e["type"] == "error"),
            "no group failed: {seen:?}"
        );
        // Both sides agree on the group's state afterwards.
        ok(&bob, &["sync"]);
        ok(&alice, &["sync"]);
        let epoch = |h: &Path| json_lines(&ok(h, &["--json", "group", "list"]))[0]["epoch"].clone();
        assert_eq!(epoch(&alice), epoch(&bob));
        // The history holds each of bob's messages once.
        let history = json_lines(&ok(&bob, &["--json", "messages", "chat", "--limit", "500"]));
        assert_eq!(texts_from(&history, "bob").len(), 50);
    })
    .await
    .unwrap();
}

/// Asks the DS, as a current member, whether entries after `after` of
/// `group` are gone; waits until they are.
async fn wait_compacted(home: &Path, group: &str, after: u64) {
    let group: GroupId = group.parse().unwrap();
    let mut c = Client::open(Home::new(home)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .net()
            .await
            .unwrap()
            .request(&Request::FetchLog {
                group,
                after,
                limit: 1,
            })
            .await;
        match r {
            Err(ClientError::Server(e)) if e.code == ErrorCode::Compacted => break,
            _ if Instant::now() > deadline => panic!("the DS never compacted past {after}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    c.close().await;
}

/// Alice and Bob in "friends" with Carol, Alice and Carol in "pair"; Carol
/// is removed from "friends" while she is offline and the others read on.
/// Returns the homes (alice, bob, carol) and the position of the last
/// entry of "friends".
fn removed_while_offline(server: &TestServer) -> (PathBuf, PathBuf, PathBuf, u64) {
    let home = |n: &str| server.dir.path().join(n);
    let (alice, bob, carol) = (home("alice"), home("bob"), home("carol"));
    for (h, n) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        register(h, n, &server.addr, &server.cert());
    }
    ok(&alice, &["group", "create", "friends"]);
    ok(&alice, &["group", "add", "friends", "bob", "carol"]);
    ok(&alice, &["group", "create", "pair"]);
    ok(&alice, &["group", "add", "pair", "carol"]);
    ok(&bob, &["sync"]);
    ok(&carol, &["sync"]);
    ok(&alice, &["send", "friends", "before"]);
    ok(&alice, &["group", "remove", "friends", "carol"]);
    ok(&alice, &["send", "friends", "after 1"]);
    let last = json_lines(&ok(&alice, &["--json", "send", "friends", "after 2"]))[0]["seq"]
        .as_u64()
        .unwrap();
    ok(&alice, &["send", "pair", "hello carol"]);
    // The others read everything, and acknowledge it with their next read.
    for _ in 0..2 {
        ok(&bob, &["sync"]);
        ok(&alice, &["sync"]);
    }
    (alice, bob, carol, last)
}

fn check_carol_moves_on(carol: &Path, events: &[Value], read_before: bool) {
    let removed = events
        .iter()
        .find(|e| e["type"] == "member_removed" && e["group_name"] == "friends")
        .unwrap_or_else(|| panic!("carol is not told she was removed: {events:?}"));
    assert_eq!(removed["members"], serde_json::json!(["carol"]));
    assert!(
        texts_from(events, "alice").contains(&"hello carol".to_owned()),
        "the other group's message: {events:?}"
    );
    assert!(!events.iter().any(|e| e["text"] == "after 1"));
    let list = json_lines(&ok(carol, &["--json", "group", "list"]));
    let state = |n: &str| list.iter().find(|g| g["name"] == n).unwrap()["state"].clone();
    assert_eq!(state("friends"), "removed");
    assert_eq!(state("pair"), "active");
    // Her history of the group stays readable by its name.
    let history = json_lines(&ok(carol, &["--json", "messages", "friends"]));
    assert_eq!(
        texts_from(&history, "alice").contains(&"before".to_owned()),
        read_before,
        "{history:?}"
    );
    // And the next sync is quiet and fine.
    assert!(json_lines(&ok(carol, &["--json", "sync"])).is_empty());
}

/// The DS keeps what a departed member may still read until it has read
/// it: Carol, back after the others read on and the DS compacted, reads up
/// to her removal, learns of it, and gets her other group's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_while_offline_reads_up_to_the_removal_after_compaction() {
    let server = TestServer::start().await;
    let s = &server;
    let (alice, _bob, carol, _) = tokio::task::block_in_place(|| removed_while_offline(s));
    let friends = group_id(&alice, "friends");
    // Compaction goes as far as Carol's cursor, and no further.
    wait_compacted(&alice, &friends, 1).await;
    let events = tokio::task::block_in_place(|| json_lines(&ok(&carol, &["--json", "sync"])));
    assert!(
        events.iter().any(|e| e["type"] == "member_removed"
            && e["from"] == "alice"
            && e["members"] == serde_json::json!(["carol"])),
        "{events:?}"
    );
    assert!(
        texts_from(&events, "alice").contains(&"before".to_owned()),
        "{events:?}"
    );
    tokio::task::block_in_place(|| check_carol_moves_on(&carol, &events, true));
}

/// Past the retention for departed members the DS compacts without her:
/// her client says what happened, marks the group, and serves her other
/// groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_while_offline_past_retention_moves_on() {
    let server = TestServer::start_with(|c| c.departed_retention = Duration::ZERO).await;
    let s = &server;
    let (alice, _bob, carol, last) = tokio::task::block_in_place(|| removed_while_offline(s));
    let friends = group_id(&alice, "friends");
    wait_compacted(&alice, &friends, last - 1).await;
    let (success, stdout, stderr) =
        tokio::task::block_in_place(|| huddle(&carol, &["--json", "sync"]));
    assert!(success, "sync fails: {stderr}");
    let events = json_lines(&stdout);
    let removed = events
        .iter()
        .find(|e| e["type"] == "member_removed")
        .unwrap();
    assert!(
        removed["text"]
            .as_str()
            .unwrap()
            .contains("longer than the server keeps"),
        "{removed}"
    );
    tokio::task::block_in_place(|| check_carol_moves_on(&carol, &events, false));
}

/// Waits until the DS holds part of an upload.
fn wait_partial(data_dir: &Path) {
    let dir = data_dir.join("blobs/partial");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let some = std::fs::read_dir(&dir)
            .map(|d| d.flatten().any(|f| f.metadata().is_ok_and(|m| m.len() > 0)))
            .unwrap_or(false);
        if some {
            return;
        }
        assert!(Instant::now() < deadline, "no upload reached the DS");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

fn big_file(dir: &Path, mib: usize) -> PathBuf {
    let path = dir.join("video.bin");
    let mut data = vec![0u8; mib << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    std::fs::write(&path, &data).unwrap();
    path
}

/// A sender whose process hangs (or was killed) mid-upload holds its
/// connection open until the DS times it out; running `send-file` again
/// takes the upload over at once and finishes it. Ctrl-C says how to
/// resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_upload_resumes_at_once() {
    let server = TestServer::start().await;
    let (addr, cert, data_dir) = (server.addr.clone(), server.cert(), server.data_dir.clone());
    let dir = server.dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let (alice, bob) = pair(&dir, &addr, &cert, "films");
        let file = big_file(&dir, 96);
        let send = |home: &Path| {
            Command::new(env!("CARGO_BIN_EXE_huddle"))
                .arg("--home")
                .arg(home)
                .args(["send-file", "films", file.to_str().unwrap()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };

        // Ctrl-C: the command ends, saying how to go on.
        let first = send(&alice);
        wait_partial(&data_dir);
        signal(&first, "-INT");
        let out = first.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{stderr}");
        assert!(
            stderr.contains("run the same command again to resume"),
            "{stderr}"
        );

        // A process killed mid-upload, its connection left open and silent:
        // killed as soon as its stream is at work on the DS (the partial
        // file is cut back to the resume point or grows).
        let partial = std::fs::read_dir(data_dir.join("blobs/partial"))
            .unwrap()
            .flatten()
            .map(|f| f.path())
            .collect::<Vec<_>>();
        assert_eq!(partial.len(), 1);
        let size = || std::fs::metadata(&partial[0]).map(|m| m.len()).unwrap_or(0);
        let stopped_at = size();
        let mut killed = send(&alice);
        let deadline = Instant::now() + Duration::from_secs(60);
        while size() == stopped_at {
            assert!(Instant::now() < deadline, "the second upload never started");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Killed: its connection stays open on the DS, silent, until the DS
        // times it out; nothing on this side holds the upload any more.
        signal(&killed, "-KILL");
        let _ = killed.wait();
        let (success, stdout, stderr) =
            huddle(&alice, &["send-file", "films", file.to_str().unwrap()]);
        assert!(success, "the rerun must take the upload over: {stderr}");
        let media = stdout.trim().to_owned();
        assert_eq!(media.len(), 32, "{stdout}");

        ok(&bob, &["sync"]);
        let out = dir.join("got.bin");
        ok(&bob, &["download", &media, "-o", out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&file).unwrap());
    })
    .await
    .unwrap();
}

/// A registration that fails on this side (the home cannot be written)
/// claims nothing on the DS: the name is still there for the next try.
/// One that fails after the DS took the name finishes on the next try with
/// the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_registration_can_be_retried() {
    let server = TestServer::start().await;
    let (addr, cert) = (server.addr.clone(), server.cert());
    let dir = server.dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let not_a_dir = dir.join("file");
        std::fs::write(&not_a_dir, b"x").unwrap();
        let bad = not_a_dir.join("home");
        let args = [
            "register",
            "dave",
            "--server",
            &addr,
            "--server-cert",
            cert.to_str().unwrap(),
        ];
        let (success, _, stderr) = huddle(&bad, &args);
        assert!(!success);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        let good = dir.join("dave");
        let (success, _, stderr) = huddle(&good, &args);
        assert!(
            success,
            "the name was lost to a failed registration: {stderr}"
        );
    })
    .await
    .unwrap();

    // The DS bound the name, then the client stopped before finishing.
    let home = Home::new(server.dir.path().join("erin"));
    let id = huddle_client::identity::Identity::generate("erin");
    home.save_identity(&id).unwrap();
    let net = huddle_client::net::Connection::connect(
        &server.addr,
        huddle_client::net::Trust::Pinned(vec![std::fs::read(server.cert())
            .map(|pem| pem_der(&pem))
            .unwrap()]),
    )
    .await
    .unwrap();
    net.authenticate(&id, true).await.unwrap();
    net.close().await;
    let (addr, cert) = (server.addr.clone(), server.cert());
    let erin = server.dir.path().join("erin");
    tokio::task::spawn_blocking(move || {
        register(&erin, "erin", &addr, &cert);
        let who = json_lines(&ok(&erin, &["--json", "whoami"]));
        assert_eq!(
            who[0]["fingerprint"],
            huddle_core::auth::key_fingerprint(&id.public())
        );
        ok(&erin, &["status"]);
    })
    .await
    .unwrap();
}

fn pem_der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};
    CertificateDer::from_pem_slice(pem).unwrap().to_vec()
}

/// Output into a pipe nobody reads (`huddle whoami | true`) ends quietly:
/// no panic, no backtrace, nothing on stderr.
#[test]
fn a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    let hm = Home::new(&home);
    hm.save(
        &huddle_client::home::Settings {
            name: "zoe".into(),
            server: "127.0.0.1:1".into(),
            device: 1,
        },
        &huddle_client::identity::Identity::generate("zoe"),
    )
    .unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_huddle"))
        .arg("--home")
        .arg(&home)
        .arg("whoami")
        .env("RUST_BACKTRACE", "1")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "panicked: {stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

/// Names: a group one was removed from still resolves by name, the short
/// ids that output shows are accepted, an empty name is refused, and a
/// duplicate is accepted with a warning. Colourless logs when stderr is not
/// a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_found_by_name_short_id_and_prefix() {
    let server = TestServer::start().await;
    let (addr, cert) = (server.addr.clone(), server.cert());
    let dir = server.dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let alice = dir.join("alice");
        let bob = dir.join("bob");
        register(&alice, "alice", &addr, &cert);
        register(&bob, "bob", &addr, &cert);
        let (success, _, stderr) = huddle(&alice, &["group", "create", ""]);
        assert!(!success);
        assert!(stderr.contains("needs a name"), "{stderr}");
        let (success, _, stderr) = huddle(&alice, &["group", "create", "a\nb"]);
        assert!(!success, "{stderr}");

        ok(&alice, &["group", "create", "friends"]);
        ok(&alice, &["group", "add", "friends", "bob"]);
        ok(&alice, &["send", "friends", "hi"]);
        ok(&bob, &["sync"]);
        let gid = group_id(&alice, "friends");
        // The 8 digits shown stand for the group.
        ok(&alice, &["send", &gid[..8], "by short id"]);
        let (success, _, stderr) = huddle(&alice, &["send", &gid[..8].to_uppercase(), "x"]);
        assert!(success, "{stderr}");

        // A second group of the same name: accepted, with a warning.
        let (success, _, stderr) = huddle(&alice, &["group", "create", "friends"]);
        assert!(success, "{stderr}");
        assert!(
            stderr.contains("already in a group named \"friends\""),
            "{stderr}"
        );
        // Logs to a file (not a terminal) carry no colour codes.
        let logged = Command::new(env!("CARGO_BIN_EXE_huddle"))
            .arg("--home")
            .arg(&alice)
            .arg("status")
            .env("RUST_LOG", "debug")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&logged.stderr);
        assert!(log.contains("DEBUG"), "{log}");
        assert!(!log.contains('\u{1b}'), "colour codes in a log: {log:?}");
        let (success, _, stderr) = huddle(&alice, &["send", "friends", "which?"]);
        assert!(!success);
        assert!(
            stderr.contains(&gid[..8]),
            "the error shows the short ids: {stderr}"
        );

        // Removed from it, Bob still finds it by name.
        ok(&alice, &["group", "remove", &gid, "bob"]);
        ok(&bob, &["sync"]);
        let history = ok(&bob, &["messages", "friends"]);
        assert!(history.contains("alice: hi"), "{history}");
        // With the time it happened.
        let first = history.lines().next().unwrap();
        assert!(
            first.len() > 17 && first.as_bytes()[4] == b'-' && first.as_bytes()[13] == b':',
            "{first}"
        );
    })
    .await
    .unwrap();
}

/// The server's certificate changed: the error says so in a line and names
/// the way out; `huddle server trust` shows both fingerprints, asks, and
/// re-pins, keeping the home.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_server_certificate_can_be_trusted_again() {
    let mut server = TestServer::start().await;
    let alice = server.dir.path().join("alice");
    let s = &server;
    tokio::task::block_in_place(|| {
        register(&alice, "alice", &s.addr, &s.cert());
        ok(&alice, &["group", "create", "kept"]);
    });
    std::fs::remove_file(server.data_dir.join("cert.pem")).unwrap();
    std::fs::remove_file(server.data_dir.join("key.pem")).unwrap();
    server.restart().await;
    let new_fp = server.running.as_ref().unwrap().fingerprint.clone();
    tokio::task::spawn_blocking(move || {
        let (success, _, stderr) = huddle(&alice, &["status"]);
        assert!(!success);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("huddle server trust"), "{stderr}");
        // Declined: nothing changes.
        let declined = Command::new(env!("CARGO_BIN_EXE_huddle"))
            .arg("--home")
            .arg(&alice)
            .args(["server", "trust"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = answer(declined, "n\n");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains(&new_fp));
        assert!(!huddle(&alice, &["status"]).0);
        // Accepted.
        let accepted = Command::new(env!("CARGO_BIN_EXE_huddle"))
            .arg("--home")
            .arg(&alice)
            .args(["server", "trust"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = answer(accepted, "y\n");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let st = json_lines(&ok(&alice, &["--json", "status"]));
        assert_eq!(st[0]["server_fingerprint"], new_fp.as_str());
        assert!(ok(&alice, &["group", "list"]).contains("kept"));
    })
    .await
    .unwrap();
}

fn answer(mut child: Child, text: &str) -> std::process::Output {
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Nothing listens on the port: the error says "refused" rather than
/// waiting out the timeout for silence.
#[test]
fn a_closed_port_is_reported_as_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (success, _, stderr) = huddle(
        &dir.path().join("h"),
        &["register", "zed", "--server", &format!("127.0.0.1:{port}")],
    );
    assert!(!success);
    assert!(stderr.contains("connection refused"), "{stderr}");
}

/// Text from standard input, media to standard output, an existing file
/// replaced only with `--force`, sizes a person reads, media ids by prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipes_in_and_out() {
    let server = TestServer::start().await;
    let (addr, cert) = (server.addr.clone(), server.cert());
    let dir = server.dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let (alice, bob) = pair(&dir, &addr, &cert, "g");
        let sent = Command::new(env!("CARGO_BIN_EXE_huddle"))
            .arg("--home")
            .arg(&alice)
            .args(["send", "g", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = answer(sent, "line one\nline two\n");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let file = dir.join("photo.bin");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&file, &data).unwrap();
        ok(&alice, &["send-file", "g", file.to_str().unwrap()]);
        let shown = ok(&bob, &["sync"]);
        assert!(shown.contains("alice: line one\\nline two"), "{shown}");
        assert!(
            shown.contains("(application/octet-stream, 293.0 KiB)"),
            "{shown}"
        );
        let ev = json_lines(&ok(&bob, &["--json", "messages", "g"]));
        let media = ev.iter().find(|e| e["type"] == "media").unwrap()["media_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let out = Command::new(env!("CARGO_BIN_EXE_huddle"))
            .arg("--home")
            .arg(&bob)
            .args(["download", &media[..10], "-o", "-"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == data, "stdout holds the file");

        let target = dir.join("there.bin");
        std::fs::write(&target, b"old").unwrap();
        let t = target.to_str().unwrap();
        let (success, _, stderr) = huddle(&bob, &["download", &media, "-o", t]);
        assert!(!success);
        assert!(stderr.contains("--force"), "{stderr}");
        let said = ok(&bob, &["download", &media, "-o", t, "--force"]);
        assert!(said.contains("(293.0 KiB)"), "{said}");
        assert!(std::fs::read(&target).unwrap() == data);
    })
    .await
    .unwrap();
}

/// Commits from several processes of one home at once (three `group
/// update`s while `send`s go on): each either lands or says it lost, and
/// the home's state stays the group's: the other member reads what this
/// home sends next, and this home reads what the other sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_from_one_home_keep_the_group_whole() {
    let server = TestServer::start().await;
    let (addr, cert) = (server.addr.clone(), server.cert());
    let dir = server.dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let (alice, bob) = pair(&dir, &addr, &cert, "m");
        ok(&bob, &["sync"]);
        for round in 0..3 {
            std::thread::scope(|s| {
                for _ in 0..3 {
                    s.spawn(|| {
                        let (success, _, stderr) = huddle(&alice, &["group", "update", "m"]);
                        assert!(
                            success || stderr.contains("try again"),
                            "round {round}: {stderr}"
                        );
                    });
                }
                s.spawn(|| ok(&alice, &["send", "m", &format!("during {round}")]));
            });
            ok(&alice, &["send", "m", &format!("after {round}")]);
            let got = ok(&bob, &["sync"]);
            assert!(
                got.contains(&format!("alice: after {round}")),
                "round {round}: {got}"
            );
            ok(&bob, &["send", "m", &format!("reply {round}")]);
            let got = ok(&alice, &["sync"]);
            assert!(
                got.contains(&format!("bob: reply {round}")),
                "round {round}: {got}"
            );
        }
        let epoch = |h: &Path| json_lines(&ok(h, &["--json", "group", "list"]))[0]["epoch"].clone();
        assert_eq!(epoch(&alice), epoch(&bob));
        // A later update from one process works.
        ok(&alice, &["group", "update", "m"]);
    })
    .await
    .unwrap();
}

/// A command that processes others' messages on its way (a `send` syncs
/// first) records them; the next `sync` reports them, as it reports
/// everything not shown yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_read_by_another_command_are_reported_by_the_next_sync() {
    let server = TestServer::start().await;
    let (addr, cert) = (server.addr.clone(), server.cert());
    let dir = server.dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let (alice, bob) = pair(&dir, &addr, &cert, "q");
        ok(&bob, &["sync"]);
        ok(&bob, &["send", "q", "did you see this?"]);
        // Alice's send reads bob's message before sending hers.
        ok(&alice, &["send", "q", "unrelated"]);
        let got = ok(&alice, &["sync"]);
        assert!(got.contains("bob: did you see this?"), "{got}");
        // Her own message is not reported back to her, and nothing twice.
        assert!(!got.contains("unrelated"), "{got}");
        assert_eq!(ok(&alice, &["sync"]), "");
        // An empty message is refused.
        let (success, _, stderr) = huddle(&alice, &["send", "q", "  "]);
        assert!(!success);
        assert!(stderr.contains("empty"), "{stderr}");
    })
    .await
    .unwrap();
}

/// A download never replaces what is not a regular file, saves into a
/// directory it is given, and a group named like another's short id is
/// refused as ambiguous rather than taken for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_paths_cannot_be_turned_against_the_user() {
    let server = TestServer::start().await;
    let (addr, cert) = (server.addr.clone(), server.cert());
    let dir = server.dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let alice = dir.join("alice");
        let bob = dir.join("bob");
        register(&alice, "alice", &addr, &cert);
        register(&bob, "bob", &addr, &cert);
        ok(&alice, &["group", "create", "friends"]);
        let friends = group_id(&alice, "friends");
        // Bob names a group after the short id of Alice's and adds her.
        ok(&bob, &["group", "create", &friends[..8]]);
        ok(&bob, &["group", "add", &friends[..8], "alice"]);
        ok(&alice, &["sync"]);
        let (success, _, stderr) = huddle(&alice, &["send", &friends[..8], "secret"]);
        assert!(!success, "sent to one of two groups that match");
        assert!(stderr.contains("2 groups match"), "{stderr}");
        ok(&alice, &["send", &friends, "by full id"]);

        let file = dir.join("pic.bin");
        std::fs::write(&file, b"not a picture").unwrap();
        ok(&bob, &["send-file", &friends[..8], file.to_str().unwrap()]);
        ok(&alice, &["sync"]);
        let ev = json_lines(&ok(
            &alice,
            &[
                "--json",
                "messages",
                "--limit",
                "5",
                &group_id(&alice, &friends[..8]),
            ],
        ));
        let media = ev.iter().find(|e| e["type"] == "media").unwrap()["media_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let fifo = dir.join("fifo");
        assert!(Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let (success, _, stderr) = huddle(
            &alice,
            &["download", &media, "-o", fifo.to_str().unwrap(), "--force"],
        );
        assert!(!success);
        assert!(stderr.contains("not a regular file"), "{stderr}");
        // A link at the target is replaced, never followed.
        let victim = dir.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        ok(
            &alice,
            &["download", &media, "-o", link.to_str().unwrap(), "--force"],
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(link.symlink_metadata().unwrap().is_file());
        // The same on another file system (the copy path, not a rename),
        // where there is one to try.
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            let other = tempfile::tempdir_in(shm).unwrap();
            let link = other.path().join("link");
            std::os::unix::fs::symlink(&victim, &link).unwrap();
            ok(
                &alice,
                &["download", &media, "-o", link.to_str().unwrap(), "--force"],
            );
            assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
            assert_eq!(std::fs::read(&link).unwrap(), b"not a picture");
            assert!(link.symlink_metadata().unwrap().is_file());
        }
        let into = dir.join("downloads");
        std::fs::create_dir(&into).unwrap();
        ok(&alice, &["download", &media, "-o", into.to_str().unwrap()]);
        assert_eq!(
            std::fs::read(into.join("pic.bin")).unwrap(),
            b"not a picture"
        );
    })
    .await
    .unwrap();
}

/// A member removed (while reading along, or while away) or who left can
/// be added back, and reads what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_or_departed_member_can_be_added_back() {
    let server = TestServer::start().await;
    let (addr, cert) = (server.addr.clone(), server.cert());
    let dir = server.dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let (alice, bob) = pair(&dir, &addr, &cert, "g");
        ok(&bob, &["sync"]);
        let state = |h: &Path| json_lines(&ok(h, &["--json", "group", "list"]))[0]["state"].clone();
        // Removed, and it read its removal.
        ok(&alice, &["group", "remove", "g", "bob"]);
        ok(&bob, &["sync"]);
        assert_eq!(state(&bob), "removed");
        ok(&alice, &["group", "add", "g", "bob"]);
        ok(&alice, &["send", "g", "back 1"]);
        let got = ok(&bob, &["sync"]);
        assert!(got.contains("alice: back 1"), "{got}");
        assert_eq!(state(&bob), "active");
        // Removed and added back while away.
        ok(&alice, &["group", "remove", "g", "bob"]);
        ok(&alice, &["group", "add", "g", "bob"]);
        ok(&alice, &["send", "g", "back 2"]);
        let (success, got, stderr) = huddle(&bob, &["sync"]);
        assert!(success, "{stderr}");
        assert!(got.contains("alice: back 2"), "{got}");
        // Left, and added back.
        ok(&bob, &["group", "leave", "g"]);
        ok(&alice, &["sync"]);
        ok(&bob, &["sync"]);
        assert_eq!(state(&bob), "left");
        ok(&alice, &["group", "add", "g", "bob"]);
        ok(&alice, &["send", "g", "back 3"]);
        let got = ok(&bob, &["sync"]);
        assert!(got.contains("alice: back 3"), "{got}");
        ok(&bob, &["send", "g", "thanks"]);
        assert!(ok(&alice, &["sync"]).contains("bob: thanks"));
    })
    .await
    .unwrap();
}

/// A `listen` shows everything, however other processes of the home report
/// or sync meanwhile: a message its user sends while it is busy, and a
/// `sync` in another terminal, do not hide it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_keeps_its_own_place_in_the_history() {
    let server = TestServer::start().await;
    let (addr, cert) = (server.addr.clone(), server.cert());
    let dir = server.dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let (alice, bob) = pair(&dir, &addr, &cert, "g");
        ok(&bob, &["sync"]);
        let mut listen = Listener::start(&alice);
        listen.wait_for("that it listens", |e| e["type"] == "listening");
        signal(&listen.child, "-STOP");
        ok(&alice, &["send", "g", "sent while listen was busy"]);
        ok(&bob, &["send", "g", "from bob"]);
        let synced = ok(&alice, &["sync"]);
        assert!(synced.contains("bob: from bob"), "{synced}");
        signal(&listen.child, "-CONT");
        listen.wait_for("her own message", |e| {
            e["text"] == "sent while listen was busy"
        });
        listen.wait_for("bob's message", |e| e["text"] == "from bob");
    })
    .await
    .unwrap();
}

/// The downloads a closed pipe cut short end on the DS at once (they
/// counted against the user's transfers for half a minute); a second
/// `send-file` of a file being sent from another terminal says so; a
/// download never writes into the home; leaving a group one is alone in
/// says it is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_end_cleanly_and_say_why() {
    let server = TestServer::start().await;
    let (addr, cert, data_dir) = (server.addr.clone(), server.cert(), server.data_dir.clone());
    let dir = server.dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let (alice, bob) = pair(&dir, &addr, &cert, "g");
        ok(&bob, &["sync"]);
        let file = big_file(&dir, 64);
        let first = Command::new(env!("CARGO_BIN_EXE_huddle"))
            .arg("--home")
            .arg(&alice)
            .args(["send-file", "g", file.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_partial(&data_dir);
        let (success, _, stderr) = huddle(&alice, &["send-file", "g", file.to_str().unwrap()]);
        assert!(!success);
        assert!(stderr.contains("another huddle process"), "{stderr}");
        let out = first.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let media = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        ok(&bob, &["sync"]);
        for _ in 0..20 {
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            let st = Command::new(env!("CARGO_BIN_EXE_huddle"))
                .arg("--home")
                .arg(&bob)
                .args(["download", &media, "-o", "-"])
                .stdout(writer)
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert_eq!(st.code(), Some(141));
        }
        // More than the 16 transfers a user may run: none is left over.
        let got = dir.join("got.bin");
        ok(&bob, &["download", &media, "-o", got.to_str().unwrap()]);
        let into_home = bob.join("huddle.db");
        let (success, _, stderr) = huddle(
            &bob,
            &[
                "download",
                &media,
                "-o",
                into_home.to_str().unwrap(),
                "--force",
            ],
        );
        assert!(!success);
        assert!(stderr.contains("inside this device's home"), "{stderr}");
        ok(&bob, &["group", "list"]);
        // Alone in a group: leaving is at once.
        ok(&alice, &["group", "create", "solo"]);
        let said = ok(&alice, &["group", "leave", "solo"]);
        assert!(said.contains("left solo"), "{said}");
        // Asked to leave: sending is refused, saying why.
        ok(&bob, &["group", "leave", "g"]);
        let (success, _, stderr) = huddle(&bob, &["send", "g", "still here?"]);
        assert!(!success);
        assert!(stderr.contains("you asked to leave"), "{stderr}");
    })
    .await
    .unwrap();
}
