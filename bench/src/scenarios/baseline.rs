//! `baseline`: raw quinn alone.

use std::time::Duration;

use clap::Args;

use crate::baseline::RawPeer;
use crate::report::{Output, Report};

/// Parameters.
#[derive(Debug, Args)]
pub struct Params {
    /// Bytes for the bulk transfers.
    #[arg(long, default_value_t = 1 << 30, value_parser = crate::units::parse_bytes)]
    pub size: u64,
    /// Connections for the push test.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Frame size for the push test.
    #[arg(long, default_value_t = 420)]
    pub frame: usize,
    /// Seconds of pushing.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
}

/// Runs it.
pub async fn run(p: Params, out: &Output) -> anyhow::Result<()> {
    let peer = RawPeer::start()?;
    out.say("raw quinn: bulk upload ...");
    let up = peer.bulk_upload(p.size).await?;
    out.say("raw quinn: bulk download ...");
    let down = peer.bulk_download(p.size).await?;
    out.say("raw quinn: push ...");
    let push = peer
        .push(p.connections, p.frame, Duration::from_secs_f64(p.duration))
        .await?;
    let mut r = Report::new("baseline");
    r.set("size_bytes", p.size)
        .set("connections", p.connections as u64)
        .set("frame_bytes", p.frame as u64)
        .set("baseline_upload_mb_s", up)
        .set("baseline_download_mb_s", down)
        .set("baseline_mb_s", up.min(down))
        .set("baseline_push_per_sec", push)
        .note("raw quinn between two processes on 127.0.0.1, TLS 1.3, the DS's transport windows");
    out.emit(&r);
    Ok(())
}
