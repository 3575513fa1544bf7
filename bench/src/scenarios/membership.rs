//! `membership`: in a group of M members, all online: the time to create
//! the group with one commit (until every member has its Welcome), then
//! rounds of add-one, remove-one and self-update: commit size, time until
//! the DS accepted it, time until every online member received it, Welcome
//! size. With `--devices D`, every user has D devices (each a leaf, each
//! online): adding and removing a user adds and removes its D leaves in
//! one commit, and each round also links a new device to a member, which
//! joins by itself (an external commit).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use huddle_core::GroupId;

use super::{entry_frame_len, quantile, trust};
use crate::baseline::RawPeer;
use crate::cluster::{Cluster, ClusterArgs};
use crate::ds::Ds;
use crate::lean::{CommitStats, Lean};
use crate::light::{
    claim, clock, link_device, link_many, now_ns, receive, register, register_many, run_name,
    Arrivals, Tally,
};
use crate::report::{Output, Report};
use crate::Target;

/// Parameters.
#[derive(Debug, Args)]
pub struct Params {
    /// Members (up to 1,000).
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Rounds of add-one, remove-one, self-update (and, with more than
    /// one device per user, link-one).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Devices per user (1 to 7): each is a leaf of the group.
    #[arg(long, default_value_t = 1)]
    pub devices: u32,
    #[command(flatten)]
    pub target: Target,
    /// With `--nodes N`, the committer is on the first node and the
    /// members spread over all of them: every commit is followed by the
    /// other nodes from the database.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Waits until `n` arrivals of (group, seq) are recorded; returns the time
/// of the last one (ns), or `None` after 30 s.
async fn all_arrived(arrivals: &Arrivals, g: GroupId, seq: u64, n: usize) -> Option<u64> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        {
            let a = arrivals.lock().expect("arrivals");
            let hits: Vec<u64> = a
                .iter()
                .filter(|(gg, s, _)| *gg == g && *s == seq)
                .map(|(_, _, t)| *t)
                .collect();
            if hits.len() >= n {
                return hits.into_iter().max();
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

#[derive(Default)]
struct Kind {
    accept: Vec<f64>,
    received: Vec<f64>,
    commit: Vec<f64>,
    welcome: Vec<f64>,
    build: Vec<f64>,
    /// Bytes the DS wrote to storage for the commit (its log entry, the
    /// group's public state, the tree kept for joiners, Welcomes).
    written: Vec<f64>,
    /// Link rounds: from the new device's request to its approval by
    /// another device (all on the DS).
    linked: Vec<f64>,
}

impl Kind {
    fn add(&mut self, s: &CommitStats, received_ns: Option<u64>) {
        self.accept.push(s.accept_ms);
        self.build.push(s.build_ms);
        self.commit.push(s.commit_bytes as f64);
        self.welcome.push(s.welcome_bytes as f64);
        if let Some(t) = received_ns {
            self.received
                .push(t.saturating_sub(s.posted_ns) as f64 / 1e6);
        }
    }
}

/// Runs it.
pub async fn run(mut p: Params, out: &Output) -> anyhow::Result<()> {
    anyhow::ensure!(
        (2..=1000).contains(&p.members),
        "members must be between 2 and 1,000"
    );
    anyhow::ensure!(
        (1..=7).contains(&p.devices),
        "devices must be between 1 and 7 (one more is linked per round)"
    );
    let _ = clock();
    // The creator claims a key package per device: (M - 1) × D at once.
    p.cluster.limits.push(format!(
        "claims_per_minute={}",
        3000.max(p.members * p.devices as usize * 2)
    ));
    let cluster = if p.target.server.is_some() {
        Cluster::given(Ds::start(&p.target)?)
    } else {
        Cluster::start(&p.cluster)?
    };
    let ds = &cluster.nodes[0];
    let trust = trust(ds)?;
    out.say(&format!("registering {} members ...", p.members + p.rounds));
    let mut creator = Lean::new(
        register(&ds.addr, &trust, &run_name("creator"), 0).await?,
        0,
    )
    .await?;
    let mut lights = cluster
        .register_spread(&trust, &run_name("m"), p.members - 1, 1)
        .await?;
    let spares = register_many(&ds.addr, &trust, &run_name("spare"), p.rounds, 2).await?;
    // With several devices per user: each user's other devices, and the
    // members whose first device stays offline to link one more per round.
    let mut linkers = Vec::new();
    let mut spare_devices: Vec<Vec<String>> =
        spares.iter().map(|s| vec![s.id.name.clone()]).collect();
    if p.devices > 1 {
        out.say(&format!(
            "linking {} more device(s) to each user ...",
            p.devices - 1
        ));
        let more = link_many(&ds.addr, &trust, &lights, p.devices, 1).await?;
        for (i, s) in spares.iter().enumerate() {
            for d in 2..=p.devices {
                let dev = link_device(&ds.addr, &trust, s, d, 1).await?;
                spare_devices[i].push(dev.id.name.clone());
            }
        }
        let keep = p.rounds.min(lights.len());
        linkers = lights.split_off(lights.len() - keep);
        let linker_names: Vec<String> = linkers.iter().map(|l| l.id.name.clone()).collect();
        lights.extend(more);
        // The linkers' first devices are members too, offline.
        lights.sort_by(|a, b| a.id.name.cmp(&b.id.name));
        out.say(&format!(
            "{} devices online, {} first devices offline to link from",
            lights.len(),
            linker_names.len()
        ));
    }
    let mut names: Vec<String> = lights.iter().map(|l| l.id.name.clone()).collect();
    names.extend(linkers.iter().map(|l| l.id.name.clone()));
    let tally = Arc::new(Tally::default());
    let arrivals: Arrivals = Arc::new(Mutex::new(Vec::new()));
    let inbox = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let lights_online = lights.len();
    for l in lights {
        tasks.push(tokio::spawn(receive(
            l,
            vec![],
            0,
            tally.clone(),
            Some(arrivals.clone()),
            Some(inbox.clone()),
            stop_rx.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    out.say("creating the group with one commit ...");
    let t0 = now_ns();
    let g = creator.create().await?;
    let kps = claim(&creator.light.net, &names).await?;
    let create = creator.add(kps).await?;
    let start = Instant::now();
    let online = lights_online;
    while inbox.lock().expect("inbox").len() < online && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let welcomed = inbox.lock().expect("inbox").clone();
    let all_welcomed = welcomed.len() >= online;
    let created_ms = welcomed
        .iter()
        .max()
        .map(|t| t.saturating_sub(t0) as f64 / 1e6);
    // Give the watches time to register before measuring pushes.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut kinds: HashMap<&str, Kind> = HashMap::new();
    out.say(&format!(
        "{} rounds of add-one, remove-one, self-update ...",
        p.rounds
    ));
    let written = || cluster.bytes_written().map(|b| b as f64);
    for (round, devices) in spare_devices.iter().enumerate() {
        let kp = claim(&creator.light.net, devices).await?;
        let w0 = written();
        let s = creator.add(kp).await?;
        let k = kinds.entry("add").or_default();
        k.written.extend(written().zip(w0).map(|(a, b)| a - b));
        let t = all_arrived(&arrivals, g, s.seq, online).await;
        kinds.entry("add").or_default().add(&s, t);
        let w0 = written();
        let s = creator.remove(devices).await?;
        let k = kinds.entry("remove").or_default();
        k.written.extend(written().zip(w0).map(|(a, b)| a - b));
        let t = all_arrived(&arrivals, g, s.seq, online).await;
        kinds.entry("remove").or_default().add(&s, t);
        let w0 = written();
        let s = creator.self_update().await?;
        let k = kinds.entry("update").or_default();
        k.written.extend(written().zip(w0).map(|(a, b)| a - b));
        let t = all_arrived(&arrivals, g, s.seq, online).await;
        kinds.entry("update").or_default().add(&s, t);
        if let Some(owner) = linkers.get(round) {
            // A member links one more device, which joins by itself.
            creator.publish_group_info().await?;
            let t0 = Instant::now();
            let dev = link_device(&ds.addr, &trust, owner, p.devices + 1, 0).await?;
            let linked_ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut joiner = Lean::new(dev, 0).await?;
            let w0 = written();
            let s = joiner.join_as_device(g).await?;
            let k = kinds.entry("link").or_default();
            k.written.extend(written().zip(w0).map(|(a, b)| a - b));
            k.linked.push(linked_ms);
            let t = all_arrived(&arrivals, g, s.seq, online).await;
            kinds.entry("link").or_default().add(&s, t);
            creator.follow(s.seq).await?;
        }
    }
    let server_rss = cluster.peak_rss_mb();
    let (nodes, described) = (cluster.nodes.len(), cluster.describe());
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    drop(cluster);

    out.say("raw quinn baseline ...");
    let update_commit = quantile(
        &kinds
            .get("update")
            .map(|k| k.commit.clone())
            .unwrap_or_default(),
        0.5,
    );
    let peer = RawPeer::start()?;
    let frame = entry_frame_len(update_commit as usize).max(64);
    let push = peer
        .push(online.min(1000), frame, Duration::from_secs(2))
        .await?;
    drop(peer);

    let mut r = Report::new("membership");
    if nodes > 1 {
        r.set("nodes", nodes as u64).note(format!(
            "DS: {described}; the committer on the first node, the members spread over all"
        ));
    }
    r.set("members", p.members as u64)
        .set("devices", u64::from(p.devices))
        .set("leaves", (p.members * p.devices as usize) as u64)
        .set("rounds", p.rounds as u64)
        .set("light_members", online as u64)
        .set("create_build_ms", create.build_ms)
        .set("create_accept_ms", create.accept_ms)
        .set("create_commit_bytes", create.commit_bytes as u64)
        .set("create_welcome_bytes", create.welcome_bytes as u64)
        .set_opt("create_all_welcomed_ms", created_ms)
        .set("all_welcomed", all_welcomed);
    let mut all_accept = Vec::new();
    let mut all_received = Vec::new();
    for k in ["add", "remove", "update", "link"] {
        let Some(v) = kinds.get(k) else { continue };
        r.set(&format!("{k}_build_ms"), quantile(&v.build, 0.5))
            .set(&format!("{k}_accept_ms"), quantile(&v.accept, 0.5))
            .set(&format!("{k}_all_received_ms"), quantile(&v.received, 0.5))
            .set(&format!("{k}_commit_bytes"), quantile(&v.commit, 0.5));
        if !v.written.is_empty() {
            r.set(&format!("{k}_ds_bytes_written"), quantile(&v.written, 0.5));
        }
        if k == "add" {
            r.set("add_welcome_bytes", quantile(&v.welcome, 0.5));
        }
        if k == "link" {
            r.set("link_approved_ms", quantile(&v.linked, 0.5));
        }
        all_accept.extend(&v.accept);
        all_received.extend(&v.received);
    }
    r.set("accept_ms", quantile(&all_accept, 0.5))
        .set("all_received_ms", quantile(&all_received, 0.5))
        .set("baseline_push_per_sec", push)
        .set("baseline_all_received_ms", online as f64 / push * 1e3)
        .set_opt("server_peak_rss_mb", server_rss)
        .note(format!(
            "medians over {} rounds; the creator is a full MLS member, the {} others are light (they receive and acknowledge)",
            p.rounds, online
        ))
        .note("accept = post until the DS acknowledged (durable); all_received = post until the last online member got it pushed")
        .note("ds_bytes_written = what the DS process sent to storage (/proc/PID/io write_bytes) between posting the commit and its acknowledgement: one round of that commit")
        .note("baseline_all_received_ms = time raw quinn needs to push one frame of the update commit's size to as many connections");
    out.emit(&r);
    Ok(())
}
