//! Users' devices: link requests from new devices, the signed device log
//! (PROTOCOL.md 10.5), and the groups a new device may join.

use bytes::Bytes;
use huddle_core::auth::{verify_proof, Purpose};
use huddle_core::devices::{parse_principal, principal, DeviceChange, DeviceError, DeviceSet};
use huddle_core::ids::check_user_name;
use huddle_core::proto::{ErrorBody, ErrorCode, GroupSummary, Response};
use huddle_core::GroupId;
use rand::Rng as _;
use tracing::info;

use crate::store::{DeviceWrite, PendingLink, StoreError, UserRecord};

use super::{Service, Session};

/// A user's devices as the DS holds them.
pub(super) struct Devices {
    pub(super) root_key: [u8; 32],
    pub(super) entries: Vec<Bytes>,
    pub(super) set: DeviceSet,
}

fn bad(m: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::BadRequest, m)
}

impl Service {
    /// `user`'s device log, replayed; `None` if no such user.
    pub(super) async fn devices_of(&self, user: &str) -> Result<Option<Devices>, ErrorBody> {
        let u = user.to_owned();
        let found = self
            .blocking(move |s| -> Result<_, StoreError> {
                let Some(root) = s.registered(&u)? else {
                    return Ok(None);
                };
                Ok(Some((root.identity_key, s.device_log(&u)?)))
            })
            .await?
            .map_err(ErrorBody::from)?;
        let Some((root_key, entries)) = found else {
            return Ok(None);
        };
        // Every entry was checked, signature included, when it was
        // appended: replaying it again checks the rest (cheap), and a log
        // that does not replay now is damaged storage.
        let set = DeviceSet::replay_stored(user, root_key, &entries).map_err(|e| {
            tracing::error!(%user, error = %e, "stored device log does not replay");
            ErrorBody::new(ErrorCode::Internal, "the stored device log is damaged")
        })?;
        Ok(Some(Devices {
            root_key,
            entries,
            set,
        }))
    }

    /// A new device asks to be linked to `user`.
    pub(super) async fn request_link(
        &self,
        session: &Session,
        user: String,
        device_key: [u8; 32],
        proof: Bytes,
    ) -> Result<Response, ErrorBody> {
        check_user_name(&user).map_err(|e| bad(e.to_string()))?;
        let nonce = self.take_nonce(session)?;
        verify_proof(
            &device_key,
            Purpose::Link,
            &user,
            &nonce,
            &session.exporter,
            &proof,
        )
        .map_err(|e| ErrorBody::new(ErrorCode::AuthFailed, format!("link request refused: {e}")))?;
        let devices = self.devices_of(&user).await?.ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::UnknownUser,
                format!("no user is registered as {user}"),
            )
        })?;
        if devices.set.device_of_key(&device_key).is_some() {
            return Err(bad(format!("this key is a device of {user} already")));
        }
        let now = self.now_ms();
        let link = PendingLink {
            device_key,
            expires_ms: now.saturating_add(
                u64::try_from(self.config.link_ttl.as_millis()).unwrap_or(u64::MAX),
            ),
        };
        let max = self.config.max_pending_links_per_user;
        // Eight random digits; a taken one is drawn again.
        for _ in 0..4 {
            let code = format!("{:08}", rand::thread_rng().gen_range(0..100_000_000u32));
            let (u, c, l) = (user.clone(), code.clone(), link.clone());
            match self
                .blocking(move |s| s.put_link(&u, &c, &l, now, max))
                .await?
            {
                Ok(()) => {
                    info!(%user, "device link requested");
                    return Ok(Response::LinkCode {
                        code,
                        expires_ms: link.expires_ms,
                    });
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ErrorBody::new(ErrorCode::Internal, "no free link code"))
    }

    /// The key behind `code`, for a device of the same user.
    pub(super) async fn pending_link(
        &self,
        caller: String,
        code: String,
    ) -> Result<Response, ErrorBody> {
        let code = normalise_code(&code)?;
        let user = user_of_caller(&caller)?;
        let now = self.now_ms();
        let link = self
            .blocking(move |s| s.link(&user, &code, now))
            .await?
            .map_err(ErrorBody::from)?
            .ok_or_else(|| {
                ErrorBody::new(
                    ErrorCode::NotFound,
                    "no device is waiting with this code (it may have lapsed; run link again)",
                )
            })?;
        Ok(Response::PendingLink {
            device_key: link.device_key,
            expires_ms: link.expires_ms,
        })
    }

    /// Appends an entry signed by the caller's device to its user's log.
    pub(super) async fn append_device(
        &self,
        caller: String,
        entry: Bytes,
        code: Option<String>,
        viewer: Option<String>,
    ) -> Result<Response, ErrorBody> {
        let (user, me) = parse_principal(&caller)
            .map(|(u, d)| (u.to_owned(), d))
            .ok_or_else(|| bad("the caller is not a device"))?;
        let mut devices = self
            .devices_of(&user)
            .await?
            .ok_or_else(|| ErrorBody::new(ErrorCode::UnknownUser, "no such user"))?;
        let statement = huddle_core::devices::decode_entry(&entry)
            .map_err(|e| ErrorBody::new(ErrorCode::InvalidMessage, e.to_string()))?
            .statement;
        if statement.signer != me {
            return Err(ErrorBody::new(
                ErrorCode::InvalidMessage,
                format!(
                    "the entry is signed as device {}, but this connection is device {me}",
                    statement.signer
                ),
            ));
        }
        devices
            .set
            .apply(&entry, self.config.max_devices_per_user)
            .map_err(|e| match e {
                DeviceError::Limit(m) => ErrorBody::new(ErrorCode::QuotaExceeded, m),
                DeviceError::OutOfOrder { .. } | DeviceError::BrokenChain(_) => ErrorBody::new(
                    ErrorCode::OutOfOrder,
                    format!("{e}: the device log changed; fetch it and sign again"),
                ),
                other => ErrorBody::new(ErrorCode::InvalidMessage, other.to_string()),
            })?;
        let (owned, changed) = match statement.change {
            DeviceChange::Add { device, key } => {
                let code = normalise_code(code.as_deref().unwrap_or(""))?;
                let (u, c, now) = (user.clone(), code.clone(), self.now_ms());
                let link = self
                    .blocking(move |s| s.link(&u, &c, now))
                    .await?
                    .map_err(ErrorBody::from)?;
                if link.map(|l| l.device_key) != Some(key) {
                    return Err(ErrorBody::new(
                        ErrorCode::InvalidMessage,
                        "no device with this key is waiting with this code: \
                         a device is added only when it asked to be",
                    ));
                }
                let record = UserRecord {
                    identity_key: key,
                    registered_ms: self.now_ms(),
                };
                let p = principal(&user, device);
                (OwnedWrite::Add(p.clone(), record, code), p)
            }
            DeviceChange::Remove { device } => {
                let p = principal(&user, device);
                (OwnedWrite::Remove(p.clone()), p)
            }
        };
        let (u, e, seq) = (user.clone(), entry.clone(), statement.seq);
        let appended = self
            .blocking(move |s| s.append_device(&u, seq, &e, owned.as_write()))
            .await?
            .map_err(ErrorBody::from)?;
        if !appended {
            return Err(ErrorBody::new(
                ErrorCode::OutOfOrder,
                "the device log changed; fetch it and sign again",
            ));
        }
        if matches!(statement.change, DeviceChange::Remove { .. }) {
            self.revoked
                .lock()
                .expect("revoked lock")
                .insert(changed.clone());
        }
        info!(%user, device = %changed, by = me, "device log appended");
        self.devices(user, viewer).await
    }

    /// `user`'s device log; with last-seen times only for a `viewer` who
    /// is one of the user's own devices (when a device was last online is
    /// nobody else's business).
    pub(super) async fn devices(
        &self,
        user: String,
        viewer: Option<String>,
    ) -> Result<Response, ErrorBody> {
        check_user_name(&user).map_err(|e| bad(e.to_string()))?;
        let d = self.devices_of(&user).await?.ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::UnknownUser,
                format!("no user is registered as {user}"),
            )
        })?;
        let own = viewer
            .as_deref()
            .is_some_and(|v| huddle_core::devices::user_part(v) == user);
        let principals: Vec<(u32, String)> = if own {
            d.set
                .devices()
                .map(|dev| (dev.device, principal(&user, dev.device)))
                .collect()
        } else {
            Vec::new()
        };
        let last_seen = self
            .blocking(move |s| -> Result<Vec<(u32, u64)>, StoreError> {
                let mut out = Vec::new();
                for (n, p) in principals {
                    if let Some(ms) = s.last_seen(&p)? {
                        out.push((n, ms));
                    }
                }
                Ok(out)
            })
            .await?
            .map_err(ErrorBody::from)?;
        Ok(Response::Devices {
            user,
            root_key: d.root_key,
            entries: d.entries,
            last_seen,
        })
    }

    /// Groups the caller may join because another of its user's devices
    /// is a member.
    pub(super) async fn user_groups(&self, caller: String) -> Result<Response, ErrorBody> {
        let user = user_of_caller(&caller)?;
        let d = self
            .devices_of(&user)
            .await?
            .ok_or_else(|| ErrorBody::new(ErrorCode::UnknownUser, "no such user"))?;
        let others: Vec<String> = d
            .set
            .principals()
            .into_iter()
            .filter(|p| *p != caller)
            .collect();
        let ids = self
            .blocking(move |s| -> Result<Vec<GroupId>, StoreError> {
                let mut ids = Vec::new();
                for p in others {
                    ids.extend(s.user_groups(&p)?);
                }
                ids.sort();
                ids.dedup();
                Ok(ids)
            })
            .await?
            .map_err(ErrorBody::from)?;
        let mut groups = Vec::new();
        for id in ids {
            if let Some(h) = self.load_group(&id).await? {
                self.fresh(&h, &caller).await;
                h.with_view(|v| {
                    if v.may_join(&caller) {
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
}

/// [`DeviceWrite`] with owned parts, to move into a blocking task.
enum OwnedWrite {
    Add(String, UserRecord, String),
    Remove(String),
}

impl OwnedWrite {
    fn as_write(&self) -> DeviceWrite<'_> {
        match self {
            Self::Add(p, r, c) => DeviceWrite::Add {
                principal: p,
                record: r,
                code: c,
            },
            Self::Remove(p) => DeviceWrite::Remove { principal: p },
        }
    }
}

fn user_of_caller(caller: &str) -> Result<String, ErrorBody> {
    parse_principal(caller)
        .map(|(u, _)| u.to_owned())
        .ok_or_else(|| bad("the caller is not a device"))
}

/// A code as typed: eight digits, with or without a dash or spaces.
fn normalise_code(code: &str) -> Result<String, ErrorBody> {
    let digits: String = code.chars().filter(|c| !matches!(c, '-' | ' ')).collect();
    if digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(digits)
    } else {
        Err(bad(
            "a link code is eight digits, as the new device shows it",
        ))
    }
}
