//! `media`: one member uploads a generated file, R members download it
//! concurrently, all as separate `huddle` processes. MB/s each way against
//! raw quinn bulk throughput, and peak RSS of the DS and of every client.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::Args;
use huddle_client::{Client, Home};

use crate::baseline::{RawPeer, QUINN_DEFAULT_UDP_PAYLOAD};
use crate::ds::{children_cpu_seconds, cpu_seconds, own_cpu_seconds, run_measured, sibling, Ds};
use crate::light::run_name;
use crate::report::{Output, Report};
use crate::Target;

/// Parameters.
#[derive(Debug, Args)]
pub struct Params {
    /// File size in bytes (generated on disk, never held in memory).
    #[arg(long, default_value_t = 256 << 20)]
    pub size: u64,
    /// Concurrent downloaders.
    #[arg(long, default_value_t = 2)]
    pub downloaders: usize,
    /// Keep the generated file and downloads in this directory (default: a
    /// temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    pub target: Target,
}

/// Writes `size` bytes to a new file at `path`, 1 MiB at a time, and makes
/// them durable, as the DS must before it acknowledges an upload and the
/// client before it renames a download into place: like both, a second
/// thread flushes (`sync_data`) after every 16 MiB so the disk works while
/// the writing goes on, and a last flush ends it. Returns MB/s over the
/// whole; removes the file.
fn disk_write(path: &Path, size: u64) -> anyhow::Result<f64> {
    const SYNC_EVERY: u64 = 16 << 20;
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(path)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
    let syncing = f.try_clone()?;
    let syncer = std::thread::spawn(move || -> std::io::Result<()> {
        while rx.recv().is_ok() {
            syncing.sync_data()?;
        }
        Ok(())
    });
    let mut written = 0u64;
    while written < size {
        let n = (size - written).min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        written += n as u64;
        if written.is_multiple_of(SYNC_EVERY) {
            // Skip if the syncer is still busy with the previous one.
            let _ = tx.try_send(());
        }
    }
    drop(tx);
    syncer
        .join()
        .map_err(|_| anyhow::anyhow!("syncer panicked"))??;
    f.sync_data()?;
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(path)?;
    Ok(size as f64 / secs / 1e6)
}

/// Writes `size` pseudo-random bytes to `path`, 1 MiB at a time; returns
/// their BLAKE3 hash.
fn generate(path: &Path, size: u64) -> anyhow::Result<[u8; 32]> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut h = blake3::Hasher::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for w in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            w.copy_from_slice(&b[..w.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    f.flush()?;
    Ok(*h.finalize().as_bytes())
}

fn hash_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(*h.finalize().as_bytes())
}

/// Runs it.
pub async fn run(p: Params, out: &Output) -> anyhow::Result<()> {
    let huddle = sibling("huddle")?;
    let ds = Ds::start(&p.target)?;
    let tmp = tempfile::Builder::new().prefix("huddle-media-").tempdir()?;
    let dir = p.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let home = |n: &str| Home::new(dir.join(format!("home-{n}")));
    let addr = ds.addr.clone();

    out.say("setting up a group ...");
    let mut up = Client::register(home("up"), &run_name("up"), &addr, Some(&ds.cert)).await?;
    let g = up.create_group("media").await?.to_string();
    let mut names = Vec::new();
    for i in 0..p.downloaders {
        let n = format!("down{i}");
        Client::register(home(&n), &run_name(&n), &addr, Some(&ds.cert))
            .await?
            .close()
            .await;
        names.push(n);
    }
    let users: Vec<String> = names.iter().map(|n| run_name(n)).collect();
    up.add(&g, &users).await?;
    up.close().await;

    out.say(&format!("generating {} bytes ...", p.size));
    let src = dir.join("source.bin");
    let want = generate(&src, p.size)?;

    out.say("uploading ...");
    let args = |h: &str, rest: &[&str]| -> Vec<String> {
        let mut v = vec![
            "--home".to_string(),
            home(h).dir().display().to_string(),
            "--json".into(),
        ];
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    };
    let cpu = Cpu::start(ds.pid());
    let t = Instant::now();
    let (ok, stdout, up_rss) = run_measured(
        &huddle,
        &args("up", &["send-file", &g, &src.display().to_string()]),
    )
    .await?;
    let up_secs = t.elapsed().as_secs_f64();
    let up_cpu = cpu.stop();
    if !ok {
        bail!("send-file failed");
    }
    let event: serde_json::Value =
        serde_json::from_str(stdout.lines().last().context("send-file output")?)?;
    let media = event["media_id"].as_str().context("media id")?.to_owned();
    let blob =
        huddle_core::media::Layout::new(huddle_core::media::DEFAULT_CHUNK_SIZE, p.size)?.blob_len();

    out.say(&format!("{} concurrent downloads ...", p.downloaders));
    for n in &names {
        let (ok, _, _) = run_measured(&huddle, &args(n, &["sync"])).await?;
        if !ok {
            bail!("sync failed");
        }
    }
    // First one downloader alone (the figure to compare with one raw
    // stream), then all of them at once.
    let mut down_rss: f64 = 0.0;
    let down_cpu;
    let mut intact = true;
    let single = {
        let n = &names[0];
        let outp = dir.join(format!("{n}.single"));
        let a = args(n, &["download", &media, "-o", &outp.display().to_string()]);
        let cpu = Cpu::start(ds.pid());
        let t = Instant::now();
        let (ok, _, rss) = run_measured(&huddle, &a).await?;
        let secs = t.elapsed().as_secs_f64();
        down_cpu = cpu.stop();
        if !ok {
            bail!("download failed");
        }
        down_rss = down_rss.max(rss);
        intact &= hash_file(&outp)? == want;
        let _ = std::fs::remove_file(&outp);
        blob as f64 / secs / 1e6
    };
    let t = Instant::now();
    let mut downs = Vec::new();
    for n in &names {
        let outp = dir.join(format!("{n}.out"));
        let a = args(n, &["download", &media, "-o", &outp.display().to_string()]);
        let huddle = huddle.clone();
        downs.push(tokio::spawn(async move {
            let own = Instant::now();
            let r = run_measured(&huddle, &a).await;
            // Since all downloads started, for the aggregate rate.
            (
                r,
                own.elapsed().as_secs_f64(),
                t.elapsed().as_secs_f64(),
                outp,
            )
        }));
    }
    let mut down_rates = Vec::new();
    // Until the last download ended (not counting the checks below).
    let mut all_secs = 0f64;
    for d in downs {
        let (r, secs, since_start, outp) = d.await?;
        all_secs = all_secs.max(since_start);
        let (ok, _, rss) = r?;
        if !ok {
            bail!("download failed");
        }
        down_rss = down_rss.max(rss);
        down_rates.push(blob as f64 / secs / 1e6);
        intact &= hash_file(&outp)? == want;
        let _ = std::fs::remove_file(&outp);
    }
    let server_rss = ds.peak_rss_mb();
    let plaintext_on_server = match &ds.data_dir {
        Some(d) => contains_plaintext(d, &src)?,
        None => false,
    };
    // Beside the data dir of a DS this tool started (idle by now).
    let disk = match &ds.data_dir {
        Some(d) => {
            out.say("disk baseline ...");
            Some(disk_write(&d.with_file_name("disk-baseline.bin"), blob)?)
        }
        None => None,
    };
    drop(ds);
    let _ = std::fs::remove_file(&src);

    out.say("raw quinn bulk baseline ...");
    let peer = RawPeer::start()?;
    let cpu = Cpu::start_raw(peer.pid());
    let base_up = peer.bulk_upload(blob).await?;
    let base_up_cpu = cpu.stop_raw();
    let cpu = Cpu::start_raw(peer.pid());
    let base_down = peer.bulk_download(blob).await?;
    let base_down_cpu = cpu.stop_raw();
    let base_concurrent = peer.bulk_download_concurrent(p.downloaders, blob).await?;
    drop(peer);
    // The same with quinn's default datagram size, for comparison with
    // what an untuned raw quinn moves.
    let peer = RawPeer::start_with(QUINN_DEFAULT_UDP_PAYLOAD)?;
    let small_up = peer.bulk_upload(blob).await?;
    let small_down = peer.bulk_download(blob).await?;
    drop(peer);

    let upload = blob as f64 / up_secs / 1e6;
    let download = single;
    let slowest = down_rates.iter().cloned().fold(f64::INFINITY, f64::min);
    let aggregate = blob as f64 * p.downloaders as f64 / all_secs / 1e6;
    let mut r = Report::new("media");
    r.set("size_bytes", p.size)
        .set("ciphertext_bytes", blob)
        .set("downloaders", p.downloaders as u64)
        .set("upload_mb_s", upload)
        .set("download_mb_s", download)
        .set("concurrent_slowest_mb_s", slowest)
        .set("concurrent_aggregate_mb_s", aggregate)
        .set("baseline_upload_mb_s", base_up)
        .set("baseline_download_mb_s", base_down)
        .set("baseline_concurrent_aggregate_mb_s", base_concurrent)
        .set("baseline_mb_s", base_up.min(base_down))
        .set("upload_ratio", upload / base_up)
        .set("download_ratio", download / base_down)
        .set("concurrent_ratio", aggregate / base_concurrent)
        .set("baseline_1452_upload_mb_s", small_up)
        .set("baseline_1452_download_mb_s", small_down)
        .set("upload_ratio_1452", upload / small_up)
        .set("download_ratio_1452", download / small_down)
        .set_opt("baseline_disk_write_mb_s", disk)
        .set_opt("upload_ratio_to_limit", disk.map(|d| upload / base_up.min(d)))
        .set_opt(
            "download_ratio_to_limit",
            disk.map(|d| download / base_down.min(d)),
        )
        .set("upload_cpu_s_client", up_cpu.0)
        .set("upload_cpu_s_server", up_cpu.1)
        .set("baseline_upload_cpu_s_sender", base_up_cpu.0)
        .set("baseline_upload_cpu_s_receiver", base_up_cpu.1)
        .set("download_cpu_s_client", down_cpu.0)
        .set("download_cpu_s_server", down_cpu.1)
        .set("baseline_download_cpu_s_receiver", base_down_cpu.0)
        .set("baseline_download_cpu_s_sender", base_down_cpu.1)
        .set(
            "upload_cpu_ratio",
            (base_up_cpu.0 + base_up_cpu.1) / (up_cpu.0 + up_cpu.1).max(1e-9),
        )
        .set(
            "download_cpu_ratio",
            (base_down_cpu.0 + base_down_cpu.1) / (down_cpu.0 + down_cpu.1).max(1e-9),
        )
        .set_opt("server_peak_rss_mb", server_rss)
        .set("client_peak_rss_mb", up_rss.max(down_rss))
        .set("uploader_peak_rss_mb", up_rss)
        .set("downloader_peak_rss_mb", down_rss)
        .set("byte_identical", intact)
        .set("plaintext_in_server_data_dir", plaintext_on_server)
        .note("upload and download run as separate `huddle` processes; times are whole commands (connect, authenticate, encrypt or verify, transfer)")
        .note("*_cpu_s_*: CPU seconds (user + system, all threads) each side used for the transfer, from /proc; *_cpu_ratio: the raw transfer's CPU over Huddle's. Both sides share the machine's cores, so when they are busy the throughput ratio cannot exceed the CPU ratio")
        .note(format!("baseline_*: raw quinn with the DS's transport settings, datagrams up to {} bytes where the path allows (loopback does); baseline_1452_*: the same with quinn's default {QUINN_DEFAULT_UDP_PAYLOAD}-byte datagrams", huddle_core::proto::MAX_UDP_PAYLOAD))
        .note("baseline_disk_write_mb_s: writing as many bytes to a new file on the data dir's file system and flushing them; an upload is durable on the DS, and a download on the client, before either completes, so neither can be faster than the slower of raw quinn and this: *_ratio_to_limit")
        .note("download_mb_s: one downloader alone, against one raw quinn stream between two processes; concurrent_*: all downloaders at once, against as many raw streams at once");
    out.emit(&r);
    Ok(())
}

/// CPU seconds used during one transfer, read from /proc.
struct Cpu {
    server: Option<u32>,
    at: (f64, f64),
}

impl Cpu {
    /// Before a `huddle` child runs against the DS `server`: the child's
    /// share is counted when it has been waited for.
    fn start(server: Option<u32>) -> Self {
        let s = server.and_then(cpu_seconds).unwrap_or(0.0);
        Self {
            server,
            at: (children_cpu_seconds().unwrap_or(0.0), s),
        }
    }

    /// (client, server) seconds since `start`.
    fn stop(&self) -> (f64, f64) {
        let s = self.server.and_then(cpu_seconds).unwrap_or(0.0);
        (
            children_cpu_seconds().unwrap_or(0.0) - self.at.0,
            s - self.at.1,
        )
    }

    /// Before a raw transfer between this process and the raw peer.
    fn start_raw(peer: u32) -> Self {
        Self {
            server: Some(peer),
            at: (
                own_cpu_seconds().unwrap_or(0.0),
                cpu_seconds(peer).unwrap_or(0.0),
            ),
        }
    }

    /// (this process, peer) seconds since `start_raw`.
    fn stop_raw(&self) -> (f64, f64) {
        let s = self.server.and_then(cpu_seconds).unwrap_or(0.0);
        (own_cpu_seconds().unwrap_or(0.0) - self.at.0, s - self.at.1)
    }
}

/// Whether any file under `dir` contains a 64-byte sample of `src`'s
/// plaintext (taken from its middle).
fn contains_plaintext(dir: &Path, src: &Path) -> anyhow::Result<bool> {
    use std::io::{Read as _, Seek as _};
    let len = std::fs::metadata(src)?.len();
    let mut f = std::fs::File::open(src)?;
    f.seek(std::io::SeekFrom::Start(len / 2))?;
    let mut needle = [0u8; 64];
    if f.read_exact(&mut needle).is_err() {
        return Ok(false);
    }
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let mut file = std::fs::File::open(&p)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut carry: Vec<u8> = Vec::new();
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                carry.extend_from_slice(&buf[..n]);
                if carry.windows(64).any(|w| w == needle) {
                    return Ok(true);
                }
                let keep = carry.len().saturating_sub(63);
                carry.drain(..keep);
            }
        }
    }
    Ok(false)
}
