//! Numbers kept by name (`huddle_kv`): the inbox cursor, the `shown_upto`
//! mark of the history, per-group flags.

use rusqlite::{params, Connection, OptionalExtension as _};

use crate::error::Result;

/// The value of `key` (0 if unset).
pub fn get(conn: &Connection, key: &str) -> Result<u64> {
    Ok(conn
        .prepare_cached("SELECT value FROM huddle_kv WHERE key = ?1")?
        .query_row([key], |r| r.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0) as u64)
}

/// Sets `key` to `value`.
pub fn set(conn: &Connection, key: &str, value: u64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO huddle_kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value as i64])?;
    Ok(())
}
