//! A [`Store`] on PostgreSQL, for a DS whose state must outlive its
//! machine (`huddle-server --store postgres://…`).
//!
//! The same promise as the embedded store: a method that returns `Ok` has
//! committed (PostgreSQL's `synchronous_commit`, on by default, makes a
//! commit durable before it returns). Every method runs in one
//! transaction on a pooled connection.
//!
//! Ordering is enforced by the database as well as by the DS: a group
//! write locks the group's row (`SELECT … FOR UPDATE`) and checks that its
//! entries follow the stored head, and the schema refuses what no correct
//! DS would write — two entries at one sequence number (primary key), two
//! commits in one epoch (a unique index over commits). So even two DS
//! processes writing one group from stale state cannot fork its log; the
//! second one's write fails with [`StoreError::Conflict`].
//!
//! The schema lives in versioned migrations ([`MIGRATIONS`]), applied at
//! open under an advisory lock, so several DS processes may start at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ::postgres::error::SqlState;
use ::postgres::{NoTls, Transaction};
use bytes::Bytes;
use huddle_core::proto::{EntryKind, InboxItem, LogEntry, MAX_PAGE_BYTES};
use huddle_core::{GroupId, MediaId};
use r2d2_postgres::PostgresConnectionManager;

use super::*;
pub use schema::MIGRATIONS;
use write::{apply_one, drop_inbox, release_shared};

mod devices;
mod key_packages;
mod media;
mod schema;
mod write;

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

/// How long a request waits for a pooled connection before the store
/// reports the database unavailable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections a DS keeps to the database, at most.
pub const DEFAULT_POOL: u32 = 16;

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// The PostgreSQL-backed store.
pub struct PgStore {
    /// `None` only while being dropped.
    pool: Option<Pool>,
    closed: AtomicBool,
}

impl Drop for PgStore {
    /// Closing a connection blocks on its own small runtime, which may not
    /// happen on a thread that drives async tasks (the last holder of the
    /// store may be one): the pool is dropped on a thread of its own.
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            let spawned = std::thread::Builder::new()
                .name("pg-close".into())
                .spawn(move || drop(pool));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not close the database connections");
            }
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field(
                "connections",
                &self.pool.as_ref().map(|p| p.state().connections),
            )
            .finish()
    }
}

/// A PostgreSQL failure as a [`StoreError`]: a lost or refused connection
/// is [`StoreError::Unavailable`] (the DS may try again), a constraint the
/// write broke a [`StoreError::Conflict`], a full disk
/// [`StoreError::Full`].
fn pg(e: ::postgres::Error) -> StoreError {
    // The server's own words (and the constraint a write broke), not only
    // "db error".
    let detail = match e.as_db_error() {
        Some(db) => match db.constraint() {
            Some(c) => format!("{} (constraint {c})", db.message()),
            None => db.message().to_owned(),
        },
        None => e.to_string(),
    };
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::CHECK_VIOLATION => {
            StoreError::Conflict(detail)
        }
        Some(c) if *c == SqlState::DISK_FULL => StoreError::Full,
        Some(c)
            if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW =>
        {
            StoreError::Unavailable(detail)
        }
        Some(_) => StoreError::Io(detail),
        // No SQL state: the connection itself failed.
        None => StoreError::Unavailable(e.to_string()),
    }
}

/// `u64` as PostgreSQL's `BIGINT`; values past `i64::MAX` (only ever
/// "no bound") are clamped.
fn n(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored `BIGINT` as `u64`.
fn u(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative number {v}")))
}

fn kind_code(k: EntryKind) -> i16 {
    match k {
        EntryKind::Commit => 0,
        EntryKind::Proposal => 1,
        EntryKind::Application => 2,
    }
}

fn kind_of(code: i16) -> Result<EntryKind, StoreError> {
    match code {
        0 => Ok(EntryKind::Commit),
        1 => Ok(EntryKind::Proposal),
        2 => Ok(EntryKind::Application),
        other => Err(StoreError::Corrupt(format!("log entry kind {other}"))),
    }
}

fn group_id(bytes: &[u8]) -> Result<GroupId, StoreError> {
    GroupId::from_slice(bytes).ok_or_else(|| StoreError::Corrupt("group id length".into()))
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host/db`),
    /// keeping at most `pool` connections, and brings its schema up to
    /// date.
    pub fn open(url: &str, pool: u32) -> Result<Self, StoreError> {
        let config: ::postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Io(format!("database address {url:?}: {e}")))?;
        Self::open_with(config, pool)
    }

    /// Like [`PgStore::open`], with a parsed configuration.
    pub fn open_with(mut config: ::postgres::Config, pool: u32) -> Result<Self, StoreError> {
        config.connect_timeout(CONNECT_TIMEOUT);
        let manager = PostgresConnectionManager::new(config, NoTls);
        let pool = r2d2::Pool::builder()
            .max_size(pool.max(1))
            .min_idle(Some(1))
            .connection_timeout(CONNECT_TIMEOUT)
            // Failed connection attempts are reported to the caller; the
            // pool's own log of them would repeat each one.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build(manager)
            .map_err(|e| StoreError::Unavailable(format!("connecting to the database: {e}")))?;
        let store = Self {
            pool: Some(pool),
            closed: AtomicBool::new(false),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Applies the migrations this build knows and the database lacks;
    /// refuses a database migrated by a newer build.
    fn migrate(&self) -> Result<(), StoreError> {
        self.txn(schema::migrate)
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        self.txn(|t| {
            u(t.query_one("SELECT version FROM huddle_schema", &[])
                .map_err(pg)?
                .get(0))
        })
    }

    /// Runs `f` in one transaction, committed if it returns `Ok` and rolled
    /// back otherwise.
    fn txn<R>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.txn_or_rollback(|t| f(t).map(|r| (r, true)))
    }

    /// Runs `f` in one transaction, committed if it returns `Ok((_, true))`
    /// and rolled back otherwise.
    fn txn_or_rollback<R>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<(R, bool), StoreError>,
    ) -> Result<R, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Io("the store is closed".into()));
        }
        let mut conn = self
            .pool
            .as_ref()
            .ok_or_else(|| StoreError::Io("the store is closed".into()))?
            .get()
            .map_err(|e| StoreError::Unavailable(format!("no database connection: {e}")))?;
        let mut t = conn.transaction().map_err(pg)?;
        let (r, commit) = f(&mut t)?;
        if commit {
            t.commit().map_err(pg)?;
        } else {
            t.rollback().map_err(pg)?;
        }
        Ok(r)
    }
}

/// The members of one group, as stored.
fn members_of(
    t: &mut Transaction<'_>,
    gid: &[u8],
) -> Result<Vec<(String, MemberRecord)>, StoreError> {
    t.query(
        "SELECT username, joined_seq, removed_seq, removed_ms FROM members
         WHERE group_id = $1 ORDER BY username",
        &[&gid],
    )
    .map_err(pg)?
    .iter()
    .map(|r| {
        Ok((
            r.get::<_, String>(0),
            MemberRecord {
                joined_seq: u(r.get(1))?,
                removed_seq: r.get::<_, Option<i64>>(2).map(u).transpose()?,
                removed_ms: r.get::<_, Option<i64>>(3).map(u).transpose()?,
            },
        ))
    })
    .collect()
}

/// A group row as a [`StoredGroup`], with its members.
fn stored_group(t: &mut Transaction<'_>, row: &::postgres::Row) -> Result<StoredGroup, StoreError> {
    let gid: Vec<u8> = row.get(0);
    Ok(StoredGroup {
        id: group_id(&gid)?,
        meta: GroupMeta {
            created_ms: u(row.get(1))?,
            epoch: u(row.get(2))?,
            head: u(row.get(3))?,
            compacted: u(row.get(4))?,
        },
        state: row.get(5),
        members: members_of(t, &gid)?,
    })
}

const GROUP_COLUMNS: &str = "id, created_ms, epoch, head, compacted, state";

impl Store for PgStore {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.user_record(name, false)
    }

    fn registered(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.user_record(name, true)
    }

    fn device_log(&self, user: &str) -> Result<Vec<Bytes>, StoreError> {
        self.read_device_log(user)
    }

    fn append_device(
        &self,
        user: &str,
        seq: u32,
        entry: &[u8],
        write: DeviceWrite<'_>,
    ) -> Result<bool, StoreError> {
        self.append_device_entry(user, seq, entry, write)
    }

    fn put_link(
        &self,
        user: &str,
        code: &str,
        link: &PendingLink,
        now_ms: u64,
        max: usize,
    ) -> Result<(), StoreError> {
        self.put_pending_link(user, code, link, now_ms, max)
    }

    fn link(&self, user: &str, code: &str, now_ms: u64) -> Result<Option<PendingLink>, StoreError> {
        self.pending_link(user, code, now_ms)
    }

    fn expire_links(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.expire_pending_links(now_ms)
    }

    fn put_join_request(
        &self,
        group: &GroupId,
        req: &crate::store::JoinRequest,
        max: usize,
    ) -> Result<(), StoreError> {
        self.put_join(group, req, max)
    }

    fn join_requests(&self, group: &GroupId) -> Result<Vec<crate::store::JoinRequest>, StoreError> {
        self.joins(group)
    }

    fn drop_join_requests(&self, group: &GroupId, users: &[String]) -> Result<(), StoreError> {
        self.drop_joins(group, users)
    }

    fn seen(&self, principal: &str, ms: u64) -> Result<(), StoreError> {
        self.set_seen(principal, ms)
    }

    fn last_seen(&self, principal: &str) -> Result<Option<u64>, StoreError> {
        self.get_seen(principal)
    }

    fn register_user(
        &self,
        name: &str,
        record: &UserRecord,
    ) -> Result<RegisterOutcome, StoreError> {
        self.txn(|t| {
            let inserted = t
                .execute(
                    "INSERT INTO users (name, identity_key, registered_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO NOTHING",
                    &[
                        &name,
                        &record.identity_key.as_slice(),
                        &n(record.registered_ms),
                    ],
                )
                .map_err(pg)?;
            if inserted == 1 {
                return Ok(RegisterOutcome::Created);
            }
            let row = t
                .query_one(
                    "SELECT identity_key, revoked_ms IS NOT NULL FROM users WHERE name = $1",
                    &[&name],
                )
                .map_err(pg)?;
            let key: Vec<u8> = row.get(0);
            let revoked: bool = row.get(1);
            Ok(if key == record.identity_key && !revoked {
                RegisterOutcome::Existing
            } else {
                RegisterOutcome::Taken
            })
        })
    }

    fn add_key_packages(
        &self,
        user: &str,
        packages: &[(Vec<u8>, StoredKeyPackage)],
        last_resort: Option<&StoredKeyPackage>,
        max: u32,
        now: u64,
    ) -> Result<(), StoreError> {
        self.store_key_packages(user, packages, last_resort, max, now)
    }

    fn claim_key_packages(
        &self,
        users: &[String],
        now: u64,
    ) -> Result<Vec<Option<Claimed>>, StoreError> {
        self.claim_packages(users, now)
    }

    fn key_package_count(&self, user: &str, valid_until: u64) -> Result<(u32, bool), StoreError> {
        self.count_key_packages(user, valid_until)
    }

    fn groups(&self) -> Result<Vec<StoredGroup>, StoreError> {
        self.txn(|t| {
            let rows = t
                .query(
                    &format!("SELECT {GROUP_COLUMNS} FROM groups ORDER BY id"),
                    &[],
                )
                .map_err(pg)?;
            rows.iter().map(|r| stored_group(t, r)).collect()
        })
    }

    fn group(&self, id: &GroupId) -> Result<Option<StoredGroup>, StoreError> {
        self.txn(|t| {
            let row = t
                .query_opt(
                    &format!("SELECT {GROUP_COLUMNS} FROM groups WHERE id = $1"),
                    &[&id.as_bytes().as_slice()],
                )
                .map_err(pg)?;
            row.map(|r| stored_group(t, &r)).transpose()
        })
    }

    fn head(&self, id: &GroupId) -> Result<Option<u64>, StoreError> {
        self.txn(|t| {
            t.query_opt(
                "SELECT head FROM groups WHERE id = $1",
                &[&id.as_bytes().as_slice()],
            )
            .map_err(pg)?
            .map(|r| u(r.get(0)))
            .transpose()
        })
    }

    fn user_groups(&self, user: &str) -> Result<Vec<GroupId>, StoreError> {
        self.txn(|t| {
            t.query(
                "SELECT group_id FROM members WHERE username = $1 ORDER BY group_id",
                &[&user],
            )
            .map_err(pg)?
            .iter()
            .map(|r| group_id(r.get(0)))
            .collect()
        })
    }

    fn apply(&self, writes: &[GroupWrite]) -> Result<Vec<Vec<u64>>, StoreError> {
        self.txn(|t| writes.iter().map(|w| apply_one(t, w)).collect())
    }

    fn read_log(
        &self,
        group: &GroupId,
        after: u64,
        until: u64,
        limit: u32,
    ) -> Result<Vec<LogEntry>, StoreError> {
        if after >= until {
            return Ok(Vec::new());
        }
        self.txn(|t| {
            let rows = t
                .query(
                    "SELECT seq, epoch, kind, timestamp_ms, data FROM log
                     WHERE group_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
                    &[
                        &group.as_bytes().as_slice(),
                        &n(after),
                        &n(until),
                        &i64::from(limit),
                    ],
                )
                .map_err(pg)?;
            let mut out = Vec::with_capacity(rows.len());
            let mut bytes = 0;
            for r in rows {
                if bytes >= MAX_PAGE_BYTES {
                    break;
                }
                let data: Vec<u8> = r.get(4);
                bytes += data.len();
                out.push(LogEntry {
                    seq: u(r.get(0))?,
                    epoch: u(r.get(1))?,
                    kind: kind_of(r.get(2))?,
                    timestamp_ms: u(r.get(3))?,
                    data: Bytes::from(data),
                });
            }
            Ok(out)
        })
    }

    fn delete_inbox(&self, user: &str, upto: u64) -> Result<(), StoreError> {
        self.txn(|t| drop_inbox(t, user, upto).map(|_| ()))
    }

    fn expire_inbox(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.txn(|t| {
            let gone = t
                .query(
                    "DELETE FROM inbox_items WHERE timestamp_ms < $1 RETURNING group_id, commit_seq",
                    &[&n(before_ms)],
                )
                .map_err(pg)?;
            release_shared(t, &gone)?;
            Ok(gone.len())
        })
    }

    fn lease(&self, name: &str, holder: u64, ttl: Duration) -> Result<bool, StoreError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.txn(|t| {
            let row = t
                .query_opt(
                    "INSERT INTO leases (name, holder, until)
                         VALUES ($1, $2, now() + $3::BIGINT * interval '1 millisecond')
                     ON CONFLICT (name) DO UPDATE
                         SET holder = EXCLUDED.holder, until = EXCLUDED.until
                         WHERE leases.holder = EXCLUDED.holder OR leases.until < now()
                     RETURNING holder",
                    &[&name, &(holder as i64), &ttl_ms],
                )
                .map_err(pg)?;
            Ok(row.is_some())
        })
    }

    fn read_inbox(
        &self,
        user: &str,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<InboxItem>, u64), StoreError> {
        self.txn(|t| {
            let head = t
                .query_opt("SELECT head FROM inbox_head WHERE username = $1", &[&user])
                .map_err(pg)?
                .map(|r| u(r.get(0)))
                .transpose()?
                .unwrap_or(0);
            let rows = t
                .query(
                    "SELECT i.seq, i.group_id, i.commit_seq, i.timestamp_ms, i.own, s.bytes
                     FROM inbox_items i LEFT JOIN welcome_shared s
                         ON s.group_id = i.group_id AND s.commit_seq = i.commit_seq
                     WHERE i.username = $1 AND i.seq > $2 ORDER BY i.seq LIMIT $3",
                    &[&user, &n(after), &i64::from(limit)],
                )
                .map_err(pg)?;
            let mut out = Vec::with_capacity(rows.len());
            let mut bytes = 0;
            for r in rows {
                if bytes >= MAX_PAGE_BYTES {
                    break;
                }
                let shared: Option<Vec<u8>> = r.get(5);
                let shared = shared
                    .ok_or_else(|| StoreError::Corrupt("an inbox item lost its Welcome".into()))?;
                let own: Vec<u8> = r.get(4);
                let welcome = huddle_core::welcome::join(&shared, &own);
                bytes += welcome.len();
                out.push(InboxItem {
                    seq: u(r.get(0))?,
                    group: group_id(r.get(1))?,
                    commit_seq: u(r.get(2))?,
                    timestamp_ms: u(r.get(3))?,
                    welcome,
                });
            }
            Ok((out, head))
        })
    }

    fn tree(&self, group: &GroupId, seq: u64) -> Result<Option<Bytes>, StoreError> {
        self.txn(|t| {
            Ok(t.query_opt(
                "SELECT tree FROM trees WHERE group_id = $1 AND seq = $2",
                &[&group.as_bytes().as_slice(), &n(seq)],
            )
            .map_err(pg)?
            .map(|r| Bytes::from(r.get::<_, Vec<u8>>(0))))
        })
    }

    fn group_info(&self, group: &GroupId) -> Result<Option<(u64, Bytes)>, StoreError> {
        self.txn(|t| {
            t.query_opt(
                "SELECT epoch, info FROM group_info WHERE group_id = $1",
                &[&group.as_bytes().as_slice()],
            )
            .map_err(pg)?
            .map(|r| Ok((u(r.get(0))?, Bytes::from(r.get::<_, Vec<u8>>(1)))))
            .transpose()
        })
    }

    fn save_cursors(&self, cursors: &[(GroupId, String, u64)]) -> Result<(), StoreError> {
        if cursors.is_empty() {
            return Ok(());
        }
        self.txn(|t| {
            for (g, user, seq) in cursors {
                t.execute(
                    "INSERT INTO cursors (group_id, username, seq) VALUES ($1, $2, $3)
                     ON CONFLICT (group_id, username)
                     DO UPDATE SET seq = GREATEST(cursors.seq, EXCLUDED.seq)",
                    &[&g.as_bytes().as_slice(), user, &n(*seq)],
                )
                .map_err(pg)?;
            }
            Ok(())
        })
    }

    fn cursors(&self, group: &GroupId) -> Result<Vec<(String, u64)>, StoreError> {
        self.txn(|t| {
            t.query(
                "SELECT username, seq FROM cursors WHERE group_id = $1 ORDER BY username",
                &[&group.as_bytes().as_slice()],
            )
            .map_err(pg)?
            .iter()
            .map(|r| Ok((r.get(0), u(r.get(1))?)))
            .collect()
        })
    }

    fn media(&self, id: &MediaId) -> Result<Option<MediaRecord>, StoreError> {
        self.get_media(id)
    }

    fn put_media(&self, id: &MediaId, record: &MediaRecord) -> Result<(), StoreError> {
        self.put_media_row(id, record)
    }

    fn counts_media(&self) -> bool {
        true
    }

    fn reserve_media(
        &self,
        id: &MediaId,
        record: &MediaRecord,
        quota: u64,
    ) -> Result<bool, StoreError> {
        self.reserve_media_row(id, record, quota)
    }

    fn update_media(&self, id: &MediaId, record: &MediaRecord) -> Result<bool, StoreError> {
        self.update_media_row(id, record)
    }

    fn delete_media(&self, id: &MediaId) -> Result<Option<u64>, StoreError> {
        self.delete_media_row(id)
    }

    fn all_media(&self) -> Result<Vec<(MediaId, MediaRecord)>, StoreError> {
        self.all_media_rows()
    }

    fn recount_media(&self) -> Result<(), StoreError> {
        self.txn(schema::count_media)
    }

    fn release(&self, name: &str, holder: u64) -> Result<(), StoreError> {
        self.txn(|t| {
            // Leases of holders that died are cleared on the way.
            t.execute(
                "DELETE FROM leases WHERE (name = $1 AND holder = $2)
                     OR until < now() - interval '1 day'",
                &[&name, &(holder as i64)],
            )
            .map_err(pg)?;
            Ok(())
        })
    }

    fn publish_epoch_authenticator(
        &self,
        group: &GroupId,
        epoch: u64,
        user: &str,
        hash: [u8; 32],
    ) -> Result<Vec<(String, [u8; 32])>, StoreError> {
        let gid = group.as_bytes().as_slice();
        self.txn(|t| {
            t.execute(
                "INSERT INTO epoch_auth (group_id, epoch, username, hash) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (group_id, epoch, username) DO UPDATE SET hash = EXCLUDED.hash",
                &[&gid, &n(epoch), &user, &hash.as_slice()],
            )
            .map_err(pg)?;
            t.query(
                "SELECT username, hash FROM epoch_auth WHERE group_id = $1 AND epoch = $2
                 ORDER BY username",
                &[&gid, &n(epoch)],
            )
            .map_err(pg)?
            .iter()
            .map(|r| {
                let h: Vec<u8> = r.get(1);
                let h: [u8; 32] = h
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("epoch authenticator length".into()))?;
                Ok((r.get(0), h))
            })
            .collect()
        })
    }
}
