//! Registration and authentication: the challenge, the proof over the
//! connection's TLS exporter, binding a name to an identity key.

use bytes::Bytes;
use huddle_core::auth::{verify_proof, Purpose};
use huddle_core::ids::check_user_name;
use huddle_core::proto::{ErrorBody, ErrorCode, Response};
use tracing::info;

use crate::store::{RegisterOutcome, UserRecord};

use super::{Counted, Service, Session};

impl Service {
    pub(super) fn take_nonce(&self, session: &Session) -> Result<[u8; 32], ErrorBody> {
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

    pub(super) async fn register(
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
            registered_ms: self.now_ms(),
        };
        let n = name.clone();
        let outcome = self
            .blocking(move |s| s.register_user(&n, &record))
            .await?
            .map_err(ErrorBody::from)?;
        match outcome {
            RegisterOutcome::Created | RegisterOutcome::Existing => {
                if outcome == RegisterOutcome::Created {
                    info!(user = %name, "registered");
                }
                self.authenticated_as(session, &name)?;
                self.record_seen(&name).await;
                Ok(Response::Authenticated { name })
            }
            RegisterOutcome::Taken => Err(ErrorBody::new(
                ErrorCode::NameTaken,
                format!("the name {name} is registered to another key"),
            )),
        }
    }

    pub(super) async fn authenticate(
        &self,
        session: &Session,
        name: String,
        proof: Bytes,
    ) -> Result<Response, ErrorBody> {
        if huddle_core::devices::parse_principal(&name).is_none() {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                format!("{name:?} is neither a user name nor a device (USER/N)"),
            ));
        }
        let nonce = self.take_nonce(session)?;
        let n = name.clone();
        let (user, revoked) = self
            .blocking(move |s| -> Result<_, crate::store::StoreError> {
                let user = s.user(&n)?;
                let revoked = user.is_none() && s.registered(&n)?.is_some();
                Ok((user, revoked))
            })
            .await?
            .map_err(ErrorBody::from)?;
        let user = user.ok_or_else(|| {
            if revoked {
                ErrorBody::new(
                    ErrorCode::AuthFailed,
                    format!(
                        "{name} is a revoked device: another device of {} revoked it",
                        huddle_core::devices::user_part(&name)
                    ),
                )
            } else {
                ErrorBody::new(
                    ErrorCode::UnknownUser,
                    format!("no user is registered as {name}"),
                )
            }
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
        self.record_seen(&name).await;
        Ok(Response::Authenticated { name })
    }

    /// Records that `name` authenticated now (best effort: a failure only
    /// leaves `device list` an older time).
    async fn record_seen(&self, name: &str) {
        let (n, now) = (name.to_owned(), self.now_ms());
        if let Ok(Err(e)) = self.blocking(move |s| s.seen(&n, now)).await {
            tracing::debug!(user = %name, error = %e, "last-seen time not recorded");
        }
    }

    /// Marks the session as `name`'s, within the user's connection limit.
    pub(super) fn authenticated_as(&self, session: &Session, name: &str) -> Result<(), ErrorBody> {
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

    pub(super) async fn identity_key(&self, user: &str) -> Result<[u8; 32], ErrorBody> {
        let u = user.to_owned();
        self.blocking(move |s| s.user(&u))
            .await?
            .map_err(ErrorBody::from)?
            .map(|r| r.identity_key)
            .ok_or_else(|| ErrorBody::new(ErrorCode::UnknownUser, format!("unknown user {user}")))
    }
}
