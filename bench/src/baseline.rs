//! Raw quinn on this machine, with the delivery service's TLS and transport
//! settings: the physical limit the other scenarios are compared with.
//!
//! Sockets get the same large buffers as the DS and client
//! ([`huddle_client::net::udp_socket`]).
//!
//! The peer runs in a second process ([`peer`]), like the delivery
//! service does.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;

use crate::light::now_ns;

mod peer;

pub use peer::serve;

const ALPN: &[u8] = b"huddle-baseline";

/// quinn's default MTU discovery bound: the largest datagram an untuned
/// quinn connection sends (its endpoints accept up to 1,472 bytes, but
/// never probe past this).
pub const QUINN_DEFAULT_UDP_PAYLOAD: u16 = 1_452;

/// The same transport windows as the delivery service and client; datagrams
/// up to `max_payload` bytes (the DS's [`huddle_core::proto::MAX_UDP_PAYLOAD`]
/// unless a scenario asks for quinn's default too).
fn transport(max_payload: u16) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("valid")));
    t.max_concurrent_bidi_streams(128u32.into());
    t.stream_receive_window((8u32 * 1024 * 1024).into());
    t.receive_window((16u32 * 1024 * 1024).into());
    t.send_window(16 * 1024 * 1024);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(max_payload);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// Accepts datagrams up to `max_payload` bytes.
fn endpoint_config(max_payload: u16) -> anyhow::Result<quinn::EndpointConfig> {
    let mut e = quinn::EndpointConfig::default();
    e.max_udp_payload_size(max_payload)?;
    Ok(e)
}

/// A running raw peer process and a client endpoint for it.
#[derive(Debug)]
pub struct RawPeer {
    max_payload: u16,
    child: Child,
    addr: SocketAddr,
    client: quinn::ClientConfig,
    _dir: tempfile::TempDir,
}

impl RawPeer {
    /// The peer process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RawPeer {
    /// Starts the peer process with the delivery service's datagram size.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(huddle_core::proto::MAX_UDP_PAYLOAD)
    }

    /// Starts the peer process; both ends accept and probe for datagrams up
    /// to `max_payload` bytes.
    pub fn start_with(max_payload: u16) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let cert_path = dir.path().join("raw.der");
        let mut child = Command::new(std::env::current_exe()?)
            .env_remove(crate::MALLOC_THRESHOLD_ENV)
            .arg("raw-server")
            .arg("--cert-out")
            .arg(&cert_path)
            .arg("--max-udp-payload")
            .arg(max_payload.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the raw peer")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("peer stdout")?).read_line(&mut line)?;
        let addr: SocketAddr = line
            .split("listening on ")
            .nth(1)
            .context("peer address")?
            .trim()
            .parse()?;
        let der = std::fs::read(&cert_path)?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(der))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
        client.transport_config(Arc::new(transport(max_payload)));
        Ok(Self {
            max_payload,
            child,
            addr,
            client,
            _dir: dir,
        })
    }

    /// A new connection from a new client endpoint.
    pub async fn connect(&self) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
        let mut ep = quinn::Endpoint::new(
            endpoint_config(self.max_payload)?,
            None,
            huddle_client::net::udp_socket("127.0.0.1:0".parse()?)?,
            Arc::new(quinn::TokioRuntime),
        )?;
        ep.set_default_client_config(self.client.clone());
        let conn = ep.connect(self.addr, "localhost")?.await?;
        Ok((ep, conn))
    }

    /// Sends `bytes` on one stream; returns MB/s (10^6 bytes per second).
    pub async fn bulk_upload(&self, bytes: u64) -> anyhow::Result<f64> {
        let (_ep, conn) = self.connect().await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let buf = bytes::Bytes::from(vec![0xa5; 1 << 20]);
        let start = Instant::now();
        send.write_all(b"U").await?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            send.write_chunk(buf.slice(..n)).await?;
            left -= n as u64;
        }
        send.finish()?;
        let mut got = [0u8; 8];
        recv.read_exact(&mut got).await?;
        let secs = start.elapsed().as_secs_f64();
        if u64::from_be_bytes(got) != bytes {
            bail!(
                "raw peer received {} of {bytes} bytes",
                u64::from_be_bytes(got)
            );
        }
        Ok(bytes as f64 / secs / 1e6)
    }

    /// Receives `bytes` on one stream; returns MB/s.
    pub async fn bulk_download(&self, bytes: u64) -> anyhow::Result<f64> {
        let (_ep, conn) = self.connect().await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let start = Instant::now();
        let mut req = vec![b'D'];
        req.extend_from_slice(&bytes.to_be_bytes());
        send.write_all(&req).await?;
        send.finish()?;
        let mut n = 0u64;
        while let Some(c) = recv.read_chunk(1 << 20, true).await? {
            n += c.bytes.len() as u64;
        }
        if n != bytes {
            bail!("received {n} of {bytes} bytes");
        }
        Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e6)
    }

    /// `n` connections each receive `bytes` at once; returns the aggregate
    /// MB/s.
    pub async fn bulk_download_concurrent(&self, n: usize, bytes: u64) -> anyhow::Result<f64> {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (ep, conn) = self.connect().await?;
            tasks.push(tokio::spawn(async move {
                let _ep = ep;
                let (mut send, mut recv) = conn.open_bi().await?;
                let mut req = vec![b'D'];
                req.extend_from_slice(&bytes.to_be_bytes());
                send.write_all(&req).await?;
                send.finish()?;
                let mut got = 0u64;
                while let Some(c) = recv.read_chunk(1 << 20, true).await? {
                    got += c.bytes.len() as u64;
                }
                anyhow::Ok(got)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        Ok(total as f64 / start.elapsed().as_secs_f64() / 1e6)
    }

    /// Opens `conns` connections and has the peer push `frame`-byte frames on
    /// each for `duration`; returns frames per second received in total.
    pub async fn push(
        &self,
        conns: usize,
        frame: usize,
        duration: Duration,
    ) -> anyhow::Result<f64> {
        // A fixed count per connection, sized for roughly `duration` at
        // 400,000 frames or 400 MB a second across all connections,
        // whichever is fewer frames (large frames, such as a commit in a
        // big group, are bound by bytes), so the peer never queues more.
        let secs = duration.as_secs_f64();
        let frames = (400_000.0 * secs).min(400e6 * secs / frame.max(1) as f64);
        let per_conn = (frames as u64 / conns.max(1) as u64).max(4);
        let mut links = Vec::with_capacity(conns);
        for _ in 0..conns {
            links.push(self.connect().await?);
        }
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (_ep, conn) in &links {
            let conn = conn.clone();
            tasks.push(tokio::spawn(async move {
                let (mut send, mut recv) = conn.open_bi().await?;
                let mut req = vec![b'P'];
                req.extend_from_slice(&(frame as u32).to_be_bytes());
                req.extend_from_slice(&per_conn.to_be_bytes());
                send.write_all(&req).await?;
                send.finish()?;
                let mut n = 0u64;
                while let Some(c) = recv.read_chunk(1 << 20, true).await? {
                    n += c.bytes.len() as u64;
                }
                anyhow::Ok(n)
            }));
        }
        let mut total = 0u64;
        for t in tasks {
            total += t.await??;
        }
        let secs = start.elapsed().as_secs_f64();
        Ok((total / frame as u64) as f64 / secs)
    }

    /// Opens `shape.conns` subscriber connections and `shape.senders`
    /// sender connections in each of `shape.groups` groups; the senders
    /// together send `rate` frames a second of `frame` bytes for
    /// `duration`, each stamped with [`now_ns`], and the peer relays every
    /// one to every subscriber of its group. Returns the latency from stamp
    /// to receipt over all deliveries.
    pub async fn relay(
        &self,
        shape: RelayShape,
        frame: usize,
        rate: f64,
        duration: Duration,
    ) -> anyhow::Result<RelayResult> {
        let RelayShape {
            groups,
            conns,
            senders,
            streams,
            durable,
        } = shape;
        let op = if durable { b'W' } else { b'Q' };
        let groups = groups.max(1);
        let frame = frame.max(8);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let delivered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut links = Vec::with_capacity(conns * groups);
        let mut receivers = Vec::with_capacity(conns * groups);
        for i in 0..conns * groups {
            let (ep, conn) = self.connect().await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            let mut req = vec![b'S'];
            req.extend_from_slice(&((i % groups) as u32).to_be_bytes());
            send.write_all(&req).await?;
            let mut ok = [0u8; 1];
            recv.read_exact(&mut ok).await?;
            let mut stop = stop_rx.clone();
            let delivered = delivered.clone();
            receivers.push(tokio::spawn(async move {
                let _send = send;
                let mut h = crate::light::latency_histogram();
                // Whatever has arrived is read at once and split into
                // frames here, as the fan-out's light members do.
                let mut pending = Vec::new();
                loop {
                    let chunk = tokio::select! {
                        r = recv.read_chunk(usize::MAX, true) => match r {
                            Ok(Some(c)) => c.bytes,
                            _ => break,
                        },
                        _ = stop.changed() => break,
                    };
                    pending.extend_from_slice(&chunk);
                    let now = now_ns();
                    let whole = pending.len() / frame * frame;
                    for f in pending[..whole].chunks_exact(frame) {
                        let sent = u64::from_be_bytes(f[..8].try_into().expect("8 bytes"));
                        let _ = h.record((now.saturating_sub(sent) / 1000).max(1));
                    }
                    delivered
                        .fetch_add((whole / frame) as u64, std::sync::atomic::Ordering::Relaxed);
                    pending.drain(..whole);
                }
                h
            }));
            links.push((ep, conn));
        }
        let senders = senders.max(1) * groups;
        let interval = Duration::from_secs_f64(senders as f64 / rate.max(0.001));
        let datagrams = |links: &[(quinn::Endpoint, quinn::Connection)]| -> u64 {
            links.iter().map(|(_, c)| c.stats().udp_rx.datagrams).sum()
        };
        let start = (
            Instant::now(),
            crate::ds::cpu_seconds(self.pid()),
            datagrams(&links),
        );
        let mut sender_tasks = Vec::new();
        for i in 0..senders {
            let (ep, conn) = self.connect().await?;
            let group = ((i % groups) as u32).to_be_bytes();
            sender_tasks.push(tokio::spawn(async move {
                let _ep = ep;
                let end = Instant::now() + duration;
                let mut next = Instant::now();
                let mut n = 0u64;
                if streams {
                    // A stream per message, answered, as posts are.
                    let mut posts = tokio::task::JoinSet::new();
                    while Instant::now() < end {
                        tokio::time::sleep_until(next.into()).await;
                        next += interval;
                        let mut req = vec![op];
                        req.extend_from_slice(&group);
                        req.extend_from_slice(&now_ns().to_be_bytes());
                        req.resize(5 + frame, 0);
                        let conn = conn.clone();
                        posts.spawn(async move {
                            let (mut send, mut recv) = conn.open_bi().await?;
                            send.write_all(&req).await?;
                            send.finish()?;
                            recv.read_to_end(1).await?;
                            anyhow::Ok(())
                        });
                        n += 1;
                        while posts.try_join_next().is_some() {}
                    }
                    while posts.join_next().await.is_some() {}
                    return anyhow::Ok(n);
                }
                let (mut send, mut recv) = conn.open_bi().await?;
                let mut req = vec![b'R'];
                req.extend_from_slice(&(frame as u32).to_be_bytes());
                req.extend_from_slice(&group);
                send.write_all(&req).await?;
                let mut buf = vec![0u8; frame];
                while Instant::now() < end {
                    tokio::time::sleep_until(next.into()).await;
                    next += interval;
                    buf[..8].copy_from_slice(&now_ns().to_be_bytes());
                    send.write_all(&buf).await?;
                    n += 1;
                }
                send.finish()?;
                let _ = recv.read_to_end(0).await;
                anyhow::Ok(n)
            }));
        }
        let mut sent = 0;
        for t in sender_tasks {
            sent += t.await??;
        }
        let send_s = start.0.elapsed().as_secs_f64();
        let expected = sent * conns as u64;
        // Wait for the relay to drain, as the fan-out scenario does.
        let wait_start = Instant::now();
        let mut last = u64::MAX;
        while wait_start.elapsed() < Duration::from_secs(30) {
            let d = delivered.load(std::sync::atomic::Ordering::Relaxed);
            if d >= expected || d == last {
                break;
            }
            last = d;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let wall_s = start.0.elapsed().as_secs_f64().max(1e-9);
        let cpu_s = crate::ds::cpu_seconds(self.pid())
            .zip(start.1)
            .map(|(b, a)| b - a);
        let datagrams = datagrams(&links) - start.2;
        let _ = stop_tx.send(true);
        let mut latency = crate::light::latency_histogram();
        for t in receivers {
            latency.add(t.await?).expect("same bounds");
        }
        Ok(RelayResult {
            latency,
            delivered: delivered.load(std::sync::atomic::Ordering::Relaxed),
            expected,
            sent,
            send_s,
            wall_s,
            cpu_s,
            datagrams,
        })
    }
}

/// Who takes part in [`RawPeer::relay`].
#[derive(Debug, Clone, Copy)]
pub struct RelayShape {
    /// Groups.
    pub groups: usize,
    /// Subscriber connections per group.
    pub conns: usize,
    /// Sender connections per group.
    pub senders: usize,
    /// A stream per message, answered once relayed (as posts to the DS
    /// are); otherwise one stream per sender.
    pub streams: bool,
    /// With `streams`: each frame appended durably to its group's log
    /// through the DS's store and writer before it is answered (`W`).
    pub durable: bool,
}

/// What [`RawPeer::relay`] measured.
#[derive(Debug)]
pub struct RelayResult {
    /// Stamp-to-receipt latency of every delivery, microseconds.
    pub latency: Histogram<u64>,
    /// Frames the subscribers received.
    pub delivered: u64,
    /// `sent` times subscribers.
    pub expected: u64,
    /// Frames the senders sent.
    pub sent: u64,
    /// Seconds from the first send until the last sender was answered.
    pub send_s: f64,
    /// Seconds from the first send until the subscribers drained.
    pub wall_s: f64,
    /// The relay process's CPU seconds in that time.
    pub cpu_s: Option<f64>,
    /// UDP datagrams the subscribers received in that time.
    pub datagrams: u64,
}
