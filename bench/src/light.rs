//! Light members: authenticated connections that take part in groups
//! without decrypting anything. They receive pushed entries, read the
//! sender's timestamp from the message's clear-text authenticated data,
//! record latency, and acknowledge. They let one machine simulate hundreds
//! of members while the measured cost stays the delivery service's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use hdrhistogram::Histogram;
use huddle_client::identity::Identity;
use huddle_client::net::{Connection, Trust};
use huddle_core::mls;
use huddle_core::proto::{Control, EntryKind, Event, Request, Response};
use huddle_core::GroupId;
use openmls::prelude::{tls_codec::Serialize as _, *};
use openmls_rust_crypto::OpenMlsRustCrypto;

/// The clock every timestamp in a run is measured against.
pub fn clock() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Microseconds since the Unix epoch (wall clock, as the DS stamps
/// entries).
pub fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Nanoseconds since [`clock`].
pub fn now_ns() -> u64 {
    clock().elapsed().as_nanos() as u64
}

/// `base` made unique to this run of the tool (`r` + 8 hex digits + `.` +
/// `base`), so that runs against the same delivery service (`--server`)
/// never collide on user names.
pub fn run_name(base: &str) -> String {
    static RUN: OnceLock<String> = OnceLock::new();
    let run = RUN.get_or_init(|| {
        let mut b = [0u8; 4];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
        format!("r{:08x}", u32::from_be_bytes(b))
    });
    format!("{run}.{base}")
}

/// A registered user with an authenticated connection.
pub struct Light {
    /// Identity.
    pub id: Identity,
    /// Connection.
    pub net: Connection,
}

impl std::fmt::Debug for Light {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id.name)
    }
}

/// A key package of `id` (the private parts are not kept: light members
/// never join for real).
pub fn key_package(provider: &OpenMlsRustCrypto, id: &Identity, last_resort: bool) -> Bytes {
    let mut b = KeyPackage::builder()
        .key_package_lifetime(Lifetime::new(mls::KEY_PACKAGE_LIFETIME_SECS))
        .leaf_node_capabilities(mls::capabilities());
    if last_resort {
        b = b.mark_as_last_resort();
    }
    b.build(mls::CIPHERSUITE, provider, id, id.credential())
        .expect("key package")
        .key_package()
        .tls_serialize_detached()
        .expect("serialise")
        .into()
}

/// Registers `name`, publishes `kps` key packages, returns the connection.
pub async fn register(addr: &str, trust: &Trust, name: &str, kps: usize) -> anyhow::Result<Light> {
    let id = Identity::generate(name);
    let net = Connection::connect(addr, trust.clone()).await?;
    net.authenticate(&id, true).await?;
    publish(&net, &id, kps).await?;
    Ok(Light { id, net })
}

/// Publishes `kps` one-time key packages of `id` and a last-resort one
/// (nothing when `kps` is 0).
async fn publish(net: &Connection, id: &Identity, kps: usize) -> anyhow::Result<()> {
    if kps > 0 {
        let provider = OpenMlsRustCrypto::default();
        let key_packages = (0..kps)
            .map(|_| key_package(&provider, id, false))
            .collect();
        net.request(&Request::PublishKeyPackages {
            key_packages,
            last_resort: Some(key_package(&provider, id, true)),
        })
        .await?;
    }
    Ok(())
}

/// Registers `n` users named `{prefix}{i}`, `concurrency` at a time.
pub async fn register_many(
    addr: &str,
    trust: &Trust,
    prefix: &str,
    n: usize,
    kps: usize,
) -> anyhow::Result<Vec<Light>> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let batch: Vec<_> = (i..(i + 32).min(n))
            .map(|j| {
                let addr = addr.to_owned();
                let trust = trust.clone();
                let name = format!("{prefix}{j}");
                tokio::spawn(async move { register(&addr, &trust, &name, kps).await })
            })
            .collect();
        for t in batch {
            out.push(t.await??);
        }
        i += 32;
    }
    Ok(out)
}

/// Links device `device` (the next number) to `owner`'s user as the
/// protocol does (PROTOCOL.md 10.5): the new device asks with a proof of its
/// key, `owner` signs its addition; then the new device authenticates as
/// `USER/N` and publishes `kps` key packages.
pub async fn link_device(
    addr: &str,
    trust: &Trust,
    owner: &Light,
    device: u32,
    kps: usize,
) -> anyhow::Result<Light> {
    use huddle_core::auth::{proof_message, Purpose};
    use huddle_core::devices::{principal, DeviceChange, DeviceSet};
    let user = huddle_core::devices::user_part(&owner.id.name).to_owned();
    let id = Identity::generate(&principal(&user, device));
    let net = Connection::connect(addr, trust.clone()).await?;
    let Response::Challenge { nonce } = net.request(&Request::Challenge).await? else {
        anyhow::bail!("expected a Challenge")
    };
    let mut exporter = [0u8; 32];
    net.quic()
        .export_keying_material(&mut exporter, huddle_core::proto::EXPORTER_LABEL, b"")
        .map_err(|_| anyhow::anyhow!("no TLS exporter"))?;
    let proof = id.sign_raw(&proof_message(Purpose::Link, &user, &nonce, &exporter));
    let Response::LinkCode { code, .. } = net
        .request(&Request::RequestLink {
            user: user.clone(),
            device_key: id.public(),
            proof: proof.into(),
        })
        .await?
    else {
        anyhow::bail!("expected a LinkCode")
    };
    let Response::Devices {
        root_key, entries, ..
    } = owner
        .net
        .request(&Request::Devices { user: user.clone() })
        .await?
    else {
        anyhow::bail!("expected Devices")
    };
    let set = DeviceSet::replay(&user, root_key, &entries)?;
    anyhow::ensure!(
        set.next_device() == device,
        "device {device} is not the next"
    );
    let signer = huddle_core::devices::parse_principal(&owner.id.name)
        .map(|(_, n)| n)
        .unwrap_or(1);
    let entry = set.next_entry(
        signer,
        owner.id.signing_key(),
        DeviceChange::Add {
            device,
            key: id.public(),
        },
        0,
    );
    owner
        .net
        .request(&Request::AppendDevice {
            entry: entry.into(),
            code: Some(code),
        })
        .await?;
    let net = Connection::connect(addr, trust.clone()).await?;
    net.authenticate(&id, false).await?;
    publish(&net, &id, kps).await?;
    Ok(Light { id, net })
}

/// Links `devices - 1` more devices to each of `owners`' users (so each
/// has `devices`), 32 users at a time; returns the new devices.
pub async fn link_many(
    addr: &str,
    trust: &Trust,
    owners: &[Light],
    devices: u32,
    kps: usize,
) -> anyhow::Result<Vec<Light>> {
    let mut out = Vec::new();
    for batch in owners.chunks(32) {
        let linked = futures_util::future::try_join_all(batch.iter().map(|o| async move {
            let mut mine = Vec::new();
            for d in 2..=devices {
                mine.push(link_device(addr, trust, o, d, kps).await?);
            }
            anyhow::Ok(mine)
        }))
        .await?;
        out.extend(linked.into_iter().flatten());
    }
    Ok(out)
}

/// Set in an authenticated-data stamp that is a ticket: an index into
/// [`Tally::send_times`], where the sender records the send time of a
/// message it encrypted before the clock started. Timestamps ([`now_ns`])
/// never reach this bit.
pub const TICKET: u64 = 1 << 63;

/// Reads the stamp a [`crate::lean::Lean`] member puts in the
/// authenticated data of its application messages: its send time or a
/// [`TICKET`] (see [`Tally::send_time`]). The PrivateMessage
/// header is in the clear: version (2), wire format (2), group id (MLS
/// varint length + bytes), epoch (8), content type (1), authenticated data
/// (MLS varint length + bytes).
pub fn stamp_of(mls_message: &[u8]) -> Option<u64> {
    fn varint(b: &[u8]) -> Option<(usize, usize)> {
        let first = *b.first()?;
        match first >> 6 {
            0 => Some(((first & 0x3f) as usize, 1)),
            1 => Some(((((first & 0x3f) as usize) << 8) | *b.get(1)? as usize, 2)),
            2 => {
                let v = u32::from_be_bytes([first & 0x3f, *b.get(1)?, *b.get(2)?, *b.get(3)?]);
                Some((v as usize, 4))
            }
            _ => None,
        }
    }
    let mut p = 4;
    let (gl, n) = varint(mls_message.get(p..)?)?;
    p += n + gl + 8 + 1;
    let (al, n) = varint(mls_message.get(p..)?)?;
    p += n;
    if al != 8 {
        return None;
    }
    Some(u64::from_be_bytes(
        mls_message.get(p..p + 8)?.try_into().ok()?,
    ))
}

/// An empty latency histogram: microseconds from 1 µs to 60 s, two
/// significant digits (a reported percentile is within 1 % of the true
/// value). Each light member records into its own: 20 KB at two digits;
/// at three each was 139 KB, two hundred of them overflowed the CPU caches,
/// and recording was 5 % of the benchmark process's CPU at 1,300 msg/s.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("bounds")
}

/// What all light receivers of a run record.
#[derive(Debug)]
pub struct Tally {
    /// End-to-end latency of application messages, microseconds.
    pub latency: Mutex<Histogram<u64>>,
    /// From the DS's timestamp of an application entry (when its
    /// sequencer accepted it; wall clock, milliseconds) to its receipt,
    /// microseconds (so within about a millisecond).
    pub from_ds: Mutex<Histogram<u64>>,
    /// Entries received.
    pub deliveries: AtomicU64,
    /// Push frame bytes received.
    pub bytes: AtomicU64,
    /// When the last entry arrived (ns on [`clock`]).
    pub last_ns: AtomicU64,
    /// Send times (ns on [`clock`], 0 = not sent) of messages encrypted
    /// ahead, by ticket.
    pub send_times: OnceLock<Box<[AtomicU64]>>,
}

impl Tally {
    /// When the message stamped `stamp` was sent: the stamp itself, or for
    /// a [`TICKET`] the time its sender recorded.
    pub fn send_time(&self, stamp: u64) -> Option<u64> {
        if stamp & TICKET == 0 {
            return Some(stamp);
        }
        let t = self
            .send_times
            .get()?
            .get(usize::try_from(stamp & !TICKET).ok()?)?
            .load(Ordering::Acquire);
        (t != 0).then_some(t)
    }

    /// Records that ticket `ticket` is being sent now.
    pub fn mark_sent(&self, ticket: u64) {
        if let Some(t) = self
            .send_times
            .get()
            .and_then(|v| v.get(usize::try_from(ticket & !TICKET).ok()?))
        {
            // 0 means "not sent".
            t.store(now_ns().max(1), Ordering::Release);
        }
    }
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            latency: Mutex::new(latency_histogram()),
            from_ds: Mutex::new(latency_histogram()),
            deliveries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            send_times: OnceLock::new(),
        }
    }
}

/// Arrival times of commits at each receiver, by sequence number.
pub type Arrivals = Arc<Mutex<Vec<(GroupId, u64, u64)>>>;

/// Opens the push stream of `light` for `group` after `after` and records
/// every entry into `tally` until the stream ends. Commit arrivals go to
/// `arrivals` when given.
#[allow(clippy::too_many_arguments)]
pub async fn receive(
    light: Light,
    groups: Vec<(GroupId, u64)>,
    inbox_after: u64,
    tally: Arc<Tally>,
    arrivals: Option<Arrivals>,
    inbox: Option<Arc<Mutex<Vec<u64>>>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Light> {
    let mut stop = stop;
    let (mut send, mut recv, _) = light
        .net
        .open(&Request::Subscribe {
            groups,
            inbox_after,
        })
        .await?;
    let mut local = latency_histogram();
    let mut local_from_ds = latency_histogram();
    let mut since_ack = 0u32;
    // The newest inbox item followed.
    let mut inbox_seen = inbox_after;
    // Counts kept here and added to the shared tally every so often: one
    // shared atomic per delivery made the receivers' threads contend.
    let (mut deliveries, mut bytes, mut last_ns) = (0u64, 0u64, 0u64);
    let flush = |deliveries: &mut u64, bytes: &mut u64, last_ns: u64| {
        tally.deliveries.fetch_add(*deliveries, Ordering::Relaxed);
        tally.bytes.fetch_add(*bytes, Ordering::Relaxed);
        tally.last_ns.fetch_max(last_ns, Ordering::Relaxed);
        (*deliveries, *bytes) = (0, 0);
    };
    // Everything already received is read at once and split into frames
    // here, rather than two reads per frame.
    let mut decoder = huddle_core::frame::Decoder::new(huddle_client::net::MAX_FRAME);
    'stream: loop {
        let chunk = tokio::select! {
            r = recv.read_chunk(1 << 16, true) => match r {
                Ok(Some(c)) => c.bytes,
                _ => break,
            },
            _ = stop.changed() => break,
        };
        decoder.extend(&chunk);
        let now = now_ns();
        loop {
            let body = match decoder.next_frame() {
                Ok(Some(body)) => body,
                Ok(None) => break,
                Err(_) => break 'stream,
            };
            let Ok(ev) = huddle_core::proto::decode::<Event>(&body) else {
                break 'stream;
            };
            match ev {
                Event::Entry { group, entry } => {
                    deliveries += 1;
                    bytes += entry.data.len() as u64 + 60;
                    last_ns = now;
                    match entry.kind {
                        EntryKind::Application => {
                            if let Some(t) = stamp_of(&entry.data).and_then(|s| tally.send_time(s))
                            {
                                let _ = local.record((now.saturating_sub(t) / 1000).max(1));
                                let _ = local_from_ds.record(
                                    wall_us().saturating_sub(entry.timestamp_ms * 1000).max(1),
                                );
                            }
                        }
                        _ => {
                            if let Some(a) = &arrivals {
                                a.lock().expect("arrivals").push((group, entry.seq, now));
                            }
                        }
                    }
                    since_ack += 1;
                    if since_ack >= 64 {
                        since_ack = 0;
                        flush(&mut deliveries, &mut bytes, last_ns);
                        let ack = huddle_core::proto::encode_frame(&Control::Ack {
                            group,
                            seq: entry.seq,
                        });
                        if send.write_all(&ack).await.is_err() {
                            break 'stream;
                        }
                    }
                }
                Event::Inbox(item) => {
                    if item.seq <= inbox_seen {
                        continue;
                    }
                    inbox_seen = item.seq;
                    if let Some(i) = &inbox {
                        i.lock().expect("inbox").push(now);
                    }
                    // Follow the group from the commit that added us.
                    let watch = huddle_core::proto::encode_frame(&Control::Watch {
                        group: item.group,
                        after: item.commit_seq,
                    });
                    if send.write_all(&watch).await.is_err() {
                        break 'stream;
                    }
                }
                Event::InboxGap { .. } => {
                    // Welcomes not pushed (too large, or stored through
                    // another node of a cluster): fetched.
                    let Ok(Response::Inbox { items, .. }) = light
                        .net
                        .request(&Request::FetchInbox {
                            after: inbox_seen,
                            limit: huddle_core::proto::MAX_PAGE,
                        })
                        .await
                    else {
                        break 'stream;
                    };
                    for item in items {
                        if item.seq <= inbox_seen {
                            continue;
                        }
                        inbox_seen = item.seq;
                        if let Some(i) = &inbox {
                            i.lock().expect("inbox").push(now_ns());
                        }
                        let watch = huddle_core::proto::encode_frame(&Control::Watch {
                            group: item.group,
                            after: item.commit_seq,
                        });
                        if send.write_all(&watch).await.is_err() {
                            break 'stream;
                        }
                    }
                }
                _ => {}
            }
        }
        // What arrived is counted before waiting for more, so a run's
        // drain check sees it.
        if deliveries > 0 {
            flush(&mut deliveries, &mut bytes, last_ns);
        }
    }
    flush(&mut deliveries, &mut bytes, last_ns);
    tally
        .latency
        .lock()
        .expect("latency")
        .add(&local)
        .expect("same bounds");
    tally
        .from_ds
        .lock()
        .expect("from_ds")
        .add(&local_from_ds)
        .expect("same bounds");
    Ok(light)
}

/// Claims one key package for each of `users`, in pages the DS accepts.
pub async fn claim(net: &Connection, users: &[String]) -> anyhow::Result<Vec<KeyPackage>> {
    let provider = OpenMlsRustCrypto::default();
    let mut out = Vec::with_capacity(users.len());
    for page in users.chunks(huddle_core::proto::MAX_BATCH_USERS) {
        let Response::KeyPackages { packages } = net
            .request(&Request::ClaimKeyPackages {
                users: page.to_vec(),
            })
            .await?
        else {
            anyhow::bail!("unexpected claim answer");
        };
        for p in packages {
            use openmls::prelude::tls_codec::Deserialize as _;
            out.push(
                KeyPackageIn::tls_deserialize_exact(p.key_package.as_ref())?.validate(
                    openmls_traits::OpenMlsProvider::crypto(&provider),
                    ProtocolVersion::Mls10,
                )?,
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_resolves_to_its_recorded_send_time_and_a_timestamp_to_itself() {
        let tally = Tally::default();
        // Before any table exists a ticket has no time; a timestamp does.
        assert_eq!(tally.send_time(TICKET | 1), None);
        assert_eq!(tally.send_time(12_345), Some(12_345));
        let _ = tally
            .send_times
            .set((0..3).map(|_| AtomicU64::new(0)).collect());
        // Not sent yet: no time, so no latency is recorded from it.
        assert_eq!(tally.send_time(TICKET | 1), None);
        let before = now_ns();
        tally.mark_sent(TICKET | 1);
        let t = tally.send_time(TICKET | 1).expect("marked");
        assert!(t >= before && t <= now_ns());
        assert_eq!(tally.send_time(TICKET), None, "other tickets untouched");
        // Out of the table: refused, not a panic.
        assert_eq!(tally.send_time(TICKET | 3), None);
        tally.mark_sent(TICKET | 3);
    }
}
