//! Shared set-up for the delivery service's integration tests: a server
//! in-process or as a real `huddle-server` process, on 127.0.0.1 with a
//! fresh data dir; raw connections and full clients against it.
#![allow(dead_code, clippy::unwrap_used)]

pub mod raw;
pub mod services;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use huddle_client::identity::Identity;
use huddle_client::net::{Connection, Trust};
use huddle_client::{Client, Home};
use huddle_core::proto::{Request, Response};
use huddle_server::{Running, ServerConfig};

/// A server running inside the test process: on the embedded store, or
/// with `HUDDLE_TEST_STORE=postgres` on a schema of its own in the
/// `HUDDLE_TEST_POSTGRES` database.
pub struct InProcess {
    pub running: Option<Running>,
    pub addr: String,
    pub dir: tempfile::TempDir,
    pub db: Option<PgSchema>,
    /// With `HUDDLE_TEST_BLOBS=s3`: the object store the blobs go to.
    pub objects: Option<services::PrivateS3>,
}

impl InProcess {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("ds"),
            maintenance_interval: std::time::Duration::from_millis(100),
            ..ServerConfig::default()
        };
        let db = match std::env::var("HUDDLE_TEST_STORE").as_deref() {
            Ok("postgres") => {
                let db = PgSchema::new("the in-process DS on PostgreSQL")
                    .expect("HUDDLE_TEST_STORE=postgres needs HUDDLE_TEST_POSTGRES");
                config.store_url = Some(db.url.clone());
                Some(db)
            }
            _ => None,
        };
        let objects = match std::env::var("HUDDLE_TEST_BLOBS").as_deref() {
            Ok("s3") => {
                let s3 = services::PrivateS3::start("the in-process DS on an object store")
                    .expect("HUDDLE_TEST_BLOBS=s3 needs HUDDLE_TEST_S3FS");
                s3.apply(&mut config);
                Some(s3)
            }
            _ => None,
        };
        tune(&mut config);
        let running = huddle_server::start(config).await.unwrap();
        let addr = running.addr.to_string();
        Self {
            running: Some(running),
            addr,
            dir,
            db,
            objects,
        }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("ds").join("cert.pem")
    }

    pub fn trust(&self) -> Trust {
        Trust::Pinned(huddle_client::home::read_pem_certs(&self.cert_path()).unwrap())
    }

    /// A raw, unauthenticated connection.
    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.addr, self.trust()).await.unwrap()
    }

    /// A raw connection authenticated as a freshly registered user.
    pub async fn user(&self, name: &str) -> (Connection, Identity) {
        let c = self.connect().await;
        let id = Identity::generate(name);
        c.authenticate(&id, true).await.unwrap();
        (c, id)
    }

    pub fn home(&self, name: &str) -> Home {
        Home::new(self.dir.path().join(format!("home-{name}")))
    }

    /// A full client, registered.
    pub async fn client(&self, name: &str) -> Client {
        Client::register(self.home(name), name, &self.addr, Some(&self.cert_path()))
            .await
            .unwrap()
    }
}

/// A real `huddle-server` process.
pub struct Process {
    pub child: Child,
    pub addr: String,
    pub fingerprint: String,
    pub data_dir: PathBuf,
}

impl Process {
    /// Starts the binary on `listen` (use port 0 for any) with `data_dir`,
    /// and waits for its "listening on" line.
    pub fn start(data_dir: &Path, listen: &str) -> Self {
        Self::start_with(data_dir, listen, &[])
    }

    /// Like [`Process::start`], with limits set (`NAME=VALUE`).
    pub fn start_with(data_dir: &Path, listen: &str, limits: &[&str]) -> Self {
        let args: Vec<&str> = limits.iter().flat_map(|l| ["--limit", l]).collect();
        Self::start_args(data_dir, listen, &args)
    }

    /// Like [`Process::start`], with more arguments.
    pub fn start_args(data_dir: &Path, listen: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_huddle-server"))
            .args(["--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_owned();
        let fingerprint = line
            .split("SHA-256 ")
            .nth(1)
            .map(|r| r.trim_end_matches([')', '\n']).to_owned())
            .unwrap_or_default();
        Self {
            child,
            addr,
            fingerprint,
            data_dir: data_dir.to_owned(),
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.addr.clone()
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }

    pub fn cert_path(&self) -> PathBuf {
        self.data_dir.join("cert.pem")
    }

    pub fn trust(&self) -> Trust {
        Trust::Pinned(huddle_client::home::read_pem_certs(&self.cert_path()).unwrap())
    }

    /// A field of /proc/PID/status, in KiB (VmRSS, VmHWM) or a count
    /// (Threads).
    pub fn status(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// A raw connection authenticated as a freshly registered user.
    pub async fn user(&self, name: &str) -> (Connection, Identity) {
        let c = Connection::connect(&self.addr, self.trust()).await.unwrap();
        let id = Identity::generate(name);
        c.authenticate(&id, true).await.unwrap();
        (c, id)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The error code of a failed request.
/// Opens a raw push stream for `client`'s group `group` from the client's
/// cursor, without the inbox: what the DS pushes can be read and timed.
pub async fn subscribe_raw(
    client: &mut Client,
    group: huddle_core::GroupId,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (_, _, cursor) = client.group_state(&group.to_string()).unwrap();
    let (send, recv, _) = client
        .net()
        .await
        .unwrap()
        .open(&Request::Subscribe {
            groups: vec![(group, cursor)],
            inbox_after: u64::MAX - 1,
        })
        .await
        .unwrap();
    (send, recv)
}

pub fn code(r: huddle_client::Result<Response>) -> huddle_core::proto::ErrorCode {
    match r {
        Err(huddle_client::ClientError::Server(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// Asserts that `r` is a server refusal with `code` whose message says
/// `reason`: the refusal is for the reason the test means, not any other
/// that shares the code.
#[track_caller]
pub fn refused(
    r: huddle_client::Result<Response>,
    want: huddle_core::proto::ErrorCode,
    reason: &str,
) {
    match r {
        Err(huddle_client::ClientError::Server(e)) => {
            assert_eq!(e.code, want, "{}", e.message);
            assert!(
                e.message.contains(reason),
                "refused for another reason: {:?} (expected one saying {reason:?})",
                e.message
            );
        }
        other => panic!("expected a server refusal, got {other:?}"),
    }
}

pub async fn kp_count(c: &Connection) -> (u32, bool) {
    match c.request(&Request::KeyPackageCount).await.unwrap() {
        Response::KeyPackageCount {
            available,
            last_resort,
        } => (available, last_resort),
        other => panic!("{other:?}"),
    }
}

/// The text messages among `events`, as `from: text`.
pub fn texts(events: &[huddle_client::Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.kind == "text")
        .map(|e| format!("{}: {}", e.from, e.text().unwrap_or("")))
        .collect()
}

/// Runs `f` on a thread of its own: the blocking PostgreSQL client may not
/// run on a thread that drives async tasks.
pub fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}

/// A schema of its own in the test database, dropped at the end; the URL
/// the DS is given selects it.
pub struct PgSchema {
    admin: String,
    /// The schema's name.
    pub name: String,
    /// The address that selects the schema.
    pub url: String,
}

impl PgSchema {
    pub fn new(test: &str) -> Option<Self> {
        let Ok(admin) = std::env::var("HUDDLE_TEST_POSTGRES") else {
            eprintln!("skipped {test}: HUDDLE_TEST_POSTGRES is not set");
            return None;
        };
        let name = format!("huddle_test_{}", hex::encode(rand::random::<[u8; 8]>()));
        off_runtime(|| {
            let mut c = postgres::Client::connect(&admin, postgres::NoTls)
                .unwrap_or_else(|e| panic!("HUDDLE_TEST_POSTGRES={admin}: {e}"));
            c.batch_execute(&format!("CREATE SCHEMA {name}")).unwrap();
        });
        let sep = if admin.contains('?') { '&' } else { '?' };
        let url = format!("{admin}{sep}options=-c%20search_path%3D{name}");
        Some(Self { admin, name, url })
    }

    /// The database server's TCP address, for a proxy in front of it.
    pub async fn target(&self) -> std::net::SocketAddr {
        let admin: postgres::Config = self.url.parse().unwrap();
        let host = match &admin.get_hosts()[0] {
            postgres::config::Host::Tcp(h) => h.clone(),
            other => panic!("HUDDLE_TEST_POSTGRES must name a TCP host, not {other:?}"),
        };
        let port = admin.get_ports().first().copied().unwrap_or(5432);
        let found = tokio::net::lookup_host((host.as_str(), port))
            .await
            .unwrap()
            .next()
            .unwrap();
        found
    }

    /// The address that selects the schema through a proxy on `port` of
    /// 127.0.0.1.
    pub fn url_via(&self, port: u16) -> String {
        let admin: postgres::Config = self.url.parse().unwrap();
        format!(
            "postgres://{}@127.0.0.1:{port}/{}?options=-c%20search_path%3D{}",
            admin.get_user().unwrap_or("postgres"),
            admin.get_dbname().unwrap_or("postgres"),
            self.name,
        )
    }

    pub fn count(&self, sql: &str) -> i64 {
        off_runtime(|| {
            let mut c = postgres::Client::connect(&self.url, postgres::NoTls).unwrap();
            c.query_one(sql, &[]).unwrap().get(0)
        })
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        off_runtime(|| {
            if let Ok(mut c) = postgres::Client::connect(&self.admin, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
            }
        });
    }
}

/// A TCP forwarder (to the database, to the bus) that the test cuts and
/// restores, as a restart of that service or a broken network would.
pub struct Cuttable {
    pub port: u16,
    target: std::net::SocketAddr,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Cuttable {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let mut c = Self {
            port: 0,
            target,
            tasks: Default::default(),
        };
        c.resume().await;
        c
    }

    /// Accepts connections again, on the same port.
    pub async fn resume(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        self.port = listener.local_addr().unwrap().port();
        let (target, tasks) = (self.target, self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Closes every connection and stops listening.
    pub fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// The NATS server for cluster tests (`HUDDLE_TEST_NATS`, `nats://…`), or
/// `None` after saying that `test` was skipped.
pub fn nats(test: &str) -> Option<String> {
    match std::env::var("HUDDLE_TEST_NATS") {
        Ok(url) => Some(url),
        Err(_) => {
            eprintln!("skipped {test}: HUDDLE_TEST_NATS is not set");
            None
        }
    }
}

/// `client.listen` as a future that ends when the returned sender fires,
/// and a receiver of every event it reports. (A client's listen runs in
/// the task that awaits it: the client's database is not shared between
/// threads.)
pub fn listening(
    client: &mut Client,
) -> (
    impl std::future::Future<Output = ()> + '_,
    tokio::sync::mpsc::UnboundedReceiver<huddle_client::Event>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = async move {
        client
            .listen(
                move |e| {
                    let _ = tx.send(e.clone());
                },
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
            .unwrap();
    };
    (listener, rx, stop_tx)
}

/// The next event `listen` reports that `wanted` accepts, waiting at most
/// `within`; `what` names it in the failure.
pub async fn next_event(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<huddle_client::Event>,
    within: std::time::Duration,
    what: &str,
    wanted: impl Fn(&huddle_client::Event) -> bool,
) -> huddle_client::Event {
    let deadline = tokio::time::Instant::now() + within;
    let mut skipped = Vec::new();
    loop {
        let e = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {within:?}; other events: {skipped:?}"))
            .expect("listen ended");
        if wanted(&e) {
            return e;
        }
        skipped.push(e);
    }
}
