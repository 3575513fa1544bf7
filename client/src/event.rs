//! What the client reports: messages and membership changes, as printed by
//! `sync`, `listen` and `messages`.

use serde::{Deserialize, Serialize};

/// What kind of thing happened: the `type` of an event in `--json`
/// output, in snake case (`member_added`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A text message (`text`).
    Text,
    /// A media item was shared (`media_id`, `name`, `size`, `mime`, and
    /// its caption in `text`).
    Media,
    /// This device joined the group (`members`: all of them).
    Joined,
    /// Members were added (`members`, `epoch`).
    MemberAdded,
    /// Members were removed (`members`, `epoch`); without `from`, this
    /// device found itself removed (`text` says how).
    MemberRemoved,
    /// Members left (`members`, `epoch`).
    Left,
    /// A member (or, with `text`, this device) rejoined by external commit
    /// (`members`, `epoch`).
    Rejoined,
    /// The identity key of `members` differs from the one first seen.
    KeyChanged,
    /// `members` computed another state of the group at `epoch`.
    ForkDetected,
    /// The group could not be brought up to date (`text`); not kept in
    /// the history.
    Error,
    /// `listen` started (`text`: the server); not kept in the history.
    Listening,
}

impl EventKind {
    /// The kind as it is written in `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Text => "text",
            EventKind::Media => "media",
            EventKind::Joined => "joined",
            EventKind::MemberAdded => "member_added",
            EventKind::MemberRemoved => "member_removed",
            EventKind::Left => "left",
            EventKind::Rejoined => "rejoined",
            EventKind::KeyChanged => "key_changed",
            EventKind::ForkDetected => "fork_detected",
            EventKind::Error => "error",
            EventKind::Listening => "listening",
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

/// One thing that happened in a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// What happened.
    #[serde(rename = "type")]
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
    pub fn new(kind: EventKind, group: &str, from: &str, seq: u64, timestamp_ms: u64) -> Self {
        Self {
            kind,
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

    /// Whether events of this kind are kept in the history (all but
    /// reports of the moment: a failure, the start of `listen`).
    pub fn recorded(&self) -> bool {
        !matches!(self.kind, EventKind::Error | EventKind::Listening)
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
        let members = self.members.as_deref().unwrap_or_default().join(", ");
        let members = clean(&members);
        let text = clean(self.text.as_deref().unwrap_or(""));
        match self.kind {
            EventKind::Text => format!("[{g}] {from}: {text}"),
            EventKind::Media => {
                let caption = if text.is_empty() {
                    String::new()
                } else {
                    format!(" \"{text}\"")
                };
                format!(
                    "[{g}] {from} sent {} ({}, {}){caption} media {}",
                    clean(self.name.as_deref().unwrap_or("file")),
                    clean(self.mime.as_deref().unwrap_or("application/octet-stream")),
                    human_size(self.size.unwrap_or(0)),
                    clean(self.media_id.as_deref().unwrap_or("?"))
                )
            }
            EventKind::Joined => format!("[{g}] joined, added by {from}; members: {members}"),
            EventKind::MemberAdded => format!("[{g}] {from} added {members}"),
            EventKind::MemberRemoved if self.from.is_empty() => format!("[{g}] {members} removed: {text}"),
            EventKind::MemberRemoved => format!("[{g}] {from} removed {members}"),
            EventKind::Left if self.from.is_empty() => format!("[{g}] {members} left: {text}"),
            EventKind::Left => format!("[{g}] {members} left"),
            EventKind::ForkDetected => format!(
                "[{g}] WARNING: {members} computed another state of this group at epoch {}; messages between you may not decrypt",
                self.epoch.unwrap_or(0)
            ),
            EventKind::Rejoined if self.text.is_some() => format!(
                "[{g}] this device rejoined the group at epoch {} ({text}); earlier messages it had not read are lost to it",
                self.epoch.unwrap_or(0),
            ),
            EventKind::Rejoined => format!(
                "[{g}] {from} rejoined (new device state) at epoch {}",
                self.epoch.unwrap_or(0)
            ),
            EventKind::KeyChanged => format!(
                "[{g}] WARNING: the identity key of {members} differs from the one first seen; compare fingerprints out of band"
            ),
            EventKind::Error => format!("[{g}] ERROR: this group could not be brought up to date: {text}"),
            EventKind::Listening => format!("listening as {from} on {text}; Ctrl-C to stop"),
        }
    }

    /// [`Event::human`] behind the local date and time it happened.
    pub fn human_at(&self) -> String {
        format!("{} {}", local_time(self.timestamp_ms), self.human())
    }
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
            EventKind::Text,
            "00112233445566778899aabbccddeeff",
            "mallory",
            1,
            0,
        );
        e.text = Some("ok\n[g] carol: my new key is X\u{1b}[2J\u{202e}".into());
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
}
