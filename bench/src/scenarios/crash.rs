//! `crash`: a DS process under continuous text and media traffic is killed
//! with SIGKILL at random moments and restarted on the same data dir and
//! port, again and again. At the end every member syncs, and the run checks
//! that every message whose send was acknowledged reached every member
//! exactly once and in one order, and that every acknowledged upload is
//! fetchable and intact. The clients are never restarted: they must resume
//! on their own.
//!
//! With `--nodes N --store postgres://… --bus nats://…` the DS is a
//! cluster: each kill picks a random node, and the members, spread over
//! the nodes, know every node's address and move to another while theirs
//! is down. Media is left out there (a blob stays on the node that took
//! it).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use huddle_client::{Client, Home, Quiet};
use rand::Rng as _;

use crate::cluster::{Cluster, ClusterArgs};
use crate::report::{Output, Report};

/// Parameters.
#[derive(Debug, Args)]
pub struct Params {
    /// How many times to kill the DS.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Members, all of them sending.
    #[arg(long, default_value_t = 3)]
    pub members: usize,
    /// Every this many messages, a member also sends a media item.
    #[arg(long, default_value_t = 25)]
    pub media_every: usize,
    /// Size of each media item in bytes.
    #[arg(long, default_value_t = 300_000)]
    pub media_size: usize,
    /// Shortest and longest time between kills, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub min_gap_ms: u64,
    /// Longest time between kills, in milliseconds.
    #[arg(long, default_value_t = 1500)]
    pub max_gap_ms: u64,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// What one member's sending loop saw acknowledged.
#[derive(Debug, Default)]
struct Acked {
    texts: Vec<String>,
    media: Vec<(String, [u8; 32])>,
}

fn sender(
    home: Home,
    name: String,
    files: PathBuf,
    group: String,
    media_every: usize,
    media_size: usize,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Acked> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut c = Client::open(home)?;
        let mut acked = Acked::default();
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            if media_every > 0 && i.is_multiple_of(media_every) {
                let data: Vec<u8> = (0..media_size).map(|_| rand::random::<u8>()).collect();
                let path = files.join(format!("{name}-{i}.bin"));
                std::fs::write(&path, &data)?;
                // A failed attempt is resumed by the next call for the same file.
                for _ in 0..20 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match c.send_file(&group, &path, "", &mut Quiet).await {
                        Ok(e) => {
                            acked.media.push((
                                e.media_id().unwrap_or_default().to_owned(),
                                *blake3::hash(&data).as_bytes(),
                            ));
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                continue;
            }
            let text = format!("{name}-{i}");
            match c.send_text(&group, &text).await {
                Ok(_) => acked.texts.push(text),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        c.close().await;
        anyhow::Ok(acked)
    })
}

/// Runs it.
pub async fn run(p: Params, out: &Output) -> anyhow::Result<()> {
    anyhow::ensure!(p.members >= 2, "at least two members");
    let mut cluster = Cluster::start(&p.cluster)?;
    let nodes = cluster.nodes.len();
    let media_every = if nodes > 1 { 0 } else { p.media_every };
    let cert = cluster.cert();
    let dir = tempfile::Builder::new().prefix("huddle-crash-").tempdir()?;
    let home = |n: &str| Home::new(dir.path().join(n));
    let names: Vec<String> = (0..p.members).map(|i| format!("m{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        // Member i starts on node i (mod N) and knows them all.
        Client::register(home(n), n, &cluster.servers_from(i % nodes), Some(&cert))
            .await?
            .close()
            .await;
    }
    let group = {
        let mut c = Client::open(home(&names[0]))?;
        let g = c.create_group("crash").await?.to_string();
        c.add(&g, &names[1..]).await?;
        c.close().await;
        g
    };
    for n in &names[1..] {
        let mut c = Client::open(home(n))?;
        c.sync().await?;
        c.close().await;
    }
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files)?;

    out.say(&format!(
        "{} members sending; killing the DS ({}) {} times ...",
        p.members,
        cluster.describe(),
        p.kills
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = names
        .iter()
        .map(|n| {
            let (h, n, f, g, s) = (
                home(n),
                n.clone(),
                files.clone(),
                group.clone(),
                stop.clone(),
            );
            let (every, size) = (media_every, p.media_size);
            std::thread::spawn(move || sender(h, n, f, g, every, size, s))
        })
        .collect();
    let mut kills = 0;
    while kills < p.kills {
        let gap = rand::thread_rng().gen_range(p.min_gap_ms..=p.max_gap_ms.max(p.min_gap_ms));
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let node = rand::thread_rng().gen_range(0..nodes);
        cluster.kill9_and_restart(node)?;
        kills += 1;
        out.say(&format!("  kill {kills} (node {node})"));
    }
    // Let traffic run on the last incarnation for a moment, then stop.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked_by: HashMap<String, Acked> = HashMap::new();
    for (n, t) in names.iter().zip(threads) {
        let a = t
            .join()
            .map_err(|_| anyhow::anyhow!("a sender panicked"))??;
        acked_by.insert(n.clone(), a);
    }

    out.say("every member syncs and checks ...");
    let mut histories: HashMap<String, Vec<String>> = HashMap::new();
    let mut resumed = true;
    for n in &names {
        let mut c = Client::open(home(n))?;
        let mut ok = false;
        for _ in 0..50 {
            if c.sync().await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        resumed &= ok;
        let h: Vec<String> = c
            .messages(&group, usize::MAX)?
            .into_iter()
            .filter_map(|e| match e.kind {
                huddle_client::EventKind::Text { text } => Some(text),
                _ => None,
            })
            .collect();
        histories.insert(n.clone(), h);
        c.close().await;
    }
    let all_acked: Vec<&String> = acked_by.values().flat_map(|a| a.texts.iter()).collect();
    let mut lost = 0u64;
    let mut duplicated = 0u64;
    let mut delivered = 0u64;
    for (n, h) in &histories {
        let mut seen = HashSet::new();
        for t in h {
            if !seen.insert(t) {
                duplicated += 1;
            }
        }
        for a in &all_acked {
            if seen.contains(a) {
                delivered += 1;
            } else {
                lost += 1;
                out.say(&format!("  {n} lacks acknowledged message {a}"));
            }
        }
    }
    // One order: every pair of members lists their common messages alike.
    let mut same_order = true;
    let first = &histories[&names[0]];
    for n in &names[1..] {
        let other: HashSet<&String> = histories[n].iter().collect();
        let a: Vec<&String> = first.iter().filter(|t| other.contains(t)).collect();
        let mine: HashSet<&String> = first.iter().collect();
        let b: Vec<&String> = histories[n].iter().filter(|t| mine.contains(t)).collect();
        same_order &= a == b;
    }
    // Every acknowledged upload is fetchable and intact, by another member.
    let mut media_acked = 0u64;
    let mut media_intact = 0u64;
    for (i, n) in names.iter().enumerate() {
        let reader = &names[(i + 1) % names.len()];
        let mut c = Client::open(home(reader))?;
        for (id, want) in &acked_by[n].media {
            media_acked += 1;
            let outp = dir.path().join(format!("check-{id}"));
            if c.download(id, Some(&outp), &mut Quiet).await.is_ok() {
                let got = std::fs::read(&outp).context("reading a download")?;
                if blake3::hash(&got).as_bytes() == want {
                    media_intact += 1;
                }
            }
        }
        c.close().await;
    }
    let acked = all_acked.len() as u64;
    let mut r = Report::new("crash");
    r.set("kills", kills as u64)
        .set("nodes", nodes as u64)
        .set("members", p.members as u64)
        .set("acked", acked)
        .set("delivered", delivered)
        .set("expected_deliveries", acked * p.members as u64)
        .set("lost", lost)
        .set("duplicated", duplicated)
        .set("same_order", same_order)
        .set("media_acked", media_acked)
        .set("media_intact", media_intact)
        .set("clients_resumed", resumed)
        .note("kill = SIGKILL of the huddle-server process (a random node of a cluster), restarted at once on the same data dir and port; clients keep running and reconnect by themselves (to another node of a cluster while theirs is down)")
        .note(format!(
            "DS: {}{}",
            cluster.describe(),
            if nodes > 1 {
                "; no media (a blob stays on the node that took it)"
            } else {
                ""
            }
        ))
        .note("delivered counts (member, acknowledged message) pairs found in members' histories, the sender's own included");
    out.emit(&r);
    anyhow::ensure!(
        lost == 0 && duplicated == 0 && same_order && media_intact == media_acked && resumed,
        "the crash run found lost, duplicated, reordered or damaged data"
    );
    Ok(())
}
