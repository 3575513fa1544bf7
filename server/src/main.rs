//! `huddle-server`: the Huddle delivery service.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use huddle_server::ServerConfig;
use tracing_subscriber::EnvFilter;

/// The Huddle delivery service: orders and fans out end-to-end encrypted
/// group messages and media. It never holds a key that opens content.
#[derive(Debug, Parser)]
#[command(name = "huddle-server", version)]
struct Args {
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:4433")]
    listen: SocketAddr,
    /// Directory for the database, certificate and blobs (created if missing).
    #[arg(long, default_value = "./huddle-data")]
    data_dir: PathBuf,
    /// Keep users, groups, logs and media records in this PostgreSQL
    /// database (postgres://USER@HOST:PORT/DB) instead of the embedded
    /// store in the data directory (certificate and blobs stay there).
    #[arg(long, value_name = "URL", env = "HUDDLE_STORE")]
    store: Option<String>,
    /// Cluster mode: wake the other nodes serving the same --store database
    /// through this NATS server (nats://HOST:PORT) when a round or a
    /// Welcome is stored. Nodes of one cluster share --cert and --key.
    #[arg(long, value_name = "URL", env = "HUDDLE_BUS", requires = "store")]
    bus: Option<String>,
    /// Cluster mode: PEM certificate(s) of the authority that signs the
    /// NATS server's certificate, for a tls://HOST:PORT bus (default: the
    /// system's roots). Credentials go in the address:
    /// nats://USER:PASSWORD@HOST:PORT or nats://TOKEN@HOST:PORT.
    #[arg(long, value_name = "PEM", env = "HUDDLE_BUS_CA", requires = "bus")]
    bus_ca: Option<PathBuf>,
    /// Cluster mode: the first token of the bus's subjects; clusters that
    /// share one NATS server each take their own.
    #[arg(
        long,
        value_name = "NAME",
        env = "HUDDLE_BUS_PREFIX",
        default_value = "huddle"
    )]
    bus_prefix: String,
    /// Keep media blobs on this S3-compatible object store instead of the
    /// data directory (what the nodes of a cluster must share):
    /// s3://BUCKET[/PREFIX][?endpoint=URL&region=NAME]; the access key is
    /// read from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    #[arg(long, value_name = "URL", env = "HUDDLE_BLOBS")]
    blobs: Option<String>,
    /// PEM certificate chain to present instead of the self-signed one.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Seconds without traffic before a connection is closed.
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
    /// Most connections served at once.
    #[arg(long, default_value_t = 20_000)]
    max_connections: usize,
    /// Most concurrent request streams per connection.
    #[arg(long, default_value_t = 128)]
    max_streams: u32,
    /// Set any limit by name, e.g. `--limit answer_budget_total=128MiB`
    /// (repeatable; `--list-limits` shows them all with their values).
    #[arg(long = "limit", value_name = "NAME=VALUE")]
    limits: Vec<String>,
    /// Print every limit with the value it would have, and exit.
    #[arg(long)]
    list_limits: bool,
    /// On SIGUSR1, write the DS's work counters (sequencer rounds, store
    /// transactions, push writes) to this file as one JSON object.
    #[arg(long, value_name = "PATH")]
    stats_file: Option<PathBuf>,
}

/// Descriptors the DS holds besides its transfers' blob files: its
/// socket, store, logs and the runtime's own, with room to spare.
const OTHER_FILES: u64 = 256;

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            // The bus client's own connection notes repeat the DS's.
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut config = ServerConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        store_url: args.store,
        bus_url: args.bus,
        bus_prefix: args.bus_prefix,
        bus_ca: args.bus_ca,
        blobs_url: args.blobs,
        cert: args.cert.zip(args.key),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        max_connections: args.max_connections,
        max_streams_per_connection: args.max_streams,
        ..ServerConfig::default()
    };
    for l in &args.limits {
        let set = l
            .split_once('=')
            .ok_or_else(|| format!("--limit {l}: expected NAME=VALUE"))
            .and_then(|(name, value)| config.set_limit(name.trim(), value.trim()));
        if let Err(e) = set {
            eprintln!("huddle-server: {e}");
            std::process::exit(2);
        }
    }
    if let Err(e) = config.validate() {
        eprintln!("huddle-server: {e}");
        std::process::exit(2);
    }
    if args.list_limits {
        for (name, value) in config.limits() {
            println!("{name}={value}");
        }
        return;
    }
    // Each transfer holds its blob file open (a download two descriptors):
    // raise the soft limit as far as the administrator allows, and say so
    // if the transfer limits can still run out of descriptors.
    let open_files = huddle_io::raise_open_files();
    let needed = (config.max_transfers_total as u64)
        .saturating_mul(2)
        .saturating_add(OTHER_FILES);
    if open_files < needed {
        tracing::warn!(
            open_files,
            needed,
            "the limit on open files is below what max_transfers_total may use; \
             raise it (ulimit -n, LimitNOFILE=) or lower max_transfers_total"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(config.blocking_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("huddle-server: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(config, args.stats_file)) {
        eprintln!("huddle-server: {e:#}");
        std::process::exit(1);
    }
}

async fn run(config: ServerConfig, stats_file: Option<PathBuf>) -> anyhow::Result<()> {
    // The handlers are installed before the "listening" line: a supervisor
    // (or a test) that sends SIGTERM as soon as it reads that line gets a
    // clean shutdown, never the default action of the signal.
    let signals = Signals::install()?;
    if let Some(path) = stats_file {
        use anyhow::Context as _;
        use tokio::signal::unix::{signal, SignalKind};
        let mut usr1 = signal(SignalKind::user_defined1()).context("cannot handle SIGUSR1")?;
        tokio::spawn(async move {
            let mut dumps = 0u64;
            while usr1.recv().await.is_some() {
                dumps += 1;
                if let Err(e) = write_stats(&path, dumps) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the stats file");
                }
            }
        });
    }
    let running = huddle_server::start(config).await?;
    println!(
        "huddle-server listening on {} (certificate SHA-256 {})",
        running.addr, running.fingerprint
    );
    let stop = running.shutdown_token();
    tokio::spawn(async move {
        signals.wait().await;
        stop.cancel();
    });
    running.wait().await;
    Ok(())
}

/// Writes the counters to `path` (a temporary file renamed over it, so a
/// reader never sees half of it); `dump` numbers the writes, so a reader
/// that signalled can tell the answer from an older file.
fn write_stats(path: &std::path::Path, dump: u64) -> std::io::Result<()> {
    #[derive(serde::Serialize)]
    struct Dump {
        dump: u64,
        #[serde(flatten)]
        counters: huddle_server::metrics::Snapshot,
    }
    let dump = Dump {
        dump,
        counters: huddle_server::metrics::COUNTERS.snapshot(),
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&dump)?)?;
    std::fs::rename(&tmp, path)
}

/// SIGTERM and SIGINT, registered with the runtime up front.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use anyhow::Context as _;
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
