//! The database file: opening it (WAL, durability, locking between the
//! processes of one home), Huddle's tables and the migrations of older
//! databases.

use std::path::Path;

use openmls_sqlite_storage::SqliteStorageProvider;
use rusqlite::Connection;

use super::StateCodec;
use crate::error::{ClientError, Result};

/// How long a statement waits for another process of the home to finish
/// its transaction before failing with "database is locked".
pub const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens (creating if needed) the database at `path` and brings its schema
/// up to date.
pub fn open(path: &Path) -> Result<Connection> {
    let mut conn = Connection::open(path)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        // MLS secrets live here: readable by this user only.
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a committed transaction survives power loss, not only a crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Several processes of one home (`listen` beside `send`) share this
    // file. A write transaction takes the write lock when it begins
    // (IMMEDIATE): a deferred one that read first and then writes fails at
    // once with SQLITE_BUSY when another process wrote in between, whatever
    // the busy timeout. Waiting for another process's transaction is
    // bounded by the timeout; transactions never span a network round trip.
    conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
    conn.busy_timeout(BUSY_TIMEOUT)?;
    SqliteStorageProvider::<StateCodec, &mut Connection>::new(&mut conn)
        .run_migrations()
        .map_err(|e| ClientError::Io(format!("migrating the MLS tables: {e}")))?;
    conn.execute_batch(SCHEMA)?;
    migrate(&conn)?;
    Ok(conn)
}

/// Brings a database written by an earlier version up to date.
fn migrate(conn: &Connection) -> Result<()> {
    let has_own = |c: &Connection| -> rusqlite::Result<bool> {
        c.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('huddle_events') WHERE name = 'own'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
    };
    if has_own(conn)? {
        return Ok(());
    }
    // Another process of the home may be doing the same.
    let tx = conn.unchecked_transaction()?;
    if !has_own(&tx)? {
        tx.execute_batch(
            "ALTER TABLE huddle_events ADD COLUMN own INTEGER NOT NULL DEFAULT 0;
             INSERT OR REPLACE INTO huddle_kv (key, value)
                 SELECT 'shown_upto', COALESCE(MAX(rowid), 0) FROM huddle_events;",
        )?;
    }
    tx.commit()?;
    Ok(())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS huddle_groups (
    id BLOB PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    -- creating | active | leaving | removed | left
    state TEXT NOT NULL,
    -- last log entry processed
    cursor INTEGER NOT NULL,
    -- our own commit, sent but not yet known to be accepted
    pending_commit BLOB,
    -- when the oldest unhandled proposal was appended (ms), if any
    proposals_since_ms INTEGER,
    joined_ms INTEGER NOT NULL
);
-- the history; `own` marks what this device did itself (shown by the
-- command that did it, and by `listen`, but not again by `sync`); rows are
-- reported in rowid order, up to the `shown_upto` setting
CREATE TABLE IF NOT EXISTS huddle_events (
    group_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    event TEXT NOT NULL,
    own INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (group_id, seq, idx)
);
-- log positions of entries this device sent (it cannot decrypt its own)
CREATE TABLE IF NOT EXISTS huddle_own (
    group_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (group_id, seq)
);
-- application messages this device posted whose log position it has not
-- learnt yet (another process of the home may process them first), by the
-- BLAKE3 of the posted message: the event to record once placed (NULL for
-- messages that show nothing)
CREATE TABLE IF NOT EXISTS huddle_outbox (
    group_id BLOB NOT NULL,
    digest BLOB NOT NULL,
    event TEXT,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, digest)
);
CREATE TABLE IF NOT EXISTS huddle_kv (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- identity keys as first seen (trust on first use)
CREATE TABLE IF NOT EXISTS huddle_users (
    name TEXT PRIMARY KEY,
    identity_key BLOB NOT NULL,
    first_seen_ms INTEGER NOT NULL
);
-- the longest device log seen of each user: its length and the hash of
-- its last entry, which every log served later must extend
CREATE TABLE IF NOT EXISTS huddle_device_logs (
    user TEXT PRIMARY KEY,
    len INTEGER NOT NULL,
    head BLOB NOT NULL
);
-- uploads not yet announced: key, salt and id, to resume them
CREATE TABLE IF NOT EXISTS huddle_uploads (
    upload_key TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS huddle_media (
    media_id BLOB PRIMARY KEY,
    group_id BLOB NOT NULL,
    info TEXT NOT NULL
);
";
