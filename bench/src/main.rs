//! `huddle-bench`: load benchmarks against the Huddle delivery service.
//!
//! Every scenario runs against a delivery service the tool starts itself (a
//! real `huddle-server` process on 127.0.0.1 with a fresh data dir, found
//! next to this binary) or one given with `--server ADDR --server-cert PEM`,
//! and measures the matching raw-quinn baseline in the same invocation, so
//! results are reported as ratios as well as absolute figures.
#![forbid(unsafe_code)]

mod baseline;
mod cluster;
mod ds;
mod lean;
mod light;
mod report;
mod scenarios;
mod units;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Load benchmarks for the Huddle delivery service.
#[derive(Debug, Parser)]
#[command(name = "huddle-bench", version)]
struct Cli {
    /// Print one JSON object per scenario instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Draw the latency distribution (CDF) to this SVG file.
    #[arg(long, global = true, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

/// Where the delivery service under test runs.
#[derive(Debug, Args, Clone)]
pub struct Target {
    /// Use this delivery service instead of starting one.
    #[arg(long, requires = "server_cert")]
    pub server: Option<String>,
    /// Its certificate (PEM).
    #[arg(long)]
    pub server_cert: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Groups of members, some sending application messages; deliveries per
    /// second and end-to-end latency, against raw quinn push.
    Fanout(scenarios::fanout::Params),
    /// Create a group with one commit, then add-one, remove-one and
    /// self-update: commit size, accept time, time until every member has it.
    Membership(scenarios::membership::Params),
    /// A user in G groups links a new device: time from the approval until
    /// the device is in all G groups (full clients).
    Link(scenarios::link::Params),
    /// One member uploads a file, others download it concurrently: MB/s
    /// against raw quinn bulk, peak RSS of every process.
    Media(scenarios::media::Params),
    /// Many authenticated idle connections: DS memory per connection and
    /// time to connect them.
    Connections(scenarios::connections::Params),
    /// A member offline during N messages comes back: DS delivery rate and
    /// the full client's processing rate.
    Catchup(scenarios::catchup::Params),
    /// Kill the DS with SIGKILL N times under text and media traffic; check
    /// that nothing acknowledged is lost, duplicated or reordered.
    Crash(scenarios::crash::Params),
    /// What one hostile member can cost the DS: each attack of the security
    /// review held in turn while an honest user probes; DS memory, threads
    /// and the honest user's latency.
    Abuse(scenarios::abuse::Params),
    /// Raw quinn between two processes: bulk throughput of one stream and
    /// push throughput of frames to many connections.
    Baseline(scenarios::baseline::Params),
    /// Internal: the raw-quinn peer process of the baseline.
    #[command(hide = true)]
    RawServer {
        /// Where to write the peer's certificate (DER).
        #[arg(long)]
        cert_out: PathBuf,
        /// Largest UDP payload accepted and probed for.
        #[arg(long, default_value_t = huddle_core::proto::MAX_UDP_PAYLOAD)]
        max_udp_payload: u16,
    },
}

/// glibc's allocator raises its mmap threshold (up to 32 MiB) each time a
/// large block is freed; after that, a large zeroed allocation comes from
/// the heap and is written page by page. Every simulated client here has
/// its own quinn endpoint with a 12 MiB receive buffer (6,000-byte payload x
/// 64 GRO segments x 32 datagrams) that it barely touches; zeroed on the
/// heap, 10,000 of them took 24 GB. The benchmark therefore runs itself
/// with a fixed threshold (so such buffers stay untouched mappings), and
/// its children (DS, `huddle`, the raw peer) without it, as users run them.
const MALLOC_THRESHOLD_ENV: &str = "MALLOC_MMAP_THRESHOLD_";

/// Runs this same command again with [`MALLOC_THRESHOLD_ENV`] set, unless
/// it is set already; returns the exit code to end with.
fn rerun_with_fixed_mmap_threshold() -> Option<i32> {
    if !cfg!(all(target_os = "linux", target_env = "gnu"))
        || std::env::var_os(MALLOC_THRESHOLD_ENV).is_some()
    {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(MALLOC_THRESHOLD_ENV, (1u32 << 20).to_string())
        .status()
        .ok()?;
    Some(status.code().unwrap_or(1))
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.scenario, Scenario::RawServer { .. }) {
        if let Some(code) = rerun_with_fixed_mmap_threshold() {
            std::process::exit(code);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("huddle-bench: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async move {
        let out = report::Output::new(cli.json, cli.plot.clone());
        match cli.scenario {
            Scenario::Fanout(p) => scenarios::fanout::run(p, &out).await,
            Scenario::Membership(p) => scenarios::membership::run(p, &out).await,
            Scenario::Link(p) => scenarios::link::run(p, &out).await,
            Scenario::Media(p) => scenarios::media::run(p, &out).await,
            Scenario::Connections(p) => scenarios::connections::run(p, &out).await,
            Scenario::Catchup(p) => scenarios::catchup::run(p, &out).await,
            Scenario::Baseline(p) => scenarios::baseline::run(p, &out).await,
            Scenario::Crash(p) => scenarios::crash::run(p, &out).await,
            Scenario::Abuse(p) => scenarios::abuse::run(p, &out).await,
            Scenario::RawServer {
                cert_out,
                max_udp_payload,
            } => baseline::serve(&cert_out, max_udp_payload).await,
        }
    });
    // Let background tasks wind down without blocking exit.
    runtime.shutdown_timeout(Duration::from_millis(200));
    if let Err(e) = result {
        eprintln!("huddle-bench: {e:#}");
        std::process::exit(1);
    }
}
