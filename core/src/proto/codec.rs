//! Message bodies: postcard encoding, and decoding that tells an unknown
//! message type, a truncated body and trailing bytes apart.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

use super::{Control, Event, Request, Response};
use crate::frame;

/// Why a frame body could not be decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The body is empty or cut short (a frame always carries a whole
    /// message, so this is an error of the peer).
    #[error("message is truncated")]
    Truncated,
    /// The variant index is not one this build knows.
    #[error("unknown message type {0}")]
    UnknownType(u32),
    /// The body is not a valid encoding of the expected message.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// A valid message followed by extra bytes.
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
}

/// A message type that travels in frames.
pub trait Message: Serialize + DeserializeOwned {
    /// Number of variants this build knows; indexes at or above it are
    /// reported as [`DecodeError::UnknownType`].
    const KNOWN_TYPES: u32;
}

impl Message for Request {
    const KNOWN_TYPES: u32 = 30;
}
impl Message for Response {
    const KNOWN_TYPES: u32 = 22;
}
impl Message for Event {
    const KNOWN_TYPES: u32 = 5;
}
impl Message for Control {
    const KNOWN_TYPES: u32 = 3;
}

/// Encodes a message body (without frame header).
pub fn encode_body<M: Message>(msg: &M) -> Vec<u8> {
    postcard::to_allocvec(msg).expect("serialising to a Vec cannot fail")
}

/// Encodes a message as a whole frame (header + body).
pub fn encode_frame<M: Message>(msg: &M) -> Bytes {
    frame::encode(&encode_body(msg))
}

/// Decodes a frame body into a message, refusing unknown types and trailing
/// bytes.
pub fn decode<M: Message>(body: &[u8]) -> Result<M, DecodeError> {
    let tag = read_varint_u32(body)?;
    if tag >= M::KNOWN_TYPES {
        return Err(DecodeError::UnknownType(tag));
    }
    match postcard::take_from_bytes::<M>(body) {
        // Each value has one encoding: a varint padded with continuation
        // bytes (a length, an index, a number) makes the body longer than
        // the message re-encoded, and is refused, so that no two byte
        // strings carry the same message.
        Ok((msg, [])) if encoded_len(&msg) != body.len() => Err(DecodeError::Invalid(
            "a number is not in its shortest encoding".into(),
        )),
        Ok((msg, [])) => Ok(msg),
        Ok((_, rest)) => Err(DecodeError::TrailingBytes(rest.len())),
        Err(postcard::Error::DeserializeUnexpectedEnd) => Err(DecodeError::Truncated),
        Err(e) => Err(DecodeError::Invalid(e.to_string())),
    }
}

/// The length of `msg` encoded, without encoding it.
fn encoded_len<M: Message>(msg: &M) -> usize {
    postcard::serialize_with_flavor(msg, postcard::ser_flavors::Size::default())
        .expect("sizing an encoding cannot fail")
}

fn read_varint_u32(body: &[u8]) -> Result<u32, DecodeError> {
    let mut value: u64 = 0;
    for (i, b) in body.iter().take(5).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u32::try_from(value)
                .map_err(|_| DecodeError::Invalid("variant index overflows".into()));
        }
    }
    if body.len() < 5 {
        Err(DecodeError::Truncated)
    } else {
        Err(DecodeError::Invalid("variant index overflows".into()))
    }
}
