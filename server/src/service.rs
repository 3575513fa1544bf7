//! Request handling, independent of the transport.
//!
//! [`Service::handle`] takes one decoded [`Request`] and the [`Session`] of
//! the connection it came on, and returns the [`Response`]. The QUIC layer
//! ([`crate::server`]) only moves frames; everything here can be driven by a
//! test without a network.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use huddle_core::auth::{verify_proof, Purpose, EXPORTER_LEN};
use huddle_core::ids::check_user_name;
use huddle_core::mls::validate_key_package;
use huddle_core::proto::{
    ClaimedKeyPackage, ErrorBody, ErrorCode, GroupSummary, Request, Response, UserInfo,
    MAX_BATCH_USERS, MAX_KEY_PACKAGE_BATCH, MAX_PAGE,
};
use huddle_core::GroupId;
use openmls_rust_crypto::RustCrypto;
use rand::RngCore as _;
use tracing::{info, warn};

use crate::budget::Budgets;
use crate::config::ServerConfig;
use crate::group::{self, GroupHandle, Post, Shared};
use crate::hub::Hub;
use crate::store::{RegisterOutcome, Store, StoreError, StoredKeyPackage, UserRecord};
use crate::writer::Writer;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Per-connection authentication state.
#[derive(Debug)]
pub struct Session {
    /// Connection id, unique in this process.
    pub conn: u64,
    /// TLS exporter keying material of the connection (see
    /// [`huddle_core::auth`]).
    pub exporter: [u8; EXPORTER_LEN],
    /// The connection's budget for answers in flight ([`crate::budget`]).
    pub answers: Arc<tokio::sync::Semaphore>,
    state: Mutex<SessionState>,
}

#[derive(Debug, Default)]
struct SessionState {
    nonce: Option<[u8; 32]>,
    user: Option<String>,
    /// Counts this connection among its user's while it lives.
    _counted: Option<Counted>,
    /// Counts it among the unauthenticated ones until it authenticates.
    unauthenticated: Option<Uncounted>,
}

/// Counts one connection in a shared counter until dropped (and runs a
/// clean-up then, if one was given).
pub struct Uncounted {
    counter: Arc<std::sync::atomic::AtomicUsize>,
    then: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for Uncounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Uncounted")
    }
}

impl Uncounted {
    /// Counts one more in `counter`.
    pub fn new(counter: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            counter,
            then: None,
        }
    }

    /// Runs `f` too when it is dropped.
    pub fn and_then(mut self, f: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.then = Some(Box::new(f));
        self
    }
}

impl Drop for Uncounted {
    fn drop(&mut self) {
        self.counter
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(f) = self.then.take() {
            f();
        }
    }
}

/// Connections per user, shared by the sessions that count in it.
type UserCounts = Arc<Mutex<HashMap<String, usize>>>;

/// One connection counted for its user; uncounted on drop.
#[derive(Debug)]
struct Counted {
    counts: UserCounts,
    user: String,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("user connections lock");
        if let Some(n) = c.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.user);
            }
        }
    }
}

impl Session {
    /// A new, unauthenticated session, with `answers` as its budget for
    /// answers in flight.
    pub fn new(
        conn: u64,
        exporter: [u8; EXPORTER_LEN],
        answers: Arc<tokio::sync::Semaphore>,
    ) -> Self {
        Self {
            conn,
            exporter,
            answers,
            state: Mutex::new(SessionState::default()),
        }
    }

    /// Counts the session in `counter` until it authenticates.
    pub fn count_until_authenticated(&self, counter: Uncounted) {
        self.state.lock().expect("session lock").unauthenticated = Some(counter);
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<String> {
        self.state.lock().expect("session lock").user.clone()
    }

    fn require_user(&self) -> Result<String, ErrorBody> {
        self.user().ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::NotAuthenticated,
                "authenticate first (Challenge, then Register or Authenticate)",
            )
        })
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

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
    claims: Mutex<HashMap<String, Bucket>>,
    acks: Mutex<HashMap<(GroupId, String), u64>>,
    /// Serialises group creation so two creations of one id cannot race.
    create: tokio::sync::Mutex<()>,
    /// Serialises loading and unloading groups, so a group never has two
    /// tasks.
    loading: tokio::sync::Mutex<()>,
    /// Set at shutdown: groups are no longer loaded.
    closing: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

fn store_error(e: StoreError) -> ErrorBody {
    match e {
        StoreError::Full => ErrorBody::new(
            ErrorCode::QuotaExceeded,
            "the server's storage is full; nothing was stored",
        ),
        other => {
            warn!(error = %other, "storage failure");
            ErrorBody::new(ErrorCode::Internal, "storage failure; nothing was stored")
        }
    }
}

impl Service {
    /// Builds the service over `store` and starts a task per stored group.
    /// Must be called within a tokio runtime.
    pub fn new(config: Arc<ServerConfig>, store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let hub = Arc::new(Hub::default());
        let shared = Shared {
            store: store.clone(),
            writer: Writer::start(store.clone()),
            inboxes: hub.clone(),
            config: config.clone(),
            tail_bytes: Arc::default(),
            now_ms,
        };
        // Groups are loaded when first asked for, and unloaded when idle
        // (`unload_idle`): a DS holds in memory the groups in use, not
        // every group it stores.
        let groups = HashMap::new();
        Ok(Arc::new(Self {
            budgets: Budgets::new(&config),
            user_connections: Arc::default(),
            config,
            store,
            shared,
            groups: RwLock::new(groups),
            hub,
            claims: Mutex::new(HashMap::new()),
            acks: Mutex::new(HashMap::new()),
            create: tokio::sync::Mutex::new(()),
            loading: tokio::sync::Mutex::new(()),
            closing: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Bytes of entries kept in memory by all groups.
    pub fn tail_bytes(&self) -> usize {
        self.shared
            .tail_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The store (for blocking calls).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The task of group `id` if the group is in memory (see
    /// [`Service::load_group`]).
    pub fn group(&self, id: &GroupId) -> Option<Arc<GroupHandle>> {
        let h = self.groups.read().expect("groups lock").get(id).cloned();
        if let Some(h) = &h {
            h.touch(now_ms());
        }
        h
    }

    /// The task of group `id`, loading the group from the store if it is
    /// not in memory; `None` if there is no such group.
    pub async fn load_group(&self, id: &GroupId) -> Result<Option<Arc<GroupHandle>>, ErrorBody> {
        let loaded = || self.group(id).filter(|h| !h.is_stopped());
        if let Some(h) = loaded() {
            return Ok(Some(h));
        }
        let _loading = self.loading.lock().await;
        if let Some(h) = loaded() {
            return Ok(Some(h));
        }
        if self.closing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(ErrorBody::new(
                ErrorCode::Unavailable,
                "the server is shutting down",
            ));
        }
        let gid = *id;
        let Some(g) = self
            .blocking(move |s| s.group(&gid))
            .await?
            .map_err(store_error)?
        else {
            return Ok(None);
        };
        let info = match self.blocking(move |s| s.group_info(&gid)).await? {
            Ok(i) => i,
            Err(e) => {
                warn!(group = %gid, error = %e, "stored GroupInfo unreadable");
                None
            }
        };
        let handle = group::spawn(g.id, g.meta, &g.state, g.members, info, self.shared.clone())
            .map_err(|e| {
                tracing::error!(group = %gid, error = %e, "group not loaded");
                ErrorBody::new(
                    ErrorCode::Internal,
                    "the group's stored state does not load",
                )
            })?;
        self.groups
            .write()
            .expect("groups lock")
            .insert(gid, handle.clone());
        Ok(Some(handle))
    }

    /// Unloads the groups nobody watched or asked for during
    /// `group_idle`; they are loaded again when next asked for.
    pub async fn unload_idle(&self) {
        let before = now_ms().saturating_sub(self.config.group_idle.as_millis() as u64);
        let idle: Vec<(GroupId, Arc<GroupHandle>)> = self
            .groups
            .read()
            .expect("groups lock")
            .iter()
            .filter(|(_, h)| h.idle_since(before))
            .map(|(id, h)| (*id, h.clone()))
            .collect();
        for (id, h) in idle {
            let _loading = self.loading.lock().await;
            if !h.idle_since(before) {
                continue;
            }
            self.groups.write().expect("groups lock").remove(&id);
            // Finishes what it was given; a command that comes later finds
            // it stopped and goes to the group loaded anew.
            h.stop().await;
        }
    }

    /// Groups in memory now.
    pub fn loaded_groups(&self) -> usize {
        self.groups.read().expect("groups lock").len()
    }

    /// Whether `e` says a group's task stopped under a command while the
    /// server goes on (the group was unloaded): the command may be sent
    /// again.
    fn retry_after(&self, e: &ErrorBody) -> bool {
        e.code == ErrorCode::Unavailable
            && e.message == group::STOPPED
            && !self.closing.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> R + Send + 'static,
    ) -> Result<R, ErrorBody> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .map_err(|_| ErrorBody::new(ErrorCode::Internal, "internal error"))
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
            other => {
                let user = session.require_user()?;
                self.authenticated(session, user, other).await
            }
        }
    }

    fn take_nonce(&self, session: &Session) -> Result<[u8; 32], ErrorBody> {
        let mut st = session.state.lock().expect("session lock");
        if st.user.is_some() {
            return Err(ErrorBody::new(
                ErrorCode::OutOfOrder,
                "this connection is already authenticated",
            ));
        }
        st.nonce.take().ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::OutOfOrder,
                "request a Challenge on this connection first",
            )
        })
    }

    async fn register(
        &self,
        session: &Session,
        name: String,
        identity_key: [u8; 32],
        proof: Bytes,
    ) -> Result<Response, ErrorBody> {
        check_user_name(&name).map_err(|e| ErrorBody::new(ErrorCode::BadRequest, e.to_string()))?;
        let nonce = self.take_nonce(session)?;
        verify_proof(
            &identity_key,
            Purpose::Register,
            &name,
            &nonce,
            &session.exporter,
            &proof,
        )
        .map_err(|e| ErrorBody::new(ErrorCode::AuthFailed, format!("registration refused: {e}")))?;
        let record = UserRecord {
            identity_key,
            registered_ms: now_ms(),
        };
        let n = name.clone();
        let outcome = self
            .blocking(move |s| s.register_user(&n, &record))
            .await?
            .map_err(store_error)?;
        match outcome {
            RegisterOutcome::Created | RegisterOutcome::Existing => {
                if outcome == RegisterOutcome::Created {
                    info!(user = %name, "registered");
                }
                self.authenticated_as(session, &name)?;
                Ok(Response::Authenticated { name })
            }
            RegisterOutcome::Taken => Err(ErrorBody::new(
                ErrorCode::NameTaken,
                format!("the name {name} is registered to another key"),
            )),
        }
    }

    async fn authenticate(
        &self,
        session: &Session,
        name: String,
        proof: Bytes,
    ) -> Result<Response, ErrorBody> {
        check_user_name(&name).map_err(|e| ErrorBody::new(ErrorCode::BadRequest, e.to_string()))?;
        let nonce = self.take_nonce(session)?;
        let n = name.clone();
        let user = self
            .blocking(move |s| s.user(&n))
            .await?
            .map_err(store_error)?
            .ok_or_else(|| {
                ErrorBody::new(
                    ErrorCode::UnknownUser,
                    format!("no user is registered as {name}"),
                )
            })?;
        verify_proof(
            &user.identity_key,
            Purpose::Authenticate,
            &name,
            &nonce,
            &session.exporter,
            &proof,
        )
        .map_err(|e| {
            ErrorBody::new(
                ErrorCode::AuthFailed,
                format!("authentication as {name} refused: {e}"),
            )
        })?;
        self.authenticated_as(session, &name)?;
        Ok(Response::Authenticated { name })
    }

    /// Marks the session as `name`'s, within the user's connection limit.
    fn authenticated_as(&self, session: &Session, name: &str) -> Result<(), ErrorBody> {
        let max = self.config.max_connections_per_user;
        {
            let mut counts = self.user_connections.lock().expect("user connections lock");
            let n = counts.entry(name.to_owned()).or_insert(0);
            if *n >= max {
                return Err(ErrorBody::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "{name} has {max} connections open, the most this server allows per user"
                    ),
                ));
            }
            *n += 1;
        }
        let mut st = session.state.lock().expect("session lock");
        st.user = Some(name.to_owned());
        st.unauthenticated = None;
        st._counted = Some(Counted {
            counts: self.user_connections.clone(),
            user: name.to_owned(),
        });
        Ok(())
    }

    /// Open authenticated connections of `user`.
    pub fn connections_of(&self, user: &str) -> usize {
        self.user_connections
            .lock()
            .expect("user connections lock")
            .get(user)
            .copied()
            .unwrap_or(0)
    }

    async fn identity_key(&self, user: &str) -> Result<[u8; 32], ErrorBody> {
        let u = user.to_owned();
        self.blocking(move |s| s.user(&u))
            .await?
            .map_err(store_error)?
            .map(|r| r.identity_key)
            .ok_or_else(|| ErrorBody::new(ErrorCode::UnknownUser, format!("unknown user {user}")))
    }

    async fn group_or_err(&self, id: &GroupId) -> Result<Arc<GroupHandle>, ErrorBody> {
        self.load_group(id)
            .await?
            .ok_or_else(|| ErrorBody::new(ErrorCode::UnknownGroup, format!("no group {id}")))
    }

    fn not_member(user: &str, id: &GroupId) -> ErrorBody {
        ErrorBody::new(
            ErrorCode::NotMember,
            format!("{user} is not a member of group {id}"),
        )
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
            Request::KeyPackageCount => {
                let valid_until = self.key_packages_valid_until();
                let (available, last_resort) = self
                    .blocking(move |s| s.key_package_count(&user, valid_until))
                    .await?
                    .map_err(store_error)?;
                Ok(Response::KeyPackageCount {
                    available,
                    last_resort,
                })
            }
            Request::ClaimKeyPackages { users } => self.claim(user, users).await,
            Request::LookupUsers { names } => {
                if names.len() > MAX_BATCH_USERS {
                    return Err(ErrorBody::new(
                        ErrorCode::TooLarge,
                        format!("at most {MAX_BATCH_USERS} names per lookup"),
                    ));
                }
                let users = self
                    .blocking(move |s| -> Result<Vec<UserInfo>, StoreError> {
                        let mut out = Vec::new();
                        for name in names {
                            if let Some(u) = s.user(&name)? {
                                out.push(UserInfo {
                                    name,
                                    identity_key: u.identity_key,
                                });
                            }
                        }
                        Ok(out)
                    })
                    .await?
                    .map_err(store_error)?;
                Ok(Response::Users { users })
            }
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
            Request::FetchInbox { after, limit } => {
                let limit = limit.clamp(1, MAX_PAGE);
                // Asking for what follows `after` acknowledges the items up
                // to it: they are deleted.
                let (items, head) = self
                    .blocking(move |s| {
                        s.delete_inbox(&user, after.min(u64::MAX - 2))?;
                        s.read_inbox(&user, after, limit)
                    })
                    .await?
                    .map_err(store_error)?;
                Ok(Response::Inbox { items, head })
            }
            Request::RatchetTree { group, seq } => {
                let handle = self.group_or_err(&group).await?;
                let allowed = handle.with_view(|v| {
                    v.members
                        .get(&user)
                        .is_some_and(|m| m.joined_seq <= seq && seq <= m.readable_until(v.head))
                });
                if !allowed {
                    return Err(Self::not_member(&user, &group));
                }
                let tree = self
                    .blocking(move |s| s.tree(&group, seq))
                    .await?
                    .map_err(store_error)?
                    .ok_or_else(|| {
                        ErrorBody::new(
                            ErrorCode::NotFound,
                            format!("no tree kept for commit {seq}"),
                        )
                    })?;
                Ok(Response::RatchetTree { tree })
            }
            Request::PublishGroupInfo { group, group_info } => {
                let mut r = self
                    .group_or_err(&group)
                    .await?
                    .publish_group_info(user.clone(), group_info.clone())
                    .await;
                if r.as_ref().is_err_and(|e| self.retry_after(e)) {
                    r = self
                        .group_or_err(&group)
                        .await?
                        .publish_group_info(user, group_info)
                        .await;
                }
                let (seq, epoch) = r?;
                Ok(Response::Appended { seq, epoch })
            }
            Request::JoinInfo { group } => {
                let mut j = self
                    .group_or_err(&group)
                    .await?
                    .join_info(user.clone())
                    .await;
                if j.as_ref().is_err_and(|e| self.retry_after(e)) {
                    j = self.group_or_err(&group).await?.join_info(user).await;
                }
                let j = j?;
                Ok(Response::JoinInfo {
                    epoch: j.epoch,
                    group_info: j.group_info,
                    tree: j.tree,
                    head: j.head,
                })
            }
            Request::GroupState { group } => {
                let handle = self.group_or_err(&group).await?;
                let view = handle.view();
                if !view.is_member(&user) {
                    return Err(Self::not_member(&user, &group));
                }
                Ok(Response::GroupState {
                    epoch: view.epoch,
                    head: view.head,
                    members: view.current_members(),
                    group_info_epoch: view.group_info_epoch,
                })
            }
            Request::ListGroups => {
                let u = user.clone();
                let ids = self
                    .blocking(move |s| s.user_groups(&u))
                    .await?
                    .map_err(store_error)?;
                let mut groups = Vec::new();
                for id in ids {
                    if let Some(h) = self.load_group(&id).await? {
                        h.with_view(|v| {
                            if v.is_member(&user) {
                                groups.push(GroupSummary {
                                    group: id,
                                    epoch: v.epoch,
                                    head: v.head,
                                });
                            }
                        });
                    }
                }
                Ok(Response::Groups { groups })
            }
            Request::EpochAuthenticator { group, epoch, hash } => {
                let handle = self.group_or_err(&group).await?;
                let (member, current) = handle.with_view(|v| (v.is_member(&user), v.epoch));
                if !member {
                    return Err(Self::not_member(&user, &group));
                }
                if epoch > current {
                    return Err(ErrorBody::new(
                        ErrorCode::BadRequest,
                        format!("group {group} is only at epoch {current}"),
                    ));
                }
                let published = self
                    .blocking(move |s| s.publish_epoch_authenticator(&group, epoch, &user, hash))
                    .await?
                    .map_err(store_error)?;
                Ok(Response::EpochAuthenticators { published })
            }
            Request::Subscribe { .. } | Request::BeginUpload(_) | Request::Download { .. } => {
                let _ = session;
                Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    "this request is handled on its own stream",
                ))
            }
            Request::Challenge | Request::Register { .. } | Request::Authenticate { .. } => {
                unreachable!("handled before authentication")
            }
        }
    }

    async fn publish_key_packages(
        &self,
        user: String,
        key_packages: Vec<Bytes>,
        last_resort: Option<Bytes>,
    ) -> Result<Response, ErrorBody> {
        if key_packages.len() > MAX_KEY_PACKAGE_BATCH {
            return Err(ErrorBody::new(
                ErrorCode::TooLarge,
                format!("at most {MAX_KEY_PACKAGE_BATCH} key packages per upload"),
            ));
        }
        let max_bytes = self.config.max_key_package_bytes;
        if let Some(big) = key_packages
            .iter()
            .chain(last_resort.iter())
            .find(|kp| kp.len() > max_bytes)
        {
            return Err(ErrorBody::new(
                ErrorCode::TooLarge,
                format!(
                    "a key package of {} bytes; this server takes at most {max_bytes}",
                    big.len()
                ),
            ));
        }
        let identity = self.identity_key(&user).await?;
        let max = self.config.max_key_packages_per_user;
        let valid_until = self.key_packages_valid_until();
        self.blocking(move |s| -> Result<Response, ErrorBody> {
            let crypto = RustCrypto::default();
            let now = now_ms() / 1000;
            let mut checked = Vec::with_capacity(key_packages.len());
            for (i, kp) in key_packages.iter().enumerate() {
                let c = validate_key_package(&crypto, kp, &user, &identity, now).map_err(|e| {
                    ErrorBody::new(
                        ErrorCode::InvalidKeyPackage,
                        format!("key package {i}: {e}"),
                    )
                })?;
                if c.last_resort {
                    return Err(ErrorBody::new(
                        ErrorCode::InvalidKeyPackage,
                        format!("key package {i} is marked last-resort; send it as last_resort"),
                    ));
                }
                checked.push((
                    c.hash_ref,
                    StoredKeyPackage {
                        not_after: c.not_after,
                        bytes: kp.to_vec(),
                    },
                ));
            }
            let last_resort = match &last_resort {
                Some(lr) => {
                    let c =
                        validate_key_package(&crypto, lr, &user, &identity, now).map_err(|e| {
                            ErrorBody::new(
                                ErrorCode::InvalidKeyPackage,
                                format!("last-resort key package: {e}"),
                            )
                        })?;
                    if !c.last_resort {
                        return Err(ErrorBody::new(
                            ErrorCode::InvalidKeyPackage,
                            "the last-resort key package lacks the last_resort extension",
                        ));
                    }
                    Some(StoredKeyPackage {
                        not_after: c.not_after,
                        bytes: lr.to_vec(),
                    })
                }
                None => None,
            };
            s.add_key_packages(&user, &checked, last_resort.as_ref(), max, now)
                .map_err(|e| match e {
                    StoreError::Conflict(m) => ErrorBody::new(ErrorCode::QuotaExceeded, m),
                    other => store_error(other),
                })?;
            let (available, has_last_resort) = s
                .key_package_count(&user, valid_until)
                .map_err(store_error)?;
            Ok(Response::KeyPackageCount {
                available,
                last_resort: has_last_resort,
            })
        })
        .await?
    }

    /// Key packages count as available only if valid until then (seconds):
    /// a client tops up and replaces its last resort before they expire.
    fn key_packages_valid_until(&self) -> u64 {
        (now_ms() / 1000).saturating_add(self.config.key_package_min_validity.as_secs())
    }

    fn take_claim_tokens(&self, user: &str, n: usize) -> Result<(), ErrorBody> {
        let cap = f64::from(self.config.claims_per_minute.max(1));
        let mut claims = self.claims.lock().expect("claims lock");
        let now = Instant::now();
        let b = claims.entry(user.to_owned()).or_insert(Bucket {
            tokens: cap,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * cap / 60.0).min(cap);
        b.at = now;
        if b.tokens < n as f64 {
            return Err(ErrorBody::new(
                ErrorCode::RateLimited,
                format!(
                    "key package claims are limited to {} per minute; try again later",
                    self.config.claims_per_minute
                ),
            ));
        }
        b.tokens -= n as f64;
        Ok(())
    }

    async fn claim(&self, user: String, users: Vec<String>) -> Result<Response, ErrorBody> {
        if users.is_empty() || users.len() > MAX_BATCH_USERS {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                format!("claim between 1 and {MAX_BATCH_USERS} users at a time"),
            ));
        }
        let mut seen = HashSet::new();
        for u in &users {
            if !seen.insert(u.as_str()) {
                return Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    format!("{u} is listed twice"),
                ));
            }
        }
        self.take_claim_tokens(&user, users.len())?;
        let claimed = self
            .blocking(move |s| -> Result<Vec<ClaimedKeyPackage>, ErrorBody> {
                for u in &users {
                    if s.user(u).map_err(store_error)?.is_none() {
                        return Err(ErrorBody::new(
                            ErrorCode::UnknownUser,
                            format!("no user is registered as {u}"),
                        ));
                    }
                }
                // All or nothing: if anyone lacks a package, nothing is taken.
                let out = s
                    .claim_key_packages(&users, now_ms() / 1000)
                    .map_err(store_error)?;
                users
                    .into_iter()
                    .zip(out)
                    .map(|(u, c)| {
                        let c = c.ok_or_else(|| {
                            ErrorBody::new(
                                ErrorCode::NoKeyPackage,
                                format!("{u} has no usable key package on this server; nothing was claimed"),
                            )
                        })?;
                        Ok(ClaimedKeyPackage {
                            user: u,
                            key_package: c.bytes,
                            last_resort: c.last_resort,
                        })
                    })
                    .collect()
            })
            .await??;
        Ok(Response::KeyPackages { packages: claimed })
    }

    async fn create_group(
        &self,
        user: String,
        id: GroupId,
        group_info: Bytes,
        ratchet_tree: Bytes,
    ) -> Result<Response, ErrorBody> {
        if self.group(&id).is_some() {
            return Err(ErrorBody::new(
                ErrorCode::GroupExists,
                format!("group {id} exists"),
            ));
        }
        let key = self.identity_key(&user).await?;
        let u = user.clone();
        let (write, state) = tokio::task::spawn_blocking(move || {
            group::validate_new_group(id, &u, &key, &group_info, &ratchet_tree, now_ms())
        })
        .await
        .map_err(|_| ErrorBody::new(ErrorCode::Internal, "internal error"))??;
        let meta = write.meta.clone();
        let members = write.members.clone();
        let info = write.group_info.clone();
        let _guard = self.create.lock().await;
        if self.group(&id).is_some() {
            return Err(ErrorBody::new(
                ErrorCode::GroupExists,
                format!("group {id} exists"),
            ));
        }
        self.shared.writer.write(write).await.map_err(|e| match e {
            StoreError::Conflict(_) => {
                ErrorBody::new(ErrorCode::GroupExists, format!("group {id} exists"))
            }
            other => store_error(other),
        })?;
        let handle = group::spawn(id, meta, &state, members, info, self.shared.clone())
            .map_err(store_error)?;
        self.groups.write().expect("groups lock").insert(id, handle);
        info!(group = %id, creator = %user, "group created");
        Ok(Response::Appended { seq: 0, epoch: 0 })
    }

    async fn post(&self, user: String, group: GroupId, post: Post) -> Result<Response, ErrorBody> {
        let mut r = self
            .group_or_err(&group)
            .await?
            .post(user.clone(), post.clone())
            .await;
        // A post that reached a task being unloaded was not taken: it goes
        // to the group loaded anew.
        if r.as_ref().is_err_and(|e| self.retry_after(e)) {
            r = self.group_or_err(&group).await?.post(user, post).await;
        }
        let (seq, epoch) = r?;
        Ok(Response::Appended { seq, epoch })
    }

    async fn fetch_log(
        &self,
        user: String,
        group: GroupId,
        after: u64,
        limit: u32,
    ) -> Result<Response, ErrorBody> {
        let handle = self.group_or_err(&group).await?;
        let (member, head, compacted) =
            handle.with_view(|v| (v.members.get(&user).copied(), v.head, v.compacted));
        let Some(member) = member else {
            return Err(Self::not_member(&user, &group));
        };
        let until = member.readable_until(head);
        if !member.is_current() && after >= until {
            // It has read everything it may: compaction need not wait for
            // it any longer.
            self.ack(&user, group, until);
            return Err(ErrorBody::new(
                ErrorCode::NotMember,
                format!("{user} was removed from group {group} at {until}"),
            ));
        }
        let after = after.max(member.joined_seq);
        if after < compacted {
            return Err(ErrorBody::new(
                ErrorCode::Compacted,
                format!("entries up to {compacted} of group {group} were compacted"),
            ));
        }
        self.ack(&user, group, after);
        let limit = limit.clamp(1, MAX_PAGE);
        let entries = self
            .blocking(move |s| s.read_log(&group, after, until, limit))
            .await?
            .map_err(store_error)?;
        Ok(Response::Log {
            entries,
            head: until,
        })
    }

    /// Deletes Welcomes older than the inbox retention.
    pub async fn expire_inboxes(&self) {
        let before = now_ms().saturating_sub(self.config.inbox_retention.as_millis() as u64);
        match self.blocking(move |s| s.expire_inbox(before)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(items = n, "expired Welcomes deleted"),
            Ok(Err(e)) => warn!(error = %e, "expiring Welcomes failed"),
            Err(_) => {}
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

    /// Records that `user` processed `group` up to `seq` (flushed later by
    /// [`Service::flush_acks`]).
    pub fn ack(&self, user: &str, group: GroupId, seq: u64) {
        let Some(h) = self.group(&group) else { return };
        // A departed member acknowledges what it read up to its removal.
        let allowed = h.with_view(|v| {
            v.members
                .get(user)
                .is_some_and(|m| seq <= m.readable_until(v.head))
        });
        if !allowed {
            return;
        }
        let mut acks = self.acks.lock().expect("acks lock");
        let e = acks.entry((group, user.to_owned())).or_insert(0);
        *e = (*e).max(seq);
    }

    /// Writes the acknowledged positions gathered since the last call, in
    /// one transaction, then compacts logs every member has acknowledged.
    pub async fn flush_acks(&self) {
        let acks: Vec<_> = std::mem::take(&mut *self.acks.lock().expect("acks lock"))
            .into_iter()
            .map(|((g, u), s)| (g, u, s))
            .collect();
        if acks.is_empty() {
            return;
        }
        let touched: HashSet<GroupId> = acks.iter().map(|(g, _, _)| *g).collect();
        let r = self.blocking(move |s| s.save_cursors(&acks)).await;
        if let Ok(Err(e)) | Err(e) = r.map_err(|e| StoreError::Io(e.message)) {
            warn!(error = %e, "saving cursors failed");
            return;
        }
        let now = now_ms();
        let retention = self.config.departed_retention.as_millis() as u64;
        for g in touched {
            let Some(h) = self.group(&g) else { continue };
            let view = h.view();
            let floor = self
                .blocking(move |s| s.cursors(&g))
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|cursors| {
                    let c: HashMap<String, u64> = cursors.into_iter().collect();
                    view.members
                        .iter()
                        .filter_map(|(u, m)| {
                            let cursor = c.get(u).copied().unwrap_or(0).max(m.joined_seq);
                            m.holds_log(cursor, now, retention).then_some(cursor)
                        })
                        .min()
                        .unwrap_or(view.head)
                        .min(view.head)
                });
            if let Some(floor) = floor {
                if floor > view.compacted {
                    h.compact(floor);
                }
            }
        }
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
        let svc = Service::new(config, store).expect("the server starts");
        assert!(svc.group(&damaged).is_none());
        svc.close().await;
    }
}
