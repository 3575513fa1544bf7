//! Server configuration.

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
    /// Most concurrent bidirectional streams a client may open on one
    /// connection (QUIC flow control holds the rest back).
    pub max_streams_per_connection: u32,
    /// Largest control frame body accepted, in bytes.
    pub max_frame: usize,
    /// Most one-time key packages stored per user.
    pub max_key_packages_per_user: u32,
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
    /// writes each round as soon as it is durable. With 25 ms, a
    /// 200-member group at 760 messages a second cost the members about
    /// 14,400 datagrams a second instead of 21,300-22,300, and latency p99
    /// fell from 92-109 ms to 33-46 ms (docs/BENCHMARKS.md).
    pub push_interval: Duration,
    /// Newest entries per group kept in memory for pushing.
    pub tail_entries: usize,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// How often acknowledged cursors are written and logs compacted.
    /// Cursors only decide when a log may be compacted, so writing them
    /// rarely loses nothing: after a crash, compaction just waits for the
    /// next acknowledgements. Writing them every second cost a 1,000-member
    /// group about 6 KB of disk writes per message at 10 messages a second.
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
    /// Unfinished uploads with no progress for this long are deleted.
    pub stale_upload: Duration,
    /// How often expired and unreachable media are looked for.
    pub media_sweep_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            data_dir: PathBuf::from("huddle-data"),
            cert: None,
            idle_timeout: Duration::from_secs(60),
            max_connections: 20_000,
            max_streams_per_connection: 128,
            max_frame: huddle_core::frame::DEFAULT_MAX_FRAME,
            max_key_packages_per_user: 1000,
            claims_per_minute: 3000,
            push_queue: 4096,
            push_stall_timeout: Duration::from_secs(30),
            push_interval: Duration::from_millis(25),
            tail_entries: 1024,
            shutdown_grace: Duration::from_secs(10),
            maintenance_interval: Duration::from_secs(10),
            departed_retention: Duration::from_secs(30 * 24 * 3600),
            max_media_item: 16 << 30,
            media_quota: 256 << 30,
            media_retention: Duration::from_secs(30 * 24 * 3600),
            stale_upload: Duration::from_secs(24 * 3600),
            transfer_stall_timeout: Duration::from_secs(30),
            media_sweep_interval: Duration::from_secs(60),
        }
    }
}
