//! Groups on this device: finding one by name or id, creating one,
//! listing them and reading their MLS state.

use bytes::Bytes;
use huddle_core::mls::{self};
use huddle_core::proto::{ErrorCode, Request, UserInfo};
use huddle_core::GroupId;
use openmls::prelude::{tls_codec::Serialize as _, *};

use crate::db::groups::Listed;
use crate::db::{self, Provider};
use crate::error::{ClientError, Result};
use crate::follow::member_names;

use super::{
    check_group_name, mls_gid, now_ms, serialize, short_id, Client, GroupListing, MemberKey,
};

impl Client {
    /// Finds a group on this device by id, by name, or by a unique prefix
    /// of its id (as the 8-digit short ids in the output), in any state
    /// (a group one was removed from keeps its history). A name that
    /// several groups share resolves to the one this device is still in,
    /// if only one is.
    pub fn resolve_group(&self, s: &str) -> Result<GroupId> {
        if s.is_empty() {
            return Err(ClientError::Usage("name a group (its name or id)".into()));
        }
        if let Ok(id) = s.parse::<GroupId>() {
            if db::groups::load(&self.db, &id)?.is_some() {
                return Ok(id);
            }
        }
        let rows = db::groups::list(&self.db)?;
        let named: Vec<&Listed> = rows.iter().filter(|r| r.name == s).collect();
        let current = |r: &&&Listed| r.state.is_current();
        let by_name: Vec<&Listed> = match named.as_slice() {
            _ if named.iter().filter(current).count() == 1 => {
                named.into_iter().filter(|r| current(&r)).collect()
            }
            _ => named,
        };
        // An id prefix (the short ids output shows). A name that looks
        // like another group's id prefix matches both, and is refused as
        // ambiguous rather than silently picking one: a member could name
        // its group after the short id of another.
        let prefix = s.to_ascii_lowercase();
        let by_id: Vec<&Listed> =
            if prefix.len() >= 4 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
                rows.iter()
                    .filter(|r| r.id.to_string().starts_with(&prefix))
                    .collect()
            } else {
                Vec::new()
            };
        let mut candidates = by_name;
        for r in by_id {
            if !candidates.iter().any(|c| c.id == r.id) {
                candidates.push(r);
            }
        }
        match candidates.as_slice() {
            [one] => Ok(one.id),
            [] => Err(ClientError::Usage(format!(
                "no group {s:?} on this device (see `huddle group list`)"
            ))),
            many => Err(ClientError::Usage(format!(
                "{} groups match {s:?}; use more of the id: {}",
                many.len(),
                many.iter()
                    .map(|r| format!("{} ({}, {})", short_id(&r.id), r.name, r.state))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Ids of the groups on this device named `name` (to warn before
    /// creating another).
    pub fn groups_named(&self, name: &str) -> Result<Vec<GroupId>> {
        Ok(db::groups::list(&self.db)?
            .into_iter()
            .filter(|g| g.name == name && g.state.is_current())
            .map(|g| g.id)
            .collect())
    }

    /// Creates a group with this device as its only member.
    pub async fn create_group(&mut self, name: &str) -> Result<GroupId> {
        check_group_name(name)?;
        let mut raw = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
        let id = GroupId(raw);
        let (info, tree) = {
            let tx = self.db.unchecked_transaction()?;
            let provider = Provider::new(&self.crypto, &tx);
            let group = MlsGroup::new_with_group_id(
                &provider,
                &self.identity,
                &mls::create_config(self.name()),
                mls_gid(&id),
                self.identity.credential(),
            )
            .map_err(ClientError::mls)?;
            let info = group
                .export_group_info(provider.crypto(), &self.identity, false)
                .map_err(ClientError::mls)?;
            let tree = group
                .export_ratchet_tree()
                .tls_serialize_detached()
                .map_err(ClientError::mls)?;
            db::groups::insert_creating(&tx, &id, name, now_ms())?;
            tx.commit()?;
            (serialize(&info)?, Bytes::from(tree))
        };
        self.confirm_creation(id, info, tree).await?;
        // The user's other devices are members from the start.
        let user = self.name().to_owned();
        let me = self.device();
        let others: Vec<UserInfo> = self
            .verified_devices(&user)
            .await?
            .devices()
            .filter(|d| d.device != me)
            .map(|d| UserInfo {
                name: huddle_core::devices::principal(&user, d.device),
                identity_key: d.key,
            })
            .collect();
        if !others.is_empty() {
            let names = others.iter().map(|i| i.name.clone()).collect();
            self.add_devices(
                &id,
                others,
                (super::membership::Change::DevicesAdded, names),
            )
            .await?;
        }
        Ok(id)
    }

    pub(super) async fn confirm_creation(
        &mut self,
        id: GroupId,
        info: Bytes,
        tree: Bytes,
    ) -> Result<()> {
        let r = self
            .request(&Request::CreateGroup {
                group: id,
                group_info: info,
                ratchet_tree: tree,
            })
            .await;
        match r {
            Ok(_) => {}
            Err(ClientError::Server(e)) if e.code == ErrorCode::GroupExists => {
                // A retry after a lost answer: the group is ours if we can
                // read its state.
                self.request(&Request::GroupState { group: id }).await?;
            }
            Err(e) => return Err(e),
        }
        db::groups::confirm_created(&self.db, &id)?;
        Ok(())
    }

    /// Groups on this device.
    pub fn groups(&self) -> Result<Vec<GroupListing>> {
        let mut out = Vec::new();
        for Listed {
            id: gid,
            name,
            state,
        } in db::groups::list(&self.db)?
        {
            let (epoch, members) = match self.load_group(&self.db, &gid) {
                Ok(g) if g.is_active() => (g.epoch().as_u64(), member_names(&g).len()),
                Ok(g) => (g.epoch().as_u64(), 0),
                Err(_) => (0, 0),
            };
            out.push(GroupListing {
                group: gid.to_string(),
                name,
                state: state.to_string(),
                epoch,
                members,
            });
        }
        Ok(out)
    }

    /// Current members of a group, by this device's MLS state.
    pub fn members(&self, group: &str) -> Result<Vec<String>> {
        let id = self.resolve_group(group)?;
        self.active_group(&id)?;
        Ok(member_names(&self.load_group(&self.db, &id)?))
    }

    /// The group's users, each with its number of devices in the group.
    pub fn member_devices(&self, group: &str) -> Result<Vec<(String, usize)>> {
        let id = self.resolve_group(group)?;
        self.active_group(&id)?;
        Ok(crate::follow::member_devices(
            &self.load_group(&self.db, &id)?,
        ))
    }

    /// Every device of the group with its key's fingerprint (its safety
    /// number, to compare out of band) and whether that key differs from
    /// the one this home saw first for the same device.
    pub fn member_keys(&self, group: &str) -> Result<Vec<MemberKey>> {
        let id = self.resolve_group(group)?;
        self.active_group(&id)?;
        let mut out = Vec::new();
        for (principal, key) in crate::follow::member_keys(&self.load_group(&self.db, &id)?) {
            let first = db::users::known_key(&self.db, &principal)?;
            let print = |k: &[u8]| {
                <[u8; 32]>::try_from(k)
                    .map(|k| huddle_core::auth::key_fingerprint(&k))
                    .unwrap_or_else(|_| hex::encode(k))
            };
            out.push(MemberKey {
                user: huddle_core::devices::user_part(&principal).to_owned(),
                fingerprint: print(&key),
                changed: first.as_deref().is_some_and(|f| f != key.as_slice()),
                principal,
            });
        }
        out.sort_by(|a, b| a.principal.cmp(&b.principal));
        Ok(out)
    }

    /// The group's current epoch and epoch authenticator.
    pub fn epoch_authenticator(&self, group: &str) -> Result<(u64, Vec<u8>)> {
        let id = self.resolve_group(group)?;
        let g = self.load_group(&self.db, &id)?;
        Ok((
            g.epoch().as_u64(),
            g.epoch_authenticator().as_slice().to_vec(),
        ))
    }

    /// This device's view of a group's public ratchet tree (TLS-encoded).
    pub fn export_tree(&self, group: &str) -> Result<Bytes> {
        let id = self.resolve_group(group)?;
        let g = self.load_group(&self.db, &id)?;
        g.export_ratchet_tree()
            .tls_serialize_detached()
            .map(Bytes::from)
            .map_err(ClientError::mls)
    }

    /// The group's state as a row (name, state, cursor).
    pub fn group_state(&self, group: &str) -> Result<(String, String, u64)> {
        let id = self.resolve_group(group)?;
        let row = db::groups::load(&self.db, &id)?
            .ok_or_else(|| ClientError::Usage("unknown group".into()))?;
        Ok((row.name, row.state.to_string(), row.cursor))
    }

    pub(super) async fn resume_creation(&mut self, id: &GroupId) -> Result<()> {
        let (info, tree) = {
            let g = self.load_group(&self.db, id)?;
            let provider = Provider::new(&self.crypto, &self.db);
            let info = g
                .export_group_info(provider.crypto(), &self.identity, false)
                .map_err(ClientError::mls)?;
            let tree = g
                .export_ratchet_tree()
                .tls_serialize_detached()
                .map_err(ClientError::mls)?;
            (serialize(&info)?, Bytes::from(tree))
        };
        self.confirm_creation(*id, info, tree).await
    }
}
