//! Shared set-up for integration tests: a real delivery service on
//! 127.0.0.1:0 with a fresh data dir, and clients in their own homes.
#![allow(dead_code)]

#[path = "../../../server/tests/common/services.rs"]
pub mod services;

use std::path::{Path, PathBuf};
use std::process::Command;

use huddle_client::{Client, Event, Home};
use huddle_server::{Running, ServerConfig};

pub struct TestServer {
    pub running: Option<Running>,
    pub addr: String,
    pub data_dir: PathBuf,
    pub dir: tempfile::TempDir,
    pub config: ServerConfig,
    /// With `HUDDLE_TEST_BLOBS=s3`: the object store the blobs go to.
    pub objects: Option<services::PrivateS3>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl Fn(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("ds");
        let mut config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: data_dir.clone(),
            maintenance_interval: std::time::Duration::from_millis(100),
            ..ServerConfig::default()
        };
        let objects = match std::env::var("HUDDLE_TEST_BLOBS").as_deref() {
            Ok("s3") => {
                let s3 = services::PrivateS3::start("media on an object store")
                    .expect("HUDDLE_TEST_BLOBS=s3 needs HUDDLE_TEST_S3FS");
                s3.apply(&mut config);
                Some(s3)
            }
            _ => None,
        };
        tune(&mut config);
        let running = huddle_server::start(config.clone()).await.unwrap();
        let addr = running.addr.to_string();
        Self {
            running: Some(running),
            addr,
            data_dir,
            dir,
            config,
            objects,
        }
    }

    /// Where the stored blob of media item `media` is, as a file.
    pub fn blob_path(&self, media: &str) -> PathBuf {
        match &self.objects {
            Some(s3) => s3.object_path(media),
            None => self.data_dir.join("blobs").join(format!("{media}.blob")),
        }
    }

    /// The folders that hold the DS's state and blobs.
    pub fn stored_dirs(&self) -> Vec<PathBuf> {
        let mut out = vec![self.data_dir.clone()];
        out.extend(self.objects.as_ref().map(|s3| s3.root().to_owned()));
        out
    }

    pub fn cert(&self) -> PathBuf {
        self.data_dir.join("cert.pem")
    }

    pub fn home(&self, name: &str) -> Home {
        Home::new(self.dir.path().join(format!("home-{name}")))
    }

    pub async fn register(&self, name: &str) -> Client {
        Client::register(self.home(name), name, &self.addr, Some(&self.cert()))
            .await
            .unwrap_or_else(|e| panic!("register {name}: {e}"))
    }

    /// Stops the server gracefully and starts it again on the same port and
    /// data dir.
    pub async fn restart(&mut self) {
        let port: u16 = self.addr.rsplit(':').next().unwrap().parse().unwrap();
        self.running.take().unwrap().shutdown().await;
        let mut config = self.config.clone();
        config.listen = format!("127.0.0.1:{port}").parse().unwrap();
        self.running = Some(huddle_server::start(config).await.unwrap());
    }
}

pub fn texts(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.kind == "text")
        .map(|e| format!("{}: {}", e.from, e.text().unwrap_or("")))
        .collect()
}

pub fn cert_of(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Runs `huddle --home HOME ARGS...`: (success, stdout, stderr).
pub fn huddle(home: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_huddle"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `huddle`, which must succeed; its standard output.
pub fn ok(home: &Path, args: &[&str]) -> String {
    let (success, stdout, stderr) = huddle(home, args);
    assert!(success, "huddle {args:?} failed: {stderr}");
    stdout
}

/// JSON Lines.
pub fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// Distinctive, incompressible-looking, reproducible bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}
