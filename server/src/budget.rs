//! Memory for answers in flight, bounded per connection, per user and for
//! the whole DS; and the same kind of budget for the memory of transfers,
//! per user and for the whole DS ([`Budgets::for_transfers`]).
//!
//! An answer is built in memory and stays there until its client has read
//! it. A client that asks and never reads (it grants no flow-control
//! credit) would otherwise hold every answer it asked for: a hundred log
//! pages on one connection took the DS to gigabytes. Requests whose answer
//! can be large ([`reserve_for`]) reserve the most it can be before it is
//! built, from three byte semaphores at once (the connection's, the user's
//! and the DS's); once it is built the reservation shrinks to its real
//! size, and it is released when the answer was written or dropped. An
//! answer not read within the write deadline is dropped with its stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use huddle_core::proto::{ErrorBody, ErrorCode, Request, MAX_PAGE_BYTES};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ServerConfig;

/// Byte budgets of one kind of memory (answers, transfers): per
/// connection (where the caller has one), per user and for the whole DS.
#[derive(Debug)]
pub struct Budgets {
    total: Arc<Semaphore>,
    users: Mutex<HashMap<String, Arc<Semaphore>>>,
    per_user: usize,
    per_connection: usize,
    wait: Duration,
    /// The refusal's message, given whose budget is used up.
    refusal: fn(&str) -> String,
}

/// Bytes reserved from every budget that applies, released on drop.
#[derive(Debug)]
pub struct Lease {
    permits: Vec<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Lease {
    /// Keeps `bytes` (if fewer than reserved) and gives the rest back.
    pub fn shrink(&mut self, bytes: usize) {
        if bytes >= self.bytes {
            return;
        }
        for p in &mut self.permits {
            // `split` moves `bytes` permits into a new permit; the old one,
            // left with the rest, is dropped and gives them back.
            if let Some(kept) = p.split(bytes) {
                *p = kept;
            }
        }
        self.bytes = bytes;
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The most a request's answer can hold, if it can be large; `None` for
/// requests whose answer is a few bytes whatever happens.
pub fn reserve_for(req: &Request, max_frame: usize) -> Option<usize> {
    match req {
        // A page stops after the entry that reaches MAX_PAGE_BYTES: at most
        // that plus one entry (at most a frame).
        Request::FetchLog { .. } | Request::FetchInbox { .. } => Some(MAX_PAGE_BYTES + max_frame),
        // A tree, a GroupInfo, key packages, names: each bounded by a
        // frame-sized input the DS accepted or by a limit of its own.
        Request::RatchetTree { .. }
        | Request::JoinInfo { .. }
        | Request::InviteInfo { .. }
        | Request::ClaimKeyPackages { .. }
        | Request::LookupUsers { .. }
        | Request::GroupState { .. }
        | Request::ListGroups
        | Request::UserGroups
        | Request::Devices { .. }
        | Request::EpochAuthenticator { .. } => Some(2 * max_frame),
        _ => None,
    }
}

impl Budgets {
    /// The answer budgets as configured.
    pub fn new(config: &ServerConfig) -> Self {
        Self {
            total: Arc::new(Semaphore::new(config.answer_budget_total)),
            users: Mutex::new(HashMap::new()),
            per_user: config.answer_budget_per_user,
            per_connection: config.answer_budget_per_connection,
            wait: config.answer_budget_wait,
            refusal: |whose| {
                format!(
                    "answers in flight: the memory for unread answers of {whose} is used up; read the answers already asked for"
                )
            },
        }
    }

    /// The transfer memory budgets as configured: a transfer reserves the
    /// most it can hold before it starts, per user and for the whole DS
    /// (no connection budget).
    pub fn for_transfers(config: &ServerConfig) -> Self {
        Self {
            total: Arc::new(Semaphore::new(
                config.transfer_memory_total.min(Semaphore::MAX_PERMITS),
            )),
            users: Mutex::new(HashMap::new()),
            per_user: config.transfer_memory_per_user,
            per_connection: usize::MAX,
            wait: config.transfer_memory_wait,
            refusal: |whose| {
                format!(
                    "transfers: the memory for running transfers of {whose} is in use; try again when one has ended"
                )
            },
        }
    }

    /// A connection's own budget.
    pub fn connection(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.per_connection))
    }

    /// Reserves `bytes` from `conn` (if given), from `user`'s budget (if
    /// authenticated) and from the DS's, waiting up to the configured time
    /// for what holds them to be released. The error says which budget is
    /// used up.
    pub async fn reserve(
        &self,
        conn: Option<&Arc<Semaphore>>,
        user: Option<&str>,
        bytes: usize,
    ) -> Result<Lease, ErrorBody> {
        let limits = [
            (conn.cloned(), self.per_connection, "this connection"),
            (user.map(|u| self.user(u)), self.per_user, "this user"),
            (Some(self.total.clone()), usize::MAX, "the server"),
        ];
        let mut permits = Vec::with_capacity(3);
        let mut got = bytes;
        for (sem, limit, whose) in limits {
            let Some(sem) = sem else { continue };
            // Never ask for more than the budget holds: that would wait
            // forever.
            let n = u32::try_from(bytes.min(limit)).unwrap_or(u32::MAX);
            got = got.min(n as usize);
            let p = tokio::time::timeout(self.wait, sem.acquire_many_owned(n))
                .await
                .ok()
                .and_then(|r| r.ok())
                .ok_or_else(|| ErrorBody::new(ErrorCode::QuotaExceeded, (self.refusal)(whose)))?;
            permits.push(p);
        }
        let mut lease = Lease {
            permits,
            bytes: bytes.min(u32::MAX as usize),
        };
        lease.shrink(got);
        Ok(lease)
    }

    fn user(&self, user: &str) -> Arc<Semaphore> {
        self.users
            .lock()
            .expect("budgets lock")
            .entry(user.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_user)))
            .clone()
    }

    /// Forgets the budgets of users with nothing in flight.
    pub fn prune(&self) {
        let per_user = self.per_user;
        self.users
            .lock()
            .expect("budgets lock")
            .retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() < per_user);
    }

    /// Bytes reserved DS-wide right now (for tests and the abuse benchmark).
    pub fn in_flight(&self, total: usize) -> usize {
        total.saturating_sub(self.total.available_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(conn: usize, user: usize, total: usize) -> Budgets {
        Budgets::new(&ServerConfig {
            answer_budget_per_connection: conn,
            answer_budget_per_user: user,
            answer_budget_total: total,
            answer_budget_wait: Duration::from_millis(20),
            ..ServerConfig::default()
        })
    }

    #[tokio::test]
    async fn a_full_budget_refuses_and_a_released_one_serves_again() {
        let b = budgets(100, 150, 1_000);
        let c1 = b.connection();
        let c2 = b.connection();
        let first = b.reserve(Some(&c1), Some("u"), 80).await.unwrap();
        // The connection's budget is the limit here.
        let e = b.reserve(Some(&c1), Some("u"), 30).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        assert!(e.message.contains("this connection"), "{}", e.message);
        // Another connection of the same user: the user's budget.
        let e = b.reserve(Some(&c2), Some("u"), 80).await.unwrap_err();
        assert!(e.message.contains("this user"), "{}", e.message);
        // Another user is not affected.
        let other = b.reserve(Some(&c2), Some("v"), 80).await.unwrap();
        drop((first, other));
        b.reserve(Some(&c1), Some("u"), 100).await.unwrap();
    }

    #[tokio::test]
    async fn shrinking_gives_bytes_back_to_every_budget() {
        let b = budgets(100, 100, 100);
        let c = b.connection();
        let mut l = b.reserve(Some(&c), Some("u"), 100).await.unwrap();
        l.shrink(10);
        assert_eq!(l.bytes(), 10);
        assert_eq!(b.in_flight(100), 10);
        let more = b.reserve(Some(&c), Some("u"), 90).await.unwrap();
        drop((l, more));
        assert_eq!(b.in_flight(100), 0);
        b.prune();
        assert!(b.users.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_whole_ds_budget_bounds_many_users() {
        let b = budgets(100, 100, 150);
        let (c1, c2) = (b.connection(), b.connection());
        let _a = b.reserve(Some(&c1), Some("a"), 100).await.unwrap();
        let e = b.reserve(Some(&c2), Some("b"), 100).await.unwrap_err();
        assert!(e.message.contains("the server"), "{}", e.message);
    }
}
