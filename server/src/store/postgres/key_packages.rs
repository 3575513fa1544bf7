//! Key packages in PostgreSQL: each user's pool of one-time packages
//! (`kp_pool`) and last-resort package (`kp_last_resort`).

use bytes::Bytes;

use super::{n, pg, PgStore};
use crate::store::{Claimed, StoreError, StoredKeyPackage};

impl PgStore {
    pub(super) fn store_key_packages(
        &self,
        user: &str,
        packages: &[(Vec<u8>, StoredKeyPackage)],
        last_resort: Option<&StoredKeyPackage>,
        max: u32,
        now: u64,
    ) -> Result<(), StoreError> {
        self.txn(|t| {
            // One upload per user at a time, so the cap holds.
            t.execute(
                "SELECT pg_advisory_xact_lock(hashtext('kp:' || $1))",
                &[&user],
            )
            .map_err(pg)?;
            t.execute(
                "DELETE FROM kp_pool WHERE username = $1 AND not_after < $2",
                &[&user, &n(now)],
            )
            .map_err(pg)?;
            for (hash, kp) in packages {
                t.execute(
                    "INSERT INTO kp_pool (username, hash, not_after, bytes) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (username, hash)
                     DO UPDATE SET not_after = EXCLUDED.not_after, bytes = EXCLUDED.bytes",
                    &[&user, hash, &n(kp.not_after), &kp.bytes],
                )
                .map_err(pg)?;
            }
            let count: i64 = t
                .query_one("SELECT count(*) FROM kp_pool WHERE username = $1", &[&user])
                .map_err(pg)?
                .get(0);
            if count > i64::from(max) {
                return Err(StoreError::Conflict(format!(
                    "at most {max} key packages may be stored per user"
                )));
            }
            if let Some(lr) = last_resort {
                t.execute(
                    "INSERT INTO kp_last_resort (username, not_after, bytes) VALUES ($1, $2, $3)
                     ON CONFLICT (username)
                     DO UPDATE SET not_after = EXCLUDED.not_after, bytes = EXCLUDED.bytes",
                    &[&user, &n(lr.not_after), &lr.bytes],
                )
                .map_err(pg)?;
            }
            Ok(())
        })
    }

    pub(super) fn claim_packages(
        &self,
        users: &[String],
        now: u64,
    ) -> Result<Vec<Option<Claimed>>, StoreError> {
        self.txn_or_rollback(|t| {
            let mut out = Vec::with_capacity(users.len());
            for user in users {
                t.execute(
                    "DELETE FROM kp_pool WHERE username = $1 AND not_after < $2",
                    &[user, &n(now)],
                )
                .map_err(pg)?;
                // The first package in pool order; one another claim holds
                // is skipped, so no package is handed out twice.
                let one = t
                    .query_opt(
                        "DELETE FROM kp_pool WHERE username = $1 AND hash =
                             (SELECT hash FROM kp_pool WHERE username = $1
                              ORDER BY hash LIMIT 1 FOR UPDATE SKIP LOCKED)
                         RETURNING bytes",
                        &[user],
                    )
                    .map_err(pg)?;
                let found = match one {
                    Some(r) => Some(Claimed {
                        bytes: Bytes::from(r.get::<_, Vec<u8>>(0)),
                        last_resort: false,
                    }),
                    None => t
                        .query_opt(
                            "SELECT bytes FROM kp_last_resort WHERE username = $1 AND not_after >= $2",
                            &[user, &n(now)],
                        )
                        .map_err(pg)?
                        .map(|r| Claimed {
                            bytes: Bytes::from(r.get::<_, Vec<u8>>(0)),
                            last_resort: true,
                        }),
                };
                out.push(found);
            }
            // All or nothing: if anyone lacks a package, nothing is
            // claimed for anyone.
            let all = out.iter().all(Option::is_some);
            Ok((out, all))
        })
    }

    pub(super) fn count_key_packages(
        &self,
        user: &str,
        valid_until: u64,
    ) -> Result<(u32, bool), StoreError> {
        self.txn(|t| {
            let count: i64 = t
                .query_one(
                    "SELECT count(*) FROM kp_pool WHERE username = $1 AND not_after >= $2",
                    &[&user, &n(valid_until)],
                )
                .map_err(pg)?
                .get(0);
            let last = t
                .query_opt(
                    "SELECT 1 FROM kp_last_resort WHERE username = $1 AND not_after >= $2",
                    &[&user, &n(valid_until)],
                )
                .map_err(pg)?
                .is_some();
            Ok((u32::try_from(count).unwrap_or(u32::MAX), last))
        })
    }
}
