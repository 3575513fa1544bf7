//! The raw peer process (`huddle-bench raw-server`), run beside the
//! delivery service the way it runs. Each request is one bidirectional
//! stream whose first byte says what to do:
//! - `U`: the client sends bytes until FIN; the peer counts and drains them,
//!   then answers with the count (u64, big-endian).
//! - `D` + u64 length: the peer sends that many bytes, then FIN.
//! - `P` + u32 frame size + u64 count: the peer writes that many frames of
//!   that size as fast as the connection takes them, then FIN.
//! - `S` + u32 group: subscribe to that group of the relay; the peer
//!   answers one byte once subscribed, then writes every frame relayed to
//!   the group on this stream, the way the delivery service's push loop
//!   does (a bounded queue per subscriber, whatever is queued goes out in
//!   one write, writes at least 25 ms apart).
//! - `R` + u32 frame size + u32 group: the client sends frames of that
//!   size; the peer forwards them to the group's subscribers. One
//!   forwarding task takes whatever the senders' streams delivered since it
//!   last ran and queues each group's part to each of its subscribers as
//!   one item, as the DS's sequencers do with a round of messages. Neither
//!   stored, nor checked, nor ordered: a fan-out with nothing but quinn in
//!   it.
//! - `Q` + u32 group, then one frame until FIN: the same for one frame,
//!   answered with one byte once it is queued for forwarding: a stream per
//!   message, as posts to the DS are.
//! - `W` + u32 group, then one frame until FIN: as `Q`, but the frame is
//!   first appended to its group's log through the DS's own store and
//!   writer (redb, `Durability::Immediate`, one transaction for whatever
//!   arrived meanwhile), then answered and forwarded: the DS's transport
//!   and durable write with none of its checks, sequencing or push logic.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{mpsc, oneshot};

use super::{endpoint_config, transport, ALPN};

/// Runs the raw peer until killed: binds 127.0.0.1:0, writes its certificate
/// to `cert_out`, prints its address.
pub async fn serve(cert_out: &Path, max_payload: u16) -> anyhow::Result<()> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let der = certified.cert.der().to_vec();
    std::fs::write(cert_out, &der)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(der)], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport(max_payload)));
    let endpoint = quinn::Endpoint::new(
        endpoint_config(max_payload)?,
        Some(config),
        huddle_client::net::udp_socket("127.0.0.1:0".parse()?)?,
        Arc::new(quinn::TokioRuntime),
    )?;
    println!("raw peer listening on {}", endpoint.local_addr()?);
    let dir = cert_out.parent().context("cert path")?;
    let relay = Relay::start(dir.join("relay.redb"));
    while let Some(inc) = endpoint.accept().await {
        let relay = relay.clone();
        tokio::spawn(async move {
            let Ok(conn) = inc.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(handle(send, recv, relay.clone()));
            }
        });
    }
    Ok(())
}

/// The raw peer's fan-out: each group's subscribers (one bounded queue
/// each) and the queue into the forwarding task.
#[derive(Clone)]
struct Relay {
    subscribers: Arc<Mutex<HashMap<u32, Vec<mpsc::Sender<bytes::Bytes>>>>>,
    incoming: mpsc::UnboundedSender<Incoming>,
}

/// A frame for a group, and for a durable one (`W`) where to say it is on
/// disk.
type Incoming = (u32, bytes::Bytes, Option<oneshot::Sender<()>>);

impl Relay {
    /// The relay; durable frames go to a store at `path`, opened when the
    /// first arrives.
    fn start(path: std::path::PathBuf) -> Self {
        let subscribers: Arc<Mutex<HashMap<u32, Vec<mpsc::Sender<bytes::Bytes>>>>> = Arc::default();
        let (incoming, mut rx) = mpsc::unbounded_channel::<Incoming>();
        let subs = subscribers.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            let mut log: Option<DurableLog> = None;
            while rx.recv_many(&mut got, 256).await > 0 {
                if got.iter().any(|(_, _, ack)| ack.is_some()) {
                    if log.is_none() {
                        match DurableLog::open(&path) {
                            Ok(l) => log = Some(l),
                            Err(e) => {
                                eprintln!("relay store: {e}");
                                return;
                            }
                        }
                    }
                    let Some(l) = log.as_mut() else { return };
                    if let Err(e) = l.append(&got).await {
                        eprintln!("relay store: {e}");
                        return;
                    }
                }
                let mut rounds: HashMap<u32, bytes::BytesMut> = HashMap::new();
                for (g, f, ack) in got.drain(..) {
                    rounds.entry(g).or_default().extend_from_slice(&f);
                    if let Some(ack) = ack {
                        let _ = ack.send(());
                    }
                }
                let mut subs = subs.lock().expect("relay");
                for (g, round) in rounds {
                    let f = round.freeze();
                    // A full or closed queue drops the frames for that
                    // subscriber; the client counts what arrives.
                    if let Some(list) = subs.get_mut(&g) {
                        list.retain(|tx| {
                            !matches!(
                                tx.try_send(f.clone()),
                                Err(mpsc::error::TrySendError::Closed(_))
                            )
                        });
                    }
                }
            }
        });
        Self {
            subscribers,
            incoming,
        }
    }
}

/// The durable relay's logs: one group of the DS's store per relay group,
/// written through the DS's writer.
struct DurableLog {
    writer: huddle_server::writer::Writer,
    /// Per relay group: its id, when it was created and its head (a write
    /// that changes only the head leaves the group's row alone, as the
    /// DS's do).
    heads: HashMap<u32, (huddle_core::GroupId, u64, u64)>,
}

impl DurableLog {
    fn open(path: &Path) -> anyhow::Result<Self> {
        let store = huddle_server::store::redb::RedbStore::open(path)?;
        Ok(Self {
            writer: huddle_server::writer::Writer::start(
                Arc::new(store),
                huddle_server::writer::LINGER,
            ),
            heads: HashMap::new(),
        })
    }

    /// Appends the durable frames of `got`, each group's as one write, all
    /// handed to the writer at once (so they share a transaction).
    async fn append(&mut self, got: &[Incoming]) -> anyhow::Result<()> {
        use huddle_server::store::GroupWrite;
        let now = crate::light::now_ns() / 1_000_000;
        let mut writes: HashMap<u32, GroupWrite> = HashMap::new();
        for (g, f, ack) in got {
            if ack.is_none() {
                continue;
            }
            if !self.heads.contains_key(g) {
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&g.to_be_bytes());
                let id = huddle_core::GroupId(id);
                self.writer
                    .write(GroupWrite::create(id, "relay", now, Vec::new()))
                    .await?;
                self.heads.insert(*g, (id, now, 0));
            }
            let (id, created, head) = self.heads.get_mut(g).context("relay group")?;
            *head += 1;
            let w = writes.entry(*g).or_insert_with(|| {
                let mut w = GroupWrite::create(*id, "relay", *created, Vec::new());
                w.create = false;
                w.state = None;
                w.members.clear();
                w
            });
            w.meta.head = *head;
            w.entries.push(huddle_core::proto::LogEntry {
                seq: *head,
                epoch: 0,
                kind: huddle_core::proto::EntryKind::Application,
                timestamp_ms: now,
                data: f.clone(),
            });
        }
        let results =
            futures_util::future::join_all(writes.into_values().map(|w| self.writer.write(w)))
                .await;
        for r in results {
            r?;
        }
        Ok(())
    }
}

/// Frames queued per subscriber, written per call, and the least time
/// between two writes to one subscriber: the DS's defaults (`push_queue`,
/// its push batch, `push_interval`).
const RELAY_QUEUE: usize = 4096;
const RELAY_BATCH: usize = 64;
const RELAY_PUSH_INTERVAL: Duration = Duration::from_millis(25);

async fn handle(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    relay: Relay,
) -> anyhow::Result<()> {
    let mut op = [0u8; 1];
    recv.read_exact(&mut op).await?;
    match op[0] {
        b'U' => {
            let mut n = 0u64;
            while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
                n += chunk.bytes.len() as u64;
            }
            send.write_all(&n.to_be_bytes()).await?;
            send.finish()?;
        }
        b'D' => {
            let mut len = [0u8; 8];
            recv.read_exact(&mut len).await?;
            let mut left = u64::from_be_bytes(len);
            let buf = bytes::Bytes::from(vec![0x5a; 1 << 20]);
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                send.write_chunk(buf.slice(..n)).await?;
                left -= n as u64;
            }
            send.finish()?;
        }
        b'P' => {
            let mut p = [0u8; 12];
            recv.read_exact(&mut p).await?;
            let size = u32::from_be_bytes(p[..4].try_into()?) as usize;
            let mut left = u64::from_be_bytes(p[4..].try_into()?);
            let frame = bytes::Bytes::from(vec![0x33; size]);
            while left > 0 {
                // A batch of frames per write, as a push loop would queue them.
                let n = left.min(16);
                let mut batch: Vec<bytes::Bytes> = (0..n).map(|_| frame.clone()).collect();
                send.write_all_chunks(&mut batch).await?;
                left -= n;
            }
            send.finish()?;
        }
        b'S' => {
            let mut g = [0u8; 4];
            recv.read_exact(&mut g).await?;
            let (tx, mut rx) = mpsc::channel::<bytes::Bytes>(RELAY_QUEUE);
            relay
                .subscribers
                .lock()
                .expect("relay")
                .entry(u32::from_be_bytes(g))
                .or_default()
                .push(tx);
            send.write_all(b"k").await?;
            // When the next write may start: spaced like the DS's.
            let mut next: Option<tokio::time::Instant> = None;
            while let Some(f) = rx.recv().await {
                if let Some(at) = next {
                    tokio::time::sleep_until(at).await;
                }
                let started = tokio::time::Instant::now();
                let mut batch = vec![f];
                while batch.len() < RELAY_BATCH {
                    match rx.try_recv() {
                        Ok(f) => batch.push(f),
                        Err(_) => break,
                    }
                }
                let full = batch.len() == RELAY_BATCH;
                send.write_all_chunks(&mut batch).await?;
                next = (!full).then_some(started + RELAY_PUSH_INTERVAL);
            }
        }
        b'R' => {
            let mut p = [0u8; 8];
            recv.read_exact(&mut p).await?;
            let size = u32::from_be_bytes(p[..4].try_into()?) as usize;
            let group = u32::from_be_bytes(p[4..].try_into()?);
            let mut pending = bytes::BytesMut::new();
            while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
                pending.extend_from_slice(&chunk.bytes);
                let whole = pending.len() / size.max(1) * size.max(1);
                if whole == 0 {
                    continue;
                }
                let _ = relay
                    .incoming
                    .send((group, pending.split_to(whole).freeze(), None));
            }
            send.finish()?;
        }
        b'Q' => {
            let mut g = [0u8; 4];
            recv.read_exact(&mut g).await?;
            let frame = recv.read_to_end(1 << 20).await?;
            let _ = relay
                .incoming
                .send((u32::from_be_bytes(g), bytes::Bytes::from(frame), None));
            send.write_all(b"k").await?;
            send.finish()?;
        }
        b'W' => {
            let mut g = [0u8; 4];
            recv.read_exact(&mut g).await?;
            let frame = recv.read_to_end(1 << 20).await?;
            let (ack, written) = oneshot::channel();
            let _ =
                relay
                    .incoming
                    .send((u32::from_be_bytes(g), bytes::Bytes::from(frame), Some(ack)));
            written.await.context("the relay's store failed")?;
            send.write_all(b"k").await?;
            send.finish()?;
        }
        other => bail!("unknown op {other}"),
    }
    Ok(())
}
