//! openmls storage that can hold back one kind of write.
//!
//! openmls stores a group's message secrets (the secret tree's ratchet
//! state) after every message it decrypts or encrypts. Over SQLite that is
//! one statement parsed and run per message, about a quarter of what a
//! member in a 200-member group spent per message (docs/BENCHMARKS.md).
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

use crate::db::StateCodec;

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

    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_mls_join_config::<GroupId, MlsGroupJoinConfig>(group_id, config)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), Self::Error> {
        self.inner
            .append_own_leaf_node::<GroupId, LeafNode>(group_id, leaf_node)
    }

    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), Self::Error> {
        self.inner
            .queue_proposal::<GroupId, ProposalRef, QueuedProposal>(
                group_id,
                proposal_ref,
                proposal,
            )
    }

    fn write_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Result<(), Self::Error> {
        self.inner.write_tree::<GroupId, TreeSync>(group_id, tree)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_interim_transcript_hash::<GroupId, InterimTranscriptHash>(
                group_id,
                interim_transcript_hash,
            )
    }

    fn write_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_context::<GroupId, GroupContext>(group_id, group_context)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_confirmation_tag::<GroupId, ConfirmationTag>(group_id, confirmation_tag)
    }

    fn write_group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_group_state::<GroupState, GroupId>(group_id, group_state)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_resumption_psk_store::<GroupId, ResumptionPskStore>(
                group_id,
                resumption_psk_store,
            )
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_own_leaf_index::<GroupId, LeafNodeIndex>(group_id, own_leaf_index)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_group_epoch_secrets::<GroupId, GroupEpochSecrets>(group_id, group_epoch_secrets)
    }

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_signature_key_pair::<SignaturePublicKey, SignatureKeyPair>(
                public_key,
                signature_key_pair,
            )
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_encryption_key_pair::<EncryptionKey, HpkeKeyPair>(public_key, key_pair)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), Self::Error> {
        self.inner
            .write_encryption_epoch_key_pairs::<GroupId, EpochKey, HpkeKeyPair>(
                group_id, epoch, leaf_index, key_pairs,
            )
    }

    fn write_key_package<
        HashReference: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_key_package::<HashReference, KeyPackage>(hash_ref, key_package)
    }

    fn write_psk<
        PskId: traits::PskId<CURRENT_VERSION>,
        PskBundle: traits::PskBundle<CURRENT_VERSION>,
    >(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), Self::Error> {
        self.inner.write_psk::<PskId, PskBundle>(psk_id, psk)
    }

    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, Self::Error> {
        self.inner
            .mls_group_join_config::<GroupId, MlsGroupJoinConfig>(group_id)
    }

    fn own_leaf_nodes<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, Self::Error> {
        self.inner.own_leaf_nodes::<GroupId, LeafNode>(group_id)
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, Self::Error> {
        self.inner
            .queued_proposal_refs::<GroupId, ProposalRef>(group_id)
    }

    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, Self::Error> {
        self.inner
            .queued_proposals::<GroupId, ProposalRef, QueuedProposal>(group_id)
    }

    fn tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, Self::Error> {
        self.inner.tree::<GroupId, TreeSync>(group_id)
    }

    fn group_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, Self::Error> {
        self.inner.group_context::<GroupId, GroupContext>(group_id)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, Self::Error> {
        self.inner
            .interim_transcript_hash::<GroupId, InterimTranscriptHash>(group_id)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, Self::Error> {
        self.inner
            .confirmation_tag::<GroupId, ConfirmationTag>(group_id)
    }

    fn group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, Self::Error> {
        self.inner.group_state::<GroupState, GroupId>(group_id)
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, Self::Error> {
        self.inner
            .resumption_psk_store::<GroupId, ResumptionPskStore>(group_id)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, Self::Error> {
        self.inner
            .own_leaf_index::<GroupId, LeafNodeIndex>(group_id)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, Self::Error> {
        self.inner
            .group_epoch_secrets::<GroupId, GroupEpochSecrets>(group_id)
    }

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, Self::Error> {
        self.inner
            .signature_key_pair::<SignaturePublicKey, SignatureKeyPair>(public_key)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, Self::Error> {
        self.inner
            .encryption_key_pair::<HpkeKeyPair, EncryptionKey>(public_key)
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, Self::Error> {
        self.inner
            .encryption_epoch_key_pairs::<GroupId, EpochKey, HpkeKeyPair>(
                group_id, epoch, leaf_index,
            )
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, Self::Error> {
        self.inner
            .key_package::<KeyPackageRef, KeyPackage>(hash_ref)
    }

    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, PskId: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, Self::Error> {
        self.inner.psk::<PskBundle, PskId>(psk_id)
    }

    fn remove_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), Self::Error> {
        self.inner
            .remove_proposal::<GroupId, ProposalRef>(group_id, proposal_ref)
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_own_leaf_nodes::<GroupId>(group_id)
    }

    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_group_config::<GroupId>(group_id)
    }

    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_tree::<GroupId>(group_id)
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_confirmation_tag::<GroupId>(group_id)
    }

    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_group_state::<GroupId>(group_id)
    }

    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_context::<GroupId>(group_id)
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner
            .delete_interim_transcript_hash::<GroupId>(group_id)
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner
            .delete_all_resumption_psk_secrets::<GroupId>(group_id)
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_own_leaf_index::<GroupId>(group_id)
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_group_epoch_secrets::<GroupId>(group_id)
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner
            .clear_proposal_queue::<GroupId, ProposalRef>(group_id)
    }

    fn delete_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), Self::Error> {
        self.inner
            .delete_signature_key_pair::<SignaturePublicKey>(public_key)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), Self::Error> {
        self.inner
            .delete_encryption_key_pair::<EncryptionKey>(public_key)
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), Self::Error> {
        self.inner
            .delete_encryption_epoch_key_pairs::<GroupId, EpochKey>(group_id, epoch, leaf_index)
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        self.inner.delete_key_package::<KeyPackageRef>(hash_ref)
    }

    fn delete_psk<PskKey: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskKey,
    ) -> Result<(), Self::Error> {
        self.inner.delete_psk::<PskKey>(psk_id)
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
        let mut ag = MlsGroup::new(&ap, &alice, &mls::create_config(), alice.credential()).unwrap();
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
        let mut g = MlsGroup::new(&p, &alice, &mls::create_config(), alice.credential()).unwrap();
        p.storage().hold_message_secrets();
        // Sending advances the ratchet, so openmls writes its secrets.
        g.create_message(&p, &alice, b"hi").unwrap();
        let e = p.storage().flush().unwrap_err();
        assert!(e.to_string().contains("not encoded as JSON"), "{e}");
    }
}
