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
use crate::storage::Storage;

/// Codec for openmls' stored values.
///
/// The group state openmls reads back for every batch of messages it
/// processes (the ratchet tree above all, which grows with the group) is
/// stored in postcard, behind a leading [`BINARY`] byte; everything else,
/// and in particular every value openmls uses as a lookup key, is JSON.
/// Keys must stay JSON: rows are found by comparing their encoded keys, and
/// databases written before the binary encoding existed hold JSON keys.
/// Reading goes by the first byte (JSON never starts with 0x00), so rows in
/// either encoding load, and an older database is upgraded row by row as
/// openmls rewrites it.
///
/// Parsing the state as JSON was most of what a member spent on a message
/// in a 200-member group (byte strings are JSON arrays of numbers); see
/// docs/BENCHMARKS.md.
#[derive(Debug, Default)]
pub struct StateCodec;

/// First byte of a postcard-encoded value.
pub const BINARY: u8 = 0;

/// Entities stored in postcard: openmls' per-group state, none of which is
/// ever a key. Matched on the last segment of the type's name.
const BINARY_ENTITIES: &[&str] = &[
    "TreeSync",
    "MessageSecretsStore",
    "GroupEpochSecrets",
    "GroupContext",
    "ResumptionPskStore",
    "InterimTranscriptHash",
    "ConfirmationTag",
];

fn stored_binary<T: ?Sized>() -> bool {
    let name = std::any::type_name::<T>().trim_start_matches('&');
    // Generic parameters would follow the name; these types have none.
    let last = name.rsplit("::").next().unwrap_or(name);
    BINARY_ENTITIES.contains(&last)
}

/// Why a stored value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A JSON value.
    #[error("stored MLS state (JSON): {0}")]
    Json(#[from] serde_json::Error),
    /// A postcard value.
    #[error("stored MLS state (binary): {0}")]
    Binary(#[from] postcard::Error),
}

impl Codec for StateCodec {
    type Error = CodecError;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        if stored_binary::<T>() {
            Ok(postcard::to_extend(value, vec![BINARY])?)
        } else {
            Ok(serde_json::to_vec(value)?)
        }
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        match slice.split_first() {
            Some((&BINARY, rest)) => {
                let (v, left) = postcard::take_from_bytes(rest)?;
                if !left.is_empty() {
                    return Err(postcard::Error::DeserializeBadEncoding.into());
                }
                Ok(v)
            }
            _ => Ok(serde_json::from_slice(slice)?),
        }
    }
}

/// The encoding every database used before [`StateCodec`]: JSON
/// throughout. Not used to write; kept so tests and the state benchmark
/// can build databases as older versions left them.
#[derive(Debug, Default)]
pub struct LegacyJsonCodec;

impl Codec for LegacyJsonCodec {
    type Error = serde_json::Error;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(value)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        serde_json::from_slice(slice)
    }
}

/// An openmls provider whose storage writes go to `conn`. Build it over a
/// transaction to make MLS changes and Huddle's own rows atomic.
pub struct Provider<'a, C: Codec = StateCodec> {
    crypto: &'a RustCrypto,
    conn: &'a Connection,
    storage: Storage<'a, C>,
}

impl<C: Codec> std::fmt::Debug for Provider<'_, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Provider")
    }
}

impl<'a> Provider<'a> {
    /// A provider over `conn`.
    pub fn new(crypto: &'a RustCrypto, conn: &'a Connection) -> Self {
        Self::with_codec(crypto, conn)
    }
}

impl<'a, C: Codec> Provider<'a, C> {
    /// A provider over `conn` encoding with `C` (tests and benchmarks build
    /// databases in the legacy encoding with it).
    pub fn with_codec(crypto: &'a RustCrypto, conn: &'a Connection) -> Self {
        Self {
            crypto,
            conn,
            storage: Storage::new(conn),
        }
    }

    /// The connection (or transaction) the storage writes to.
    pub fn storage_conn(&self) -> &'a Connection {
        self.conn
    }
}

impl<'a, C: Codec> OpenMlsProvider for Provider<'a, C> {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = Storage<'a, C>;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use huddle_core::mls;
    use openmls::prelude::*;

    fn key_package(name: &str) -> KeyPackage {
        let provider = openmls_rust_crypto::OpenMlsRustCrypto::default();
        let id = Identity::generate(name);
        KeyPackage::builder()
            .leaf_node_capabilities(mls::capabilities())
            .build(mls::CIPHERSUITE, &provider, &id, id.credential())
            .expect("key package")
            .key_package()
            .clone()
    }

    /// (data_type, first byte, group_id column) of every group row.
    fn rows(conn: &Connection) -> Vec<(String, u8, Vec<u8>)> {
        let mut st = conn
            .prepare(
                "SELECT data_type, group_data, group_id FROM openmls_group_data ORDER BY data_type",
            )
            .unwrap();
        st.query_map([], |r| {
            let data: Vec<u8> = r.get(1)?;
            Ok((r.get(0)?, data[0], r.get(2)?))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
    }

    /// A group of `n` members created by `alice`, stored with codec `C`.
    fn create<C: Codec>(conn: &Connection, alice: &Identity, n: usize) -> GroupId {
        let crypto = RustCrypto::default();
        let p = Provider::<C>::with_codec(&crypto, conn);
        let mut g = MlsGroup::new(&p, alice, &mls::create_config(), alice.credential()).unwrap();
        let kps: Vec<_> = (1..n).map(|i| key_package(&format!("m{i}"))).collect();
        g.add_members(&p, alice, &kps).unwrap();
        g.merge_pending_commit(&p).unwrap();
        g.group_id().clone()
    }

    #[test]
    fn per_group_state_is_binary_and_keys_stay_json() {
        let conn = open_in_memory();
        let crypto = RustCrypto::default();
        let alice = Identity::generate("alice");
        let provider = Provider::new(&crypto, &conn);
        let gid = create::<StateCodec>(&conn, &alice, 4);
        let rows = rows(&conn);
        let binary: Vec<&str> = rows
            .iter()
            .filter(|r| r.1 == BINARY)
            .map(|r| r.0.as_str())
            .collect();
        for t in [
            "tree",
            "message_secrets",
            "group_epoch_secrets",
            "context",
            "resumption_psk_store",
            "interim_transcript_hash",
            "confirmation_tag",
        ] {
            assert!(binary.contains(&t), "{t} is not binary: {binary:?}");
        }
        // The rest is JSON, and the key column is the JSON of the group id,
        // as in every database written before.
        assert!(rows
            .iter()
            .any(|r| r.1 == b'{' || r.1 == b'"' || r.1 == b'['));
        let key = serde_json::to_vec(&gid).unwrap();
        assert!(rows.iter().all(|r| r.2 == key));
        let g = MlsGroup::load(provider.storage(), &gid).unwrap().unwrap();
        assert_eq!(g.members().count(), 4);
        assert_eq!(g.epoch().as_u64(), 1);
    }

    #[test]
    fn a_database_written_as_json_loads_and_upgrades_as_it_is_rewritten() {
        let conn = open_in_memory();
        let crypto = RustCrypto::default();
        let alice = Identity::generate("alice");
        let gid = create::<LegacyJsonCodec>(&conn, &alice, 3);
        assert!(rows(&conn).iter().all(|r| r.1 != BINARY));

        let provider = Provider::new(&crypto, &conn);
        let mut g = MlsGroup::load(provider.storage(), &gid).unwrap().unwrap();
        assert_eq!(g.members().count(), 3);
        // Sending advances the ratchet: the secrets are rewritten, in binary.
        g.create_message(&provider, &alice, b"hello").unwrap();
        let rows = rows(&conn);
        let secrets = rows.iter().find(|r| r.0 == "message_secrets").unwrap();
        assert_eq!(secrets.1, BINARY);
        let g2 = MlsGroup::load(provider.storage(), &gid).unwrap().unwrap();
        assert_eq!(g2.epoch(), g.epoch());
        assert_eq!(g2.members().count(), 3);
    }

    #[test]
    fn a_damaged_binary_row_is_an_error_not_a_panic() {
        let conn = open_in_memory();
        let crypto = RustCrypto::default();
        let alice = Identity::generate("alice");
        let provider = Provider::new(&crypto, &conn);
        let gid = create::<StateCodec>(&conn, &alice, 2);
        conn.execute(
            "UPDATE openmls_group_data SET group_data = X'00FFFFFFFF' WHERE data_type = 'tree'",
            [],
        )
        .unwrap();
        assert!(MlsGroup::load(provider.storage(), &gid).is_err());
        // Trailing bytes after a complete value are refused too.
        let mut v = vec![BINARY];
        v.extend(postcard::to_allocvec(&7u64).unwrap());
        assert_eq!(StateCodec::from_slice::<u64>(&v).unwrap(), 7);
        v.push(0);
        assert!(StateCodec::from_slice::<u64>(&v).is_err());
    }

    fn open_in_memory() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        SqliteStorageProvider::<StateCodec, &mut Connection>::new(&mut conn)
            .run_migrations()
            .unwrap();
        conn
    }
}
