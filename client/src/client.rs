//! The Huddle client: one device of one user.
//!
//! [`Client`] ties together the home directory (identity, pinned
//! certificate), the local database (MLS state, groups, cursors, history)
//! and a connection to the delivery service, and offers the operations of
//! the `huddle` command line.
//!
//! Processing rules that keep every member consistent:
//! - a group's log is processed strictly in sequence order; each batch of
//!   entries is processed and the cursor advanced in one SQLite
//!   transaction, so a crash never processes an entry twice or skips one;
//! - an own commit is merged only after the DS accepted it; a rejected one
//!   (stale epoch) is discarded, the log is synced and the change retried;
//! - pending proposals (a member leaving) are committed by the remaining
//!   member with the lowest leaf index at once, by anyone after a grace
//!   period.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use huddle_core::mls::{self, user_of};
use huddle_core::proto::{
    ClaimedKeyPackage, Control, EntryKind, ErrorCode, Event as Pushed, InboxItem, LogEntry,
    Request, Response, UserInfo, MAX_PAGE,
};
use huddle_core::GroupId;
use openmls::prelude::{tls_codec::Deserialize as _, tls_codec::Serialize as _, *};
use openmls_rust_crypto::RustCrypto;
use rusqlite::{params, Connection, OptionalExtension as _};
use tracing::{debug, warn};

use crate::app::AppMessage;
use crate::db::{self, Provider};
use crate::error::{ClientError, Result};
use crate::event::Event;
use crate::home::{Home, Settings};
use crate::identity::Identity;
use crate::lock::Locks;
use crate::net::{self, Connection as Net, Trust};

pub mod media;
pub mod trust;

/// One-time key packages published at registration and kept topped up.
pub const KEY_PACKAGE_BATCH: usize = 50;
/// Top up when fewer than this many are left on the server.
pub const KEY_PACKAGE_LOW: u32 = 20;
/// After this long, any member commits a pending proposal, not only the
/// designated one.
pub const PROPOSAL_GRACE: Duration = Duration::from_secs(3);
/// Least time between two rejoins of one group on this device: a member
/// whose rejoins keep failing to stick does not move the whole group to a
/// new epoch over and over.
pub const REJOIN_PAUSE: Duration = Duration::from_secs(600);

/// Longest text message, in bytes.
pub const MAX_TEXT: usize = 64 * 1024;
/// Attempts of a commit that keeps losing races to other commits.
const COMMIT_ATTEMPTS: usize = 20;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The short form of a group id shown to people: its first 8 hex digits,
/// which `resolve_group` accepts back as a prefix.
pub fn short_id(id: &GroupId) -> String {
    id.to_string()[..8].to_owned()
}

/// Longest group name, in bytes.
pub const MAX_GROUP_NAME: usize = 100;

/// A group name must say something, fit on a line and stay short.
fn check_group_name(name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(ClientError::Usage("a group needs a name".into()));
    }
    if name.len() > MAX_GROUP_NAME {
        return Err(ClientError::Usage(format!(
            "a group name is at most {MAX_GROUP_NAME} bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(ClientError::Usage(
            "a group name cannot hold control characters or line breaks".into(),
        ));
    }
    Ok(())
}

fn mls_gid(id: &GroupId) -> openmls::group::GroupId {
    openmls::group::GroupId::from_slice(id.as_bytes())
}

/// What `whoami` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WhoAmI {
    /// User name.
    pub name: String,
    /// Device id: the first 16 hex digits of the identity key's fingerprint.
    pub device: String,
    /// Identity key fingerprint (safety number).
    pub fingerprint: String,
    /// Server address.
    pub server: String,
}

/// What `status` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// Server address.
    pub server: String,
    /// SHA-256 fingerprint of the server certificate.
    pub server_fingerprint: String,
    /// User name.
    pub name: String,
    /// One-time key packages the server still holds for this device.
    pub key_packages: u32,
    /// Whether a last-resort key package is stored.
    pub last_resort: bool,
}

/// A group as listed by `group list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupListing {
    /// Id (hex).
    pub group: String,
    /// Display name.
    pub name: String,
    /// creating, active, leaving, removed or left.
    pub state: String,
    /// Current epoch.
    pub epoch: u64,
    /// Number of members.
    pub members: usize,
}

struct GroupRow {
    name: String,
    state: String,
    cursor: u64,
    pending_commit: Option<Vec<u8>>,
    proposals_since_ms: Option<u64>,
    /// Set when a commit voided our leave proposal (not persisted in the
    /// row; recorded in the key-value table).
    releave: bool,
}

fn load_row(conn: &Connection, id: &GroupId) -> Result<Option<GroupRow>> {
    // Statements run for every batch of messages come from the connection's
    // statement cache: parsing the SQL each time was about a third of the
    // SQLite time of a member receiving 760 messages a second (perf).
    Ok(conn
        .prepare_cached(
            "SELECT name, state, cursor, pending_commit, proposals_since_ms FROM huddle_groups WHERE id = ?1",
        )?
        .query_row(
            params![id.as_bytes().as_slice()],
            |r| {
                Ok(GroupRow {
                    name: r.get(0)?,
                    state: r.get(1)?,
                    cursor: r.get::<_, i64>(2)? as u64,
                    pending_commit: r.get(3)?,
                    proposals_since_ms: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                    releave: false,
                })
            },
        )
        .optional()?)
}

fn kv_get(conn: &Connection, key: &str) -> Result<u64> {
    Ok(conn
        .prepare_cached("SELECT value FROM huddle_kv WHERE key = ?1")?
        .query_row([key], |r| r.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0) as u64)
}

fn kv_set(conn: &Connection, key: &str, value: u64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO huddle_kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value as i64])?;
    Ok(())
}

/// Whether an event in the history is of something this device did itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// What others did, or what this device noticed: reported by `sync`.
    Others,
    /// A message or change this user made, reported by the command that
    /// made it (and by `listen`), not again by `sync`.
    Own,
}

fn record_events(conn: &Connection, id: &GroupId, events: &[Event]) -> Result<()> {
    record(conn, id, events, Origin::Others)
}

fn record(conn: &Connection, id: &GroupId, events: &[Event], origin: Origin) -> Result<()> {
    let mut idx: HashMap<u64, i64> = HashMap::new();
    for e in events {
        let i = idx.entry(e.seq).or_insert(0);
        conn.prepare_cached(
            "INSERT OR REPLACE INTO huddle_events (group_id, seq, idx, event, own) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
                id.as_bytes().as_slice(),
                e.seq as i64,
                *i,
                serde_json::to_string(e).expect("events serialise"),
                origin == Origin::Own
            ],
        )?;
        *i += 1;
    }
    Ok(())
}

fn is_own(conn: &Connection, id: &GroupId, seq: u64) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM huddle_own WHERE group_id = ?1 AND seq = ?2")?
        .query_row(params![id.as_bytes().as_slice(), seq as i64], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Records an event that is not one of a log entry's (a warning, a note)
/// after those of its position, without replacing any.
fn record_note(conn: &Connection, id: &GroupId, e: &Event) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO huddle_events (group_id, seq, idx, event) VALUES (?1, ?2, \
         (SELECT COALESCE(MAX(idx) + 1, 0) FROM huddle_events WHERE group_id = ?1 AND seq = ?2), ?3)",
    )?
    .execute(params![
        id.as_bytes().as_slice(),
        e.seq as i64,
        serde_json::to_string(e).expect("events serialise")
    ])?;
    Ok(())
}

/// Records that the entry at `seq` is this device's own (it cannot decrypt
/// its own messages).
fn mark_own(conn: &Connection, id: &GroupId, seq: u64) -> Result<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO huddle_own (group_id, seq) VALUES (?1, ?2)")?
        .execute(params![id.as_bytes().as_slice(), seq as i64])?;
    Ok(())
}

/// Takes a posted message out of the outbox: `Some(event)` (itself optional)
/// if it was there.
fn take_outbox(
    conn: &Connection,
    id: &GroupId,
    digest: &[u8; 32],
) -> Result<Option<Option<Event>>> {
    let row: Option<Option<String>> = conn
        .prepare_cached(
            "DELETE FROM huddle_outbox WHERE group_id = ?1 AND digest = ?2 RETURNING event",
        )?
        .query_row(params![id.as_bytes().as_slice(), digest.as_slice()], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(row.map(|e| e.and_then(|e| serde_json::from_str(&e).ok())))
}

/// Whether the outbox holds anything for the group.
fn outbox_pending(conn: &Connection, id: &GroupId) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM huddle_outbox WHERE group_id = ?1 LIMIT 1")?
        .query_row(params![id.as_bytes().as_slice()], |_| Ok(()))
        .optional()?
        .is_some())
}

/// What an application message shows as: `text` and `media` events; a
/// group's name shows as nothing.
fn app_event(msg: &AppMessage, id: &GroupId, from: &str, seq: u64, ts: u64) -> Option<Event> {
    let mut e = Event::new("", &id.to_string(), from, seq, ts);
    match msg {
        AppMessage::Text { text } => {
            e.kind = "text".into();
            e.text = Some(text.clone());
        }
        AppMessage::Media(info) => {
            e.kind = "media".into();
            e.media_id = Some(hex::encode(info.media_id));
            e.name = Some(info.name.clone());
            e.size = Some(info.size);
            e.mime = Some(info.mime.clone());
            e.text = Some(info.caption.clone());
        }
        AppMessage::GroupName { .. } => return None,
    }
    Some(e)
}

/// Remembers identity keys first seen (trust on first use) and returns the
/// users whose key differs from the one remembered.
fn remember_keys(conn: &Connection, keys: &[(String, Vec<u8>)]) -> Result<Vec<String>> {
    let mut changed = Vec::new();
    for (name, key) in keys {
        let known: Option<Vec<u8>> = conn
            .query_row(
                "SELECT identity_key FROM huddle_users WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        match known {
            Some(k) if &k != key => changed.push(name.clone()),
            Some(_) => {}
            None => {
                conn.execute(
                    "INSERT INTO huddle_users (name, identity_key, first_seen_ms) VALUES (?1, ?2, ?3)",
                    params![name, key, now_ms() as i64],
                )?;
            }
        }
    }
    Ok(changed)
}

fn member_keys(group: &MlsGroup) -> Vec<(String, Vec<u8>)> {
    group
        .members()
        .filter_map(|m| user_of(&m.credential).map(|u| (u, m.signature_key.clone())))
        .collect()
}

fn member_names(group: &MlsGroup) -> Vec<String> {
    let mut v: Vec<String> = group
        .members()
        .filter_map(|m| user_of(&m.credential))
        .collect();
    v.sort();
    v
}

fn serialize(m: &MlsMessageOut) -> Result<Bytes> {
    m.tls_serialize_detached()
        .map(Bytes::from)
        .map_err(ClientError::mls)
}

/// Whether sending `req` twice has the same effect as sending it once.
fn idempotent(req: &Request) -> bool {
    matches!(
        req,
        Request::KeyPackageCount
            | Request::PublishKeyPackages { .. }
            | Request::LookupUsers { .. }
            | Request::FetchLog { .. }
            | Request::FetchInbox { .. }
            | Request::RatchetTree { .. }
            | Request::GroupState { .. }
            | Request::ListGroups
            | Request::EpochAuthenticator { .. }
    )
}

/// What a commit closure produces: the commit and, for adds, the Welcome.
type CommitOut = (MlsMessageOut, Option<MlsMessageOut>);

/// One device of one user.
pub struct Client {
    home: Home,
    settings: Settings,
    identity: Identity,
    db: Connection,
    crypto: RustCrypto,
    net: Option<Net>,
    /// The QUIC endpoint of the first connection, reused by later ones.
    endpoint: Option<quinn::Endpoint>,
    /// Group locks shared with the home's other processes.
    locks: std::sync::Arc<Locks>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.settings.name)
            .field("home", &self.home.dir())
            .finish()
    }
}

impl Client {
    /// Creates an identity in `home`, registers `name` with the server at
    /// `server`, and publishes key packages. Without `server_cert`, the
    /// certificate the server presents now is pinned (trust on first use).
    pub async fn register(
        home: Home,
        name: &str,
        server: &str,
        server_cert: Option<&std::path::Path>,
    ) -> Result<Client> {
        huddle_core::ids::check_user_name(name).map_err(|e| ClientError::Usage(e.to_string()))?;
        if home.is_registered() {
            let (s, _) = home.load()?;
            return Err(ClientError::AlreadyRegistered(s.name));
        }
        let trust = match server_cert {
            Some(p) => Trust::Pinned(crate::home::read_pem_certs(p)?),
            None => Trust::FirstUse,
        };
        // Everything local first: a home that cannot be written fails here,
        // before the name is claimed on the DS. The key is kept from then
        // on, so a registration interrupted after the DS bound the name is
        // finished by running it again.
        let identity = match home.unfinished_identity(name)? {
            Some(id) => id,
            None => {
                let id = Identity::generate(name);
                home.save_identity(&id)?;
                id
            }
        };
        let db = db::open(&home.db_path())?;
        let home_locks = home.locks_dir();
        let net = Net::connect(server, trust).await?;
        net.authenticate(&identity, true).await?;
        home.pin_cert(&net.server_cert)?;
        let settings = Settings {
            name: name.to_owned(),
            server: server.to_owned(),
        };
        home.save_settings(&settings)?;
        let mut client = Client {
            home,
            settings,
            identity,
            db,
            crypto: RustCrypto::default(),
            endpoint: Some(net.endpoint().clone()),
            net: Some(net),
            locks: Locks::new(home_locks),
        };
        client.publish_key_packages(KEY_PACKAGE_BATCH, true).await?;
        Ok(client)
    }

    /// Opens a registered home.
    pub fn open(home: Home) -> Result<Client> {
        let (settings, identity) = home.load()?;
        let db = db::open(&home.db_path())?;
        Ok(Client {
            locks: Locks::new(home.locks_dir()),
            home,
            settings,
            identity,
            db,
            crypto: RustCrypto::default(),
            net: None,
            endpoint: None,
        })
    }

    /// The user name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The home.
    pub fn home(&self) -> &Home {
        &self.home
    }

    /// Local facts about this device.
    pub fn whoami(&self) -> WhoAmI {
        let fingerprint = huddle_core::auth::key_fingerprint(&self.identity.public());
        WhoAmI {
            name: self.settings.name.clone(),
            device: fingerprint.replace(' ', "")[..16].to_owned(),
            fingerprint,
            server: self.settings.server.clone(),
        }
    }

    /// The authenticated connection, opened on first use.
    pub async fn net(&mut self) -> Result<&Net> {
        if self
            .net
            .as_ref()
            .is_some_and(|n| n.quic().close_reason().is_some())
        {
            self.net = None;
        }
        if self.net.is_none() {
            let pins = self.home.pinned_certs()?.ok_or_else(|| {
                ClientError::Usage("no pinned server certificate in this home".into())
            })?;
            let net = Net::connect_on(
                self.endpoint.as_ref(),
                &self.settings.server,
                Trust::Pinned(pins),
            )
            .await?;
            self.endpoint = Some(net.endpoint().clone());
            net.authenticate(&self.identity, false).await?;
            self.net = Some(net);
        }
        Ok(self.net.as_ref().expect("connected above"))
    }

    /// Closes the connection, if any.
    pub async fn close(mut self) {
        if let Some(n) = self.net.take() {
            n.close().await;
        }
    }

    async fn request(&mut self, req: &Request) -> Result<Response> {
        let net = self.net().await?;
        match net.request(req).await {
            Err(e @ ClientError::Connect { .. }) => {
                // The server may have restarted: reconnect next time. Only
                // requests that are safe to repeat are sent again; a post
                // whose answer was lost may have been appended, and the log
                // (not a second copy) settles it.
                self.net = None;
                if idempotent(req) {
                    self.net().await?.request(req).await
                } else {
                    Err(e)
                }
            }
            other => other,
        }
    }

    // ---- key packages -------------------------------------------------

    async fn publish_key_packages(&mut self, n: usize, with_last_resort: bool) -> Result<u32> {
        let credential = self.identity.credential();
        let (kps, last) = {
            let provider = Provider::new(&self.crypto, &self.db);
            let build = |last_resort: bool| -> Result<Bytes> {
                let mut b = KeyPackage::builder()
                    .key_package_lifetime(Lifetime::new(mls::KEY_PACKAGE_LIFETIME_SECS))
                    .leaf_node_capabilities(mls::capabilities());
                if last_resort {
                    b = b.mark_as_last_resort();
                }
                let bundle = b
                    .build(
                        mls::CIPHERSUITE,
                        &provider,
                        &self.identity,
                        credential.clone(),
                    )
                    .map_err(ClientError::mls)?;
                bundle
                    .key_package()
                    .tls_serialize_detached()
                    .map(Bytes::from)
                    .map_err(ClientError::mls)
            };
            let mut kps = Vec::with_capacity(n);
            for _ in 0..n {
                kps.push(build(false)?);
            }
            let last = if with_last_resort {
                Some(build(true)?)
            } else {
                None
            };
            (kps, last)
        };
        match self
            .request(&Request::PublishKeyPackages {
                key_packages: kps,
                last_resort: last,
            })
            .await?
        {
            Response::KeyPackageCount { available, .. } => Ok(available),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Connects, authenticates, and reports the server and key-package
    /// state; tops key packages up when they run low.
    pub async fn status(&mut self) -> Result<Status> {
        let (mut available, mut last_resort) = self.key_package_count().await?;
        if available < KEY_PACKAGE_LOW || !last_resort {
            available = self
                .publish_key_packages(KEY_PACKAGE_BATCH, !last_resort)
                .await?;
            last_resort = true;
        }
        let fp = huddle_core::auth::cert_fingerprint(&self.net().await?.server_cert);
        Ok(Status {
            server: self.settings.server.clone(),
            server_fingerprint: fp,
            name: self.settings.name.clone(),
            key_packages: available,
            last_resort,
        })
    }

    /// Key packages left on the server, without topping up.
    pub async fn key_package_count(&mut self) -> Result<(u32, bool)> {
        match self.request(&Request::KeyPackageCount).await? {
            Response::KeyPackageCount {
                available,
                last_resort,
            } => Ok((available, last_resort)),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    // ---- groups -------------------------------------------------------

    /// Finds a group on this device by id, by name, or by a unique prefix
    /// of its id (as the 8-digit short ids in the output), in any state
    /// (a group one was removed from keeps its history). A name that
    /// several groups share resolves to the one this device is still in,
    /// if only one is.
    pub fn resolve_group(&self, s: &str) -> Result<GroupId> {
        if s.is_empty() {
            return Err(ClientError::Usage("name a group (its name or id)".into()));
        }
        if let Ok(id) = s.parse::<GroupId>() {
            if load_row(&self.db, &id)?.is_some() {
                return Ok(id);
            }
        }
        let rows: Vec<(Vec<u8>, String, String)> = self
            .db
            .prepare("SELECT id, name, state FROM huddle_groups ORDER BY joined_ms")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let rows: Vec<(GroupId, String, String)> = rows
            .into_iter()
            .filter_map(|(id, n, st)| GroupId::from_slice(&id).map(|g| (g, n, st)))
            .collect();
        let named: Vec<&(GroupId, String, String)> = rows.iter().filter(|r| r.1 == s).collect();
        let current = |r: &&&(GroupId, String, String)| {
            matches!(r.2.as_str(), "active" | "leaving" | "creating")
        };
        let by_name: Vec<&(GroupId, String, String)> = match named.as_slice() {
            _ if named.iter().filter(current).count() == 1 => {
                named.into_iter().filter(|r| current(&r)).collect()
            }
            _ => named,
        };
        // An id prefix (the short ids output shows). A name that looks
        // like another group's id prefix matches both, and is refused as
        // ambiguous rather than silently picking one: a member could name
        // its group after the short id of another.
        let prefix = s.to_ascii_lowercase();
        let by_id: Vec<&(GroupId, String, String)> =
            if prefix.len() >= 4 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
                rows.iter()
                    .filter(|r| r.0.to_string().starts_with(&prefix))
                    .collect()
            } else {
                Vec::new()
            };
        let mut candidates = by_name;
        for r in by_id {
            if !candidates.iter().any(|c| c.0 == r.0) {
                candidates.push(r);
            }
        }
        match candidates.as_slice() {
            [one] => Ok(one.0),
            [] => Err(ClientError::Usage(format!(
                "no group {s:?} on this device (see `huddle group list`)"
            ))),
            many => Err(ClientError::Usage(format!(
                "{} groups match {s:?}; use more of the id: {}",
                many.len(),
                many.iter()
                    .map(|r| format!("{} ({}, {})", short_id(&r.0), r.1, r.2))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Ids of the groups on this device named `name` (to warn before
    /// creating another).
    pub fn groups_named(&self, name: &str) -> Result<Vec<GroupId>> {
        let ids: Vec<Vec<u8>> = self
            .db
            .prepare("SELECT id FROM huddle_groups WHERE name = ?1 AND state IN ('active', 'leaving', 'creating')")?
            .query_map([name], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(ids.iter().filter_map(|i| GroupId::from_slice(i)).collect())
    }

    fn load_group(&self, conn: &Connection, id: &GroupId) -> Result<MlsGroup> {
        let provider = Provider::new(&self.crypto, conn);
        MlsGroup::load(provider.storage(), &mls_gid(id))
            .map_err(ClientError::mls)?
            .ok_or_else(|| {
                ClientError::Usage(format!("group {id} has no MLS state on this device"))
            })
    }

    /// [`Client::active_group`], for sending: a member that asked to leave
    /// no longer sends (its own leave proposal is pending until a remaining
    /// member commits it).
    fn sending_group(&self, id: &GroupId) -> Result<GroupRow> {
        let row = self.active_group(id)?;
        if row.state == "leaving" {
            return Err(ClientError::Usage(format!(
                "you asked to leave group {id}; nothing more can be sent to it"
            )));
        }
        Ok(row)
    }

    fn active_group(&self, id: &GroupId) -> Result<GroupRow> {
        let row = load_row(&self.db, id)?
            .ok_or_else(|| ClientError::Usage(format!("unknown group {id}")))?;
        match row.state.as_str() {
            "active" | "leaving" => Ok(row),
            "creating" => Err(ClientError::Usage(format!(
                "group {id} is not confirmed by the server yet; run `huddle sync`"
            ))),
            other => Err(ClientError::Usage(format!(
                "you are no longer in group {id} ({other})"
            ))),
        }
    }

    /// Creates a group with this device as its only member.
    pub async fn create_group(&mut self, name: &str) -> Result<GroupId> {
        check_group_name(name)?;
        let mut raw = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
        let id = GroupId(raw);
        let (info, tree) = {
            let tx = self.db.unchecked_transaction()?;
            let provider = Provider::new(&self.crypto, &tx);
            let group = MlsGroup::new_with_group_id(
                &provider,
                &self.identity,
                &mls::create_config(),
                mls_gid(&id),
                self.identity.credential(),
            )
            .map_err(ClientError::mls)?;
            let info = group
                .export_group_info(provider.crypto(), &self.identity, false)
                .map_err(ClientError::mls)?;
            let tree = group
                .export_ratchet_tree()
                .tls_serialize_detached()
                .map_err(ClientError::mls)?;
            tx.execute(
                "INSERT INTO huddle_groups (id, name, state, cursor, joined_ms) VALUES (?1, ?2, 'creating', 0, ?3)",
                params![id.as_bytes().as_slice(), name, now_ms() as i64],
            )?;
            tx.commit()?;
            (serialize(&info)?, Bytes::from(tree))
        };
        self.confirm_creation(id, info, tree).await?;
        Ok(id)
    }

    async fn confirm_creation(&mut self, id: GroupId, info: Bytes, tree: Bytes) -> Result<()> {
        let r = self
            .request(&Request::CreateGroup {
                group: id,
                group_info: info,
                ratchet_tree: tree,
            })
            .await;
        match r {
            Ok(_) => {}
            Err(ClientError::Server(e)) if e.code == ErrorCode::GroupExists => {
                // A retry after a lost answer: the group is ours if we can
                // read its state.
                self.request(&Request::GroupState { group: id }).await?;
            }
            Err(e) => return Err(e),
        }
        self.db.execute(
            "UPDATE huddle_groups SET state = 'active' WHERE id = ?1 AND state = 'creating'",
            params![id.as_bytes().as_slice()],
        )?;
        Ok(())
    }

    /// Groups on this device.
    pub fn groups(&self) -> Result<Vec<GroupListing>> {
        let mut stmt = self
            .db
            .prepare("SELECT id, name, state FROM huddle_groups ORDER BY joined_ms")?;
        let rows: Vec<(Vec<u8>, String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::new();
        for (id, name, state) in rows {
            let Some(gid) = GroupId::from_slice(&id) else {
                continue;
            };
            let (epoch, members) = match self.load_group(&self.db, &gid) {
                Ok(g) if g.is_active() => (g.epoch().as_u64(), g.members().count()),
                Ok(g) => (g.epoch().as_u64(), 0),
                Err(_) => (0, 0),
            };
            out.push(GroupListing {
                group: gid.to_string(),
                name,
                state,
                epoch,
                members,
            });
        }
        Ok(out)
    }

    /// Current members of a group, by this device's MLS state.
    pub fn members(&self, group: &str) -> Result<Vec<String>> {
        let id = self.resolve_group(group)?;
        self.active_group(&id)?;
        Ok(member_names(&self.load_group(&self.db, &id)?))
    }

    /// The group's current epoch and epoch authenticator.
    pub fn epoch_authenticator(&self, group: &str) -> Result<(u64, Vec<u8>)> {
        let id = self.resolve_group(group)?;
        let g = self.load_group(&self.db, &id)?;
        Ok((
            g.epoch().as_u64(),
            g.epoch_authenticator().as_slice().to_vec(),
        ))
    }

    /// This device's view of a group's public ratchet tree (TLS-encoded).
    pub fn export_tree(&self, group: &str) -> Result<Bytes> {
        let id = self.resolve_group(group)?;
        let g = self.load_group(&self.db, &id)?;
        g.export_ratchet_tree()
            .tls_serialize_detached()
            .map(Bytes::from)
            .map_err(ClientError::mls)
    }

    /// The group's state as a row (name, state, cursor).
    pub fn group_state(&self, group: &str) -> Result<(String, String, u64)> {
        let id = self.resolve_group(group)?;
        let row =
            load_row(&self.db, &id)?.ok_or_else(|| ClientError::Usage("unknown group".into()))?;
        Ok((row.name, row.state, row.cursor))
    }

    /// Remembers users' identity keys on first sight and refuses a key that
    /// changed (the DS binds names to keys; a change means the DS lies or
    /// the user re-registered).
    fn check_known_keys(&self, users: &[UserInfo]) -> Result<()> {
        for u in users {
            let known: Option<Vec<u8>> = self
                .db
                .query_row(
                    "SELECT identity_key FROM huddle_users WHERE name = ?1",
                    [&u.name],
                    |r| r.get(0),
                )
                .optional()?;
            match known {
                Some(k) if k != u.identity_key => {
                    return Err(ClientError::Usage(format!(
                        "the identity key of {} changed (was {}, now {}): refusing to use it",
                        u.name,
                        huddle_core::auth::key_fingerprint(&k.try_into().unwrap_or([0; 32])),
                        huddle_core::auth::key_fingerprint(&u.identity_key)
                    )))
                }
                Some(_) => {}
                None => {
                    self.db.execute(
                        "INSERT INTO huddle_users (name, identity_key, first_seen_ms) VALUES (?1, ?2, ?3)",
                        params![u.name, u.identity_key.as_slice(), now_ms() as i64],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Adds users to a group in one commit.
    pub async fn add(&mut self, group: &str, users: &[String]) -> Result<Vec<Event>> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.active_group(&id)?;
        let current: HashSet<String> = self.members(group)?.into_iter().collect();
        let mut wanted: Vec<String> = Vec::new();
        for u in users {
            huddle_core::ids::check_user_name(u).map_err(|e| ClientError::Usage(e.to_string()))?;
            if current.contains(u) {
                return Err(ClientError::Usage(format!("{u} is already a member")));
            }
            if !wanted.contains(u) {
                wanted.push(u.clone());
            }
        }
        if wanted.is_empty() {
            return Err(ClientError::Usage("name at least one user to add".into()));
        }
        let Response::Users { users: infos } = self
            .request(&Request::LookupUsers {
                names: wanted.clone(),
            })
            .await?
        else {
            return Err(ClientError::Protocol("expected Users".into()));
        };
        for u in &wanted {
            if !infos.iter().any(|i| &i.name == u) {
                return Err(ClientError::Usage(format!(
                    "{u} is not registered on this server"
                )));
            }
        }
        self.check_known_keys(&infos)?;
        let Response::KeyPackages { packages } = self
            .request(&Request::ClaimKeyPackages {
                users: wanted.clone(),
            })
            .await?
        else {
            return Err(ClientError::Protocol("expected KeyPackages".into()));
        };
        let kps = self.check_claimed(&packages, &infos)?;
        let added = wanted.clone();
        let events = self
            .commit_with_retry(
                &id,
                "member_added",
                Some(added),
                Origin::Own,
                move |g, p, s| {
                    // No UpdatePath (RFC 9420 §12.4): an add-only commit still
                    // starts a new epoch the joiners cannot reach back from, and
                    // without a path it stays small in a large group (every
                    // member downloads it). See docs/SECURITY.md §6.6.
                    let (c, w, _) = g
                        .add_members_without_update(p, s, &kps)
                        .map_err(ClientError::mls)?;
                    Ok((c, Some(w)))
                },
            )
            .await?;
        // Tell everyone (joiners included) the group's name.
        let name = load_row(&self.db, &id)?.map(|r| r.name).unwrap_or_default();
        if !name.is_empty() {
            self.send_app(&id, &AppMessage::GroupName { name }).await?;
        }
        Ok(events)
    }

    fn check_claimed(
        &self,
        packages: &[ClaimedKeyPackage],
        infos: &[UserInfo],
    ) -> Result<Vec<KeyPackage>> {
        let mut out = Vec::new();
        for p in packages {
            let kp = KeyPackageIn::tls_deserialize_exact(p.key_package.as_ref())
                .map_err(|e| ClientError::Mls(format!("key package of {}: {e}", p.user)))?
                .validate(&self.crypto, ProtocolVersion::Mls10)
                .map_err(|e| ClientError::Mls(format!("key package of {}: {e}", p.user)))?;
            let key = infos
                .iter()
                .find(|i| i.name == p.user)
                .map(|i| i.identity_key)
                .ok_or_else(|| {
                    ClientError::Protocol(format!("unexpected key package for {}", p.user))
                })?;
            if user_of(kp.leaf_node().credential()).as_deref() != Some(p.user.as_str())
                || kp.leaf_node().signature_key().as_slice() != key.as_slice()
                || kp.ciphersuite() != mls::CIPHERSUITE
            {
                return Err(ClientError::Mls(format!(
                    "the key package handed out for {} is not theirs: refusing it",
                    p.user
                )));
            }
            out.push(kp);
        }
        Ok(out)
    }

    /// Removes users from a group in one commit.
    pub async fn remove(&mut self, group: &str, users: &[String]) -> Result<Vec<Event>> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.active_group(&id)?;
        if users.iter().any(|u| u == self.name()) {
            return Err(ClientError::Usage(
                "to remove yourself, use `huddle group leave`".into(),
            ));
        }
        let users = users.to_vec();
        let removed = users.clone();
        self.commit_with_retry(
            &id,
            "member_removed",
            Some(removed),
            Origin::Own,
            move |g, p, s| {
                let mut leaves = Vec::new();
                for u in &users {
                    let m = g
                        .members()
                        .find(|m| user_of(&m.credential).as_deref() == Some(u.as_str()))
                        .ok_or_else(|| ClientError::Usage(format!("{u} is not a member")))?;
                    leaves.push(m.index);
                }
                let (c, w, _) = g.remove_members(p, s, &leaves).map_err(ClientError::mls)?;
                Ok((c, w))
            },
        )
        .await
    }

    /// Rotates this device's keys in the group.
    pub async fn update(&mut self, group: &str) -> Result<Vec<Event>> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.active_group(&id)?;
        self.commit_with_retry(&id, "key_update", None, Origin::Own, |g, p, s| {
            let bundle = g
                .self_update(p, s, LeafNodeParameters::default())
                .map_err(ClientError::mls)?;
            let (c, w, _) = bundle.into_messages();
            Ok((c, w))
        })
        .await
    }

    /// Asks to leave the group: posts a proposal removing this device, which
    /// a remaining member commits. The group shows as `leaving` until then.
    /// Returns whether the group was left at once (this device was its only
    /// member: nobody is left to commit).
    pub async fn leave(&mut self, group: &str) -> Result<bool> {
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.active_group(&id)?;
        if self.load_group(&self.db, &id)?.members().count() == 1 {
            self.db.execute(
                "UPDATE huddle_groups SET state = 'left' WHERE id = ?1",
                params![id.as_bytes().as_slice()],
            )?;
            return Ok(true);
        }
        self.propose_leave(&id).await?;
        Ok(false)
    }

    async fn propose_leave(&mut self, id: &GroupId) -> Result<()> {
        let _lock = self.locks.lock(id).await?;
        for _ in 0..COMMIT_ATTEMPTS {
            let proposal = {
                let tx = self.db.unchecked_transaction()?;
                let provider = Provider::new(&self.crypto, &tx);
                let mut g = self.load_group(&tx, id)?;
                let msg = g
                    .leave_group(&provider, &self.identity)
                    .map_err(ClientError::mls)?;
                // The proposal is also kept in our own proposal store; the
                // transaction is not committed, the DS's copy is what counts.
                serialize(&msg)?
            };
            match self
                .request(&Request::Proposal {
                    group: *id,
                    proposal,
                })
                .await
            {
                Ok(_) => {
                    self.db.execute(
                        "UPDATE huddle_groups SET state = 'leaving' WHERE id = ?1",
                        params![id.as_bytes().as_slice()],
                    )?;
                    return Ok(());
                }
                Err(ClientError::Server(e)) if e.code == ErrorCode::StaleEpoch => {
                    self.sync_group(id).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Usage(
            "could not post the leave request; try again".into(),
        ))
    }

    /// Builds a commit with `make`, posts it, merges it when accepted, and
    /// retries after syncing when another commit won the epoch.
    async fn commit_with_retry<F>(
        &mut self,
        id: &GroupId,
        kind: &str,
        members: Option<Vec<String>>,
        origin: Origin,
        make: F,
    ) -> Result<Vec<Event>>
    where
        F: Fn(&mut MlsGroup, &Provider<'_>, &Identity) -> Result<CommitOut>,
    {
        // No other process of the home may replace our pending commit
        // before it is merged or discarded.
        let _lock = self.locks.lock(id).await?;
        for attempt in 0..COMMIT_ATTEMPTS {
            let (commit, welcome) = {
                let tx = self.db.unchecked_transaction()?;
                let provider = Provider::new(&self.crypto, &tx);
                let mut g = self.load_group(&tx, id)?;
                if g.pending_commit().is_some() {
                    g.clear_pending_commit(provider.storage())
                        .map_err(ClientError::mls)?;
                }
                let (c, w) = make(&mut g, &provider, &self.identity)?;
                let commit = serialize(&c)?;
                let welcome = w.as_ref().map(serialize).transpose()?;
                tx.execute(
                    "UPDATE huddle_groups SET pending_commit = ?2 WHERE id = ?1",
                    params![id.as_bytes().as_slice(), commit.as_ref()],
                )?;
                tx.commit()?;
                (commit, welcome)
            };
            let r = self
                .request(&Request::Commit {
                    group: *id,
                    commit,
                    welcome,
                })
                .await;
            match r {
                Ok(Response::Appended { seq, epoch }) => {
                    let tx = self.db.unchecked_transaction()?;
                    let provider = Provider::new(&self.crypto, &tx);
                    let mut g = self.load_group(&tx, id)?;
                    g.merge_pending_commit(&provider)
                        .map_err(ClientError::mls)?;
                    tx.execute(
                        "UPDATE huddle_groups SET pending_commit = NULL, proposals_since_ms = NULL WHERE id = ?1",
                        params![id.as_bytes().as_slice()],
                    )?;
                    tx.execute(
                        "INSERT OR IGNORE INTO huddle_own (group_id, seq) VALUES (?1, ?2)",
                        params![id.as_bytes().as_slice(), seq as i64],
                    )?;
                    let mut events = Vec::new();
                    if let Some(m) = &members {
                        let mut e = Event::new(kind, &id.to_string(), self.name(), seq, now_ms());
                        e.members = Some(m.clone());
                        e.epoch = Some(epoch);
                        e.group_name = load_row(&tx, id)?.map(|r| r.name).unwrap_or_default();
                        events.push(e);
                    }
                    record(&tx, id, &events, origin)?;
                    tx.commit()?;
                    debug!(group = %id, seq, epoch, attempt, "commit accepted");
                    self.publish_group_info(id).await;
                    return Ok(events);
                }
                Ok(other) => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
                Err(ClientError::Server(e)) => {
                    self.discard_pending_commit(id)?;
                    if e.code == ErrorCode::StaleEpoch {
                        debug!(group = %id, attempt, "commit lost the epoch; syncing and retrying");
                        self.sync_group(id).await?;
                        self.active_group(id)?;
                        continue;
                    }
                    return Err(ClientError::Server(e));
                }
                // A connection failure: the commit may or may not have landed.
                // The pending commit stays; the next sync settles it.
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Usage(
            "other members kept committing first; try again".into(),
        ))
    }

    /// A pending commit that is not in the log read up to its head: the DS
    /// never took it, unless the process that made it is still waiting for
    /// the answer. Only when no process of the home holds the group's lock
    /// is it abandoned, and discarded.
    fn discard_abandoned_commit(&mut self, id: &GroupId) -> Result<()> {
        let Some(_lock) = self.locks.try_lock(id)? else {
            return Ok(());
        };
        self.discard_pending_commit(id)
    }

    fn discard_pending_commit(&mut self, id: &GroupId) -> Result<()> {
        let tx = self.db.unchecked_transaction()?;
        let provider = Provider::new(&self.crypto, &tx);
        let mut g = self.load_group(&tx, id)?;
        g.clear_pending_commit(provider.storage())
            .map_err(ClientError::mls)?;
        tx.execute(
            "UPDATE huddle_groups SET pending_commit = NULL WHERE id = ?1",
            params![id.as_bytes().as_slice()],
        )?;
        tx.commit()?;
        Ok(())
    }

    // ---- messages -----------------------------------------------------

    /// Sends a text message (at most [`MAX_TEXT`] bytes).
    pub async fn send_text(&mut self, group: &str, text: &str) -> Result<Event> {
        if text.trim().is_empty() {
            return Err(ClientError::Usage(
                "nothing to send: the message is empty".into(),
            ));
        }
        if text.len() > MAX_TEXT {
            return Err(ClientError::Usage(format!(
                "a text message is at most {} KiB; send longer text as a file (`huddle send-file`)",
                MAX_TEXT / 1024
            )));
        }
        let id = self.resolve_group(group)?;
        self.sync_group(&id).await?;
        self.sending_group(&id)?;
        let (_, event) = self
            .send_app(
                &id,
                &AppMessage::Text {
                    text: text.to_owned(),
                },
            )
            .await?;
        event.ok_or_else(|| ClientError::Protocol("a text message shows as an event".into()))
    }

    /// Encrypts and posts an application message. Returns its sequence
    /// number and the event it shows as (recorded in the history).
    ///
    /// The message is put in the outbox, by its digest, in the transaction
    /// that advances the ratchet: whichever process of the home meets it
    /// first (this one, told its position by the DS, or a `listen` beside
    /// it, which receives it pushed) records it as this device's own.
    pub(crate) async fn send_app(
        &mut self,
        id: &GroupId,
        msg: &AppMessage,
    ) -> Result<(u64, Option<Event>)> {
        for _ in 0..COMMIT_ATTEMPTS {
            // Pending proposals block sending: commit them first.
            if self
                .load_group(&self.db, id)?
                .pending_proposals()
                .next()
                .is_some()
            {
                self.commit_pending_proposals(id).await?;
                self.active_group(id)?;
                continue;
            }
            let (data, digest) = {
                let tx = self.db.unchecked_transaction()?;
                let provider = Provider::new(&self.crypto, &tx);
                let mut g = self.load_group(&tx, id)?;
                let out = g
                    .create_message(&provider, &self.identity, &msg.encode())
                    .map_err(ClientError::mls)?;
                let b = serialize(&out)?;
                let digest = *blake3::hash(&b).as_bytes();
                let event = app_event(msg, id, self.name(), 0, now_ms())
                    .map(|e| serde_json::to_string(&e).expect("events serialise"));
                tx.execute(
                    "INSERT OR REPLACE INTO huddle_outbox (group_id, digest, event, created_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![id.as_bytes().as_slice(), digest.as_slice(), event, now_ms() as i64],
                )?;
                // The ratchet advanced: persist it even if sending fails, so
                // no key is ever used twice.
                tx.commit()?;
                (b, digest)
            };
            let r = self
                .request(&Request::Message {
                    group: *id,
                    message: data,
                })
                .await;
            match r {
                Ok(Response::Appended { seq, .. }) => {
                    let tx = self.db.unchecked_transaction()?;
                    let mut event = app_event(msg, id, self.name(), seq, now_ms());
                    if let Some(e) = &mut event {
                        e.group_name = load_row(&tx, id)?.map(|r| r.name).unwrap_or_default();
                    }
                    // Unless another process of the home placed it already.
                    if take_outbox(&tx, id, &digest)?.is_some() {
                        mark_own(&tx, id, seq)?;
                        record(&tx, id, event.as_slice(), Origin::Own)?;
                    }
                    tx.commit()?;
                    return Ok((seq, event));
                }
                Ok(other) => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
                Err(ClientError::Server(e)) => {
                    // Refused: it is not in the log and never will be.
                    take_outbox(&self.db, id, &digest)?;
                    if e.code != ErrorCode::StaleEpoch {
                        return Err(ClientError::Server(e));
                    }
                    self.sync_group(id).await?;
                    self.active_group(id)?;
                }
                // Lost on the way, or not: the outbox entry settles it when
                // the log is read.
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Usage(
            "the group kept changing; try again".into(),
        ))
    }

    /// The local history of a group, oldest first (the last `limit`).
    pub fn messages(&self, group: &str, limit: usize) -> Result<Vec<Event>> {
        let id = self.resolve_group(group)?;
        let mut stmt = self.db.prepare(
            "SELECT event FROM huddle_events WHERE group_id = ?1 ORDER BY seq DESC, idx DESC LIMIT ?2",
        )?;
        let rows: Vec<String> = stmt
            .query_map(params![id.as_bytes().as_slice(), limit as i64], |r| {
                r.get(0)
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut out: Vec<Event> = rows
            .iter()
            .filter_map(|s| serde_json::from_str(s).ok())
            .collect();
        out.reverse();
        Ok(out)
    }

    // ---- sync ---------------------------------------------------------

    /// Fetches and processes everything pending: Welcomes, then every
    /// group's log. Returns what is new.
    ///
    /// A group that fails (its state cannot be processed, the DS refuses
    /// something of it) does not hold up the others: it shows as an
    /// `error` event and the rest goes on. Losing the connection ends the
    /// whole sync.
    ///
    /// What is new is read from the history: everything recorded since it
    /// was last reported (by `sync` or `listen`), whichever process of the
    /// home recorded it — a `send` that processed others' messages before
    /// sending, say — except this user's own messages and changes, which
    /// the commands that made them reported.
    pub async fn sync(&mut self) -> Result<Vec<Event>> {
        Ok(self.sync_reporting().await?.0)
    }

    /// [`Client::sync`], and the newest history row its report covered.
    async fn sync_reporting(&mut self) -> Result<(Vec<Event>, i64)> {
        let mut failures: Vec<Event> = self
            .sync_inbox()
            .await?
            .into_iter()
            .filter(|e| !e.recorded())
            .collect();
        for (id, state) in self.group_ids()? {
            match self.sync_one(&id, &state).await {
                Ok(_) => {}
                Err(e) if e.is_connection() => return Err(e),
                Err(e) => failures.push(self.failure(&id, &e)),
            }
        }
        self.check_lost_groups().await?;
        let (n, lr) = self.key_package_count().await?;
        if n < KEY_PACKAGE_LOW || !lr {
            self.publish_key_packages(KEY_PACKAGE_BATCH, !lr).await?;
        }
        let (mut events, covered) = self.unreported()?;
        events.extend(failures);
        Ok((events, covered))
    }

    async fn sync_one(&mut self, id: &GroupId, state: &str) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        match state {
            "creating" => self.resume_creation(id).await?,
            "rejoining" => {
                events.extend(self.rejoin(id, "an earlier rejoin did not finish").await?)
            }
            "active" | "leaving" => {
                events.extend(self.sync_group(id).await?);
                events.extend(self.maybe_commit_proposals(id, false).await?);
                events.extend(self.check_fork(id).await?);
            }
            _ => {}
        }
        Ok(events)
    }

    /// The `error` event reporting that `id` could not be brought up to
    /// date (not recorded in the history).
    fn failure(&self, id: &GroupId, err: &ClientError) -> Event {
        debug!(group = %id, error = %err, "this group could not be synced; the others go on");
        let cursor = load_row(&self.db, id).ok().flatten();
        let mut e = Event::new(
            "error",
            &id.to_string(),
            "",
            cursor.as_ref().map_or(0, |r| r.cursor),
            now_ms(),
        );
        e.group_name = cursor.map(|r| r.name).unwrap_or_default();
        e.text = Some(err.to_string());
        e
    }

    fn group_ids(&self) -> Result<Vec<(GroupId, String)>> {
        let mut stmt = self
            .db
            .prepare("SELECT id, state FROM huddle_groups ORDER BY joined_ms")?;
        let rows: Vec<(Vec<u8>, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, s)| GroupId::from_slice(&id).map(|g| (g, s)))
            .collect())
    }

    async fn resume_creation(&mut self, id: &GroupId) -> Result<()> {
        let (info, tree) = {
            let g = self.load_group(&self.db, id)?;
            let provider = Provider::new(&self.crypto, &self.db);
            let info = g
                .export_group_info(provider.crypto(), &self.identity, false)
                .map_err(ClientError::mls)?;
            let tree = g
                .export_ratchet_tree()
                .tls_serialize_detached()
                .map_err(ClientError::mls)?;
            (serialize(&info)?, Bytes::from(tree))
        };
        self.confirm_creation(*id, info, tree).await
    }

    /// Processes new Welcomes.
    pub async fn sync_inbox(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        loop {
            let after = kv_get(&self.db, "inbox_cursor")?;
            let Response::Inbox { items, head } = self
                .request(&Request::FetchInbox {
                    after,
                    limit: MAX_PAGE,
                })
                .await?
            else {
                return Err(ClientError::Protocol("expected Inbox".into()));
            };
            if items.is_empty() {
                break;
            }
            for item in items {
                if let Some(mut e) = self.join(&item).await? {
                    let id = item.group;
                    // The group's name arrives in its log, right after the
                    // commit that added us.
                    let r = self.sync_group(&id).await;
                    let later = self.isolate(&id, r)?;
                    if let Some(row) = load_row(&self.db, &id)?.filter(|r| !r.name.is_empty()) {
                        e.group_name = row.name;
                        // In place: it stays before the messages it precedes.
                        self.db.execute(
                            "UPDATE huddle_events SET event = ?3 WHERE group_id = ?1 AND seq = ?2 AND idx = 0",
                            params![
                                id.as_bytes().as_slice(),
                                e.seq as i64,
                                serde_json::to_string(&e).expect("events serialise")
                            ],
                        )?;
                    }
                    events.push(e);
                    events.extend(later);
                }
            }
            let now = kv_get(&self.db, "inbox_cursor")?;
            // A page that moved nothing on (only items already handled,
            // from a DS that keeps announcing a higher head) ends it.
            if now >= head || now == after {
                break;
            }
        }
        Ok(events)
    }

    /// Joins a group from a Welcome in the inbox. Returns the `joined` event,
    /// or `None` when the item was already handled or cannot be used.
    async fn join(&mut self, item: &InboxItem) -> Result<Option<Event>> {
        if item.seq <= kv_get(&self.db, "inbox_cursor")? {
            return Ok(None);
        }
        // Another process of the home may be joining from the same Welcome
        // (or rejoining the group): one of them does it.
        let _lock = self.locks.lock(&item.group).await?;
        if item.seq <= kv_get(&self.db, "inbox_cursor")? {
            return Ok(None);
        }
        let tree = self.fetch_tree(item).await?;
        self.join_with_tree(item, tree)
    }

    async fn fetch_tree(&mut self, item: &InboxItem) -> Result<Option<Bytes>> {
        Ok(
            match self
                .request(&Request::RatchetTree {
                    group: item.group,
                    seq: item.commit_seq,
                })
                .await
            {
                Ok(Response::RatchetTree { tree }) => Some(tree),
                Ok(_) => None,
                Err(ClientError::Server(e)) => {
                    warn!(group = %item.group, error = %e.message, "cannot fetch the ratchet tree for a Welcome");
                    None
                }
                Err(e) => return Err(e),
            },
        )
    }

    /// Joins from a Welcome with the given ratchet tree (as served by the
    /// DS). A Welcome that does not fit the tree, or is not for this device,
    /// is refused: nothing is joined, and the inbox cursor moves past it.
    /// Returns the `joined` event, or `None` when refused or already handled.
    pub fn join_with_tree(
        &mut self,
        item: &InboxItem,
        tree: Option<Bytes>,
    ) -> Result<Option<Event>> {
        let tx = self.db.unchecked_transaction()?;
        // Checked inside the (write) transaction: another process of the
        // home may have used this Welcome a moment ago.
        if item.seq <= kv_get(&tx, "inbox_cursor")? {
            return Ok(None);
        }
        let result = (|| -> Result<Event> {
            let tree = tree.ok_or_else(|| ClientError::Mls("no ratchet tree".into()))?;
            let tree =
                RatchetTreeIn::tls_deserialize_exact(tree.as_ref()).map_err(ClientError::mls)?;
            let msg = MlsMessageIn::tls_deserialize_exact(item.welcome.as_ref())
                .map_err(ClientError::mls)?;
            let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
                return Err(ClientError::Mls("inbox item is not a Welcome".into()));
            };
            let old = load_row(&tx, &item.group)?;
            let provider = Provider::new(&self.crypto, &tx);
            // A Welcome this device can open (it takes one of its one-time
            // key packages) means the group added it anew: it was removed,
            // or left, and was added back, perhaps while it was away. Its
            // state replaces what this device kept of the group; if the
            // Welcome does not open, the transaction rolls back and nothing
            // is lost.
            let mut old_epoch = None;
            if let Some(mut stale) = MlsGroup::load(provider.storage(), &mls_gid(&item.group))
                .map_err(ClientError::mls)?
            {
                old_epoch = Some(stale.epoch().as_u64());
                stale.delete(provider.storage()).map_err(ClientError::mls)?;
            }
            let staged = StagedWelcome::new_from_welcome(
                &provider,
                &mls::join_config(),
                welcome,
                Some(tree),
            )
            .map_err(ClientError::mls)?;
            if staged.group_context().group_id().as_slice() != item.group.as_bytes() {
                return Err(ClientError::Mls(
                    "the Welcome is for another group than announced".into(),
                ));
            }
            // A device that follows the group (it rejoined meanwhile, say)
            // keeps a state newer than the Welcome.
            let following = old
                .as_ref()
                .is_some_and(|r| matches!(r.state.as_str(), "active" | "leaving"));
            if following && old_epoch.is_some_and(|e| e >= staged.group_context().epoch().as_u64())
            {
                return Err(ClientError::Mls(
                    "a Welcome older than this device's state of the group".into(),
                ));
            }
            let from = staged
                .welcome_sender()
                .ok()
                .and_then(|l| user_of(l.credential()))
                .unwrap_or_else(|| "?".into());
            let group = staged.into_group(&provider).map_err(ClientError::mls)?;
            let members = member_names(&group);
            let changed = remember_keys(&tx, &member_keys(&group))?;
            if !changed.is_empty() {
                warn!(group = %item.group, users = ?changed, "identity keys differ from the ones first seen");
            }
            tx.execute(
                "INSERT OR REPLACE INTO huddle_groups (id, name, state, cursor, joined_ms) VALUES (?1, ?2, 'active', ?3, ?4)",
                params![
                    item.group.as_bytes().as_slice(),
                    old.map(|r| r.name).unwrap_or_default(),
                    item.commit_seq as i64,
                    now_ms() as i64
                ],
            )?;
            let mut e = Event::new(
                "joined",
                &item.group.to_string(),
                &from,
                item.commit_seq,
                item.timestamp_ms,
            );
            e.members = Some(members);
            e.epoch = Some(group.epoch().as_u64());
            record_events(&tx, &item.group, std::slice::from_ref(&e))?;
            Ok(e)
        })();
        kv_set(&tx, "inbox_cursor", item.seq)?;
        match result {
            Ok(e) => {
                tx.commit()?;
                Ok(Some(e))
            }
            Err(err) => {
                // Roll back any partial join, but keep the cursor moving: a
                // Welcome that cannot be used now never becomes usable.
                drop(tx);
                warn!(group = %item.group, error = %err, "ignoring a Welcome that cannot be used");
                kv_set(&self.db, "inbox_cursor", item.seq)?;
                Ok(None)
            }
        }
    }

    /// Fetches and processes a group's log from the cursor to the head.
    pub async fn sync_group(&mut self, id: &GroupId) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        loop {
            let Some(row) = load_row(&self.db, id)? else {
                break;
            };
            if !matches!(row.state.as_str(), "active" | "leaving") {
                break;
            }
            let r = self
                .request(&Request::FetchLog {
                    group: *id,
                    after: row.cursor,
                    limit: MAX_PAGE,
                })
                .await;
            let (entries, head) = match r {
                Ok(Response::Log { entries, head }) => (entries, head),
                Ok(other) => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
                Err(ClientError::Server(e)) if e.code == ErrorCode::NotMember => {
                    // The DS no longer lets us read: we were removed in an
                    // entry we have already processed, or never joined.
                    self.db.execute(
                        "UPDATE huddle_groups SET state = 'removed' WHERE id = ?1",
                        params![id.as_bytes().as_slice()],
                    )?;
                    break;
                }
                Err(ClientError::Server(e)) if e.code == ErrorCode::Compacted => {
                    events.extend(self.lost_to_compaction(id, &row).await?);
                    break;
                }
                Err(e) => return Err(e),
            };
            if entries.is_empty() {
                if row.pending_commit.is_some() && row.cursor >= head {
                    self.discard_abandoned_commit(id)?;
                }
                break;
            }
            let n = entries.len();
            let first = entries[0].seq;
            events.extend(self.process_entries(id, &entries)?);
            let now = load_row(&self.db, id)?;
            if let Some(r) = now
                .as_ref()
                .filter(|r| matches!(r.state.as_str(), "removed" | "left"))
            {
                // Tell the DS this device has read up to its removal, so the
                // log need not be kept for it (best effort: the DS stops
                // keeping it after a while anyway).
                let _ = self
                    .request(&Request::FetchLog {
                        group: *id,
                        after: r.cursor,
                        limit: 1,
                    })
                    .await;
                break;
            }
            let cursor = now.map(|r| r.cursor).unwrap_or(0);
            if cursor == row.cursor {
                return Err(ClientError::Protocol(format!(
                    "the log of group {id} continues at {first}, but this device is at {cursor}: entries are missing"
                )));
            }
            if cursor >= head || n == 0 {
                if let Some(r) = load_row(&self.db, id)? {
                    if r.pending_commit.is_some() && r.cursor >= head {
                        self.discard_abandoned_commit(id)?;
                    }
                }
                break;
            }
        }
        Ok(events)
    }

    /// The DS compacted entries this device had not read. A current member
    /// (a device restored from an old backup, say) rejoins; a departed one
    /// (removed, or left, while this device was away for longer than the
    /// DS keeps what it may read) marks the group and moves on.
    async fn lost_to_compaction(&mut self, id: &GroupId, row: &GroupRow) -> Result<Vec<Event>> {
        match self.request(&Request::GroupState { group: *id }).await {
            Ok(_) => {
                return self
                    .rejoin(
                        id,
                        "the server no longer keeps messages this device had not read",
                    )
                    .await
            }
            Err(ClientError::Server(e))
                if matches!(e.code, ErrorCode::NotMember | ErrorCode::UnknownGroup) => {}
            Err(e) => return Err(e),
        }
        let (state, kind) = if row.state == "leaving" {
            ("left", "left")
        } else {
            ("removed", "member_removed")
        };
        self.db.execute(
            "UPDATE huddle_groups SET state = ?2 WHERE id = ?1",
            params![id.as_bytes().as_slice(), state],
        )?;
        warn!(group = %id, "no longer a member, and the server compacted what this device had not read");
        let mut e = Event::new(kind, &id.to_string(), "", row.cursor, now_ms());
        e.members = Some(vec![self.name().to_owned()]);
        e.group_name = row.name.clone();
        e.text = Some(
            "this device was away when it was removed, longer than the server keeps messages; what was sent before the removal is lost to it".into(),
        );
        record_note(&self.db, id, &e)?;
        Ok(vec![e])
    }

    /// Processes consecutive log entries of a group in one transaction.
    /// Entries at or below the cursor are skipped; processing stops at a gap.
    pub fn process_entries(&mut self, id: &GroupId, entries: &[LogEntry]) -> Result<Vec<Event>> {
        let me = self.settings.name.clone();
        let tx = self.db.unchecked_transaction()?;
        let Some(mut row) = load_row(&tx, id)? else {
            return Ok(Vec::new());
        };
        let provider = Provider::new(&self.crypto, &tx);
        // openmls stores the message secrets after every message; one
        // write per batch is enough inside one transaction.
        provider.storage().hold_message_secrets();
        let mut group = MlsGroup::load(provider.storage(), &mls_gid(id))
            .map_err(ClientError::mls)?
            .ok_or_else(|| ClientError::Mls(format!("no MLS state for group {id}")))?;
        // New events, recorded in the history below; and what is reported
        // (what others did: this user's own messages were reported when
        // sent).
        let mut events = Vec::new();
        let mut shown = Vec::new();
        let outbox = outbox_pending(&tx, id)?;
        for entry in entries {
            if entry.seq <= row.cursor {
                continue;
            }
            if entry.seq != row.cursor + 1 {
                break;
            }
            row.cursor = entry.seq;
            if !group.is_active() {
                break;
            }
            if is_own(&tx, id, entry.seq)? {
                continue;
            }
            if outbox && entry.kind == EntryKind::Application {
                let digest = blake3::hash(&entry.data);
                if let Some(event) = take_outbox(&tx, id, digest.as_bytes())? {
                    // Sent by another process of this home, which has not
                    // learnt its position yet.
                    mark_own(&tx, id, entry.seq)?;
                    if let Some(mut e) = event {
                        e.seq = entry.seq;
                        e.timestamp_ms = entry.timestamp_ms;
                        e.group_name = row.name.clone();
                        record(&tx, id, &[e], Origin::Own)?;
                    }
                    continue;
                }
            }
            if entry.kind == EntryKind::Commit
                && row.pending_commit.as_deref() == Some(entry.data.as_ref())
            {
                // Our own commit, accepted while we were not listening.
                group
                    .merge_pending_commit(&provider)
                    .map_err(ClientError::mls)?;
                row.pending_commit = None;
                row.proposals_since_ms = None;
                continue;
            }
            match self.process_one(&provider, &mut group, &mut row, id, &me, entry) {
                Ok(mut evs) => {
                    for e in &mut evs {
                        e.group_name = row.name.clone();
                    }
                    shown.extend(evs.iter().cloned());
                    events.extend(evs);
                }
                Err(e) => {
                    warn!(group = %id, seq = entry.seq, error = %e, "skipping a log entry that cannot be processed");
                }
            }
        }
        provider.storage().flush()?;
        if row.releave {
            kv_set(&tx, &format!("releave:{id}"), 1)?;
        }
        tx.prepare_cached(
            "UPDATE huddle_groups SET name = ?2, state = ?3, cursor = ?4, pending_commit = ?5, proposals_since_ms = ?6 WHERE id = ?1",
        )?
        .execute(params![
            id.as_bytes().as_slice(),
            row.name,
            row.state,
            row.cursor as i64,
            row.pending_commit,
            row.proposals_since_ms.map(|v| v as i64)
        ])?;
        record_events(&tx, id, &events)?;
        tx.commit()?;
        Ok(shown)
    }

    fn process_one(
        &self,
        provider: &Provider<'_>,
        group: &mut MlsGroup,
        row: &mut GroupRow,
        id: &GroupId,
        me: &str,
        entry: &LogEntry,
    ) -> Result<Vec<Event>> {
        let gid = id.to_string();
        let gid = gid.as_str();
        let msg =
            MlsMessageIn::tls_deserialize_exact(entry.data.as_ref()).map_err(ClientError::mls)?;
        let pm = msg.try_into_protocol_message().map_err(ClientError::mls)?;
        if entry.kind == EntryKind::Commit && group.pending_commit().is_some() {
            // Another member's commit won this epoch: ours is void.
            group
                .clear_pending_commit(provider.storage())
                .map_err(ClientError::mls)?;
            row.pending_commit = None;
        }
        let processed = group
            .process_message(provider, pm)
            .map_err(ClientError::mls)?;
        let from = user_of(processed.credential()).unwrap_or_else(|| "?".into());
        let mut events = Vec::new();
        let ev = |kind: &str| Event::new(kind, gid, &from, entry.seq, entry.timestamp_ms);
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                let msg = AppMessage::decode(&app.into_bytes()).map_err(ClientError::Mls)?;
                match &msg {
                    // The name the group had when this device joined stays:
                    // a member cannot rename it under the others (or give it
                    // a name that shadows another group's id).
                    AppMessage::GroupName { name } if row.name.is_empty() => {
                        row.name = name.clone()
                    }
                    AppMessage::GroupName { .. } => {}
                    AppMessage::Media(info) => media::remember(provider.storage_conn(), id, info)?,
                    AppMessage::Text { .. } => {}
                }
                events.extend(app_event(&msg, id, &from, entry.seq, entry.timestamp_ms));
            }
            ProcessedMessageContent::ProposalMessage(p) => {
                group
                    .store_pending_proposal(provider.storage(), *p)
                    .map_err(ClientError::mls)?;
                if row.proposals_since_ms.is_none() {
                    row.proposals_since_ms = Some(entry.timestamp_ms);
                }
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let mut removed = Vec::new();
                let mut left = Vec::new();
                let mut rejoined = Vec::new();
                for r in staged.remove_proposals() {
                    let leaf = r.remove_proposal().removed();
                    let Some(name) = group.member_at(leaf).and_then(|m| user_of(&m.credential))
                    else {
                        continue;
                    };
                    if matches!(r.sender(), Sender::Member(s) if *s == leaf) {
                        left.push(name);
                    } else if matches!(r.sender(), Sender::NewMemberCommit) && name == from {
                        // An external commit replacing the sender's own
                        // leaf: a member rejoining with new state.
                        rejoined.push(name);
                    } else {
                        removed.push(name);
                    }
                }
                let added_keys: Vec<(String, Vec<u8>)> = staged
                    .add_proposals()
                    .filter_map(|a| {
                        let leaf = a.add_proposal().key_package().leaf_node();
                        user_of(leaf.credential())
                            .map(|u| (u, leaf.signature_key().as_slice().to_vec()))
                    })
                    .collect();
                let added: Vec<String> = added_keys.iter().map(|(u, _)| u.clone()).collect();
                let changed = remember_keys(provider.storage_conn(), &added_keys)?;
                let self_removed = staged.self_removed();
                group
                    .merge_staged_commit(provider, *staged)
                    .map_err(ClientError::mls)?;
                row.proposals_since_ms = None;
                let epoch = Some(group.epoch().as_u64());
                if !changed.is_empty() {
                    let mut e = ev("key_changed");
                    e.members = Some(changed);
                    events.push(e);
                }
                if !added.is_empty() {
                    let mut e = ev("member_added");
                    e.members = Some(added);
                    e.epoch = epoch;
                    events.push(e);
                }
                if !removed.is_empty() {
                    let mut e = ev("member_removed");
                    e.members = Some(removed);
                    e.epoch = epoch;
                    events.push(e);
                }
                if !rejoined.is_empty() {
                    let mut e = ev("rejoined");
                    e.members = Some(rejoined);
                    e.epoch = epoch;
                    events.push(e);
                }
                if !left.is_empty() {
                    let mut e = ev("left");
                    e.from = left[0].clone();
                    e.members = Some(left.clone());
                    e.epoch = epoch;
                    events.push(e);
                }
                if self_removed || !group.is_active() {
                    row.state = if left.iter().any(|l| l == me) {
                        "left".into()
                    } else {
                        "removed".into()
                    };
                } else if row.state == "leaving" {
                    // Our leave proposal was not part of this commit: it is
                    // void in the new epoch and must be made again.
                    row.state = "active".into();
                    row.proposals_since_ms = None;
                    row.releave = true;
                }
            }
            _ => {}
        }
        Ok(events)
    }

    /// Commits pending proposals if this device is the designated committer
    /// (the member with the lowest leaf index that is not being removed), or
    /// if `force`, or once the proposals are older than [`PROPOSAL_GRACE`].
    pub async fn maybe_commit_proposals(
        &mut self,
        id: &GroupId,
        force: bool,
    ) -> Result<Vec<Event>> {
        let Some(row) = load_row(&self.db, id)? else {
            return Ok(Vec::new());
        };
        // A leaving member never commits its own removal.
        if row.state != "active" {
            return Ok(Vec::new());
        }
        // Every stored proposal sets proposals_since_ms in the transaction
        // that stores it, and merging a commit clears both: without it there
        // is nothing to commit, and no need to load the group's state (which
        // grows with the group) after every batch and every tick.
        if row.proposals_since_ms.is_none() {
            return self.maybe_releave(id).await;
        }
        let g = self.load_group(&self.db, id)?;
        let removing: HashSet<u32> = g
            .pending_proposals()
            .filter_map(|p| match p.proposal() {
                Proposal::Remove(r) => Some(r.removed().u32()),
                _ => None,
            })
            .collect();
        if g.pending_proposals().next().is_none() {
            return self.maybe_releave(id).await;
        }
        let designated = g
            .members()
            .map(|m| m.index.u32())
            .filter(|i| !removing.contains(i))
            .min();
        let mine = g.own_leaf_index().u32();
        let old = row
            .proposals_since_ms
            .is_some_and(|t| now_ms().saturating_sub(t) >= PROPOSAL_GRACE.as_millis() as u64);
        if removing.contains(&mine) || !(force || old || designated == Some(mine)) {
            return Ok(Vec::new());
        }
        self.commit_pending_proposals(id).await
    }

    async fn maybe_releave(&mut self, id: &GroupId) -> Result<Vec<Event>> {
        let key = format!("releave:{id}");
        if kv_get(&self.db, &key)? == 1 {
            kv_set(&self.db, &key, 0)?;
            if load_row(&self.db, id)?.is_some_and(|r| r.state == "active") {
                self.propose_leave(id).await?;
            }
        }
        Ok(Vec::new())
    }

    async fn commit_pending_proposals(&mut self, id: &GroupId) -> Result<Vec<Event>> {
        let g = self.load_group(&self.db, id)?;
        let mut all_self = true;
        let leaving: Vec<String> = g
            .pending_proposals()
            .filter_map(|p| match p.proposal() {
                Proposal::Remove(r) => {
                    all_self &= matches!(p.sender(), Sender::Member(s) if *s == r.removed());
                    g.member_at(r.removed())
                        .and_then(|m| user_of(&m.credential))
                }
                _ => None,
            })
            .collect();
        if g.pending_proposals().next().is_none() {
            return Ok(Vec::new());
        }
        let kind = if all_self { "left" } else { "member_removed" };
        let r = self
            .commit_with_retry(id, kind, Some(leaving), Origin::Others, |g, p, s| {
                if g.pending_proposals().next().is_none() {
                    return Err(ClientError::Usage("nothing to commit".into()));
                }
                let (c, w, _) = g
                    .commit_to_pending_proposals(p, s)
                    .map_err(ClientError::mls)?;
                Ok((c, w))
            })
            .await;
        match r {
            // Someone else committed them while we synced.
            Err(ClientError::Usage(m)) if m == "nothing to commit" => Ok(Vec::new()),
            other => other,
        }
    }

    /// Groups the DS counts this user a member of but this device has no
    /// state for (for example after its database was lost): reported once
    /// each as `fork_detected`.
    async fn check_lost_groups(&mut self) -> Result<Vec<Event>> {
        let Response::Groups { groups } = self.request(&Request::ListGroups).await? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for g in groups {
            let id = g.group;
            // A group this device follows is settled by its log; one it
            // has no state for, or believes it left, while the DS counts
            // it in (a Welcome lost or expired), is rejoined.
            let following = |r: Option<GroupRow>| {
                r.is_some_and(|r| {
                    matches!(
                        r.state.as_str(),
                        "active" | "leaving" | "creating" | "rejoining"
                    )
                })
            };
            if following(load_row(&self.db, &id)?) {
                continue;
            }
            // Another process of the home may be joining it right now.
            let _lock = self.locks.lock(&id).await?;
            if following(load_row(&self.db, &id)?) {
                continue;
            }
            warn!(group = %id, "this device has no state for a group it is a member of; rejoining");
            match self
                .rejoin(&id, "this device had no state for the group")
                .await
            {
                Ok(evs) => {
                    out.extend(evs);
                    continue;
                }
                Err(err) => {
                    warn!(group = %id, error = %err, "rejoin failed; trying again at the next sync");
                    let key = format!("lost_reported:{id}");
                    if kv_get(&self.db, &key)? == 1 {
                        continue;
                    }
                    kv_set(&self.db, &key, 1)?;
                    let mut e = Event::new(
                        "fork_detected",
                        &id.to_string(),
                        self.name(),
                        g.head,
                        now_ms(),
                    );
                    e.epoch = Some(g.epoch);
                    e.text = Some(format!(
                        "this device has no state for this group; rejoining failed ({err}) and is retried at the next sync"
                    ));
                    record_note(&self.db, &id, &e)?;
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    /// Publishes this member's epoch authenticator (hashed) for the current
    /// epoch and returns what the other members published.
    pub async fn compare_epoch(
        &mut self,
        group: &str,
    ) -> Result<(u64, [u8; 32], Vec<(String, [u8; 32])>)> {
        let id = self.resolve_group(group)?;
        let (epoch, auth) = self.epoch_authenticator(group)?;
        let hash = *blake3::hash(&auth).as_bytes();
        match self
            .request(&Request::EpochAuthenticator {
                group: id,
                epoch,
                hash,
            })
            .await?
        {
            Response::EpochAuthenticators { published } => Ok((epoch, hash, published)),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Publishes this member's epoch authenticator (hashed) for the group's
    /// current epoch and compares it with what other members published for
    /// the same epoch. Members who computed another value have another view
    /// of the group (a fork): reported as a `fork_detected` event naming
    /// them, once per epoch.
    ///
    /// When this device is the one that diverged it rejoins the group by an
    /// external commit on its own, on evidence other members cannot forge:
    /// it has read the whole log and is still behind the group's epoch (a
    /// commit it could not process), or the GroupInfo the DS keeps for its
    /// epoch (whose group context the DS checked against the commits it
    /// accepted) carries another transcript than its own. What others
    /// publish only makes it look: a few members publishing false values
    /// cannot push it into rejoining. It rejoins at most once per
    /// [`REJOIN_PAUSE`] per group. Otherwise, if the DS holds no GroupInfo
    /// for the current epoch, this member publishes one, so that others can
    /// rejoin.
    pub async fn check_fork(&mut self, id: &GroupId) -> Result<Vec<Event>> {
        if !load_row(&self.db, id)?.is_some_and(|r| r.state == "active" || r.state == "leaving") {
            return Ok(Vec::new());
        }
        let (epoch, hash, published) = self.compare_epoch(&id.to_string()).await?;
        let key = format!("fork_checked:{id}");
        let mut differ: Vec<String> = published
            .into_iter()
            .filter(|(u, h)| u != self.name() && *h != hash)
            .map(|(u, _)| u)
            .collect();
        // A commit this device could not process leaves it behind the
        // group's epoch even with the whole log read.
        let mut behind = false;
        let mut info_missing = false;
        if let Response::GroupState {
            epoch: ds_epoch,
            head,
            group_info_epoch,
            ..
        } = self.request(&Request::GroupState { group: *id }).await?
        {
            let cursor = load_row(&self.db, id)?.map(|r| r.cursor).unwrap_or(0);
            if cursor >= head && ds_epoch != epoch {
                differ.push(format!("the group (epoch {ds_epoch})"));
                behind = true;
            }
            info_missing = cursor >= head && ds_epoch == epoch && group_info_epoch != Some(epoch);
        }
        if differ.is_empty() {
            if info_missing {
                self.publish_group_info(id).await;
            }
            return Ok(Vec::new());
        }
        differ.sort();
        let mut out = Vec::new();
        // Reported once per epoch, not on every sync.
        if kv_get(&self.db, &key)? != epoch + 1 {
            kv_set(&self.db, &key, epoch + 1)?;
            warn!(group = %id, epoch, members = ?differ, "epoch authenticators differ: the group has forked");
            let cursor = load_row(&self.db, id)?.map(|r| r.cursor).unwrap_or(0);
            let mut e = Event::new(
                "fork_detected",
                &id.to_string(),
                self.name(),
                cursor,
                now_ms(),
            );
            e.epoch = Some(epoch);
            e.members = Some(differ);
            e.group_name = load_row(&self.db, id)?.map(|r| r.name).unwrap_or_default();
            record_note(&self.db, id, &e)?;
            out.push(e);
        }
        let diverged = behind || self.differs_from_ds_group_info(id, epoch).await?;
        let last = kv_get(&self.db, &format!("rejoined_at:{id}"))?;
        let paused = now_ms().saturating_sub(last) < REJOIN_PAUSE.as_millis() as u64;
        if diverged && paused {
            warn!(group = %id, epoch, "this device's state of the group diverged; it rejoined a moment ago, so it waits before it rejoins again");
        }
        if diverged && !paused {
            warn!(group = %id, epoch, "this device's state of the group diverged; rejoining");
            match self
                .rejoin(id, "this device's state had diverged from the group's")
                .await
            {
                Ok(evs) => out.extend(evs),
                Err(err) => {
                    warn!(group = %id, error = %err, "rejoin failed; trying again at the next sync")
                }
            }
        }
        Ok(out)
    }

    /// Whether the GroupInfo the DS keeps for `epoch` of the group carries
    /// another confirmed transcript than this device's state: its group
    /// context is the one the DS computed from the commits it accepted
    /// (checked when the GroupInfo was published), so no member alone can
    /// make it differ. `false` when the DS keeps none for this epoch.
    async fn differs_from_ds_group_info(&mut self, id: &GroupId, epoch: u64) -> Result<bool> {
        let info = match self.request(&Request::JoinInfo { group: *id }).await {
            Ok(Response::JoinInfo {
                epoch: e,
                group_info,
                ..
            }) if e == epoch => group_info,
            Ok(_) | Err(ClientError::Server(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let Ok(msg) = MlsMessageIn::tls_deserialize_exact(info.as_ref()) else {
            return Ok(false);
        };
        let MlsMessageBodyIn::GroupInfo(vgi) = msg.extract() else {
            return Ok(false);
        };
        // This device's own context, read the same way.
        let g = self.load_group(&self.db, id)?;
        let mine = g
            .export_group_info(&self.crypto, &self.identity, false)
            .map_err(ClientError::mls)?;
        let mine = MlsMessageIn::tls_deserialize_exact(serialize(&mine)?.as_ref())
            .map_err(ClientError::mls)?;
        let MlsMessageBodyIn::GroupInfo(mine) = mine.extract() else {
            return Ok(false);
        };
        Ok(vgi.epoch().as_u64() == epoch
            && vgi.group_context().confirmed_transcript_hash()
                != mine.group_context().confirmed_transcript_hash())
    }

    /// Publishes a GroupInfo for the group's current epoch (best effort: a
    /// failure only means a rejoining member waits for the next one).
    pub async fn publish_group_info(&mut self, id: &GroupId) {
        let info = (|| -> Result<Bytes> {
            let provider = Provider::new(&self.crypto, &self.db);
            let g = self.load_group(&self.db, id)?;
            let info = g
                .export_group_info(provider.crypto(), &self.identity, false)
                .map_err(ClientError::mls)?;
            serialize(&info)
        })();
        let r = match info {
            Ok(group_info) => {
                self.request(&Request::PublishGroupInfo {
                    group: *id,
                    group_info,
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            debug!(group = %id, error = %e, "GroupInfo not published");
        }
    }

    /// Rejoins a group this user is a member of but this device has no
    /// usable state for (lost, or diverged): an external commit built from
    /// the GroupInfo and ratchet tree the DS keeps for the current epoch. It
    /// replaces this user's old leaf, so the group moves to a new epoch whose
    /// secrets the old state never knew. Messages sent before it are not
    /// readable by the new state; everything after is.
    pub async fn rejoin(&mut self, id: &GroupId, why: &str) -> Result<Vec<Event>> {
        let _lock = self.locks.lock(id).await?;
        for attempt in 0..COMMIT_ATTEMPTS {
            let (epoch, info, tree) = match self.request(&Request::JoinInfo { group: *id }).await? {
                Response::JoinInfo {
                    epoch,
                    group_info,
                    tree,
                    ..
                } => (epoch, group_info, tree),
                other => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
            };
            let commit = {
                let tx = self.db.unchecked_transaction()?;
                let provider = Provider::new(&self.crypto, &tx);
                if let Some(mut old) =
                    MlsGroup::load(provider.storage(), &mls_gid(id)).map_err(ClientError::mls)?
                {
                    old.delete(provider.storage()).map_err(ClientError::mls)?;
                }
                let msg =
                    MlsMessageIn::tls_deserialize_exact(info.as_ref()).map_err(ClientError::mls)?;
                let MlsMessageBodyIn::GroupInfo(vgi) = msg.extract() else {
                    return Err(ClientError::Protocol("the DS sent no GroupInfo".into()));
                };
                if vgi.group_id().as_slice() != id.as_bytes() || vgi.epoch().as_u64() != epoch {
                    return Err(ClientError::Protocol(
                        "the DS sent a GroupInfo for another group or epoch".into(),
                    ));
                }
                let tree = RatchetTreeIn::tls_deserialize_exact(tree.as_ref())
                    .map_err(ClientError::mls)?;
                // Verifies the GroupInfo's signature against the tree and
                // the tree against the group context's tree hash.
                let (group, bundle) = MlsGroup::external_commit_builder()
                    .with_ratchet_tree(tree)
                    .with_config(mls::join_config())
                    .build_group(&provider, vgi, self.identity.credential())
                    .map_err(ClientError::mls)?
                    .leaf_node_parameters(
                        LeafNodeParameters::builder()
                            .with_capabilities(mls::capabilities())
                            .build(),
                    )
                    .load_psks(provider.storage())
                    .map_err(ClientError::mls)?
                    .build(provider.rand(), provider.crypto(), &self.identity, |_| true)
                    .map_err(ClientError::mls)?
                    .finalize(&provider)
                    .map_err(ClientError::mls)?;
                let commit = serialize(bundle.commit())?;
                let changed = remember_keys(&tx, &member_keys(&group))?;
                if !changed.is_empty() {
                    warn!(group = %id, users = ?changed, "identity keys differ from the ones first seen");
                }
                tx.execute(
                    "INSERT INTO huddle_groups (id, name, state, cursor, joined_ms) VALUES (?1, '', 'rejoining', 0, ?2)
                     ON CONFLICT(id) DO UPDATE SET state = 'rejoining', pending_commit = NULL, proposals_since_ms = NULL",
                    params![id.as_bytes().as_slice(), now_ms() as i64],
                )?;
                tx.commit()?;
                commit
            };
            let r = self
                .request(&Request::Commit {
                    group: *id,
                    commit,
                    welcome: None,
                })
                .await;
            match r {
                Ok(Response::Appended { seq, epoch }) => {
                    let tx = self.db.unchecked_transaction()?;
                    tx.execute(
                        "UPDATE huddle_groups SET state = 'active', cursor = ?2 WHERE id = ?1",
                        params![id.as_bytes().as_slice(), seq as i64],
                    )?;
                    tx.execute(
                        "INSERT OR IGNORE INTO huddle_own (group_id, seq) VALUES (?1, ?2)",
                        params![id.as_bytes().as_slice(), seq as i64],
                    )?;
                    let mut e = Event::new("rejoined", &id.to_string(), self.name(), seq, now_ms());
                    e.epoch = Some(epoch);
                    e.text = Some(why.to_owned());
                    e.members = Some(member_names(&self.load_group(&tx, id)?));
                    e.group_name = load_row(&tx, id)?.map(|r| r.name).unwrap_or_default();
                    record_events(&tx, id, std::slice::from_ref(&e))?;
                    tx.commit()?;
                    kv_set(&self.db, &format!("lost_reported:{id}"), 0)?;
                    kv_set(&self.db, &format!("rejoined_at:{id}"), now_ms())?;
                    debug!(group = %id, seq, epoch, attempt, "rejoined by external commit");
                    self.publish_group_info(id).await;
                    return Ok(vec![e]);
                }
                Ok(other) => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
                // Someone committed first: the GroupInfo is stale. The state
                // row stays 'rejoining'; try again with the new one.
                Err(ClientError::Server(e)) if e.code == ErrorCode::StaleEpoch => {
                    debug!(group = %id, attempt, "rejoin lost the epoch; retrying");
                    tokio::time::sleep(Duration::from_millis(20 * (attempt as u64 + 1))).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Usage(
            "other members kept committing first; the rejoin is retried at the next sync".into(),
        ))
    }

    // ---- listen -------------------------------------------------------

    /// Stays connected and reports events as they arrive until `stop`
    /// completes. New entries are pushed by the DS; gaps are filled from the
    /// log. This user's own messages are reported too (sent from another
    /// process of the home, they arrive like anyone's). Once the push
    /// stream is open the first time, a `listening` event says so.
    ///
    /// A connection lost after listening began (the server restarted, the
    /// network went away) is retried with a growing pause, from
    /// [`RECONNECT_MIN`] up to [`RECONNECT_MAX`], and a warning for each
    /// attempt; each new session starts with a sync, so nothing pushed in
    /// between is missed. Failing to reach the server the first time is an
    /// error, as is anything other than a lost connection.
    pub async fn listen<F, S>(&mut self, mut on_event: F, stop: S) -> Result<()>
    where
        F: FnMut(&Event),
        S: std::future::Future<Output = ()>,
    {
        tokio::pin!(stop);
        // This listen's own place in the history (see `recorded_after`).
        let mut shown = 0i64;
        let mut listened = false;
        let mut pause = RECONNECT_MIN;
        loop {
            let started = tokio::time::Instant::now();
            let mut subscribed = false;
            let err = match self
                .listen_session(
                    &mut on_event,
                    stop.as_mut(),
                    &mut subscribed,
                    !listened,
                    &mut shown,
                )
                .await
            {
                Ok(()) => return Ok(()),
                Err(e @ ClientError::Connect { .. }) if listened || subscribed => e,
                Err(e) => return Err(e),
            };
            listened = true;
            self.net = None;
            if started.elapsed() > RECONNECT_MAX {
                // That session lasted: this is a new outage.
                pause = RECONNECT_MIN;
            }
            tracing::warn!("{err}; reconnecting in {} s", pause.as_secs());
            tokio::select! {
                _ = stop.as_mut() => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(RECONNECT_MAX);
        }
    }

    /// One connection's worth of [`Client::listen`]: returns `Ok` when
    /// `stop` completes; sets `subscribed` once the push stream is open
    /// (and reports `listening` then if `first`).
    async fn listen_session<F, S>(
        &mut self,
        on_event: &mut F,
        mut stop: std::pin::Pin<&mut S>,
        subscribed: &mut bool,
        first: bool,
        shown: &mut i64,
    ) -> Result<()>
    where
        F: FnMut(&Event),
        S: std::future::Future<Output = ()>,
    {
        let lost = |what: String, server: &str| ClientError::Connect {
            addr: server.to_owned(),
            reason: format!("push stream: {what}"),
        };
        let server = self.settings.server.clone();
        // What it missed, as `sync` reports it; from then on, everything
        // recorded, its user's own messages too, as it is recorded.
        let (events, covered) = self.sync_reporting().await?;
        if first {
            *shown = covered;
            for e in events {
                on_event(&e);
            }
        } else {
            // Back after a lost connection: everything since this listen
            // last showed, its user's own messages sent meanwhile too.
            for e in events.iter().filter(|e| !e.recorded()) {
                on_event(e);
            }
            let (events, upto) = self.recorded_after(*shown, Origin::Own)?;
            *shown = upto;
            for e in events {
                on_event(&e);
            }
        }
        let groups: Vec<(GroupId, u64)> = self
            .group_ids()?
            .into_iter()
            .filter(|(_, s)| s == "active" || s == "leaving")
            .filter_map(|(id, _)| {
                load_row(&self.db, &id)
                    .ok()
                    .flatten()
                    .map(|r| (id, r.cursor))
            })
            .collect();
        let inbox_after = kv_get(&self.db, "inbox_cursor")?;
        let (mut send, mut recv, _) = self
            .net()
            .await?
            .open(&Request::Subscribe {
                groups,
                inbox_after,
            })
            .await?;
        *subscribed = true;
        if first {
            let mut e = Event::new("listening", "", self.name(), 0, now_ms());
            e.text = Some(server.clone());
            on_event(&e);
        }
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        // Frames are reassembled here from cancel-safe chunk reads, so the
        // timer branch below can never cut a frame in half.
        let mut decoder = huddle_core::frame::Decoder::new(net::MAX_FRAME);
        let mut ready: std::collections::VecDeque<Pushed> = std::collections::VecDeque::new();
        loop {
            let pushed = match ready.pop_front() {
                Some(p) => p,
                None => {
                    tokio::select! {
                        _ = stop.as_mut() => break,
                        _ = tick.tick() => {
                            for (id, state) in self.group_ids()? {
                                if state == "active" || state == "leaving" {
                                    let r = self.maybe_commit_proposals(&id, false).await;
                                    for e in self.isolate(&id, r)?.into_iter().filter(|e| !e.recorded()) {
                                        on_event(&e);
                                    }
                                }
                            }
                            // What other processes of the home did.
                            let (events, upto) = self.recorded_after(*shown, Origin::Own)?;
                            *shown = upto;
                            for e in events {
                                on_event(&e);
                            }
                        }
                        chunk = recv.read_chunk(64 * 1024, true) => {
                            let chunk = chunk
                                .map_err(|e| lost(e.to_string(), &server))?
                                .ok_or_else(|| lost("closed by the server".into(), &server))?;
                            decoder.extend(&chunk.bytes);
                            // Take everything that has already arrived too
                            // (each read returns about one packet's worth),
                            // so entries that came in while the last batch
                            // was processed go into one transaction.
                            let mut taken = chunk.bytes.len();
                            while taken < MAX_DRAIN {
                                let Some(more) = now_or_never(recv.read_chunk(64 * 1024, true)) else {
                                    break;
                                };
                                let more = more
                                    .map_err(|e| lost(e.to_string(), &server))?
                                    .ok_or_else(|| lost("closed by the server".into(), &server))?;
                                taken += more.bytes.len();
                                decoder.extend(&more.bytes);
                            }
                            while let Some(body) = decoder
                                .next_frame()
                                .map_err(|e| ClientError::Protocol(e.to_string()))?
                            {
                                ready.push_back(
                                    huddle_core::proto::decode(&body)
                                        .map_err(|e| ClientError::Protocol(e.to_string()))?,
                                );
                            }
                        }
                    }
                    continue;
                }
            };
            let mut batch = Vec::new();
            if let Pushed::Entry { group, .. } = &pushed {
                // Everything already here for this group goes into one
                // transaction.
                let group = *group;
                while let Some(Pushed::Entry { group: g, .. }) = ready.front() {
                    if *g != group {
                        break;
                    }
                    if let Some(Pushed::Entry { entry, .. }) = ready.pop_front() {
                        batch.push(entry);
                    }
                }
            }
            let group = match &pushed {
                Pushed::Entry { group, .. }
                | Pushed::Gap { group, .. }
                | Pushed::Unwatched { group, .. } => Some(*group),
                Pushed::Inbox(_) | Pushed::InboxGap { .. } => None,
            };
            let r = self.on_pushed(pushed, batch, &mut send, &server).await;
            let events = match group {
                Some(g) => self.isolate(&g, r)?,
                None => r?,
            };
            for e in events.iter().filter(|e| !e.recorded()) {
                on_event(e);
            }
            if let Some(g) = group {
                let r = self.maybe_commit_proposals(&g, false).await;
                for e in self.isolate(&g, r)?.into_iter().filter(|e| !e.recorded()) {
                    on_event(&e);
                }
            }
            let (events, upto) = self.recorded_after(*shown, Origin::Own)?;
            *shown = upto;
            for e in events {
                on_event(&e);
            }
            if let Some(g) = group {
                if let Some(r) = load_row(&self.db, &g)? {
                    write_control(
                        &mut send,
                        &server,
                        &Control::Ack {
                            group: g,
                            seq: r.cursor,
                        },
                    )
                    .await?;
                }
            }
        }
        let _ = send.finish();
        Ok(())
    }

    /// Handles one pushed event (with `batch`, the entries of the same
    /// group that followed it) and returns what it shows.
    async fn on_pushed(
        &mut self,
        pushed: Pushed,
        mut batch: Vec<LogEntry>,
        send: &mut quinn::SendStream,
        server: &str,
    ) -> Result<Vec<Event>> {
        Ok(match pushed {
            Pushed::Entry { group, entry } => {
                batch.insert(0, entry);
                let cursor = load_row(&self.db, &group)?.map(|r| r.cursor).unwrap_or(0);
                if batch[0].seq <= cursor + 1 {
                    self.process_entries(&group, &batch)?
                } else {
                    self.sync_group(&group).await?
                }
            }
            Pushed::Inbox(_) | Pushed::InboxGap { .. } => {
                let evs = self.sync_inbox().await?;
                for e in &evs {
                    if e.kind == "joined" {
                        if let Ok(g) = e.group.parse::<GroupId>() {
                            let after = load_row(&self.db, &g)?.map(|r| r.cursor).unwrap_or(0);
                            write_control(send, server, &Control::Watch { group: g, after })
                                .await?;
                        }
                    }
                }
                evs
            }
            Pushed::Gap { group, .. } => {
                let evs = self.sync_group(&group).await?;
                let after = load_row(&self.db, &group)?.map(|r| r.cursor).unwrap_or(0);
                write_control(send, server, &Control::Watch { group, after }).await?;
                evs
            }
            Pushed::Unwatched { group, .. } => self.sync_group(&group).await?,
        })
    }

    /// What the history holds that `sync` has not reported yet (the home's
    /// `shown_upto` mark), this user's own doing left out, in the order it
    /// was recorded; marks it reported. Also returns the newest row it
    /// covered.
    fn unreported(&self) -> Result<(Vec<Event>, i64)> {
        let mark = kv_get(&self.db, "shown_upto")? as i64;
        self.recorded_after(mark, Origin::Others)
    }

    /// What the history holds after row `mark` (this process's own mark:
    /// `listen` keeps one, so that it shows everything however many other
    /// processes of the home report or sync meanwhile), its user's own
    /// doing included with [`Origin::Own`]; and the newest row covered.
    /// The home's `shown_upto` mark moves past it too, so `sync` does not
    /// report again what was shown.
    fn recorded_after(&self, mark: i64, upto: Origin) -> Result<(Vec<Event>, i64)> {
        let rows: Vec<(i64, String, bool)> = self
            .db
            .prepare_cached(
                "SELECT rowid, event, own FROM huddle_events WHERE rowid > ?1 ORDER BY rowid",
            )?
            .query_map([mark], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let Some(last) = rows.last().map(|r| r.0) else {
            return Ok((Vec::new(), mark));
        };
        self.db
            .prepare_cached(
                "INSERT INTO huddle_kv (key, value) VALUES ('shown_upto', ?1) \
                 ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
            )?
            .execute([last])?;
        let events = rows
            .into_iter()
            .filter(|(_, _, own)| !own || upto == Origin::Own)
            .filter_map(|(_, json, _)| serde_json::from_str(&json).ok())
            .collect();
        Ok((events, last))
    }

    /// A group's result, with a failure that concerns only that group
    /// turned into an `error` event; a lost connection stays an error.
    fn isolate(&self, id: &GroupId, r: Result<Vec<Event>>) -> Result<Vec<Event>> {
        match r {
            Err(e) if !e.is_connection() => Ok(vec![self.failure(id, &e)]),
            other => other,
        }
    }
}

async fn write_control(send: &mut quinn::SendStream, server: &str, c: &Control) -> Result<()> {
    send.write_all(&huddle_core::proto::encode_frame(c))
        .await
        .map_err(|e| ClientError::Connect {
            addr: server.to_owned(),
            reason: format!("push stream: {e}"),
        })
}

/// First pause before `listen` reconnects after losing its connection.
pub const RECONNECT_MIN: Duration = Duration::from_secs(1);

/// Longest pause between `listen`'s reconnection attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Most pushed bytes taken in one go before processing them.
const MAX_DRAIN: usize = 1 << 20;

/// Polls `f` once: its output if it is ready now, `None` otherwise. Only
/// for cancel-safe futures (the future is dropped when pending).
fn now_or_never<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}
