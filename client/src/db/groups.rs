//! The `huddle_groups` table: each group this device is or was in, its
//! state, its log cursor and its own commit in flight.

use huddle_core::GroupId;
use rusqlite::{params, Connection, OptionalExtension as _};

use crate::error::{ClientError, Result};

/// Where this device stands in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    /// Created here; the DS has not confirmed it yet.
    Creating,
    /// A member.
    Active,
    /// Asked to leave; a remaining member has not committed it yet.
    Leaving,
    /// Left.
    Left,
    /// Removed by another member.
    Removed,
    /// Joining again by external commit (after a fork or a lost state).
    Rejoining,
}

impl GroupState {
    /// The state as stored and as shown (`group list`, `--json`).
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Creating => "creating",
            GroupState::Active => "active",
            GroupState::Leaving => "leaving",
            GroupState::Left => "left",
            GroupState::Removed => "removed",
            GroupState::Rejoining => "rejoining",
        }
    }

    /// Whether this device still counts itself a member (it reads and, if
    /// active, sends).
    pub fn is_current(self) -> bool {
        matches!(
            self,
            GroupState::Active | GroupState::Leaving | GroupState::Creating
        )
    }
}

impl std::fmt::Display for GroupState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for GroupState {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "creating" => GroupState::Creating,
            "active" => GroupState::Active,
            "leaving" => GroupState::Leaving,
            "left" => GroupState::Left,
            "removed" => GroupState::Removed,
            "rejoining" => GroupState::Rejoining,
            other => {
                return Err(ClientError::Io(format!(
                    "the database holds an unknown group state {other:?}"
                )))
            }
        })
    }
}

impl rusqlite::types::FromSql for GroupState {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        v.as_str()?
            .parse()
            .map_err(|e: ClientError| rusqlite::types::FromSqlError::Other(Box::new(e)))
    }
}

impl rusqlite::ToSql for GroupState {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

/// A group's row.
#[derive(Debug, Clone)]
pub struct GroupRow {
    /// The name the group had when this device joined ('' until known).
    pub name: String,
    /// Where this device stands.
    pub state: GroupState,
    /// The last log entry processed.
    pub cursor: u64,
    /// Our own commit, sent but not yet known to be accepted.
    pub pending_commit: Option<Vec<u8>>,
    /// When the oldest unhandled proposal was appended (ms), if any.
    pub proposals_since_ms: Option<u64>,
    /// Set when a commit voided our leave proposal (not a column: kept in
    /// the settings as `releave:<group>`).
    pub releave: bool,
}

/// A group as listed: its id, name and state.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The group.
    pub id: GroupId,
    /// Its name.
    pub name: String,
    /// Where this device stands in it.
    pub state: GroupState,
}

/// The row of group `id`, if this device knows the group.
pub fn load(conn: &Connection, id: &GroupId) -> Result<Option<GroupRow>> {
    // Statements run for every batch of messages come from the connection's
    // statement cache: parsing the SQL each time was a large share of the
    // SQLite time of a member of a busy group.
    Ok(conn
        .prepare_cached(
            "SELECT name, state, cursor, pending_commit, proposals_since_ms FROM huddle_groups WHERE id = ?1",
        )?
        .query_row(params![id.as_bytes().as_slice()], |r| {
            Ok(GroupRow {
                name: r.get(0)?,
                state: r.get(1)?,
                cursor: r.get::<_, i64>(2)? as u64,
                pending_commit: r.get(3)?,
                proposals_since_ms: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                releave: false,
            })
        })
        .optional()?)
}

/// Every group, in the order this device joined them.
pub fn list(conn: &Connection) -> Result<Vec<Listed>> {
    let rows: Vec<(Vec<u8>, String, GroupState)> = conn
        .prepare_cached("SELECT id, name, state FROM huddle_groups ORDER BY joined_ms")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, name, state)| {
            GroupId::from_slice(&id).map(|id| Listed { id, name, state })
        })
        .collect())
}

/// Saves what processing log entries changed.
pub fn save(conn: &Connection, id: &GroupId, row: &GroupRow) -> Result<()> {
    conn.prepare_cached(
        "UPDATE huddle_groups SET name = ?2, state = ?3, cursor = ?4, pending_commit = ?5, proposals_since_ms = ?6 WHERE id = ?1",
    )?
    .execute(params![
        id.as_bytes().as_slice(),
        row.name,
        row.state,
        row.cursor as i64,
        row.pending_commit,
        row.proposals_since_ms.map(|v| v as i64)
    ])?;
    Ok(())
}

/// A group created here, not yet confirmed by the DS.
pub fn insert_creating(conn: &Connection, id: &GroupId, name: &str, now_ms: u64) -> Result<()> {
    conn.execute(
        "INSERT INTO huddle_groups (id, name, state, cursor, joined_ms) VALUES (?1, ?2, ?3, 0, ?4)",
        params![
            id.as_bytes().as_slice(),
            name,
            GroupState::Creating,
            now_ms as i64
        ],
    )?;
    Ok(())
}

/// The DS confirmed a group created here.
pub fn confirm_created(conn: &Connection, id: &GroupId) -> Result<()> {
    conn.execute(
        "UPDATE huddle_groups SET state = ?2 WHERE id = ?1 AND state = ?3",
        params![
            id.as_bytes().as_slice(),
            GroupState::Active,
            GroupState::Creating
        ],
    )?;
    Ok(())
}

/// A group joined by Welcome at log position `cursor` (replacing what an
/// earlier membership left).
pub fn insert_joined(
    conn: &Connection,
    id: &GroupId,
    name: &str,
    cursor: u64,
    now_ms: u64,
) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO huddle_groups (id, name, state, cursor, joined_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id.as_bytes().as_slice(), name, GroupState::Active, cursor as i64, now_ms as i64],
    )?;
    Ok(())
}

/// Sets where this device stands in group `id`.
pub fn set_state(conn: &Connection, id: &GroupId, state: GroupState) -> Result<()> {
    conn.execute(
        "UPDATE huddle_groups SET state = ?2 WHERE id = ?1",
        params![id.as_bytes().as_slice(), state],
    )?;
    Ok(())
}

/// Sets the group's display name.
pub fn set_name(conn: &Connection, id: &GroupId, name: &str) -> Result<()> {
    conn.execute(
        "UPDATE huddle_groups SET name = ?2 WHERE id = ?1",
        params![id.as_bytes().as_slice(), name],
    )?;
    Ok(())
}

/// Records our own commit in flight (`None`: there is none).
pub fn set_pending_commit(conn: &Connection, id: &GroupId, commit: Option<&[u8]>) -> Result<()> {
    conn.execute(
        "UPDATE huddle_groups SET pending_commit = ?2 WHERE id = ?1",
        params![id.as_bytes().as_slice(), commit],
    )?;
    Ok(())
}

/// Our own commit was accepted and merged: nothing is pending any more.
pub fn commit_merged(conn: &Connection, id: &GroupId) -> Result<()> {
    conn.execute(
        "UPDATE huddle_groups SET pending_commit = NULL, proposals_since_ms = NULL WHERE id = ?1",
        params![id.as_bytes().as_slice()],
    )?;
    Ok(())
}

/// Forgets group `id` (a join by invite the DS refused: this device was
/// never in it).
pub fn forget(conn: &Connection, id: &GroupId) -> Result<()> {
    conn.execute(
        "DELETE FROM huddle_groups WHERE id = ?1",
        params![id.as_bytes().as_slice()],
    )?;
    Ok(())
}

/// A rejoin by external commit is under way (the row is created if this
/// device lost it).
pub fn start_rejoin(conn: &Connection, id: &GroupId, now_ms: u64) -> Result<()> {
    conn.execute(
        "INSERT INTO huddle_groups (id, name, state, cursor, joined_ms) VALUES (?1, '', ?3, 0, ?2)
         ON CONFLICT(id) DO UPDATE SET state = ?3, pending_commit = NULL, proposals_since_ms = NULL",
        params![id.as_bytes().as_slice(), now_ms as i64, GroupState::Rejoining],
    )?;
    Ok(())
}

/// The rejoin's commit was accepted at log position `seq`.
pub fn rejoined(conn: &Connection, id: &GroupId, seq: u64) -> Result<()> {
    conn.execute(
        "UPDATE huddle_groups SET state = ?3, cursor = ?2 WHERE id = ?1",
        params![id.as_bytes().as_slice(), seq as i64, GroupState::Active],
    )?;
    Ok(())
}
