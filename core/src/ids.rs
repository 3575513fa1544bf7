//! Identifiers shared by every part of Huddle.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest user name the delivery service accepts, in bytes.
pub const MAX_USER_NAME: usize = 64;

/// A 16-byte random identifier, printed as 32 lowercase hex digits.
macro_rules! id16 {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }

            /// Builds an id from a byte slice of exactly 16 bytes.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                bytes.try_into().ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let mut out = [0u8; 16];
                hex::decode_to_slice(s, &mut out).map_err(|_| IdError::Malformed($what))?;
                Ok(Self(out))
            }
        }
    };
}

id16!(
    /// Identifies an MLS group. It is also the MLS `group_id` of the group.
    GroupId,
    "group id"
);
id16!(
    /// Identifies one uploaded media item (a blob) on the delivery service.
    MediaId,
    "media id"
);

/// Errors parsing identifiers and names.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdError {
    /// Not 32 hex digits.
    #[error("malformed {0}: expected 32 hex digits")]
    Malformed(&'static str),
    /// A user name outside the allowed alphabet or length.
    #[error("invalid user name {0:?}: use 1 to 64 characters from a-z, 0-9, '.', '_' and '-', starting with a letter or digit")]
    BadUserName(String),
}

/// Checks that `name` is an acceptable user name: 1 to 64 bytes of lowercase
/// ASCII letters, digits, `.`, `_` or `-`, starting with a letter or digit.
///
/// A narrow alphabet keeps names unambiguous when printed (no look-alike
/// Unicode) and safe to use as storage keys.
pub fn check_user_name(name: &str) -> Result<(), IdError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_USER_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(IdError::BadUserName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_id_hex_round_trip() {
        let id = GroupId([0xab; 16]);
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<GroupId>(), Ok(id));
        assert!("xyz".parse::<GroupId>().is_err());
        assert!("ab".repeat(17).parse::<GroupId>().is_err());
    }

    #[test]
    fn user_names() {
        for good in ["alice", "bob-2", "c.d_e", "0x"] {
            assert!(check_user_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Alice", "-x", "a b", "é", &"a".repeat(65)] {
            assert!(check_user_name(bad).is_err(), "{bad}");
        }
    }
}
