//! Server configuration.

use crate::clock::{self, Clock};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can be tuned on a delivery service. [`Default`] gives the
/// embedded defaults the command line starts with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Where the store, certificate and blobs live.
    pub data_dir: PathBuf,
    /// Certificate chain and private key (PEM) to use instead of the
    /// self-signed certificate kept in the data dir.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Most connections served at once; more are refused with a reason.
    pub max_connections: usize,
    /// Most connections at once that have not authenticated yet (they are
    /// cheap to open: without this, keep-alives alone could hold every
    /// connection slot).
    pub max_unauthenticated: usize,
    /// A connection that has not authenticated this long after its
    /// handshake is closed.
    pub auth_timeout: Duration,
    /// Most authenticated connections of one user at once; one more is
    /// refused (`QuotaExceeded`) at authentication.
    pub max_connections_per_user: usize,
    /// Most concurrent bidirectional streams a client may open on one
    /// connection (QUIC flow control holds the rest back).
    pub max_streams_per_connection: u32,
    /// Largest control frame body accepted, in bytes.
    pub max_frame: usize,
    /// Largest application message (MLS PrivateMessage) accepted, in
    /// bytes: well below the frame limit, which commits (and the Welcomes
    /// of large adds) need.
    pub max_application_message: usize,
    /// Largest leaf node a member may put in the group's tree (in a key
    /// package, an update or a commit's path), in bytes: every joiner
    /// downloads every leaf.
    pub max_leaf_node: usize,
    /// Most proposals pending in one epoch of a group.
    pub max_pending_proposals: usize,
    /// Most groups one push stream may watch.
    pub max_subscribe_groups: usize,
    /// Most one-time key packages stored per user.
    pub max_key_packages_per_user: u32,
    /// Largest key package accepted, in bytes (an ordinary one is a few
    /// hundred).
    pub max_key_package_bytes: usize,
    /// A key package valid for less than this is not counted as available
    /// (it is still handed out while valid), so clients replace it in time.
    pub key_package_min_validity: Duration,
    /// Most Welcomes waiting in one user's inbox; a commit adding a user
    /// whose inbox is full is refused (`QuotaExceeded`).
    pub max_inbox_items: usize,
    /// Most current devices of one user; linking one more is refused
    /// (`QuotaExceeded`).
    pub max_devices_per_user: usize,
    /// Most link requests waiting for approval per user; a new one
    /// drops the oldest.
    pub max_pending_links_per_user: usize,
    /// How long a link request waits for approval.
    pub link_ttl: Duration,
    /// Most users waiting for an admin to add them to one group (with
    /// invites that need approval).
    pub max_join_requests_per_group: usize,
    /// Welcomes are deleted this long after they were delivered to the
    /// inbox (and at once when their recipient acknowledges them).
    pub inbox_retention: Duration,
    /// Key packages one user may claim per minute (bursts up to this many).
    pub claims_per_minute: u32,
    /// Pushes queued per connection (each one group's entries of one commit
    /// round, or one event) before the DS stops pushing to it and tells it
    /// to catch up from the log instead.
    pub push_queue: usize,
    /// A push stream whose client reads nothing for this long is closed.
    pub push_stall_timeout: Duration,
    /// Least time between two writes to one push stream. A write carries
    /// everything queued for that connection, so while its groups are busy
    /// a member gets a few full packets instead of one small packet per
    /// commit round; an idle member's first push goes out at once. Zero
    /// writes each round as soon as it is durable. Fewer, fuller datagrams
    /// to a busy group's members lower both their cost and the latency
    /// tail (measured in docs/bench/HISTORY.md).
    pub push_interval: Duration,
    /// Longest the writer waits, before a transaction, for the next write
    /// of a group task it has just answered (see `writer`): without it,
    /// busy groups drift into cohorts with a flush each. Zero: never wait.
    pub writer_linger: Duration,
    /// A group nobody watched or asked for during this long is unloaded
    /// from memory (it is loaded again when next asked for).
    pub group_idle: Duration,
    /// Newest entries per group kept in memory for pushing.
    pub tail_entries: usize,
    /// Bytes of those entries per group, at most.
    pub tail_bytes: usize,
    /// Bytes of entries kept in memory over all groups; beyond it, groups
    /// keep only their newest entry and watchers catch up from the log.
    pub tail_bytes_total: usize,
    /// Bytes of answers one connection may have built and not yet had
    /// read (see [`crate::budget`]); a request that would go beyond waits,
    /// then is refused with `QuotaExceeded`.
    pub answer_budget_per_connection: usize,
    /// The same over all connections of one user.
    pub answer_budget_per_user: usize,
    /// The same over the whole DS.
    pub answer_budget_total: usize,
    /// How long a request waits for room in those budgets.
    pub answer_budget_wait: Duration,
    /// An answer its client has not read after this long is dropped (its
    /// stream reset), and its memory freed.
    pub answer_write_timeout: Duration,
    /// Memory the store may use to cache its pages.
    pub store_cache: usize,
    /// Keep the DS's state in this PostgreSQL database
    /// (`postgres://user@host/db`) instead of the embedded store in the
    /// data directory.
    pub store_url: Option<String>,
    /// Connections to that database, at most; requests beyond them wait
    /// up to 5 s for one, then fail as `Unavailable`.
    pub store_connections: usize,
    /// Cluster mode: the NATS server (`nats://host:port`) through which
    /// this node and the others serving the same database wake each other
    /// when a round or a Welcome is stored. Needs `store_url`.
    pub bus_url: Option<String>,
    /// Cluster mode: the first token(s) of the bus's subjects; clusters
    /// that share one NATS server differ in it.
    pub bus_prefix: String,
    /// Cluster mode: PEM certificates of the authorities that sign the
    /// NATS server's certificate, for a `tls://` bus (`None`: the system's
    /// roots).
    pub bus_ca: Option<PathBuf>,
    /// Keep media blobs on this S3-compatible object store
    /// (`s3://BUCKET[/PREFIX][?endpoint=URL&region=NAME]`) instead of the
    /// data directory: what every node of a cluster must share.
    pub blobs_url: Option<String>,
    /// The object store's access key id and secret; `None`: the `AWS_*`
    /// environment variables.
    pub blob_keys: Option<(String, String)>,
    /// On an object store: part buffers (8 MiB each) held in memory at
    /// once by all uploads together; an upload past it waits for one.
    pub object_part_buffers: usize,
    /// On an object store: part buffers one user's uploads hold at once;
    /// past it that user's uploads wait.
    pub object_part_buffers_per_user: usize,
    /// Cluster mode: notices waiting to be published on the bus, at most;
    /// past it they are dropped (the other nodes' polls find what they
    /// announced).
    pub bus_queue: usize,
    /// Cluster mode: how often a node reads from the database the head of
    /// each group its clients watch, while the bus is unreachable.
    pub cluster_poll: Duration,
    /// The same while the bus is up: it catches a lost notice.
    pub cluster_poll_connected: Duration,
    /// Threads for blocking work (store access, disk I/O, MLS validation);
    /// beyond it such work queues. None of it waits on the network.
    pub blocking_threads: usize,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// How often acknowledged cursors are written and logs compacted.
    /// Cursors only decide when a log may be compacted, so writing them
    /// rarely loses nothing: after a crash, compaction just waits for the
    /// next acknowledgements, and writing them often costs a large group
    /// disk writes on every message.
    pub maintenance_interval: Duration,
    /// How long the log keeps, for a member who was removed (or left), what
    /// it may still read up to its removal, counted from the removal: long
    /// enough for a device that is offline for a while to come back, read
    /// it and learn that it was removed. After that, compaction goes on
    /// without it and it is told that those entries are gone.
    pub departed_retention: Duration,
    /// Largest media item (ciphertext bytes) accepted.
    pub max_media_item: u64,
    /// Total bytes of media the DS stores (complete and in progress).
    pub media_quota: u64,
    /// Media items are deleted this long after their upload began.
    pub media_retention: Duration,
    /// A transfer stream (upload or download) that moves no byte for this
    /// long is ended; an upload keeps its durable progress.
    pub transfer_stall_timeout: Duration,
    /// Most transfers (uploads and downloads) one user may run at once.
    pub max_transfers_per_user: usize,
    /// Most transfers the DS runs at once.
    pub max_transfers_total: usize,
    /// Bytes of memory one user's transfers may hold at once: each
    /// reserves the most it can hold before it starts (an upload of a
    /// large item about 17 MiB, a download about 7 MiB, a small item less);
    /// one that would go beyond waits, then is refused with
    /// `QuotaExceeded`.
    pub transfer_memory_per_user: usize,
    /// The same over the whole DS.
    pub transfer_memory_total: usize,
    /// How long a transfer waits for room in those budgets.
    pub transfer_memory_wait: Duration,
    /// Bytes of blob spans the DS keeps for downloads of the same item
    /// running at once, so that the disk serves each span once; 0 keeps
    /// none (reads in flight are still shared).
    pub shared_read_bytes: usize,
    /// Unfinished uploads with no progress for this long are deleted.
    pub stale_upload: Duration,
    /// How often the retention sweeps run (expired Welcomes; expired,
    /// abandoned and unreachable media). Of the nodes of a cluster, the one
    /// holding the `sweep` lease runs them.
    pub media_sweep_interval: Duration,
    /// The wall clock every timestamp and every time-based rule of the DS
    /// reads: [`clock::system`] except in tests.
    pub clock: Clock,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            data_dir: PathBuf::from("huddle-data"),
            cert: None,
            idle_timeout: Duration::from_secs(60),
            max_connections: 20_000,
            max_unauthenticated: 1_000,
            auth_timeout: Duration::from_secs(10),
            max_connections_per_user: 32,
            max_devices_per_user: 8,
            max_pending_links_per_user: 4,
            link_ttl: Duration::from_secs(600),
            max_join_requests_per_group: 64,
            max_streams_per_connection: 128,
            max_frame: huddle_core::frame::DEFAULT_MAX_FRAME,
            max_application_message: 256 << 10,
            max_leaf_node: 4 << 10,
            max_pending_proposals: 100,
            max_subscribe_groups: 10_000,
            max_key_packages_per_user: 1000,
            max_key_package_bytes: 4 << 10,
            key_package_min_validity: Duration::from_secs(7 * 24 * 3600),
            max_inbox_items: 10_000,
            inbox_retention: Duration::from_secs(30 * 24 * 3600),
            claims_per_minute: 3000,
            push_queue: 4096,
            push_stall_timeout: Duration::from_secs(30),
            push_interval: Duration::from_millis(25),
            writer_linger: crate::writer::LINGER,
            group_idle: Duration::from_secs(600),
            tail_entries: 1024,
            tail_bytes: 4 << 20,
            tail_bytes_total: 512 << 20,
            answer_budget_per_connection: 16 << 20,
            answer_budget_per_user: 32 << 20,
            answer_budget_total: 256 << 20,
            answer_budget_wait: Duration::from_secs(10),
            answer_write_timeout: Duration::from_secs(30),
            store_cache: crate::store::redb::DEFAULT_CACHE,
            store_url: None,
            store_connections: crate::store::postgres::DEFAULT_POOL as usize,
            bus_url: None,
            bus_prefix: "huddle".into(),
            bus_ca: None,
            blobs_url: None,
            blob_keys: None,
            object_part_buffers: 64,
            object_part_buffers_per_user: 8,
            bus_queue: 4096,
            cluster_poll: Duration::from_secs(1),
            cluster_poll_connected: Duration::from_secs(10),
            blocking_threads: 64,
            shutdown_grace: Duration::from_secs(10),
            maintenance_interval: Duration::from_secs(10),
            departed_retention: Duration::from_secs(30 * 24 * 3600),
            max_media_item: 16 << 30,
            media_quota: 256 << 30,
            media_retention: Duration::from_secs(30 * 24 * 3600),
            stale_upload: Duration::from_secs(24 * 3600),
            transfer_stall_timeout: Duration::from_secs(30),
            max_transfers_per_user: 16,
            max_transfers_total: 1024,
            transfer_memory_per_user: 128 << 20,
            transfer_memory_total: 2 << 30,
            transfer_memory_wait: Duration::from_secs(10),
            shared_read_bytes: 4 << 20,
            media_sweep_interval: Duration::from_secs(60),
            clock: clock::system,
        }
    }
}

impl ServerConfig {
    /// Refuses settings the DS cannot work with: zero where something must
    /// happen, or limits that contradict each other.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.store_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(format!(
                    "--store {url:?}: expected a PostgreSQL address, postgres://USER@HOST:PORT/DB"
                ));
            }
        }
        if let Some(url) = &self.blobs_url {
            crate::media::objects::ObjectsUrl::parse(url)?;
        }
        if let Some(url) = &self.bus_url {
            if !(url.starts_with("nats://") || url.starts_with("tls://")) {
                return Err(
                    "--bus: expected a NATS address, nats://HOST:PORT (or tls://HOST:PORT)".into(),
                );
            }
            if !crate::bus::valid_prefix(&self.bus_prefix) {
                return Err(format!(
                    "bus_prefix {:?}: expected tokens of letters, digits, _ and - separated by dots",
                    self.bus_prefix
                ));
            }
            if self.store_url.is_none() {
                return Err(
                    "--bus needs --store postgres://…: the nodes of a cluster share one database"
                        .into(),
                );
            }
        }
        let positive = [
            ("bus_queue", self.bus_queue == 0),
            ("cluster_poll", self.cluster_poll.is_zero()),
            (
                "cluster_poll_connected",
                self.cluster_poll_connected.is_zero(),
            ),
            ("idle_timeout", self.idle_timeout.is_zero()),
            ("auth_timeout", self.auth_timeout.is_zero()),
            ("maintenance_interval", self.maintenance_interval.is_zero()),
            ("media_sweep_interval", self.media_sweep_interval.is_zero()),
            ("push_stall_timeout", self.push_stall_timeout.is_zero()),
            (
                "transfer_stall_timeout",
                self.transfer_stall_timeout.is_zero(),
            ),
            ("answer_write_timeout", self.answer_write_timeout.is_zero()),
            ("max_connections", self.max_connections == 0),
            ("max_devices_per_user", self.max_devices_per_user == 0),
            (
                "max_pending_links_per_user",
                self.max_pending_links_per_user == 0,
            ),
            ("link_ttl", self.link_ttl.is_zero()),
            (
                "max_join_requests_per_group",
                self.max_join_requests_per_group == 0,
            ),
            ("max_unauthenticated", self.max_unauthenticated == 0),
            (
                "max_connections_per_user",
                self.max_connections_per_user == 0,
            ),
            (
                "max_streams_per_connection",
                self.max_streams_per_connection == 0,
            ),
            ("push_queue", self.push_queue == 0),
            ("blocking_threads", self.blocking_threads == 0),
            ("max_transfers_per_user", self.max_transfers_per_user == 0),
            ("max_transfers_total", self.max_transfers_total == 0),
            (
                "transfer_memory_per_user",
                self.transfer_memory_per_user == 0,
            ),
            ("object_part_buffers", self.object_part_buffers == 0),
            (
                "object_part_buffers_per_user",
                self.object_part_buffers_per_user == 0,
            ),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, zero)| *zero) {
            return Err(format!("{name} must be more than zero"));
        }
        const MIN_FRAME: usize = 64 << 10;
        if self.max_frame < MIN_FRAME {
            return Err(format!(
                "max_frame must be at least {MIN_FRAME} bytes (a commit, a key package upload)"
            ));
        }
        for (name, v) in [
            ("max_application_message", self.max_application_message),
            ("max_key_package_bytes", self.max_key_package_bytes),
            ("max_leaf_node", self.max_leaf_node),
        ] {
            if v > self.max_frame {
                return Err(format!(
                    "{name} ({v} bytes) cannot exceed max_frame ({} bytes)",
                    self.max_frame
                ));
            }
        }
        if self.answer_budget_per_connection > self.answer_budget_per_user
            || self.answer_budget_per_user > self.answer_budget_total
        {
            return Err("answer budgets must grow from connection to user to the whole DS".into());
        }
        if self.transfer_memory_per_user > self.transfer_memory_total {
            return Err("transfer_memory_per_user cannot exceed transfer_memory_total".into());
        }
        Ok(())
    }
}

/// The limits an operator can set by name (`huddle-server --limit
/// NAME=VALUE`): every size, time and count bound of the DS. Sizes take
/// `KiB`, `MiB`, `GiB` suffixes, times `ms`, `s`, `min`, `h`, `d`.
macro_rules! limits {
    ($($name:ident: $kind:ident),* $(,)?) => {
        impl ServerConfig {
            /// Sets the limit `name` from its text form.
            pub fn set_limit(&mut self, name: &str, value: &str) -> Result<(), String> {
                match name {
                    $(stringify!($name) => {
                        self.$name = parse::$kind(value)
                            .map_err(|e| format!("{name}={value}: {e}"))?
                    })*
                    other => return Err(format!(
                        "no limit named {other:?} (`huddle-server --list-limits` lists them)"
                    )),
                }
                Ok(())
            }

            /// Every limit with its value, in text form.
            pub fn limits(&self) -> Vec<(&'static str, String)> {
                vec![$((stringify!($name), show::$kind(&self.$name))),*]
            }
        }
    };
}

limits! {
    idle_timeout: time,
    max_connections: count,
    max_unauthenticated: count,
    auth_timeout: time,
    max_connections_per_user: count,
    max_devices_per_user: count,
    max_pending_links_per_user: count,
    link_ttl: time,
    max_join_requests_per_group: count,
    max_streams_per_connection: count,
    max_frame: size,
    max_application_message: size,
    max_leaf_node: size,
    max_pending_proposals: count,
    max_subscribe_groups: count,
    max_key_packages_per_user: count,
    max_key_package_bytes: size,
    key_package_min_validity: time,
    claims_per_minute: count,
    max_inbox_items: count,
    inbox_retention: time,
    push_queue: count,
    push_stall_timeout: time,
    push_interval: time,
    writer_linger: time,
    group_idle: time,
    tail_entries: count,
    tail_bytes: size,
    tail_bytes_total: size,
    answer_budget_per_connection: size,
    answer_budget_per_user: size,
    answer_budget_total: size,
    answer_budget_wait: time,
    answer_write_timeout: time,
    store_cache: size,
    store_connections: count,
    bus_queue: count,
    cluster_poll: time,
    cluster_poll_connected: time,
    blocking_threads: count,
    shutdown_grace: time,
    maintenance_interval: time,
    departed_retention: time,
    max_media_item: size,
    media_quota: size,
    media_retention: time,
    transfer_stall_timeout: time,
    max_transfers_per_user: count,
    max_transfers_total: count,
    transfer_memory_per_user: size,
    transfer_memory_total: size,
    transfer_memory_wait: time,
    shared_read_bytes: size,
    object_part_buffers: count,
    object_part_buffers_per_user: count,
    stale_upload: time,
    media_sweep_interval: time,
}

mod parse {
    use std::time::Duration;

    pub fn count<T: TryFrom<u64>>(s: &str) -> Result<T, String> {
        let n: u64 = s
            .replace('_', "")
            .parse()
            .map_err(|_| "expected a whole number".to_owned())?;
        T::try_from(n).map_err(|_| "too large".to_owned())
    }

    /// A number and the unit after it.
    fn number_and_unit(s: &str) -> Result<(u64, &str), String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '_')
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        Ok((count(num)?, unit.trim()))
    }

    pub fn size<T: TryFrom<u64>>(s: &str) -> Result<T, String> {
        let (n, unit) = number_and_unit(s)?;
        let mul: u64 = match unit {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            other => return Err(format!("unknown unit {other:?} (B, KiB, MiB, GiB, TiB)")),
        };
        let bytes = n.checked_mul(mul).ok_or_else(|| "too large".to_owned())?;
        T::try_from(bytes).map_err(|_| "too large".to_owned())
    }

    pub fn time(s: &str) -> Result<Duration, String> {
        let (n, unit) = number_and_unit(s)?;
        let us: u64 = match unit {
            "us" => 1,
            "ms" => 1_000,
            "s" => 1_000_000,
            "min" => 60_000_000,
            "h" => 3_600_000_000,
            "d" => 86_400_000_000,
            other => return Err(format!("unknown unit {other:?} (us, ms, s, min, h, d)")),
        };
        Ok(Duration::from_micros(
            n.checked_mul(us).ok_or_else(|| "too large".to_owned())?,
        ))
    }
}

mod show {
    use std::time::Duration;

    pub fn count<T: std::fmt::Display>(v: &T) -> String {
        v.to_string()
    }

    pub fn size<T: Copy + TryInto<u64>>(v: &T) -> String {
        let n: u64 = (*v).try_into().unwrap_or(u64::MAX);
        for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if n >= 1 << shift && n.is_multiple_of(1 << shift) {
                return format!("{}{unit}", n >> shift);
            }
        }
        n.to_string()
    }

    pub fn time(v: &Duration) -> String {
        let us = v.as_micros() as u64;
        for (unit, per) in [
            ("d", 86_400_000_000),
            ("h", 3_600_000_000),
            ("min", 60_000_000),
            ("s", 1_000_000),
            ("ms", 1_000),
        ] {
            if us >= per && us.is_multiple_of(per) {
                return format!("{}{unit}", us / per);
            }
        }
        if us == 0 {
            return "0ms".into();
        }
        format!("{us}us")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_limit_is_set_by_name_and_shown_as_it_is_read() {
        let mut c = ServerConfig::default();
        for (name, value) in c.clone().limits() {
            c.set_limit(name, &value).unwrap();
        }
        assert_eq!(format!("{:?}", c), format!("{:?}", ServerConfig::default()));
        c.set_limit("answer_budget_total", "64MiB").unwrap();
        assert_eq!(c.answer_budget_total, 64 << 20);
        c.set_limit("auth_timeout", "1500ms").unwrap();
        assert_eq!(c.auth_timeout, Duration::from_millis(1500));
        c.set_limit("writer_linger", "250us").unwrap();
        assert_eq!(c.writer_linger, Duration::from_micros(250));
        assert_eq!(show::time(&c.writer_linger), "250us");
        assert_eq!(show::time(&Duration::from_micros(1500)), "1500us");
        assert_eq!(show::time(&Duration::ZERO), "0ms");
        c.set_limit("max_connections_per_user", "3").unwrap();
        assert_eq!(c.max_connections_per_user, 3);
        assert!(c.set_limit("max_frame", "12 parsecs").is_err());
        assert!(c.set_limit("auth_timeout", "5").is_err());
        assert!(c.set_limit("no_such_limit", "5").is_err());
        assert!(c
            .set_limit("max_streams_per_connection", "99999999999")
            .is_err());
    }
}
