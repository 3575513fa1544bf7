//! Per-group locks shared by every process of one home.
//!
//! SQLite serialises single transactions between the processes of a home
//! (`listen` in one terminal, `send` in another), but some changes of a
//! group's MLS state span a network round trip: a commit is stored as
//! *pending*, posted, and merged only once the DS accepted it. While one
//! process has a commit in flight, no other process of the home may build
//! one of its own (it would replace the pending commit the first process is
//! about to merge), join the group from a Welcome, or rejoin it. Each of
//! these holds the group's lock: an advisory lock on `HOME/locks/GROUP`,
//! which the kernel releases when the process exits, however it exits.
//!
//! Locks are re-entrant within one [`Locks`] (a commit that syncs and
//! retries inside takes the lock once), and waiting for one never blocks a
//! thread: the lock is tried, and tried again after a short sleep, up to
//! [`LOCK_WAIT`].

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use huddle_core::GroupId;

use crate::error::{ClientError, Result};

/// How long an operation waits for another process of the home to finish
/// changing the same group before it gives up with an error.
pub const LOCK_WAIT: Duration = Duration::from_secs(60);

/// Pause between two attempts to take a lock held by another process.
const RETRY: Duration = Duration::from_millis(10);

/// The group locks of one home, as held by one client.
#[derive(Debug)]
pub struct Locks {
    dir: PathBuf,
    /// Locks this client holds: the open lock file and how many guards
    /// share it.
    held: Mutex<HashMap<GroupId, (File, usize)>>,
}

/// Holds a group's lock until dropped.
#[derive(Debug)]
#[must_use = "the lock is released when the guard is dropped"]
pub struct GroupGuard {
    locks: Arc<Locks>,
    group: GroupId,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().expect("locks mutex");
        if let Some((_, n)) = held.get_mut(&self.group) {
            *n -= 1;
            if *n == 0 {
                // Closing the file releases the lock.
                held.remove(&self.group);
            }
        }
    }
}

impl Locks {
    /// The locks kept in `dir` (created on first use).
    pub fn new(dir: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            dir,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Takes `group`'s lock, waiting up to [`LOCK_WAIT`] for another
    /// process to release it.
    pub async fn lock(self: &Arc<Self>, group: &GroupId) -> Result<GroupGuard> {
        self.lock_within(group, LOCK_WAIT).await
    }

    /// Like [`Locks::lock`], giving up after `wait`.
    pub async fn lock_within(
        self: &Arc<Self>,
        group: &GroupId,
        wait: Duration,
    ) -> Result<GroupGuard> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(g) = self.try_lock(group)? {
                return Ok(g);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Busy(format!(
                    "another huddle process on this home has been changing group {group} for {} s; try again when it is done",
                    wait.as_secs()
                )));
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Takes `group`'s lock if no other process holds it; `None` if one
    /// does.
    pub fn try_lock(self: &Arc<Self>, group: &GroupId) -> Result<Option<GroupGuard>> {
        let guard = || GroupGuard {
            locks: self.clone(),
            group: *group,
        };
        if let Some((_, n)) = self.held.lock().expect("locks mutex").get_mut(group) {
            *n += 1;
            return Ok(Some(guard()));
        }
        let file = self.open(group)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(ClientError::io(
                    format!("locking {}", self.path(group).display()),
                    e,
                ))
            }
        }
        self.held
            .lock()
            .expect("locks mutex")
            .insert(*group, (file, 1));
        Ok(Some(guard()))
    }

    fn path(&self, group: &GroupId) -> PathBuf {
        self.dir.join(group.to_string())
    }

    fn open(&self, group: &GroupId) -> Result<File> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| ClientError::io(format!("creating {}", self.dir.display()), e))?;
        let path = self.path(group);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ClientError::io(format!("opening {}", path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lock_is_reentrant_in_one_client_and_exclusive_between_two() {
        let dir = tempfile::tempdir().unwrap();
        let g = GroupId([1; 16]);
        let a = Locks::new(dir.path().join("locks"));
        let b = Locks::new(dir.path().join("locks"));
        let first = a.lock(&g).await.unwrap();
        let again = a.lock(&g).await.unwrap();
        // Another holder (another process, as far as the kernel is
        // concerned: another open file description) must wait.
        let err = b.lock_within(&g, Duration::ZERO).await.unwrap_err();
        assert!(matches!(err, ClientError::Busy(_)), "{err}");
        drop(first);
        assert!(b.lock_within(&g, Duration::ZERO).await.is_err());
        drop(again);
        let got = b.lock_within(&g, Duration::ZERO).await.unwrap();
        // Other groups are independent.
        let other = a
            .lock_within(&GroupId([2; 16]), Duration::ZERO)
            .await
            .unwrap();
        drop((got, other));
        assert!(a.lock_within(&g, Duration::ZERO).await.is_ok());
    }

    #[tokio::test]
    async fn a_waiting_lock_is_taken_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let g = GroupId([3; 16]);
        let a = Locks::new(dir.path().to_owned());
        let b = Locks::new(dir.path().to_owned());
        let held = a.lock(&g).await.unwrap();
        let waiter = tokio::spawn(async move { b.lock(&g).await.map(|_| ()) });
        tokio::task::yield_now().await;
        drop(held);
        waiter.await.unwrap().unwrap();
    }
}
