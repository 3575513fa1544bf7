//! Key packages: publishing and topping them up, the DS's count, and
//! identity keys of other users remembered on first sight.

use bytes::Bytes;
use huddle_core::mls::{self};
use huddle_core::proto::{Request, Response, UserInfo};
use openmls::prelude::{tls_codec::Serialize as _, *};

use crate::db::{self, Provider};
use crate::error::{ClientError, Result};

use super::{now_ms, Client, Status, KEY_PACKAGE_BATCH, KEY_PACKAGE_LOW};

impl Client {
    pub(super) async fn publish_key_packages(
        &mut self,
        n: usize,
        with_last_resort: bool,
    ) -> Result<u32> {
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
            server: self.server().to_owned(),
            servers: super::server_list(&self.settings.server)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            server_fingerprint: fp,
            name: self.identity.name.clone(),
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

    /// Remembers users' identity keys on first sight and refuses a key that
    /// changed (the DS binds names to keys; a change means the DS lies or
    /// the user re-registered).
    pub(super) fn check_known_keys(&self, users: &[UserInfo]) -> Result<()> {
        for u in users {
            match db::users::known_key(&self.db, &u.name)? {
                Some(k) if k != u.identity_key => {
                    return Err(ClientError::KeyChanged {
                        user: u.name.clone(),
                        was: huddle_core::auth::key_fingerprint(&k.try_into().unwrap_or([0; 32])),
                        now: huddle_core::auth::key_fingerprint(&u.identity_key),
                    })
                }
                Some(_) => {}
                None => db::users::remember(&self.db, &u.name, &u.identity_key, now_ms())?,
            }
        }
        Ok(())
    }
}
