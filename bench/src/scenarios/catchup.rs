//! `catchup`: a member offline during N messages comes back. The DS's
//! delivery rate (pages of the log) and the full client's processing rate
//! (decrypt, store, advance the cursor, one transaction per page).

use std::time::{Duration, Instant};

use clap::Args;
use huddle_client::{Client, Home};
use huddle_core::proto::{Request, Response, MAX_PAGE};

use super::{entry_frame_len, request_on, trust};
use crate::baseline::RawPeer;
use crate::ds::Ds;
use crate::lean::Lean;
use crate::light::{claim, register, run_name};
use crate::report::{Output, Report};
use crate::Target;

/// Parameters.
#[derive(Debug, Args)]
pub struct Params {
    /// Messages sent while the member is offline (up to 100,000).
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 256, value_parser = crate::units::parse_bytes_usize)]
    pub size: usize,
    #[command(flatten)]
    pub target: Target,
}

/// Runs it.
pub async fn run(p: Params, out: &Output) -> anyhow::Result<()> {
    let ds = Ds::start(&p.target)?;
    let trust = trust(&ds)?;
    let homes = tempfile::tempdir()?;
    let (fetcher_name, offline_name) = (run_name("fetcher"), run_name("offline"));
    let mut sender =
        Lean::new(register(&ds.addr, &trust, &run_name("sender"), 0).await?, 0).await?;
    let fetcher = register(&ds.addr, &trust, &fetcher_name, 1).await?;
    let home = Home::new(homes.path().join("offline"));
    Client::register(home.clone(), &offline_name, &ds.addr, Some(&ds.cert))
        .await?
        .close()
        .await;
    let g = sender.create().await?;
    let kps = claim(
        &sender.light.net,
        &[fetcher_name.clone(), offline_name.clone()],
    )
    .await?;
    let add = sender.add(kps).await?;
    {
        let mut c = Client::open(home.clone())?;
        c.sync().await?;
        c.close().await;
    }

    out.say(&format!(
        "sending {} messages while the member is offline ...",
        p.messages
    ));
    let conn = sender.light.net.quic().clone();
    let mut set = tokio::task::JoinSet::new();
    let mut mls_len = 0;
    let t = Instant::now();
    for _ in 0..p.messages {
        while set.len() >= 16 {
            set.join_next().await.transpose()?.transpose()?;
        }
        let req = sender.message(p.size, crate::light::now_ns())?;
        if let Request::Message { message, .. } = &req {
            mls_len = message.len();
        }
        let conn = conn.clone();
        set.spawn(async move { request_on(&conn, &req).await });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let send_rate = p.messages as f64 / t.elapsed().as_secs_f64();

    out.say("DS delivery: reading the log in pages ...");
    let t = Instant::now();
    let mut after = add.seq;
    let mut got = 0usize;
    loop {
        let Response::Log { entries, head } = fetcher
            .net
            .request(&Request::FetchLog {
                group: g,
                after,
                limit: MAX_PAGE,
            })
            .await?
        else {
            anyhow::bail!("unexpected answer");
        };
        got += entries.len();
        if let Some(last) = entries.last() {
            after = last.seq;
        }
        if after >= head || entries.is_empty() {
            break;
        }
    }
    let ds_rate = got as f64 / t.elapsed().as_secs_f64();

    out.say("full client: sync ...");
    let t = Instant::now();
    let mut c = Client::open(home)?;
    let events = c.sync().await?;
    let client_secs = t.elapsed().as_secs_f64();
    let texts = events.iter().filter(|e| e.kind == "text").count();
    c.close().await;
    let server_rss = ds.peak_rss_mb();
    drop(ds);

    out.say("raw quinn baseline ...");
    let peer = RawPeer::start()?;
    let frame = entry_frame_len(mls_len);
    let base = peer.push(1, frame, Duration::from_secs(2)).await?;
    drop(peer);

    let mut r = Report::new("catchup");
    r.set("messages", p.messages as u64)
        .set("message_size", p.size as u64)
        .set("send_rate_per_sec", send_rate)
        .set("ds_delivery_per_sec", ds_rate)
        .set("entries_fetched", got as u64)
        .set("client_messages_per_sec", texts as f64 / client_secs)
        .set("client_messages_processed", texts as u64)
        .set("client_complete", texts == p.messages)
        .set("baseline_push_per_sec", base)
        .set("ratio", ds_rate / base)
        .set_opt("server_peak_rss_mb", server_rss)
        .note("DS delivery = one member reading the log in pages of up to 1,000 entries; the baseline pushes frames of the same size on one raw quinn stream")
        .note("client = the full client's sync: decrypt, store history, advance the cursor, one SQLite transaction per page");
    out.emit(&r);
    Ok(())
}
