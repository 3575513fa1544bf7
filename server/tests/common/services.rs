//! A PostgreSQL server and a NATS server of a test's own, which the test
//! stops and starts again for real (what an operator's restart does: the
//! sessions are ended by the server, new connections are refused until it
//! is back). Run when the shared services are configured
//! (`HUDDLE_TEST_POSTGRES`, `HUDDLE_TEST_NATS`); their programs are found
//! on `PATH`, in `/usr/sbin` or through `HUDDLE_TEST_PG_BIN` /
//! `HUDDLE_TEST_NATS_SERVER`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it
/// right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `name` in the directory `env` names, else on `PATH`, else in `fallback`.
fn program(name: &str, env: &str, fallback: &[&str]) -> PathBuf {
    if let Ok(dir) = std::env::var(env) {
        let p = Path::new(&dir);
        return if p.is_dir() {
            p.join(name)
        } else {
            p.to_path_buf()
        };
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(fallback.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| panic!("{name} was not found (set {env})"))
}

/// Whether the tests run as root (the effective user id of this process,
/// from /proc).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let uid = s.lines().find(|l| l.starts_with("Uid:"))?;
            uid.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// A PostgreSQL server in a temporary directory, on a port of its own.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    pub port: u16,
    pg_ctl: PathBuf,
}

impl PrivatePostgres {
    /// `None` (after saying so) when PostgreSQL tests are not configured.
    pub fn start(test: &str) -> Option<Self> {
        if std::env::var("HUDDLE_TEST_POSTGRES").is_err() {
            eprintln!("skipped {test}: HUDDLE_TEST_POSTGRES is not set");
            return None;
        }
        let bin = ["/usr/lib/postgresql/15/bin", "/usr/local/bin"];
        let initdb = program("initdb", "HUDDLE_TEST_PG_BIN", &bin);
        let pg_ctl = program("pg_ctl", "HUDDLE_TEST_PG_BIN", &bin);
        let dir = tempfile::tempdir().unwrap();
        let s = Self {
            port: free_port(),
            dir,
            pg_ctl,
        };
        if is_root() {
            // PostgreSQL refuses to run as root: its files belong to the
            // `postgres` account.
            let ok = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(s.dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown postgres {}", s.dir.path().display());
        }
        let out = s
            .as_postgres(&initdb)
            .arg("-D")
            .arg(s.data())
            .args(["--no-sync", "-A", "trust", "-U", "root", "-E", "UTF8"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {out:?}");
        s.up();
        Some(s)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn as_postgres(&self, program: &Path) -> Command {
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        c.stdin(Stdio::null());
        c
    }

    /// The address of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://root@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn up(&self) {
        let out = self
            .as_postgres(&self.pg_ctl)
            .arg("-D")
            .arg(self.data())
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1",
                self.port,
                self.dir.path().display()
            ))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "start"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl start: {out:?}");
    }

    /// Stops the server the way an operator's restart does (`-m fast`:
    /// every session is ended, open transactions rolled back).
    pub fn down(&self) {
        let out = self
            .as_postgres(&self.pg_ctl)
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "stop"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl stop: {out:?}");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .as_postgres(&self.pg_ctl)
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A NATS server on a port of its own (no JetStream: the DS does not use
/// it).
pub struct PrivateNats {
    pub port: u16,
    program: PathBuf,
    child: Option<Child>,
    /// The user and password it requires, if any.
    auth: Option<(String, String)>,
    /// More arguments to `nats-server` (TLS).
    extra: Vec<String>,
}

impl PrivateNats {
    /// `None` (after saying so) when NATS tests are not configured.
    pub fn start(test: &str) -> Option<Self> {
        if std::env::var("HUDDLE_TEST_NATS").is_err() {
            eprintln!("skipped {test}: HUDDLE_TEST_NATS is not set");
            return None;
        }
        let mut s = Self {
            port: free_port(),
            program: program("nats-server", "HUDDLE_TEST_NATS_SERVER", &["/usr/sbin"]),
            child: None,
            auth: None,
            extra: Vec::new(),
        };
        s.up();
        Some(s)
    }

    /// Like [`PrivateNats::start`], for a server that speaks only TLS with
    /// the certificate and key in `cert` and `key` (PEM files).
    pub fn start_with_tls(test: &str, cert: &Path, key: &Path) -> Option<Self> {
        let mut s = Self::start(test)?;
        s.down();
        s.extra = vec![
            "--tls".into(),
            "--tlscert".into(),
            cert.display().to_string(),
            "--tlskey".into(),
            key.display().to_string(),
        ];
        s.up();
        Some(s)
    }

    /// Like [`PrivateNats::start`], for a server that requires `user` and
    /// `password`.
    pub fn start_with_password(test: &str, user: &str, password: &str) -> Option<Self> {
        let mut s = Self::start(test)?;
        s.down();
        s.auth = Some((user.into(), password.into()));
        s.up();
        Some(s)
    }

    /// Its address, without credentials.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn up(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new(&self.program);
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some((user, password)) = &self.auth {
            cmd.args(["--user", user, "--pass", password]);
        }
        cmd.args(&self.extra);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGKILL: whatever it held in flight is gone).
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.down();
    }
}

/// An S3-compatible object store of the test's own: `s3s-fs` (from
/// crates.io; `.ci/run` installs it) on a port of its own, keeping objects
/// as plain files under a temporary directory, so a test can look at and
/// damage what the DS stored. Run when `HUDDLE_TEST_S3FS` names the
/// program.
pub struct PrivateS3 {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

impl PrivateS3 {
    /// The bucket the DS is given, and the folder its blobs go to.
    pub const BUCKET: &'static str = "huddle";
    pub const PREFIX: &'static str = "blobs";

    /// `None` (after saying so) when object store tests are not configured.
    pub fn start(test: &str) -> Option<Self> {
        let Ok(program) = std::env::var("HUDDLE_TEST_S3FS") else {
            eprintln!("skipped {test}: HUDDLE_TEST_S3FS is not set");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(Self::BUCKET)).unwrap();
        let port = free_port();
        let child = Command::new(&program)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--access-key",
                &Self::keys().0,
                "--secret-key",
                &Self::keys().1,
            ])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("HUDDLE_TEST_S3FS={program}: {e}"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Some(Self { dir, port, child })
    }

    /// The access key id and secret it takes.
    pub fn keys() -> (String, String) {
        ("huddle-test".into(), "huddle-test-secret".into())
    }

    /// Points a DS's configuration at this store (address and keys).
    pub fn apply(&self, c: &mut huddle_server::ServerConfig) {
        c.blobs_url = Some(self.url());
        c.blob_keys = Some(Self::keys());
    }

    /// What `--blobs` is given.
    pub fn url(&self) -> String {
        format!(
            "s3://{}/{}?endpoint=http://127.0.0.1:{}",
            Self::BUCKET,
            Self::PREFIX,
            self.port
        )
    }

    /// The file that holds the object of media item `media`.
    pub fn object_path(&self, media: &str) -> PathBuf {
        self.objects_dir().join(media)
    }

    /// The folder of every blob's object.
    pub fn objects_dir(&self) -> PathBuf {
        self.dir.path().join(Self::BUCKET).join(Self::PREFIX)
    }

    /// Everything the store holds (objects, unfinished uploads' parts).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Files of unfinished multipart uploads: their parts and records.
    pub fn upload_files(&self) -> usize {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".upload_id-")
            })
            .count()
    }
}

impl Drop for PrivateS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
