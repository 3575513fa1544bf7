//! A connection's authentication state (`Session`), and the counts of
//! connections per user and of unauthenticated ones that bound them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use huddle_core::auth::EXPORTER_LEN;
use huddle_core::proto::{ErrorBody, ErrorCode};

use super::Service;

/// Per-connection authentication state.
#[derive(Debug)]
pub struct Session {
    /// Connection id, unique in this process.
    pub conn: u64,
    /// TLS exporter keying material of the connection (see
    /// [`huddle_core::auth`]).
    pub exporter: [u8; EXPORTER_LEN],
    /// The connection's budget for answers in flight ([`crate::budget`]).
    pub answers: Arc<tokio::sync::Semaphore>,
    pub(super) state: Mutex<SessionState>,
}

#[derive(Debug, Default)]
pub(super) struct SessionState {
    pub(super) nonce: Option<[u8; 32]>,
    pub(super) user: Option<String>,
    /// Counts this connection among its user's while it lives.
    pub(super) _counted: Option<Counted>,
    /// Counts it among the unauthenticated ones until it authenticates.
    pub(super) unauthenticated: Option<Uncounted>,
}

/// Counts one connection in a shared counter until dropped (and runs a
/// clean-up then, if one was given).
pub struct Uncounted {
    pub(super) counter: Arc<std::sync::atomic::AtomicUsize>,
    pub(super) then: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for Uncounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Uncounted")
    }
}

impl Uncounted {
    /// Counts one more in `counter`.
    pub fn new(counter: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            counter,
            then: None,
        }
    }

    /// Runs `f` too when it is dropped.
    pub fn and_then(mut self, f: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.then = Some(Box::new(f));
        self
    }
}

impl Drop for Uncounted {
    fn drop(&mut self) {
        self.counter
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(f) = self.then.take() {
            f();
        }
    }
}

/// Connections per user, shared by the sessions that count in it.
pub(super) type UserCounts = Arc<Mutex<HashMap<String, usize>>>;

/// One connection counted for its user; uncounted on drop.
#[derive(Debug)]
pub(super) struct Counted {
    pub(super) counts: UserCounts,
    pub(super) user: String,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("user connections lock");
        if let Some(n) = c.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.user);
            }
        }
    }
}

impl Session {
    /// A new, unauthenticated session, with `answers` as its budget for
    /// answers in flight.
    pub fn new(
        conn: u64,
        exporter: [u8; EXPORTER_LEN],
        answers: Arc<tokio::sync::Semaphore>,
    ) -> Self {
        Self {
            conn,
            exporter,
            answers,
            state: Mutex::new(SessionState::default()),
        }
    }

    /// Counts the session in `counter` until it authenticates.
    pub fn count_until_authenticated(&self, counter: Uncounted) {
        self.state.lock().expect("session lock").unauthenticated = Some(counter);
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<String> {
        self.state.lock().expect("session lock").user.clone()
    }

    pub(super) fn require_user(&self) -> Result<String, ErrorBody> {
        self.user().ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::NotAuthenticated,
                "authenticate first (Challenge, then Register or Authenticate)",
            )
        })
    }
}

impl Service {
    /// Open authenticated connections of `user`.
    pub fn connections_of(&self, user: &str) -> usize {
        self.user_connections
            .lock()
            .expect("user connections lock")
            .get(user)
            .copied()
            .unwrap_or(0)
    }
}
