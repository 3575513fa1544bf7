//! Several DS nodes for a scenario (`--nodes N --store postgres://…
//! --bus nats://…`): N `huddle-server` processes sharing one certificate,
//! on a schema of their own in the given database (created for the run and
//! dropped after it) and a bus subject prefix of their own.

use std::path::PathBuf;

use anyhow::{ensure, Context as _};
use clap::Args;

use crate::ds::Ds;

/// Where the nodes keep their state and how they wake each other.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// DS nodes to run (more than one needs --store and --bus).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// PostgreSQL database for the nodes' state (postgres://USER@HOST/DB);
    /// the run works in a schema of its own there. Without it a single
    /// node uses its embedded store.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// NATS server the nodes wake each other through (nats://HOST:PORT).
    #[arg(long, value_name = "URL")]
    pub bus: Option<String>,
    /// Object store every node keeps media blobs on
    /// (s3://BUCKET[/PREFIX]?endpoint=URL; the access key from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY). Without it each node
    /// keeps them in its data dir.
    #[arg(long, value_name = "URL")]
    pub blobs: Option<String>,
    /// A limit for the nodes this run starts, as `huddle-server --limit`
    /// takes it (repeatable; `huddle-server --list-limits` shows them).
    #[arg(long = "limit", value_name = "NAME=VALUE")]
    pub limits: Vec<String>,
}

/// The nodes of a run; node 0 made the certificate the others present.
#[derive(Debug)]
pub struct Cluster {
    /// The nodes, in the order started.
    pub nodes: Vec<Ds>,
    schema: Option<Schema>,
}

impl Cluster {
    /// Starts the nodes `args` ask for.
    pub fn start(args: &ClusterArgs) -> anyhow::Result<Self> {
        ensure!(args.nodes >= 1, "--nodes must be at least 1");
        ensure!(
            args.nodes == 1 || (args.store.is_some() && args.bus.is_some()),
            "--nodes {} needs --store postgres://… and --bus nats://…: the nodes share one database",
            args.nodes
        );
        let schema = args.store.as_deref().map(Schema::create).transpose()?;
        let tag = schema.as_ref().map(|s| s.name.clone());
        let mut extra: Vec<String> = Vec::new();
        for l in &args.limits {
            extra.extend(["--limit".into(), l.clone()]);
        }
        if let Some(b) = &args.blobs {
            extra.extend(["--blobs".into(), b.clone()]);
        }
        if let Some(s) = &schema {
            extra.extend(["--store".into(), s.url.clone()]);
        }
        if let (Some(bus), Some(tag)) = (&args.bus, &tag) {
            extra.extend([
                "--bus".into(),
                bus.clone(),
                "--bus-prefix".into(),
                tag.clone(),
            ]);
        }
        let first = Ds::spawn_with(extra.clone())?;
        let data = first.data_dir.clone().context("node 0's data dir")?;
        let (cert, key): (PathBuf, PathBuf) = (data.join("cert.pem"), data.join("key.pem"));
        let mut nodes = vec![first];
        for _ in 1..args.nodes {
            let mut e = extra.clone();
            e.extend([
                "--cert".into(),
                cert.display().to_string(),
                "--key".into(),
                key.display().to_string(),
            ]);
            nodes.push(Ds::spawn_with(e)?);
        }
        Ok(Self { nodes, schema })
    }

    /// A DS given on the command line (`--server`), as a cluster of one.
    pub fn given(ds: Ds) -> Self {
        Self {
            nodes: vec![ds],
            schema: None,
        }
    }

    /// The certificate every node presents.
    pub fn cert(&self) -> PathBuf {
        self.nodes[0].cert.clone()
    }

    /// The nodes' addresses for a client's `--server`, starting with node
    /// `first` (so clients can be spread over the nodes).
    pub fn servers_from(&self, first: usize) -> String {
        let n = self.nodes.len();
        (0..n)
            .map(|k| self.nodes[(first + k) % n].addr.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills node `i` with SIGKILL and starts it again on its address and
    /// data dir.
    pub fn kill9_and_restart(&mut self, i: usize) -> anyhow::Result<()> {
        // Out of the list, killed and started again, back in its place.
        let node = self.nodes.remove(i);
        self.nodes.insert(i, node.kill9_and_restart()?);
        Ok(())
    }

    /// Bytes all nodes wrote to disk so far (`None` unless the tool
    /// started them all).
    pub fn bytes_written(&self) -> Option<u64> {
        self.nodes.iter().map(Ds::bytes_written).sum()
    }

    /// The largest peak resident memory of any node, in MiB.
    pub fn peak_rss_mb(&self) -> Option<f64> {
        self.nodes
            .iter()
            .map(Ds::peak_rss_mb)
            .try_fold(0f64, |m, r| r.map(|r| m.max(r)))
    }

    /// Registers `n` light members named `prefix…`, spread evenly over the
    /// nodes (node k gets the k-th share).
    pub async fn register_spread(
        &self,
        trust: &huddle_client::net::Trust,
        prefix: &str,
        n: usize,
        kps: usize,
    ) -> anyhow::Result<Vec<crate::light::Light>> {
        let count = self.nodes.len();
        let mut out = Vec::with_capacity(n);
        for (k, node) in self.nodes.iter().enumerate() {
            let share = n / count + usize::from(k < n % count);
            out.extend(
                crate::light::register_many(
                    &node.addr,
                    trust,
                    &format!("{prefix}n{k}-"),
                    share,
                    kps,
                )
                .await?,
            );
        }
        Ok(out)
    }

    /// What the run's notes should say about where the state was.
    pub fn describe(&self) -> String {
        match &self.schema {
            Some(s) => format!(
                "{} node(s) on PostgreSQL (schema {}){}",
                self.nodes.len(),
                s.name,
                if self.nodes.len() > 1 {
                    ", woken through NATS"
                } else {
                    ""
                }
            ),
            None => "one node on its embedded store".into(),
        }
    }
}

/// A schema of its own in the run's database.
#[derive(Debug)]
struct Schema {
    admin: String,
    name: String,
    url: String,
}

impl Schema {
    fn create(admin: &str) -> anyhow::Result<Self> {
        ensure!(
            admin.starts_with("postgres://") || admin.starts_with("postgresql://"),
            "--store {admin:?}: expected postgres://USER@HOST:PORT/DB"
        );
        let name = format!("huddle_bench_{:016x}", rand::random::<u64>());
        let sql = format!("CREATE SCHEMA {name}");
        off_runtime(|| -> anyhow::Result<()> {
            let mut c = postgres::Client::connect(admin, postgres::NoTls)
                .with_context(|| format!("connecting to {admin}"))?;
            c.batch_execute(&sql).context("creating the run's schema")?;
            Ok(())
        })?;
        let sep = if admin.contains('?') { '&' } else { '?' };
        let url = format!("{admin}{sep}options=-c%20search_path%3D{name}");
        Ok(Self {
            admin: admin.to_owned(),
            name,
            url,
        })
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA {} CASCADE", self.name);
        off_runtime(|| {
            if let Ok(mut c) = postgres::Client::connect(&self.admin, postgres::NoTls) {
                let _ = c.batch_execute(&sql);
            }
        });
    }
}

/// Runs `f` on a thread of its own: the blocking PostgreSQL client may not
/// run on a thread that drives async tasks.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().expect("the database thread"))
}
