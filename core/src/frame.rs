//! Length-prefixed frames.
//!
//! Every message on a Huddle stream is one frame: a 4-byte big-endian body
//! length followed by that many bytes of body. The length is checked against
//! a limit *before* any buffer for the body is allocated, so a peer cannot
//! make the other side reserve memory by announcing a huge frame.
//!
//! Two ways to read frames are offered: [`check`] + [`split`] on a byte slice
//! (mini-redis style: check that a whole frame is there, then take it), and
//! [`Decoder`], which buffers bytes as they arrive from a transport.

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// Default limit on a control frame's body: large enough for a commit that
/// adds 1,000 members (~285 KB) or a 1,000-member ratchet tree, small enough
/// that a misbehaving peer cannot tie up much memory.
pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;

/// Why a frame could not be read.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// More bytes are needed before a frame can be read. Not an error of the
    /// peer: wait for more input.
    #[error("incomplete frame: {needed} more bytes needed")]
    Incomplete {
        /// How many more bytes are needed at least.
        needed: usize,
    },
    /// The announced body length is above the limit. The stream cannot be
    /// resynchronised after this and should be closed.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
}

impl FrameError {
    /// True when more input could complete the frame.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, FrameError::Incomplete { .. })
    }
}

/// Reads the body length from a frame header and checks it against `max`.
pub fn body_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Checks whether `buf` starts with a complete frame whose body is at most
/// `max` bytes. Returns the total length (header + body) of that frame.
pub fn check(buf: &[u8], max: usize) -> Result<usize, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Err(FrameError::Incomplete {
            needed: HEADER_LEN - buf.len(),
        });
    };
    let header: [u8; HEADER_LEN] = header.try_into().expect("slice of HEADER_LEN bytes");
    let len = body_len(header, max)?;
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Err(FrameError::Incomplete {
            needed: total - buf.len(),
        });
    }
    Ok(total)
}

/// Splits the first complete frame off `buf`, returning its body and the
/// rest of the input.
pub fn split(buf: &[u8], max: usize) -> Result<(&[u8], &[u8]), FrameError> {
    let total = check(buf, max)?;
    Ok((&buf[HEADER_LEN..total], &buf[total..]))
}

/// Wraps `body` in a frame. Panics if the body is longer than `u32::MAX`,
/// which the codec's own limits make impossible.
pub fn encode(body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&header_for(body.len()));
    out.extend_from_slice(body);
    out.freeze()
}

/// The header for a body of `len` bytes.
pub fn header_for(len: usize) -> [u8; HEADER_LEN] {
    u32::try_from(len)
        .expect("frame body fits in u32")
        .to_be_bytes()
}

/// Incremental frame decoder over bytes that arrive in pieces.
///
/// Feed input with [`Decoder::extend`], take frames with
/// [`Decoder::next_frame`]. After a [`FrameError::TooLarge`] the decoder is
/// poisoned: every later call returns the same error.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    max: usize,
    failed: Option<FrameError>,
}

impl Decoder {
    /// A decoder that refuses bodies above `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
            failed: None,
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(data);
        }
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next complete frame's body, `Ok(None)` if more input is
    /// needed, or an error if the stream is invalid.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match check(&self.buf, self.max) {
            Ok(total) => {
                let mut frame = self.buf.split_to(total);
                frame.advance(HEADER_LEN);
                Ok(Some(frame.freeze()))
            }
            Err(FrameError::Incomplete { .. }) => Ok(None),
            Err(e) => {
                self.buf = BytesMut::new();
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn check_tells_incomplete_from_too_large() {
        assert_eq!(check(&[], 10), Err(FrameError::Incomplete { needed: 4 }));
        assert_eq!(
            check(&[0, 0, 0, 5, 1], 10),
            Err(FrameError::Incomplete { needed: 4 })
        );
        assert_eq!(
            check(&[0, 0, 0, 11], 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        // The limit is checked from the header alone: no body bytes needed.
        assert_eq!(
            check(&[0xff, 0xff, 0xff, 0xff], DEFAULT_MAX_FRAME),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: DEFAULT_MAX_FRAME
            })
        );
        assert_eq!(check(&[0, 0, 0, 1, 9, 9], 10), Ok(5));
    }

    #[test]
    fn decoder_is_poisoned_after_oversized_frame() {
        let mut d = Decoder::new(8);
        d.extend(&[0, 0, 0, 9]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
        d.extend(&encode(b"ok"));
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
    }

    proptest! {
        #[test]
        fn decoder_reassembles_any_split(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            cut in 1usize..64,
        ) {
            let mut wire = Vec::new();
            for b in &bodies {
                wire.extend_from_slice(&encode(b));
            }
            let mut d = Decoder::new(300);
            let mut out = Vec::new();
            for piece in wire.chunks(cut) {
                d.extend(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    out.push(f.to_vec());
                }
            }
            prop_assert_eq!(out, bodies);
            prop_assert_eq!(d.buffered(), 0);
        }

        #[test]
        fn split_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..100) {
            match split(&buf, max) {
                Ok((body, rest)) => prop_assert_eq!(HEADER_LEN + body.len() + rest.len(), buf.len()),
                Err(FrameError::Incomplete { needed }) => prop_assert!(needed > 0),
                Err(FrameError::TooLarge { len, max: m }) => prop_assert!(len > m),
            }
        }
    }
}
