//! A client of the home on a thread of its own. A [`Client`] keeps its
//! database connection across awaits, so its futures stay on one thread;
//! the server's handlers, on the multi-threaded runtime, hand it jobs and
//! await the answers. Jobs run one at a time, in the order given.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::{mpsc, oneshot};

use crate::error::{ClientError, Result};
use crate::{Client, Home};

/// A future borrowing the client, run on the worker's thread.
pub(super) type Local<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

type Job = Box<dyn for<'a> FnOnce(&'a mut Client) -> Local<'a, ()> + Send>;

/// Jobs waiting for a worker; a caller beyond that waits to hand its job
/// over.
const QUEUE: usize = 64;

/// The handle of a worker thread and its client.
#[derive(Debug, Clone)]
pub(super) struct Worker {
    jobs: mpsc::Sender<Job>,
}

impl Worker {
    /// Opens a client of `home` on a new thread named `name`.
    pub(super) fn start(home: Home, name: &str) -> Result<Worker> {
        let (jobs, mut rx) = mpsc::channel::<Job>(QUEUE);
        let (ready, opened) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(ClientError::Io(e.to_string())));
                        return;
                    }
                };
                let mut client = match Client::open(home) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                rt.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        job(&mut client).await;
                    }
                    client.close().await;
                });
            })
            .map_err(|e| ClientError::Io(format!("cannot start a thread: {e}")))?;
        opened
            .recv()
            .map_err(|_| ClientError::Io("the client thread ended at once".into()))??;
        Ok(Worker { jobs })
    }

    /// Runs `f` on the worker's client and returns what it returns.
    pub(super) async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a mut Client) -> Local<'a, Result<T>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |c| {
            Box::pin(async move {
                let _ = tx.send(f(c).await);
            })
        });
        let gone = || ClientError::Io("the client thread stopped".into());
        self.jobs.send(job).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Runs `f`, which does not wait on anything, on the worker's client.
    pub(super) async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Client) -> Result<T> + Send + 'static,
    {
        self.run(move |c| Box::pin(async move { f(c) })).await
    }
}
