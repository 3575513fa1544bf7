//! `huddle web`: the local app. The client's engine (its keys, its MLS
//! state, one push stream from the DS) runs in this process and serves a
//! page to a browser on 127.0.0.1 only; the browser never holds a key.
//!
//! Who may use it: whoever presents the access token printed with the URL
//! (a cookie after the first visit). Every request must also name this
//! server in `Host` (no DNS rebinding), and a request another site's page
//! makes is refused by its `Origin` or `Sec-Fetch-Site` header. Pages get
//! a strict Content-Security-Policy; media is served sandboxed, inline only
//! for picture, audio and video types (see `web/media.rs`).
//!
//! Each piece of work has its own client of the home, so none waits for
//! another: the listener (the push stream), the actions (texts,
//! membership), the media reader (range reads for the player) and one per
//! file being sent. They share the home's database and group locks like
//! separate processes would.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch, Semaphore};

use crate::client::Link;
use crate::error::{ClientError, Result};
use crate::event::Event;
use crate::{Client, Home};

mod api;
mod assets;
mod guard;
mod media;
mod upload;
mod worker;

use worker::Worker;

/// Requests handled at once, for the whole server; more are refused with
/// 503 (a media response being streamed counts against
/// [`MAX_MEDIA_STREAMS`] instead, once its handler has returned).
pub const MAX_REQUESTS: usize = 64;
/// Event streams open at once (one per open tab).
pub const MAX_EVENT_STREAMS: usize = 8;
/// Media responses being streamed at once (a player opens a few).
pub const MAX_MEDIA_STREAMS: usize = 16;
/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 64 * 1024;
/// Files being sent at once (each has its own connection to the DS).
pub const MAX_UPLOADS: usize = 2;
/// Files staged here and not yet sent (running, paused or failed).
pub const MAX_STAGED_UPLOADS: usize = 32;
/// Largest file the page may send.
pub const MAX_UPLOAD_BYTES: u64 = 4 << 30;
/// Verified plaintext chunks kept in memory for the player, in bytes.
pub const CACHE_BYTES: usize = 128 << 20;
/// Chunks fetched in one request to the DS when the player reads on.
pub const READ_AHEAD_CHUNKS: u32 = 8;
/// Most history events one request returns.
pub const MAX_HISTORY: usize = 500;
/// Pause before the listener tries again after failing to connect at all.
const LISTEN_RETRY: Duration = Duration::from_secs(5);

/// Where the local server listens, and how long it waits.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Port on 127.0.0.1 (0: any free port).
    pub port: u16,
    /// How long a connection may take to send a request's head
    /// ([`HEADER_TIMEOUT`]).
    pub header_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            port: 0,
            header_timeout: HEADER_TIMEOUT,
        }
    }
}

/// A running `huddle web`.
#[derive(Debug)]
pub struct WebServer {
    url: String,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    serve: tokio::task::JoinHandle<()>,
    listen: std::thread::JoinHandle<()>,
}

impl WebServer {
    /// Opens the home's clients, binds 127.0.0.1:`port`, and serves until
    /// [`WebServer::stop`]. Fails if the home is not registered or the
    /// port is taken; the DS being unreachable is not an error (the page
    /// shows it and the listener keeps trying).
    pub async fn start(home: Home, opts: Options) -> Result<WebServer> {
        let (user, principal) = {
            let c = Client::open(home.clone())?;
            (c.name().to_owned(), c.principal().to_owned())
        };
        let actions = Worker::start(home.clone(), "huddle-actions")?;
        let media = Worker::start(home.clone(), "huddle-media")?;
        let bound = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, opts.port))
            .await
            .map_err(|e| {
                ClientError::Usage(format!("cannot listen on 127.0.0.1:{}: {e}", opts.port))
            })?;
        let addr = bound
            .local_addr()
            .map_err(|e| ClientError::Io(e.to_string()))?;
        let token = hex::encode(rand::random::<[u8; 32]>());
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let app = Arc::new(App {
            user,
            principal,
            port: addr.port(),
            token,
            home: home.clone(),
            actions,
            media,
            feed,
            link: std::sync::Mutex::new(serde_json::json!({"kind": "link", "state": "connecting"})),
            requests: Arc::new(Semaphore::new(MAX_REQUESTS)),
            event_streams: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
            media_streams: Arc::new(Semaphore::new(MAX_MEDIA_STREAMS)),
            cache: std::sync::Mutex::new(media::Cache::new(CACHE_BYTES)),
            uploads: upload::Uploads::new(),
        });
        app.uploads.recover(&app)?;
        let (stop, stopped) = watch::channel(false);
        let url = format!("http://127.0.0.1:{}/?token={}", addr.port(), app.token);
        let router = api::router(app.clone());
        let serve = tokio::spawn(accept_loop(
            bound,
            router,
            opts.header_timeout,
            stopped.clone(),
        ));
        let listen = listen_thread(app.clone(), home, stopped)?;
        Ok(WebServer {
            url,
            addr,
            stop,
            serve,
            listen,
        })
    }

    /// The URL to open, with its access token.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving (open event streams end) and stops listening.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        // Streams still open are cut after a short grace.
        let _ = tokio::time::timeout(Duration::from_secs(3), self.serve).await;
        let listen = self.listen;
        let _ = tokio::task::spawn_blocking(move || listen.join()).await;
    }
}

/// Connections open at once; one more is closed as soon as it is
/// accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a connection may take to send a request's head (its line and
/// headers) before it is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on `bound` and serves each over HTTP/1.1, at most
/// [`MAX_CONNECTIONS`] at once, each given `header_timeout` to send a
/// request's head (so a client that opens connections and says nothing,
/// token or not, holds none for long), until `stopped`.
async fn accept_loop(
    bound: tokio::net::TcpListener,
    router: axum::Router,
    header_timeout: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = async { stopped.wait_for(|v| *v).await.is_ok() } => break,
            accepted = bound.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait, do not spin.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            // Dropped: closed at once.
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        conns.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!("web connection: {e}");
            }
        });
        // Reap the finished ones, so the set holds only open connections.
        while conns.try_join_next().is_some() {}
    }
    // Open connections (event streams never end by themselves) go with
    // the server.
    conns.shutdown().await;
}

/// Messages kept for event streams that fall behind; one further behind
/// is told to reload.
const FEED_CAPACITY: usize = 1024;

/// What the handlers share.
pub(crate) struct App {
    /// This device's user.
    user: String,
    /// This device's principal (`alice`, `alice/2`).
    principal: String,
    port: u16,
    token: String,
    home: Home,
    /// Texts, membership, reads of the local state.
    actions: Worker,
    /// Range reads for the player.
    media: Worker,
    /// What event streams pass to the page (JSON objects).
    feed: broadcast::Sender<Arc<str>>,
    /// The listener's connection state as last reported.
    link: std::sync::Mutex<serde_json::Value>,
    requests: Arc<Semaphore>,
    event_streams: Arc<Semaphore>,
    media_streams: Arc<Semaphore>,
    cache: std::sync::Mutex<media::Cache>,
    uploads: upload::Uploads,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("principal", &self.principal)
            .field("port", &self.port)
            .finish()
    }
}

impl App {
    /// Whether `from` (an event's sender) is this user, on any device.
    fn is_own(&self, from: &str) -> bool {
        huddle_core::devices::user_part(from) == self.user
    }

    /// An event as the page gets it: the event's JSON with `own` beside.
    fn event_json(&self, e: &Event) -> serde_json::Value {
        let mut v = serde_json::to_value(e).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("own".into(), self.is_own(&e.from).into());
            // What the terminal prints, without the group's name in front.
            let line = e.human();
            let line = match line.split_once("] ") {
                Some((g, rest)) if g.starts_with('[') => rest.to_owned(),
                _ => line,
            };
            o.insert("line".into(), line.into());
        }
        v
    }

    /// Events as the page gets them.
    fn events_json(&self, events: &[Event]) -> Vec<serde_json::Value> {
        events.iter().map(|e| self.event_json(e)).collect()
    }

    /// Passes `v` to every open event stream.
    fn publish(&self, v: &serde_json::Value) {
        // No stream open: nobody to tell.
        let _ = self.feed.send(Arc::from(v.to_string()));
    }

    fn publish_event(&self, e: &Event) {
        self.publish(&serde_json::json!({"kind": "event", "event": self.event_json(e)}));
    }

    fn publish_link(&self, l: &Link) {
        let mut v = serde_json::to_value(l).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("kind".into(), "link".into());
        }
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = v.clone();
        self.publish(&v);
    }
}

/// The listener's thread: its own client and runtime (a client's futures
/// stay on one thread).
fn listen_thread(
    app: Arc<App>,
    home: Home,
    stopped: watch::Receiver<bool>,
) -> Result<std::thread::JoinHandle<()>> {
    let client = Client::open(home)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Io(e.to_string()))?;
    std::thread::Builder::new()
        .name("huddle-listen".into())
        .spawn(move || rt.block_on(listen_loop(app, client, stopped)))
        .map_err(|e| ClientError::Io(format!("cannot start a thread: {e}")))
}

/// Runs the push stream until the server stops, reporting what arrives
/// and the connection's state; a failure to connect at all is retried.
async fn listen_loop(app: Arc<App>, mut client: Client, mut stopped: watch::Receiver<bool>) {
    loop {
        let mut s = stopped.clone();
        let stop = async move {
            let _ = s.wait_for(|v| *v).await;
        };
        let (a, b) = (app.clone(), app.clone());
        let r = client
            .listen_with(
                move |e| a.publish_event(e),
                move |l| b.publish_link(&l),
                stop,
            )
            .await;
        if *stopped.borrow() {
            return;
        }
        let reason = match r {
            Ok(()) => return,
            Err(e) => e.to_string(),
        };
        tracing::warn!("listening failed: {reason}");
        app.publish_link(&Link::Lost {
            reason,
            retry_in_s: LISTEN_RETRY.as_secs(),
        });
        tokio::select! {
            _ = stopped.wait_for(|v| *v) => return,
            () = tokio::time::sleep(LISTEN_RETRY) => {}
        }
    }
}
