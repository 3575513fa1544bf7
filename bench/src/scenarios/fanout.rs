//! `fanout`: G groups of M members; S members of each send application
//! messages, closed-loop or at a fixed rate. Measures deliveries per second
//! and end-to-end latency (send to receipt at each member), against raw
//! quinn pushing frames of the same size to the same number of connections.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use huddle_client::{Client, Home};
use huddle_core::proto::Response;

use super::{entry_frame_len, request_on, trust};
use crate::baseline::{RawPeer, RelayShape, QUINN_DEFAULT_UDP_PAYLOAD};
use crate::cluster::{Cluster, ClusterArgs};
use crate::ds::{own_peak_rss_mb, Ds};
use crate::lean::Lean;
use crate::light::{claim, now_ns, receive, register, run_name, Tally, TICKET};
use crate::report::{Output, Report};
use crate::Target;

/// Parameters.
#[derive(Debug, Args)]
pub struct Params {
    /// Groups.
    #[arg(long, default_value_t = 1)]
    pub groups: usize,
    /// Members per group (up to 1,000).
    #[arg(long, default_value_t = 200)]
    pub members: usize,
    /// Sending members per group.
    #[arg(long, default_value_t = 2)]
    pub senders: usize,
    /// Full members per group: real clients that decrypt and check every
    /// message (the rest are light: they receive and acknowledge only).
    #[arg(long, default_value_t = 1)]
    pub full: usize,
    /// Application message size in bytes.
    #[arg(long, default_value_t = 256, value_parser = crate::units::parse_bytes_usize)]
    pub size: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Total messages per second across all senders (default: closed loop).
    /// At a fixed rate senders encrypt all their messages before the clock
    /// starts, and the baseline also relays frames of the same size at the
    /// same rate through raw quinn, for its latency (baseline_p*_ms).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Messages in flight per sender in closed loop (below 128: receivers
    /// accept a sender's messages at most 128 generations out of order).
    /// The default keeps the DS's batches full; 16 left it idle half the
    /// time.
    #[arg(long, default_value_t = 64)]
    pub inflight: usize,
    /// With `--rate`: the raw relay's senders open a stream per message and
    /// wait for its answer, as posts to the DS do (default: one stream per
    /// sender, the cheapest raw quinn can relay).
    #[arg(long)]
    pub relay_streams: bool,
    /// With `--rate`: as `--relay-streams`, and the relay appends each
    /// frame to its group's log through the DS's own store and writer
    /// (durable before it is answered and forwarded): the transport and
    /// the durable write the DS pays, without its checks and sequencing.
    #[arg(long)]
    pub relay_durable: bool,
    #[command(flatten)]
    pub target: Target,
    /// With `--nodes N`, the senders connect to the first node, the light
    /// members are spread over all of them and the full members to the
    /// last: every message crosses the bus.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

struct GroupSetup {
    senders: Vec<Lean>,
    full: Vec<(Home, String)>,
    receivers: usize,
}

/// Runs it.
pub async fn run(p: Params, out: &Output) -> anyhow::Result<()> {
    anyhow::ensure!(
        p.members >= p.senders + p.full && p.senders >= 1,
        "members must cover senders and full members"
    );
    anyhow::ensure!(p.members <= 1000, "at most 1,000 members per group");
    anyhow::ensure!(
        p.inflight >= 1 && p.inflight < huddle_core::mls::OUT_OF_ORDER_TOLERANCE as usize,
        "--inflight must be 1 to {}: a receiver refuses a message processed more \
         than {} generations after a later one of the same sender, so no sender may \
         run that far ahead of its oldest outstanding message",
        huddle_core::mls::OUT_OF_ORDER_TOLERANCE - 1,
        huddle_core::mls::OUT_OF_ORDER_TOLERANCE
    );
    let cluster = if p.target.server.is_some() {
        Cluster::given(Ds::start(&p.target)?)
    } else {
        Cluster::start(&p.cluster)?
    };
    let ds = &cluster.nodes[0];
    let last = cluster.nodes.last().unwrap_or(ds);
    let trust = trust(ds)?;
    let homes = tempfile::tempdir()?;
    let tally = Arc::new(Tally::default());
    let (stop_rx_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut setups = Vec::new();
    let mut receiver_tasks = Vec::new();
    // The light members' QUIC connections, for the datagrams they received.
    let mut light_conns: Vec<quinn::Connection> = Vec::new();
    let light_per_group = p.members - p.senders - p.full;
    out.say(&format!(
        "setting up {} group(s) of {} ({} senders, {} full, {} light members) ...",
        p.groups, p.members, p.senders, p.full, light_per_group
    ));
    for g in 0..p.groups {
        let mut creator = Lean::new(
            register(&ds.addr, &trust, &run_name(&format!("g{g}s0")), 0).await?,
            0,
        )
        .await?;
        let mut others = Vec::new();
        for s in 1..p.senders {
            others.push(
                Lean::new(
                    register(&ds.addr, &trust, &run_name(&format!("g{g}s{s}")), 0).await?,
                    1,
                )
                .await?,
            );
        }
        let mut full = Vec::new();
        for f in 0..p.full {
            let name = run_name(&format!("g{g}f{f}"));
            let home = Home::new(homes.path().join(&name));
            Client::register(home.clone(), &name, &last.addr, Some(&last.cert))
                .await?
                .close()
                .await;
            full.push((home, name));
        }
        let lights = cluster
            .register_spread(&trust, &run_name(&format!("g{g}l")), light_per_group, 1)
            .await?;
        let gid = creator.create().await?;
        let mut names: Vec<String> = others.iter().map(|o| o.light.id.name.clone()).collect();
        names.extend(full.iter().map(|(_, n)| n.clone()));
        names.extend(lights.iter().map(|l| l.id.name.clone()));
        let kps = claim(&creator.light.net, &names).await?;
        let stats = creator.add(kps).await?;
        for o in &mut others {
            o.join().await?;
        }
        for l in lights {
            light_conns.push(l.net.quic().clone());
            receiver_tasks.push(tokio::spawn(receive(
                l,
                vec![(gid, stats.seq)],
                u64::MAX - 1,
                tally.clone(),
                None,
                None,
                stop_rx.clone(),
            )));
        }
        let mut senders = vec![creator];
        senders.extend(others);
        setups.push(GroupSetup {
            senders,
            full,
            receivers: light_per_group,
        });
    }
    // Full members join and then listen, each on its own thread.
    // A watch, not a Notify: a full member still catching up when the
    // sending ends must see the stop whenever it starts waiting.
    let (stop_full, stop) = tokio::sync::watch::channel(false);
    let mut full_threads = Vec::new();
    for (g, s) in setups.iter().enumerate() {
        for (home, _) in &s.full {
            let home = home.clone();
            let stop = stop.clone();
            full_threads.push((
                g,
                std::thread::spawn(move || -> anyhow::Result<usize> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let mut c = Client::open(home)?;
                        c.sync().await?;
                        let mut texts = 0usize;
                        let mut stop = stop;
                        c.listen(|_| {}, async move {
                            let _ = stop.wait_for(|s| *s).await;
                        })
                        .await?;
                        // Catch up on what arrived but was not processed yet.
                        c.sync().await?;
                        // Everything is now in the history.
                        for g in c.groups()? {
                            texts += c
                                .messages(&g.group, usize::MAX)?
                                .iter()
                                .filter(|e| e.kind == "text")
                                .count();
                        }
                        Ok(texts)
                    })
                }),
            ));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let total_senders = p.groups * p.senders;
    let per_sender_rate = p.rate.map(|r| r / total_senders as f64);
    // At a fixed rate every sender encrypts what it will send before the
    // clock starts, so that the members' encryption (done on their own
    // devices in real use) does not take the DS's CPU during the run. Each
    // message carries a ticket; its sender records the send time under it.
    let ahead = per_sender_rate.map_or(0, |r| (r * p.duration).ceil() as usize + 1);
    let mut prepared: Vec<Vec<(u64, huddle_core::proto::Request)>> = Vec::new();
    if ahead > 0 {
        out.say(&format!(
            "encrypting {ahead} messages for each of {total_senders} senders ..."
        ));
        let times: Box<[std::sync::atomic::AtomicU64]> = (0..ahead * total_senders)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        let _ = tally.send_times.set(times);
        let mut k = 0u64;
        for s in &mut setups {
            for lean in &mut s.senders {
                let mut mine = Vec::with_capacity(ahead);
                for _ in 0..ahead {
                    let ticket = TICKET | k;
                    k += 1;
                    mine.push((ticket, lean.message(p.size, ticket)?));
                }
                prepared.push(mine);
            }
        }
    }
    let mut prepared = prepared.into_iter();

    out.say(&format!("sending for {} s ...", p.duration));
    let written_before = cluster.bytes_written();
    let load_before = Load::now(&cluster.nodes, &light_conns);
    let first_send = now_ns();
    let duration = Duration::from_secs_f64(p.duration);
    let mut sender_tasks = Vec::new();
    let mut mls_len = 0usize;
    for (g, s) in setups.iter_mut().enumerate() {
        for lean in s.senders.drain(..) {
            let sending = Sending {
                size: p.size,
                duration,
                inflight: p.inflight,
                rate: per_sender_rate,
                prepared: prepared.next().unwrap_or_default(),
                tally: tally.clone(),
            };
            sender_tasks.push((g, tokio::spawn(send_loop(lean, sending))));
        }
    }
    let mut sent_per_group = vec![0u64; p.groups];
    for (g, t) in sender_tasks {
        let (n, len) = t.await??;
        sent_per_group[g] += n;
        mls_len = mls_len.max(len);
    }
    let sent: u64 = sent_per_group.iter().sum();
    // Wait for the pushes to drain.
    let expected: u64 = setups
        .iter()
        .zip(&sent_per_group)
        .map(|(s, n)| s.receivers as u64 * n)
        .sum();
    let wait_start = Instant::now();
    let mut last = u64::MAX;
    while wait_start.elapsed() < Duration::from_secs(30) {
        let d = tally.deliveries.load(Ordering::Relaxed);
        if d >= expected || d == last {
            break;
        }
        last = d;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let load = Load::now(&cluster.nodes, &light_conns).since(&load_before);
    let _ = stop_full.send(true);
    let mut full_ok = true;
    let mut full_texts = Vec::new();
    let mut full_errors = Vec::new();
    for (g, t) in full_threads {
        match t.join() {
            Ok(Ok(n)) => {
                full_ok &= n as u64 == sent_per_group[g];
                full_texts.push(n);
            }
            Ok(Err(e)) => {
                full_ok = false;
                full_errors.push(e);
            }
            Err(_) => full_ok = false,
        }
    }
    // Stop the light receivers; they merge their latencies as they end.
    let _ = stop_rx_tx.send(true);
    for t in receiver_tasks {
        let _ = t.await;
    }
    let deliveries = tally.deliveries.load(Ordering::Relaxed);
    let span_s = (tally
        .last_ns
        .load(Ordering::Relaxed)
        .saturating_sub(first_send)) as f64
        / 1e9;
    let dps = deliveries as f64 / span_s.max(1e-9);
    let written = match (written_before, cluster.bytes_written()) {
        (Some(a), Some(b)) => Some((b - a) as f64 / sent.max(1) as f64),
        _ => None,
    };
    let server_rss = cluster.peak_rss_mb();
    let nodes = cluster.nodes.len();
    let described = cluster.describe();
    drop(cluster);

    out.say("raw quinn push baseline ...");
    let frame = entry_frame_len(mls_len);
    let receivers: usize = setups.iter().map(|s| s.receivers).sum();
    let peer = RawPeer::start()?;
    let baseline = peer
        .push(receivers.max(1), frame, Duration::from_secs(3))
        .await?;
    // At a fixed rate, also the latency of raw quinn relaying the same
    // frames at the same rate from as many senders to as many connections.
    let relay = match p.rate {
        Some(rate) => {
            out.say("raw quinn relay at the same rate ...");
            Some(
                peer.relay(
                    RelayShape {
                        groups: p.groups,
                        conns: (receivers / p.groups.max(1)).max(1),
                        senders: p.senders,
                        streams: p.relay_streams || p.relay_durable,
                        durable: p.relay_durable,
                    },
                    frame,
                    rate,
                    duration,
                )
                .await?,
            )
        }
        None => None,
    };
    drop(peer);
    // The same with quinn's default datagram size: what an untuned raw
    // quinn pushes.
    let peer = RawPeer::start_with(QUINN_DEFAULT_UDP_PAYLOAD)?;
    let baseline_small = peer
        .push(receivers.max(1), frame, Duration::from_secs(3))
        .await?;
    drop(peer);

    let h = tally.latency.lock().expect("latency").clone();
    let from_ds = tally.from_ds.lock().expect("from_ds").clone();
    let mut r = Report::new("fanout");
    r.set("groups", p.groups as u64)
        .set("members", p.members as u64)
        .set("senders", p.senders as u64)
        .set("light_members", light_per_group as u64)
        .set("full_members", p.full as u64)
        .set("message_size", p.size as u64)
        .set(
            "mode",
            if p.rate.is_some() {
                "fixed rate"
            } else {
                "closed loop"
            },
        )
        .set_opt("rate", p.rate)
        .set("duration_s", p.duration)
        .set("messages_sent", sent)
        .set("encrypted_ahead_per_sender", ahead as u64)
        .set("messages_per_sec", sent as f64 / p.duration)
        .set("deliveries", deliveries)
        .set("deliveries_expected", expected)
        .set("deliveries_per_sec", dps)
        .set("frame_bytes", frame as u64)
        .set("baseline_push_per_sec", baseline)
        .set("ratio", dps / baseline)
        .set("baseline_1452_push_per_sec", baseline_small)
        .set("ratio_1452", dps / baseline_small)
        .latency("", &h);
    if !from_ds.is_empty() {
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            r.set(
                &format!("from_ds_{name}_ms"),
                from_ds.value_at_quantile(q) as f64 / 1000.0,
            );
        }
    }
    if let Some(relay) = &relay {
        r.latency("baseline_", &relay.latency)
            .set(
                "baseline_relay_delivered_share",
                relay.delivered as f64 / relay.expected.max(1) as f64,
            )
            .set_opt(
                "baseline_relay_cpu_cores",
                relay.cpu_s.map(|c| c / relay.wall_s),
            )
            .set_opt(
                "baseline_relay_cpu_us_per_delivery",
                relay.cpu_s.map(|c| c * 1e6 / relay.delivered.max(1) as f64),
            )
            .set(
                "baseline_relay_sent_per_sec",
                relay.sent as f64 / relay.send_s.max(1e-9),
            )
            .set(
                "baseline_relay_datagrams_per_sec",
                relay.datagrams as f64 / relay.wall_s,
            )
            .set_opt(
                "server_cpu_ratio_to_relay",
                load.server_cpu_s
                    .zip(relay.cpu_s)
                    .filter(|(_, r)| *r > 0.0)
                    .map(|(s, r)| {
                        (s / deliveries.max(1) as f64) / (r / relay.delivered.max(1) as f64)
                    }),
            )
            .set(
                "p99_ratio",
                h.value_at_quantile(0.99) as f64
                    / relay.latency.value_at_quantile(0.99).max(1) as f64,
            );
    }
    r.set_opt(
        "server_cpu_cores",
        load.server_cpu_s.map(|c| c / load.wall_s),
    )
    .set_opt(
        "server_cpu_us_per_delivery",
        load.server_cpu_s
            .map(|c| c * 1e6 / deliveries.max(1) as f64),
    )
    .set_opt("machine_busy_share", load.machine_busy_share)
    .set_opt("machine_steal_share", load.machine_steal_share)
    .set(
        "push_datagrams_per_sec",
        load.datagrams as f64 / load.wall_s,
    )
    .set("member_datagrams_per_sec", load.sent as f64 / load.wall_s)
    .set(
        "deliveries_per_push_datagram",
        deliveries as f64 / load.datagrams.max(1) as f64,
    );
    if let Some(c) = &load.counters {
        let per = |a: &str, b: &str| c.get(a) as f64 / c.get(b).max(1) as f64;
        let rate = |a: &str| c.get(a) as f64 / load.wall_s;
        r.set("rounds_per_sec", rate("rounds"))
            .set("entries_per_round", per("entries", "rounds"))
            .set("writer_tx_per_sec", rate("transactions"))
            .set("entries_per_tx", per("entries", "transactions"))
            .set("group_writes_per_tx", per("group_writes", "transactions"))
            .set("push_writes_per_sec", rate("push_writes"))
            .set("frames_per_push_write", per("pushed", "push_writes"));
        r.note("rounds_per_sec … frames_per_push_write: the DS's own counters over the same window (huddle-server --stats-file): sequencer rounds that wrote (one per group per batch taken from its queue), durable store transactions of the writer thread (one flush each) and the entries and group writes they carried, writes on push streams and the frames each carried");
    }
    if nodes > 1 {
        let per_node: Vec<serde_json::Value> = load
            .node_cpu_s
            .iter()
            .map(|c| {
                c.map_or(serde_json::Value::Null, |c| {
                    ((c / load.wall_s) * 1000.0).round().into()
                })
            })
            .collect();
        r.set("nodes", nodes as u64)
            .set("server_cpu_millicores_per_node", per_node)
            .note(format!(
                "DS: {described}; senders on the first node, light members spread over all, full members on the last; server_cpu_* and the counters are all nodes' together, server_peak_rss_mb the largest node's"
            ));
    }
    r.set_opt("server_peak_rss_mb", server_rss)
        .set_opt("client_peak_rss_mb", own_peak_rss_mb())
        .set_opt("bytes_written_per_msg", written);
    r.set("full_members_verified", full_ok);
    for e in &full_errors {
        r.note(format!("a full member failed: {e}"));
    }
    r.note(format!(
        "{} light members receive, timestamp and acknowledge without decrypting; {} full member(s) decrypt and store every message (counted {:?} of {:?} sent per group)",
        receivers, p.groups * p.full, full_texts, sent_per_group
    ));
    if ahead > 0 {
        r.note(format!("at a fixed rate each sender encrypts its {ahead} messages before the clock starts (members encrypt on their own devices; here that would take the DS's CPU); latency runs from a sender starting to send a message (before opening its stream) to its receipt. In closed loop senders encrypt as they go"));
    }
    r.note(format!("deliveries = messages x light receivers; the baseline pushes frames of the same size to as many raw quinn connections, with the DS's transport settings (datagrams up to {} bytes); baseline_1452: the same with quinn's default {QUINN_DEFAULT_UDP_PAYLOAD}-byte datagrams", huddle_core::proto::MAX_UDP_PAYLOAD));
    r.note("from_ds_p*: from the DS's timestamp of an entry (its sequencer accepted it; wall clock, ms) to receipt: the durable commit, push spacing, transport and receiving; the rest of the latency is the sender's request reaching the sequencer");
    r.note("server_cpu_cores, machine_busy_share, machine_steal_share, push_datagrams_per_sec: from the first send until the pushes drained; push datagrams are the UDP datagrams the light members received, member datagrams those they sent (QUIC ACKs, acks); so DS cost per datagram = server_cpu_cores / push_datagrams_per_sec");
    if relay.is_some() {
        r.set("baseline_relay_streams", p.relay_streams || p.relay_durable);
        r.set("baseline_relay_durable", p.relay_durable);
        r.note("baseline_p*: raw quinn relaying frames of the same size at the same rate from as many senders to as many connections, each frame to the connections of its group (one process forwarding each frame as it arrives: no storage, no ordering, no checks); baseline_relay_streams: each frame on a stream of its own, answered once queued, as posts to the DS are (otherwise one stream per sender); baseline_relay_durable: each frame also appended to its group's log through the DS's store and writer before it is answered and forwarded; baseline_relay_sent_per_sec: frames the relay's senders got out per second of sending; p99_ratio = p99 / baseline_p99; server_cpu_ratio_to_relay = the DS's CPU per delivery / the relay's");
    }
    out.emit(&r);
    out.plot(
        &format!(
            "fanout: {} x {} members, {} B messages",
            p.groups, p.members, p.size
        ),
        &h,
    )?;
    Ok(())
}

/// Counters read at the start and the end of the sending window.
struct Load {
    at: Instant,
    /// The DS's CPU seconds, when the benchmark started it (all nodes).
    server_cpu_s: Option<f64>,
    /// Each node's CPU seconds.
    node_cpu_s: Vec<Option<f64>>,
    /// (busy, total, steal) jiffies of the whole machine.
    machine: Option<(u64, u64, u64)>,
    /// UDP datagrams received by the light members.
    datagrams: u64,
    /// UDP datagrams sent by the light members (QUIC ACKs, their acks).
    sent: u64,
    /// The DS's work counters, when the benchmark started it.
    counters: Option<crate::ds::Counters>,
}

/// What happened between two [`Load`] readings.
struct LoadDelta {
    wall_s: f64,
    server_cpu_s: Option<f64>,
    node_cpu_s: Vec<Option<f64>>,
    machine_busy_share: Option<f64>,
    machine_steal_share: Option<f64>,
    datagrams: u64,
    sent: u64,
    counters: Option<crate::ds::Counters>,
}

impl Load {
    fn now(nodes: &[Ds], conns: &[quinn::Connection]) -> Self {
        let node_cpu: Vec<Option<f64>> = nodes
            .iter()
            .map(|d| d.pid().and_then(crate::ds::cpu_seconds))
            .collect();
        let (mut datagrams, mut sent) = (0, 0);
        for c in conns {
            let s = c.stats();
            datagrams += s.udp_rx.datagrams;
            sent += s.udp_tx.datagrams;
        }
        Self {
            at: Instant::now(),
            server_cpu_s: node_cpu.iter().copied().sum(),
            node_cpu_s: node_cpu,
            machine: machine_jiffies(),
            datagrams,
            sent,
            counters: nodes
                .iter()
                .map(Ds::counters)
                .try_fold(crate::ds::Counters::default(), |sum, c| {
                    c.map(|c| sum.plus(&c))
                }),
        }
    }

    fn since(&self, before: &Load) -> LoadDelta {
        LoadDelta {
            wall_s: self.at.duration_since(before.at).as_secs_f64().max(1e-9),
            server_cpu_s: self
                .server_cpu_s
                .zip(before.server_cpu_s)
                .map(|(a, b)| a - b),
            node_cpu_s: self
                .node_cpu_s
                .iter()
                .zip(&before.node_cpu_s)
                .map(|(a, b)| a.zip(*b).map(|(a, b)| a - b))
                .collect(),
            machine_busy_share: self.machine.zip(before.machine).and_then(
                |((busy, total, _), (busy0, total0, _))| {
                    (total > total0).then(|| (busy - busy0) as f64 / (total - total0) as f64)
                },
            ),
            machine_steal_share: self.machine.zip(before.machine).and_then(
                |((_, total, steal), (_, total0, steal0))| {
                    (total > total0).then(|| (steal - steal0) as f64 / (total - total0) as f64)
                },
            ),
            datagrams: self.datagrams.saturating_sub(before.datagrams),
            sent: self.sent.saturating_sub(before.sent),
            counters: self
                .counters
                .as_ref()
                .zip(before.counters.as_ref())
                .map(|(a, b)| a.since(b)),
        }
    }
}

/// (busy, total, steal) jiffies of all CPUs from the first line of
/// `/proc/stat`; idle and iowait count as not busy, steal (time the
/// hypervisor gave to other guests) as busy.
fn machine_jiffies() -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3)? + f.get(4)?;
    Some((total - idle, total, f.get(7).copied().unwrap_or(0)))
}

/// What one sender sends.
struct Sending {
    /// Application message size.
    size: usize,
    duration: Duration,
    /// Messages outstanding in closed loop.
    inflight: usize,
    /// Messages per second (None: closed loop).
    rate: Option<f64>,
    /// Messages encrypted ahead, with their tickets; sent first.
    prepared: Vec<(u64, huddle_core::proto::Request)>,
    /// Where prepared messages' send times go.
    tally: Arc<Tally>,
}

/// Sends for `duration`, keeping `inflight` messages outstanding (or pacing
/// to `rate` per second). Returns (messages acknowledged, MLS message size).
async fn send_loop(mut lean: Lean, sending: Sending) -> anyhow::Result<(u64, usize)> {
    let Sending {
        size,
        duration,
        inflight,
        rate,
        prepared,
        tally,
    } = sending;
    let mut prepared = prepared.into_iter();
    // Receivers open a message only if fewer than OUT_OF_ORDER_TOLERANCE
    // later ones of the same sender were processed before it. `inflight`
    // bounds how many are outstanding, not how far one slow request can
    // fall behind the others, so also never run that far ahead of the
    // oldest outstanding message.
    let max_gap = u64::from(huddle_core::mls::OUT_OF_ORDER_TOLERANCE) - 1;
    let conn = lean.light.net.quic().clone();
    let end = Instant::now() + duration;
    let mut set = tokio::task::JoinSet::new();
    let mut outstanding = std::collections::BTreeSet::new();
    let mut acked = 0u64;
    let mut len = 0usize;
    let mut next_index = 0u64;
    let mut settle = |r: Result<(u64, anyhow::Result<Response>), tokio::task::JoinError>,
                      outstanding: &mut std::collections::BTreeSet<u64>| {
        if let Ok((i, r)) = r {
            outstanding.remove(&i);
            if matches!(r, Ok(Response::Appended { .. })) {
                acked += 1;
            }
        }
    };
    let interval = rate.map(|r| Duration::from_secs_f64(1.0 / r.max(0.001)));
    let mut next = Instant::now();
    while Instant::now() < end {
        if let Some(iv) = interval {
            tokio::time::sleep_until(next.into()).await;
            next += iv;
        }
        let behind = outstanding
            .first()
            .is_some_and(|&oldest| next_index - oldest >= max_gap);
        if behind || (interval.is_none() && set.len() >= inflight) {
            if let Some(r) = set.join_next().await {
                settle(r, &mut outstanding);
            }
            continue;
        }
        let req = match prepared.next() {
            Some((ticket, req)) => {
                tally.mark_sent(ticket);
                req
            }
            None => lean.message(size, now_ns())?,
        };
        if let huddle_core::proto::Request::Message { message, .. } = &req {
            len = message.len();
        }
        let conn = conn.clone();
        let i = next_index;
        next_index += 1;
        outstanding.insert(i);
        set.spawn(async move { (i, request_on(&conn, &req).await) });
        while let Some(r) = set.try_join_next() {
            settle(r, &mut outstanding);
        }
    }
    while let Some(r) = set.join_next().await {
        settle(r, &mut outstanding);
    }
    Ok((acked, len))
}
