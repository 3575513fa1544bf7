//! The key-package directory: publishing (checked, bounded per user),
//! counting, claiming under a per-user rate limit, and user lookups.

use std::collections::HashSet;

use bytes::Bytes;
use huddle_core::mls::validate_key_package;
use huddle_core::proto::{
    ClaimedKeyPackage, ErrorBody, ErrorCode, Response, UserInfo, MAX_BATCH_USERS,
    MAX_KEY_PACKAGE_BATCH,
};
use openmls_rust_crypto::RustCrypto;

use crate::store::{StoreError, StoredKeyPackage};

use super::Service;

impl Service {
    /// How many one-time key packages `user` has left, and whether a last-resort one is kept.
    pub(super) async fn key_package_count(&self, user: String) -> Result<Response, ErrorBody> {
        let valid_until = self.key_packages_valid_until();
        let (available, last_resort) = self
            .blocking(move |s| s.key_package_count(&user, valid_until))
            .await?
            .map_err(ErrorBody::from)?;
        Ok(Response::KeyPackageCount {
            available,
            last_resort,
        })
    }

    /// The identity keys of registered users among `names`.
    pub(super) async fn lookup_users(&self, names: Vec<String>) -> Result<Response, ErrorBody> {
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
            .map_err(ErrorBody::from)?;
        Ok(Response::Users { users })
    }

    pub(super) async fn publish_key_packages(
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
        let clock = self.config.clock;
        self.blocking(move |s| -> Result<Response, ErrorBody> {
            let crypto = RustCrypto::default();
            let now = clock() / 1000;
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
                    other => ErrorBody::from(other),
                })?;
            let (available, has_last_resort) = s
                .key_package_count(&user, valid_until)
                .map_err(ErrorBody::from)?;
            Ok(Response::KeyPackageCount {
                available,
                last_resort: has_last_resort,
            })
        })
        .await?
    }

    /// Key packages count as available only if valid until then (seconds):
    /// a client tops up and replaces its last resort before they expire.
    pub(super) fn key_packages_valid_until(&self) -> u64 {
        (self.now_ms() / 1000).saturating_add(self.config.key_package_min_validity.as_secs())
    }

    /// Takes `n` claim tokens from the caller's user: all its devices
    /// share one budget.
    pub(super) fn take_claim_tokens(&self, caller: &str, n: usize) -> Result<(), ErrorBody> {
        let user = huddle_core::devices::user_part(caller);
        if !self.claims.take(user, n, self.now_ms()) {
            return Err(ErrorBody::new(
                ErrorCode::RateLimited,
                format!(
                    "key package claims are limited to {} per minute per user (all its devices together); try again later",
                    self.config.claims_per_minute
                ),
            ));
        }
        Ok(())
    }

    pub(super) async fn claim(
        &self,
        user: String,
        users: Vec<String>,
    ) -> Result<Response, ErrorBody> {
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
        let clock = self.config.clock;
        let claimed = self
            .blocking(move |s| -> Result<Vec<ClaimedKeyPackage>, ErrorBody> {
                for u in &users {
                    if s.user(u).map_err(ErrorBody::from)?.is_none() {
                        return Err(ErrorBody::new(
                            ErrorCode::UnknownUser,
                            format!("no user is registered as {u}"),
                        ));
                    }
                }
                // All or nothing: if anyone lacks a package, nothing is taken.
                let out = s
                    .claim_key_packages(&users, clock() / 1000)
                    .map_err(ErrorBody::from)?;
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
}
