//! The PostgreSQL store's group writes: one [`GroupWrite`] applied inside
//! a batch's transaction, with the checks that keep a log contiguous, and
//! the inbox deletions that release shared Welcome parts.

use ::postgres::Transaction;

use super::{kind_code, n, pg, u};
use crate::store::*;

/// Deletes `user`'s inbox items up to `upto` and the shared Welcome parts
/// no item refers to any more; returns how many items went.
pub(super) fn drop_inbox(
    t: &mut Transaction<'_>,
    user: &str,
    upto: u64,
) -> Result<usize, StoreError> {
    let gone = t
        .query(
            "DELETE FROM inbox_items WHERE username = $1 AND seq <= $2
             RETURNING group_id, commit_seq",
            &[&user, &n(upto)],
        )
        .map_err(pg)?;
    release_shared(t, &gone)?;
    Ok(gone.len())
}

/// Drops one reference to the shared Welcome part of each deleted inbox
/// item (`group_id`, `commit_seq`), and the parts left without any.
pub(super) fn release_shared(
    t: &mut Transaction<'_>,
    gone: &[::postgres::Row],
) -> Result<(), StoreError> {
    let mut refs: std::collections::BTreeMap<(Vec<u8>, i64), i32> = Default::default();
    for r in gone {
        *refs.entry((r.get(0), r.get(1))).or_default() += 1;
    }
    for ((gid, seq), k) in refs {
        t.execute(
            "UPDATE welcome_shared SET refs = GREATEST(refs - $3, 0)
             WHERE group_id = $1 AND commit_seq = $2",
            &[&gid, &seq, &k],
        )
        .map_err(pg)?;
        t.execute(
            "DELETE FROM welcome_shared WHERE group_id = $1 AND commit_seq = $2 AND refs = 0",
            &[&gid, &seq],
        )
        .map_err(pg)?;
    }
    Ok(())
}

/// Applies one group write inside the batch's transaction.
pub(super) fn apply_one(t: &mut Transaction<'_>, w: &GroupWrite) -> Result<Vec<u64>, StoreError> {
    let gid = w.group.as_bytes().as_slice();
    let new_head = |old: u64| w.entries.last().map_or(old, |e| e.seq).max(w.meta.head);
    let old_compacted;
    if w.create {
        let head = new_head(0);
        let inserted = t
            .execute(
                "INSERT INTO groups (id, created_ms, epoch, head, compacted, state)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
                &[
                    &gid,
                    &n(w.meta.created_ms),
                    &n(w.meta.epoch),
                    &n(head),
                    &n(w.meta.compacted),
                    &w.state.as_deref().unwrap_or_default(),
                ],
            )
            .map_err(pg)?;
        if inserted == 0 {
            return Err(StoreError::Conflict(format!("group {} exists", w.group)));
        }
        old_compacted = 0;
        check_contiguous(w, 0)?;
    } else {
        // The row lock orders this write after every other write of the
        // group, from this process or another.
        let row = t
            .query_opt(
                "SELECT head, compacted FROM groups WHERE id = $1 FOR UPDATE",
                &[&gid],
            )
            .map_err(pg)?
            .ok_or_else(|| StoreError::Conflict(format!("group {} is unknown", w.group)))?;
        let old_head = u(row.get(0))?;
        old_compacted = u(row.get(1))?;
        check_contiguous(w, old_head)?;
        if w.meta.head < old_head {
            // A write without entries (a compaction, a GroupInfo) from a
            // node that has not seen the newest ones: its epoch and state
            // are older than the stored ones.
            return Err(StoreError::Conflict(format!(
                "group {} is at {old_head}, the write was made at {}",
                w.group, w.meta.head
            )));
        }
        t.execute(
            "UPDATE groups SET created_ms = $2, epoch = $3, head = $4,
                 compacted = GREATEST(compacted, $5),
                 state = COALESCE($6, state)
             WHERE id = $1",
            &[
                &gid,
                &n(w.meta.created_ms),
                &n(w.meta.epoch),
                &n(new_head(old_head)),
                &n(w.meta.compacted),
                &w.state.as_deref(),
            ],
        )
        .map_err(pg)?;
    }
    if !w.entries.is_empty() {
        let seqs: Vec<i64> = w.entries.iter().map(|e| n(e.seq)).collect();
        let epochs: Vec<i64> = w.entries.iter().map(|e| n(e.epoch)).collect();
        let kinds: Vec<i16> = w.entries.iter().map(|e| kind_code(e.kind)).collect();
        let times: Vec<i64> = w.entries.iter().map(|e| n(e.timestamp_ms)).collect();
        let data: Vec<&[u8]> = w.entries.iter().map(|e| e.data.as_ref()).collect();
        t.execute(
            "INSERT INTO log (group_id, seq, epoch, kind, timestamp_ms, data)
             SELECT $1, * FROM UNNEST($2::BIGINT[], $3::BIGINT[], $4::SMALLINT[], $5::BIGINT[], $6::BYTEA[])",
            &[&gid, &seqs, &epochs, &kinds, &times, &data],
        )
        .map_err(pg)?;
    }
    for (user, m) in &w.members {
        t.execute(
            "INSERT INTO members (group_id, username, joined_seq, removed_seq, removed_ms)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (group_id, username) DO UPDATE SET joined_seq = EXCLUDED.joined_seq,
                 removed_seq = EXCLUDED.removed_seq, removed_ms = EXCLUDED.removed_ms",
            &[
                &gid,
                user,
                &n(m.joined_seq),
                &m.removed_seq.map(n),
                &m.removed_ms.map(n),
            ],
        )
        .map_err(pg)?;
    }
    for (seq, tree) in &w.trees {
        t.execute(
            "INSERT INTO trees (group_id, seq, tree) VALUES ($1, $2, $3)
             ON CONFLICT (group_id, seq) DO UPDATE SET tree = EXCLUDED.tree",
            &[&gid, &n(*seq), &tree.as_ref()],
        )
        .map_err(pg)?;
    }
    if let Some((epoch, info)) = &w.group_info {
        t.execute(
            "INSERT INTO group_info (group_id, epoch, info) VALUES ($1, $2, $3)
             ON CONFLICT (group_id) DO UPDATE SET epoch = EXCLUDED.epoch, info = EXCLUDED.info",
            &[&gid, &n(*epoch), &info.as_ref()],
        )
        .map_err(pg)?;
    }
    if let Some(upto) = w.compact_upto {
        t.execute(
            "DELETE FROM log WHERE group_id = $1 AND seq > $2 AND seq <= $3",
            &[&gid, &n(old_compacted), &n(upto)],
        )
        .map_err(pg)?;
        t.execute(
            "DELETE FROM trees WHERE group_id = $1 AND seq < $2",
            &[&gid, &n(upto)],
        )
        .map_err(pg)?;
    }
    let mut created = Vec::with_capacity(w.welcomes.len());
    if !w.welcomes.is_empty() {
        // Each commit's shared part once, referenced by its joiners.
        let mut refs: std::collections::BTreeMap<u64, (i32, &Bytes)> = Default::default();
        for item in &w.welcomes {
            refs.entry(item.commit_seq).or_insert((0, &item.shared)).0 += 1;
        }
        for (seq, (k, shared)) in refs {
            t.execute(
                "INSERT INTO welcome_shared (group_id, commit_seq, refs, bytes) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (group_id, commit_seq)
                 DO UPDATE SET refs = welcome_shared.refs + EXCLUDED.refs, bytes = EXCLUDED.bytes",
                &[&gid, &n(seq), &k, &shared.as_ref()],
            )
            .map_err(pg)?;
        }
        for item in &w.welcomes {
            let seq = u(t
                .query_one(
                    "INSERT INTO inbox_head (username, head) VALUES ($1, 1)
                     ON CONFLICT (username) DO UPDATE SET head = inbox_head.head + 1
                     RETURNING head",
                    &[&item.user],
                )
                .map_err(pg)?
                .get(0))?;
            t.execute(
                "INSERT INTO inbox_items (username, seq, group_id, commit_seq, timestamp_ms, own)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &item.user,
                    &n(seq),
                    &gid,
                    &n(item.commit_seq),
                    &n(item.timestamp_ms),
                    &item.own.as_ref(),
                ],
            )
            .map_err(pg)?;
            // Over the cap: the oldest go.
            let cap = w.inbox_cap as u64;
            if seq >= cap {
                drop_inbox(t, &item.user, seq - cap)?;
            }
            created.push(seq);
        }
    }
    Ok(created)
}

/// The log must grow without gaps: a write computed against stale state
/// must never land.
fn check_contiguous(w: &GroupWrite, old_head: u64) -> Result<(), StoreError> {
    for (i, e) in w.entries.iter().enumerate() {
        if e.seq != old_head + 1 + i as u64 {
            return Err(StoreError::Conflict(format!(
                "log of {} would not be contiguous at {}",
                w.group, e.seq
            )));
        }
    }
    Ok(())
}
