//! The write path: one redb transaction applies a batch of group writes
//! (log entries, members, Welcomes, trees, state, compaction), each
//! checked against what is stored.

use ::redb::{Durability, ReadableTable};
use bytes::Bytes;
use huddle_core::GroupId;

use super::{
    closed, dec, dec_member, enc, err, log, GroupMeta, GroupWrite, InboxTables, RedbStore,
    StoreError, StoredGroup, StoredInboxItem, GROUPS, GROUP_INFO, GROUP_STATE, MEMBERS, TREES,
    USER_GROUPS,
};

impl RedbStore {
    pub(super) fn write(&self) -> Result<::redb::WriteTransaction, StoreError> {
        let guard = self.db.read().expect("db lock");
        let mut txn = guard
            .as_ref()
            .ok_or_else(closed)?
            .begin_write()
            .map_err(err)?;
        txn.set_durability(Durability::Immediate);
        Ok(txn)
    }

    pub(super) fn read(&self) -> Result<::redb::ReadTransaction, StoreError> {
        let guard = self.db.read().expect("db lock");
        guard.as_ref().ok_or_else(closed)?.begin_read().map_err(err)
    }

    pub(super) fn apply_one(
        txn: &::redb::WriteTransaction,
        w: &GroupWrite,
    ) -> Result<Vec<u64>, StoreError> {
        let gid = w.group.as_bytes().as_slice();
        let old_compacted;
        {
            let mut groups = txn.open_table(GROUPS).map_err(err)?;
            let old = groups.get(gid).map_err(err)?.map(|v| v.value().to_vec());
            match (&old, w.create) {
                (Some(_), true) => {
                    return Err(StoreError::Conflict(format!("group {} exists", w.group)))
                }
                (None, false) => {
                    return Err(StoreError::Conflict(format!(
                        "group {} is unknown",
                        w.group
                    )))
                }
                _ => {}
            }
            let old_meta = old
                .as_deref()
                .map(|b| dec::<GroupMeta>(b, "group meta"))
                .transpose()?;
            // The group's row is rewritten only when more than its head
            // changes (see below), so the log's newest entry may be ahead
            // of the head it records.
            let old_head = match &old_meta {
                Some(m) => m
                    .head
                    .max(log::last_seq(&txn.open_table(log::LOG).map_err(err)?, gid)?),
                None => 0,
            };
            old_compacted = old_meta.as_ref().map_or(0, |m| m.compacted);
            // The log must grow without gaps: a write computed against stale
            // in-memory state must never land.
            for (i, e) in w.entries.iter().enumerate() {
                if e.seq != old_head + 1 + i as u64 {
                    return Err(StoreError::Conflict(format!(
                        "log of {} would not be contiguous at {}",
                        w.group, e.seq
                    )));
                }
            }
            // An application message only moves the head, which the log
            // itself records: leaving the row alone saves a page write in
            // every such commit.
            let only_head = old_meta.as_ref().is_some_and(|m| {
                m.created_ms == w.meta.created_ms
                    && m.epoch == w.meta.epoch
                    && m.compacted == w.meta.compacted
            });
            if !only_head {
                groups.insert(gid, enc(&w.meta).as_slice()).map_err(err)?;
            }
        }
        if let Some(state) = &w.state {
            let mut t = txn.open_table(GROUP_STATE).map_err(err)?;
            t.insert(gid, state.as_slice()).map_err(err)?;
        }
        if !w.entries.is_empty() {
            log::append(txn, gid, &w.entries)?;
        }
        if !w.members.is_empty() {
            let mut m = txn.open_table(MEMBERS).map_err(err)?;
            let mut ug = txn.open_table(USER_GROUPS).map_err(err)?;
            for (user, rec) in &w.members {
                m.insert((gid, user.as_str()), enc(rec).as_slice())
                    .map_err(err)?;
                ug.insert((user.as_str(), gid), ()).map_err(err)?;
            }
        }
        if !w.trees.is_empty() {
            let mut t = txn.open_table(TREES).map_err(err)?;
            for (seq, tree) in &w.trees {
                t.insert((gid, *seq), tree.as_ref()).map_err(err)?;
            }
        }
        if let Some((epoch, info)) = &w.group_info {
            let mut t = txn.open_table(GROUP_INFO).map_err(err)?;
            let mut v = Vec::with_capacity(8 + info.len());
            v.extend_from_slice(&epoch.to_be_bytes());
            v.extend_from_slice(info);
            t.insert(gid, v.as_slice()).map_err(err)?;
        }
        if let Some(upto) = w.compact_upto {
            log::compact(txn, gid, old_compacted + 1, upto)?;
            // Trees of commits before the floor: their joiners have moved on.
            let mut trees = txn.open_table(TREES).map_err(err)?;
            let old: Vec<u64> = trees
                .range((gid, 0)..(gid, upto))
                .map_err(err)?
                .map(|r| r.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()
                .map_err(err)?;
            for seq in old {
                trees.remove((gid, seq)).map_err(err)?;
            }
        }
        let mut created = Vec::with_capacity(w.welcomes.len());
        if !w.welcomes.is_empty() {
            let mut t = InboxTables::open(txn)?;
            // Each commit's shared part once, referenced by its joiners.
            let mut refs: std::collections::BTreeMap<u64, (u32, &Bytes)> = Default::default();
            for item in &w.welcomes {
                refs.entry(item.commit_seq).or_insert((0, &item.shared)).0 += 1;
            }
            for (seq, (n, shared)) in refs {
                t.add_shared(gid, seq, n, shared)?;
            }
            for item in &w.welcomes {
                let user = item.user.as_str();
                let seq = t.head(user)? + 1;
                let stored = StoredInboxItem {
                    group: w.group,
                    commit_seq: item.commit_seq,
                    timestamp_ms: item.timestamp_ms,
                    own: item.own.to_vec(),
                };
                t.items
                    .insert((user, seq), enc(&stored).as_slice())
                    .map_err(err)?;
                t.heads.insert(user, seq).map_err(err)?;
                // Over the cap: the oldest go.
                while let Some(first) = t.first(user)? {
                    if seq - first < w.inbox_cap as u64 {
                        break;
                    }
                    t.drop_item(user, first)?;
                }
                created.push(seq);
            }
        }
        Ok(created)
    }
}

/// Group `id`, whose row holds `meta`, as stored: facts (with the true
/// head), public state and member records.
pub(super) fn stored_group(
    txn: &::redb::ReadTransaction,
    id: GroupId,
    meta: &[u8],
) -> Result<StoredGroup, StoreError> {
    let states = txn.open_table(GROUP_STATE).map_err(err)?;
    let members = txn.open_table(MEMBERS).map_err(err)?;
    let log = txn.open_table(log::LOG).map_err(err)?;
    let mut meta: GroupMeta = dec(meta, "group meta")?;
    let gid = id.as_bytes().as_slice();
    meta.head = meta.head.max(log::last_seq(&log, gid)?);
    let state = states
        .get(gid)
        .map_err(err)?
        .map(|v| v.value().to_vec())
        .ok_or_else(|| StoreError::Corrupt(format!("group {id} has no state")))?;
    let mut list = Vec::new();
    for m in members.range((gid, "")..).map_err(err)? {
        let (mk, mv) = m.map_err(err)?;
        let (g, user) = mk.value();
        if g != gid {
            break;
        }
        list.push((user.to_owned(), dec_member(mv.value())?));
    }
    Ok(StoredGroup {
        id,
        meta,
        state,
        members: list,
    })
}
