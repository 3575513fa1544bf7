//! The fixed-size header at the start of every blob.

use super::layout::Layout;
use super::{HeaderFault, MediaError, HEADER_LEN, MAGIC, SALT_LEN, VERSION};
use crate::ids::{GroupId, MediaId};

/// The header of a media blob: format version, layout, identity and salt of
/// the item.
///
/// Encoded, it is the first [`HEADER_LEN`] (82) bytes of the blob, so the
/// blob's BLAKE3 hash covers it, and it is the associated data of every
/// chunk, so no chunk opens under a header that differs in any bit.
///
/// ```text
/// offset size field
///      0    4 magic "HDLM"
///      4    1 format version = 1
///      5    1 reserved = 0
///      6    4 plaintext chunk size, u32 big-endian
///     10    8 total plaintext length, u64 big-endian
///     18   16 media id
///     34   16 group id
///     50   32 salt
/// ```
///
/// A `Header` value is always valid (its [`Layout`] is within the format's
/// limits); [`Header::new`] and [`Header::decode`] are the only ways to get
/// one. The salt is not secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    layout: Layout,
    media: MediaId,
    group: GroupId,
    salt: [u8; SALT_LEN],
}

impl Header {
    /// A header for a new item. `salt` must be fresh random bytes, like the
    /// item key. Fails when `chunk_size` or `total_len` is outside the
    /// format's limits.
    pub fn new(
        media: MediaId,
        group: GroupId,
        salt: [u8; SALT_LEN],
        chunk_size: u32,
        total_len: u64,
    ) -> Result<Self, MediaError> {
        Ok(Self {
            layout: Layout::new(chunk_size, total_len)?,
            media,
            group,
            salt,
        })
    }

    /// The item's layout (chunk size, length and derived offsets).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Plaintext chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.layout.chunk_size()
    }

    /// Total plaintext length.
    pub fn total_len(&self) -> u64 {
        self.layout.total_len()
    }

    /// The media id the sender gave the item.
    pub fn media(&self) -> MediaId {
        self.media
    }

    /// The group the item was shared in.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The per-item HKDF salt.
    pub fn salt(&self) -> &[u8; SALT_LEN] {
        &self.salt
    }

    /// The 82 encoded bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = 0;
        out[6..10].copy_from_slice(&self.layout.chunk_size().to_be_bytes());
        out[10..18].copy_from_slice(&self.layout.total_len().to_be_bytes());
        out[18..34].copy_from_slice(self.media.as_bytes());
        out[34..50].copy_from_slice(self.group.as_bytes());
        out[50..82].copy_from_slice(&self.salt);
        out
    }

    /// Decodes the header at the start of `buf`; bytes after the first
    /// [`HEADER_LEN`] are ignored (pass the start of a blob as it arrives).
    ///
    /// Fields are checked as soon as they are present, so a short `buf`
    /// that is already wrong fails at once. Otherwise a short `buf` gives
    /// [`MediaError::Incomplete`] (read more and retry), and a full header
    /// that is wrong gives [`MediaError::BadHeader`],
    /// [`MediaError::UnsupportedVersion`], [`MediaError::InvalidChunkSize`]
    /// or [`MediaError::TooLarge`].
    pub fn decode(buf: &[u8]) -> Result<Self, MediaError> {
        let have = buf.len().min(MAGIC.len());
        if buf[..have] != MAGIC[..have] {
            return Err(MediaError::BadHeader(HeaderFault::Magic));
        }
        if let Some(&version) = buf.get(4) {
            if version != VERSION {
                return Err(MediaError::UnsupportedVersion(version));
            }
        }
        if let Some(&reserved) = buf.get(5) {
            if reserved != 0 {
                return Err(MediaError::BadHeader(HeaderFault::Reserved(reserved)));
            }
        }
        let Some(h) = buf.get(..HEADER_LEN) else {
            return Err(MediaError::Incomplete {
                needed: HEADER_LEN - buf.len(),
            });
        };
        let mut chunk_size = [0u8; 4];
        chunk_size.copy_from_slice(&h[6..10]);
        let mut total_len = [0u8; 8];
        total_len.copy_from_slice(&h[10..18]);
        let mut media = [0u8; 16];
        media.copy_from_slice(&h[18..34]);
        let mut group = [0u8; 16];
        group.copy_from_slice(&h[34..50]);
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&h[50..82]);
        Self::new(
            MediaId(media),
            GroupId(group),
            salt,
            u32::from_be_bytes(chunk_size),
            u64::from_be_bytes(total_len),
        )
    }
}
