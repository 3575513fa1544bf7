//! Encrypted media end to end: round trips, resume, range reads, integrity,
//! access control, limits.
#![allow(clippy::unwrap_used)]
mod common;

use std::path::{Path, PathBuf};

use common::*;
use huddle_client::{Client, ClientError, Event, EventKind, Progress, Quiet};
use huddle_core::proto::{ErrorCode, Request};

fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

async fn group_of(server: &TestServer, names: &[&str]) -> (Vec<Client>, String) {
    let mut clients = Vec::new();
    for n in names {
        clients.push(server.register(n).await);
    }
    let g = clients[0].create_group("media").await.unwrap().to_string();
    let others: Vec<String> = names[1..].iter().map(|s| s.to_string()).collect();
    clients[0].add(&g, &others).await.unwrap();
    for c in clients.iter_mut().skip(1) {
        c.sync().await.unwrap();
    }
    (clients, g)
}

/// Writes `data` to `name`, has the first client send it to `g` and the
/// second sync: the item's media id.
async fn share(c: &mut [Client], g: &str, dir: &Path, name: &str, data: &[u8]) -> String {
    let src = write(dir, name, data);
    let sent = c[0].send_file(g, &src, "", &mut Quiet).await.unwrap();
    let media = sent.media_id().unwrap().to_owned();
    c[1].sync().await.unwrap();
    media
}

/// Asserts that `dir` is empty (nothing of a finished transfer is left).
fn nothing_left_in(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir).unwrap().collect();
    assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
}

fn blob_path(server: &TestServer, media: &str) -> PathBuf {
    server.blob_path(media)
}

/// The file name and size of a `media` event.
fn media_of(e: &Event) -> (&str, u64) {
    match &e.kind {
        EventKind::Media { name, size, .. } => (name.as_str(), *size),
        other => panic!("expected a media event, got {other:?}"),
    }
}

/// Members fetching one item at the same time: the DS reads each span of
/// it once for the downloads in step, and every member still gets every
/// byte, a range from inside a span included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_downloading_one_item_at_once_each_get_every_byte() {
    let server = TestServer::start().await;
    let (mut c, g) = group_of(&server, &["alice", "bob", "carol", "dave"]).await;
    let data = pattern((12 << 20) + 12_345, 11);
    let media = share(&mut c, &g, server.dir.path(), "clip.bin", &data).await;
    let [_, bob, carol, dave] = &mut c[..] else {
        unreachable!("four members")
    };
    carol.sync().await.unwrap();
    dave.sync().await.unwrap();
    let (to_bob, to_carol) = (
        server.dir.path().join("bob.out"),
        server.dir.path().join("carol.out"),
    );
    let (mut quiet_b, mut quiet_c) = (Quiet, Quiet);
    let (b, c2, d) = tokio::join!(
        bob.download(&media, Some(&to_bob), &mut quiet_b),
        carol.download(&media, Some(&to_carol), &mut quiet_c),
        dave.read_range(&media, (5 << 20) + 7, (9 << 20) + 3),
    );
    b.unwrap();
    c2.unwrap();
    assert!(
        std::fs::read(&to_bob).unwrap() == data,
        "bob got other bytes"
    );
    assert!(
        std::fs::read(&to_carol).unwrap() == data,
        "carol got other bytes"
    );
    assert!(
        d.unwrap() == data[(5 << 20) + 7..(9 << 20) + 3],
        "dave's range"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mib_file_round_trips_between_three_members() {
    let server = TestServer::start().await;
    let (mut c, g) = group_of(&server, &["alice", "bob", "carol"]).await;
    let data = pattern(20 << 20, 7);
    let src = write(server.dir.path(), "video.bin", &data);
    let sent = c[0]
        .send_file(&g, &src, "a video", &mut Quiet)
        .await
        .unwrap();
    let media = sent.media_id().map(str::to_owned).unwrap();
    assert_eq!(media_of(&sent).1, 20 << 20);
    for (i, x) in c.iter_mut().enumerate().skip(1) {
        let events = x.sync().await.unwrap();
        let e = events.iter().find(|e| e.kind == "media").unwrap();
        assert_eq!(e.media_id(), Some(media.as_str()));
        assert_eq!(e.text(), Some("a video"));
        assert_eq!(media_of(e).0, "video.bin");
        let out = server.dir.path().join(format!("out{i}.bin"));
        x.download(&media, Some(&out), &mut Quiet).await.unwrap();
        assert!(
            std::fs::read(&out).unwrap() == data,
            "member {i} got other bytes"
        );
    }
    // The server's data dir (and object store) holds none of the plaintext.
    let needle = &data[5 << 20..(5 << 20) + 64];
    for entry in server.stored_dirs().iter().flat_map(|d| walk(d)) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "plaintext found in {}",
            entry.display()
        );
    }
    // A range from the middle, without fetching the rest.
    let part = c[1].read_range(&media, 3_000_000, 3_000_100).await.unwrap();
    assert_eq!(part, &data[3_000_000..3_000_100]);
    let tail = c[2]
        .read_range(&media, (20 << 20) - 10, 20 << 20)
        .await
        .unwrap();
    assert_eq!(tail, &data[(20 << 20) - 10..]);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Aborts a transfer after `limit` bytes; counts what was transferred.
struct Stopper {
    limit: u64,
    started_at: u64,
    moved: u64,
}

impl Progress for Stopper {
    fn start(&mut self, _: &str, _: u64, done: u64) {
        self.started_at = done;
    }
    fn advance(&mut self, n: u64) -> bool {
        self.moved += n;
        self.moved < self.limit
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_upload_resumes_and_sends_only_the_rest() {
    let server = TestServer::start().await;
    let (mut c, g) = group_of(&server, &["alice", "bob"]).await;
    let data = pattern(24 << 20, 3);
    let src = write(server.dir.path(), "big.bin", &data);
    // Killed after about 20 MiB (an object store keeps whole 8 MiB parts,
    // so at least one must have reached it).
    let mut first = Stopper {
        limit: 20 << 20,
        started_at: 0,
        moved: 0,
    };
    assert!(matches!(
        c[0].send_file(&g, &src, "", &mut first).await,
        Err(ClientError::Interrupted(_))
    ));
    assert_eq!(first.started_at, 0);
    // Resume at once: the DS may still be winding the broken stream up
    // (syncing, recording progress); the new upload waits for that.
    let mut second = Stopper {
        limit: u64::MAX,
        started_at: 0,
        moved: 0,
    };
    let sent = c[0].send_file(&g, &src, "", &mut second).await.unwrap();
    let total = media_of(&sent).1 + 82 + 16 * 96; // header + tags of 96 chunks
                                                  // What had reached the server before the kill is kept (the client had
                                                  // written more into its send buffer than was delivered).
    assert!(
        second.started_at >= 1 << 20,
        "resumed from {}",
        second.started_at
    );
    assert!(second.started_at < total);
    assert_eq!(
        second.started_at + second.moved,
        total,
        "only the rest was sent"
    );
    c[1].sync().await.unwrap();
    let out = server.dir.path().join("big.out");
    c[1].download(sent.media_id().unwrap(), Some(&out), &mut Quiet)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
}

/// A file changed in place between an interrupted upload and its resume,
/// keeping its size and modification time: resuming under the same key
/// would seal other bytes with nonces already used. The client notices
/// (each chunk's tag differs from the one sealed before) before it sends
/// the changed chunk, and uploads the file afresh under a new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_before_its_upload_resumes_is_sent_afresh() {
    let server = TestServer::start().await;
    let (mut c, g) = group_of(&server, &["alice", "bob"]).await;
    let data = pattern(24 << 20, 5);
    let src = write(server.dir.path(), "edited.bin", &data);
    let mtime = std::fs::metadata(&src).unwrap().modified().unwrap();
    let mut first = Stopper {
        limit: 10 << 20,
        started_at: 0,
        moved: 0,
    };
    assert!(matches!(
        c[0].send_file(&g, &src, "", &mut first).await,
        Err(ClientError::Interrupted(_))
    ));
    // Changed near the start, same size, same time.
    let mut changed = data.clone();
    changed[1000] ^= 0xff;
    std::fs::write(&src, &changed).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let mut second = Stopper {
        limit: u64::MAX,
        started_at: 0,
        moved: 0,
    };
    let sent = c[0].send_file(&g, &src, "", &mut second).await.unwrap();
    assert_eq!(second.started_at, 0, "sent afresh, not resumed");
    c[1].sync().await.unwrap();
    let out = server.dir.path().join("edited.out");
    c[1].download(sent.media_id().unwrap(), Some(&out), &mut Quiet)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == changed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_download_resumes() {
    let server = TestServer::start().await;
    let (mut c, g) = group_of(&server, &["alice", "bob"]).await;
    // A length that is no multiple of the 4 KiB blocks direct I/O writes,
    // nor of the chunk size: the DS reads from an unaligned offset on the
    // resume, and the client's file ends inside a block.
    let len = (3 << 20) + 12_345;
    let data = pattern(len, 9);
    let media = share(&mut c, &g, server.dir.path(), "clip.bin", &data).await;
    let out = server.dir.path().join("clip.out");
    let mut stop = Stopper {
        limit: 1 << 20,
        started_at: 0,
        moved: 0,
    };
    assert!(matches!(
        c[1].download(&media, Some(&out), &mut stop).await,
        Err(ClientError::Interrupted(_))
    ));
    assert!(
        !out.exists(),
        "nothing is visible before it is complete and verified"
    );
    let mut rest = Stopper {
        limit: u64::MAX,
        started_at: 0,
        moved: 0,
    };
    c[1].download(&media, Some(&out), &mut rest).await.unwrap();
    assert!(rest.started_at >= 1 << 20);
    assert_eq!(rest.started_at % (256 << 10), 0, "resumed at a chunk");
    assert_eq!(rest.started_at + rest.moved, len as u64);
    assert!(std::fs::read(&out).unwrap() == data);
}

/// What a second terminal on the same home runs.
#[derive(Clone)]
enum Second {
    Download { media: String, out: PathBuf },
    Send { group: String, path: PathBuf },
}

/// Starts a second process of the same home (a client opened on it, on its
/// own thread and runtime) when the transfer it watches begins, and
/// records how that one's command ended.
struct SecondTerminal {
    home: huddle_client::Home,
    run: Second,
    outcome: Option<Result<(), ClientError>>,
}

impl Progress for SecondTerminal {
    fn start(&mut self, _: &str, _: u64, _: u64) {
        let (home, run) = (self.home.clone(), self.run.clone());
        let r = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut other = Client::open(home).unwrap();
                match run {
                    Second::Download { media, out } => other
                        .download(&media, Some(&out), &mut Quiet)
                        .await
                        .map(drop),
                    Second::Send { group, path } => other
                        .send_file(&group, &path, "", &mut Quiet)
                        .await
                        .map(drop),
                }
            })
        })
        .join()
        .unwrap();
        self.outcome = Some(r);
    }
    fn advance(&mut self, _: u64) -> bool {
        true
    }
}

/// Whether `outcome` is the refusal of a second terminal's command, with
/// `words` in it.
fn told_to_wait(outcome: Option<Result<(), ClientError>>, words: &str) {
    match outcome {
        Some(Err(ClientError::Busy(m))) => assert!(m.contains(words), "{m}"),
        other => panic!("the second terminal was not told to wait: {other:?}"),
    }
}

/// Two terminals on one home downloading the same item at once: the second
/// is refused instead of sharing the first one's `.part`, and once the
/// first is done, nothing of the lock is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_download_of_the_same_item_on_one_home_is_refused_while_the_first_runs() {
    let server = TestServer::start().await;
    let (mut c, g) = group_of(&server, &["alice", "bob"]).await;
    let data = pattern((2 << 20) + 77, 4);
    let media = share(&mut c, &g, server.dir.path(), "shared.bin", &data).await;
    let second = server.dir.path().join("second.out");
    let mut watch = SecondTerminal {
        home: server.home("bob"),
        run: Second::Download {
            media: media.clone(),
            out: second.clone(),
        },
        outcome: None,
    };
    let out = server.dir.path().join("first.out");
    c[1].download(&media, Some(&out), &mut watch).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
    told_to_wait(watch.outcome, "being downloaded");
    assert!(!second.exists());
    nothing_left_in(&server.home("bob").partial_dir());
    // Its turn now.
    c[1].download(&media, Some(&second), &mut Quiet)
        .await
        .unwrap();
    assert!(std::fs::read(&second).unwrap() == data);
}

/// Two terminals on one home sending the same file to the same group at
/// once: the second is refused, the first's upload is announced once, and
/// nothing of the lock is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_send_of_the_same_file_on_one_home_is_refused_while_the_first_runs() {
    let server = TestServer::start().await;
    let (mut c, g) = group_of(&server, &["alice", "bob"]).await;
    let data = pattern((1 << 20) + 5, 6);
    let src = write(server.dir.path(), "twice.bin", &data);
    let mut watch = SecondTerminal {
        home: server.home("alice"),
        run: Second::Send {
            group: g.clone(),
            path: src.clone(),
        },
        outcome: None,
    };
    c[0].send_file(&g, &src, "", &mut watch).await.unwrap();
    told_to_wait(watch.outcome, "being sent");
    nothing_left_in(&server.home("alice").dir().join("uploads"));
    let events = c[1].sync().await.unwrap();
    assert_eq!(events.iter().filter(|e| e.kind == "media").count(), 1);
}

/// Another process of the home holding a file's upload (between reading
/// its record and announcing it): a send of the same file to the same
/// group is refused before it records or uploads anything, so it can
/// neither start the upload a second time nor resume and announce again
/// what the other is about to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_is_refused_before_it_records_anything_while_another_process_holds_the_file() {
    let server = TestServer::start().await;
    let (mut c, g) = group_of(&server, &["alice", "bob"]).await;
    let src = write(server.dir.path(), "held.bin", &pattern(300_000, 8));
    let path = c[0].upload_lock_path(&g, &src).unwrap();
    let held = huddle_client::lock::FileLock::try_take(&path)
        .unwrap()
        .unwrap();
    let err = c[0].send_file(&g, &src, "", &mut Quiet).await.unwrap_err();
    assert!(matches!(err, ClientError::Busy(_)), "{err}");
    let uploads = server.home("alice").dir().join("uploads");
    let names: Vec<_> = std::fs::read_dir(&uploads)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [path.file_name().unwrap()], "only the lock is there");
    drop(held);
    c[0].send_file(&g, &src, "", &mut Quiet).await.unwrap();
    let events = c[1].sync().await.unwrap();
    assert_eq!(events.iter().filter(|e| e.kind == "media").count(), 1);
}

fn expect_integrity(r: Result<PathBuf, ClientError>) {
    match r {
        Err(ClientError::Integrity(_)) => {}
        other => panic!("expected an integrity error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_truncated_and_reordered_blobs_are_refused() {
    let server = TestServer::start().await;
    let (mut c, g) = group_of(&server, &["alice", "bob"]).await;
    let data = pattern(1 << 20, 5); // four 256 KiB chunks
    let media = share(&mut c, &g, server.dir.path(), "doc.bin", &data).await;
    let path = blob_path(&server, &media);
    let original = std::fs::read(&path).unwrap();
    let sealed = 256 * 1024 + 16;
    let out = server.dir.path().join("doc.out");

    // One flipped byte in the middle of chunk 2.
    let mut t = original.clone();
    t[82 + 2 * sealed + 1000] ^= 1;
    std::fs::write(&path, &t).unwrap();
    expect_integrity(c[1].download(&media, Some(&out), &mut Quiet).await);
    assert!(!out.exists());

    // Verified chunks of a failed attempt are kept for a resume; start each
    // case afresh so every case reads the damaged part.
    let fresh = |c: &Client| {
        let _ = std::fs::remove_dir_all(c.home().partial_dir());
    };
    fresh(&c[1]);
    // The last chunk cut off.
    std::fs::write(&path, &original[..original.len() - 100]).unwrap();
    expect_integrity(c[1].download(&media, Some(&out), &mut Quiet).await);

    fresh(&c[1]);
    // Chunks 1 and 2 swapped.
    let mut s = original.clone();
    let (a, b) = (82 + sealed, 82 + 2 * sealed);
    let chunk1 = original[a..a + sealed].to_vec();
    s.copy_within(b..b + sealed, a);
    s[b..b + sealed].copy_from_slice(&chunk1);
    std::fs::write(&path, &s).unwrap();
    expect_integrity(c[1].download(&media, Some(&out), &mut Quiet).await);

    // Restored, it downloads (the partial file of the failed attempts does
    // not poison the result).
    std::fs::write(&path, &original).unwrap();
    let _ = std::fs::remove_dir_all(c[1].home().partial_dir());
    c[1].download(&media, Some(&out), &mut Quiet).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_members_and_non_members_cannot_fetch() {
    let server = TestServer::start().await;
    let (mut c, g) = group_of(&server, &["alice", "bob", "carol"]).await;
    let data = pattern(100_000, 1);
    let src = write(server.dir.path(), "pic.bin", &data);
    let media = c[0]
        .send_file(&g, &src, "", &mut Quiet)
        .await
        .unwrap()
        .media_id()
        .unwrap()
        .to_owned();
    c[2].sync().await.unwrap();
    c[0].remove(&g, &["carol".into()]).await.unwrap();
    // Carol learned the id (and key) before her removal; the DS still refuses.
    let out = server.dir.path().join("pic.out");
    let r = c[2].download(&media, Some(&out), &mut Quiet).await;
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::NotMember));
    // A non-member who knows the id.
    let mut mallory = server.register("mallory").await;
    let r = mallory
        .net()
        .await
        .unwrap()
        .open(&Request::Download {
            media: media.parse().unwrap(),
            offset: 0,
            len: 0,
        })
        .await;
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::NotMember));
    // Nor may a non-member upload to the group.
    let mut other = server.register("other").await;
    let og = other.create_group("o").await.unwrap().to_string();
    let _ = og;
    let r = other
        .net()
        .await
        .unwrap()
        .open(&Request::BeginUpload(huddle_core::proto::UploadRequest {
            group: g.parse().unwrap(),
            media: huddle_core::MediaId([9; 16]),
            total_len: 1000,
        }))
        .await;
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::NotMember));
    // Bob still can.
    c[1].sync().await.unwrap();
    c[1].download(&media, Some(&out), &mut Quiet).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pictures_carry_a_preview_and_a_detected_type() {
    let server = TestServer::start().await;
    let (mut c, g) = group_of(&server, &["alice", "bob"]).await;
    let img = image::RgbImage::from_fn(640, 480, |x, y| {
        image::Rgb([(x % 200) as u8, (y % 200) as u8, 90])
    });
    let src = server.dir.path().join("holiday.dat");
    img.save_with_format(&src, image::ImageFormat::Png).unwrap();
    c[0].send_file(&g, &src, "beach", &mut Quiet).await.unwrap();
    let ev = c[1].sync().await.unwrap();
    let e = ev.iter().find(|e| e.kind == "media").unwrap();
    assert!(
        matches!(&e.kind, EventKind::Media { mime, .. } if mime == "image/png"),
        "{e:?}"
    );
    let (_, info) = c[1].media_info(e.media_id().unwrap()).unwrap();
    let preview = info.preview.unwrap();
    assert!(preview.len() <= 8 * 1024);
    assert!(image::load_from_memory(&preview).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_items_and_a_full_quota_are_refused_cleanly() {
    let mut server = TestServer::start_with(|cfg| {
        cfg.max_media_item = 2 << 20;
        cfg.media_quota = 3 << 20;
    })
    .await;
    let (mut c, g) = group_of(&server, &["alice", "bob"]).await;
    let big = write(server.dir.path(), "big.bin", &pattern(3 << 20, 2));
    let r = c[0].send_file(&g, &big, "", &mut Quiet).await;
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::TooLarge));
    let ok = write(server.dir.path(), "ok.bin", &pattern(3 << 19, 4));
    c[0].send_file(&g, &ok, "", &mut Quiet).await.unwrap();
    let more = write(server.dir.path(), "more.bin", &pattern(3 << 19, 6));
    let r = c[0].send_file(&g, &more, "", &mut Quiet).await;
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::QuotaExceeded));
    // Nothing half-stored is visible, and the server keeps serving.
    let blobs: Vec<_> = match &server.objects {
        Some(s3) => walk(&s3.objects_dir()),
        None => walk(&server.data_dir.join("blobs"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "blob"))
            .collect(),
    };
    assert_eq!(blobs.len(), 1);
    c[0].send_text(&g, "still fine").await.unwrap();
    server.restart().await;
    c[1].sync().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_media_is_deleted() {
    let server = TestServer::start_with(|cfg| {
        cfg.media_retention = std::time::Duration::ZERO;
        cfg.media_sweep_interval = std::time::Duration::from_millis(50);
    })
    .await;
    let (mut c, g) = group_of(&server, &["alice", "bob"]).await;
    let src = write(server.dir.path(), "f.bin", &pattern(1000, 8));
    let media = c[0]
        .send_file(&g, &src, "", &mut Quiet)
        .await
        .unwrap()
        .media_id()
        .unwrap()
        .to_owned();
    let path = blob_path(&server, &media);
    for _ in 0..200 {
        if !path.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(!path.exists(), "the expired blob is still on disk");
    c[1].sync().await.unwrap();
    let r = c[1]
        .download(&media, Some(&server.dir.path().join("f.out")), &mut Quiet)
        .await;
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::NotFound));
}

/// On an object store: an upload abandoned halfway keeps its stored parts
/// until `stale_upload` has passed without progress; then the sweep
/// aborts it, which deletes every part, and the item is forgotten, so the
/// next attempt starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_upload_leaves_no_part_on_the_object_store() {
    let test = "an_abandoned_upload_leaves_no_part_on_the_object_store";
    let Some(s3) = services::PrivateS3::start(test) else {
        return;
    };
    let server = TestServer::start_with(|c| {
        s3.apply(c);
        c.stale_upload = std::time::Duration::from_secs(2);
        c.media_sweep_interval = std::time::Duration::from_millis(50);
    })
    .await;
    let (mut c, g) = group_of(&server, &["alice", "bob"]).await;
    let src = write(server.dir.path(), "big.bin", &pattern(24 << 20, 9));
    let mut first = Stopper {
        limit: 20 << 20,
        started_at: 0,
        moved: 0,
    };
    assert!(matches!(
        c[0].send_file(&g, &src, "", &mut first).await,
        Err(ClientError::Interrupted(_))
    ));
    // The DS stores the parts it received as the stream winds up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s3.upload_files() == 0 {
        assert!(std::time::Instant::now() < deadline, "no part was stored");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while s3.upload_files() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned upload's parts are still there"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut second = Stopper {
        limit: u64::MAX,
        started_at: 0,
        moved: 0,
    };
    let sent = c[0].send_file(&g, &src, "", &mut second).await.unwrap();
    assert_eq!(second.started_at, 0, "the abandoned upload was forgotten");
    assert!(s3.object_path(sent.media_id().unwrap()).exists());
    assert_eq!(s3.upload_files(), 0);
}
