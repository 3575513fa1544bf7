//! `huddle web` over real HTTP: who may use it, media served by range from
//! verified chunks, what arrives shown live. (The page itself is driven in
//! a browser by `client/tests/web/e2e.mjs`.)
#![allow(clippy::unwrap_used)]
mod common;

use std::time::Duration;

use common::*;
use huddle_client::web::{Options, WebServer};
use huddle_client::Quiet;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// An HTTP/1.1 answer: status, headers (names lower case), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request (`extra` header lines after `Host`) and reads the
/// whole answer.
async fn http(port: u16, method: &str, path: &str, host: &str, extra: &[String]) -> Answer {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// A DS where alice sent `files` (name, bytes) to a group `name` with bob,
/// who has synced; the media ids, in order.
async fn shared(name: &str, files: &[(&str, &[u8])]) -> (TestServer, Vec<String>) {
    let server = TestServer::start().await;
    let mut alice = server.register("alice").await;
    let mut bob = server.register("bob").await;
    let g = alice.create_group(name).await.unwrap().to_string();
    alice.add(&g, &["bob".into()]).await.unwrap();
    bob.sync().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for (file, bytes) in files {
        let path = dir.path().join(file);
        std::fs::write(&path, bytes).unwrap();
        let sent = alice.send_file(&g, &path, "", &mut Quiet).await.unwrap();
        ids.push(sent.media_id().unwrap().to_owned());
    }
    bob.sync().await.unwrap();
    (server, ids)
}

struct Served {
    web: WebServer,
    port: u16,
    token: String,
}

impl Served {
    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn bearer(&self) -> String {
        format!("Authorization: Bearer {}", self.token)
    }

    /// Opens the event stream (its answer's head is read with the events).
    async fn events(&self) -> tokio::net::TcpStream {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let req = format!(
            "GET /api/events HTTP/1.1\r\nHost: {}\r\n{}\r\n\r\n",
            self.host(),
            self.bearer()
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        stream
    }

    async fn get(&self, path: &str, extra: &[String]) -> Answer {
        let mut h = vec![self.bearer()];
        h.extend_from_slice(extra);
        http(self.port, "GET", path, &self.host(), &h).await
    }
}

async fn serve(server: &TestServer, name: &str) -> Served {
    let opts = Options {
        header_timeout: Duration::from_millis(300),
        ..Options::default()
    };
    let web = WebServer::start(server.home(name), opts).await.unwrap();
    let port = web.addr().port();
    let token = web.url().split("token=").nth(1).unwrap().to_owned();
    Served { web, port, token }
}

#[tokio::test]
async fn only_the_token_holder_on_this_host_and_origin_is_served() {
    let server = TestServer::start().await;
    let _alice = server.register("alice").await;
    let s = serve(&server, "alice").await;
    let host = s.host();

    // No token: refused, and the page does not leak.
    let a = http(s.port, "GET", "/", &host, &[]).await;
    assert_eq!(a.status, 401);
    assert!(!String::from_utf8_lossy(&a.body).contains("<html"));
    assert_eq!(
        http(s.port, "GET", "/api/groups", &host, &[]).await.status,
        401
    );
    // A wrong token, as a cookie or in the URL.
    let wrong = format!("Cookie: huddle_web_{}={}", s.port, "0".repeat(64));
    assert_eq!(
        http(s.port, "GET", "/api/groups", &host, &[wrong])
            .await
            .status,
        401
    );
    assert_eq!(
        http(
            s.port,
            "GET",
            &format!("/?token={}", "0".repeat(64)),
            &host,
            &[]
        )
        .await
        .status,
        401
    );

    // The URL's token becomes a cookie, and the address loses it.
    let a = http(s.port, "GET", &format!("/?token={}", s.token), &host, &[]).await;
    assert_eq!(a.status, 303);
    assert_eq!(a.header("location"), Some("/"));
    let cookie = a.header("set-cookie").unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let jar = format!("Cookie: {}", cookie.split(';').next().unwrap());
    let page = http(s.port, "GET", "/", &host, std::slice::from_ref(&jar)).await;
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("<title>Huddle</title>"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    assert_eq!(
        http(
            s.port,
            "GET",
            "/api/groups",
            &host,
            std::slice::from_ref(&jar)
        )
        .await
        .status,
        200
    );

    // With the token, but another site's page, or another name for the
    // host (DNS rebinding): refused.
    for origin in ["http://evil.example", "null", "http://127.0.0.1:1"] {
        let a = s.get("/api/groups", &[format!("Origin: {origin}")]).await;
        assert_eq!(a.status, 403, "{origin}");
    }
    let a = s
        .get("/api/groups", &["Sec-Fetch-Site: cross-site".into()])
        .await;
    assert_eq!(a.status, 403);
    let a = s
        .get("/api/groups", &["Sec-Fetch-Site: same-site".into()])
        .await;
    assert_eq!(
        a.status, 403,
        "another port of 127.0.0.1 is the same site, not the same origin"
    );
    let a = http(
        s.port,
        "GET",
        "/api/groups",
        &format!("evil.example:{}", s.port),
        &[s.bearer()],
    )
    .await;
    assert_eq!(a.status, 421);
    // Its own origin is fine.
    let own = s
        .get(
            "/api/groups",
            &[
                format!("Origin: http://127.0.0.1:{}", s.port),
                "Sec-Fetch-Site: same-origin".into(),
            ],
        )
        .await;
    assert_eq!(own.status, 200);
    s.web.stop().await;
}

#[tokio::test]
async fn media_is_served_by_range_from_verified_chunks() {
    // Four and a bit chunks of 256 KiB; and a page.
    let data = pattern(1_100_000, 7);
    let html = b"<html><script>alert(1)</script></html>".to_vec();
    let (server, ids) = shared("films", &[("film.bin", &data), ("page.html", &html)]).await;
    let (media, html_media) = (ids[0].clone(), ids[1].clone());

    let s = serve(&server, "bob").await;
    let path = format!("/api/media/{media}");

    // The whole item.
    let a = s.get(&path, &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, data);
    assert_eq!(a.header("accept-ranges"), Some("bytes"));
    assert_eq!(a.header("cache-control"), Some("no-store"));
    assert_eq!(
        a.header("content-security-policy"),
        Some("default-src 'none'; sandbox")
    );

    // Ranges across chunk borders, open-ended, from the end.
    for (range, start, end) in [
        ("bytes=300000-700000", 300_000usize, 700_001usize),
        ("bytes=262143-262144", 262_143, 262_145),
        ("bytes=1000000-", 1_000_000, 1_100_000),
        ("bytes=-10", 1_099_990, 1_100_000),
        ("bytes=0-0", 0, 1),
    ] {
        let a = s.get(&path, &[format!("Range: {range}")]).await;
        assert_eq!(a.status, 206, "{range}");
        assert_eq!(
            a.header("content-range").unwrap(),
            format!("bytes {start}-{}/{}", end - 1, data.len()),
            "{range}"
        );
        assert_eq!(
            a.header("content-length").unwrap(),
            (end - start).to_string()
        );
        assert!(a.body == data[start..end], "{range}: other bytes");
    }
    let a = s.get(&path, &["Range: bytes=1100000-".into()]).await;
    assert_eq!(a.status, 416);
    assert_eq!(a.header("content-range"), Some("bytes */1100000"));

    // Not a picture, a sound or a video: a download, never a page.
    let a = s.get(&format!("/api/media/{html_media}"), &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), Some("application/octet-stream"));
    assert!(a
        .header("content-disposition")
        .unwrap()
        .starts_with("attachment"));
    assert_eq!(a.header("x-content-type-options"), Some("nosniff"));

    // An item nobody announced, and the token missing.
    let a = s.get(&format!("/api/media/{}", "ab".repeat(16)), &[]).await;
    assert_eq!(a.status, 400);
    let a = http(s.port, "GET", &path, &s.host(), &[]).await;
    assert_eq!(a.status, 401);
    s.web.stop().await;
}

#[tokio::test]
async fn a_tampered_chunk_is_never_served() {
    let data = pattern(600_000, 7);
    let (server, ids) = shared("films", &[("film.bin", &data)]).await;
    let media = ids[0].clone();
    if server.objects.is_some() {
        // The blob is on the object store, not a file to flip a bit in.
        return;
    }
    // Flip one byte inside the second chunk on the DS's disk.
    let blob = server.blob_path(&media);
    let mut bytes = std::fs::read(&blob).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&blob, &bytes).unwrap();

    let s = serve(&server, "bob").await;
    // The first chunk is intact and served; the range over the damaged one
    // is not: the response breaks off rather than carry unchecked bytes.
    let a = s
        .get(
            &format!("/api/media/{media}"),
            &["Range: bytes=0-999".into()],
        )
        .await;
    assert_eq!(a.status, 206);
    assert!(a.body == data[..1000]);
    let a = s
        .get(
            &format!("/api/media/{media}"),
            &["Range: bytes=300000-300999".into()],
        )
        .await;
    assert!(
        a.body.is_empty(),
        "{} bytes of a tampered chunk were served",
        a.body.len()
    );
    s.web.stop().await;
}

#[tokio::test]
async fn what_others_send_arrives_on_the_event_stream() {
    let server = TestServer::start().await;
    let mut alice = server.register("alice").await;
    let mut bob = server.register("bob").await;
    let g = alice.create_group("chat").await.unwrap().to_string();
    alice.add(&g, &["bob".into()]).await.unwrap();
    bob.sync().await.unwrap();
    let s = serve(&server, "bob").await;

    let mut stream = s.events().await;
    let mut seen = String::new();
    // Once the listener is connected, alice speaks.
    read_until(&mut stream, &mut seen, 0, r#""state":"connected""#).await;
    let mark = seen.len();
    alice.send_text(&g, "hello from alice").await.unwrap();
    read_until(&mut stream, &mut seen, mark, "hello from alice").await;
    assert!(seen.contains("text/event-stream"), "{seen}");
    let line = seen
        .lines()
        .find(|l| l.contains("hello from alice"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(line.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(v["kind"], "event");
    assert_eq!(v["event"]["from"], "alice");
    assert_eq!(v["event"]["own"], false);

    // The unread count, then read.
    let a = s.get("/api/groups", &[]).await;
    let groups: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(groups[0]["unread"], 1);
    let seq = v["event"]["seq"].as_u64().unwrap();
    let body = format!("{{\"seq\":{seq}}}");
    let mut st = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    st.write_all(
        format!(
            "POST /api/groups/{g}/read HTTP/1.1\r\nHost: {}\r\n{}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            s.host(),
            s.bearer(),
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    st.read_to_end(&mut raw).await.unwrap();
    assert!(
        raw.starts_with(b"HTTP/1.1 204"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let a = s.get("/api/groups", &[]).await;
    let groups: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(groups[0]["unread"], 0);

    // Scrolling back: a page of what came before a position.
    let a = s
        .get(&format!("/api/groups/{g}/messages?limit=1"), &[])
        .await;
    let newest: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(newest["events"][0]["text"], "hello from alice");
    let a = s
        .get(&format!("/api/groups/{g}/messages?before={seq}"), &[])
        .await;
    let older: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    let older = older["events"].as_array().unwrap();
    assert!(!older.is_empty());
    assert!(
        older.iter().all(|e| e["seq"].as_u64().unwrap() < seq),
        "before {seq}: {older:?}"
    );
    assert_eq!(older[0]["type"], "joined");
    drop(stream);
    s.web.stop().await;
}

/// Reads the event stream into `seen` until `want` appears after `from`.
async fn read_until(
    stream: &mut tokio::net::TcpStream,
    seen: &mut String,
    from: usize,
    want: &str,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !seen[from..].contains(want) {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{want} never came: {seen}"))
            .unwrap();
        assert!(n > 0, "the event stream closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[tokio::test]
async fn the_page_is_told_when_the_connection_is_lost_and_back() {
    let mut server = TestServer::start().await;
    let _bob = server.register("bob").await;
    let s = serve(&server, "bob").await;
    let mut stream = s.events().await;
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, 0, r#""state":"connected""#).await;
    let mark = seen.len();
    server.restart().await;
    read_until(&mut stream, &mut seen, mark, r#""state":"lost""#).await;
    let mark = seen.len();
    read_until(&mut stream, &mut seen, mark, r#""state":"connected""#).await;
    drop(stream);
    s.web.stop().await;
}

/// Sends `body` (a request with a body) and reads the whole answer.
async fn post(s: &Served, path: &str, body: &[u8]) -> Answer {
    let mut st = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\n{}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        s.host(),
        s.bearer(),
        body.len()
    );
    st.write_all(head.as_bytes()).await.unwrap();
    st.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    st.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .as_bytes()
        .to_vec();
    Answer {
        status,
        headers: Vec::new(),
        body,
    }
}

/// The files staged by the page, as `/api/uploads` lists them.
async fn staged(s: &Served) -> Vec<serde_json::Value> {
    let a = s.get("/api/uploads", &[]).await;
    serde_json::from_slice::<serde_json::Value>(&a.body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_file_from_the_page_that_could_not_be_sent_is_resumed_after_a_restart() {
    let mut server = TestServer::start().await;
    let mut alice = server.register("alice").await;
    let mut bob = server.register("bob").await;
    let g = alice.create_group("chat").await.unwrap().to_string();
    alice.add(&g, &["bob".into()]).await.unwrap();
    bob.sync().await.unwrap();
    let data = pattern(700_000, 3);

    // The DS is down: the page hands the file over, sending it fails.
    let port: u16 = server.addr.rsplit(':').next().unwrap().parse().unwrap();
    server.running.take().unwrap().shutdown().await;
    let s = serve(&server, "alice").await;
    let a = post(
        &s,
        &format!("/api/groups/{g}/files?name=holiday.bin"),
        &data,
    )
    .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list = staged(&s).await;
        assert_eq!(list.len(), 1, "{list:?}");
        if list[0]["state"] == "failed" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{list:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.web.stop().await;

    // Back with the DS up: the file is still there, paused, and resumes.
    let mut config = server.config.clone();
    config.listen = format!("127.0.0.1:{port}").parse().unwrap();
    server.running = Some(huddle_server::start(config).await.unwrap());
    let s = serve(&server, "alice").await;
    let list = staged(&s).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["state"], "paused");
    assert_eq!(list[0]["name"], "holiday.bin");
    let id = list[0]["id"].as_str().unwrap().to_owned();
    let a = post(&s, &format!("/api/uploads/{id}/resume"), b"").await;
    assert_eq!(a.status, 202);
    while !staged(&s).await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never sent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!server
        .home("alice")
        .dir()
        .join("web-uploads")
        .join(&id)
        .exists());
    s.web.stop().await;

    // Bob gets it, whole.
    let events = bob.sync().await.unwrap();
    let media = events
        .iter()
        .find_map(|e| e.media_id())
        .expect("no media event")
        .to_owned();
    let out = tempfile::tempdir().unwrap();
    let path = bob
        .download(&media, Some(&out.path().join("holiday.bin")), &mut Quiet)
        .await
        .unwrap();
    assert!(std::fs::read(path).unwrap() == data);
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_request_is_closed() {
    let server = TestServer::start().await;
    let _alice = server.register("alice").await;
    let s = serve(&server, "alice").await;
    // A request head begun and never finished, and a connection that says
    // nothing at all: both closed once the head's time is up.
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    slow.write_all(format!("GET /api/groups HTTP/1.1\r\nHost: {}\r\n", s.host()).as_bytes())
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    for conn in [&mut slow, &mut silent] {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest))
            .await
            .expect("the connection was kept open")
            .unwrap();
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
            "{rest}"
        );
    }
    // Others are served meanwhile.
    assert_eq!(s.get("/api/groups", &[]).await.status, 200);
    s.web.stop().await;
}
