//! The client's one embedded database: openmls state and Huddle's own
//! tables in one SQLite file, so that processing a message and advancing
//! the cursor past it commit in one transaction. Every SQL statement of the
//! client lives in this module.

use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::Codec;
use openmls_traits::OpenMlsProvider;
use rusqlite::Connection;

mod codec;
pub mod groups;
pub mod history;
pub mod media;
mod schema;
pub mod settings;
pub mod storage;
pub mod users;

pub use codec::{CodecError, LegacyJsonCodec, StateCodec, BINARY};
pub use schema::{open, BUSY_TIMEOUT};
use storage::Storage;

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
