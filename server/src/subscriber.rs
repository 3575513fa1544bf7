//! A push stream as the group tasks and the hub see it: where its frames
//! go, and the signals (gaps, ends) that must not be lost when its queue is
//! full. A leaf module: it knows neither the groups nor the push stream.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use huddle_core::proto::Event;
use tokio::sync::{mpsc, Notify};

/// Signals for one connection's push stream that must not be lost when its
/// queue is full: gaps and ends of pushes.
#[derive(Debug, Default)]
pub struct Signals {
    events: Mutex<Vec<Event>>,
    notify: Notify,
}

impl Signals {
    /// Queues an event and wakes the push task.
    pub fn raise(&self, e: Event) {
        self.events.lock().expect("signals lock").push(e);
        self.notify.notify_one();
    }

    /// Takes the queued events.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().expect("signals lock"))
    }

    /// Waits until an event is raised.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

/// One connection that wants pushes.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// Push stream id, unique in this process.
    pub id: u64,
    /// Authenticated user of the connection.
    pub user: String,
    /// Pre-encoded [`Event`] frames.
    pub frames: mpsc::Sender<Bytes>,
    /// Out-of-band signals.
    pub signals: Arc<Signals>,
}
