//! The benchmark scenarios, and what they share.

pub mod abuse;
pub mod baseline;
pub mod catchup;
pub mod connections;
pub mod crash;
pub mod fanout;
pub mod link;
pub mod media;
mod media_objects;
pub mod membership;

use anyhow::bail;
use huddle_client::net::{read_message, Trust};
use huddle_core::proto::{self, Request, Response};

use crate::ds::Ds;

/// Trust for the DS under test: its certificate, pinned.
pub fn trust(ds: &Ds) -> anyhow::Result<Trust> {
    Ok(Trust::Pinned(huddle_client::home::read_pem_certs(
        &ds.cert,
    )?))
}

/// One request on a QUIC connection (usable from many tasks at once).
pub async fn request_on(conn: &quinn::Connection, req: &Request) -> anyhow::Result<Response> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&proto::encode_frame(req)).await?;
    let _ = send.finish();
    match read_message::<Response>(&mut recv).await? {
        Response::Error(e) => bail!("server refused: {}", e.message),
        r => Ok(r),
    }
}

/// The `q` quantile of some samples.
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Size of a pushed entry frame for an MLS message of `mls_len` bytes: the
/// frame header, the event and entry envelope (tags, group id, varints).
pub fn entry_frame_len(mls_len: usize) -> usize {
    4 + 1 + 16 + 3 * 5 + 1 + 5 + 3 + mls_len
}
