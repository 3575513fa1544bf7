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

use std::time::Duration;

use bytes::Bytes;
use huddle_core::proto::{Request, Response};
use huddle_core::GroupId;
use openmls::prelude::{tls_codec::Serialize as _, *};
use openmls_rust_crypto::RustCrypto;
use rusqlite::Connection;

use crate::db::groups::{GroupRow, GroupState};
use crate::db::{self, Provider};
use crate::error::{ClientError, Result};
pub use crate::follow::PROPOSAL_GRACE;
use crate::home::{Home, Settings};
use crate::identity::Identity;
use crate::lock::Locks;
use crate::net::{Connection as Net, Trust};

pub mod devices;
mod groups;
mod join;
mod keys;
pub mod listen;
pub mod media;
mod membership;
mod messages;
mod recovery;
pub mod roles;
mod sync;
pub mod trust;

pub use listen::{Link, RECONNECT_MAX, RECONNECT_MIN};

/// One-time key packages published at registration and kept topped up.
pub const KEY_PACKAGE_BATCH: usize = 50;
/// Top up when fewer than this many are left on the server.
pub const KEY_PACKAGE_LOW: u32 = 20;
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
pub(crate) fn check_group_name(name: &str) -> Result<()> {
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
    /// This device's number among its user's devices (`huddle device
    /// list`).
    pub device_number: u32,
    /// This device's principal: the name for device 1, `NAME/N` otherwise.
    pub principal: String,
    /// Server address.
    pub server: String,
}

/// What `status` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The address connected to now.
    pub server: String,
    /// Every address of the service this home knows, in the order tried.
    pub servers: Vec<String>,
    /// SHA-256 fingerprint of the server certificate.
    pub server_fingerprint: String,
    /// The principal this device authenticated as (the user name for
    /// the user's first device, `NAME/N` for its N-th).
    pub name: String,
    /// One-time key packages the server still holds for this device.
    pub key_packages: u32,
    /// Whether a last-resort key package is stored.
    pub last_resort: bool,
}

/// One device of a group and its key, as [`Client::member_keys`] lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberKey {
    /// The device's principal (`bob`, `bob/2`).
    pub principal: String,
    /// Its user.
    pub user: String,
    /// Fingerprint of the key it signs with in the group.
    pub fingerprint: String,
    /// Whether the key differs from the one first seen for this device.
    pub changed: bool,
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
    /// Number of members (users; a user's devices count once).
    pub members: usize,
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
    /// Which of the service's addresses ([`server_list`]) the connection
    /// goes to, or went to last: tried first when connecting again.
    current: usize,
    /// Device logs of users met, checked ([`devices`]).
    devices: std::collections::HashMap<String, huddle_core::devices::DeviceSet>,
    /// Users whose device log was fetched during the sync under way: a
    /// leaf their log does not certify is refused, not fetched for again.
    fresh_devices: std::collections::HashSet<String>,
    /// Users whose device log processing stopped for.
    need_devices: Vec<String>,
}

/// The addresses of one service in a home's server setting
/// (`register --server a:4433,b:4433`), in the order given.
pub fn server_list(servers: &str) -> Vec<&str> {
    servers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Connects to the first of `addrs` that answers, trying them in order
/// from `start` and wrapping around; returns the connection and the index
/// of its address. Only a server that cannot be reached sends it on to the
/// next: any other failure (a certificate that is not the pinned one) is
/// final. When none answers, the error names each address and its reason.
async fn connect_any(
    endpoint: Option<&quinn::Endpoint>,
    addrs: &[&str],
    start: usize,
    trust: &Trust,
) -> Result<(Net, usize)> {
    if addrs.is_empty() {
        return Err(ClientError::Usage("no server address in this home".into()));
    }
    let mut failed = Vec::new();
    for k in 0..addrs.len() {
        let i = (start + k) % addrs.len();
        match Net::connect_on(endpoint, addrs[i], trust.clone()).await {
            Ok(net) => {
                if !failed.is_empty() {
                    tracing::warn!(
                        server = addrs[i],
                        "connected to the next server of the service"
                    );
                }
                return Ok((net, i));
            }
            Err(e @ ClientError::Connect { .. }) => failed.push(e),
            Err(e) => return Err(e),
        }
    }
    if failed.len() == 1 {
        return Err(failed.remove(0));
    }
    let reason = failed
        .iter()
        .map(|e| match e {
            ClientError::Connect { addr, reason } => format!("{addr}: {reason}"),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join("; ");
    Err(ClientError::Connect {
        addr: addrs.join(","),
        reason: format!("no server of the service answered ({reason})"),
    })
}

/// The start of a new device in `home` (registering `name`, or linked to
/// user `name`): the trust in the server, and the device's key. Everything
/// local first: a home that cannot be written fails here, before anything
/// is asked of the DS. The key is kept from then on, so a registration or
/// a link interrupted after the DS accepted it is finished by running it
/// again.
fn new_device_key(
    home: &Home,
    name: &str,
    server_cert: Option<&std::path::Path>,
) -> Result<(Trust, Identity)> {
    huddle_core::ids::check_user_name(name).map_err(|e| ClientError::Usage(e.to_string()))?;
    if home.is_registered() {
        let (s, _) = home.load()?;
        return Err(ClientError::AlreadyRegistered(s.name));
    }
    let trust = match server_cert {
        Some(p) => Trust::Pinned(crate::home::read_pem_certs(p)?),
        None => Trust::FirstUse,
    };
    let identity = match home.unfinished_identity(name)? {
        Some(id) => id,
        None => {
            let id = Identity::generate(name);
            home.save_identity(&id)?;
            id
        }
    };
    Ok((trust, identity))
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
        let (trust, identity) = new_device_key(&home, name, server_cert)?;
        let db = db::open(&home.db_path())?;
        let home_locks = home.locks_dir();
        let (net, current) = connect_any(None, &server_list(server), 0, &trust).await?;
        net.authenticate(&identity, true).await?;
        home.pin_cert(&net.server_cert)?;
        let settings = Settings {
            name: name.to_owned(),
            server: server.to_owned(),
            device: 1,
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
            current,
            devices: Default::default(),
            fresh_devices: Default::default(),
            need_devices: Vec::new(),
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
            current: 0,
            devices: Default::default(),
            fresh_devices: Default::default(),
            need_devices: Vec::new(),
        })
    }

    /// The user name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// This device's principal: the user name for the user's first
    /// device, `USER/N` for its N-th.
    pub fn principal(&self) -> &str {
        &self.identity.name
    }

    /// This device's number among its user's.
    pub fn device(&self) -> u32 {
        self.settings.device
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
            device_number: self.settings.device,
            principal: self.identity.name.clone(),
            server: self.settings.server.clone(),
        }
    }

    /// The address in use (or last used) of the service's addresses.
    pub fn server(&self) -> &str {
        let list = server_list(&self.settings.server);
        list.get(self.current)
            .copied()
            .unwrap_or(self.settings.server.as_str())
    }

    /// The authenticated connection, opened on first use; when the
    /// service has several addresses, to the first that answers, starting
    /// with the one used last.
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
            let (net, current) = connect_any(
                self.endpoint.as_ref(),
                &server_list(&self.settings.server),
                self.current,
                &Trust::Pinned(pins),
            )
            .await?;
            self.current = current;
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

    fn load_group(&self, conn: &Connection, id: &GroupId) -> Result<MlsGroup> {
        let provider = Provider::new(&self.crypto, conn);
        MlsGroup::load(provider.storage(), &mls_gid(id))
            .map_err(ClientError::mls)?
            .ok_or_else(|| ClientError::NoGroupState(id.to_string()))
    }

    /// [`Client::active_group`], for sending: a member that asked to leave
    /// no longer sends (its own leave proposal is pending until a remaining
    /// member commits it).
    fn sending_group(&self, id: &GroupId) -> Result<GroupRow> {
        let row = self.active_group(id)?;
        if row.state == GroupState::Leaving {
            return Err(ClientError::Usage(format!(
                "you asked to leave group {id}; nothing more can be sent to it"
            )));
        }
        Ok(row)
    }

    fn active_group(&self, id: &GroupId) -> Result<GroupRow> {
        let row = db::groups::load(&self.db, id)?
            .ok_or_else(|| ClientError::Usage(format!("unknown group {id}")))?;
        match row.state {
            GroupState::Active | GroupState::Leaving => Ok(row),
            GroupState::Creating => Err(ClientError::Usage(format!(
                "group {id} is not confirmed by the server yet; run `huddle sync`"
            ))),
            other => Err(ClientError::Usage(format!(
                "you are no longer in group {id} ({other})"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_setting_lists_the_services_addresses_in_order() {
        assert_eq!(server_list("a:1"), ["a:1"]);
        assert_eq!(server_list("a:1, b:2,,c:3 "), ["a:1", "b:2", "c:3"]);
        assert!(server_list(" , ").is_empty());
    }

    /// With no address answering, each is named with its reason; a single
    /// address keeps its own error.
    #[tokio::test]
    async fn when_no_server_answers_each_address_is_named() {
        // Ports nothing listens on (bound and closed again).
        let closed = || {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().to_string()
        };
        let (a, b) = (closed(), closed());
        match connect_any(None, &[a.as_str()], 0, &Trust::FirstUse).await {
            Err(ClientError::Connect { addr, .. }) => assert_eq!(addr, a),
            other => panic!("{other:?}"),
        }
        match connect_any(None, &[a.as_str(), b.as_str()], 1, &Trust::FirstUse).await {
            Err(ClientError::Connect { addr, reason }) => {
                assert_eq!(addr, format!("{a},{b}"));
                assert!(reason.contains(&a) && reason.contains(&b), "{reason}");
                // Tried from the start index: b first.
                assert!(reason.find(&b) < reason.find(&a), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            connect_any(None, &[], 0, &Trust::FirstUse).await,
            Err(ClientError::Usage(_))
        ));
    }
}
