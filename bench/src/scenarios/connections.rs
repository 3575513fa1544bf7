//! `connections`: K authenticated idle connections. DS memory per
//! connection and time to connect them all, against raw quinn.

use std::time::{Duration, Instant};

use clap::Args;
use huddle_client::identity::Identity;
use huddle_client::net::Connection;

use super::trust;
use crate::ds::Ds;
use crate::light::{register_many, run_name};
use crate::report::{Output, Report};
use crate::Target;

/// Parameters.
#[derive(Debug, Args)]
pub struct Params {
    /// Connections (up to 10,000).
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Users the connections authenticate as (round robin); raised so that
    /// no user holds more connections than the DS allows one user
    /// (`max_connections_per_user`, 32 by default).
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    #[command(flatten)]
    pub target: Target,
}

/// Connections one user may hold on a DS with default limits.
const PER_USER: usize = 32;

/// Runs it.
pub async fn run(p: Params, out: &Output) -> anyhow::Result<()> {
    let ds = Ds::start(&p.target)?;
    let trust = trust(&ds)?;
    let n_users = p.users.max(p.count.div_ceil(PER_USER)).max(1);
    out.say(&format!("registering {n_users} users ..."));
    let users: Vec<Identity> = register_many(&ds.addr, &trust, &run_name("c"), n_users, 0)
        .await?
        .into_iter()
        .map(|l| l.id)
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = ds.rss_mb();
    out.say(&format!(
        "opening {} authenticated connections ...",
        p.count
    ));
    let t = Instant::now();
    let mut conns: Vec<Connection> = Vec::with_capacity(p.count);
    let mut pending = tokio::task::JoinSet::new();
    let users = std::sync::Arc::new(users);
    for i in 0..p.count {
        while pending.len() >= 64 {
            if let Some(r) = pending.join_next().await {
                conns.push(r??);
            }
        }
        let (addr, trust, users) = (ds.addr.clone(), trust.clone(), users.clone());
        pending.spawn(async move {
            let c = Connection::connect(&addr, trust).await?;
            c.authenticate(&users[i % users.len()], false).await?;
            anyhow::Ok(c)
        });
    }
    while let Some(r) = pending.join_next().await {
        conns.push(r??);
    }
    let connect_s = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = ds.rss_mb();
    // They are all still usable.
    let probe = conns.len().min(50);
    for c in conns.iter().take(probe) {
        c.request(&huddle_core::proto::Request::KeyPackageCount)
            .await?;
    }
    let server_rss = ds.peak_rss_mb();
    drop(conns);
    drop(ds);

    out.say("raw quinn baseline ...");
    let peer = crate::baseline::RawPeer::start()?;
    let t = Instant::now();
    let mut raw = Vec::new();
    for _ in 0..p.count.min(2000) {
        raw.push(peer.connect().await?);
    }
    let raw_rate = raw.len() as f64 / t.elapsed().as_secs_f64();
    drop(raw);

    let per_conn_kb = match (before, after) {
        (Some(b), Some(a)) => Some((a - b) * 1024.0 / p.count as f64),
        _ => None,
    };
    let mut r = Report::new("connections");
    r.set("connections", p.count as u64)
        .set("users", n_users as u64)
        .set("connect_all_s", connect_s)
        .set("connections_per_sec", p.count as f64 / connect_s)
        .set("baseline_connections_per_sec", raw_rate)
        .set("ratio", p.count as f64 / connect_s / raw_rate)
        .set_opt("server_rss_before_mb", before)
        .set_opt("server_rss_after_mb", after)
        .set_opt("server_rss_per_connection_kb", per_conn_kb)
        .set_opt("server_peak_rss_mb", server_rss)
        .note("connect = QUIC + TLS 1.3 handshake, challenge, Ed25519 proof bound to the TLS exporter; 64 at a time")
        .note("the baseline opens raw quinn connections one at a time from one client endpoint (up to 2,000)");
    out.emit(&r);
    Ok(())
}
