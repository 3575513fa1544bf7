//! `media --blobs s3://…`: one upload and one download through DS nodes
//! that keep blobs on an object store, and the store's own speed on the
//! path the DS takes (8 MiB parts, one in flight; a ranged GET).

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use huddle_client::{Client, Home};
use huddle_server::media::objects::{Objects, PART};

use super::media::{hash_file, minus, total, Params, Split};
use crate::cluster::Cluster;
use crate::ds::{children_cpu_split, cpu_split, run_measured};
use crate::light::run_name;

/// What the object store run measured.
pub(super) struct ObjectsRun {
    pub(super) nodes: usize,
    pub(super) describe: String,
    pub(super) upload_mb_s: f64,
    pub(super) download_mb_s: f64,
    /// (clients, all nodes) CPU of the upload and of the download.
    pub(super) up: (Split, Split),
    pub(super) down: (Split, Split),
    /// The object store's CPU seconds, when its process is known.
    pub(super) store_up: Option<f64>,
    pub(super) store_down: Option<f64>,
    pub(super) server_rss: Option<f64>,
    pub(super) intact: bool,
}

/// CPU of every node of a cluster together, and of the object store.
fn nodes_cpu(c: &Cluster, store: Option<u32>) -> (Split, Option<f64>) {
    let mut sum = (0.0, 0.0);
    for pid in c.nodes.iter().filter_map(|n| n.pid()) {
        let (u, s) = cpu_split(pid).unwrap_or_default();
        sum = (sum.0 + u, sum.1 + s);
    }
    (sum, store.and_then(cpu_split).map(total))
}

/// One upload through node 0 and one download through node 1 (or 0) of
/// DS nodes keeping blobs on the object store; the file is `src`, of
/// BLAKE3 hash `want`, `blob` bytes of ciphertext.
pub(super) async fn through_objects(
    p: &Params,
    huddle: &Path,
    dir: &Path,
    src: &Path,
    want: [u8; 32],
    blob: u64,
) -> anyhow::Result<ObjectsRun> {
    let cluster = Cluster::start(&p.cluster)?;
    let n = cluster.nodes.len();
    let cert = cluster.cert();
    let home = |who: &str| Home::new(dir.join(format!("home-objects-{who}")));
    let (up_name, down_name) = (run_name("oup"), run_name("odown"));
    let mut up =
        Client::register(home("up"), &up_name, &cluster.servers_from(0), Some(&cert)).await?;
    Client::register(
        home("down"),
        &down_name,
        &cluster.servers_from(1 % n),
        Some(&cert),
    )
    .await?
    .close()
    .await;
    let g = up.create_group("media").await?.to_string();
    up.add(&g, &[down_name]).await?;
    up.close().await;
    let args = |who: &str, rest: &[&str]| -> Vec<String> {
        let mut v = vec![
            "--home".to_string(),
            home(who).dir().display().to_string(),
            "--json".into(),
        ];
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    };
    let (ok, _, _) = run_measured(huddle, &args("down", &["sync"])).await?;
    anyhow::ensure!(ok, "sync failed");
    let measure = || {
        (
            children_cpu_split().unwrap_or_default(),
            nodes_cpu(&cluster, p.blobs_pid),
        )
    };
    let (c0, (n0, s0)) = measure();
    let t = Instant::now();
    let (ok, stdout, _) = run_measured(
        huddle,
        &args("up", &["send-file", &g, &src.display().to_string()]),
    )
    .await?;
    let up_secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(ok, "send-file through the object store failed");
    let (c1, (n1, s1)) = measure();
    let event: serde_json::Value =
        serde_json::from_str(stdout.lines().last().context("send-file output")?)?;
    let media = event["media_id"].as_str().context("media id")?.to_owned();
    let (ok, _, _) = run_measured(huddle, &args("down", &["sync"])).await?;
    anyhow::ensure!(ok, "sync failed");
    let outp = dir.join("objects.out");
    let (c2, (n2, s2)) = measure();
    let t = Instant::now();
    let (ok, _, _) = run_measured(
        huddle,
        &args(
            "down",
            &["download", &media, "-o", &outp.display().to_string()],
        ),
    )
    .await?;
    let down_secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(ok, "download through the object store failed");
    let (c3, (n3, s3)) = measure();
    let intact = hash_file(&outp)? == want;
    let _ = std::fs::remove_file(&outp);
    Ok(ObjectsRun {
        nodes: n,
        describe: cluster.describe(),
        upload_mb_s: blob as f64 / up_secs / 1e6,
        download_mb_s: blob as f64 / down_secs / 1e6,
        up: (minus(c1, c0), minus(n1, n0)),
        down: (minus(c3, c2), minus(n3, n2)),
        store_up: s0.zip(s1).map(|(a, b)| b - a),
        store_down: s2.zip(s3).map(|(a, b)| b - a),
        server_rss: cluster.peak_rss_mb(),
        intact,
    })
}

/// The object store alone on the DS's path: `len` bytes stored as a
/// multipart upload of [`PART`]-byte parts with one in flight while the
/// next is handed over, then read back with one ranged GET; the object is
/// deleted after. MB/s each way, and the store's CPU seconds each way
/// when its process is known.
pub(super) async fn store_baseline(
    url: &str,
    len: u64,
    store_pid: Option<u32>,
) -> anyhow::Result<((f64, Option<f64>), (f64, Option<f64>))> {
    let o = Objects::open(url, None, 2, 2).map_err(anyhow::Error::msg)?;
    let id = huddle_core::MediaId(rand::random());
    let part = Bytes::from(vec![0x5au8; PART as usize]);
    let cpu = || store_pid.and_then(cpu_split).map(total);
    let c0 = cpu();
    let t = Instant::now();
    let upload = o.begin(&id).await.map_err(|e| anyhow::anyhow!(e.message))?;
    let mut etags = Vec::new();
    let mut in_flight: Option<tokio::task::JoinHandle<anyhow::Result<String>>> = None;
    let mut at = 0u64;
    let mut index = 0usize;
    while at < len {
        let n = PART.min(len - at) as usize;
        let (o2, upload2, data) = (o.clone(), upload.clone(), part.slice(..n));
        let next = tokio::spawn(async move {
            o2.put_part(&id, &upload2, index, data)
                .await
                .map_err(|e| anyhow::anyhow!(e.message))
        });
        if let Some(prev) = in_flight.replace(next) {
            etags.push(prev.await??);
        }
        at += n as u64;
        index += 1;
    }
    if let Some(last) = in_flight {
        etags.push(last.await??);
    }
    o.complete(&id, &upload, etags, len)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let up = (
        len as f64 / t.elapsed().as_secs_f64() / 1e6,
        cpu().zip(c0).map(|(b, a)| b - a),
    );
    let c0 = cpu();
    let t = Instant::now();
    let mut stream = o
        .read(&id, 0..len)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let mut got = 0u64;
    while let Some(b) = stream.next().await {
        got += b?.len() as u64;
    }
    anyhow::ensure!(got == len, "read back {got} of {len} bytes");
    let down = (
        len as f64 / t.elapsed().as_secs_f64() / 1e6,
        cpu().zip(c0).map(|(b, a)| b - a),
    );
    o.delete(&id)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    Ok((up, down))
}
