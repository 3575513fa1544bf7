//! Users' devices in PostgreSQL: the device logs (`device_log`), revoked
//! principals (`users.revoked_ms`), pending links (`device_links`) and
//! last-seen times (`device_seen`); and users waiting to be added to a
//! group (`join_requests`).

use bytes::Bytes;
use huddle_core::GroupId;

use super::{n, pg, u, PgStore};
use crate::store::{DeviceWrite, JoinRequest, PendingLink, StoreError, UserRecord};

impl PgStore {
    pub(super) fn user_record(
        &self,
        name: &str,
        with_revoked: bool,
    ) -> Result<Option<UserRecord>, StoreError> {
        self.txn(|t| {
            t.query_opt(
                "SELECT identity_key, registered_ms FROM users
                 WHERE name = $1 AND ($2 OR revoked_ms IS NULL)",
                &[&name, &with_revoked],
            )
            .map_err(pg)?
            .map(|r| {
                Ok(UserRecord {
                    identity_key: r
                        .get::<_, Vec<u8>>(0)
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("identity key length".into()))?,
                    registered_ms: u(r.get(1))?,
                })
            })
            .transpose()
        })
    }

    pub(super) fn read_device_log(&self, user: &str) -> Result<Vec<Bytes>, StoreError> {
        self.txn(|t| {
            Ok(t.query(
                "SELECT entry FROM device_log WHERE username = $1 ORDER BY seq",
                &[&user],
            )
            .map_err(pg)?
            .into_iter()
            .map(|r| Bytes::from(r.get::<_, Vec<u8>>(0)))
            .collect())
        })
    }

    pub(super) fn append_device_entry(
        &self,
        user: &str,
        seq: u32,
        entry: &[u8],
        write: DeviceWrite<'_>,
    ) -> Result<bool, StoreError> {
        self.txn_or_rollback(|t| {
            // Appends to one user's log take turns.
            t.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('device_log:' || $1, 0))",
                &[&user],
            )
            .map_err(pg)?;
            let last: i32 = t
                .query_one(
                    "SELECT COALESCE(MAX(seq), 0) FROM device_log WHERE username = $1",
                    &[&user],
                )
                .map_err(pg)?
                .get(0);
            let seq = i32::try_from(seq).unwrap_or(i32::MAX);
            if seq == 0 || last != seq - 1 {
                return Ok((false, false));
            }
            t.execute(
                "INSERT INTO device_log (username, seq, entry) VALUES ($1, $2, $3)",
                &[&user, &seq, &entry],
            )
            .map_err(pg)?;
            match write {
                DeviceWrite::Add {
                    principal,
                    record,
                    code,
                } => {
                    let inserted = t
                        .execute(
                            "INSERT INTO users (name, identity_key, registered_ms)
                             VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                            &[
                                &principal,
                                &record.identity_key.as_slice(),
                                &n(record.registered_ms),
                            ],
                        )
                        .map_err(pg)?;
                    if inserted != 1 {
                        return Err(StoreError::Conflict(format!(
                            "{principal} is registered already"
                        )));
                    }
                    t.execute(
                        "DELETE FROM device_links WHERE username = $1 AND code = $2",
                        &[&user, &code],
                    )
                    .map_err(pg)?;
                }
                DeviceWrite::Remove { principal } => {
                    t.execute(
                        "UPDATE users SET revoked_ms = 1 WHERE name = $1",
                        &[&principal],
                    )
                    .map_err(pg)?;
                }
            }
            Ok((true, true))
        })
    }

    pub(super) fn put_pending_link(
        &self,
        user: &str,
        code: &str,
        link: &PendingLink,
        now_ms: u64,
        max: usize,
    ) -> Result<(), StoreError> {
        self.txn(|t| {
            t.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('device_links:' || $1, 0))",
                &[&user],
            )
            .map_err(pg)?;
            t.execute(
                "DELETE FROM device_links WHERE username = $1 AND expires_ms <= $2",
                &[&user, &n(now_ms)],
            )
            .map_err(pg)?;
            if t.query_opt(
                "SELECT 1 FROM device_links WHERE username = $1 AND code = $2",
                &[&user, &code],
            )
            .map_err(pg)?
            .is_some()
            {
                return Err(StoreError::Conflict("the link code is taken".into()));
            }
            // The oldest requests make room for the new one.
            let keep = i64::try_from(max.saturating_sub(1)).unwrap_or(i64::MAX);
            t.execute(
                "DELETE FROM device_links WHERE username = $1 AND code IN (
                     SELECT code FROM device_links WHERE username = $1
                     ORDER BY expires_ms DESC OFFSET $2)",
                &[&user, &keep],
            )
            .map_err(pg)?;
            let inserted = t
                .execute(
                    "INSERT INTO device_links (username, code, device_key, expires_ms)
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    &[
                        &user,
                        &code,
                        &link.device_key.as_slice(),
                        &n(link.expires_ms),
                    ],
                )
                .map_err(pg)?;
            if inserted != 1 {
                return Err(StoreError::Conflict("the link code is taken".into()));
            }
            Ok(())
        })
    }

    pub(super) fn pending_link(
        &self,
        user: &str,
        code: &str,
        now_ms: u64,
    ) -> Result<Option<PendingLink>, StoreError> {
        self.txn(|t| {
            t.query_opt(
                "SELECT device_key, expires_ms FROM device_links
                 WHERE username = $1 AND code = $2 AND expires_ms > $3",
                &[&user, &code, &n(now_ms)],
            )
            .map_err(pg)?
            .map(|r| {
                Ok(PendingLink {
                    device_key: r
                        .get::<_, Vec<u8>>(0)
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("device key length".into()))?,
                    expires_ms: u(r.get(1))?,
                })
            })
            .transpose()
        })
    }

    pub(super) fn expire_pending_links(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.txn(|t| {
            let n = t
                .execute(
                    "DELETE FROM device_links WHERE expires_ms <= $1",
                    &[&n(now_ms)],
                )
                .map_err(pg)?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    pub(super) fn set_seen(&self, principal: &str, ms: u64) -> Result<(), StoreError> {
        self.txn(|t| {
            t.execute(
                "INSERT INTO device_seen (principal, ms) VALUES ($1, $2)
                 ON CONFLICT (principal) DO UPDATE SET ms = EXCLUDED.ms",
                &[&principal, &n(ms)],
            )
            .map_err(pg)?;
            Ok(())
        })
    }

    pub(super) fn get_seen(&self, principal: &str) -> Result<Option<u64>, StoreError> {
        self.txn(|t| {
            t.query_opt(
                "SELECT ms FROM device_seen WHERE principal = $1",
                &[&principal],
            )
            .map_err(pg)?
            .map(|r| u(r.get(0)))
            .transpose()
        })
    }

    pub(super) fn put_join(
        &self,
        group: &GroupId,
        req: &JoinRequest,
        max: usize,
    ) -> Result<(), StoreError> {
        let g = group.as_bytes().as_slice();
        self.txn(|t| {
            t.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('join_requests:' || encode($1, 'hex'), 0))",
                &[&g],
            )
            .map_err(pg)?;
            let others: i64 = t
                .query_one(
                    "SELECT count(*) FROM join_requests WHERE group_id = $1 AND username <> $2",
                    &[&g, &req.user],
                )
                .map_err(pg)?
                .get(0);
            if others as u64 >= max as u64 {
                return Err(StoreError::Conflict(format!(
                    "{others} users wait to join this group already, the most it keeps"
                )));
            }
            t.execute(
                "INSERT INTO join_requests (group_id, username, invite, at_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (group_id, username) DO UPDATE SET invite = $3, at_ms = $4",
                &[&g, &req.user, &req.invite.as_slice(), &n(req.at_ms)],
            )
            .map_err(pg)?;
            Ok(())
        })
    }

    pub(super) fn joins(&self, group: &GroupId) -> Result<Vec<JoinRequest>, StoreError> {
        let g = group.as_bytes().as_slice();
        self.txn(|t| {
            let rows = t
                .query(
                    "SELECT username, invite, at_ms FROM join_requests WHERE group_id = $1
                     ORDER BY at_ms, username",
                    &[&g],
                )
                .map_err(pg)?;
            rows.iter()
                .map(|r| {
                    let invite: Vec<u8> = r.get(1);
                    Ok(JoinRequest {
                        user: r.get(0),
                        invite: invite
                            .try_into()
                            .map_err(|_| StoreError::Corrupt("a join request's invite".into()))?,
                        at_ms: u(r.get(2))?,
                    })
                })
                .collect()
        })
    }

    pub(super) fn drop_joins(&self, group: &GroupId, users: &[String]) -> Result<(), StoreError> {
        let g = group.as_bytes().as_slice();
        self.txn(|t| {
            t.execute(
                "DELETE FROM join_requests WHERE group_id = $1 AND username = ANY($2)",
                &[&g, &users],
            )
            .map_err(pg)?;
            Ok(())
        })
    }
}
