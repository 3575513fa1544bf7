//! How openmls' stored values are encoded: postcard for the per-group
//! state read back for every batch, JSON for everything used as a key.

use openmls_sqlite_storage::Codec;

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
/// Parsing the state as JSON was most of what a member of a large group
/// spent on a message (byte strings are JSON arrays of numbers); see
/// docs/bench/HISTORY.md.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Provider;
    use crate::identity::Identity;
    use huddle_core::mls;
    use openmls::prelude::*;
    use openmls_rust_crypto::RustCrypto;
    use openmls_sqlite_storage::SqliteStorageProvider;
    use rusqlite::Connection;

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
        let mut g =
            MlsGroup::new(&p, alice, &mls::create_config("alice"), alice.credential()).unwrap();
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
