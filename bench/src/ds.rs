//! The delivery service under test, and peak-memory readings of processes.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context as _};

use crate::Target;

/// A delivery service: started by the tool, or given.
#[derive(Debug)]
pub struct Ds {
    /// Address.
    pub addr: String,
    /// Certificate (PEM).
    pub cert: PathBuf,
    child: Option<Child>,
    /// Data dir of a started server.
    pub data_dir: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
    /// Arguments a started server was given besides its address and data
    /// dir (a cluster node's store, bus and certificate), for restarts.
    extra: Vec<String>,
}

/// The DS's work counters by name (server/src/metrics.rs: `rounds`,
/// `entries`, `transactions`, `group_writes`, `push_writes`, `pushed`),
/// with `dump`, the number of the SIGUSR1 they answer.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(transparent)]
pub struct Counters(std::collections::BTreeMap<String, u64>);

impl Counters {
    /// One counter (0 if the DS does not have it).
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// These and `other`'s together (several nodes' counters).
    pub fn plus(&self, other: &Counters) -> Counters {
        let mut sum = self.0.clone();
        for (k, v) in &other.0 {
            *sum.entry(k.clone()).or_default() += v;
        }
        Counters(sum)
    }

    /// What happened between `earlier` and this.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(earlier.get(k))))
                .collect(),
        )
    }
}

fn read_counters(path: &Path) -> Option<Counters> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// A binary built next to this one (`cargo build --release --bins`).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .map(|d| d.join(name))
        .context("locating the binary directory")?;
    if !p.exists() {
        bail!(
            "{} not found next to huddle-bench; build it first: cargo build --release --bins",
            p.display()
        );
    }
    Ok(p)
}

impl Ds {
    /// The target of the command line: a fresh server, or the given one.
    pub fn start(target: &Target) -> anyhow::Result<Self> {
        match (&target.server, &target.server_cert) {
            (Some(addr), Some(cert)) => Ok(Self {
                addr: addr.clone(),
                cert: cert.clone(),
                child: None,
                data_dir: None,
                _dir: None,
                extra: Vec::new(),
            }),
            _ => Self::spawn(),
        }
    }

    /// Starts `huddle-server` on 127.0.0.1 with a fresh data dir.
    pub fn spawn() -> anyhow::Result<Self> {
        Self::spawn_with(Vec::new())
    }

    /// Like [`Ds::spawn`], with more arguments (`--store`, `--bus`,
    /// `--cert PEM --key PEM`), kept for restarts.
    pub fn spawn_with(extra: Vec<String>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("huddle-bench-").tempdir()?;
        let data_dir = dir.path().join("ds");
        Self::spawn_at(dir, data_dir, "127.0.0.1:0", extra)
    }

    /// The DS's work counters now (`huddle-server --stats-file`: asked for
    /// with SIGUSR1); `None` for a DS this tool did not start.
    pub fn counters(&self) -> Option<Counters> {
        let child = self.child.as_ref()?;
        let path = self._dir.as_ref()?.path().join("stats.json");
        let before = read_counters(&path).map_or(0, |c| c.get("dump"));
        Command::new("kill")
            .args(["-USR1", &child.id().to_string()])
            .status()
            .ok()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if let Some(c) = read_counters(&path).filter(|c| c.get("dump") > before) {
                return Some(c);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        None
    }

    /// Kills the server with SIGKILL (no chance to clean up) and starts it
    /// again on the same address and data dir.
    pub fn kill9_and_restart(mut self) -> anyhow::Result<Self> {
        let mut child = self
            .child
            .take()
            .context("only a started server can be killed")?;
        child.kill()?;
        child.wait()?;
        let dir = self._dir.take().context("data dir")?;
        let data_dir = self.data_dir.take().context("data dir")?;
        let addr = self.addr.clone();
        let extra = std::mem::take(&mut self.extra);
        Self::spawn_at(dir, data_dir, &addr, extra)
    }

    fn spawn_at(
        dir: tempfile::TempDir,
        data_dir: PathBuf,
        listen: &str,
        extra: Vec<String>,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(sibling("huddle-server")?)
            .env_remove(crate::MALLOC_THRESHOLD_ENV)
            .args([
                "--listen",
                listen,
                "--max-connections",
                "50000",
                "--data-dir",
            ])
            .arg(&data_dir)
            .arg("--stats-file")
            .arg(dir.path().join("stats.json"))
            .args(&extra)
            .env(
                "RUST_LOG",
                std::env::var("DS_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting huddle-server")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .with_context(|| format!("unexpected server output {line:?}"))?
            .to_owned();
        // A node given the cluster's certificate presents that one.
        let cert = extra
            .iter()
            .position(|a| a == "--cert")
            .and_then(|i| extra.get(i + 1))
            .map_or_else(|| data_dir.join("cert.pem"), PathBuf::from);
        Ok(Self {
            addr,
            cert,
            child: Some(child),
            data_dir: Some(data_dir),
            _dir: Some(dir),
            extra,
        })
    }

    /// The server's process id, when the tool started it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Peak resident memory of the server so far, in MiB.
    pub fn peak_rss_mb(&self) -> Option<f64> {
        self.pid().and_then(peak_rss_mb)
    }

    /// Current resident memory of the server, in MiB.
    pub fn rss_mb(&self) -> Option<f64> {
        self.pid()
            .and_then(|p| status_kb(p, "VmRSS:"))
            .map(|k| k / 1024.0)
    }

    /// Bytes written to disk by the server so far (from /proc/PID/io).
    pub fn bytes_written(&self) -> Option<u64> {
        let pid = self.pid()?;
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Ds {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn status_kb(pid: u32, key: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Peak resident memory (VmHWM) of a process, in MiB.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    status_kb(pid, "VmHWM:").map(|k| k / 1024.0)
}

/// Peak resident memory of this process, in MiB.
pub fn own_peak_rss_mb() -> Option<f64> {
    peak_rss_mb(std::process::id())
}

/// The numeric fields of `/proc/PID/stat` from field 4 (ppid) on: the
/// command name before them may contain spaces, so parsing starts after
/// its closing parenthesis and the state letter. Index `i` is field `i + 4`.
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// Clock ticks per second in `/proc` (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU time (user + system, all threads) a process has used so far, in
/// seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let f = stat_fields(&pid.to_string())?;
    // utime and stime are fields 14 and 15 of the stat line.
    Some((f.get(10)? + f.get(11)?) as f64 / TICKS)
}

/// CPU time of a process so far, split into (user, system) seconds.
pub fn cpu_split(pid: u32) -> Option<(f64, f64)> {
    let f = stat_fields(&pid.to_string())?;
    Some((*f.get(10)? as f64 / TICKS, *f.get(11)? as f64 / TICKS))
}

/// CPU time of this process's waited-for children, (user, system) seconds.
pub fn children_cpu_split() -> Option<(f64, f64)> {
    let f = stat_fields("self")?;
    Some((*f.get(12)? as f64 / TICKS, *f.get(13)? as f64 / TICKS))
}

/// Runs a child process to completion, sampling its peak RSS until it
/// exits. Returns (success, stdout, peak RSS in MiB).
pub async fn run_measured(cmd: &Path, args: &[String]) -> anyhow::Result<(bool, String, f64)> {
    let child = tokio::process::Command::new(cmd)
        .env_remove(crate::MALLOC_THRESHOLD_ENV)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", cmd.display()))?;
    let pid = child.id().context("child pid")?;
    let mut peak = 0.0f64;
    let wait = child.wait_with_output();
    tokio::pin!(wait);
    loop {
        tokio::select! {
            out = &mut wait => {
                let out = out?;
                return Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), peak));
            }
            _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {
                if let Some(p) = peak_rss_mb(pid) {
                    peak = peak.max(p);
                }
            }
        }
    }
}
