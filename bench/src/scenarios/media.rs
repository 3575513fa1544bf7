//! `media`: one member uploads a generated file, R members download it
//! concurrently, all as separate `huddle` processes. MB/s each way against
//! raw quinn bulk throughput, and peak RSS of the DS and of every client.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::Args;
use huddle_client::{Client, Home};

use super::media_objects::{store_baseline, through_objects};
use crate::baseline::{RawPeer, QUINN_DEFAULT_UDP_PAYLOAD};
use crate::cluster::ClusterArgs;
use crate::ds::{children_cpu_split, cpu_split, run_measured, sibling, Ds};
use crate::light::run_name;
use crate::report::{Output, Report};
use crate::Target;

/// Parameters.
#[derive(Debug, Args)]
pub struct Params {
    /// File size: bytes, or with a unit (512MiB, 1GiB, 2GiB); generated on
    /// disk, never held in memory.
    #[arg(long, default_value_t = 256 << 20, value_parser = crate::units::parse_bytes)]
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
    /// With --blobs: after the run on the data-dir backend, one upload and
    /// one download again through DS nodes that keep blobs on that object
    /// store (with --nodes, --store and --bus: uploaded through the first
    /// node, downloaded through the second).
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// The object store's process, to count its CPU.
    #[arg(long, value_name = "PID", requires = "blobs")]
    pub blobs_pid: Option<u32>,
}

/// The buffered disk baseline makes its file durable this often (the
/// blob-path one paces its syncs as the DS and the client do,
/// [`huddle_io::SyncPace`]).
const SYNC_EVERY: u64 = huddle_io::blob::SYNC_EVERY;

/// A disk baseline: MB/s and this process's CPU seconds (user, system).
#[derive(Debug, Clone, Copy)]
struct DiskRun {
    mb_s: f64,
    cpu: (f64, f64),
}

/// Writes `size` bytes to a new file at `path` the way the DS writes an
/// upload and the client a download: through [`huddle_io::BlobFile`]
/// (direct I/O unless the file system refuses it), 1 MiB at a time, made
/// durable as they do ([`huddle_io::SyncPace`]) and at the end. Removes
/// the file.
fn disk_write_blob(path: &Path, size: u64) -> anyhow::Result<DiskRun> {
    let buf = vec![0x5au8; 1 << 20];
    let cpu = own_cpu_split();
    let t = Instant::now();
    let mut f = huddle_io::BlobFile::open_at(path, 0, huddle_io::Mode::from_env())?;
    let mut pace = huddle_io::SyncPace::new(0);
    while f.len() < size {
        let n = (size - f.len()).min(buf.len() as u64) as usize;
        f.write(&buf[..n])?;
        pace.sync_if_due(&mut f)?;
    }
    f.finish()?;
    let run = finished(size, t, cpu);
    std::fs::remove_file(path)?;
    Ok(run)
}

/// What `n` downloads at once on this one machine ask of the disk: the DS
/// reads the stored blob `reads` times (through [`huddle_io::BlobReader`],
/// 1 MiB at a time, two reads in flight each; once for each download, or
/// once for all of them where it shares their reads) while each client
/// writes as many bytes to a new file of its own through the blob path,
/// all on the same disk at once. Aggregate MB/s of the downloads (as fast
/// as the slowest read or write); removes the files it wrote.
fn disk_reads_while_writing(
    blob: &Path,
    dir: &Path,
    size: u64,
    reads: usize,
    n: usize,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    // Each pass's reads: 1 MiB each, two in flight, as the DS keeps them
    // (each reader thread takes every other MiB).
    const IN_FLIGHT: u64 = 2;
    let readers: Vec<Vec<_>> = (0..reads)
        .map(|_| {
            (0..IN_FLIGHT)
                .map(|first| {
                    let src = blob.to_owned();
                    std::thread::spawn(move || -> std::io::Result<u64> {
                        let mut r = huddle_io::BlobReader::open(&src, huddle_io::Mode::from_env())?;
                        let (mut at, mut read) = (first << 20, 0u64);
                        loop {
                            let b = r.read_at(at, 1 << 20)?;
                            if b.is_empty() {
                                return Ok(read);
                            }
                            read += b.len() as u64;
                            at += IN_FLIGHT << 20;
                        }
                    })
                })
                .collect()
        })
        .collect();
    let writers: Vec<_> = (0..n)
        .map(|i| {
            let path = dir.join(format!("disk-baseline-{i}.bin"));
            std::thread::spawn(move || disk_write_blob(&path, size).map(|_| size))
        })
        .collect();
    let mut least = size;
    for r in readers {
        let mut read = 0;
        for part in r {
            read += part
                .join()
                .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
        }
        least = least.min(read);
    }
    for w in writers {
        let written = w
            .join()
            .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
        least = least.min(written);
    }
    Ok((least * n as u64) as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// The same bytes through the page cache (plain `write`, `sync_data` every
/// 16 MiB and at the end): what the blob path avoids.
fn disk_write_buffered(path: &Path, size: u64) -> anyhow::Result<DiskRun> {
    let buf = vec![0x5au8; 1 << 20];
    let cpu = own_cpu_split();
    let t = Instant::now();
    let mut f = std::fs::File::create(path)?;
    let mut written = 0u64;
    while written < size {
        let n = (size - written).min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        written += n as u64;
        if written.is_multiple_of(SYNC_EVERY) {
            f.sync_data()?;
        }
    }
    f.sync_data()?;
    let run = finished(size, t, cpu);
    drop(f);
    std::fs::remove_file(path)?;
    Ok(run)
}

fn own_cpu_split() -> (f64, f64) {
    cpu_split(std::process::id()).unwrap_or((0.0, 0.0))
}

fn finished(size: u64, t: Instant, cpu: (f64, f64)) -> DiskRun {
    let secs = t.elapsed().as_secs_f64();
    let now = own_cpu_split();
    DiskRun {
        mb_s: size as f64 / secs / 1e6,
        cpu: (now.0 - cpu.0, now.1 - cpu.1),
    }
}

/// CPU seconds per GiB of reading the file to send the way the sender
/// does: 256 KiB at a time into a cache-line aligned buffer, through the
/// page cache. Raw quinn sends from memory; an upload cannot.
fn source_read_cpu(path: &Path, size: u64) -> anyhow::Result<f64> {
    use std::io::Read as _;
    let mut raw = vec![0u8; (256 << 10) + 64];
    let at = raw.as_ptr().align_offset(64);
    let buf = &mut raw[at..at + (256 << 10)];
    let mut f = std::fs::File::open(path)?;
    let cpu = own_cpu_split();
    let mut got = 0u64;
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let now = own_cpu_split();
    anyhow::ensure!(got == size, "read {got} of the source's {size} bytes");
    Ok(total((now.0 - cpu.0, now.1 - cpu.1)) * (1u64 << 30) as f64 / size.max(1) as f64)
}

/// CPU seconds per GiB of one thread sealing (AES-256-GCM) and of one
/// hashing (BLAKE3) 256 KiB chunks, over 256 MiB in memory: the crypto
/// every media byte costs, whatever the I/O.
fn crypto_floor() -> anyhow::Result<(f64, f64)> {
    use huddle_core::media::{Header, ItemKey, Sealer, DEFAULT_CHUNK_SIZE};
    const TOTAL: u64 = 256 << 20;
    let header = Header::new(
        huddle_core::MediaId([7; 16]),
        huddle_core::GroupId([9; 16]),
        [3; huddle_core::media::SALT_LEN],
        DEFAULT_CHUNK_SIZE,
        TOTAL,
    )?;
    let sealer = Sealer::new(&ItemKey::from_bytes([5; 32]), header);
    let layout = header.layout();
    let mut buf = Vec::with_capacity(DEFAULT_CHUNK_SIZE as usize + 16);
    let t = Instant::now();
    for i in 0..layout.chunk_count() {
        buf.clear();
        buf.resize(layout.plaintext_len(i)?, 0x33);
        sealer.seal_chunk_in_place(i, i == layout.last_index(), &mut buf)?;
    }
    let seal = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut h = blake3::Hasher::new();
    for _ in 0..layout.chunk_count() {
        h.update(&buf);
    }
    std::hint::black_box(h.finalize());
    let hash = t.elapsed().as_secs_f64();
    let per_gib = (1u64 << 30) as f64 / TOTAL as f64;
    Ok((seal * per_gib, hash * per_gib))
}

/// `Cached` in /proc/meminfo, in MB.
fn page_cache_mb() -> Option<f64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = m.lines().find(|l| l.starts_with("Cached:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1e3)
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

pub(super) fn hash_file(path: &Path) -> anyhow::Result<[u8; 32]> {
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
    let cache_before = page_cache_mb();
    let cpu = Cpu::start(ds.pid());
    let t = Instant::now();
    let (ok, stdout, up_rss) = run_measured(
        &huddle,
        &args("up", &["send-file", &g, &src.display().to_string()]),
    )
    .await?;
    let up_secs = t.elapsed().as_secs_f64();
    let up_cpu = cpu.stop();
    let cache_after_upload = page_cache_mb();
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
    let counted = ds.counters();
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
    // Of the pieces the concurrent downloads sent, the share read once for
    // several of them.
    let shared = counted.zip(ds.counters()).map(|(a, b)| {
        let (read, shared) = (
            b.get("blob_reads") - a.get("blob_reads"),
            b.get("blob_reads_shared") - a.get("blob_reads_shared"),
        );
        shared as f64 / (read + shared).max(1) as f64
    });
    let cache_after_downloads = page_cache_mb();
    let server_rss = ds.peak_rss_mb();
    let plaintext_on_server = match &ds.data_dir {
        Some(d) => contains_plaintext(d, &src)?,
        None => false,
    };
    // Beside the data dir of a DS this tool started (idle by now).
    let downloaders = p.downloaders.max(1);
    let disk = match &ds.data_dir {
        Some(d) => {
            out.say("disk baselines ...");
            let file = d.with_file_name("disk-baseline.bin");
            let here = d.parent().context("the data dir's parent")?;
            let stored = std::fs::read_dir(d.join("blobs"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "blob"))
                .context("the stored blob")?;
            Some((
                disk_write_blob(&file, blob)?,
                disk_write_buffered(&file, blob)?,
                disk_reads_while_writing(&stored, here, blob, 1, 1)?,
                disk_reads_while_writing(&stored, here, blob, downloaders, downloaders)?,
                disk_reads_while_writing(&stored, here, blob, 1, downloaders)?,
            ))
        }
        None => None,
    };
    drop(ds);
    let objects = match &p.cluster.blobs {
        Some(_) => {
            out.say("the same through the object store ...");
            let run = through_objects(&p, &huddle, &dir, &src, want, blob).await?;
            out.say("the object store alone on the same path ...");
            let url = p.cluster.blobs.as_deref().expect("given");
            let alone = store_baseline(url, blob, p.blobs_pid).await?;
            Some((run, alone))
        }
        None => {
            anyhow::ensure!(
                p.cluster.nodes == 1,
                "--nodes needs --blobs: the nodes must share the blobs"
            );
            None
        }
    };
    // As the sender reads it: through the page cache, where it still is.
    let source_read = source_read_cpu(&src, p.size)?;
    let _ = std::fs::remove_file(&src);

    out.say("crypto floor ...");
    let (aead_per_gib, blake3_per_gib) = crypto_floor()?;
    out.say("raw quinn bulk baseline ...");
    let peer = RawPeer::start()?;
    let cpu = Cpu::start_raw(peer.pid());
    let base_up = peer.bulk_upload(blob).await?;
    let base_up_cpu = cpu.stop();
    let cpu = Cpu::start_raw(peer.pid());
    let base_down = peer.bulk_download(blob).await?;
    let base_down_cpu = cpu.stop();
    let base_concurrent = peer.bulk_download_concurrent(p.downloaders, blob).await?;
    drop(peer);
    // The same with quinn's default datagram size, for comparison with
    // what an untuned raw quinn moves.
    let peer = RawPeer::start_with(QUINN_DEFAULT_UDP_PAYLOAD)?;
    let small_up = peer.bulk_upload(blob).await?;
    let small_down = peer.bulk_download(blob).await?;
    drop(peer);

    let upload = blob as f64 / up_secs / 1e6;
    let per_gib = (1u64 << 30) as f64 / blob as f64;
    let (up_all, down_all) = (
        total(up_cpu.0) + total(up_cpu.1),
        total(down_cpu.0) + total(down_cpu.1),
    );
    let (base_up_all, base_down_all) = (
        total(base_up_cpu.0) + total(base_up_cpu.1),
        total(base_down_cpu.0) + total(base_down_cpu.1),
    );
    let download = single;
    let slowest = down_rates.iter().cloned().fold(f64::INFINITY, f64::min);
    let aggregate = blob as f64 * p.downloaders as f64 / all_secs / 1e6;
    let mut r = Report::new("media");
    let floor_up = disk.map(|d| {
        base_up_all * per_gib
            + source_read
            + aead_per_gib
            + blake3_per_gib
            + total(d.0.cpu) * per_gib
    });
    let floor_down = disk.map(|d| {
        base_down_all * per_gib + aead_per_gib + blake3_per_gib + total(d.0.cpu) * per_gib
    });
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
        .set_opt("baseline_disk_write_mb_s", disk.map(|d| d.0.mb_s))
        .set_opt("baseline_disk_write_cpu_s_per_gib", disk.map(|d| total(d.0.cpu) * per_gib))
        .set_opt("baseline_disk_buffered_mb_s", disk.map(|d| d.1.mb_s))
        .set_opt("baseline_disk_buffered_cpu_s_per_gib", disk.map(|d| total(d.1.cpu) * per_gib))
        .set_opt("upload_ratio_to_limit", disk.map(|d| upload / base_up.min(d.0.mb_s)))
        .set_opt("baseline_disk_read_while_writing_mb_s", disk.map(|d| d.2))
        .set_opt(
            "download_ratio_to_limit",
            disk.map(|d| download / base_down.min(d.2)),
        )
        .set_opt(
            "download_ratio_disk_allows",
            disk.map(|d| d.2.min(base_down) / base_down),
        )
        .set_opt("baseline_disk_concurrent_reads_while_writing_mb_s", disk.map(|d| d.3))
        .set_opt("baseline_disk_shared_read_while_writing_mb_s", disk.map(|d| d.4))
        .set_opt("concurrent_pieces_shared", shared)
        .set_opt(
            "concurrent_ratio_to_limit",
            disk.map(|d| aggregate / base_concurrent.min(d.4)),
        )
        .set_opt(
            "concurrent_ratio_disk_allows",
            disk.map(|d| d.4.min(base_concurrent) / base_concurrent),
        )
        .set("baseline_upload_cpu_s_sender", total(base_up_cpu.0))
        .set("baseline_upload_cpu_s_receiver", total(base_up_cpu.1))
        .set("baseline_download_cpu_s_receiver", total(base_down_cpu.0))
        .set("baseline_download_cpu_s_sender", total(base_down_cpu.1))
        .set("upload_cpu_s_per_gib", up_all * per_gib)
        .set("download_cpu_s_per_gib", down_all * per_gib)
        .set("baseline_upload_cpu_s_per_gib", base_up_all * per_gib)
        .set("baseline_download_cpu_s_per_gib", base_down_all * per_gib)
        .set("aead_cpu_s_per_gib", aead_per_gib)
        .set("blake3_cpu_s_per_gib", blake3_per_gib)
        .set("source_read_cpu_s_per_gib", source_read)
        .set_opt("floor_upload_cpu_s_per_gib", floor_up)
        .set_opt("floor_download_cpu_s_per_gib", floor_down)
        .set_opt("upload_ratio_at_floor", floor_up.map(|f| base_up_all * per_gib / f))
        .set_opt("download_ratio_at_floor", floor_down.map(|f| base_down_all * per_gib / f))
        .set(
            "upload_cpu_ratio",
            base_up_all / up_all.max(1e-9),
        )
        .set(
            "download_cpu_ratio",
            base_down_all / down_all.max(1e-9),
        )
        .set_opt("page_cache_growth_upload_mb", cache_before.zip(cache_after_upload).map(|(a, b)| b - a))
        .set_opt("page_cache_growth_downloads_mb", cache_after_upload.zip(cache_after_downloads).map(|(a, b)| b - a))
        .set_opt("server_peak_rss_mb", server_rss)
        .set("client_peak_rss_mb", up_rss.max(down_rss))
        .set("uploader_peak_rss_mb", up_rss)
        .set("downloader_peak_rss_mb", down_rss)
        .set("byte_identical", intact)
        .set("plaintext_in_server_data_dir", plaintext_on_server)
        .note("upload and download run as separate `huddle` processes; times are whole commands (connect, authenticate, encrypt or verify, transfer)")
        .note("*_cpu_s_*: CPU seconds (user + system, all threads) each side used for the transfer, from /proc; *_cpu_ratio: the raw transfer's CPU over Huddle's. Both sides share the machine's cores, so when they are busy the throughput ratio cannot exceed the CPU ratio")
        .note(format!("baseline_*: raw quinn with the DS's transport settings, datagrams up to {} bytes where the path allows (loopback does); baseline_1452_*: the same with quinn's default {QUINN_DEFAULT_UDP_PAYLOAD}-byte datagrams", huddle_core::proto::MAX_UDP_PAYLOAD))
        .note("baseline_disk_write_*: writing as many bytes to a new file on the data dir's file system through the blob file module the DS and the client use (direct I/O, synced at least 16 MiB apart and at most once a second, and at the end); an upload is durable on the DS, and a download on the client, before either completes, so neither can be faster than the slower of raw quinn and this: *_ratio_to_limit. baseline_disk_buffered_*: the same through the page cache")
        .note("baseline_disk_read_while_writing_mb_s: the stored blob read through the DS's blob reader (1 MiB reads, two in flight) while as many bytes are written through the blob path, at once, on the same disk: what a download run on one machine asks of it (a real client writes on its own disk); download_ratio_to_limit is against the slower of this and raw quinn; baseline_disk_concurrent_reads_while_writing_mb_s: the same for all downloaders at once (the blob read once for each, each writing its own file), aggregate; baseline_disk_shared_read_while_writing_mb_s: the blob read once while every downloader's file is written, what the DS asks of the disk when it shares the downloads' reads (concurrent_pieces_shared: the share of the pieces the concurrent downloads took from a span another one read, from the DS's counters), and concurrent_ratio_to_limit against the slower of this and the raw concurrent streams; download_ratio_disk_allows and concurrent_ratio_disk_allows: the most download_ratio and concurrent_ratio could be on this machine if Huddle cost no CPU at all, the disk's figure over raw quinn's (capped at 1)")
        .note("*_cpu_s_per_gib: CPU seconds of every process of the transfer together, per GiB of ciphertext; floor_*: the raw quinn transfer's plus one AES-GCM pass, one BLAKE3 pass (the sender's on upload: the DS hashes only a resumed upload; the receiver's on download), the blob-path disk write (with its copy into the aligned buffer) and, on upload, reading the file to send (source_read_cpu_s_per_gib), each measured in this run")
        .note("*_ratio_at_floor: the raw transfer's CPU per GiB over the floor's: the throughput ratio a transfer that costs no more than the floor would reach where both are bound by the two processes' CPU on the machine's cores (an estimate: it assumes both keep the cores equally busy)")
        .note("page_cache_growth_*: change of Cached in /proc/meminfo over the upload and over the downloads (the whole machine; the file being sent is read through the cache, and was written just before)")
        .note("download_mb_s: one downloader alone, against one raw quinn stream between two processes; concurrent_*: all downloaders at once, against as many raw streams at once");
    if let Some((o, (store_up, store_down))) = &objects {
        let per_gib = |cpu: f64| cpu * (1u64 << 30) as f64 / blob as f64;
        r.set("baseline_objects_upload_mb_s", store_up.0)
            .set("baseline_objects_download_mb_s", store_down.0)
            .set_opt("baseline_objects_upload_cpu_s_per_gib_store", store_up.1.map(per_gib))
            .set_opt("baseline_objects_download_cpu_s_per_gib_store", store_down.1.map(per_gib))
            .set("objects_upload_ratio", o.upload_mb_s / store_up.0)
            .set("objects_download_ratio", o.download_mb_s / store_down.0)
            .note("baseline_objects_*: the object store alone, from this process, on the DS's path: the same bytes as 8 MiB parts with one in flight, then one ranged GET; objects_*_ratio: Huddle through the store against that")
            .set("objects_nodes", o.nodes as u64)
            .set("objects_upload_mb_s", o.upload_mb_s)
            .set("objects_download_mb_s", o.download_mb_s)
            .set("objects_upload_ratio_to_data_dir", o.upload_mb_s / upload)
            .set("objects_download_ratio_to_data_dir", o.download_mb_s / download)
            .set("objects_upload_cpu_s_per_gib_server", per_gib(total(o.up.1)))
            .set("objects_download_cpu_s_per_gib_server", per_gib(total(o.down.1)))
            .set("upload_cpu_s_per_gib_server", per_gib(total(up_cpu.1)))
            .set("download_cpu_s_per_gib_server", per_gib(total(down_cpu.1)))
            .set("objects_upload_cpu_s_per_gib_client", per_gib(total(o.up.0)))
            .set("objects_download_cpu_s_per_gib_client", per_gib(total(o.down.0)))
            .set_opt("objects_upload_cpu_s_per_gib_store", o.store_up.map(per_gib))
            .set_opt("objects_download_cpu_s_per_gib_store", o.store_down.map(per_gib))
            .set_opt("objects_server_peak_rss_mb", o.server_rss)
            .set("objects_byte_identical", o.intact)
            .note(format!("objects_*: one upload and one download through DS nodes that keep blobs on the object store given (--blobs); {}; uploaded through the first node, downloaded through the {}; *_server: CPU of all nodes together, *_store: of the object store's process (--blobs-pid)", o.describe, if o.nodes > 1 { "second" } else { "same" }));
    }
    // Each side's user and system CPU, and their sum.
    for (dir, (client, server)) in [("upload", up_cpu), ("download", down_cpu)] {
        for (side, (user, sys)) in [("client", client), ("server", server)] {
            r.set(&format!("{dir}_cpu_s_{side}"), user + sys)
                .set(&format!("{dir}_cpu_user_s_{side}"), user)
                .set(&format!("{dir}_cpu_sys_s_{side}"), sys);
        }
    }
    out.emit(&r);
    Ok(())
}

/// (user, system) CPU seconds.
pub(super) type Split = (f64, f64);

pub(super) fn total(x: Split) -> f64 {
    x.0 + x.1
}

pub(super) fn minus(a: Split, b: Split) -> Split {
    (a.0 - b.0, a.1 - b.1)
}

/// CPU seconds used during one transfer by each side, read from /proc.
struct Cpu {
    server: Option<u32>,
    raw: bool,
    at: (Split, Split),
}

impl Cpu {
    /// Before a `huddle` child runs against the DS `server`: the child's
    /// share is counted when it has been waited for.
    fn start(server: Option<u32>) -> Self {
        let s = server.and_then(cpu_split).unwrap_or_default();
        Self {
            server,
            raw: false,
            at: (children_cpu_split().unwrap_or_default(), s),
        }
    }

    /// Before a raw transfer between this process and the raw peer.
    fn start_raw(peer: u32) -> Self {
        Self {
            server: Some(peer),
            raw: true,
            at: (
                cpu_split(std::process::id()).unwrap_or_default(),
                cpu_split(peer).unwrap_or_default(),
            ),
        }
    }

    /// (client or this process, server or peer) since the start.
    fn stop(&self) -> (Split, Split) {
        let s = self.server.and_then(cpu_split).unwrap_or_default();
        let c = if self.raw {
            cpu_split(std::process::id())
        } else {
            children_cpu_split()
        }
        .unwrap_or_default();
        (minus(c, self.at.0), minus(s, self.at.1))
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
