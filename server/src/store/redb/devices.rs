//! Users' devices in the embedded store: the device logs, revoked
//! principals, pending links and last-seen times.

use ::redb::{ReadableTable, TableDefinition};
use bytes::Bytes;

use super::{dec, enc, err, RedbStore, USERS};
use crate::store::{DeviceWrite, JoinRequest, PendingLink, StoreError, UserRecord};
use huddle_core::GroupId;

/// (user, seq) -> encoded entry.
pub(super) const DEVICE_LOG: TableDefinition<'_, (&str, u32), &[u8]> =
    TableDefinition::new("device_log");
/// Revoked principals -> when.
pub(super) const REVOKED: TableDefinition<'_, &str, u64> = TableDefinition::new("revoked");
/// (user, code) -> pending link.
pub(super) const LINKS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("links");
/// Principal -> when it last authenticated.
pub(super) const SEEN: TableDefinition<'_, &str, u64> = TableDefinition::new("seen");
/// (group, user) -> [`JoinRequest`]: users waiting to be added.
pub(super) const JOIN_REQUESTS: TableDefinition<'_, (&[u8], &str), &[u8]> =
    TableDefinition::new("join_requests");

impl RedbStore {
    pub(super) fn is_revoked(&self, name: &str) -> Result<bool, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(REVOKED).map_err(err)?;
        Ok(t.get(name).map_err(err)?.is_some())
    }

    pub(super) fn registered_record(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(USERS).map_err(err)?;
        match t.get(name).map_err(err)? {
            Some(v) => Ok(Some(dec(v.value(), "user")?)),
            None => Ok(None),
        }
    }

    pub(super) fn read_device_log(&self, user: &str) -> Result<Vec<Bytes>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(DEVICE_LOG).map_err(err)?;
        let mut out = Vec::new();
        for row in t.range((user, 0)..=(user, u32::MAX)).map_err(err)? {
            let (_, v) = row.map_err(err)?;
            out.push(Bytes::copy_from_slice(v.value()));
        }
        Ok(out)
    }

    pub(super) fn append_device_entry(
        &self,
        user: &str,
        seq: u32,
        entry: &[u8],
        write: DeviceWrite<'_>,
    ) -> Result<bool, StoreError> {
        let txn = self.write()?;
        {
            let mut log = txn.open_table(DEVICE_LOG).map_err(err)?;
            let last = log
                .range((user, 0)..=(user, u32::MAX))
                .map_err(err)?
                .next_back()
                .transpose()
                .map_err(err)?
                .map_or(0, |(k, _)| k.value().1);
            if seq == 0 || last != seq - 1 {
                drop(log);
                txn.abort().map_err(err)?;
                return Ok(false);
            }
            log.insert((user, seq), entry).map_err(err)?;
            match write {
                DeviceWrite::Add {
                    principal,
                    record,
                    code,
                } => {
                    let mut users = txn.open_table(USERS).map_err(err)?;
                    if users.get(principal).map_err(err)?.is_some() {
                        return Err(StoreError::Conflict(format!(
                            "{principal} is registered already"
                        )));
                    }
                    users
                        .insert(principal, enc(record).as_slice())
                        .map_err(err)?;
                    txn.open_table(LINKS)
                        .map_err(err)?
                        .remove((user, code))
                        .map_err(err)?;
                }
                DeviceWrite::Remove { principal } => {
                    txn.open_table(REVOKED)
                        .map_err(err)?
                        .insert(principal, 1)
                        .map_err(err)?;
                }
            }
        }
        txn.commit().map_err(err)?;
        Ok(true)
    }

    pub(super) fn put_pending_link(
        &self,
        user: &str,
        code: &str,
        link: &PendingLink,
        now_ms: u64,
        max: usize,
    ) -> Result<(), StoreError> {
        let txn = self.write()?;
        {
            let mut t = txn.open_table(LINKS).map_err(err)?;
            let mut live: Vec<(u64, String)> = Vec::new();
            let mut lapsed = Vec::new();
            for row in t.range((user, "")..).map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let (u, c) = k.value();
                if u != user {
                    break;
                }
                let l: PendingLink = dec(v.value(), "link")?;
                if l.expires_ms <= now_ms {
                    lapsed.push(c.to_owned());
                } else if c == code {
                    return Err(StoreError::Conflict("the link code is taken".into()));
                } else {
                    live.push((l.expires_ms, c.to_owned()));
                }
            }
            // The oldest requests make room for the new one.
            live.sort();
            let over = (live.len() + 1).saturating_sub(max);
            lapsed.extend(live.into_iter().take(over).map(|(_, c)| c));
            for c in &lapsed {
                t.remove((user, c.as_str())).map_err(err)?;
            }
            t.insert((user, code), enc(link).as_slice()).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(())
    }

    pub(super) fn pending_link(
        &self,
        user: &str,
        code: &str,
        now_ms: u64,
    ) -> Result<Option<PendingLink>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(LINKS).map_err(err)?;
        let Some(v) = t.get((user, code)).map_err(err)? else {
            return Ok(None);
        };
        let l: PendingLink = dec(v.value(), "link")?;
        Ok((l.expires_ms > now_ms).then_some(l))
    }

    pub(super) fn expire_pending_links(&self, now_ms: u64) -> Result<usize, StoreError> {
        let txn = self.write()?;
        let n = {
            let mut t = txn.open_table(LINKS).map_err(err)?;
            let mut lapsed = Vec::new();
            for row in t.iter().map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let l: PendingLink = dec(v.value(), "link")?;
                if l.expires_ms <= now_ms {
                    let (u, c) = k.value();
                    lapsed.push((u.to_owned(), c.to_owned()));
                }
            }
            for (u, c) in &lapsed {
                t.remove((u.as_str(), c.as_str())).map_err(err)?;
            }
            lapsed.len()
        };
        txn.commit().map_err(err)?;
        Ok(n)
    }

    pub(super) fn set_seen(&self, principal: &str, ms: u64) -> Result<(), StoreError> {
        let txn = self.write()?;
        txn.open_table(SEEN)
            .map_err(err)?
            .insert(principal, ms)
            .map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(())
    }

    pub(super) fn get_seen(&self, principal: &str) -> Result<Option<u64>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(SEEN).map_err(err)?;
        Ok(t.get(principal).map_err(err)?.map(|v| v.value()))
    }

    pub(super) fn put_join(
        &self,
        group: &GroupId,
        req: &JoinRequest,
        max: usize,
    ) -> Result<(), StoreError> {
        let g = group.as_bytes().as_slice();
        let txn = self.write()?;
        {
            let mut t = txn.open_table(JOIN_REQUESTS).map_err(err)?;
            let mut others = 0;
            for row in t.range((g, "")..).map_err(err)? {
                let (k, _) = row.map_err(err)?;
                let (kg, u) = k.value();
                if kg != g {
                    break;
                }
                if u != req.user {
                    others += 1;
                }
            }
            if others >= max {
                return Err(StoreError::Conflict(format!(
                    "{others} users wait to join this group already, the most it keeps"
                )));
            }
            t.insert((g, req.user.as_str()), enc(req).as_slice())
                .map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(())
    }

    pub(super) fn joins(&self, group: &GroupId) -> Result<Vec<JoinRequest>, StoreError> {
        let g = group.as_bytes().as_slice();
        let txn = self.read()?;
        let t = txn.open_table(JOIN_REQUESTS).map_err(err)?;
        let mut out = Vec::new();
        for row in t.range((g, "")..).map_err(err)? {
            let (k, v) = row.map_err(err)?;
            if k.value().0 != g {
                break;
            }
            out.push(dec::<JoinRequest>(v.value(), "join request")?);
        }
        out.sort_by_key(|r| (r.at_ms, r.user.clone()));
        Ok(out)
    }

    pub(super) fn drop_joins(&self, group: &GroupId, users: &[String]) -> Result<(), StoreError> {
        let g = group.as_bytes().as_slice();
        let txn = self.write()?;
        {
            let mut t = txn.open_table(JOIN_REQUESTS).map_err(err)?;
            for u in users {
                t.remove((g, u.as_str())).map_err(err)?;
            }
        }
        txn.commit().map_err(err)?;
        Ok(())
    }
}
