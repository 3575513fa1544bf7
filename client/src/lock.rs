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
//!
//! [`FileLock`] is the other kind: one operation on one item (sending a
//! file to a group, `HOME/uploads/KEY.lock`; downloading an item to a
//! file, `HOME/partial/MEDIA.lock`), taken without waiting, its file
//! removed with it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
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

/// An advisory lock on a file of its own (`path`), which is removed when
/// the lock is dropped, so that finished operations leave nothing behind.
#[derive(Debug)]
#[must_use = "the lock is released when it is dropped"]
pub struct FileLock {
    path: PathBuf,
    /// Closed after the file is removed (fields drop after `drop`), which
    /// releases the lock.
    _file: File,
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Attempts at [`FileLock::try_take`] that found a removed lock file
/// before it gives up (each means another process just took and released
/// the lock).
const STALE_RETRIES: usize = 16;

/// What locking one opened lock file came to.
enum Attempt {
    Held(FileLock),
    /// Another process holds it.
    Busy,
    /// Locked, but the file is no longer at its path: its holder removed it
    /// as it let go after this process had opened it. Such a lock guards
    /// nothing (the next process creates a new file).
    Stale,
}

impl FileLock {
    /// Takes the lock at `path` (creating its directory and the file) if no
    /// other process holds it; `None` if one does.
    pub fn try_take(path: &Path) -> Result<Option<Self>> {
        use std::os::unix::fs::DirBuilderExt as _;
        let io = |e| ClientError::io(format!("locking {}", path.display()), e);
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        for _ in 0..STALE_RETRIES {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .map_err(io)?;
            match Self::attempt(path, file)? {
                Attempt::Held(lock) => return Ok(Some(lock)),
                Attempt::Busy => return Ok(None),
                Attempt::Stale => continue,
            }
        }
        Ok(None)
    }

    fn attempt(path: &Path, file: File) -> Result<Attempt> {
        use std::os::unix::fs::MetadataExt as _;
        let io = |e| ClientError::io(format!("locking {}", path.display()), e);
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(Attempt::Busy),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let held = file.metadata().map_err(io)?;
        match std::fs::metadata(path) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => {
                Ok(Attempt::Held(Self {
                    path: path.to_owned(),
                    _file: file,
                }))
            }
            Ok(_) => Ok(Attempt::Stale),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Attempt::Stale),
            Err(e) => Err(io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_lock_is_exclusive_and_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("partial").join("item.lock");
        let a = FileLock::try_take(&path).unwrap().expect("free");
        assert!(FileLock::try_take(&path).unwrap().is_none(), "taken twice");
        drop(a);
        assert!(!path.exists(), "the lock file outlived its lock");
        let b = FileLock::try_take(&path).unwrap().expect("free again");
        drop(b);
    }

    #[test]
    fn a_lock_file_removed_by_its_last_holder_is_not_taken_for_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("item.lock");
        let first = FileLock::try_take(&path).unwrap().unwrap();
        // Another process opens the file, then the holder finishes: it
        // removes the file and releases the lock.
        let opened_before = OpenOptions::new().write(true).open(&path).unwrap();
        drop(first);
        // Locking what it opened succeeds, but guards nothing: a third
        // process would create and lock a new file at the path.
        assert!(matches!(
            FileLock::attempt(&path, opened_before).unwrap(),
            Attempt::Stale
        ));
        let third = FileLock::try_take(&path).unwrap().unwrap();
        assert!(path.exists());
        drop(third);
    }

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
