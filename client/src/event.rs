//! What the client reports: messages and membership changes, as printed by
//! `sync`, `listen` and `messages`.

use serde::{Deserialize, Serialize};

/// One thing that happened in a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `text`, `media`, `joined`, `member_added`, `member_removed`, `left`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Group id (hex).
    pub group: String,
    /// Group name, when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group_name: String,
    /// Who did it (the MLS sender, authenticated by its signature).
    pub from: String,
    /// Position in the group's log.
    pub seq: u64,
    /// When the DS appended it (ms since the Unix epoch).
    pub timestamp_ms: u64,
    /// The group's epoch after this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Text of a `text` message, or caption of a `media` message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Members added or removed (`member_added`, `member_removed`, `left`),
    /// or all members (`joined`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<String>>,
    /// Media id (hex), for `media`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_id: Option<String>,
    /// File name, for `media`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Plaintext size in bytes, for `media`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// MIME type, for `media`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime: Option<String>,
}

impl Event {
    /// An event with the common fields set.
    pub fn new(kind: &str, group: &str, from: &str, seq: u64, timestamp_ms: u64) -> Self {
        Self {
            kind: kind.to_owned(),
            group: group.to_owned(),
            group_name: String::new(),
            from: from.to_owned(),
            seq,
            timestamp_ms,
            epoch: None,
            text: None,
            members: None,
            media_id: None,
            name: None,
            size: None,
            mime: None,
        }
    }

    /// One line for a terminal.
    pub fn human(&self) -> String {
        let g = if self.group_name.is_empty() {
            &self.group[..8.min(self.group.len())]
        } else {
            &self.group_name
        };
        let members = self.members.as_deref().unwrap_or_default().join(", ");
        match self.kind.as_str() {
            "text" => format!(
                "[{g}] {}: {}",
                self.from,
                self.text.as_deref().unwrap_or("")
            ),
            "media" => {
                let caption = self
                    .text
                    .as_deref()
                    .filter(|c| !c.is_empty())
                    .map(|c| format!(" \"{c}\""))
                    .unwrap_or_default();
                format!(
                    "[{g}] {} sent {} ({}, {} bytes){caption} media {}",
                    self.from,
                    self.name.as_deref().unwrap_or("file"),
                    self.mime.as_deref().unwrap_or("application/octet-stream"),
                    self.size.unwrap_or(0),
                    self.media_id.as_deref().unwrap_or("?")
                )
            }
            "joined" => format!("[{g}] joined, added by {}; members: {members}", self.from),
            "member_added" => format!("[{g}] {} added {members}", self.from),
            "member_removed" => format!("[{g}] {} removed {members}", self.from),
            "left" => format!("[{g}] {members} left"),
            "fork_detected" => format!(
                "[{g}] WARNING: {members} computed another state of this group at epoch {}; messages between you may not decrypt",
                self.epoch.unwrap_or(0)
            ),
            "rejoined" if self.text.is_some() => format!(
                "[{g}] this device rejoined the group at epoch {} ({}); earlier messages it had not read are lost to it",
                self.epoch.unwrap_or(0),
                self.text.as_deref().unwrap_or("")
            ),
            "rejoined" => format!(
                "[{g}] {} rejoined (new device state) at epoch {}",
                self.from,
                self.epoch.unwrap_or(0)
            ),
            "key_changed" => format!(
                "[{g}] WARNING: the identity key of {members} differs from the one first seen; compare fingerprints out of band"
            ),
            other => format!("[{g}] {other} from {}", self.from),
        }
    }
}
