//! The one place the media format touches an AEAD.
//!
//! Everything above this module sees "seal these bytes in place under this
//! nonce and associated data" and "open them or fail". Swapping the AEAD
//! (or its implementation) means changing this file and bumping the format
//! version in the header.
//!
//! The algorithm is AES-256-GCM from `ring`, used through `LessSafeKey`: the
//! caller is responsible for never sealing two different plaintexts under
//! the same key and nonce. The media format guarantees that by deriving a
//! fresh key per item and putting the chunk index and final-chunk flag in the
//! nonce (see `super::stream`).

use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};

/// Bytes in a key.
pub(crate) const KEY_LEN: usize = 32;
/// Bytes in a nonce.
pub(crate) const NONCE_LEN: usize = 12;
/// Bytes in an authentication tag, appended to every sealed chunk.
pub(crate) const TAG_LEN: usize = 16;

/// The chunk did not authenticate: wrong key, nonce, associated data, or
/// modified bytes. Deliberately carries no detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpenFailed;

/// An AES-256-GCM key ready to seal and open chunks.
///
/// Contract: callers pass every nonce at most once per plaintext; sealing
/// two different plaintexts under the same `(key, nonce)` breaks both
/// confidentiality and integrity of GCM.
pub(crate) struct ChunkAead {
    key: LessSafeKey,
}

impl ChunkAead {
    /// Builds the key from 32 raw bytes.
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Self {
        // `UnboundKey::new` only fails on a key of the wrong length, and the
        // type guarantees 32 bytes.
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("AES-256-GCM takes a 32-byte key");
        Self {
            key: LessSafeKey::new(unbound),
        }
    }

    /// Encrypts `buf` in place and appends the tag, so on return `buf` is
    /// `ciphertext || tag`. Reallocates only if `buf` has less than
    /// [`TAG_LEN`] bytes of spare capacity.
    pub(crate) fn seal_in_place(&self, nonce: [u8; NONCE_LEN], aad: &[u8], buf: &mut Vec<u8>) {
        // GCM refuses inputs above ~64 GiB; media chunks are at most 1 MiB,
        // which the callers check before getting here.
        let tag: Tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                buf.as_mut_slice(),
            )
            .expect("AES-GCM seals any input of at most 1 MiB");
        buf.extend_from_slice(tag.as_ref());
    }

    /// Encrypts the first `buf.len() - TAG_LEN` bytes of `buf` in place and
    /// writes the tag into its last [`TAG_LEN`] bytes.
    pub(crate) fn seal_in_slice(&self, nonce: [u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) {
        let (plain, tag_out) = buf.split_at_mut(buf.len() - TAG_LEN);
        let tag: Tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), plain)
            .expect("AES-GCM seals any input of at most 1 MiB");
        tag_out.copy_from_slice(tag.as_ref());
    }

    /// Authenticates and decrypts `buf` (`ciphertext || tag`) in place; on
    /// success `buf` is the plaintext. On failure `buf` is cleared, so no
    /// unauthenticated plaintext is ever left behind.
    pub(crate) fn open_in_place(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), OpenFailed> {
        match self.open_in_slice(nonce, aad, buf) {
            Ok(plain_len) => {
                buf.truncate(plain_len);
                Ok(())
            }
            Err(e) => {
                buf.clear();
                Err(e)
            }
        }
    }

    /// Authenticates and decrypts `buf` (`ciphertext || tag`) in place;
    /// on success the plaintext is its first bytes, as many as returned.
    /// On failure `buf` is zeroed, so no unauthenticated plaintext is left.
    pub(crate) fn open_in_slice(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, OpenFailed> {
        let Some(plain_len) = buf.len().checked_sub(TAG_LEN) else {
            buf.fill(0);
            return Err(OpenFailed);
        };
        match self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
        {
            Ok(_) => Ok(plain_len),
            Err(_) => {
                buf.fill(0);
                Err(OpenFailed)
            }
        }
    }
}

impl fmt::Debug for ChunkAead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkAead(AES-256-GCM, key hidden)")
    }
}
