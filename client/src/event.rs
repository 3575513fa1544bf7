//! What the client reports: messages and membership changes, as printed by
//! `sync`, `listen` and `messages`.

use serde::{Deserialize, Serialize};

/// What happened, with what belongs to it: the `type` of an event in
/// `--json` output, in snake case (`member_added`), and the fields each
/// type carries next to the common ones of [`Event`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A text message.
    Text {
        /// The message.
        text: String,
    },
    /// A media item was shared.
    Media {
        /// Media id (hex): what `download` takes.
        media_id: String,
        /// File name, as the sender gave it.
        name: String,
        /// Plaintext size in bytes.
        size: u64,
        /// MIME type.
        mime: String,
        /// Caption (empty for none).
        #[serde(default)]
        text: String,
    },
    /// This device joined the group.
    Joined {
        /// All members, this device's user included.
        members: Vec<String>,
        /// The epoch it joined at.
        epoch: u64,
    },
    /// Members were added.
    MemberAdded {
        /// Who.
        members: Vec<String>,
        /// The epoch the adding commit began.
        epoch: u64,
    },
    /// Members were removed. Without `from`, this device found itself
    /// removed while it was away (`text` says how; no `epoch`).
    MemberRemoved {
        /// Who.
        members: Vec<String>,
        /// The epoch the removing commit began.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
        /// How this device learned it was removed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
    },
    /// Members left. Without `from`, this device's own leaving was
    /// completed while it was away (`text` says how; no `epoch`).
    Left {
        /// Who.
        members: Vec<String>,
        /// The epoch the commit of their leaving began.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
        /// How this device learned its leaving was done.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
    },
    /// A member rejoined by external commit; with `text`, it was this
    /// device, and `text` says why.
    Rejoined {
        /// The members after the rejoin (only this device's user when
        /// another member rejoined).
        members: Vec<String>,
        /// The epoch the rejoin began.
        epoch: u64,
        /// Why this device rejoined.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
    },
    /// Devices of users already in the group joined it (`members`: the
    /// devices, `USER/N`).
    DeviceAdded {
        /// The devices.
        members: Vec<String>,
        /// The epoch the commit began.
        epoch: u64,
    },
    /// Devices were removed from the group while their users stay in it
    /// (a revoked device, say).
    DeviceRemoved {
        /// The devices.
        members: Vec<String>,
        /// The epoch the commit began.
        epoch: u64,
    },
    /// Users joined with an invite (`invite`: its id).
    JoinedByInvite {
        /// Who.
        members: Vec<String>,
        /// The invite's id (the first 8 hex digits of its key).
        invite: String,
        /// The epoch the join began.
        epoch: u64,
    },
    /// The group was renamed.
    Renamed {
        /// The new name.
        name: String,
    },
    /// `members` were given `role` (`owner`, `admin`, `member` or
    /// `reader`).
    RoleChanged {
        /// Whose role changed.
        members: Vec<String>,
        /// The role they have now.
        role: String,
        /// The epoch the commit began.
        epoch: u64,
    },
    /// The group's settings changed; `text` lists them as they are now
    /// (`announcement=on, members_may_add=off, ...`).
    PolicyChanged {
        /// The settings now.
        text: String,
        /// The epoch the commit began.
        epoch: u64,
    },
    /// The identity key of `members` differs from the one first seen.
    KeyChanged {
        /// Whose key changed.
        members: Vec<String>,
    },
    /// `members` computed another state of the group at `epoch` (or,
    /// with `text` and no members, the DS's state differs from this
    /// device's).
    ForkDetected {
        /// The epoch at which the states differ.
        epoch: u64,
        /// The members whose state differs.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        members: Vec<String>,
        /// What differs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
    },
    /// The group could not be brought up to date; not kept in the history.
    Error {
        /// Why.
        text: String,
    },
    /// `listen` started; not kept in the history.
    Listening {
        /// The server it listens to.
        text: String,
    },
}

impl EventKind {
    /// The `type` as it is written in `--json` output.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::Text { .. } => "text",
            EventKind::Media { .. } => "media",
            EventKind::Joined { .. } => "joined",
            EventKind::MemberAdded { .. } => "member_added",
            EventKind::MemberRemoved { .. } => "member_removed",
            EventKind::Left { .. } => "left",
            EventKind::Rejoined { .. } => "rejoined",
            EventKind::DeviceAdded { .. } => "device_added",
            EventKind::DeviceRemoved { .. } => "device_removed",
            EventKind::JoinedByInvite { .. } => "joined_by_invite",
            EventKind::Renamed { .. } => "renamed",
            EventKind::RoleChanged { .. } => "role_changed",
            EventKind::PolicyChanged { .. } => "policy_changed",
            EventKind::KeyChanged { .. } => "key_changed",
            EventKind::ForkDetected { .. } => "fork_detected",
            EventKind::Error { .. } => "error",
            EventKind::Listening { .. } => "listening",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for EventKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for EventKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

/// One thing that happened in a group: where, who and when, and what
/// ([`EventKind`], whose fields sit beside these in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// What happened, and its fields.
    #[serde(flatten)]
    pub kind: EventKind,
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
}

impl Event {
    /// An event of `kind` in `group`, by `from`, at `seq`.
    pub fn new(kind: EventKind, group: &str, from: &str, seq: u64, timestamp_ms: u64) -> Self {
        Self {
            kind,
            group: group.to_owned(),
            group_name: String::new(),
            from: from.to_owned(),
            seq,
            timestamp_ms,
        }
    }

    /// The text of a message, the caption of a media item, or what a
    /// report says.
    pub fn text(&self) -> Option<&str> {
        match &self.kind {
            EventKind::Text { text }
            | EventKind::Error { text }
            | EventKind::Listening { text }
            | EventKind::PolicyChanged { text, .. }
            | EventKind::Media { text, .. } => Some(text),
            EventKind::MemberRemoved { text, .. }
            | EventKind::Left { text, .. }
            | EventKind::Rejoined { text, .. }
            | EventKind::ForkDetected { text, .. } => text.as_deref(),
            EventKind::Joined { .. }
            | EventKind::MemberAdded { .. }
            | EventKind::DeviceAdded { .. }
            | EventKind::DeviceRemoved { .. }
            | EventKind::Renamed { .. }
            | EventKind::RoleChanged { .. }
            | EventKind::JoinedByInvite { .. }
            | EventKind::KeyChanged { .. } => None,
        }
    }

    /// The members an event names (none for a message or a report).
    pub fn members(&self) -> &[String] {
        match &self.kind {
            EventKind::Joined { members, .. }
            | EventKind::MemberAdded { members, .. }
            | EventKind::MemberRemoved { members, .. }
            | EventKind::Left { members, .. }
            | EventKind::Rejoined { members, .. }
            | EventKind::KeyChanged { members }
            | EventKind::DeviceAdded { members, .. }
            | EventKind::DeviceRemoved { members, .. }
            | EventKind::RoleChanged { members, .. }
            | EventKind::JoinedByInvite { members, .. }
            | EventKind::ForkDetected { members, .. } => members,
            EventKind::Text { .. }
            | EventKind::Renamed { .. }
            | EventKind::PolicyChanged { .. }
            | EventKind::Media { .. }
            | EventKind::Error { .. }
            | EventKind::Listening { .. } => &[],
        }
    }

    /// The group's epoch the event speaks of, when it has one.
    pub fn epoch(&self) -> Option<u64> {
        match &self.kind {
            EventKind::Joined { epoch, .. }
            | EventKind::MemberAdded { epoch, .. }
            | EventKind::Rejoined { epoch, .. }
            | EventKind::DeviceAdded { epoch, .. }
            | EventKind::DeviceRemoved { epoch, .. }
            | EventKind::RoleChanged { epoch, .. }
            | EventKind::JoinedByInvite { epoch, .. }
            | EventKind::PolicyChanged { epoch, .. }
            | EventKind::ForkDetected { epoch, .. } => Some(*epoch),
            EventKind::MemberRemoved { epoch, .. } | EventKind::Left { epoch, .. } => *epoch,
            _ => None,
        }
    }

    /// The media id (hex) of a `media` event.
    pub fn media_id(&self) -> Option<&str> {
        match &self.kind {
            EventKind::Media { media_id, .. } => Some(media_id),
            _ => None,
        }
    }

    /// Whether events of this kind are kept in the history (all but
    /// reports of the moment: a failure, the start of `listen`).
    pub fn recorded(&self) -> bool {
        !matches!(
            self.kind,
            EventKind::Error { .. } | EventKind::Listening { .. }
        )
    }

    /// One line for a terminal. Everything that came from other people
    /// (text, names, types) is shown with control characters escaped, so a
    /// message cannot forge lines or drive the terminal.
    pub fn human(&self) -> String {
        let g = if self.group_name.is_empty() {
            clean(&self.group[..8.min(self.group.len())])
        } else {
            clean(&self.group_name)
        };
        let from = clean(&self.from);
        let members = self.members().join(", ");
        let members = clean(&members);
        let text = clean(self.text().unwrap_or(""));
        let by_self = self.from.is_empty();
        match &self.kind {
            EventKind::Text { .. } => format!("[{g}] {from}: {text}"),
            EventKind::Media {
                media_id,
                name,
                size,
                mime,
                ..
            } => {
                let caption = if text.is_empty() {
                    String::new()
                } else {
                    format!(" \"{text}\"")
                };
                format!(
                    "[{g}] {from} sent {} ({}, {}){caption} media {}",
                    clean(name),
                    clean(mime),
                    human_size(*size),
                    clean(media_id)
                )
            }
            EventKind::Joined { .. } => format!("[{g}] joined, added by {from}; members: {members}"),
            EventKind::MemberAdded { .. } => format!("[{g}] {from} added {members}"),
            EventKind::MemberRemoved { .. } if by_self => format!("[{g}] {members} removed: {text}"),
            EventKind::MemberRemoved { .. } => format!("[{g}] {from} removed {members}"),
            EventKind::Left { .. } if by_self => format!("[{g}] {members} left: {text}"),
            EventKind::Left { .. } => format!("[{g}] {members} left"),
            EventKind::ForkDetected { epoch, members: m, .. } if m.is_empty() => format!(
                "[{g}] WARNING: the group's state differs from this device's at epoch {epoch}: {text}"
            ),
            EventKind::ForkDetected { epoch, .. } => format!(
                "[{g}] WARNING: {members} computed another state of this group at epoch {epoch}; messages between you may not decrypt"
            ),
            EventKind::Rejoined { epoch, text: Some(_), .. } => format!(
                "[{g}] this device rejoined the group at epoch {epoch} ({text}); earlier messages it had not read are lost to it"
            ),
            EventKind::Rejoined { epoch, .. } => {
                format!("[{g}] {from} rejoined (new device state) at epoch {epoch}")
            }
            EventKind::DeviceAdded { members: m, .. } => {
                format!("[{g}] {} added a device: {members}", device_owners(m))
            }
            EventKind::DeviceRemoved { members: m, .. } => {
                format!("[{g}] {} removed a device: {members}", device_owners(m))
            }
            EventKind::JoinedByInvite { invite, .. } => {
                format!("[{g}] {members} joined with invite {}", clean(invite))
            }
            EventKind::Renamed { name } => format!("[{g}] {from} renamed the group to {}", clean(name)),
            EventKind::RoleChanged { role, .. } => {
                format!("[{g}] {from} made {members} {}", clean(role))
            }
            EventKind::PolicyChanged { .. } => format!("[{g}] {from} changed the settings: {text}"),
            EventKind::KeyChanged { .. } => format!(
                "[{g}] WARNING: the identity key of {members} differs from the one first seen; compare fingerprints out of band"
            ),
            EventKind::Error { .. } => {
                format!("[{g}] ERROR: this group could not be brought up to date: {text}")
            }
            EventKind::Listening { .. } => format!("listening as {from} on {text}; Ctrl-C to stop"),
        }
    }

    /// [`Event::human`] behind the local date and time it happened.
    pub fn human_at(&self) -> String {
        format!("{} {}", local_time(self.timestamp_ms), self.human())
    }
}

/// The users the devices `principals` belong to, escaped for a terminal.
fn device_owners(principals: &[String]) -> String {
    let mut users: Vec<&str> = principals
        .iter()
        .map(|p| huddle_core::devices::user_part(p))
        .collect();
    users.dedup();
    clean(&users.join(", ")).into_owned()
}

/// `ms` since the Unix epoch as local `YYYY-MM-DD HH:MM`.
pub fn local_time(ms: u64) -> String {
    let Ok(ts) = jiff::Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX)) else {
        return "????-??-?? ??:??".into();
    };
    ts.to_zoned(jiff::tz::TimeZone::system())
        .strftime("%Y-%m-%d %H:%M")
        .to_string()
}

/// Bytes as a person reads them: `512 B`, `6.2 KiB`, `286.1 MiB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `s` with every control character (newlines, escapes, C1 controls) and
/// every bidirectional override escaped, as `\n`, `\u{1b}` and so on.
pub fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    let risky = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(risky) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if risky(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_a_person_would() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(6321), "6.2 KiB");
        assert_eq!(human_size(300_000_000), "286.1 MiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
    }

    #[test]
    fn other_peoples_text_cannot_forge_lines_or_drive_the_terminal() {
        let mut e = Event::new(
            EventKind::Text {
                text: "ok\n[g] carol: my new key is X\u{1b}[2J\u{202e}".into(),
            },
            "00112233445566778899aabbccddeeff",
            "mallory",
            1,
            0,
        );
        let line = e.human();
        assert_eq!(
            line,
            "[00112233] mallory: ok\\n[g] carol: my new key is X\\u{1b}[2J\\u{202e}"
        );
        e.group_name = "a\rb".into();
        e.from = "x\u{7}".into();
        let line = e.human();
        assert!(!line.contains('\r') && !line.contains('\u{7}'), "{line:?}");
        assert_eq!(clean("plain"), "plain");
    }

    /// `--json` output and the history keep the field names and values
    /// they had before events became an enum: each type with its fields,
    /// none of another type's, and stored events read back as they were.
    #[test]
    fn json_names_each_type_with_its_own_fields() {
        let g = "00112233445566778899aabbccddeeff";
        let mut e = Event::new(
            EventKind::MemberRemoved {
                members: vec!["bob".into()],
                epoch: Some(3),
                text: None,
            },
            g,
            "alice",
            7,
            1_000,
        );
        e.group_name = "team".into();
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "type": "member_removed", "group": g, "group_name": "team",
                "from": "alice", "seq": 7, "timestamp_ms": 1000,
                "members": ["bob"], "epoch": 3
            })
        );
        let media = Event::new(
            EventKind::Media {
                media_id: "ab".into(),
                name: "cat.png".into(),
                size: 6321,
                mime: "image/png".into(),
                text: String::new(),
            },
            g,
            "alice",
            8,
            1_001,
        );
        let v: serde_json::Value = serde_json::to_value(&media).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "type": "media", "group": g, "from": "alice", "seq": 8,
                "timestamp_ms": 1001, "media_id": "ab", "name": "cat.png",
                "size": 6321, "mime": "image/png", "text": ""
            })
        );
        // As an earlier version stored it in the history.
        let stored = r#"{"type":"text","group":"00112233445566778899aabbccddeeff","from":"bob","seq":2,"timestamp_ms":5,"text":"hi"}"#;
        let back: Event = serde_json::from_str(stored).unwrap();
        assert_eq!(back.kind, EventKind::Text { text: "hi".into() });
        assert_eq!(back.text(), Some("hi"));
        for e in [e, media] {
            let again: Event = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
            assert_eq!(again, e);
        }
        // A type without the fields it needs is not an event.
        assert!(serde_json::from_str::<Event>(
            r#"{"type":"member_added","group":"g","from":"a","seq":1,"timestamp_ms":1}"#
        )
        .is_err());
    }
}
