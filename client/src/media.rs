//! Media items known to this device.

use huddle_core::GroupId;
use rusqlite::{params, Connection};

use crate::app::MediaInfo;
use crate::error::Result;

/// Records a media item announced in a group, so `download` can find its
/// key later.
pub fn remember(conn: &Connection, group: &GroupId, info: &MediaInfo) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO huddle_media (media_id, group_id, info) VALUES (?1, ?2, ?3)",
        params![
            info.media_id.as_slice(),
            group.as_bytes().as_slice(),
            serde_json::to_string(info).expect("media info serialises")
        ],
    )?;
    Ok(())
}
