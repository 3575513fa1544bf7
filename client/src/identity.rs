//! The device's identity: one Ed25519 key, used both to authenticate to the
//! delivery service and as the MLS signature key.

use std::fmt;

use ed25519_dalek::{Signer as _, SigningKey};
use huddle_core::auth::{proof_message, Purpose, EXPORTER_LEN};
use openmls::prelude::{CredentialWithKey, SignatureScheme};
use openmls_traits::signatures::{Signer, SignerError};

/// A device's signing key. Never printed.
pub struct Identity {
    /// The principal the key is registered under: the user name for the
    /// user's first device, `USER/N` for its N-th.
    pub name: String,
    key: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("public", &hex::encode(self.public()))
            .finish()
    }
}

impl Identity {
    /// A fresh random identity.
    pub fn generate(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// Restores an identity from its 32-byte secret seed.
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Self {
        Self {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The secret seed (for saving to the key file only).
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The MLS credential and signature key of this identity.
    pub fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: huddle_core::mls::credential_for(&self.name),
            signature_key: self.public().to_vec().into(),
        }
    }

    /// The signing key (for device-log entries).
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// An Ed25519 signature over `message`.
    pub fn sign_raw(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).to_bytes().to_vec()
    }

    /// A connection proof (see [`huddle_core::auth`]).
    pub fn proof(
        &self,
        purpose: Purpose,
        nonce: &[u8; 32],
        exporter: &[u8; EXPORTER_LEN],
    ) -> Vec<u8> {
        self.key
            .sign(&proof_message(purpose, &self.name, nonce, exporter))
            .to_bytes()
            .to_vec()
    }
}

impl Signer for Identity {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.key.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}
