//! The bus between the DS nodes of one cluster (`--bus nats://…`): a
//! round committed on one node wakes the other nodes whose clients watch
//! its group, and a Welcome stored on one node wakes the node where its
//! recipient is connected.
//!
//! The database is the source of truth; the bus is only a wake-up and a
//! fast path. A notice may be lost (NATS core has no delivery guarantee,
//! and the bus may be down): a node that sees a gap in a group's sequence
//! numbers reads the missing entries from the database, and a node polls
//! the database for the groups it serves (`cluster_poll`, faster while the
//! bus is unreachable), so a lost notice delays delivery and loses nothing.
//!
//! Subjects (`huddle` is the default `bus_prefix`): `huddle.g.<group id,
//! hex>` carries [`RoundNotice`]s, one subscription per group a node has
//! loaded; `huddle.u.<user hash>`
//! carries [`InboxNotice`]s, which every node receives (Welcomes are rare)
//! and routes to the recipient's push streams if it is connected there.
//! Notices are published from a bounded queue by one task, so a slow or
//! lost bus never holds a group's task: when the queue is full the notice
//! is dropped and the poll delivers it.

use std::sync::Arc;

use bytes::Bytes;
use huddle_core::proto::LogEntry;
use huddle_core::GroupId;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// A round's notice larger than this carries no entries, only the head:
/// receivers read them from the database. Below NATS's default
/// `max_payload` (1 MiB).
pub const MAX_NOTICE_ENTRIES_BYTES: usize = 256 << 10;

/// Messages a node's subscription to one subject holds before the bus
/// client drops newer ones (the poll then finds what they announced).
const SUBSCRIPTION_CAPACITY: usize = 1024;

/// A round committed to a group's log: its new head and, when small, its
/// entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundNotice {
    /// Newest durable sequence number after the round.
    pub head: u64,
    /// The round's entries, consecutive, ending at `head`; empty when they
    /// were too large to carry.
    pub entries: Vec<LogEntry>,
    /// The round stored a new GroupInfo.
    pub group_info: bool,
}

impl RoundNotice {
    /// The notice of a round ending at `head`: with its entries unless
    /// they pass [`MAX_NOTICE_ENTRIES_BYTES`].
    pub fn new(head: u64, entries: &[LogEntry], group_info: bool) -> Self {
        let size: usize = entries.iter().map(|e| e.data.len() + 32).sum();
        Self {
            head,
            group_info,
            entries: if size <= MAX_NOTICE_ENTRIES_BYTES {
                entries.to_vec()
            } else {
                Vec::new()
            },
        }
    }
}

/// A Welcome stored in a user's inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxNotice {
    /// The recipient.
    pub user: String,
    /// The item's number in the recipient's inbox.
    pub seq: u64,
}

/// Why the bus could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The address is not a NATS address.
    #[error("--bus {0:?}: expected a NATS address, nats://HOST:PORT")]
    Address(String),
    /// The subject prefix holds what a subject may not.
    #[error("bus_prefix {0:?}: expected tokens of letters, digits, _ and - separated by dots")]
    Prefix(String),
    /// Subscribing failed.
    #[error("subscribing to {subject}: {detail}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// What the bus client said.
        detail: String,
    },
}

/// A node's connection to the bus.
pub struct Bus {
    client: async_nats::Client,
    out: mpsc::Sender<(String, Bytes)>,
    /// First token of every subject (`bus_prefix`).
    prefix: String,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("connected", &self.is_connected())
            .finish()
    }
}

/// Subject of a group's rounds.
pub fn group_subject(prefix: &str, group: &GroupId) -> String {
    format!("{prefix}.g.{}", hex::encode(group.as_bytes()))
}

/// Subject of a user's inbox notices: user names may hold characters a
/// subject may not, so it is named by a hash of the name.
pub fn inbox_subject(prefix: &str, user: &str) -> String {
    let h = blake3::hash(user.as_bytes());
    format!("{prefix}.u.{}", hex::encode(&h.as_bytes()[..16]))
}

/// Whether `prefix` can start a subject: one token or more of letters,
/// digits, `_` and `-`, separated by dots.
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

impl Bus {
    /// Connects to the NATS server at `url`. Returns at once even if the
    /// server is unreachable: the client keeps trying in the background,
    /// and until it connects the node delivers by polling the database.
    /// `queue` bounds the notices waiting to be published; `prefix` starts
    /// every subject (clusters sharing one NATS server differ in it).
    pub async fn connect(
        url: &str,
        queue: usize,
        prefix: &str,
        ca: Option<&std::path::Path>,
    ) -> Result<Arc<Self>, BusError> {
        if !(url.starts_with("nats://") || url.starts_with("tls://")) {
            return Err(BusError::Address(url.to_owned()));
        }
        if !valid_prefix(prefix) {
            return Err(BusError::Prefix(prefix.to_owned()));
        }
        let (url, auth) = split_credentials(url);
        let url = url.as_str();
        let options = match auth {
            Credentials::None => async_nats::ConnectOptions::new(),
            Credentials::Token(t) => async_nats::ConnectOptions::with_token(t),
            Credentials::UserPassword(u, p) => {
                async_nats::ConnectOptions::with_user_and_password(u, p)
            }
        };
        // TLS (`tls://`) verifies the server against `ca`, or else the
        // system's roots, with the process's provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let options = match ca {
            Some(path) => options.add_root_certificates(path.to_owned()),
            None => options,
        };
        let client = options
            .name("huddle-server")
            // A node never needs its own notices back.
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(std::time::Duration::from_secs(5))
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => info!("connected to the bus"),
                    async_nats::Event::Disconnected => {
                        warn!("lost the bus; delivering by polling the database until it is back")
                    }
                    // Refused credentials, among others: the node keeps
                    // trying (and polling the database meanwhile).
                    async_nats::Event::ServerError(e) => warn!(error = %e, "the bus refused"),
                    other => debug!(event = %other, "bus event"),
                }
            })
            .connect(url)
            .await
            .map_err(|e| BusError::Address(format!("{url}: {e}")))?;
        let (out, mut rx) = mpsc::channel::<(String, Bytes)>(queue.max(1));
        let publisher = client.clone();
        tokio::spawn(async move {
            while let Some((subject, payload)) = rx.recv().await {
                if let Err(e) = publisher.publish(subject, payload).await {
                    debug!(error = %e, "bus notice not published");
                }
            }
        });
        Ok(Arc::new(Self {
            client,
            out,
            prefix: prefix.to_owned(),
        }))
    }

    /// Whether the bus is connected now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Announces a committed round of `group` (entries consecutive, the
    /// last at `head`; `group_info`: it stored a GroupInfo). Never waits: a
    /// full queue drops the notice.
    pub fn publish_round(
        &self,
        group: &GroupId,
        head: u64,
        entries: &[LogEntry],
        group_info: bool,
    ) {
        self.send(
            group_subject(&self.prefix, group),
            &RoundNotice::new(head, entries, group_info),
        );
    }

    /// Announces a Welcome stored in `user`'s inbox as item `seq`.
    pub fn publish_inbox(&self, user: &str, seq: u64) {
        let notice = InboxNotice {
            user: user.to_owned(),
            seq,
        };
        self.send(inbox_subject(&self.prefix, user), &notice);
    }

    fn send<T: Serialize>(&self, subject: String, notice: &T) {
        let payload = match postcard::to_allocvec(notice) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                warn!(error = %e, "bus notice not encoded");
                return;
            }
        };
        if self.out.try_send((subject, payload)).is_err() {
            crate::metrics::COUNTERS.bus_dropped();
        }
    }

    /// Rounds of `group` committed by other nodes.
    pub async fn watch_group(&self, group: &GroupId) -> Result<Notices<RoundNotice>, BusError> {
        self.subscribe(group_subject(&self.prefix, group)).await
    }

    /// Inbox notices of every user (the node keeps those of its users).
    pub async fn watch_inboxes(&self) -> Result<Notices<InboxNotice>, BusError> {
        self.subscribe(format!("{}.u.*", self.prefix)).await
    }

    async fn subscribe<T>(&self, subject: String) -> Result<Notices<T>, BusError> {
        let sub =
            self.client
                .subscribe(subject.clone())
                .await
                .map_err(|e| BusError::Subscribe {
                    subject,
                    detail: e.to_string(),
                })?;
        Ok(Notices {
            sub,
            _t: std::marker::PhantomData,
        })
    }
}

/// Notices arriving on one subscription; dropping it unsubscribes.
pub struct Notices<T> {
    sub: async_nats::Subscriber,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Notices<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notices").finish_non_exhaustive()
    }
}

impl<T: for<'de> Deserialize<'de>> Notices<T> {
    /// The next notice, or `None` once the bus client is gone. A notice
    /// that does not decode is skipped (the database has what it meant).
    pub async fn next(&mut self) -> Option<T> {
        use futures_util::StreamExt as _;
        loop {
            let msg = self.sub.next().await?;
            match postcard::from_bytes(&msg.payload) {
                Ok(n) => return Some(n),
                Err(e) => warn!(subject = %msg.subject, error = %e, "bus notice not decoded"),
            }
        }
    }
}

/// How a node proves itself to the NATS server.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    None,
    /// `nats://TOKEN@host:port`
    Token(String),
    /// `nats://USER:PASSWORD@host:port`
    UserPassword(String, String),
}

/// The address without its credentials (what may be logged), and the
/// credentials. Give them through `HUDDLE_BUS` rather than `--bus`, which
/// other users of the machine can read in the process list.
fn split_credentials(url: &str) -> (String, Credentials) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), Credentials::None);
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return (url.to_owned(), Credentials::None);
    };
    let bare = if path.is_empty() {
        format!("{scheme}://{host}")
    } else {
        format!("{scheme}://{host}/{path}")
    };
    let auth = match userinfo.split_once(':') {
        Some((user, pass)) => Credentials::UserPassword(user.to_owned(), pass.to_owned()),
        None => Credentials::Token(userinfo.to_owned()),
    };
    (bare, auth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_taken_out_of_the_address() {
        assert_eq!(
            split_credentials("nats://127.0.0.1:4222"),
            ("nats://127.0.0.1:4222".into(), Credentials::None)
        );
        assert_eq!(
            split_credentials("nats://huddle:s3cr:et@nats.example:4222"),
            (
                "nats://nats.example:4222".into(),
                Credentials::UserPassword("huddle".into(), "s3cr:et".into())
            )
        );
        assert_eq!(
            split_credentials("nats://tok3n@nats.example"),
            (
                "nats://nats.example".into(),
                Credentials::Token("tok3n".into())
            )
        );
    }

    #[test]
    fn subjects_hold_only_subject_characters() {
        let g = GroupId::from_slice(&[0xab; 16]).unwrap();
        assert_eq!(
            group_subject("huddle", &g),
            format!("huddle.g.{}", "ab".repeat(16))
        );
        for user in ["alice", "a.b", "x y", "*", ">", "ünï"] {
            let s = inbox_subject("huddle", user);
            assert!(s.starts_with("huddle.u."), "{s}");
            assert!(
                s["huddle.u.".len()..]
                    .chars()
                    .all(|c| c.is_ascii_hexdigit()),
                "{user:?} -> {s}"
            );
        }
        assert_ne!(
            inbox_subject("huddle", "alice"),
            inbox_subject("huddle", "bob")
        );
        for ok in ["huddle", "eu-1.huddle", "a_b.c"] {
            assert!(valid_prefix(ok), "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", ">", "a.>"] {
            assert!(!valid_prefix(bad), "{bad}");
        }
    }

    #[test]
    fn a_large_round_is_announced_without_its_entries() {
        let entry = |seq, len| LogEntry {
            seq,
            epoch: 1,
            kind: huddle_core::proto::EntryKind::Application,
            timestamp_ms: 0,
            data: Bytes::from(vec![7u8; len]),
        };
        let small = RoundNotice::new(2, &[entry(1, 10), entry(2, 10)], false);
        assert_eq!(small.entries.len(), 2);
        let bytes = postcard::to_allocvec(&small).unwrap();
        assert_eq!(postcard::from_bytes::<RoundNotice>(&bytes).unwrap(), small);
        let big = RoundNotice::new(
            2,
            &[entry(1, 10), entry(2, MAX_NOTICE_ENTRIES_BYTES)],
            false,
        );
        assert_eq!((big.head, big.entries.len()), (2, 0));
        assert!(postcard::to_allocvec(&big).unwrap().len() < 64);
    }
}
