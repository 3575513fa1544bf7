//! Errors as they travel: stable numbered codes and the body that carries
//! one with a message.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A numbered error code. Codes are stable; unknown codes from a newer
/// server decode as [`ErrorCode::Other`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
#[serde(from = "u16", into = "u16")]
pub enum ErrorCode {
    /// The request could not be decoded or was malformed.
    BadRequest,
    /// The message type is not known to this server.
    UnknownMessageType,
    /// A frame exceeded the size limit.
    FrameTooLarge,
    /// The request is not valid at this point of the conversation.
    OutOfOrder,
    /// The connection must authenticate first.
    NotAuthenticated,
    /// The proof did not verify.
    AuthFailed,
    /// No such user.
    UnknownUser,
    /// The name is registered to another key.
    NameTaken,
    /// A key package failed validation.
    InvalidKeyPackage,
    /// The user has no key package at all.
    NoKeyPackage,
    /// The caller is not a (current) member of the group.
    NotMember,
    /// No such group.
    UnknownGroup,
    /// The group id is taken.
    GroupExists,
    /// The commit or message is for another epoch than the current one;
    /// `ErrorBody::epoch` carries the current epoch.
    StaleEpoch,
    /// The MLS message failed validation.
    InvalidMessage,
    /// The sender's role in the group lacks what the change or message
    /// needs, or the change would break the group's policy (PROTOCOL.md
    /// 13.10).
    Forbidden,
    /// Too many requests; try later.
    RateLimited,
    /// A storage quota would be exceeded.
    QuotaExceeded,
    /// The item is larger than allowed.
    TooLarge,
    /// The item does not exist (or is not visible to the caller).
    NotFound,
    /// The upload's data does not match its announced hash or length.
    IntegrityError,
    /// The log entries asked for were compacted away: every member that may
    /// read them did, or the departed member asking was away longer than
    /// the DS keeps them.
    Compacted,
    /// The server is shutting down.
    Unavailable,
    /// The server failed; the request may be retried.
    Internal,
    /// A code this build does not know.
    Other(u16),
}

impl From<u16> for ErrorCode {
    fn from(v: u16) -> Self {
        use ErrorCode::*;
        match v {
            1 => BadRequest,
            2 => UnknownMessageType,
            3 => FrameTooLarge,
            4 => OutOfOrder,
            10 => NotAuthenticated,
            11 => AuthFailed,
            12 => UnknownUser,
            13 => NameTaken,
            20 => InvalidKeyPackage,
            21 => NoKeyPackage,
            30 => NotMember,
            31 => UnknownGroup,
            32 => GroupExists,
            33 => StaleEpoch,
            34 => InvalidMessage,
            35 => Forbidden,
            40 => RateLimited,
            50 => QuotaExceeded,
            51 => TooLarge,
            52 => NotFound,
            53 => IntegrityError,
            54 => Compacted,
            90 => Unavailable,
            99 => Internal,
            other => Other(other),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        use ErrorCode::*;
        match c {
            BadRequest => 1,
            UnknownMessageType => 2,
            FrameTooLarge => 3,
            OutOfOrder => 4,
            NotAuthenticated => 10,
            AuthFailed => 11,
            UnknownUser => 12,
            NameTaken => 13,
            InvalidKeyPackage => 20,
            NoKeyPackage => 21,
            NotMember => 30,
            UnknownGroup => 31,
            GroupExists => 32,
            StaleEpoch => 33,
            InvalidMessage => 34,
            Forbidden => 35,
            RateLimited => 40,
            QuotaExceeded => 50,
            TooLarge => 51,
            NotFound => 52,
            IntegrityError => 53,
            Compacted => 54,
            Unavailable => 90,
            Internal => 99,
            Other(v) => v,
        }
    }
}

/// An error as sent on the wire.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug, Error)]
#[error("{message} ({code:?})")]
pub struct ErrorBody {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation, safe to show to the user.
    pub message: String,
    /// The group's current epoch, for [`ErrorCode::StaleEpoch`].
    pub epoch: Option<u64>,
}

impl ErrorBody {
    /// An error without an epoch.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            epoch: None,
        }
    }
}
