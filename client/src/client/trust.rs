//! Re-pinning the server's certificate (`huddle server trust`): the way out
//! when the DS's certificate changed, without losing the home.

use super::Client;
use crate::error::Result;
use crate::net::Trust;

/// The certificate this home pins and the one the server presents now.
#[derive(Debug, Clone)]
pub struct Presented {
    /// Pinned end-entity certificate (DER), if any.
    pub pinned: Option<Vec<u8>>,
    /// What the server presented on a connection made without checking it.
    pub presented: Vec<u8>,
}

impl Presented {
    /// Whether the server presents the pinned certificate.
    pub fn matches(&self) -> bool {
        self.pinned.as_deref() == Some(self.presented.as_slice())
    }
}

impl Client {
    /// Connects to the server without checking its certificate (nothing
    /// is sent but the TLS handshake) and reports what it presents beside
    /// what this home pinned.
    pub async fn presented_certificate(&self) -> Result<Presented> {
        let pinned = self.home.pinned_certs()?.and_then(|c| c.into_iter().next());
        let (net, _) = super::connect_any(
            None,
            &super::server_list(&self.settings.server),
            self.current,
            &Trust::FirstUse,
        )
        .await?;
        let presented = net.server_cert.clone();
        net.close().await;
        Ok(Presented { pinned, presented })
    }

    /// Pins `der` as the server's certificate from now on.
    pub fn pin_certificate(&mut self, der: &[u8]) -> Result<()> {
        self.net = None;
        self.home.pin_cert(der)
    }
}
