//! The PostgreSQL store's media records, and the media quota it counts
//! for every node of a cluster (`media_usage`).

use huddle_core::MediaId;

use super::{n, pg, PgStore};
use crate::store::{MediaRecord, StoreError};

impl PgStore {
    pub(super) fn get_media(&self, id: &MediaId) -> Result<Option<MediaRecord>, StoreError> {
        self.txn(|t| {
            t.query_opt(
                "SELECT record FROM media WHERE id = $1",
                &[&id.as_bytes().as_slice()],
            )
            .map_err(pg)?
            .map(|r| crate::store::dec_media(r.get(0)))
            .transpose()
        })
    }

    pub(super) fn put_media_row(
        &self,
        id: &MediaId,
        record: &MediaRecord,
    ) -> Result<(), StoreError> {
        let bytes = postcard::to_allocvec(record).expect("serialising to a Vec cannot fail");
        self.txn(|t| {
            t.execute(
                "INSERT INTO media (id, record, total_len) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                &[&id.as_bytes().as_slice(), &bytes, &n(record.total_len)],
            )
            .map_err(pg)?;
            Ok(())
        })
    }

    pub(super) fn reserve_media_row(
        &self,
        id: &MediaId,
        record: &MediaRecord,
        quota: u64,
    ) -> Result<bool, StoreError> {
        let bytes = postcard::to_allocvec(record).expect("serialising to a Vec cannot fail");
        let len = n(record.total_len);
        self.txn_or_rollback(|t| {
            // The one row of the sum is locked until the transaction ends:
            // nodes reserving at once take turns.
            let fits = t
                .query_opt(
                    "UPDATE media_usage SET bytes = bytes + $1
                     WHERE one AND bytes + $1 <= $2 RETURNING bytes",
                    &[&len, &n(quota)],
                )
                .map_err(pg)?
                .is_some();
            if fits {
                t.execute(
                    "INSERT INTO media (id, record, total_len) VALUES ($1, $2, $3)",
                    &[&id.as_bytes().as_slice(), &bytes, &len],
                )
                .map_err(pg)?;
            }
            Ok((fits, fits))
        })
    }

    pub(super) fn update_media_row(
        &self,
        id: &MediaId,
        record: &MediaRecord,
    ) -> Result<bool, StoreError> {
        let bytes = postcard::to_allocvec(record).expect("serialising to a Vec cannot fail");
        self.txn(|t| {
            let n = t
                .execute(
                    "UPDATE media SET record = $2 WHERE id = $1",
                    &[&id.as_bytes().as_slice(), &bytes],
                )
                .map_err(pg)?;
            Ok(n == 1)
        })
    }

    pub(super) fn delete_media_row(&self, id: &MediaId) -> Result<Option<u64>, StoreError> {
        self.txn(|t| {
            // The sum first, as `reserve_media` takes it: two transactions
            // never wait for each other's rows in opposite orders.
            t.execute("SELECT 1 FROM media_usage WHERE one FOR UPDATE", &[])
                .map_err(pg)?;
            let gone = t
                .query_opt(
                    "DELETE FROM media WHERE id = $1 RETURNING total_len",
                    &[&id.as_bytes().as_slice()],
                )
                .map_err(pg)?;
            let Some(row) = gone else {
                return Ok(None);
            };
            let len: Option<i64> = row.get(0);
            if let Some(len) = len {
                t.execute(
                    "UPDATE media_usage SET bytes = GREATEST(bytes - $1, 0) WHERE one",
                    &[&len],
                )
                .map_err(pg)?;
            }
            Ok(Some(len.map_or(0, |l| l.max(0) as u64)))
        })
    }

    pub(super) fn all_media_rows(&self) -> Result<Vec<(MediaId, MediaRecord)>, StoreError> {
        self.txn(|t| {
            t.query("SELECT id, record FROM media ORDER BY id", &[])
                .map_err(pg)?
                .iter()
                .map(|r| {
                    let id = MediaId::from_slice(r.get(0))
                        .ok_or_else(|| StoreError::Corrupt("media id length".into()))?;
                    Ok((id, crate::store::dec_media(r.get(1))?))
                })
                .collect()
        })
    }
}
