//! Request handling, independent of the transport.
//!
//! [`Service::handle`] takes one decoded [`Request`] and the [`Session`] of
//! the connection it came on, and returns the [`Response`]. The QUIC layer
//! ([`crate::server`]) only moves frames; everything here can be driven by a
//! test without a network.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use huddle_core::proto::{ErrorBody, ErrorCode, Request, Response};
use huddle_core::GroupId;
use rand::RngCore as _;

use crate::budget::Budgets;
use crate::config::ServerConfig;
use crate::group::{GroupHandle, Post, Shared};
use crate::hub::Hub;
use crate::store::{Store, StoreError};
use crate::writer::Writer;

mod acks;
mod auth;
mod devices;
mod groups;
mod invites;
mod key_packages;
mod log;
mod rate;
mod session;

pub use rate::RateLimiter;

use session::{Counted, UserCounts};
pub use session::{Session, Uncounted};

/// The delivery service's logic and state.
pub struct Service {
    config: Arc<ServerConfig>,
    store: Arc<dyn Store>,
    shared: Shared,
    groups: RwLock<HashMap<GroupId, Arc<GroupHandle>>>,
    /// Online users' inbox pushes.
    pub hub: Arc<Hub>,
    /// Memory for answers in flight.
    pub budgets: Budgets,
    /// Authenticated connections per user.
    user_connections: UserCounts,
    /// Key-package claims per user.
    claims: RateLimiter,
    acks: Mutex<HashMap<(GroupId, String), u64>>,
    /// Serialises group creation so two creations of one id cannot race.
    create: tokio::sync::Mutex<()>,
    /// Serialises loading and unloading groups, so a group never has two
    /// tasks.
    loading: tokio::sync::Mutex<()>,
    /// Set at shutdown: groups are no longer loaded.
    closing: std::sync::atomic::AtomicBool,
    /// This process among the nodes of a cluster: the holder named in the
    /// leases it takes.
    node: u64,
    /// Devices revoked through this node: their connections authenticated
    /// before are refused from then on. (A revoked device cannot
    /// authenticate anywhere again: the store no longer finds it.)
    revoked: Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

impl Service {
    /// Builds the service over `store` and starts a task per stored group.
    /// Must be called within a tokio runtime.
    /// `bus`: cluster mode, the bus to the other nodes.
    pub fn new(
        config: Arc<ServerConfig>,
        store: Arc<dyn Store>,
        bus: Option<Arc<crate::bus::Bus>>,
    ) -> Result<Arc<Self>, StoreError> {
        let hub = Arc::new(Hub::default());
        let shared = Shared {
            store: store.clone(),
            writer: Writer::start(store.clone(), config.writer_linger),
            inboxes: hub.clone(),
            config: config.clone(),
            tail_bytes: Arc::default(),
            now_ms: config.clock,
            bus,
        };
        // Groups are loaded when first asked for, and unloaded when idle
        // (`unload_idle`): a DS holds in memory the groups in use, not
        // every group it stores.
        let groups = HashMap::new();
        Ok(Arc::new(Self {
            budgets: Budgets::new(&config),
            user_connections: Arc::default(),
            claims: RateLimiter::new(config.claims_per_minute),
            config,
            store,
            shared,
            groups: RwLock::new(groups),
            hub,
            acks: Mutex::new(HashMap::new()),
            create: tokio::sync::Mutex::new(()),
            loading: tokio::sync::Mutex::new(()),
            closing: std::sync::atomic::AtomicBool::new(false),
            node: rand::random(),
            revoked: Mutex::default(),
        }))
    }

    /// Cluster mode: the bus to the other nodes.
    pub fn bus(&self) -> Option<Arc<crate::bus::Bus>> {
        self.shared.bus.clone()
    }

    /// Bytes of entries kept in memory by all groups.
    pub fn tail_bytes(&self) -> usize {
        self.shared
            .tail_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Milliseconds since the Unix epoch, by the configured clock.
    pub fn now_ms(&self) -> u64 {
        (self.config.clock)()
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The store (for blocking calls).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> R + Send + 'static,
    ) -> Result<R, ErrorBody> {
        crate::store::blocking(&self.store, f).await
    }

    /// Handles one request. Never panics on bad input: every refusal is a
    /// [`Response::Error`].
    pub async fn handle(&self, session: &Session, req: Request) -> Response {
        match self.dispatch(session, req).await {
            Ok(r) => r,
            Err(e) => Response::Error(e),
        }
    }

    async fn dispatch(&self, session: &Session, req: Request) -> Result<Response, ErrorBody> {
        match req {
            Request::Challenge => {
                let mut nonce = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut nonce);
                session.state.lock().expect("session lock").nonce = Some(nonce);
                Ok(Response::Challenge { nonce })
            }
            Request::Register {
                name,
                identity_key,
                proof,
            } => self.register(session, name, identity_key, proof).await,
            Request::Authenticate { name, proof } => self.authenticate(session, name, proof).await,
            Request::RequestLink {
                user,
                device_key,
                proof,
            } => self.request_link(session, user, device_key, proof).await,
            Request::Devices { user } => self.devices(user, session.user()).await,
            other => {
                let user = session.require_user()?;
                if self.revoked.lock().expect("revoked lock").contains(&user) {
                    return Err(ErrorBody::new(
                        ErrorCode::AuthFailed,
                        format!("{user} is a revoked device"),
                    ));
                }
                self.authenticated(session, user, other).await
            }
        }
    }

    async fn authenticated(
        &self,
        session: &Session,
        user: String,
        req: Request,
    ) -> Result<Response, ErrorBody> {
        match req {
            Request::PublishKeyPackages {
                key_packages,
                last_resort,
            } => {
                self.publish_key_packages(user, key_packages, last_resort)
                    .await
            }
            Request::KeyPackageCount => self.key_package_count(user).await,
            Request::ClaimKeyPackages { users } => self.claim(user, users).await,
            Request::LookupUsers { names } => self.lookup_users(names).await,
            Request::CreateGroup {
                group,
                group_info,
                ratchet_tree,
            } => {
                self.create_group(user, group, group_info, ratchet_tree)
                    .await
            }
            Request::Commit {
                group,
                commit,
                welcome,
            } => {
                self.post(user, group, Post::Commit { commit, welcome })
                    .await
            }
            Request::Proposal { group, proposal } => {
                self.post(user, group, Post::Proposal(proposal)).await
            }
            Request::Message { group, message } => {
                self.post(user, group, Post::Application(message)).await
            }
            Request::FetchLog {
                group,
                after,
                limit,
            } => self.fetch_log(user, group, after, limit).await,
            Request::FetchInbox { after, limit } => self.fetch_inbox(user, after, limit).await,
            Request::RatchetTree { group, seq } => self.ratchet_tree(user, group, seq).await,
            Request::PublishGroupInfo { group, group_info } => {
                self.publish_group_info(user, group, group_info).await
            }
            Request::JoinInfo { group } => self.join_info(user, group, None).await,
            Request::InviteInfo { group, proof } => self.invite_info(user, group, proof).await,
            Request::JoinRequests { group } => self.join_requests(user, group).await,
            Request::DeclineJoin { group, user: who } => self.decline_join(user, group, who).await,
            Request::GroupState { group } => self.group_state(user, group).await,
            Request::ListGroups => self.list_groups(user).await,
            Request::EpochAuthenticator { group, epoch, hash } => {
                self.epoch_authenticator(user, group, epoch, hash).await
            }
            Request::Subscribe { .. } | Request::BeginUpload(_) | Request::Download { .. } => {
                let _ = session;
                Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    "this request is handled on its own stream",
                ))
            }
            Request::PendingLink { code } => self.pending_link(user, code).await,
            Request::AppendDevice { entry, code } => {
                self.append_device(user.clone(), entry, code, Some(user))
                    .await
            }
            Request::UserGroups => self.user_groups(user).await,
            Request::Challenge
            | Request::Register { .. }
            | Request::Authenticate { .. }
            | Request::RequestLink { .. }
            | Request::Devices { .. } => {
                unreachable!("handled before authentication")
            }
        }
    }

    /// Stops every group task (each finishes what it has received), flushes
    /// acknowledgements and closes the store. Called once, at shutdown.
    pub async fn close(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _loading = self.loading.lock().await;
        let groups: Vec<Arc<GroupHandle>> = self
            .groups
            .write()
            .expect("groups lock")
            .drain()
            .map(|(_, h)| h)
            .collect();
        for g in groups {
            g.stop().await;
        }
        self.flush_acks().await;
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redb::RedbStore;
    use crate::store::GroupWrite;

    /// A group whose stored MLS state does not load (corrupted on disk) is
    /// logged and left out; the DS still starts and serves the rest.
    #[tokio::test]
    async fn a_group_whose_state_does_not_load_does_not_stop_the_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(RedbStore::open(&dir.path().join("db.redb")).expect("store"));
        let damaged = GroupId([7; 16]);
        store
            .apply(&[GroupWrite::create(
                damaged,
                "alice",
                1,
                b"not a group state".to_vec(),
            )])
            .expect("write");
        let config = Arc::new(ServerConfig {
            data_dir: dir.path().to_owned(),
            ..ServerConfig::default()
        });
        let svc = Service::new(config, store, None).expect("the server starts");
        assert!(svc.group(&damaged).is_none());
        svc.close().await;
    }
}
