//! The client's one embedded database: openmls state (through
//! `openmls_sqlite_storage`) and Huddle's own tables, in one SQLite file, so
//! that processing a message and advancing the cursor past it commit in one
//! transaction.

use std::path::Path;

use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use rusqlite::Connection;

use crate::error::{ClientError, Result};

/// serde_json codec for openmls' stored values.
#[derive(Debug, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    type Error = serde_json::Error;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(value)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        serde_json::from_slice(slice)
    }
}

/// openmls storage over a borrowed connection (or transaction).
pub type Storage<'a> = SqliteStorageProvider<JsonCodec, &'a Connection>;

/// An openmls provider whose storage writes go to `conn`. Build it over a
/// transaction to make MLS changes and Huddle's own rows atomic.
pub struct Provider<'a> {
    crypto: &'a RustCrypto,
    conn: &'a Connection,
    storage: Storage<'a>,
}

impl std::fmt::Debug for Provider<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Provider")
    }
}

impl<'a> Provider<'a> {
    /// A provider over `conn`.
    pub fn new(crypto: &'a RustCrypto, conn: &'a Connection) -> Self {
        Self {
            crypto,
            conn,
            storage: SqliteStorageProvider::new(conn),
        }
    }
}

impl<'a> Provider<'a> {
    /// The connection (or transaction) the storage writes to.
    pub fn storage_conn(&self) -> &'a Connection {
        self.conn
    }
}

impl<'a> OpenMlsProvider for Provider<'a> {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = Storage<'a>;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        self.crypto
    }
}

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
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    SqliteStorageProvider::<JsonCodec, &mut Connection>::new(&mut conn)
        .run_migrations()
        .map_err(|e| ClientError::Io(format!("migrating the MLS tables: {e}")))?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
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
CREATE TABLE IF NOT EXISTS huddle_events (
    group_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (group_id, seq, idx)
);
-- log positions of entries this device sent (it cannot decrypt its own)
CREATE TABLE IF NOT EXISTS huddle_own (
    group_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (group_id, seq)
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
