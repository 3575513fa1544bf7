//! `abuse`: what one hostile registered member can cost the DS. Each attack
//! of the security review runs in turn, at full size, while an honest user
//! keeps probing (a fresh authenticated connection and a post, every
//! 200 ms); for each the DS's resident memory (before, highest during),
//! its thread count and the honest user's latency are reported.
//! `server/tests/abuse.rs` has the short versions, with bounds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use huddle_client::identity::Identity;
use huddle_client::net::{self, Connection, Trust};
use huddle_core::proto::{self, Request, UploadRequest};
use huddle_core::MediaId;

use super::{quantile, trust};
use crate::ds::Ds;
use crate::lean::Lean;
use crate::light::{claim, register, register_many, run_name};
use crate::report::{Output, Report};
use crate::Target;

/// Parameters.
#[derive(Debug, Args)]
pub struct Params {
    /// Seconds each attack is held while the honest user probes.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Scale of every attack (1 = the sizes of the review: 100 unread log
    /// pages on each of 4 connections, 1,000 silent uploads, a Welcome of
    /// 3.9 MB for 100 joiners, 2,000 idle connections, 150 messages of
    /// 256 KiB in each of 5 groups).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    #[command(flatten)]
    pub target: Target,
}

/// What the DS and the honest user went through during one attack.
struct Seen {
    rss_before_mb: f64,
    rss_peak_mb: f64,
    threads_peak: u64,
    probe_ms: Vec<f64>,
    probe_failures: usize,
}

/// Runs it.
pub async fn run(p: Params, out: &Output) -> anyhow::Result<()> {
    let ds = Ds::start(&p.target)?;
    let pid = ds.pid().ok_or_else(|| {
        anyhow::anyhow!("abuse needs a DS it starts itself (its memory is read from /proc)")
    })?;
    let trust = trust(&ds)?;
    let n = |base: f64| ((base * p.scale).round() as usize).max(1);
    let hold = Duration::from_secs(p.seconds);

    out.say("honest user and attacker ...");
    let mut honest =
        Lean::new(register(&ds.addr, &trust, &run_name("honest"), 0).await?, 0).await?;
    honest.create().await?;
    let honest_id = Identity::from_seed(&honest.light.id.name, honest.light.id.seed());
    let mut attacker = Lean::new(
        register(&ds.addr, &trust, &run_name("mallory"), 0).await?,
        0,
    )
    .await?;
    attacker.create().await?;
    let mallory = Identity::from_seed(&attacker.light.id.name, attacker.light.id.seed());
    let mut reports = Vec::new();

    // 0. No attack: what the honest user's probe costs on its own.
    let seen = during(
        pid,
        &ds.addr,
        &trust,
        &honest_id,
        &mut honest,
        hold,
        async { Ok(Held::default()) },
    )
    .await?;
    reports.push(("no_attack", seen));

    // 1. Answers nobody reads: a log of about 8 MiB, asked for page after
    // page on connections that grant no flow-control credit.
    out.say("unread answers ...");
    for _ in 0..40 {
        let m = attacker.message(200 * 1024, 0)?;
        attacker.light.net.request(&m).await?;
    }
    let (group, _) = attacker
        .group
        .as_ref()
        .map(|(g, _)| (*g, ()))
        .expect("group");
    let seen = during(
        pid,
        &ds.addr,
        &trust,
        &honest_id,
        &mut honest,
        hold,
        async {
            let mut held = Held::default();
            for _ in 0..n(4.0) {
                let mut t = net::transport();
                t.stream_receive_window(1024u32.into());
                t.receive_window((32u32 * 1024).into());
                let c = Connection::connect_with(None, &ds.addr, trust.clone(), t).await?;
                c.authenticate(&mallory, false).await?;
                let ask = proto::encode_frame(&Request::FetchLog {
                    group,
                    after: 0,
                    limit: 1000,
                });
                for _ in 0..100 {
                    let (mut send, recv) = c.quic().open_bi().await?;
                    send.write_all(&ask).await?;
                    let _ = send.finish();
                    held.streams.push((send, recv));
                }
                held.conns.push(c);
            }
            Ok(held)
        },
    )
    .await?;
    reports.push(("unread_answers", seen));

    // 2. Uploads that send nothing after their request.
    out.say("silent uploads ...");
    let uploaders = register_many(&ds.addr, &trust, &run_name("up"), 10, 1).await?;
    // They must be members of the group they upload to.
    let names: Vec<String> = uploaders.iter().map(|l| l.id.name.clone()).collect();
    let kps = claim(&attacker.light.net, &names).await?;
    attacker.add(kps).await?;
    let per = n(1000.0) / uploaders.len();
    let seen = during(
        pid,
        &ds.addr,
        &trust,
        &honest_id,
        &mut honest,
        hold,
        async {
            let mut held = Held::default();
            for l in &uploaders {
                for c in 0..2 {
                    let conn = Connection::connect(&ds.addr, trust.clone()).await?;
                    conn.authenticate(&l.id, false).await?;
                    for i in 0..per / 2 {
                        let mut media = [0u8; 16];
                        media[..8].copy_from_slice(&(i as u64).to_be_bytes());
                        media[8] = c;
                        media[9..].copy_from_slice(&l.id.public()[..7]);
                        let (mut send, recv) = conn.quic().open_bi().await?;
                        send.write_all(&proto::encode_frame(&Request::BeginUpload(
                            UploadRequest {
                                group,
                                media: MediaId(media),
                                total_len: 1 << 30,
                            },
                        )))
                        .await?;
                        held.streams.push((send, recv));
                    }
                    held.conns.push(conn);
                }
            }
            Ok(held)
        },
    )
    .await?;
    reports.push(("silent_uploads", seen));

    // 3. One commit adding many users, its Welcome padded to 3.9 MB.
    out.say("padded Welcome ...");
    let joiners = register_many(&ds.addr, &trust, &run_name("j"), n(100.0), 1).await?;
    let names: Vec<String> = joiners.iter().map(|l| l.id.name.clone()).collect();
    let kps = claim(&attacker.light.net, &names).await?;
    let seen = during(
        pid,
        &ds.addr,
        &trust,
        &honest_id,
        &mut honest,
        hold,
        async {
            attacker.add_padded(&kps, 3_900_000).await?;
            Ok(Held::default())
        },
    )
    .await?;
    reports.push(("padded_welcome", seen));

    // 4. Connections that never authenticate.
    out.say("unauthenticated connections ...");
    let seen = during(
        pid,
        &ds.addr,
        &trust,
        &honest_id,
        &mut honest,
        hold,
        async {
            let mut held = Held::default();
            for _ in 0..n(2000.0) {
                match Connection::connect(&ds.addr, trust.clone()).await {
                    Ok(c) => held.conns.push(c),
                    Err(_) => break,
                }
            }
            Ok(held)
        },
    )
    .await?;
    reports.push(("unauthenticated", seen));

    // 5. The largest messages, many, in several groups.
    out.say("large messages ...");
    let seen = during(
        pid,
        &ds.addr,
        &trust,
        &honest_id,
        &mut honest,
        hold,
        async {
            for _ in 0..n(5.0) {
                attacker.create().await?;
                for _ in 0..n(150.0) {
                    let m = attacker.message(255 * 1024, 0)?;
                    attacker.light.net.request(&m).await?;
                }
            }
            Ok(Held::default())
        },
    )
    .await?;
    reports.push(("large_messages", seen));

    let peak = ds.peak_rss_mb();
    drop(ds);
    let mut r = Report::new("abuse");
    r.set("seconds_per_attack", p.seconds)
        .set("scale", p.scale)
        .set_opt("server_peak_rss_mb", peak);
    for (name, s) in &reports {
        r.set(&format!("{name}_rss_before_mb"), s.rss_before_mb)
            .set(&format!("{name}_rss_peak_mb"), s.rss_peak_mb)
            .set(&format!("{name}_threads_peak"), s.threads_peak)
            .set(&format!("{name}_honest_p50_ms"), quantile(&s.probe_ms, 0.5))
            .set(&format!("{name}_honest_max_ms"), quantile(&s.probe_ms, 1.0))
            .set(&format!("{name}_honest_probes"), s.probe_ms.len() as u64)
            .set(&format!("{name}_honest_failures"), s.probe_failures as u64);
    }
    r.note("each attack is held for the given seconds after it is in place; the honest user probes every 200 ms: QUIC + TLS handshake, authentication, and one post");
    r.note("rss_peak is the highest resident size sampled every 100 ms during the attack");
    out.emit(&r);
    Ok(())
}

/// What an attack keeps open while it is held.
#[derive(Default)]
struct Held {
    conns: Vec<Connection>,
    streams: Vec<(quinn::SendStream, quinn::RecvStream)>,
}

/// Puts `attack` in place and holds it for `hold`, probing the honest user
/// and sampling the DS throughout.
async fn during(
    pid: u32,
    addr: &str,
    trust: &Trust,
    honest_id: &Identity,
    honest: &mut Lean,
    hold: Duration,
    attack: impl std::future::Future<Output = anyhow::Result<Held>>,
) -> anyhow::Result<Seen> {
    let rss_before_mb = rss_mb(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut rss, mut threads) = (0f64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                rss = rss.max(rss_mb(pid));
                threads = threads.max(status(pid, "Threads:").unwrap_or(0.0) as u64);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (rss, threads)
        })
    };
    let mut probe_ms = Vec::new();
    let mut probe_failures = 0;
    let held = tokio::select! {
        h = attack => h?,
        () = async {
            loop {
                probe(addr, trust, honest_id, honest, &mut probe_ms, &mut probe_failures).await;
            }
        } => unreachable!(),
    };
    let until = Instant::now() + hold;
    while Instant::now() < until {
        probe(
            addr,
            trust,
            honest_id,
            honest,
            &mut probe_ms,
            &mut probe_failures,
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let (rss_peak_mb, threads_peak) = sampler.await?;
    drop(held);
    Ok(Seen {
        rss_before_mb,
        rss_peak_mb,
        threads_peak,
        probe_ms,
        probe_failures,
    })
}

/// One probe of the honest user, then a pause.
async fn probe(
    addr: &str,
    trust: &Trust,
    id: &Identity,
    honest: &mut Lean,
    ms: &mut Vec<f64>,
    failures: &mut usize,
) {
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), async {
        let c = Connection::connect(addr, trust.clone()).await?;
        c.authenticate(id, false).await?;
        let m = honest.message(256, 0)?;
        c.request(&m).await?;
        let took = t.elapsed();
        c.close().await;
        anyhow::Ok(took)
    })
    .await;
    match r {
        Ok(Ok(took)) => ms.push(took.as_secs_f64() * 1e3),
        _ => *failures += 1,
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
}

fn status(pid: u32, key: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn rss_mb(pid: u32) -> f64 {
    status(pid, "VmRSS:").unwrap_or(0.0) / 1024.0
}
