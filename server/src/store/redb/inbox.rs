//! Users' inboxes of Welcomes: the part shared by all joiners stored once,
//! each joiner's own part and the head of each inbox.

use ::redb::ReadableTable;
use huddle_core::GroupId;
use serde::Serialize;

use super::{dec, err, StoreError, INBOX, INBOX_HEAD, INBOX_ITEMS, WELCOME_SHARED};

/// An inbox item as stored: the recipient's own part of the Welcome.
#[derive(Debug, Serialize, serde::Deserialize)]
pub(super) struct StoredInboxItem {
    pub(super) group: GroupId,
    pub(super) commit_seq: u64,
    pub(super) timestamp_ms: u64,
    pub(super) own: Vec<u8>,
}

/// The inbox tables of one write transaction.
pub(super) struct InboxTables<'t> {
    pub(super) legacy: ::redb::Table<'t, (&'static str, u64), &'static [u8]>,
    pub(super) items: ::redb::Table<'t, (&'static str, u64), &'static [u8]>,
    pub(super) heads: ::redb::Table<'t, &'static str, u64>,
    pub(super) shared: ::redb::Table<'t, (&'static [u8], u64), &'static [u8]>,
}

impl<'t> InboxTables<'t> {
    pub(super) fn open(txn: &'t ::redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            legacy: txn.open_table(INBOX).map_err(err)?,
            items: txn.open_table(INBOX_ITEMS).map_err(err)?,
            heads: txn.open_table(INBOX_HEAD).map_err(err)?,
            shared: txn.open_table(WELCOME_SHARED).map_err(err)?,
        })
    }

    pub(super) fn head(&self, user: &str) -> Result<u64, StoreError> {
        inbox_head(&self.heads, &self.legacy, user)
    }

    /// The oldest item of `user` still stored.
    pub(super) fn first(&self, user: &str) -> Result<Option<u64>, StoreError> {
        let first = |t: &::redb::Table<'t, (&'static str, u64), &'static [u8]>| {
            t.range((user, 0)..=(user, u64::MAX))
                .map_err(err)?
                .next()
                .transpose()
                .map_err(err)
                .map(|r| r.map(|(k, _)| k.value().1))
        };
        Ok(match (first(&self.legacy)?, first(&self.items)?) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    pub(super) fn add_shared(
        &mut self,
        gid: &[u8],
        seq: u64,
        n: u32,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let old = self
            .shared
            .get((gid, seq))
            .map_err(err)?
            .map(|v| u32::from_be_bytes(v.value()[..4].try_into().expect("4 bytes")));
        let mut v = Vec::with_capacity(4 + bytes.len());
        v.extend_from_slice(&(old.unwrap_or(0) + n).to_be_bytes());
        v.extend_from_slice(bytes);
        self.shared.insert((gid, seq), v.as_slice()).map_err(err)?;
        Ok(())
    }

    /// Deletes one item, and the shared part it referenced once nothing
    /// else does.
    pub(super) fn drop_item(&mut self, user: &str, seq: u64) -> Result<(), StoreError> {
        if self.legacy.remove((user, seq)).map_err(err)?.is_some() {
            return Ok(());
        }
        let Some(v) = self.items.remove((user, seq)).map_err(err)? else {
            return Ok(());
        };
        let item: StoredInboxItem = dec(v.value(), "inbox item")?;
        drop(v);
        let key = (item.group.as_bytes().as_slice(), item.commit_seq);
        let Some(s) = self.shared.get(key).map_err(err)? else {
            return Ok(());
        };
        let mut bytes = s.value().to_vec();
        drop(s);
        let refs = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"));
        if refs <= 1 {
            self.shared.remove(key).map_err(err)?;
        } else {
            bytes[..4].copy_from_slice(&(refs - 1).to_be_bytes());
            self.shared.insert(key, bytes.as_slice()).map_err(err)?;
        }
        Ok(())
    }
}

pub(super) fn inbox_head<H, L>(heads: &H, legacy: &L, user: &str) -> Result<u64, StoreError>
where
    H: ReadableTable<&'static str, u64>,
    L: ReadableTable<(&'static str, u64), &'static [u8]>,
{
    let recorded = heads.get(user).map_err(err)?.map_or(0, |v| v.value());
    let old = legacy
        .range((user, 0)..=(user, u64::MAX))
        .map_err(err)?
        .next_back()
        .transpose()
        .map_err(err)?
        .map_or(0, |(k, _)| k.value().1);
    Ok(recorded.max(old))
}
