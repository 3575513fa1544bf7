//! Key derivation and the STREAM construction: sealing and opening chunks.

use std::fmt;

use ring::hkdf;

use super::aead::{ChunkAead, KEY_LEN, NONCE_LEN};
use super::header::Header;
use super::{ItemKey, MediaError, HEADER_LEN};

/// HKDF info for the AES-256-GCM key of the chunks.
const CHUNK_KEY_INFO: &[u8] = b"huddle/1 media chunk key";
/// HKDF info for the nonce prefix.
const NONCE_PREFIX_INFO: &[u8] = b"huddle/1 media nonce prefix";
/// Bytes of nonce prefix; the rest of the nonce is the chunk index (4) and
/// the final-chunk flag (1).
const NONCE_PREFIX_LEN: usize = 7;

/// An HKDF output length.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(prk: &hkdf::Prk, info: &[u8], out: &mut [u8]) {
    // `expand` only fails above 255 * 32 bytes and `fill` only on a length
    // other than the one asked for; neither can happen here.
    prk.expand(&[info], Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF-SHA256 expands to 7 or 32 bytes");
}

/// The nonce of chunk `index`: prefix (7) || index u32 BE (4) || last (1).
fn chunk_nonce(prefix: &[u8; NONCE_PREFIX_LEN], index: u32, last: bool) -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[..NONCE_PREFIX_LEN].copy_from_slice(prefix);
    nonce[NONCE_PREFIX_LEN..NONCE_PREFIX_LEN + 4].copy_from_slice(&index.to_be_bytes());
    nonce[NONCE_LEN - 1] = u8::from(last);
    nonce
}

/// Working state shared by [`Sealer`] and [`Opener`].
struct ItemCipher {
    header: Header,
    aad: [u8; HEADER_LEN],
    aead: ChunkAead,
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
}

impl ItemCipher {
    fn new(key: &ItemKey, header: Header) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, header.salt()).extract(key.as_bytes());
        let mut chunk_key = [0u8; KEY_LEN];
        expand(&prk, CHUNK_KEY_INFO, &mut chunk_key);
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        expand(&prk, NONCE_PREFIX_INFO, &mut nonce_prefix);
        let aead = ChunkAead::new(&chunk_key);
        chunk_key.fill(0);
        Self {
            aad: header.encode(),
            header,
            aead,
            nonce_prefix,
        }
    }

    fn nonce(&self, index: u32, last: bool) -> [u8; NONCE_LEN] {
        chunk_nonce(&self.nonce_prefix, index, last)
    }

    fn fmt_as(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(name)
            .field("media", &self.header.media())
            .field("group", &self.header.group())
            .field("chunk_size", &self.header.chunk_size())
            .field("total_len", &self.header.total_len())
            .field("key", &"<hidden>")
            .finish()
    }
}

/// Seals the chunks of one item.
///
/// Calling contract:
///
/// - Build it from a fresh random [`ItemKey`] and a [`Header`] with a fresh
///   random salt. Write [`Header::encode`] as the first bytes of the blob,
///   then each sealed chunk in index order.
/// - Chunk `i` is plaintext bytes `i * chunk_size ..` of the item: exactly
///   `chunk_size` bytes for every chunk but the final one, which holds the
///   rest ([`crate::media::Layout::plaintext_len`]); pass `last = true` for
///   the final chunk and only for it.
/// - Sealing is deterministic, so chunk `i` may be sealed again (to resume
///   an upload) **only from the same plaintext**. Never seal different
///   plaintext under the same key, salt and index: if the source changed,
///   start a new item with a new key and salt.
///
/// Chunks may be sealed in any order and from several threads (`&self`).
pub struct Sealer {
    inner: ItemCipher,
}

impl Sealer {
    /// Derives the working keys for `header`'s item from `key`.
    pub fn new(key: &ItemKey, header: Header) -> Self {
        Self {
            inner: ItemCipher::new(key, header),
        }
    }

    /// The item's header.
    pub fn header(&self) -> &Header {
        &self.inner.header
    }

    /// Seals chunk `index` in place: `buf` holds the chunk's plaintext on
    /// entry and `ciphertext || tag` (16 bytes longer) on success. Give
    /// `buf` a capacity of `chunk_size + TAG_LEN` and reuse it to avoid any
    /// allocation.
    ///
    /// Fails, leaving `buf` untouched, with [`MediaError::NoSuchChunk`] for
    /// an index past the end, [`MediaError::LastFlag`] when `last` is not
    /// exactly `index == final index`, and [`MediaError::ChunkLength`] when
    /// the plaintext is not the size the layout requires.
    pub fn seal_chunk_in_place(
        &self,
        index: u32,
        last: bool,
        buf: &mut Vec<u8>,
    ) -> Result<(), MediaError> {
        self.check(index, last, buf.len())?;
        self.inner
            .aead
            .seal_in_place(self.inner.nonce(index, last), &self.inner.aad, buf);
        Ok(())
    }

    /// [`Sealer::seal_chunk_in_place`] on a slice of exactly the sealed
    /// chunk's length: the plaintext in all but its last [`TAG_LEN`]
    /// bytes on entry, `ciphertext || tag` on success (so the caller
    /// chooses where the chunk lies, for example at an aligned address).
    ///
    /// Fails, leaving `buf` untouched, as [`Sealer::seal_chunk_in_place`]
    /// does; [`MediaError::ChunkLength`] names the plaintext lengths.
    ///
    /// [`TAG_LEN`]: super::TAG_LEN
    pub fn seal_chunk_in_slice(
        &self,
        index: u32,
        last: bool,
        buf: &mut [u8],
    ) -> Result<(), MediaError> {
        match buf.len().checked_sub(super::TAG_LEN) {
            Some(plain) => self.check(index, last, plain)?,
            None => {
                return Err(MediaError::ChunkLength {
                    index,
                    expected: self.inner.header.layout().plaintext_len(index)?,
                    actual: 0,
                })
            }
        }
        self.inner
            .aead
            .seal_in_slice(self.inner.nonce(index, last), &self.inner.aad, buf);
        Ok(())
    }

    /// Checks that chunk `index` exists, is final exactly when `last`, and
    /// holds `plain_len` bytes of plaintext.
    fn check(&self, index: u32, last: bool, plain_len: usize) -> Result<(), MediaError> {
        let layout = self.inner.header.layout();
        let expected = layout.plaintext_len(index)?;
        let final_index = layout.last_index();
        if last != (index == final_index) {
            return Err(MediaError::LastFlag {
                index,
                last,
                final_index,
            });
        }
        if plain_len != expected {
            return Err(MediaError::ChunkLength {
                index,
                expected,
                actual: plain_len,
            });
        }
        Ok(())
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt_as("Sealer", f)
    }
}

/// Opens the chunks of one item.
///
/// Calling contract:
///
/// - Build it from the item key received in the group's MLS message and
///   the [`Header`] decoded from the start of the blob. Check that
///   [`Header::media`] and [`Header::group`] are the ids the message named:
///   the key proves only that a holder of the key made the blob.
/// - Check the BLAKE3 hash of the whole blob against the hash in the MLS
///   message before treating the item as complete.
/// - Open chunk `i` from the `Layout::sealed_len(i)` bytes at
///   `Layout::chunk_offset(i)`. A chunk's plaintext may be used as soon as
///   it opens, but the item is whole only when all `chunk_count()` chunks
///   opened; a stream that ends earlier is truncated.
///
/// Chunks may be opened in any order (range reads) and from several threads.
pub struct Opener {
    inner: ItemCipher,
}

impl Opener {
    /// Derives the working keys for `header`'s item from `key`.
    pub fn new(key: &ItemKey, header: Header) -> Self {
        Self {
            inner: ItemCipher::new(key, header),
        }
    }

    /// The item's header.
    pub fn header(&self) -> &Header {
        &self.inner.header
    }

    /// Opens chunk `index` in place: `buf` holds the sealed chunk
    /// (`ciphertext || tag`) on entry and its plaintext on success.
    ///
    /// Fails with [`MediaError::NoSuchChunk`] or [`MediaError::ChunkLength`]
    /// (leaving `buf` untouched) when the index or size does not match the
    /// layout, and with [`MediaError::Integrity`] (clearing `buf`, so no
    /// unauthenticated plaintext remains) when the chunk does not
    /// authenticate.
    pub fn open_chunk_in_place(&self, index: u32, buf: &mut Vec<u8>) -> Result<(), MediaError> {
        let last = self.last_if_sized(index, buf.len())?;
        self.open_flagged(index, last, buf)
    }

    /// [`Opener::open_chunk_in_place`] on a slice (a sealed chunk where it
    /// already lies, such as a file's write buffer): returns the length of
    /// the plaintext, which starts the slice. On an integrity failure the
    /// slice is zeroed.
    pub fn open_chunk_in_slice(&self, index: u32, buf: &mut [u8]) -> Result<usize, MediaError> {
        let last = self.last_if_sized(index, buf.len())?;
        self.inner
            .aead
            .open_in_slice(self.inner.nonce(index, last), &self.inner.aad, buf)
            .map_err(|_| MediaError::Integrity { chunk: index })
    }

    /// Whether chunk `index` is the final one, once it is known to exist
    /// and to be `sealed_len` bytes long.
    fn last_if_sized(&self, index: u32, sealed_len: usize) -> Result<bool, MediaError> {
        let layout = self.inner.header.layout();
        let expected = layout.sealed_len(index)?;
        if sealed_len != expected {
            return Err(MediaError::ChunkLength {
                index,
                expected,
                actual: sealed_len,
            });
        }
        Ok(index == layout.last_index())
    }

    /// Opens with an explicit final-chunk flag, bypassing the layout checks.
    fn open_flagged(&self, index: u32, last: bool, buf: &mut Vec<u8>) -> Result<(), MediaError> {
        self.inner
            .aead
            .open_in_place(self.inner.nonce(index, last), &self.inner.aad, buf)
            .map_err(|_| MediaError::Integrity { chunk: index })
    }

    /// Test hook: open chunk `index` as if `last` were its final-chunk flag.
    #[cfg(test)]
    pub(crate) fn open_with_flag(
        &self,
        index: u32,
        last: bool,
        buf: &mut Vec<u8>,
    ) -> Result<(), MediaError> {
        self.open_flagged(index, last, buf)
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt_as("Opener", f)
    }
}

/// Seals a whole item held in memory: returns the blob (header and all
/// chunks). Fails with [`MediaError::PlaintextLength`] when `plaintext` is
/// not `header.total_len()` bytes, or [`MediaError::TooLarge`] when the blob
/// would not fit in memory on this platform.
///
/// For large items, stream with [`Sealer`] instead.
pub fn seal_blob(key: &ItemKey, header: Header, plaintext: &[u8]) -> Result<Vec<u8>, MediaError> {
    let layout = header.layout();
    if plaintext.len() as u64 != layout.total_len() {
        return Err(MediaError::PlaintextLength {
            expected: layout.total_len(),
            actual: plaintext.len() as u64,
        });
    }
    let blob_len = usize::try_from(layout.blob_len()).map_err(|_| MediaError::TooLarge {
        total_len: layout.total_len(),
    })?;
    let sealer = Sealer::new(key, header);
    let mut blob = Vec::with_capacity(blob_len);
    blob.extend_from_slice(&header.encode());
    let chunk_size = layout.chunk_size() as usize;
    let mut buf = Vec::with_capacity(chunk_size + super::TAG_LEN);
    let mut pieces = plaintext.chunks(chunk_size);
    for index in 0..layout.chunk_count() {
        // An empty item has no slices but one (empty) chunk.
        let piece = pieces.next().unwrap_or(&[]);
        buf.clear();
        buf.extend_from_slice(piece);
        sealer.seal_chunk_in_place(index, index == layout.last_index(), &mut buf)?;
        blob.extend_from_slice(&buf);
    }
    Ok(blob)
}

/// Opens a whole blob held in memory: decodes and checks the header, checks
/// the blob's length, opens every chunk, and returns the header and the
/// plaintext.
///
/// Fails with [`MediaError::Truncated`] or [`MediaError::TrailingData`] when
/// the blob's length does not match its header, with a header error when
/// the header is invalid, and with [`MediaError::Integrity`] naming the
/// first chunk that does not authenticate. Callers still check the header's
/// ids and the blob's hash as described on [`Opener`].
pub fn open_blob(key: &ItemKey, blob: &[u8]) -> Result<(Header, Vec<u8>), MediaError> {
    let header = Header::decode(blob).map_err(|e| match e {
        MediaError::Incomplete { .. } => MediaError::Truncated {
            expected: HEADER_LEN as u64,
            actual: blob.len() as u64,
        },
        other => other,
    })?;
    let layout = header.layout();
    let expected = layout.blob_len();
    let actual = blob.len() as u64;
    if actual < expected {
        return Err(MediaError::Truncated { expected, actual });
    }
    if actual > expected {
        return Err(MediaError::TrailingData { expected, actual });
    }
    let opener = Opener::new(key, header);
    // Fits in usize: it is at most the length of `blob`.
    let mut plaintext = Vec::with_capacity(layout.total_len() as usize);
    let mut buf = Vec::with_capacity(layout.chunk_size() as usize + super::TAG_LEN);
    let mut rest = &blob[HEADER_LEN..];
    for index in 0..layout.chunk_count() {
        let (sealed, tail) = rest.split_at(layout.sealed_len(index)?);
        rest = tail;
        buf.clear();
        buf.extend_from_slice(sealed);
        opener.open_chunk_in_place(index, &mut buf)?;
        plaintext.extend_from_slice(&buf);
    }
    Ok((header, plaintext))
}
