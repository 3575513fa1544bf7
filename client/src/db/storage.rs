//! openmls storage that can hold back one kind of write.
//!
//! openmls stores a group's message secrets (the secret tree's ratchet
//! state) after every message it decrypts or encrypts. Over SQLite that is
//! one statement parsed and run per message, a large share of what a
//! member of a busy group spends per message (docs/bench/HISTORY.md).
//! [`Storage`] passes everything to `openmls_sqlite_storage` unchanged,
//! except that while [`Storage::hold_message_secrets`] is on, message
//! secrets are kept in memory and only the last value per group is
//! written, by [`Storage::flush`]. Reads see the held value, so openmls
//! finds what it wrote; deleting drops it.
//!
//! The caller holds writes only inside a database transaction that it
//! flushes before committing: a transaction that is not committed loses
//! the held value together with everything else it wrote, which is exactly
//! what write-through storage would have lost.

use std::cell::RefCell;
use std::collections::HashMap;

use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::storage::{traits, Key, StorageProvider, CURRENT_VERSION};
use rusqlite::Connection;
use serde::Serialize;

use super::StateCodec;

/// A message-secrets value held back: its encoding, and how to write it
/// (typed, through the wrapped storage) once held writes are flushed.
struct Held<C: Codec> {
    value: Vec<u8>,
    write: WriteFn<C>,
}

type WriteFn<C> =
    fn(&SqliteStorageProvider<C, &Connection>, &RawKey, &[u8]) -> Result<(), rusqlite::Error>;

/// A lookup key kept as the JSON the codec made of it, and written back
/// verbatim: [`StateCodec`] encodes keys as JSON (rows are found by
/// comparing encoded keys), so re-encoding this gives the same bytes
/// ([`Storage::flush`] checks).
#[derive(Debug, Serialize)]
struct RawKey(Box<serde_json::value::RawValue>);

impl Key<CURRENT_VERSION> for RawKey {}
impl traits::GroupId<CURRENT_VERSION> for RawKey {}

/// openmls storage over a borrowed connection (or transaction), holding
/// back message-secrets writes on request.
pub struct Storage<'a, C: Codec = StateCodec> {
    inner: SqliteStorageProvider<C, &'a Connection>,
    conn: &'a Connection,
    /// Held writes by encoded group id; None: writing through.
    held: RefCell<Option<HashMap<Vec<u8>, Held<C>>>>,
}

impl<C: Codec> std::fmt::Debug for Storage<'_, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Storage")
    }
}

fn encode_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(e))
}

fn decode_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
}

/// Why a held value cannot be written back under its key.
#[derive(Debug, thiserror::Error)]
#[error("a held MLS value's key is not encoded as JSON by this codec")]
struct KeyNotJson;

fn write_held<C: Codec, M: traits::MessageSecrets<CURRENT_VERSION>>(
    inner: &SqliteStorageProvider<C, &Connection>,
    group_id: &RawKey,
    value: &[u8],
) -> Result<(), rusqlite::Error> {
    let secrets: M = C::from_slice(value).map_err(decode_err)?;
    inner.write_message_secrets(group_id, &secrets)
}

impl<'a, C: Codec> Storage<'a, C> {
    /// Storage over `conn`, writing through.
    pub fn new(conn: &'a Connection) -> Self {
        Self {
            inner: SqliteStorageProvider::new(conn),
            conn,
            held: RefCell::new(None),
        }
    }

    /// From now until [`Self::flush`], keeps message secrets in memory and
    /// writes only the last value per group. Only inside a transaction,
    /// flushed before it commits: otherwise the stored ratchet state would
    /// fall behind the keys already used.
    pub fn hold_message_secrets(&self) {
        debug_assert!(
            !self.conn.is_autocommit(),
            "message secrets held outside a transaction"
        );
        let mut held = self.held.borrow_mut();
        if held.is_none() {
            *held = Some(HashMap::new());
        }
    }

    /// Writes what is held and goes back to writing through.
    pub fn flush(&self) -> Result<(), rusqlite::Error> {
        let Some(held) = self.held.borrow_mut().take() else {
            return Ok(());
        };
        for (key, h) in held {
            // The key as the codec encoded it, rebuilt so that the codec
            // encodes it to the same bytes; refused (not written under
            // another key) if the codec does not encode keys as JSON.
            let raw = String::from_utf8(key.clone())
                .ok()
                .and_then(|t| serde_json::value::RawValue::from_string(t).ok())
                .map(RawKey)
                .filter(|k| C::to_vec(k).is_ok_and(|b| b == key))
                .ok_or_else(|| encode_err(KeyNotJson))?;
            (h.write)(&self.inner, &raw, &h.value)?;
        }
        Ok(())
    }
}

/// Implements `StorageProvider` methods that go straight to `self.inner`:
/// each line is the method's name, its generic parameters (each bounded by
/// the `traits` item of the same name), its arguments after `&self` and what
/// its `Result` holds.
macro_rules! forward {
    ($($name:ident<$($g:ident: $bound:ident),*>($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(
            fn $name<$($g: traits::$bound<CURRENT_VERSION>),*>(
                &self,
                $($arg: $ty),*
            ) -> Result<$ret, Self::Error> {
                self.inner.$name::<$($g),*>($($arg),*)
            }
        )*
    };
}

impl<C: Codec> StorageProvider<CURRENT_VERSION> for Storage<'_, C> {
    type Error = rusqlite::Error;

    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Result<(), Self::Error> {
        let mut held = self.held.borrow_mut();
        let Some(held) = held.as_mut() else {
            return self.inner.write_message_secrets(group_id, message_secrets);
        };
        let value = C::to_vec(message_secrets).map_err(encode_err)?;
        held.insert(
            C::to_vec(group_id).map_err(encode_err)?,
            Held {
                value,
                write: write_held::<C, MessageSecrets>,
            },
        );
        Ok(())
    }

    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, Self::Error> {
        if let Some(held) = self.held.borrow().as_ref() {
            if let Some(h) = held.get(&C::to_vec(group_id).map_err(encode_err)?) {
                return C::from_slice(&h.value).map(Some).map_err(decode_err);
            }
        }
        self.inner.message_secrets(group_id)
    }

    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        if let Some(held) = self.held.borrow_mut().as_mut() {
            held.remove(&C::to_vec(group_id).map_err(encode_err)?);
        }
        self.inner.delete_message_secrets(group_id)
    }

    // Everything else goes straight to the wrapped storage.
    forward! {
        write_mls_join_config<GroupId: GroupId, MlsGroupJoinConfig: MlsGroupJoinConfig>(group_id: &GroupId, config: &MlsGroupJoinConfig) -> ();
        append_own_leaf_node<GroupId: GroupId, LeafNode: LeafNode>(group_id: &GroupId, leaf_node: &LeafNode) -> ();
        queue_proposal<GroupId: GroupId, ProposalRef: ProposalRef, QueuedProposal: QueuedProposal>(group_id: &GroupId, proposal_ref: &ProposalRef, proposal: &QueuedProposal) -> ();
        write_tree<GroupId: GroupId, TreeSync: TreeSync>(group_id: &GroupId, tree: &TreeSync) -> ();
        write_interim_transcript_hash<GroupId: GroupId, InterimTranscriptHash: InterimTranscriptHash>(group_id: &GroupId, interim_transcript_hash: &InterimTranscriptHash) -> ();
        write_context<GroupId: GroupId, GroupContext: GroupContext>(group_id: &GroupId, group_context: &GroupContext) -> ();
        write_confirmation_tag<GroupId: GroupId, ConfirmationTag: ConfirmationTag>(group_id: &GroupId, confirmation_tag: &ConfirmationTag) -> ();
        write_group_state<GroupState: GroupState, GroupId: GroupId>(group_id: &GroupId, group_state: &GroupState) -> ();
        write_resumption_psk_store<GroupId: GroupId, ResumptionPskStore: ResumptionPskStore>(group_id: &GroupId, resumption_psk_store: &ResumptionPskStore) -> ();
        write_own_leaf_index<GroupId: GroupId, LeafNodeIndex: LeafNodeIndex>(group_id: &GroupId, own_leaf_index: &LeafNodeIndex) -> ();
        write_group_epoch_secrets<GroupId: GroupId, GroupEpochSecrets: GroupEpochSecrets>(group_id: &GroupId, group_epoch_secrets: &GroupEpochSecrets) -> ();
        write_signature_key_pair<SignaturePublicKey: SignaturePublicKey, SignatureKeyPair: SignatureKeyPair>(public_key: &SignaturePublicKey, signature_key_pair: &SignatureKeyPair) -> ();
        write_encryption_key_pair<EncryptionKey: EncryptionKey, HpkeKeyPair: HpkeKeyPair>(public_key: &EncryptionKey, key_pair: &HpkeKeyPair) -> ();
        write_encryption_epoch_key_pairs<GroupId: GroupId, EpochKey: EpochKey, HpkeKeyPair: HpkeKeyPair>(group_id: &GroupId, epoch: &EpochKey, leaf_index: u32, key_pairs: &[HpkeKeyPair]) -> ();
        write_key_package<HashReference: HashReference, KeyPackage: KeyPackage>(hash_ref: &HashReference, key_package: &KeyPackage) -> ();
        write_psk<PskId: PskId, PskBundle: PskBundle>(psk_id: &PskId, psk: &PskBundle) -> ();
        mls_group_join_config<GroupId: GroupId, MlsGroupJoinConfig: MlsGroupJoinConfig>(group_id: &GroupId) -> Option<MlsGroupJoinConfig>;
        own_leaf_nodes<GroupId: GroupId, LeafNode: LeafNode>(group_id: &GroupId) -> Vec<LeafNode>;
        queued_proposal_refs<GroupId: GroupId, ProposalRef: ProposalRef>(group_id: &GroupId) -> Vec<ProposalRef>;
        queued_proposals<GroupId: GroupId, ProposalRef: ProposalRef, QueuedProposal: QueuedProposal>(group_id: &GroupId) -> Vec<(ProposalRef, QueuedProposal)>;
        tree<GroupId: GroupId, TreeSync: TreeSync>(group_id: &GroupId) -> Option<TreeSync>;
        group_context<GroupId: GroupId, GroupContext: GroupContext>(group_id: &GroupId) -> Option<GroupContext>;
        interim_transcript_hash<GroupId: GroupId, InterimTranscriptHash: InterimTranscriptHash>(group_id: &GroupId) -> Option<InterimTranscriptHash>;
        confirmation_tag<GroupId: GroupId, ConfirmationTag: ConfirmationTag>(group_id: &GroupId) -> Option<ConfirmationTag>;
        group_state<GroupState: GroupState, GroupId: GroupId>(group_id: &GroupId) -> Option<GroupState>;
        resumption_psk_store<GroupId: GroupId, ResumptionPskStore: ResumptionPskStore>(group_id: &GroupId) -> Option<ResumptionPskStore>;
        own_leaf_index<GroupId: GroupId, LeafNodeIndex: LeafNodeIndex>(group_id: &GroupId) -> Option<LeafNodeIndex>;
        group_epoch_secrets<GroupId: GroupId, GroupEpochSecrets: GroupEpochSecrets>(group_id: &GroupId) -> Option<GroupEpochSecrets>;
        signature_key_pair<SignaturePublicKey: SignaturePublicKey, SignatureKeyPair: SignatureKeyPair>(public_key: &SignaturePublicKey) -> Option<SignatureKeyPair>;
        encryption_key_pair<HpkeKeyPair: HpkeKeyPair, EncryptionKey: EncryptionKey>(public_key: &EncryptionKey) -> Option<HpkeKeyPair>;
        encryption_epoch_key_pairs<GroupId: GroupId, EpochKey: EpochKey, HpkeKeyPair: HpkeKeyPair>(group_id: &GroupId, epoch: &EpochKey, leaf_index: u32) -> Vec<HpkeKeyPair>;
        key_package<KeyPackageRef: HashReference, KeyPackage: KeyPackage>(hash_ref: &KeyPackageRef) -> Option<KeyPackage>;
        psk<PskBundle: PskBundle, PskId: PskId>(psk_id: &PskId) -> Option<PskBundle>;
        remove_proposal<GroupId: GroupId, ProposalRef: ProposalRef>(group_id: &GroupId, proposal_ref: &ProposalRef) -> ();
        delete_own_leaf_nodes<GroupId: GroupId>(group_id: &GroupId) -> ();
        delete_group_config<GroupId: GroupId>(group_id: &GroupId) -> ();
        delete_tree<GroupId: GroupId>(group_id: &GroupId) -> ();
        delete_confirmation_tag<GroupId: GroupId>(group_id: &GroupId) -> ();
        delete_group_state<GroupId: GroupId>(group_id: &GroupId) -> ();
        delete_context<GroupId: GroupId>(group_id: &GroupId) -> ();
        delete_interim_transcript_hash<GroupId: GroupId>(group_id: &GroupId) -> ();
        delete_all_resumption_psk_secrets<GroupId: GroupId>(group_id: &GroupId) -> ();
        delete_own_leaf_index<GroupId: GroupId>(group_id: &GroupId) -> ();
        delete_group_epoch_secrets<GroupId: GroupId>(group_id: &GroupId) -> ();
        clear_proposal_queue<GroupId: GroupId, ProposalRef: ProposalRef>(group_id: &GroupId) -> ();
        delete_signature_key_pair<SignaturePublicKey: SignaturePublicKey>(public_key: &SignaturePublicKey) -> ();
        delete_encryption_key_pair<EncryptionKey: EncryptionKey>(public_key: &EncryptionKey) -> ();
        delete_encryption_epoch_key_pairs<GroupId: GroupId, EpochKey: EpochKey>(group_id: &GroupId, epoch: &EpochKey, leaf_index: u32) -> ();
        delete_key_package<KeyPackageRef: HashReference>(hash_ref: &KeyPackageRef) -> ();
        delete_psk<PskKey: PskId>(psk_id: &PskKey) -> ();
    }
}

#[cfg(test)]
mod tests {
    use huddle_core::mls;
    use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
    use openmls::prelude::*;
    use openmls_rust_crypto::RustCrypto;

    use super::*;
    use crate::db::Provider;
    use crate::identity::Identity;

    fn open_in_memory() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        SqliteStorageProvider::<StateCodec, &mut Connection>::new(&mut conn)
            .run_migrations()
            .unwrap();
        conn
    }

    fn wire(m: &MlsMessageOut) -> MlsMessageIn {
        MlsMessageIn::tls_deserialize_exact(m.tls_serialize_detached().unwrap()).unwrap()
    }

    fn protocol(m: &MlsMessageOut) -> ProtocolMessage {
        wire(m).try_into_protocol_message().unwrap()
    }

    /// The stored message-secrets row, if any.
    fn secrets_row(conn: &Connection) -> Option<Vec<u8>> {
        conn.query_row(
            "SELECT group_data FROM openmls_group_data WHERE data_type = 'message_secrets'",
            [],
            |r| r.get(0),
        )
        .ok()
    }

    /// Alice and Bob in one group, each with their own database; Alice
    /// has sent `n` messages Bob has not read yet.
    fn pair(alice_db: &Connection, bob_db: &Connection, n: usize) -> (GroupId, Vec<MlsMessageOut>) {
        let crypto = RustCrypto::default();
        let (alice, bob) = (Identity::generate("alice"), Identity::generate("bob"));
        let (ap, bp) = (
            Provider::new(&crypto, alice_db),
            Provider::new(&crypto, bob_db),
        );
        let kp = KeyPackage::builder()
            .leaf_node_capabilities(mls::capabilities())
            .build(mls::CIPHERSUITE, &bp, &bob, bob.credential())
            .unwrap()
            .key_package()
            .clone();
        let mut ag = MlsGroup::new(
            &ap,
            &alice,
            &mls::create_config("alice"),
            alice.credential(),
        )
        .unwrap();
        let (_, welcome, _) = ag.add_members(&ap, &alice, &[kp]).unwrap();
        ag.merge_pending_commit(&ap).unwrap();
        let MlsMessageBodyIn::Welcome(w) = wire(&welcome).extract() else {
            panic!("not a welcome")
        };
        let tree = ag.export_ratchet_tree().into();
        StagedWelcome::new_from_welcome(&bp, &mls::join_config(), w, Some(tree))
            .unwrap()
            .into_group(&bp)
            .unwrap();
        let sent = (0..n)
            .map(|i| {
                ag.create_message(&ap, &alice, format!("m{i}").as_bytes())
                    .unwrap()
            })
            .collect();
        (ag.group_id().clone(), sent)
    }

    #[test]
    fn held_secrets_are_read_back_and_written_only_when_flushed() {
        let (alice_db, bob_db) = (open_in_memory(), open_in_memory());
        let (gid, sent) = pair(&alice_db, &bob_db, 3);
        let crypto = RustCrypto::default();
        let before = secrets_row(&bob_db).expect("secrets stored on joining");

        let tx = bob_db.unchecked_transaction().unwrap();
        let p = Provider::new(&crypto, &tx);
        p.storage().hold_message_secrets();
        let mut g = MlsGroup::load(p.storage(), &gid).unwrap().unwrap();
        for m in &sent[..2] {
            g.process_message(&p, protocol(m)).unwrap();
        }
        // Nothing written yet...
        assert_eq!(secrets_row(&tx).as_deref(), Some(before.as_slice()));
        // ...but the group as loaded now has used the keys of both.
        let mut again = MlsGroup::load(p.storage(), &gid).unwrap().unwrap();
        assert!(again.process_message(&p, protocol(&sent[1])).is_err());
        p.storage().flush().unwrap();
        assert_ne!(secrets_row(&tx).as_deref(), Some(before.as_slice()));
        drop(p);
        tx.commit().unwrap();

        // What was flushed is what a later load sees: the first message
        // cannot be read twice, the third reads.
        let p = Provider::new(&crypto, &bob_db);
        let mut g = MlsGroup::load(p.storage(), &gid).unwrap().unwrap();
        assert!(g.process_message(&p, protocol(&sent[0])).is_err());
        let ProcessedMessageContent::ApplicationMessage(m) = g
            .process_message(&p, protocol(&sent[2]))
            .unwrap()
            .into_content()
        else {
            panic!("not an application message")
        };
        assert_eq!(m.into_bytes(), b"m2");
    }

    #[test]
    fn deleting_held_secrets_deletes_them() {
        let (alice_db, bob_db) = (open_in_memory(), open_in_memory());
        let (gid, sent) = pair(&alice_db, &bob_db, 1);
        let crypto = RustCrypto::default();
        let tx = bob_db.unchecked_transaction().unwrap();
        let p = Provider::new(&crypto, &tx);
        p.storage().hold_message_secrets();
        let mut g = MlsGroup::load(p.storage(), &gid).unwrap().unwrap();
        g.process_message(&p, protocol(&sent[0])).unwrap();
        p.storage().delete_message_secrets(&gid).unwrap();
        p.storage().flush().unwrap();
        drop(p);
        tx.commit().unwrap();
        assert_eq!(secrets_row(&bob_db), None);
    }

    /// Everything in postcard, keys too.
    #[derive(Debug, Default)]
    struct BinaryKeys;

    impl Codec for BinaryKeys {
        type Error = postcard::Error;
        fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
            postcard::to_allocvec(value)
        }
        fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
            postcard::from_bytes(slice)
        }
    }

    #[test]
    fn a_codec_without_json_keys_fails_the_flush_instead_of_writing_elsewhere() {
        let mut conn = Connection::open_in_memory().unwrap();
        SqliteStorageProvider::<BinaryKeys, &mut Connection>::new(&mut conn)
            .run_migrations()
            .unwrap();
        let crypto = RustCrypto::default();
        let alice = Identity::generate("alice");
        let tx = conn.unchecked_transaction().unwrap();
        let p = Provider::<BinaryKeys>::with_codec(&crypto, &tx);
        let mut g =
            MlsGroup::new(&p, &alice, &mls::create_config("alice"), alice.credential()).unwrap();
        p.storage().hold_message_secrets();
        // Sending advances the ratchet, so openmls writes its secrets.
        g.create_message(&p, &alice, b"hi").unwrap();
        let e = p.storage().flush().unwrap_err();
        assert!(e.to_string().contains("not encoded as JSON"), "{e}");
    }
}
