//! Group commit: many sequencer steps, one durable transaction.
//!
//! Each group's sequencer hands its writes to the [`Writer`] and waits. A
//! dedicated thread takes every write that is waiting, applies them all in
//! one [`Store::apply`] call (one disk flush), and answers each waiter. Under
//! load one flush acknowledges the messages of many groups; when idle a
//! write goes out at once. If a combined batch fails, each write is retried
//! alone so that one bad write cannot fail the others.
//!
//! **Keeping the groups in step.** A group's task answered by one
//! transaction pushes, answers its posters, takes the posts that arrived
//! meanwhile and hands in its next write. Were the next transaction to
//! start with the first of those writes alone, the groups would drift into
//! cohorts, each with its own transaction: ten busy groups took 1.8 group
//! writes per transaction, and every transaction costs a flush and its
//! pages. So each answer carries a [`Busy`] mark, held by the group's task
//! until it hands in its next write or finds its queue empty; while marks
//! are out, the writer waits for their writes, at most [`LINGER`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::metrics::COUNTERS;
use crate::store::{GroupWrite, Store, StoreError};

type Reply = oneshot::Sender<(Result<Vec<u64>, StoreError>, Busy)>;

/// What the writer thread is handed.
enum Msg {
    /// A write, with the mark of the task's last answer (dropped once the
    /// write is taken).
    Write(Box<GroupWrite>, Reply, Option<Busy>),
    /// The last busy task went idle: stop waiting.
    Idle,
    /// The last [`Writer`] handle is gone: finish and end the thread. (Its
    /// channel never closes by itself: the thread and every [`Busy`] mark
    /// hold a sender, to wake it.)
    Stop,
}

/// Most writes combined into one transaction.
const MAX_BATCH: usize = 1024;

/// Longest the writer waits for the writes of tasks it has just answered
/// before starting a transaction without them. Validating a round of posts
/// takes tens of microseconds; a commit of a large group takes
/// milliseconds in a blocking task, and is not waited for past this.
pub const LINGER: Duration = Duration::from_micros(500);

/// Handle to the writer thread. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::Sender<Msg>,
    busy: Arc<AtomicUsize>,
    /// Shared by every handle; the last one dropped stops the thread.
    _stop: Arc<StopOnDrop>,
}

/// Sends [`Msg::Stop`] when dropped.
#[derive(Debug)]
struct StopOnDrop(mpsc::Sender<Msg>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(Msg::Stop);
    }
}

/// A task answered by the writer that may hand in another write soon;
/// dropping it says it will not.
#[derive(Debug)]
pub struct Busy {
    count: Arc<AtomicUsize>,
    wake: mpsc::Sender<Msg>,
}

impl Busy {
    fn new(count: &Arc<AtomicUsize>, wake: &mpsc::Sender<Msg>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self {
            count: count.clone(),
            wake: wake.clone(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.wake.send(Msg::Idle);
        }
    }
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Write(..) => "Write",
            Msg::Idle => "Idle",
            Msg::Stop => "Stop",
        })
    }
}

impl Writer {
    /// Starts the writer thread over `store`, waiting at most `linger` for
    /// busy tasks (`writer_linger`, default [`LINGER`]). It stops when every
    /// handle is dropped, after finishing the writes handed in before (and
    /// then drops `store`).
    pub fn start(store: Arc<dyn Store>, linger: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<Msg>();
        let busy = Arc::new(AtomicUsize::new(0));
        let (count, wake) = (busy.clone(), tx.clone());
        std::thread::Builder::new()
            .name("huddle-writer".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(MAX_BATCH);
                let mut stop = false;
                while !stop {
                    let Ok(m) = rx.recv() else { break };
                    match m {
                        Msg::Write(w, reply, mark) => {
                            drop(mark);
                            batch.push((*w, reply));
                        }
                        Msg::Idle => continue,
                        Msg::Stop => break,
                    }
                    stop = gather(&rx, &count, linger, &mut batch);
                    commit(&*store, std::mem::take(&mut batch), &count, &wake);
                }
            })
            .expect("spawning the writer thread");
        Self {
            _stop: Arc::new(StopOnDrop(tx.clone())),
            tx,
            busy,
        }
    }

    /// Applies `write` durably, together with whatever else is waiting.
    pub async fn write(&self, write: GroupWrite) -> Result<Vec<u64>, StoreError> {
        self.write_next(write, None).await.0
    }

    /// Like [`Writer::write`], for a task that writes again and again:
    /// `done` is the mark of its last answer, and the answer comes with a
    /// new one, to be dropped when the task finds nothing more to write.
    pub async fn write_next(
        &self,
        write: GroupWrite,
        done: Option<Busy>,
    ) -> (Result<Vec<u64>, StoreError>, Busy) {
        let (reply, rx) = oneshot::channel();
        let stopped = || StoreError::Io("writer stopped".into());
        let idle = || Busy::new(&self.busy, &self.tx);
        if self
            .tx
            .send(Msg::Write(Box::new(write), reply, done))
            .is_err()
        {
            return (Err(stopped()), idle());
        }
        rx.await.unwrap_or_else(|_| (Err(stopped()), idle()))
    }
}

/// Adds to `batch` what is waiting, then what the busy tasks hand in
/// within `linger`. True when the last handle is gone (nothing more can
/// come).
fn gather(
    rx: &mpsc::Receiver<Msg>,
    busy: &AtomicUsize,
    linger: Duration,
    batch: &mut Vec<(GroupWrite, Reply)>,
) -> bool {
    let deadline = Instant::now() + linger;
    // True on Stop.
    let take = |m: Msg, batch: &mut Vec<_>| match m {
        Msg::Write(w, reply, mark) => {
            drop(mark);
            batch.push((*w, reply));
            false
        }
        Msg::Idle => false,
        Msg::Stop => true,
    };
    loop {
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => {
                    if take(m, batch) {
                        return true;
                    }
                }
                Err(_) => break,
            }
        }
        if batch.len() >= MAX_BATCH || busy.load(Ordering::Acquire) == 0 {
            return false;
        }
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(m) => {
                if take(m, batch) {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
}

fn commit(
    store: &dyn Store,
    batch: Vec<(GroupWrite, Reply)>,
    busy: &Arc<AtomicUsize>,
    wake: &mpsc::Sender<Msg>,
) {
    let (writes, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    COUNTERS.transaction(writes.len());
    let answer = |reply: Reply, r| {
        let _ = reply.send((r, Busy::new(busy, wake)));
    };
    match store.apply(&writes) {
        Ok(results) => {
            for (reply, r) in replies.into_iter().zip(results) {
                answer(reply, Ok(r));
            }
        }
        Err(e) if writes.len() == 1 => {
            if let Some(r) = replies.into_iter().next() {
                answer(r, Err(e));
            }
        }
        // A full disk or an unreachable database fails every write alike:
        // trying them one by one would only wait for it again and again.
        Err(e @ (StoreError::Full | StoreError::Unavailable(_))) => {
            for reply in replies {
                answer(reply, Err(e.clone()));
            }
        }
        // One write conflicted: the others must not fail with it.
        Err(_) => {
            for (w, reply) in writes.into_iter().zip(replies) {
                COUNTERS.transaction(1);
                let r = store
                    .apply(std::slice::from_ref(&w))
                    .map(|mut v| v.pop().unwrap_or_default());
                answer(reply, r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redb::RedbStore;
    use huddle_core::proto::{EntryKind, LogEntry};
    use huddle_core::GroupId;

    fn append(group: GroupId, seq: u64) -> GroupWrite {
        let mut w = GroupWrite::create(group, "alice", 0, vec![1]);
        w.create = false;
        w.meta.head = seq;
        w.entries = vec![LogEntry {
            seq,
            epoch: 0,
            kind: EntryKind::Application,
            timestamp_ms: seq,
            data: bytes::Bytes::from_static(b"hi"),
        }];
        w
    }

    /// The thread ends, and lets go of the store, once the last handle is
    /// dropped, even while a task still holds the mark of its last answer
    /// (each mark holds a sender to the thread, and so does the thread).
    #[tokio::test]
    async fn the_writer_thread_ends_with_its_last_handle() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("db.redb")).unwrap());
        let w = Writer::start(store.clone(), LINGER);
        let w2 = w.clone();
        drop(w);
        // One handle left: it still writes.
        let g = GroupId([3; 16]);
        let (r, busy) = w2
            .write_next(GroupWrite::create(g, "alice", 0, vec![1]), None)
            .await;
        r.unwrap();
        let held_while_busy = Arc::strong_count(&store);
        assert!(
            held_while_busy > 1,
            "the thread holds the store while it runs"
        );
        drop(w2);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&store) > 1 {
            assert!(
                Instant::now() < deadline,
                "the writer thread still holds the store 10 s after its last handle was dropped"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(busy);
        // What it wrote is there.
        assert!(store.group(&g).unwrap().is_some());
    }

    /// A task the writer answered holds the next transaction back until it
    /// hands in its write (so that both go in one flush), and not once it
    /// says it has nothing more.
    #[tokio::test]
    async fn the_writer_waits_for_a_task_it_answered_until_that_task_writes_or_goes_idle() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("db.redb")).unwrap());
        // An hour: a wait that did not end on the task's word would hang.
        let w = Writer::start(store, Duration::from_secs(3600));
        let (a, b) = (GroupId([1; 16]), GroupId([2; 16]));
        let (r, busy_a) = w
            .write_next(GroupWrite::create(a, "alice", 0, vec![1]), None)
            .await;
        r.unwrap();
        let w2 = w.clone();
        let mut b_write =
            tokio::spawn(async move { w2.write(GroupWrite::create(b, "alice", 0, vec![1])).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut b_write)
                .await
                .is_err(),
            "b was written while a, just answered, was still busy"
        );
        // a hands in its next write: both are written.
        let (r, busy_a) = w.write_next(append(a, 1), Some(busy_a)).await;
        r.unwrap();
        b_write.await.unwrap().unwrap();
        // a goes idle: b's next write is not held back.
        let w2 = w.clone();
        let b_write = tokio::spawn(async move { w2.write(append(b, 1)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(busy_a);
        tokio::time::timeout(Duration::from_secs(10), b_write)
            .await
            .expect("the writer went on once no task was busy")
            .unwrap()
            .unwrap();
    }
}
