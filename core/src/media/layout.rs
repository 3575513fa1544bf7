//! Where everything lies in a blob: pure arithmetic, no keys.

use std::ops::RangeInclusive;

use super::{MediaError, HEADER_LEN, MAX_CHUNK_SIZE, MAX_TOTAL_LEN, MIN_CHUNK_SIZE, TAG_LEN};

/// The shape of one item: its chunk size and plaintext length, and
/// everything that follows from them.
///
/// A `Layout` value is always valid: the chunk size is a multiple of 16
/// within [`MIN_CHUNK_SIZE`]`..=`[`MAX_CHUNK_SIZE`], the length is at most
/// [`MAX_TOTAL_LEN`], and the chunk count fits in a `u32`. Every method is
/// pure and cheap; the delivery service, the sender and the receiver all
/// compute the same numbers from the two values in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    chunk_size: u32,
    total_len: u64,
    chunks: u32,
}

/// The chunks and blob bytes needed to read one plaintext byte range.
///
/// Fetch blob bytes `blob_start..blob_end` (they are exactly chunks
/// `first..=last`, whole), open each chunk, then drop `skip` bytes from the
/// front of the first chunk's plaintext and keep `end - start` bytes of the
/// plaintext from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkSpan {
    /// First chunk index needed.
    pub first: u32,
    /// Last chunk index needed (inclusive).
    pub last: u32,
    /// Blob offset of the first byte to fetch (start of chunk `first`).
    pub blob_start: u64,
    /// Blob offset one past the last byte to fetch (end of chunk `last`).
    pub blob_end: u64,
    /// Plaintext bytes to drop from the front of chunk `first`.
    pub skip: usize,
}

impl ChunkSpan {
    /// The chunk indices, `first..=last`.
    pub fn chunks(&self) -> RangeInclusive<u32> {
        self.first..=self.last
    }

    /// Number of blob bytes to fetch.
    pub fn blob_len(&self) -> u64 {
        self.blob_end - self.blob_start
    }
}

/// What lies at a blob offset, for resuming a transfer from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobPosition {
    /// Inside the header, `within` bytes from its start.
    Header {
        /// Offset inside the header.
        within: usize,
    },
    /// Inside sealed chunk `index`, `within` bytes from the chunk's start.
    Chunk {
        /// The chunk.
        index: u32,
        /// Offset inside the sealed chunk (ciphertext and tag).
        within: usize,
    },
    /// Exactly at the end of the blob: nothing is left to transfer.
    End,
}

/// Checks a plaintext chunk size against the format's limits.
pub(crate) fn check_chunk_size(chunk_size: u32) -> Result<(), MediaError> {
    // Low four bits clear: a multiple of 16, the AES block size.
    if (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) && chunk_size & 0xf == 0 {
        Ok(())
    } else {
        Err(MediaError::InvalidChunkSize(chunk_size))
    }
}

impl Layout {
    /// The layout of an item of `total_len` plaintext bytes cut into chunks
    /// of `chunk_size` bytes. Fails with [`MediaError::InvalidChunkSize`] or
    /// [`MediaError::TooLarge`] outside the format's limits.
    pub fn new(chunk_size: u32, total_len: u64) -> Result<Self, MediaError> {
        check_chunk_size(chunk_size)?;
        if total_len > MAX_TOTAL_LEN {
            return Err(MediaError::TooLarge { total_len });
        }
        // An empty item is one empty final chunk.
        let chunks = total_len.div_ceil(u64::from(chunk_size)).max(1);
        let chunks = u32::try_from(chunks).map_err(|_| MediaError::TooLarge { total_len })?;
        Ok(Self {
            chunk_size,
            total_len,
            chunks,
        })
    }

    /// Plaintext bytes per chunk (all chunks but the last have exactly this
    /// many).
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Plaintext bytes in the whole item.
    pub fn total_len(&self) -> u64 {
        self.total_len
    }

    /// Number of chunks; at least 1 (an empty item has one empty chunk).
    pub fn chunk_count(&self) -> u32 {
        self.chunks
    }

    /// Index of the final chunk, `chunk_count() - 1`.
    pub fn last_index(&self) -> u32 {
        self.chunks - 1
    }

    /// Bytes in the whole blob: header, ciphertext and one tag per chunk.
    pub fn blob_len(&self) -> u64 {
        HEADER_LEN as u64 + self.total_len + u64::from(self.chunks) * TAG_LEN as u64
    }

    fn check_index(&self, index: u32) -> Result<(), MediaError> {
        if index < self.chunks {
            Ok(())
        } else {
            Err(MediaError::NoSuchChunk {
                index,
                chunks: self.chunks,
            })
        }
    }

    /// Plaintext bytes in chunk `index`: the chunk size, except for the
    /// final chunk, which holds what is left (1 to chunk size bytes, or 0
    /// for an empty item).
    pub fn plaintext_len(&self, index: u32) -> Result<usize, MediaError> {
        self.check_index(index)?;
        let before = u64::from(index) * u64::from(self.chunk_size);
        let len = (self.total_len - before).min(u64::from(self.chunk_size));
        // At most MAX_CHUNK_SIZE, so it fits any usize of 32 bits or more.
        Ok(len as usize)
    }

    /// Bytes of sealed chunk `index` in the blob: plaintext length plus
    /// [`TAG_LEN`].
    pub fn sealed_len(&self, index: u32) -> Result<usize, MediaError> {
        Ok(self.plaintext_len(index)? + TAG_LEN)
    }

    /// Blob offset where sealed chunk `index` starts.
    pub fn chunk_offset(&self, index: u32) -> Result<u64, MediaError> {
        self.check_index(index)?;
        Ok(self.chunk_offset_unchecked(index))
    }

    fn chunk_offset_unchecked(&self, index: u32) -> u64 {
        HEADER_LEN as u64 + u64::from(index) * (u64::from(self.chunk_size) + TAG_LEN as u64)
    }

    /// The chunks, and the blob bytes, needed to read plaintext bytes
    /// `start..end`. The range must be non-empty and within the item
    /// (`start < end <= total_len`), else [`MediaError::BadRange`].
    pub fn span(&self, start: u64, end: u64) -> Result<ChunkSpan, MediaError> {
        if start >= end || end > self.total_len {
            return Err(MediaError::BadRange {
                start,
                end,
                total_len: self.total_len,
            });
        }
        let size = u64::from(self.chunk_size);
        // Both fit in u32: they are below `chunks`, which does.
        let first = (start / size) as u32;
        let last = ((end - 1) / size) as u32;
        let last_len = self.sealed_len(last)? as u64;
        Ok(ChunkSpan {
            first,
            last,
            blob_start: self.chunk_offset_unchecked(first),
            blob_end: self.chunk_offset_unchecked(last) + last_len,
            skip: (start - u64::from(first) * size) as usize,
        })
    }

    /// What lies at `blob_offset`, or `None` past the end of the blob.
    ///
    /// A sender resuming an upload the delivery service has stored up to
    /// `blob_offset` re-sends the rest of the header, or re-seals chunk
    /// `index` (sealing is deterministic) and sends it from byte `within`
    /// on, then the following chunks.
    pub fn locate(&self, blob_offset: u64) -> Option<BlobPosition> {
        let blob_len = self.blob_len();
        if blob_offset > blob_len {
            return None;
        }
        if blob_offset == blob_len {
            return Some(BlobPosition::End);
        }
        if blob_offset < HEADER_LEN as u64 {
            return Some(BlobPosition::Header {
                within: blob_offset as usize,
            });
        }
        let stride = u64::from(self.chunk_size) + TAG_LEN as u64;
        let rel = blob_offset - HEADER_LEN as u64;
        Some(BlobPosition::Chunk {
            index: (rel / stride) as u32,
            within: (rel % stride) as usize,
        })
    }
}
