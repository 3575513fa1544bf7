//! The client against a DS that lies: a QUIC endpoint with the DS's TLS
//! set-up that answers requests as a test script says, so the client's own
//! bounds can be checked where an honest DS would never test them.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use huddle_client::home::Settings;
use huddle_client::identity::Identity;
use huddle_client::{Client, Home};
use huddle_core::proto::{self, ErrorBody, ErrorCode, InboxItem, Request, Response};
use huddle_core::GroupId;
use huddle_server::ServerConfig;

/// A fake DS on 127.0.0.1 answering each request with `answer` (`None`:
/// no answer at all); returns its address and certificate (DER).
async fn fake_ds(
    dir: &std::path::Path,
    answer: impl Fn(Request) -> Option<Response> + Send + Sync + 'static,
) -> (String, Vec<u8>) {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_owned(),
        ..ServerConfig::default()
    };
    std::fs::create_dir_all(dir).unwrap();
    let identity = huddle_server::tls::load_identity(&config).unwrap();
    let cert = identity.chain[0].to_vec();
    let server = huddle_server::tls::quinn_config(&config, identity).unwrap();
    let endpoint = quinn::Endpoint::server(server, config.listen).unwrap();
    let addr = endpoint.local_addr().unwrap().to_string();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let answer = answer.clone();
                    tokio::spawn(async move {
                        let Ok(body) = huddle_server::server::read_frame(&mut recv, 1 << 22).await
                        else {
                            return;
                        };
                        let Ok(req) = proto::decode::<Request>(&body) else {
                            return;
                        };
                        match answer(req) {
                            Some(r) => {
                                let _ = send.write_all(&proto::encode_frame(&r)).await;
                                let _ = send.finish();
                                // Keep the stream until the client is done.
                                let _ = send.stopped().await;
                            }
                            None => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                            }
                        }
                    });
                }
            });
        }
    });
    (addr, cert)
}

/// A registered-looking home for `name` that pins `cert` and talks to `addr`.
fn home(dir: &std::path::Path, name: &str, addr: &str, cert: &[u8]) -> Home {
    let home = Home::new(dir.join(name));
    home.save(
        &Settings {
            name: name.into(),
            server: addr.into(),
            device: 1,
        },
        &Identity::generate(name),
    )
    .unwrap();
    home.pin_cert(cert).unwrap();
    home
}

/// Answers the authentication handshake; `rest` answers the others.
fn authenticating(
    rest: impl Fn(Request) -> Option<Response> + Send + Sync + 'static,
) -> impl Fn(Request) -> Option<Response> + Send + Sync + 'static {
    move |req| match req {
        Request::Challenge => Some(Response::Challenge { nonce: [1; 32] }),
        Request::Authenticate { name, .. } => Some(Response::Authenticated { name }),
        other => rest(other),
    }
}

/// A DS that keeps announcing a higher inbox head while handing out only
/// an item the client already handled: an earlier client fetched its
/// inbox forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_that_never_moves_on_ends_the_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, cert) = fake_ds(
        &dir.path().join("ds"),
        authenticating(|req| match req {
            Request::FetchInbox { .. } => Some(Response::Inbox {
                items: vec![InboxItem {
                    seq: 1,
                    group: GroupId([5; 16]),
                    commit_seq: 1,
                    timestamp_ms: 0,
                    welcome: bytes::Bytes::from_static(b"not a welcome"),
                }],
                head: 1_000_000,
            }),
            _ => Some(Response::Error(ErrorBody::new(ErrorCode::NotFound, "no"))),
        }),
    )
    .await;
    let mut c = Client::open(home(dir.path(), "alice", &addr, &cert)).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), c.sync_inbox()).await;
    let events = r.expect("the inbox sync ended").unwrap();
    assert!(events.is_empty(), "{events:?}");
}

/// A DS that accepts a push stream and never answers it: an earlier
/// client waited for ever (`open` had no time-out); now the first answer
/// of every stream is waited for at most `REQUEST_TIMEOUT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_ds_never_answers_is_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, cert) = fake_ds(
        &dir.path().join("ds"),
        authenticating(|req| match req {
            Request::FetchInbox { .. } => Some(Response::Inbox {
                items: vec![],
                head: 0,
            }),
            Request::ListGroups => Some(Response::Groups { groups: vec![] }),
            Request::KeyPackageCount => Some(Response::KeyPackageCount {
                available: 100,
                last_resort: true,
            }),
            // Subscribe: never answered.
            _ => None,
        }),
    )
    .await;
    let mut c = Client::open(home(dir.path(), "alice", &addr, &cert)).unwrap();
    let wait = huddle_client::net::REQUEST_TIMEOUT + Duration::from_secs(15);
    let r = tokio::time::timeout(wait, c.listen(|_| {}, std::future::pending())).await;
    let e = r.expect("listen gave up").unwrap_err();
    assert!(e.to_string().contains("no answer within"), "{e}");
}
