//! The PostgreSQL store's schema: its versioned migrations and the step
//! that applies them at open.

use ::postgres::Transaction;

use super::pg;
use crate::store::StoreError;

/// The schema, one step per version; step `i` takes version `i` to
/// `i + 1`. Steps are never edited once released: a change is a new step.
pub const MIGRATIONS: &[&str] = &[
    // 1: everything the embedded store keeps.
    r#"
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        identity_key BYTEA NOT NULL CHECK (length(identity_key) = 32),
        registered_ms BIGINT NOT NULL
    );
    CREATE TABLE kp_pool (
        username TEXT NOT NULL,
        hash BYTEA NOT NULL,
        not_after BIGINT NOT NULL,
        bytes BYTEA NOT NULL,
        PRIMARY KEY (username, hash)
    );
    CREATE TABLE kp_last_resort (
        username TEXT PRIMARY KEY,
        not_after BIGINT NOT NULL,
        bytes BYTEA NOT NULL
    );
    CREATE TABLE groups (
        id BYTEA PRIMARY KEY CHECK (length(id) = 16),
        created_ms BIGINT NOT NULL,
        epoch BIGINT NOT NULL CHECK (epoch >= 0),
        head BIGINT NOT NULL CHECK (head >= 0),
        compacted BIGINT NOT NULL CHECK (compacted >= 0 AND compacted <= head),
        state BYTEA NOT NULL
    );
    CREATE TABLE log (
        group_id BYTEA NOT NULL REFERENCES groups (id),
        seq BIGINT NOT NULL CHECK (seq > 0),
        epoch BIGINT NOT NULL,
        kind SMALLINT NOT NULL CHECK (kind IN (0, 1, 2)),
        timestamp_ms BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (group_id, seq)
    );
    -- One commit per epoch of a group: a second one would fork it.
    CREATE UNIQUE INDEX log_one_commit_per_epoch ON log (group_id, epoch) WHERE kind = 0;
    CREATE TABLE members (
        group_id BYTEA NOT NULL REFERENCES groups (id),
        username TEXT NOT NULL,
        joined_seq BIGINT NOT NULL,
        removed_seq BIGINT,
        removed_ms BIGINT,
        PRIMARY KEY (group_id, username)
    );
    CREATE INDEX members_by_user ON members (username, group_id);
    CREATE TABLE inbox_head (
        username TEXT PRIMARY KEY,
        head BIGINT NOT NULL
    );
    CREATE TABLE welcome_shared (
        group_id BYTEA NOT NULL,
        commit_seq BIGINT NOT NULL,
        refs INTEGER NOT NULL CHECK (refs >= 0),
        bytes BYTEA NOT NULL,
        PRIMARY KEY (group_id, commit_seq)
    );
    CREATE TABLE inbox_items (
        username TEXT NOT NULL,
        seq BIGINT NOT NULL,
        group_id BYTEA NOT NULL,
        commit_seq BIGINT NOT NULL,
        timestamp_ms BIGINT NOT NULL,
        own BYTEA NOT NULL,
        PRIMARY KEY (username, seq)
    );
    CREATE INDEX inbox_items_by_time ON inbox_items (timestamp_ms);
    CREATE TABLE trees (
        group_id BYTEA NOT NULL,
        seq BIGINT NOT NULL,
        tree BYTEA NOT NULL,
        PRIMARY KEY (group_id, seq)
    );
    CREATE TABLE group_info (
        group_id BYTEA PRIMARY KEY,
        epoch BIGINT NOT NULL,
        info BYTEA NOT NULL
    );
    CREATE TABLE cursors (
        group_id BYTEA NOT NULL,
        username TEXT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (group_id, username)
    );
    CREATE TABLE epoch_auth (
        group_id BYTEA NOT NULL,
        epoch BIGINT NOT NULL,
        username TEXT NOT NULL,
        hash BYTEA NOT NULL CHECK (length(hash) = 32),
        PRIMARY KEY (group_id, epoch, username)
    );
    CREATE TABLE media (
        id BYTEA PRIMARY KEY,
        record BYTEA NOT NULL
    );
    "#,
    // 2: leases for the work one node does for the whole cluster. Time is
    // the database's, so nodes' clocks need not agree.
    r#"
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder BIGINT NOT NULL,
        until TIMESTAMPTZ NOT NULL
    );
    "#,
    // 3: the media quota counted by the database, so that it holds for all
    // nodes together: each item's length beside its record, and the sum.
    // (`total_len` of rows written before is filled in from their records
    // by `migrate`.)
    r#"
    ALTER TABLE media ADD COLUMN total_len BIGINT CHECK (total_len >= 0);
    CREATE TABLE media_usage (
        one BOOLEAN PRIMARY KEY CHECK (one),
        bytes BIGINT NOT NULL CHECK (bytes >= 0)
    );
    "#,
    // 4: users' devices: each user's signed device log, revoked principals,
    // links waiting for approval, and when each device last authenticated.
    r#"
    CREATE TABLE device_log (
        username TEXT NOT NULL,
        seq INTEGER NOT NULL CHECK (seq > 0),
        entry BYTEA NOT NULL,
        PRIMARY KEY (username, seq)
    );
    ALTER TABLE users ADD COLUMN revoked_ms BIGINT;
    CREATE TABLE device_links (
        username TEXT NOT NULL,
        code TEXT NOT NULL,
        device_key BYTEA NOT NULL CHECK (length(device_key) = 32),
        expires_ms BIGINT NOT NULL,
        PRIMARY KEY (username, code)
    );
    CREATE INDEX device_links_by_time ON device_links (expires_ms);
    CREATE TABLE device_seen (
        principal TEXT PRIMARY KEY,
        ms BIGINT NOT NULL
    );
    "#,
    // 5: users waiting for an admin to add them to a group (invites that
    // need approval).
    r#"
    CREATE TABLE join_requests (
        group_id BYTEA NOT NULL CHECK (length(group_id) = 16),
        username TEXT NOT NULL,
        invite BYTEA NOT NULL CHECK (length(invite) = 32),
        at_ms BIGINT NOT NULL,
        PRIMARY KEY (group_id, username)
    );
    "#,
];

/// The first version with `media.total_len` and `media_usage`.
const MEDIA_USAGE: i64 = 3;

/// Key of the advisory lock under which migrations run.
const MIGRATION_LOCK: i64 = 0x6875_6464_6c65_0001;

/// Applies the migrations this build knows and the database lacks, under
/// an advisory lock so that DS processes starting at once take turns;
/// refuses a database migrated by a newer build.
pub(super) fn migrate(t: &mut Transaction<'_>) -> Result<(), StoreError> {
    t.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(pg)?;
    t.batch_execute(
        "CREATE TABLE IF NOT EXISTS huddle_schema (version BIGINT NOT NULL);
         INSERT INTO huddle_schema (version)
             SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM huddle_schema);",
    )
    .map_err(pg)?;
    let version: i64 = t
        .query_one("SELECT version FROM huddle_schema", &[])
        .map_err(pg)?
        .get(0);
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Corrupt(format!(
            "the database has schema version {version}, this build knows up to {known}"
        )));
    }
    for step in &MIGRATIONS[version as usize..] {
        t.batch_execute(step).map_err(pg)?;
    }
    if version < MEDIA_USAGE {
        count_media(t)?;
    }
    t.execute("UPDATE huddle_schema SET version = $1", &[&known])
        .map_err(pg)?;
    Ok(())
}

/// Fills in `media.total_len` from the records stored before it existed
/// (or by a node of an older version), and `media_usage` with their sum.
/// The sum's row is locked first, and the sum read in a statement after
/// that: a reservation that committed while this one waited is counted.
pub(super) fn count_media(t: &mut Transaction<'_>) -> Result<(), StoreError> {
    t.execute(
        "INSERT INTO media_usage (one, bytes) VALUES (true, 0) ON CONFLICT (one) DO NOTHING",
        &[],
    )
    .map_err(pg)?;
    t.execute("SELECT 1 FROM media_usage WHERE one FOR UPDATE", &[])
        .map_err(pg)?;
    let rows = t
        .query("SELECT id, record FROM media WHERE total_len IS NULL", &[])
        .map_err(pg)?;
    for r in rows {
        let id: Vec<u8> = r.get(0);
        // A record that does not decode counts as nothing (and says so)
        // rather than keeping every node from starting.
        let len = match crate::store::dec_media(r.get(1)) {
            Ok(rec) => rec.total_len,
            Err(e) => {
                tracing::warn!(error = %e, "a media record could not be read; counted as 0 bytes");
                0
            }
        };
        t.execute(
            "UPDATE media SET total_len = $2 WHERE id = $1",
            &[&id, &(len.min(i64::MAX as u64) as i64)],
        )
        .map_err(pg)?;
    }
    t.execute(
        "UPDATE media_usage SET bytes = (SELECT coalesce(sum(total_len), 0) FROM media) WHERE one",
        &[],
    )
    .map_err(pg)?;
    Ok(())
}
