//! TLS identity of the delivery service and the QUIC endpoint configuration.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Context as _, StartError};

type Result<T, E = StartError> = std::result::Result<T, E>;
use huddle_core::proto::ALPN;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};

use crate::config::ServerConfig;

/// File name of the self-signed certificate in the data dir.
pub const CERT_FILE: &str = "cert.pem";
/// File name of its private key in the data dir.
pub const KEY_FILE: &str = "key.pem";

/// The certificate chain and key the server presents.
#[derive(Debug)]
pub struct Identity {
    /// Chain, end-entity first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// SHA-256 fingerprint of the end-entity certificate.
    pub fn fingerprint(&self) -> String {
        huddle_core::auth::cert_fingerprint(&self.chain[0])
    }
}

/// Loads the configured certificate, or the self-signed one in the data dir,
/// creating it on first start.
pub fn load_identity(config: &ServerConfig) -> Result<Identity> {
    let (cert_path, key_path) = match &config.cert {
        Some((c, k)) => (c.clone(), k.clone()),
        None => {
            let c = config.data_dir.join(CERT_FILE);
            let k = config.data_dir.join(KEY_FILE);
            if !c.exists() || !k.exists() {
                create_self_signed(&c, &k)?;
            }
            (c, k)
        }
    };
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading certificate {}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificate {}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(StartError::msg(format!(
            "no certificate found in {}",
            cert_path.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading private key {}", key_path.display()))?;
    Ok(Identity { chain, key })
}

fn create_self_signed(cert_path: &Path, key_path: &Path) -> Result<()> {
    let names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let certified = rcgen::generate_simple_self_signed(names).context("generating certificate")?;
    write_private(key_path, certified.signing_key.serialize_pem().as_bytes())?;
    write_atomically(cert_path, certified.cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    write_atomically(path, data, 0o600)
}

/// Writes a file by writing a temporary file beside it, syncing it and
/// renaming it over the target, so a crash leaves either nothing or the
/// whole file.
pub fn write_atomically(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    huddle_io::write_atomically(path, data, mode)
        .with_context(|| format!("writing {}", path.display()))
}

/// File name of the stateless-reset key in the data dir.
pub const RESET_KEY_FILE: &str = "reset.key";

/// The key that derives QUIC stateless-reset tokens, kept in the data dir so
/// that a restarted server can tell clients of the previous process at once
/// that their connection is gone (instead of letting them wait for the idle
/// timeout).
pub fn reset_key(data_dir: &Path) -> Result<ring::hmac::Key> {
    let path = data_dir.join(RESET_KEY_FILE);
    let secret = match fs::read(&path) {
        Ok(b) if b.len() == 32 => b,
        _ => {
            let mut b = vec![0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
                .map_err(|_| StartError::msg("no randomness for the reset key"))?;
            write_private(&path, &b)?;
            b
        }
    };
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret))
}

/// The quinn server configuration: TLS 1.3 only, ALPN `huddle/1`, and the
/// transport limits of `config`.
pub fn quinn_config(config: &ServerConfig, identity: Identity) -> Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("configuring TLS 1.3")?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .context("certificate and key do not match")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).context("configuring QUIC")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport(config)?));
    Ok(server)
}

/// What QUIC buffers for one stream the DS receives, at most: data the
/// client may send before the DS has read it.
pub(crate) const STREAM_RECEIVE_WINDOW: u32 = 8 << 20;

/// What QUIC holds of one connection's sent data until acknowledged, at
/// most.
pub(crate) const SEND_WINDOW: u32 = 4 << 20;

/// Transport parameters. Receive windows are sized for bulk media uploads on
/// fast links; the stream limit bounds the work one client can queue.
fn transport(config: &ServerConfig) -> Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        config.idle_timeout.try_into().context("idle_timeout")?,
    ));
    t.max_concurrent_bidi_streams(config.max_streams_per_connection.into());
    t.max_concurrent_uni_streams(0u8.into());
    t.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    t.receive_window((16u32 * 1024 * 1024).into());
    // Bounds what one connection can hold queued in the DS: a push stream
    // its client stopped reading (plus the 8 MiB the client accepts), or a
    // download in flight. 4 MiB covers 40 MB/s at 100 ms of round trip;
    // with 8 MiB, two concurrent 1 GiB downloads took the DS to 64.7 MiB.
    t.send_window(SEND_WINDOW as u64);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(huddle_core::proto::MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Ok(t)
}
