//! Media this device knows of: items announced in its groups
//! (`huddle_media`, with their keys) and its own uploads not yet announced
//! (`huddle_uploads`, to resume them).

use huddle_core::GroupId;
use rusqlite::{params, Connection, OptionalExtension as _};
use serde::{de::DeserializeOwned, Serialize};

use crate::app::MediaInfo;
use crate::error::{ClientError, Result};

/// Records a media item announced in a group. The first announcement of an
/// id wins: a later one (from any group) cannot redirect this device to
/// other bytes or another key.
pub fn remember(conn: &Connection, group: &GroupId, info: &MediaInfo) -> Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO huddle_media (media_id, group_id, info) VALUES (?1, ?2, ?3)",
        params![
            info.media_id.as_slice(),
            group.as_bytes().as_slice(),
            serde_json::to_string(info).expect("media info serialises")
        ],
    )?;
    Ok(())
}

/// Up to two items whose id starts with `prefix` (hex digits only), with
/// their groups: one is a match, two an ambiguous prefix.
pub fn find(conn: &Connection, prefix: &str) -> Result<Vec<(GroupId, MediaInfo)>> {
    // hex() is upper case.
    let rows: Vec<(Vec<u8>, String)> = conn
        .prepare(
            "SELECT group_id, info FROM huddle_media WHERE substr(hex(media_id), 1, ?2) = ?1 LIMIT 2",
        )?
        .query_map(
            params![prefix.to_ascii_uppercase(), prefix.len() as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
        .collect::<rusqlite::Result<_>>()?;
    rows.into_iter()
        .map(|(g, info)| {
            let g = GroupId::from_slice(&g)
                .ok_or_else(|| ClientError::Io("corrupt media row".into()))?;
            let info: MediaInfo = serde_json::from_str(&info)
                .map_err(|e| ClientError::Io(format!("corrupt media row: {e}")))?;
            Ok((g, info))
        })
        .collect()
}

/// Keeps the state of an upload under `key` until it is announced.
pub fn put_upload<T: Serialize>(
    conn: &Connection,
    key: &str,
    state: &T,
    now_ms: u64,
) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO huddle_uploads (upload_key, state, created_ms) VALUES (?1, ?2, ?3)",
        params![
            key,
            serde_json::to_string(state).expect("serialises"),
            now_ms as i64
        ],
    )?;
    Ok(())
}

/// The state of the upload under `key`, if one is kept (and still reads).
pub fn pending_upload<T: DeserializeOwned>(conn: &Connection, key: &str) -> Result<Option<T>> {
    let s: Option<String> = conn
        .query_row(
            "SELECT state FROM huddle_uploads WHERE upload_key = ?1",
            [key],
            |r| r.get(0),
        )
        .optional()?;
    Ok(s.and_then(|s| serde_json::from_str(&s).ok()))
}

/// Forgets the upload under `key`.
pub fn drop_upload(conn: &Connection, key: &str) -> Result<()> {
    conn.execute("DELETE FROM huddle_uploads WHERE upload_key = ?1", [key])?;
    Ok(())
}
