//! Encrypted media items, format version 1.
//!
//! A media item (a photo, a video, any file) is encrypted once by its sender
//! into a single *blob* that the delivery service stores and serves without
//! being able to read it. The blob is
//!
//! ```text
//! header (82 bytes) || chunk_0 || chunk_1 || ... || chunk_last
//! ```
//!
//! where each chunk is one fixed-size slice of the plaintext sealed with
//! AES-256-GCM (`ciphertext || 16-byte tag`). The construction is the
//! STREAM online AEAD: the nonce of each chunk is a per-item prefix, the
//! chunk index and a final-chunk flag, and the encoded header is the
//! associated data of every chunk. Truncating, dropping, reordering or
//! duplicating chunks, or mixing chunks of different items or groups, makes
//! opening fail. `docs/MEDIA.md` is the full specification.
//!
//! # Keys
//!
//! Each item has its own random 32-byte [`ItemKey`] and random 32-byte salt,
//! both chosen by the sender (this crate does no I/O and has no random
//! source, so they come in as arguments). The sender hands the key to the
//! group inside an MLS application message together with the media id and
//! the BLAKE3 hash of the blob. The working AES key and nonce prefix are
//! derived from key and salt with HKDF-SHA256.
//!
//! # Pieces
//!
//! - [`Header`]: the fixed-size header at the start of every blob.
//! - [`Layout`]: pure arithmetic on chunk sizes and offsets: blob length,
//!   chunk count, where chunk `i` lies, which chunks a plaintext byte range
//!   needs, where to resume an interrupted transfer.
//! - [`Sealer`] and [`Opener`]: seal and open one chunk at a time, in place,
//!   so a multi-GiB file streams through one reusable buffer.
//! - [`seal_blob`] and [`open_blob`]: whole-item helpers for small items.
//!
//! # Hash
//!
//! The item's hash is BLAKE3 over the whole blob, header included. The
//! delivery service checks it on upload without any key; receivers check it
//! against the hash in the sender's MLS message. Compute it with
//! [`blake3::Hasher`], feeding the blob bytes as they are written or read.

mod aead;
mod header;
mod layout;
mod stream;

#[cfg(test)]
mod tests;

use std::fmt;

use thiserror::Error;

pub use header::Header;
pub use layout::{BlobPosition, ChunkSpan, Layout};
pub use stream::{open_blob, seal_blob, Opener, Sealer};

/// First four bytes of every blob.
pub const MAGIC: [u8; 4] = *b"HDLM";

/// The format version this code reads and writes.
pub const VERSION: u8 = 1;

/// Bytes in an encoded [`Header`].
pub const HEADER_LEN: usize = 82;

/// Bytes of authentication tag after each chunk's ciphertext.
pub const TAG_LEN: usize = aead::TAG_LEN;

/// Bytes in an [`ItemKey`].
pub const KEY_LEN: usize = aead::KEY_LEN;

/// Bytes in the per-item salt.
pub const SALT_LEN: usize = 32;

/// Smallest allowed plaintext chunk size (64 KiB).
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;

/// Largest allowed plaintext chunk size (1 MiB).
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024;

/// Plaintext chunk size senders use unless they have a reason not to
/// (256 KiB). `docs/MEDIA.md` explains the choice.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;

/// Largest allowed item: 2^40 bytes (1 TiB) of plaintext.
pub const MAX_TOTAL_LEN: u64 = 1 << 40;

/// The random secret of one media item.
///
/// Contract: generate a fresh one from a cryptographic random source for
/// every item, never reuse it for another item, and share it only through
/// the group's MLS channel. It is never printed: `Debug` shows a
/// placeholder.
#[derive(Clone)]
pub struct ItemKey([u8; KEY_LEN]);

impl ItemKey {
    /// Wraps 32 random bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw bytes, to send to the group inside an MLS message.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for ItemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ItemKey(<hidden>)")
    }
}

/// Why a header, a chunk or a blob was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MediaError {
    /// [`Header::decode`] was given fewer than [`HEADER_LEN`] bytes and
    /// nothing in them is wrong so far. Not a fault of the data: read more
    /// bytes and decode again.
    #[error("incomplete media header: {needed} more bytes needed")]
    Incomplete {
        /// How many more bytes are needed.
        needed: usize,
    },
    /// The bytes are not a media header of this format.
    #[error("not a Huddle media header: {0}")]
    BadHeader(HeaderFault),
    /// The header is of a format version this build cannot read. Upgrade
    /// the client.
    #[error("unsupported media format version {0}; this build reads version 1")]
    UnsupportedVersion(u8),
    /// The chunk size is outside 64 KiB..=1 MiB or not a multiple of 16.
    #[error("invalid chunk size {0}: must be a multiple of 16 between 65536 and 1048576 bytes")]
    InvalidChunkSize(u32),
    /// The item is larger than [`MAX_TOTAL_LEN`] (or than this platform
    /// can address). Split it or do not share it as one item.
    #[error("media item of {total_len} bytes is larger than the limit of 2^40 bytes")]
    TooLarge {
        /// The announced plaintext length.
        total_len: u64,
    },
    /// A chunk index at or past the item's chunk count.
    #[error("chunk {index} does not exist: the item has {chunks} chunks")]
    NoSuchChunk {
        /// The index asked for.
        index: u32,
        /// The item's chunk count.
        chunks: u32,
    },
    /// A chunk buffer of the wrong size: plaintext when sealing, sealed
    /// bytes (ciphertext and tag) when opening. When opening, this usually
    /// means the download was cut short.
    #[error("chunk {index} has {actual} bytes, expected {expected}")]
    ChunkLength {
        /// The chunk.
        index: u32,
        /// The size the layout requires.
        expected: usize,
        /// The size given.
        actual: usize,
    },
    /// The sender's idea of which chunk is the final one disagrees with the
    /// header: the source changed length while being read. Start over with
    /// a new key and salt.
    #[error("chunk {index} was sealed with last = {last}, but the final chunk is {final_index}")]
    LastFlag {
        /// The chunk.
        index: u32,
        /// The flag given.
        last: bool,
        /// Index of the item's final chunk.
        final_index: u32,
    },
    /// A chunk did not authenticate: wrong key, modified bytes, or a chunk
    /// that belongs elsewhere (another position, item or group). The item
    /// cannot be trusted; fetch it again or discard it.
    #[error("chunk {chunk} failed authentication (wrong key, or modified, moved or foreign data)")]
    Integrity {
        /// The first chunk that failed.
        chunk: u32,
    },
    /// The blob is shorter than its header says. Resume the download.
    #[error("media blob is truncated: {actual} bytes, expected {expected}")]
    Truncated {
        /// Bytes expected (at least [`HEADER_LEN`] when even the header is
        /// incomplete).
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The blob is longer than its header says.
    #[error("media blob has {actual} bytes, more than the {expected} its header announces")]
    TrailingData {
        /// Bytes expected.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The plaintext passed to [`seal_blob`] is not the length the header
    /// announces.
    #[error("plaintext has {actual} bytes, but the header announces {expected}")]
    PlaintextLength {
        /// Length in the header.
        expected: u64,
        /// Length given.
        actual: u64,
    },
    /// A plaintext byte range that is empty or reaches past the end of the
    /// item.
    #[error("plaintext range {start}..{end} is empty or outside the item's {total_len} bytes")]
    BadRange {
        /// First byte wanted.
        start: u64,
        /// One past the last byte wanted.
        end: u64,
        /// The item's plaintext length.
        total_len: u64,
    },
}

impl MediaError {
    /// True when more input could make [`Header::decode`] succeed.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, MediaError::Incomplete { .. })
    }
}

/// What is wrong with a header, beyond version and limits.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum HeaderFault {
    /// The first four bytes are not `HDLM`.
    #[error("bad magic (expected \"HDLM\")")]
    Magic,
    /// The reserved byte is not zero.
    #[error("reserved byte is {0:#04x}, must be 0")]
    Reserved(u8),
}
