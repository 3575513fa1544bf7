//! Payloads of MLS application messages. Only members can read these: they
//! travel encrypted inside MLS PrivateMessages.

use serde::{Deserialize, Serialize};

/// Version tag prefixed to every payload, so the format can evolve.
const VERSION: u8 = 1;

/// A media item as announced in a group (see `docs/MEDIA.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaInfo {
    /// Blob id on the DS.
    pub media_id: [u8; 16],
    /// The item's random 32-byte key.
    pub key: [u8; 32],
    /// Plaintext size.
    pub size: u64,
    /// Ciphertext size.
    pub ciphertext_len: u64,
    /// Plaintext chunk size.
    pub chunk_size: u32,
    /// BLAKE3 of the whole ciphertext.
    pub hash: [u8; 32],
    /// MIME type, detected from content.
    pub mime: String,
    /// File name (no directories).
    pub name: String,
    /// Caption.
    pub caption: String,
    /// A small preview (JPEG/PNG bytes) for pictures.
    pub preview: Option<Vec<u8>>,
}

/// What members say to each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppMessage {
    /// A text message.
    Text {
        /// The text.
        text: String,
    },
    /// The group's display name (sent by whoever adds members, so joiners
    /// learn it).
    GroupName {
        /// The name.
        name: String,
    },
    /// A media item.
    Media(Box<MediaInfo>),
    /// A new name for the group, from a member whose role may rename it.
    Rename {
        /// The name.
        name: String,
    },
}

impl AppMessage {
    /// The additional authenticated data the message travels with: it
    /// tells the DS what kind of message it is, which the DS checks
    /// against the sender's role, and members check it against the
    /// content (PROTOCOL.md 13.10).
    /// Whether `aad`, the authenticated data a message came with, says
    /// its kind: a rename and the group's name only with their own tags;
    /// any other message with anything but those (a sender may put bytes
    /// of its own there).
    pub fn kind_matches(&self, aad: &[u8]) -> bool {
        use huddle_core::policy::{AAD_NAME, AAD_RENAME};
        match self {
            AppMessage::Rename { .. } => aad == AAD_RENAME,
            AppMessage::GroupName { .. } => aad == AAD_NAME,
            AppMessage::Text { .. } | AppMessage::Media(_) => aad != AAD_RENAME && aad != AAD_NAME,
        }
    }

    pub fn aad(&self) -> &'static [u8] {
        match self {
            AppMessage::Text { .. } | AppMessage::Media(_) => b"",
            AppMessage::GroupName { .. } => huddle_core::policy::AAD_NAME,
            AppMessage::Rename { .. } => huddle_core::policy::AAD_RENAME,
        }
    }

    /// Encodes with the version tag.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        out.extend(postcard::to_allocvec(self).expect("serialising to a Vec cannot fail"));
        out
    }

    /// Decodes, refusing unknown versions and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        match bytes.split_first() {
            Some((&VERSION, rest)) => match postcard::take_from_bytes::<AppMessage>(rest) {
                // One encoding per message: a number padded with
                // continuation bytes makes the body longer than the message
                // re-encoded (PROTOCOL.md section 15).
                Ok((m, []))
                    if postcard::serialize_with_flavor(
                        &m,
                        postcard::ser_flavors::Size::default(),
                    )
                    .is_ok_and(|n| n != rest.len()) =>
                {
                    Err("a number is not in its shortest encoding".into())
                }
                Ok((m, [])) => Ok(m),
                Ok(_) => Err("trailing bytes after the message".into()),
                Err(e) => Err(format!("undecodable message: {e}")),
            },
            Some((v, _)) => Err(format!("message format version {v} is not supported")),
            None => Err("empty message".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let m = AppMessage::Text { text: "hi".into() };
        let b = m.encode();
        assert_eq!(AppMessage::decode(&b).unwrap(), m);
        let mut extra = b.clone();
        extra.push(0);
        assert!(AppMessage::decode(&extra).is_err());
        assert!(AppMessage::decode(&[2, 0]).is_err());
        assert!(AppMessage::decode(&[]).is_err());
        // The text's length 2 padded to two bytes: refused.
        assert_eq!(b[2], 2);
        let mut padded = b[..2].to_vec();
        padded.extend_from_slice(&[0x82, 0x00]);
        padded.extend_from_slice(&b[3..]);
        assert_eq!(
            AppMessage::decode(&padded),
            Err("a number is not in its shortest encoding".into())
        );
    }
}
