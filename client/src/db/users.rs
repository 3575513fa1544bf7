//! Identity keys of other users as first seen (`huddle_users`, trust on
//! first use), and how far each user's device log was seen
//! (`huddle_device_logs`).

use rusqlite::{params, Connection, OptionalExtension as _};

use crate::error::Result;

/// The identity key first seen for `name`, if any.
pub fn known_key(conn: &Connection, name: &str) -> Result<Option<Vec<u8>>> {
    Ok(conn
        .prepare_cached("SELECT identity_key FROM huddle_users WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?)
}

/// Remembers `key` as the identity key of `name`, first seen now.
pub fn remember(conn: &Connection, name: &str, key: &[u8], now_ms: u64) -> Result<()> {
    conn.execute(
        "INSERT INTO huddle_users (name, identity_key, first_seen_ms) VALUES (?1, ?2, ?3)",
        params![name, key, now_ms as i64],
    )?;
    Ok(())
}

/// Remembers identity keys first seen and returns the users whose key
/// differs from the one remembered.
pub fn remember_keys(
    conn: &Connection,
    keys: &[(String, Vec<u8>)],
    now_ms: u64,
) -> Result<Vec<String>> {
    let mut changed = Vec::new();
    for (name, key) in keys {
        match known_key(conn, name)? {
            Some(k) if &k != key => changed.push(name.clone()),
            Some(_) => {}
            None => remember(conn, name, key, now_ms)?,
        }
    }
    Ok(changed)
}

/// The length and head of the longest device log of `user` seen here.
pub fn device_log_seen(conn: &Connection, user: &str) -> Result<Option<(u32, [u8; 32])>> {
    let row: Option<(i64, Vec<u8>)> = conn
        .prepare_cached("SELECT len, head FROM huddle_device_logs WHERE user = ?1")?
        .query_row([user], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.and_then(|(len, head)| Some((u32::try_from(len).ok()?, head.try_into().ok()?))))
}

/// Remembers that `user`'s device log was seen up to `len` entries ending
/// in `head`.
pub fn saw_device_log(conn: &Connection, user: &str, len: u32, head: &[u8; 32]) -> Result<()> {
    conn.execute(
        "INSERT INTO huddle_device_logs (user, len, head) VALUES (?1, ?2, ?3)
         ON CONFLICT(user) DO UPDATE SET len = excluded.len, head = excluded.head",
        params![user, i64::from(len), head.as_slice()],
    )?;
    Ok(())
}
