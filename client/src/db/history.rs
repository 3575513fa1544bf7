//! The history (`huddle_events`), which entries were this device's own
//! (`huddle_own`), and the outbox of messages posted but not yet placed in
//! the log (`huddle_outbox`).

use std::collections::HashMap;

use huddle_core::GroupId;
use rusqlite::{params, Connection, OptionalExtension as _};

use crate::error::Result;
use crate::event::Event;

/// Whether an event in the history is of something this device did itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// What others did, or what this device noticed: reported by `sync`.
    Others,
    /// A message or change this user made, reported by the command that
    /// made it (and by `listen`), not again by `sync`.
    Own,
}

fn json(e: &Event) -> String {
    serde_json::to_string(e).expect("events serialise")
}

/// Records the events of log entries (several per entry are numbered in
/// order; recording an entry's events again replaces them).
pub fn record(conn: &Connection, id: &GroupId, events: &[Event], origin: Origin) -> Result<()> {
    let mut idx: HashMap<u64, i64> = HashMap::new();
    for e in events {
        let i = idx.entry(e.seq).or_insert(0);
        conn.prepare_cached(
            "INSERT OR REPLACE INTO huddle_events (group_id, seq, idx, event, own) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            id.as_bytes().as_slice(),
            e.seq as i64,
            *i,
            json(e),
            origin == Origin::Own
        ])?;
        *i += 1;
    }
    Ok(())
}

/// Records an event that is not one of a log entry's (a warning, a note)
/// after those of its position, without replacing any.
pub fn record_note(conn: &Connection, id: &GroupId, e: &Event) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO huddle_events (group_id, seq, idx, event) VALUES (?1, ?2, \
         (SELECT COALESCE(MAX(idx) + 1, 0) FROM huddle_events WHERE group_id = ?1 AND seq = ?2), ?3)",
    )?
    .execute(params![id.as_bytes().as_slice(), e.seq as i64, json(e)])?;
    Ok(())
}

/// Replaces the first event recorded at `e.seq` (the `joined` event, once
/// the group's name is known) in place, so it stays before what follows.
pub fn replace_first(conn: &Connection, id: &GroupId, e: &Event) -> Result<()> {
    conn.execute(
        "UPDATE huddle_events SET event = ?3 WHERE group_id = ?1 AND seq = ?2 AND idx = 0",
        params![id.as_bytes().as_slice(), e.seq as i64, json(e)],
    )?;
    Ok(())
}

/// The last `limit` events of a group, oldest first.
pub fn latest(conn: &Connection, id: &GroupId, limit: usize) -> Result<Vec<Event>> {
    let rows: Vec<String> = conn
        .prepare(
            "SELECT event FROM huddle_events WHERE group_id = ?1 ORDER BY seq DESC, idx DESC LIMIT ?2",
        )?
        .query_map(params![id.as_bytes().as_slice(), limit as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(oldest_first(&rows))
}

/// Up to `limit` events of a group before position `seq`, oldest first.
pub fn before(conn: &Connection, id: &GroupId, seq: u64, limit: usize) -> Result<Vec<Event>> {
    let rows: Vec<String> = conn
        .prepare(
            "SELECT event FROM huddle_events WHERE group_id = ?1 AND seq < ?2 \
             ORDER BY seq DESC, idx DESC LIMIT ?3",
        )?
        .query_map(
            params![id.as_bytes().as_slice(), seq as i64, limit as i64],
            |r| r.get(0),
        )?
        .collect::<rusqlite::Result<_>>()?;
    Ok(oldest_first(&rows))
}

/// Events read newest first, oldest first (rows that do not decode, from
/// a newer version, are left out).
fn oldest_first(rows: &[String]) -> Vec<Event> {
    let mut out: Vec<Event> = rows
        .iter()
        .filter_map(|s| serde_json::from_str(s).ok())
        .collect();
    out.reverse();
    out
}

/// How many texts and media items of others a group's history holds
/// after `seq`.
pub fn unread_after(conn: &Connection, id: &GroupId, seq: u64) -> Result<usize> {
    let n: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM huddle_events WHERE group_id = ?1 AND seq > ?2 AND own = 0 \
             AND json_extract(event, '$.type') IN ('text', 'media')",
        )?
        .query_row(params![id.as_bytes().as_slice(), seq as i64], |r| r.get(0))?;
    Ok(n as usize)
}

/// Events recorded after row `mark`, in the order they were recorded, with
/// this device's own left out unless `upto` is [`Origin::Own`]; and the
/// newest row covered. Moves the home's `shown_upto` setting past them.
pub fn after(conn: &Connection, mark: i64, upto: Origin) -> Result<(Vec<Event>, i64)> {
    let rows: Vec<(i64, String, bool)> = conn
        .prepare_cached(
            "SELECT rowid, event, own FROM huddle_events WHERE rowid > ?1 ORDER BY rowid",
        )?
        .query_map([mark], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let Some(last) = rows.last().map(|r| r.0) else {
        return Ok((Vec::new(), mark));
    };
    conn.prepare_cached(
        "INSERT INTO huddle_kv (key, value) VALUES ('shown_upto', ?1) \
         ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
    )?
    .execute([last])?;
    let events = rows
        .into_iter()
        .filter(|(_, _, own)| !own || upto == Origin::Own)
        .filter_map(|(_, json, _)| serde_json::from_str(&json).ok())
        .collect();
    Ok((events, last))
}

/// Whether the entry at `seq` is this device's own.
pub fn is_own(conn: &Connection, id: &GroupId, seq: u64) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM huddle_own WHERE group_id = ?1 AND seq = ?2")?
        .query_row(params![id.as_bytes().as_slice(), seq as i64], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Records that the entry at `seq` is this device's own (it cannot decrypt
/// its own messages).
pub fn mark_own(conn: &Connection, id: &GroupId, seq: u64) -> Result<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO huddle_own (group_id, seq) VALUES (?1, ?2)")?
        .execute(params![id.as_bytes().as_slice(), seq as i64])?;
    Ok(())
}

/// Puts a message about to be posted in the outbox, by the BLAKE3 of its
/// bytes, with the event to record once it is placed.
pub fn put_outbox(
    conn: &Connection,
    id: &GroupId,
    digest: &[u8; 32],
    event: Option<&Event>,
    now_ms: u64,
) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO huddle_outbox (group_id, digest, event, created_ms) VALUES (?1, ?2, ?3, ?4)",
        params![id.as_bytes().as_slice(), digest.as_slice(), event.map(json), now_ms as i64],
    )?;
    Ok(())
}

/// Takes a posted message out of the outbox: `Some(event)` (itself optional)
/// if it was there.
pub fn take_outbox(
    conn: &Connection,
    id: &GroupId,
    digest: &[u8; 32],
) -> Result<Option<Option<Event>>> {
    let row: Option<Option<String>> = conn
        .prepare_cached(
            "DELETE FROM huddle_outbox WHERE group_id = ?1 AND digest = ?2 RETURNING event",
        )?
        .query_row(params![id.as_bytes().as_slice(), digest.as_slice()], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(row.map(|e| e.and_then(|e| serde_json::from_str(&e).ok())))
}

/// Whether the outbox holds anything for the group.
pub fn outbox_pending(conn: &Connection, id: &GroupId) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM huddle_outbox WHERE group_id = ?1 LIMIT 1")?
        .query_row(params![id.as_bytes().as_slice()], |_| Ok(()))
        .optional()?
        .is_some())
}
