//! Group commit: many sequencer steps, one durable transaction.
//!
//! Each group's sequencer hands its writes to the [`Writer`] and waits. A
//! dedicated thread takes every write that is waiting, applies them all in
//! one [`Store::apply`] call (one disk flush), and answers each waiter. Under
//! load one flush acknowledges the messages of many groups; when idle a
//! write goes out at once. If a combined batch fails, each write is retried
//! alone so that one bad write cannot fail the others.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::metrics::COUNTERS;
use crate::store::{GroupWrite, Store, StoreError};

type Reply = oneshot::Sender<Result<Vec<u64>, StoreError>>;

/// Most writes combined into one transaction.
const MAX_BATCH: usize = 1024;

/// Handle to the writer thread. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::UnboundedSender<(GroupWrite, Reply)>,
}

impl Writer {
    /// Starts the writer thread over `store`. It stops when every handle is
    /// dropped, after finishing the writes it has taken.
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(GroupWrite, Reply)>();
        std::thread::Builder::new()
            .name("huddle-writer".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(MAX_BATCH);
                while rx.blocking_recv().map(|w| batch.push(w)).is_some() {
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(w) => batch.push(w),
                            Err(_) => break,
                        }
                    }
                    commit(&*store, std::mem::take(&mut batch));
                }
            })
            .expect("spawning the writer thread");
        Self { tx }
    }

    /// Applies `write` durably, together with whatever else is waiting.
    pub async fn write(&self, write: GroupWrite) -> Result<Vec<u64>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((write, reply))
            .map_err(|_| StoreError::Io("writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Io("writer stopped".into()))?
    }
}

fn commit(store: &dyn Store, batch: Vec<(GroupWrite, Reply)>) {
    let (writes, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    COUNTERS.transaction(writes.len());
    match store.apply(&writes) {
        Ok(results) => {
            for (reply, r) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(r));
            }
        }
        Err(e) if writes.len() == 1 => {
            let _ = replies.into_iter().next().map(|r| r.send(Err(e)));
        }
        // A full disk or an unreachable database fails every write alike:
        // trying them one by one would only wait for it again and again.
        Err(e @ (StoreError::Full | StoreError::Unavailable(_))) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        // One write conflicted: the others must not fail with it.
        Err(_) => {
            for (w, reply) in writes.into_iter().zip(replies) {
                COUNTERS.transaction(1);
                let r = store
                    .apply(std::slice::from_ref(&w))
                    .map(|mut v| v.pop().unwrap_or_default());
                let _ = reply.send(r);
            }
        }
    }
}
