//! The QUIC endpoint: accepts connections, reads one request frame per
//! stream, hands it to the [`Service`], writes the response.
//!
//! Quinn types stop here; everything behind [`Service`] is transport-free.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Context as _, StartError};
use bytes::Bytes;
use huddle_core::frame::{self, FrameError, HEADER_LEN};
use huddle_core::proto::{
    self, DecodeError, ErrorBody, ErrorCode, Request, Response, EXPORTER_LABEL,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument as _};

use crate::bus::Bus;
use crate::config::ServerConfig;
use crate::service::{Service, Session, Uncounted};
use crate::store::postgres::PgStore;
use crate::store::redb::RedbStore;
use crate::store::Store;
use crate::{budget, media, push, tls};

/// QUIC application close codes.
pub mod close {
    /// Normal close, or the server is shutting down.
    pub const NORMAL: u32 = 0;
    /// The peer violated the protocol.
    pub const PROTOCOL: u32 = 1;
    /// The server is at its connection limit.
    pub const BUSY: u32 = 2;
    /// The peer stopped reading its push stream.
    pub const STALLED: u32 = 3;
    /// The peer did not authenticate in time.
    pub const AUTH_TIMEOUT: u32 = 4;
}

pub use huddle_io::{udp_socket, SOCKET_BUFFER};

/// Time a client has to deliver a whole request frame.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A running delivery service.
#[derive(Debug)]
pub struct Running {
    /// The address actually bound (useful with port 0).
    pub addr: SocketAddr,
    /// SHA-256 fingerprint of the certificate presented.
    pub fingerprint: String,
    /// The end-entity certificate (DER), for clients to pin.
    pub cert_der: Vec<u8>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    service: Arc<Service>,
    blobs: Arc<media::BlobStore>,
    /// What the blob disk still takes (fault tests set a limit).
    #[cfg(test)]
    pub(crate) blob_room: media::Room,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (up to the configured
    /// grace period), flushes state and closes the endpoint.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Waits until the server stops (after [`Running::shutdown`] or a
    /// fatal error).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// A token that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// What the DS holds right now against its budgets.
    pub fn stats(&self) -> Stats {
        let c = self.service.config();
        Stats {
            answers_in_flight: self.service.budgets.in_flight(c.answer_budget_total),
            groups_loaded: self.service.loaded_groups(),
            tail_bytes: self.service.tail_bytes(),
            transfers: self.blobs.transfers(),
            transfer_memory: self.blobs.transfer_memory(),
        }
    }
}

/// What the DS holds against its budgets ([`Running::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Bytes reserved for answers not yet read by their clients.
    pub answers_in_flight: usize,
    /// Bytes of entries kept in memory by all groups.
    pub tail_bytes: usize,
    /// Uploads and downloads running.
    pub transfers: usize,
    /// Bytes of memory they have reserved (`transfer_memory_*`).
    pub transfer_memory: usize,
    /// Groups in memory.
    pub groups_loaded: usize,
}

/// Opens the data dir and store, binds the endpoint and starts serving.
pub async fn start(config: ServerConfig) -> Result<Running, StartError> {
    config.validate().map_err(StartError::msg)?;
    start_with_store(config, |store| store).await
}

/// The store `config` names: PostgreSQL with `store_url`, else the
/// embedded store in the data directory.
async fn open_store(config: &ServerConfig) -> Result<Arc<dyn Store>, StartError> {
    match &config.store_url {
        Some(url) => {
            let (url, pool) = (url.clone(), config.store_connections);
            let pool = u32::try_from(pool).unwrap_or(u32::MAX);
            let store = tokio::task::spawn_blocking(move || PgStore::open(&url, pool))
                .await
                .map_err(|e| StartError::msg(format!("opening the database: {e}")))?
                .map_err(|e| StartError::msg(format!("opening the database: {e}")))?;
            Ok(Arc::new(store))
        }
        None => {
            let db_path = config.data_dir.join("huddle.redb");
            let store = RedbStore::open_with_cache(&db_path, config.store_cache).map_err(|e| {
                StartError::msg(format!(
                    "opening {}: {e} (is another huddle-server using this data dir?)",
                    db_path.display()
                ))
            })?;
            Ok(Arc::new(store))
        }
    }
}

/// Like [`start`], with the opened store passed through `wrap` (tests put
/// a store that fails on demand around it).
pub(crate) async fn start_with_store(
    config: ServerConfig,
    wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
) -> Result<Running, StartError> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let identity = tls::load_identity(&config)?;
    let fingerprint = identity.fingerprint();
    let cert_der = identity.chain[0].to_vec();
    let store = open_store(&config).await?;
    let bus = match &config.bus_url {
        Some(url) => Some(
            Bus::connect(
                url,
                config.bus_queue,
                &config.bus_prefix,
                config.bus_ca.as_deref(),
            )
            .await
            .map_err(|e| StartError::msg(e.to_string()))?,
        ),
        None => None,
    };
    let config = Arc::new(config);
    // Loading reads the store, which blocks (a database answers over the
    // network): not on an async worker.
    let (service, blobs) = {
        let config = config.clone();
        let store = wrap(store);
        tokio::task::spawn_blocking(move || -> Result<_, StartError> {
            let service = Service::new(config.clone(), store, bus)
                .map_err(|e| StartError::msg(format!("loading state: {e}")))?;
            let blobs = media::BlobStore::open(config, service.store().clone())?;
            Ok((service, blobs))
        })
        .await
        .map_err(|e| StartError::msg(format!("loading state: {e}")))??
    };
    let server_config = tls::quinn_config(&config, identity)?;
    let reset_key = tls::reset_key(&config.data_dir)?;
    // Connection ids are checked against a keyed hash before a stateless
    // reset is sent, so the key must also survive restarts.
    let tag = ring::hmac::sign(&reset_key, b"huddle connection id key");
    let cid_key = u64::from_le_bytes(tag.as_ref()[..8].try_into().expect("8 bytes"));
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config
        .max_udp_payload_size(huddle_core::proto::MAX_UDP_PAYLOAD)
        .context("setting the largest UDP payload")?;
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // A DS restarted right after the previous one stopped may find the port
    // still bound while that one says goodbye to its clients.
    let deadline = std::time::Instant::now() + crate::store::redb::LOCK_WAIT;
    let socket = loop {
        match udp_socket(config.listen) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => break r.with_context(|| format!("binding {}", config.listen))?,
        }
    };
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(|| format!("binding {}", config.listen))?;
    let addr = endpoint.local_addr().context("reading the bound address")?;
    let shutdown = CancellationToken::new();
    #[cfg(test)]
    let blob_room = blobs.room.clone();
    let blobs = Arc::new(blobs);
    let task = tokio::spawn(serve(
        endpoint,
        service.clone(),
        blobs.clone(),
        shutdown.clone(),
    ));
    Ok(Running {
        addr,
        fingerprint,
        cert_der,
        shutdown,
        task,
        service,
        blobs,
        #[cfg(test)]
        blob_room,
    })
}

async fn serve(
    endpoint: quinn::Endpoint,
    service: Arc<Service>,
    blobs: Arc<media::BlobStore>,
    shutdown: CancellationToken,
) {
    let config = service.config().clone();
    let connections = TaskTracker::new();
    let active = Arc::new(AtomicUsize::new(0));
    let unauthenticated = Arc::new(AtomicUsize::new(0));
    // Connections past their handshake and not yet authenticated, oldest
    // first: when too many wait, the oldest goes, so that one who holds
    // many open only delays honest clients (who authenticate within a
    // round trip) rather than shutting them out.
    let waiting: Waiting = Arc::default();
    let next_id = AtomicU64::new(1);
    let maintenance = {
        let svc = service.clone();
        let blobs = blobs.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(svc.config().maintenance_interval);
            let mut last_sweep: Option<std::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        svc.flush_acks().await;
                        svc.budgets.prune();
                        blobs.prune();
                        svc.unload_idle().await;
                        if last_sweep.is_none_or(|t| t.elapsed() >= svc.config().media_sweep_interval) {
                            last_sweep = Some(std::time::Instant::now());
                            if svc.holds_sweep_lease().await {
                                svc.expire_inboxes().await;
                                blobs.sweep(&svc, svc.now_ms()).await;
                            }
                        }
                    }
                }
            }
        })
    };
    let cluster = service.bus().map(|bus| {
        tokio::spawn(crate::hub::follow_cluster(
            service.clone(),
            bus,
            shutdown.clone(),
        ))
    });
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        if active.load(Ordering::Relaxed) >= config.max_connections {
            warn!(remote = %incoming.remote_address(), "connection limit reached; refusing");
            tokio::spawn(async move {
                if let Ok(c) = incoming.await {
                    c.close(close::BUSY.into(), b"server is at its connection limit");
                }
            });
            continue;
        }
        if unauthenticated.load(Ordering::Relaxed) >= config.max_unauthenticated
            && !evict_oldest(&waiting)
        {
            warn!(remote = %incoming.remote_address(), "too many unauthenticated connections; refusing");
            tokio::spawn(async move {
                if let Ok(c) = incoming.await {
                    c.close(
                        close::BUSY.into(),
                        b"too many connections are authenticating; try again",
                    );
                }
            });
            continue;
        }
        let pending = Uncounted::new(unauthenticated.clone());
        active.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", id, remote = %incoming.remote_address());
        let (svc, blobs, stop, active, waiting) = (
            service.clone(),
            blobs.clone(),
            shutdown.clone(),
            active.clone(),
            waiting.clone(),
        );
        connections.spawn(
            async move {
                handle_connection(incoming, id, svc, blobs, stop, pending, waiting).await;
                active.fetch_sub(1, Ordering::Relaxed);
            }
            .instrument(span),
        );
    }
    info!("shutting down: no new connections, finishing in-flight requests");
    endpoint.set_server_config(None);
    connections.close();
    if tokio::time::timeout(config.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        warn!("in-flight requests did not finish within the grace period");
    }
    let _ = maintenance.await;
    if let Some(c) = cluster {
        let _ = c.await;
    }
    service.close().await;
    endpoint.close(close::NORMAL.into(), b"server shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    info!("stopped");
}

async fn handle_connection(
    incoming: quinn::Incoming,
    id: u64,
    svc: Arc<Service>,
    blobs: Arc<media::BlobStore>,
    shutdown: CancellationToken,
    pending: Uncounted,
    waiting: Waiting,
) {
    let conn = match tokio::time::timeout(Duration::from_secs(10), incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            debug!("handshake timed out");
            return;
        }
    };
    let mut exporter = [0u8; 32];
    if conn
        .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .is_err()
    {
        conn.close(close::PROTOCOL.into(), b"TLS exporter unavailable");
        return;
    }
    debug!("connected");
    let session = Arc::new(Session::new(id, exporter, svc.budgets.connection()));
    waiting
        .lock()
        .expect("waiting lock")
        .insert(id, conn.clone());
    session.count_until_authenticated(pending.and_then(move || {
        waiting.lock().expect("waiting lock").remove(&id);
    }));
    // Authenticate in time, or go: an open connection costs a slot.
    let deadline = {
        let (session, conn) = (session.clone(), conn.clone());
        let wait = svc.config().auth_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if session.user().is_none() {
                debug!("not authenticated in time; closing");
                conn.close(
                    close::AUTH_TIMEOUT.into(),
                    format!("authenticate within {wait:?} of connecting").as_bytes(),
                );
            }
        })
    };
    let streams = TaskTracker::new();
    loop {
        let (send, recv) = tokio::select! {
            _ = shutdown.cancelled() => break,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    debug!(reason = %e, "connection ended");
                    break;
                }
            },
        };
        let (svc, blobs, session, stop, conn2) = (
            svc.clone(),
            blobs.clone(),
            session.clone(),
            shutdown.clone(),
            conn.clone(),
        );
        streams.spawn(
            async move {
                handle_stream(svc, blobs, session, send, recv, stop, conn2).await;
            }
            .instrument(info_span!("stream")),
        );
    }
    deadline.abort();
    streams.close();
    streams.wait().await;
    if shutdown.is_cancelled() {
        conn.close(close::NORMAL.into(), b"server shutting down");
    }
}

/// Connections waiting to authenticate, by connection id (oldest first).
type Waiting = Arc<std::sync::Mutex<std::collections::BTreeMap<u64, quinn::Connection>>>;

/// Closes the connection that has waited longest to authenticate, if any.
fn evict_oldest(waiting: &Waiting) -> bool {
    let oldest = waiting.lock().expect("waiting lock").pop_first();
    match oldest {
        Some((_, conn)) => {
            conn.close(
                close::BUSY.into(),
                b"too many connections are authenticating; this one waited longest",
            );
            true
        }
        None => false,
    }
}

/// Why a request frame could not be read.
#[derive(Debug)]
pub enum ReadFrameError {
    /// The frame was refused (too large, truncated).
    Frame(FrameError),
    /// The stream ended before a whole frame arrived.
    Truncated,
    /// The peer reset the stream or the connection dropped.
    Gone,
    /// The frame did not arrive in time.
    Timeout,
}

/// Reads one frame body from `recv`, checking its length before allocating.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Bytes, ReadFrameError> {
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => ReadFrameError::Truncated,
        quinn::ReadExactError::ReadError(_) => ReadFrameError::Gone,
    })?;
    let len = frame::body_len(header, max).map_err(ReadFrameError::Frame)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => ReadFrameError::Truncated,
        quinn::ReadExactError::ReadError(_) => ReadFrameError::Gone,
    })?;
    Ok(Bytes::from(body))
}

async fn respond(send: &mut quinn::SendStream, resp: &Response) {
    if send.write_all(&proto::encode_frame(resp)).await.is_ok() {
        let _ = send.finish();
    }
}

/// Writes an answer, giving up (and resetting the stream, which frees the
/// answer) if the client has not taken it within `deadline`.
async fn respond_within(send: &mut quinn::SendStream, frame: Bytes, deadline: Duration) {
    match tokio::time::timeout(deadline, send.write_all(&frame)).await {
        Ok(Ok(())) => {
            let _ = send.finish();
        }
        Ok(Err(_)) => {}
        Err(_) => {
            debug!(bytes = frame.len(), "answer not read in time; dropped");
            let _ = send.reset(close::STALLED.into());
        }
    }
}

async fn handle_stream(
    svc: Arc<Service>,
    blobs: Arc<media::BlobStore>,
    session: Arc<Session>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shutdown: CancellationToken,
    conn: quinn::Connection,
) {
    let max = svc.config().max_frame;
    let body = match tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut recv, max)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let err = match e {
                ReadFrameError::Frame(FrameError::TooLarge { len, max }) => ErrorBody::new(
                    ErrorCode::FrameTooLarge,
                    format!("request frame of {len} bytes exceeds the limit of {max}"),
                ),
                ReadFrameError::Frame(FrameError::Incomplete { .. })
                | ReadFrameError::Truncated => {
                    ErrorBody::new(ErrorCode::BadRequest, "the stream ended inside a frame")
                }
                ReadFrameError::Gone => return,
                ReadFrameError::Timeout => unreachable!(),
            };
            debug!(error = %err.message, "bad request frame");
            respond(&mut send, &Response::Error(err)).await;
            return;
        }
        Err(_) => {
            let err = ErrorBody::new(ErrorCode::BadRequest, "request frame timed out");
            respond(&mut send, &Response::Error(err)).await;
            return;
        }
    };
    let req = match proto::decode::<Request>(&body) {
        Ok(r) => r,
        Err(e) => {
            let code = match e {
                DecodeError::UnknownType(_) => ErrorCode::UnknownMessageType,
                _ => ErrorCode::BadRequest,
            };
            debug!(error = %e, "undecodable request");
            respond(
                &mut send,
                &Response::Error(ErrorBody::new(code, e.to_string())),
            )
            .await;
            return;
        }
    };
    debug!(request = ?req, user = ?session.user(), "request");
    match req {
        Request::Subscribe {
            groups,
            inbox_after,
        } => {
            // Boxed, as are the media arms: long-lived and large, they
            // would otherwise make every request's task as large as they
            // are, copied on each spawn and each finish.
            let run = Box::pin(push::run(
                svc,
                session,
                send,
                recv,
                groups,
                inbox_after,
                shutdown,
            ));
            if let Err(e) = run.await {
                if matches!(e, quinn::WriteError::Stopped(c) if c == quinn::VarInt::from_u32(close::STALLED))
                {
                    warn!("push stream stalled; closing the connection");
                    conn.close(close::STALLED.into(), b"push stream not read");
                }
            }
        }
        Request::BeginUpload(u) => {
            Box::pin(media::upload(&svc, &blobs, &session, u, send, recv)).await
        }
        Request::Download { media, offset, len } => {
            Box::pin(media::download(
                &svc, &blobs, &session, media, offset, len, send,
            ))
            .await
        }
        other => {
            let deadline = svc.config().answer_write_timeout;
            // An answer that can be large is paid for before it is built.
            let mut lease = None;
            if let Some(n) = budget::reserve_for(&other, svc.config().max_frame) {
                match svc
                    .budgets
                    .reserve(Some(&session.answers), session.user().as_deref(), n)
                    .await
                {
                    Ok(l) => lease = Some(l),
                    Err(e) => {
                        debug!(error = %e.message, "answer budget used up");
                        let frame = proto::encode_frame(&Response::Error(e));
                        respond_within(&mut send, frame, deadline).await;
                        return;
                    }
                }
            }
            let resp = svc.handle(&session, other).await;
            if let Response::Error(e) = &resp {
                debug!(code = ?e.code, error = %e.message, "request refused");
            }
            let frame = proto::encode_frame(&resp);
            drop(resp);
            if let Some(l) = lease.as_mut() {
                l.shrink(frame.len());
            }
            respond_within(&mut send, frame, deadline).await;
            drop(lease);
        }
    }
}
