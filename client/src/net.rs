//! The connection to the delivery service: QUIC with a pinned certificate,
//! one stream per request, and the authentication handshake.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use huddle_core::auth::{cert_fingerprint, Purpose};
use huddle_core::frame::{self, HEADER_LEN};
use huddle_core::proto::{self, Message, Request, Response, ALPN, EXPORTER_LABEL};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::error::{ClientError, Result};
use crate::identity::Identity;

/// The shortest wait for a connection's close to leave (see
/// [`Connection::close`]): enough for the endpoint's task to send it on a
/// busy machine.
pub const CLOSE_WAIT_MIN: Duration = Duration::from_millis(20);
/// The longest wait for a connection's close to leave.
pub const CLOSE_WAIT_MAX: Duration = Duration::from_millis(500);

/// Largest frame the client accepts from the server.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

pub use huddle_io::{udp_socket, SOCKET_BUFFER};

/// How long one request may take before the connection is considered lost.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a transfer may go without moving a byte before it is given up
/// (its progress is kept for a resume).
pub const TRANSFER_STALL: Duration = Duration::from_secs(60);

/// The client's transport settings: windows sized for bulk media, MTU
/// discovery, keep-alives.
pub fn transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(10)));
    transport.max_idle_timeout(Some(
        Duration::from_secs(60)
            .try_into()
            .expect("60 s is a valid idle timeout"),
    ));
    transport.stream_receive_window((8u32 * 1024 * 1024).into());
    transport.receive_window((16u32 * 1024 * 1024).into());
    transport.send_window(16 * 1024 * 1024);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(proto::MAX_UDP_PAYLOAD);
    transport.mtu_discovery_config(Some(mtu));
    transport
}

/// How long a connection attempt waits for the server to answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Completes when the host at `addr` says nothing listens on that port.
///
/// QUIC ignores ICMP errors, so a connection to a closed port would wait
/// for [`CONNECT_TIMEOUT`]. A connected UDP socket does hear them: one
/// byte (which no QUIC server takes for a packet) sent from one, and the
/// "port unreachable" comes back as `ECONNREFUSED`, at once on the same
/// machine. Never completes otherwise: silence is left to the timeout.
async fn refused(addr: SocketAddr) {
    let probe = async {
        let any: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let sock = tokio::net::UdpSocket::bind(any).await.ok()?;
        sock.connect(addr).await.ok()?;
        sock.send(&[0]).await.ok()?;
        let mut buf = [0u8; 64];
        loop {
            match sock.recv(&mut buf).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Some(()),
                Err(_) => return None,
                Ok(_) => {}
            }
        }
    };
    if probe.await.is_none() {
        std::future::pending::<()>().await;
    }
}

/// How long a request waits before it starts checking, every as long
/// again, that its server still listens ([`gone`]).
pub const GONE_PROBE: Duration = Duration::from_secs(1);

/// Completes when nothing listens at `addr` any more: its server process
/// exited or was killed, on a host that says so ("port unreachable", at
/// once on the same machine or network). Starts after [`GONE_PROBE`] and
/// probes every [`GONE_PROBE`]; a host that says nothing (a machine that
/// is gone) is left to the request timeout and QUIC's idle timeout. This
/// is what lets a client move on to another server of the service in a
/// second or two rather than after those timeouts.
pub async fn gone(addr: SocketAddr) {
    loop {
        tokio::time::sleep(GONE_PROBE).await;
        if tokio::time::timeout(GONE_PROBE, refused(addr))
            .await
            .is_ok()
        {
            return;
        }
    }
}

/// How the server's certificate is checked.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Accept exactly these certificates (DER): the end-entity certificate
    /// must equal one of them, or chain to one of them as a root.
    Pinned(Vec<Vec<u8>>),
    /// Accept any certificate and remember it (trust on first use, for
    /// registration without `--server-cert`).
    FirstUse,
}

/// Verifies the server certificate against [`Trust`] and records what was
/// presented, so a mismatch can be reported with both fingerprints.
#[derive(Debug)]
struct Verifier {
    trust: Trust,
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    presented: Arc<Mutex<Option<Vec<u8>>>>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        *self.presented.lock().expect("presented lock") = Some(end_entity.to_vec());
        match &self.trust {
            Trust::FirstUse => Ok(ServerCertVerified::assertion()),
            Trust::Pinned(certs) => {
                if certs.iter().any(|c| c.as_slice() == end_entity.as_ref()) {
                    return Ok(ServerCertVerified::assertion());
                }
                match &self.webpki {
                    Some(v) => {
                        v.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                    }
                    None => Err(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::UnknownIssuer,
                    )),
                }
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An open connection to the delivery service.
#[derive(Debug)]
pub struct Connection {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    addr: String,
    /// The end-entity certificate the server presented (DER).
    pub server_cert: Vec<u8>,
}

async fn resolve(addr: &str) -> Result<SocketAddr> {
    let fail = |reason: String| ClientError::Connect {
        addr: addr.to_owned(),
        reason,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| {
            if addr
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            {
                fail("expected HOST:PORT, such as 127.0.0.1:4433".into())
            } else {
                fail(format!("cannot resolve: {e}"))
            }
        })?
        .next()
        .ok_or_else(|| fail("cannot resolve".into()))
}

impl Connection {
    /// Connects to `addr` ("host:port") from a new endpoint of its own and
    /// checks the server's certificate.
    pub async fn connect(addr: &str, trust: Trust) -> Result<Self> {
        Self::connect_on(None, addr, trust).await
    }

    /// Like [`Connection::connect`], from `endpoint` if given (one made by
    /// [`Connection::endpoint`] of an earlier connection to the same
    /// address family), so a process that reconnects keeps one socket and
    /// one receive buffer instead of making new ones each time.
    pub async fn connect_on(
        endpoint: Option<&quinn::Endpoint>,
        addr: &str,
        trust: Trust,
    ) -> Result<Self> {
        Self::connect_with(endpoint, addr, trust, transport()).await
    }

    /// Like [`Connection::connect_on`] with the given transport settings
    /// (tests use it to play clients that behave unlike this one).
    pub async fn connect_with(
        endpoint: Option<&quinn::Endpoint>,
        addr: &str,
        trust: Trust,
        transport: quinn::TransportConfig,
    ) -> Result<Self> {
        let fail = |reason: String| ClientError::Connect {
            addr: addr.to_owned(),
            reason,
        };
        let sock = resolve(addr).await?;
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| fail(format!("{host} is not a valid server name")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = match &trust {
            Trust::Pinned(certs) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs {
                    let _ = roots.add(CertificateDer::from(c.clone()));
                }
                if roots.is_empty() {
                    None
                } else {
                    rustls::client::WebPkiServerVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider.clone(),
                    )
                    .build()
                    .ok()
                }
            }
            Trust::FirstUse => None,
        };
        let presented = Arc::new(Mutex::new(None));
        let verifier = Arc::new(Verifier {
            trust: trust.clone(),
            webpki,
            provider: provider.clone(),
            presented: presented.clone(),
        });
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| fail(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| fail(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        let endpoint = match endpoint {
            Some(e) if e.local_addr().is_ok_and(|a| a.is_ipv6() == sock.is_ipv6()) => e.clone(),
            _ => {
                let bind: SocketAddr = if sock.is_ipv6() {
                    "[::]:0".parse().expect("valid address")
                } else {
                    "0.0.0.0:0".parse().expect("valid address")
                };
                let socket =
                    udp_socket(bind).map_err(|e| fail(format!("cannot open a socket: {e}")))?;
                let mut endpoint_config = quinn::EndpointConfig::default();
                endpoint_config
                    .max_udp_payload_size(proto::MAX_UDP_PAYLOAD)
                    .expect("within quinn's bounds");
                quinn::Endpoint::new(endpoint_config, None, socket, Arc::new(quinn::TokioRuntime))
                    .map_err(|e| fail(format!("cannot open a socket: {e}")))?
            }
        };
        // The configuration is per connection: its verifier records what
        // this server presented.
        let connecting = endpoint
            .connect_with(config, sock, host)
            .map_err(|e| fail(e.to_string()))?;
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, connecting);
        let answered = tokio::select! {
            a = attempt => a,
            () = refused(sock) => {
                return Err(fail(
                    "connection refused: nothing is listening there (is the server running?)".into(),
                ))
            }
        };
        let conn = match answered {
            Err(_) => {
                return Err(fail(format!(
                    "no answer within {} s (is the server running?)",
                    CONNECT_TIMEOUT.as_secs()
                )))
            }
            Ok(Err(e)) => {
                let got = presented.lock().expect("presented lock").clone();
                if let (Trust::Pinned(pins), Some(got)) = (&trust, got) {
                    if !pins.contains(&got) {
                        return Err(ClientError::CertificateMismatch {
                            pinned: cert_fingerprint(&pins[0]),
                            presented: cert_fingerprint(&got),
                        });
                    }
                }
                return Err(fail(e.to_string()));
            }
            Ok(Ok(c)) => c,
        };
        let server_cert = presented
            .lock()
            .expect("presented lock")
            .clone()
            .unwrap_or_default();
        let _ = server_name;
        Ok(Self {
            conn,
            endpoint,
            addr: addr.to_owned(),
            server_cert,
        })
    }

    /// The server address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The endpoint this connection runs on, for [`Connection::connect_on`].
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// The underlying QUIC connection.
    pub fn quic(&self) -> &quinn::Connection {
        &self.conn
    }

    fn lost(&self, e: impl std::fmt::Display) -> ClientError {
        // Prefer the server's own words when it closed the connection.
        let reason = match self.conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) if !c.reason.is_empty() => {
                format!(
                    "the server closed the connection: {}",
                    String::from_utf8_lossy(&c.reason)
                )
            }
            _ => e.to_string(),
        };
        ClientError::Connect {
            addr: self.addr.clone(),
            reason,
        }
    }

    /// Sends one request on a new stream and reads its response. A server
    /// refusal becomes [`ClientError::Server`]. Gives up after
    /// [`REQUEST_TIMEOUT`].
    pub async fn request(&self, req: &Request) -> Result<Response> {
        tokio::select! {
            r = tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(req)) => match r {
                Ok(r) => r,
                Err(_) => Err(self.lost(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))),
            },
            () = gone(self.conn.remote_address()) => Err(self.went_away()),
        }
    }

    /// The error of a server found gone ([`gone`]); the connection is
    /// closed, so the next request connects anew.
    pub fn went_away(&self) -> ClientError {
        self.conn.close(0u32.into(), b"the server went away");
        ClientError::Connect {
            addr: self.addr.clone(),
            reason: "the server went away: nothing listens at its address any more".into(),
        }
    }

    async fn request_inner(&self, req: &Request) -> Result<Response> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| self.lost(e))?;
        send.write_all(&proto::encode_frame(req))
            .await
            .map_err(|e| self.lost(e))?;
        let _ = send.finish();
        let resp: Response = read_message(&mut recv).await.map_err(|e| match e {
            ClientError::Protocol(m) => ClientError::Protocol(m),
            other => self.lost(other),
        })?;
        match resp {
            Response::Error(e) => Err(ClientError::Server(e)),
            r => Ok(r),
        }
    }

    /// Opens a stream for a request whose answer is followed by more data
    /// (subscriptions, media).
    /// Gives up after [`REQUEST_TIMEOUT`] without the first answer; what
    /// follows it is the caller's to bound.
    pub async fn open(
        &self,
        req: &Request,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, Response)> {
        let opened = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| self.lost(e))?;
            send.write_all(&proto::encode_frame(req))
                .await
                .map_err(|e| self.lost(e))?;
            let resp: Response = read_message(&mut recv).await?;
            Ok::<_, ClientError>((send, recv, resp))
        };
        let (send, recv, resp) = tokio::select! {
            r = tokio::time::timeout(REQUEST_TIMEOUT, opened) => r.map_err(|_| {
                self.lost(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))
            })??,
            () = gone(self.conn.remote_address()) => return Err(self.went_away()),
        };
        match resp {
            Response::Error(e) => Err(ClientError::Server(e)),
            r => Ok((send, recv, r)),
        }
    }

    /// Authenticates the connection as `identity` (registering the name
    /// first when `register` is true).
    pub async fn authenticate(&self, identity: &Identity, register: bool) -> Result<()> {
        let Response::Challenge { nonce } = self.request(&Request::Challenge).await? else {
            return Err(ClientError::Protocol("expected a Challenge".into()));
        };
        let mut exporter = [0u8; 32];
        self.conn
            .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
            .map_err(|_| ClientError::Protocol("TLS exporter unavailable".into()))?;
        let req = if register {
            Request::Register {
                name: identity.name.clone(),
                identity_key: identity.public(),
                proof: identity.proof(Purpose::Register, &nonce, &exporter).into(),
            }
        } else {
            Request::Authenticate {
                name: identity.name.clone(),
                proof: identity
                    .proof(Purpose::Authenticate, &nonce, &exporter)
                    .into(),
            }
        };
        match self.request(&req).await? {
            Response::Authenticated { .. } => Ok(()),
            other => Err(ClientError::Protocol(format!(
                "expected Authenticated, got {other:?}"
            ))),
        }
    }

    /// Closes the connection politely and waits briefly for the close to
    /// reach the server: three round trips, at least [`CLOSE_WAIT_MIN`] and
    /// at most [`CLOSE_WAIT_MAX`]. Waiting out quinn's whole closing period
    /// (three probe timeouts, each with the peer's 25 ms ack delay) kept
    /// every command 80 ms longer on loopback; it only answers packets the
    /// server sent before the close reached it, which end at a closed port
    /// once the process has exited.
    pub async fn close(self) {
        let wait = (self.conn.rtt() * 3).clamp(CLOSE_WAIT_MIN, CLOSE_WAIT_MAX);
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(wait, self.endpoint.wait_idle()).await;
    }
}

/// Reads one frame from a stream and decodes it.
pub async fn read_message<M: Message>(recv: &mut quinn::RecvStream) -> Result<M> {
    let body = read_frame(recv).await?;
    proto::decode(&body).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Reads one frame body, checking the length first.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Bytes> {
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| ClientError::Io(format!("stream ended: {e}")))?;
    let len =
        frame::body_len(header, MAX_FRAME).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| ClientError::Io(format!("stream ended: {e}")))?;
    Ok(Bytes::from(body))
}
