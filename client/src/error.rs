//! Client errors.

use huddle_core::proto::{ErrorBody, ErrorCode};
use thiserror::Error;

/// Everything that can go wrong in the client library. Messages are meant
/// to be shown to the user as they are.
#[derive(Debug, Error)]
pub enum ClientError {
    /// This home has no identity yet.
    #[error("this home is not registered yet: run `huddle register NAME --server ADDR` first")]
    NotRegistered,
    /// The home already holds an identity.
    #[error("this home is already registered as {0}; use another --home for another user")]
    AlreadyRegistered(String),
    /// Bad input from the user.
    #[error("{0}")]
    Usage(String),
    /// Another process of this home holds what the operation needs.
    #[error("{0}")]
    Busy(String),
    /// Others kept changing what the operation needed (a group's epoch, a
    /// file being sent) through every attempt; trying again later may
    /// succeed. Says what kept changing.
    #[error("{0}; try again")]
    Contended(String),
    /// A user's identity key differs from the one this device saw first:
    /// the DS lies, or the user registered anew. Nothing is sent to them.
    #[error("the identity key of {user} changed (was {was}, now {now}): refusing to use it")]
    KeyChanged {
        /// Whose key.
        user: String,
        /// Fingerprint of the key first seen.
        was: String,
        /// Fingerprint of the key the DS lists now.
        now: String,
    },
    /// A commit adds a device of `0` whose device log this device has not
    /// fetched yet (processing stops before it until it is).
    #[error("the device log of {0} is needed")]
    NeedDevices(String),
    /// A commit adds a device its user's device log does not certify.
    #[error("{0} is not a device its user's device log certifies with this key")]
    DeviceRefused(String),
    /// The group's policy does not let this happen: this device's own
    /// request (checked before it is sent), or another member's change or
    /// message (refused here whatever the DS let through).
    #[error("{0}")]
    Policy(String),
    /// The group is known here but this device holds no MLS state for it
    /// (it was lost; the next `sync` rejoins).
    #[error("group {0} has no MLS state on this device")]
    NoGroupState(String),
    /// Some groups could not be brought up to date; each was reported as
    /// an `error` event, and the others were.
    #[error("{0} group(s) could not be brought up to date (see above); the others were")]
    GroupsFailed(usize),
    /// A commit of pending proposals found none left to commit (another
    /// member committed them first).
    #[error("nothing to commit")]
    NothingToCommit,
    /// The server refused a request.
    #[error("server refused: {}", .0.message)]
    Server(ErrorBody),
    /// The server presented another certificate than the pinned one.
    #[error("the server's certificate changed (pinned {}, presented {}); if you trust the new one, run `huddle server trust`", short_fp(.pinned), short_fp(.presented))]
    CertificateMismatch {
        /// Fingerprint of the pinned certificate.
        pinned: String,
        /// Fingerprint of the presented certificate.
        presented: String,
    },
    /// Could not reach or talk to the server.
    #[error("connection to {addr} failed: {reason}")]
    Connect {
        /// Server address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An MLS operation failed.
    #[error("MLS: {0}")]
    Mls(String),
    /// The local database failed.
    #[error("local database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A file operation failed.
    #[error("{0}")]
    Io(String),
    /// The user interrupted the operation (Ctrl-C), or the progress
    /// callback of a transfer asked it to stop; what it did so far is
    /// kept, and the message says how to go on.
    #[error("{0}")]
    Interrupted(String),
    /// The reader of the output went away (a closed pipe): nothing to say.
    #[error("the output was closed")]
    OutputClosed,
    /// Local media verification or decryption failed.
    #[error("integrity error: {0}")]
    Integrity(String),
}

impl From<huddle_core::policy::PolicyError> for ClientError {
    fn from(e: huddle_core::policy::PolicyError) -> Self {
        ClientError::Policy(e.to_string())
    }
}

impl ClientError {
    /// The server error code, if this is a server refusal.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code),
            _ => None,
        }
    }

    /// Whether the connection to the server failed (rather than one
    /// request or one group): the whole operation stops then.
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::CertificateMismatch { .. }
        )
    }

    pub(crate) fn mls(e: impl std::fmt::Display) -> Self {
        ClientError::Mls(e.to_string())
    }

    pub(crate) fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        ClientError::Io(format!("{what}: {e}"))
    }
}

/// The first 8 bytes of a colon-separated fingerprint, enough to tell two
/// apart at a glance.
fn short_fp(fp: &str) -> String {
    let head: Vec<&str> = fp.split(':').take(8).collect();
    if head.len() < 8 {
        fp.to_owned()
    } else {
        format!("{}…", head.join(":"))
    }
}

/// Result alias.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
