//! A group's public MLS state as the DS keeps it: the openmls `PublicGroup`
//! with its storage, snapshots for the store, and the checks of a new
//! group's epoch-0 state.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use huddle_core::mls::principal_of;
use huddle_core::policy::{Policy, PolicyError, Role};
use huddle_core::proto::{ErrorBody, ErrorCode};
use huddle_core::GroupId;
use openmls::prelude::{tls_codec::Deserialize as _, *};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;

use crate::store::{GroupWrite, StoreError};

/// The public MLS state of a group: openmls' view plus the in-memory
/// storage openmls writes it to, which is what gets persisted.
pub(super) struct MlsState {
    pub(super) public: PublicGroup,
    pub(super) storage: MemoryStorage,
    /// The policy the group context carries (`None`: a group made before
    /// policies), decoded once per epoch.
    pub(super) policy: Option<Arc<Policy>>,
    /// How many users each invite admitted: the DS's own count, kept with
    /// the state so that it is written with the commit that used it.
    pub(super) invite_uses: BTreeMap<[u8; 32], u32>,
}

/// The key under which the invite counts ride in a state snapshot beside
/// openmls' own values (whose keys never start with a zero byte).
const INVITE_USES_KEY: &[u8] = b"\0huddle/invite-uses";

impl MlsState {
    /// Builds the state around `public`, decoding its policy.
    pub(super) fn new(public: PublicGroup, storage: MemoryStorage) -> Result<Self, PolicyError> {
        let policy = Policy::from_extensions(public.group_context().extensions())?.map(Arc::new);
        Ok(Self {
            public,
            storage,
            policy,
            invite_uses: BTreeMap::new(),
        })
    }

    /// Takes `policy` as the group's (that of the commit just merged), and
    /// forgets the counts of invites it no longer holds.
    pub(super) fn set_policy(&mut self, policy: Option<Policy>) {
        self.policy = policy.map(Arc::new);
        let policy = self.policy.clone();
        self.invite_uses
            .retain(|k, _| policy.as_ref().is_some_and(|p| p.invite(k).is_some()));
    }

    /// How many users the invite with key `key` admitted.
    pub(super) fn invite_uses(&self, key: &[u8; 32]) -> u32 {
        self.invite_uses.get(key).copied().unwrap_or(0)
    }

    pub(super) fn snapshot(&self) -> Vec<u8> {
        let values = self.storage.values.read().expect("mls storage lock");
        let mut pairs: Vec<(&Vec<u8>, &Vec<u8>)> = values.iter().collect();
        let uses = (!self.invite_uses.is_empty()).then(|| {
            (
                INVITE_USES_KEY.to_vec(),
                postcard::to_allocvec(&self.invite_uses).expect("serialising to a Vec cannot fail"),
            )
        });
        if let Some((k, v)) = &uses {
            pairs.push((k, v));
        }
        pairs.sort();
        postcard::to_allocvec(&pairs).expect("serialising to a Vec cannot fail")
    }

    pub(super) fn restore(id: &GroupId, snapshot: &[u8]) -> Result<Self, StoreError> {
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = postcard::from_bytes(snapshot)
            .map_err(|e| StoreError::Corrupt(format!("group state: {e}")))?;
        let mut invite_uses = BTreeMap::new();
        if let Some(i) = pairs.iter().position(|(k, _)| k == INVITE_USES_KEY) {
            let (_, v) = pairs.remove(i);
            invite_uses = postcard::from_bytes(&v)
                .map_err(|e| StoreError::Corrupt(format!("group {id} invite counts: {e}")))?;
        }
        let storage = MemoryStorage::default();
        storage
            .values
            .write()
            .expect("mls storage lock")
            .extend(pairs);
        // openmls' in-memory storage panics on values it cannot decode;
        // a corrupt stored state must be an error, not a dead server.
        let gid = openmls::group::GroupId::from_slice(id.as_bytes());
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            PublicGroup::load(&storage, &gid)
        }))
        .map_err(|_| StoreError::Corrupt(format!("group {id} state does not decode")))?;
        let public = loaded
            .map_err(|e| StoreError::Corrupt(format!("group state: {e:?}")))?
            .ok_or_else(|| StoreError::Corrupt(format!("group {id} state is incomplete")))?;
        let mut state = Self::new(public, storage)
            .map_err(|e| StoreError::Corrupt(format!("group {id} policy: {e}")))?;
        state.invite_uses = invite_uses;
        Ok(state)
    }
}

/// Restores a group's public MLS state from snapshot bytes as read from
/// the store, without starting its task: for fuzzing the decoder of stored
/// state. Corrupt bytes give an error.
#[cfg(any(test, feature = "fuzzing"))]
pub fn restore_state_for_fuzzing(snapshot: &[u8]) -> Result<(), StoreError> {
    MlsState::restore(&GroupId([0; 16]), snapshot).map(|_| ())
}

/// Validates the epoch-0 state of a new group posted by `user` with
/// identity key `identity_key`, returning the write that creates it.
pub fn validate_new_group(
    id: GroupId,
    user: &str,
    identity_key: &[u8; 32],
    group_info: &[u8],
    ratchet_tree: &[u8],
    now_ms: u64,
) -> Result<(GroupWrite, Vec<u8>), ErrorBody> {
    let bad = |m: String| ErrorBody::new(ErrorCode::InvalidMessage, m);
    let msg = MlsMessageIn::tls_deserialize_exact(group_info)
        .map_err(|e| bad(format!("group info does not parse: {e}")))?;
    let MlsMessageBodyIn::GroupInfo(vgi) = msg.extract() else {
        return Err(bad("expected a GroupInfo message".into()));
    };
    let tree = RatchetTreeIn::tls_deserialize_exact(ratchet_tree)
        .map_err(|e| bad(format!("ratchet tree does not parse: {e}")))?;
    let storage = MemoryStorage::default();
    let (public, info) = PublicGroup::from_external(
        &RustCrypto::default(),
        &storage,
        tree,
        vgi,
        ProposalStore::new(),
    )
    .map_err(|e| bad(format!("group state does not verify: {e}")))?;
    if public.group_id().as_slice() != id.as_bytes() {
        return Err(bad(
            "group id of the GroupInfo differs from the request".into()
        ));
    }
    if public.group_context().epoch().as_u64() != 0 {
        return Err(bad("a new group must be at epoch 0".into()));
    }
    if public.ciphersuite() != huddle_core::mls::CIPHERSUITE {
        return Err(bad(format!(
            "unsupported ciphersuite {:?}",
            public.ciphersuite()
        )));
    }
    let members: Vec<Member> = public.members().collect();
    let [only] = members.as_slice() else {
        return Err(bad(
            "a new group must have exactly one member, its creator".into()
        ));
    };
    if principal_of(&only.credential).as_deref() != Some(user) {
        return Err(bad(
            "the creator's credential must name the authenticated user".into(),
        ));
    }
    if only.signature_key.as_slice() != identity_key.as_slice() {
        return Err(bad(
            "the creator's signature key must be its registered identity key".into(),
        ));
    }
    // The creator's leaf comes from a key package it made for itself: the
    // same lifetime bound and capabilities as any other (PROTOCOL.md 13.2,
    // 13.5).
    let leaf = public
        .leaf(LeafNodeIndex::new(0))
        .ok_or_else(|| bad("the creator's leaf is missing".into()))?;
    let openmls::treesync::LeafNodeSource::KeyPackage(life) = leaf.leaf_node_source() else {
        return Err(bad(
            "the creator's leaf must have leaf_node_source key_package".into(),
        ));
    };
    if let Err(span) = huddle_core::mls::check_lifetime_span(life) {
        return Err(bad(format!(
            "the creator's leaf is valid for {span} s, longer than {} s",
            huddle_core::mls::MAX_KEY_PACKAGE_LIFETIME_SECS
        )));
    }
    huddle_core::mls::check_capabilities(leaf.capabilities())
        .map_err(|e| bad(format!("the creator's leaf: {e}")))?;
    // Kept for rejoins, which need its external public key (RFC 9420
    // section 12.4.3.2): without it no member could rejoin at epoch 0.
    if info.extensions().external_pub().is_none() {
        return Err(bad(
            "the GroupInfo has no external public key (external_pub extension)".into(),
        ));
    }
    // Every new group carries a policy naming its creator the only owner
    // and nobody else (PROTOCOL.md 13.10).
    let creator = huddle_core::devices::user_part(user);
    let state =
        MlsState::new(public, storage).map_err(|e| bad(format!("the group's policy: {e}")))?;
    match state.policy.as_deref() {
        Some(p) if p.roles().eq([(creator, Role::Owner)]) => {}
        Some(_) => {
            return Err(bad(format!(
            "a new group's policy must name its creator, {creator}, the only owner and nobody else"
        )))
        }
        None => {
            return Err(bad(
                "a new group must carry a policy (group context extension 0xf1d0)".into(),
            ))
        }
    }
    let info_epoch0 = Some((0, Bytes::copy_from_slice(group_info)));
    let snapshot = state.snapshot();
    let write = GroupWrite {
        group_info: info_epoch0,
        ..GroupWrite::create(id, user, now_ms, snapshot.clone())
    };
    Ok((write, snapshot))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `stored_records` fuzz target: stored state whose JSON
    /// openmls' storage cannot decode made it panic.
    #[test]
    fn undecodable_stored_state_is_an_error_not_a_panic() {
        let bytes =
            include_bytes!("../../../fuzz/regressions/stored_records/undecodable-tree-json");
        assert!(matches!(
            restore_state_for_fuzzing(bytes),
            Err(StoreError::Corrupt(_))
        ));
        assert!(restore_state_for_fuzzing(&[]).is_err());
    }
}
