//! Connection authentication proofs.
//!
//! A client proves it holds the identity key of a user by signing, with
//! Ed25519, a message that binds together: a purpose, the user name, a
//! server nonce, and 32 bytes of TLS exporter keying material of the current
//! connection (label [`crate::proto::EXPORTER_LABEL`], empty context). The
//! exporter value differs on every TLS connection and is known only to its
//! two ends, so a proof captured on one connection is worthless on another.

use ed25519_dalek::{Signature, VerifyingKey};
use thiserror::Error;

/// Bytes of exporter keying material bound into a proof.
pub const EXPORTER_LEN: usize = 32;

/// What a proof is for; part of the signed message so a proof for one
/// purpose cannot be used for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Claiming a name for a key.
    Register = 1,
    /// Logging in with a registered name.
    Authenticate = 2,
    /// Asking to link a new device to a user (the name is the user's).
    Link = 3,
}

/// Why a proof was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// The key bytes are not a valid Ed25519 public key.
    #[error("identity key is not a valid Ed25519 public key")]
    BadKey,
    /// The proof is not 64 bytes.
    #[error("proof has {0} bytes, expected 64")]
    BadLength(usize),
    /// The signature does not verify.
    #[error("proof signature does not verify")]
    BadSignature,
}

/// The exact bytes a client signs.
pub fn proof_message(
    purpose: Purpose,
    name: &str,
    nonce: &[u8; 32],
    exporter: &[u8; EXPORTER_LEN],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + name.len() + 64);
    m.extend_from_slice(b"huddle/1 connection proof\0");
    m.push(purpose as u8);
    // Names (principals) are at most 75 bytes (checked before signing or
    // verifying), so one length byte is enough and makes the encoding
    // unambiguous.
    m.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    m.extend_from_slice(name.as_bytes());
    m.extend_from_slice(nonce);
    m.extend_from_slice(exporter);
    m
}

/// Verifies a proof made with [`proof_message`].
pub fn verify_proof(
    identity_key: &[u8; 32],
    purpose: Purpose,
    name: &str,
    nonce: &[u8; 32],
    exporter: &[u8; EXPORTER_LEN],
    proof: &[u8],
) -> Result<(), AuthError> {
    let key = VerifyingKey::from_bytes(identity_key).map_err(|_| AuthError::BadKey)?;
    let sig: [u8; 64] = proof
        .try_into()
        .map_err(|_| AuthError::BadLength(proof.len()))?;
    let sig = Signature::from_bytes(&sig);
    key.verify_strict(&proof_message(purpose, name, nonce, exporter), &sig)
        .map_err(|_| AuthError::BadSignature)
}

/// SHA-256 fingerprint of a DER certificate as colon-separated hex.
pub fn cert_fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A short, human-comparable fingerprint of an identity key ("safety number"):
/// BLAKE3 of the key, first 20 bytes as five groups of eight hex digits.
pub fn key_fingerprint(identity_key: &[u8; 32]) -> String {
    let h = blake3::hash(identity_key);
    h.as_bytes()[..20]
        .chunks(4)
        .map(hex::encode)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn proof_binds_every_input() {
        let k = key(1);
        let pk = k.verifying_key().to_bytes();
        let nonce = [7; 32];
        let exp = [9; 32];
        let sig = k.sign(&proof_message(Purpose::Authenticate, "alice", &nonce, &exp));
        let sig = sig.to_bytes();
        let ok = verify_proof(&pk, Purpose::Authenticate, "alice", &nonce, &exp, &sig);
        assert_eq!(ok, Ok(()));
        // Another connection (exporter), nonce, name, purpose or key: refused.
        assert_eq!(
            verify_proof(&pk, Purpose::Authenticate, "alice", &nonce, &[8; 32], &sig),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify_proof(&pk, Purpose::Authenticate, "alice", &[6; 32], &exp, &sig),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify_proof(&pk, Purpose::Authenticate, "alicf", &nonce, &exp, &sig),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify_proof(&pk, Purpose::Register, "alice", &nonce, &exp, &sig),
            Err(AuthError::BadSignature)
        );
        let other = key(2).verifying_key().to_bytes();
        assert_eq!(
            verify_proof(&other, Purpose::Authenticate, "alice", &nonce, &exp, &sig),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify_proof(
                &pk,
                Purpose::Authenticate,
                "alice",
                &nonce,
                &exp,
                &sig[..63]
            ),
            Err(AuthError::BadLength(63))
        );
    }

    #[test]
    fn fingerprints_have_fixed_shape() {
        let f = cert_fingerprint(b"cert");
        assert_eq!(f.len(), 32 * 3 - 1);
        assert_eq!(key_fingerprint(&[0; 32]).split(' ').count(), 5);
    }
}
