//! This user's devices and other users' (PROTOCOL.md 10.5): linking a new
//! device, approving and revoking one, the device logs of the users this
//! device meets, and joining the user's groups from a new device.

use std::time::Duration;

use huddle_core::auth::{proof_message, Purpose, EXPORTER_LEN};
use huddle_core::devices::{self as dev, DeviceChange, DeviceSet};
use huddle_core::proto::{ErrorCode, Request, Response, EXPORTER_LABEL};
use huddle_core::GroupId;
use tracing::{debug, info, warn};

use super::{connect_any, now_ms, server_list, Client, KEY_PACKAGE_BATCH};
use crate::db;
use crate::error::{ClientError, Result};
use crate::event::Event;
use crate::home::{Home, Settings};
use crate::identity::Identity;
use crate::lock::Locks;
use crate::net::{Connection as Net, Trust};

/// How often a device being linked asks whether it was approved.
pub const LINK_POLL: Duration = Duration::from_millis(500);

/// What a new device shows while it waits to be approved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkCode {
    /// The code to type on an existing device (`1234-5678`).
    pub code: String,
    /// This device's key fingerprint, to compare on the approving device.
    pub fingerprint: String,
}

/// One device as `device list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceListing {
    /// Its number.
    pub device: u32,
    /// Its principal (`alice`, `alice/2`).
    pub principal: String,
    /// Its key fingerprint.
    pub fingerprint: String,
    /// When it last authenticated (ms since the Unix epoch), as the DS
    /// knows.
    pub last_seen: Option<u64>,
    /// Whether it is this device.
    pub this_device: bool,
}

fn show_code(code: &str) -> String {
    if code.len() == 8 {
        format!("{}-{}", &code[..4], &code[4..])
    } else {
        code.to_owned()
    }
}

impl Client {
    /// Makes `home` a new device of `user` on `server`: asks the DS for a
    /// link code, hands it (and this device's fingerprint) to `show`, then
    /// waits until an existing device approves it or the request lapses.
    /// Once approved, publishes key packages and joins the user's groups.
    pub async fn link(
        home: Home,
        user: &str,
        server: &str,
        server_cert: Option<&std::path::Path>,
        show: impl FnOnce(&LinkCode),
    ) -> Result<(Client, Vec<Event>)> {
        let (trust, key) = super::new_device_key(&home, user, server_cert)?;
        let public = key.public();
        let addrs = server_list(server);
        let (net, mut current) = connect_any(None, &addrs, 0, &trust).await?;
        let endpoint = net.endpoint().clone();
        home.pin_cert(&net.server_cert)?;
        let pinned = Trust::Pinned(vec![net.server_cert.clone()]);
        let mut device = find_device(&net, user, &public).await?;
        if device.is_none() {
            let code = request_link(&net, &key, user).await?;
            show(&LinkCode {
                code: show_code(&code.0),
                fingerprint: dev::fingerprint(&public),
            });
            let until = code.1;
            let mut net = Some(net);
            while device.is_none() {
                if now_ms() > until {
                    return Err(ClientError::Usage(
                        "no device approved this one before the code lapsed; run `huddle link` again"
                            .into(),
                    ));
                }
                tokio::time::sleep(LINK_POLL).await;
                // A connection that does not authenticate is closed by the
                // DS after a while: open another when it is gone.
                if net
                    .as_ref()
                    .is_none_or(|n| n.quic().close_reason().is_some())
                {
                    let (n, c) = connect_any(Some(&endpoint), &addrs, current, &pinned).await?;
                    current = c;
                    net = Some(n);
                }
                let n = net.as_ref().expect("connected above");
                match find_device(n, user, &public).await {
                    Ok(d) => device = d,
                    Err(e @ ClientError::Connect { .. }) => {
                        debug!(error = %e, "link poll failed; trying again");
                        net = None;
                    }
                    Err(e) => return Err(e),
                }
            }
            if let Some(n) = net {
                n.close().await;
            }
        } else {
            net.close().await;
        }
        let device = device.expect("found above");
        let settings = Settings {
            name: user.to_owned(),
            server: server.to_owned(),
            device,
        };
        let identity = Identity::from_seed(&settings.principal(), key.seed());
        home.save_settings(&settings)?;
        info!(user, device, "linked");
        let db = db::open(&home.db_path())?;
        let mut client = Client {
            locks: Locks::new(home.locks_dir()),
            home,
            settings,
            identity,
            db,
            crypto: openmls_rust_crypto::RustCrypto::default(),
            net: None,
            endpoint: Some(endpoint),
            current,
            devices: Default::default(),
            fresh_devices: Default::default(),
            need_devices: Vec::new(),
        };
        client.publish_key_packages(KEY_PACKAGE_BATCH, true).await?;
        db::settings::set(&client.db, "join_user_groups", 1)?;
        let events = client.join_user_groups().await?;
        Ok((client, events))
    }

    /// The key and fingerprint of the device waiting with `code`.
    pub async fn pending_device(&mut self, code: &str) -> Result<([u8; 32], String)> {
        match self
            .request(&Request::PendingLink {
                code: code.to_owned(),
            })
            .await?
        {
            Response::PendingLink { device_key, .. } => {
                Ok((device_key, dev::fingerprint(&device_key)))
            }
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Approves the device waiting with `code` whose key is `key` (as
    /// [`Client::pending_device`] returned it): signs its addition to this
    /// user's device log. Returns its number.
    pub async fn approve_device(&mut self, code: &str, key: [u8; 32]) -> Result<u32> {
        let set = self.verified_devices(&self.settings.name.clone()).await?;
        let device = set.next_device();
        let entry = set.next_entry(
            self.settings.device,
            self.identity.signing_key(),
            DeviceChange::Add { device, key },
            now_ms(),
        );
        let code: String = code.chars().filter(|c| c.is_ascii_digit()).collect();
        self.append_device(entry, Some(code)).await?;
        Ok(device)
    }

    /// Revokes this user's device `device`: no longer let in by the DS, and
    /// removed from every group this device is in. Returns the events of
    /// the removals.
    pub async fn remove_device(&mut self, device: u32) -> Result<Vec<Event>> {
        if device == self.settings.device {
            return Err(ClientError::Usage(
                "a device cannot revoke itself; revoke it from another of your devices".into(),
            ));
        }
        let user = self.settings.name.clone();
        let set = self.verified_devices(&user).await?;
        if set.key(device).is_none() {
            return Err(ClientError::Usage(format!(
                "{user} has no current device {device} (see `huddle device list`)"
            )));
        }
        let entry = set.next_entry(
            self.settings.device,
            self.identity.signing_key(),
            DeviceChange::Remove { device },
            now_ms(),
        );
        self.append_device(entry, None).await?;
        let principal = dev::principal(&user, device);
        let mut events = Vec::new();
        for (id, state) in self.group_ids()? {
            if !matches!(
                state,
                crate::db::groups::GroupState::Active | crate::db::groups::GroupState::Leaving
            ) {
                continue;
            }
            match self
                .remove_principals(
                    &id,
                    std::slice::from_ref(&principal),
                    (
                        super::membership::Change::DevicesRemoved,
                        vec![principal.clone()],
                    ),
                )
                .await
            {
                Ok(ev) => events.extend(ev),
                Err(ClientError::Usage(_)) => {} // not in this group
                Err(e) if e.is_connection() => return Err(e),
                Err(e) => {
                    warn!(group = %id, error = %e, "could not remove the revoked device");
                    events.push(self.failure(&id, &e));
                }
            }
        }
        Ok(events)
    }

    /// This user's devices.
    pub async fn device_list(&mut self) -> Result<Vec<DeviceListing>> {
        let user = self.settings.name.clone();
        let (set, seen) = self.fetch_devices(&user).await?;
        Ok(set
            .devices()
            .map(|d| DeviceListing {
                device: d.device,
                principal: dev::principal(&user, d.device),
                fingerprint: dev::fingerprint(&d.key),
                last_seen: seen.iter().find(|(n, _)| *n == d.device).map(|(_, t)| *t),
                this_device: d.device == self.settings.device,
            })
            .collect())
    }

    async fn append_device(&mut self, entry: Vec<u8>, code: Option<String>) -> Result<()> {
        match self
            .request(&Request::AppendDevice {
                entry: entry.into(),
                code,
            })
            .await?
        {
            Response::Devices { .. } => {
                // Read it back through the checks every member applies.
                let user = self.settings.name.clone();
                self.devices.remove(&user);
                self.verified_devices(&user).await?;
                Ok(())
            }
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// `user`'s device log from the DS, replayed from the key this device
    /// first saw for `user` (trust on first use, as for every identity
    /// key), with when each device was last seen.
    pub(super) async fn fetch_devices(
        &mut self,
        user: &str,
    ) -> Result<(DeviceSet, Vec<(u32, u64)>)> {
        let Response::Devices {
            user: named,
            root_key,
            entries,
            last_seen,
        } = self
            .request(&Request::Devices {
                user: user.to_owned(),
            })
            .await?
        else {
            return Err(ClientError::Protocol("expected Devices".into()));
        };
        if named != user {
            return Err(ClientError::Protocol(format!(
                "asked for the devices of {user}, got {named}'s"
            )));
        }
        self.check_known_keys(&[huddle_core::proto::UserInfo {
            name: user.to_owned(),
            identity_key: root_key,
        }])?;
        let seen = db::users::device_log_seen(&self.db, user)?;
        let set = replay_extending(user, root_key, &entries, seen)?;
        db::users::saw_device_log(&self.db, user, set.len(), &set.head())?;
        self.devices.insert(user.to_owned(), set.clone());
        self.fresh_devices.insert(user.to_owned());
        Ok((set, last_seen))
    }

    /// `user`'s current devices, from the DS, checked.
    pub(super) async fn verified_devices(&mut self, user: &str) -> Result<DeviceSet> {
        Ok(self.fetch_devices(user).await?.0)
    }

    /// Joins, by external commits, the groups another device of this
    /// user is in and this one is not. Until every such group is joined
    /// (a GroupInfo for the group's current epoch may not be published
    /// yet), every `sync` tries again.
    pub async fn join_user_groups(&mut self) -> Result<Vec<Event>> {
        if db::settings::get(&self.db, "join_user_groups")? == 0 {
            return Ok(Vec::new());
        }
        let Response::Groups { groups } = self.request(&Request::UserGroups).await? else {
            return Err(ClientError::Protocol("expected Groups".into()));
        };
        let mut events = Vec::new();
        let mut waiting = 0;
        for g in groups {
            match self.join_as_device(&g.group).await {
                Ok(ev) => events.extend(ev),
                Err(ClientError::Server(e))
                    if matches!(e.code, ErrorCode::NotFound | ErrorCode::NotMember) =>
                {
                    debug!(group = %g.group, error = %e.message, "cannot join this group yet");
                    waiting += 1;
                }
                Err(e) if e.is_connection() => return Err(e),
                Err(e) => {
                    warn!(group = %g.group, error = %e, "joining a group of this user failed");
                    events.push(self.failure(&g.group, &e));
                    waiting += 1;
                }
            }
        }
        if waiting == 0 {
            db::settings::set(&self.db, "join_user_groups", 0)?;
        }
        Ok(events)
    }

    async fn join_as_device(&mut self, id: &GroupId) -> Result<Vec<Event>> {
        self.join_externally(
            id,
            "this device was linked to its user",
            super::recovery::Join::Device,
        )
        .await
    }
}

/// The number of `user`'s current device whose key is `key`, if any,
/// asked on a connection that need not be authenticated.
async fn find_device(net: &Net, user: &str, key: &[u8; 32]) -> Result<Option<u32>> {
    match net
        .request(&Request::Devices {
            user: user.to_owned(),
        })
        .await?
    {
        Response::Devices {
            root_key, entries, ..
        } => {
            let set = DeviceSet::replay(user, root_key, &entries).map_err(|e| {
                ClientError::Protocol(format!("the device log of {user} is refused: {e}"))
            })?;
            Ok(set.device_of_key(key))
        }
        other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
    }
}

/// Asks for a link code: (code, when it lapses).
async fn request_link(net: &Net, key: &Identity, user: &str) -> Result<(String, u64)> {
    let Response::Challenge { nonce } = net.request(&Request::Challenge).await? else {
        return Err(ClientError::Protocol("expected a Challenge".into()));
    };
    let mut exporter = [0u8; EXPORTER_LEN];
    net.quic()
        .export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .map_err(|_| ClientError::Protocol("TLS exporter unavailable".into()))?;
    let proof = key.sign_raw(&proof_message(Purpose::Link, user, &nonce, &exporter));
    match net
        .request(&Request::RequestLink {
            user: user.to_owned(),
            device_key: key.public(),
            proof: proof.into(),
        })
        .await?
    {
        Response::LinkCode { code, expires_ms } => Ok((code, expires_ms)),
        other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
    }
}

/// Replays `user`'s device log, which must extend the longest one this
/// device saw (`seen`: its length and head): a DS that serves an older log
/// (to hide a revocation) or another one is refused.
pub(crate) fn replay_extending(
    user: &str,
    root_key: [u8; 32],
    entries: &[bytes::Bytes],
    seen: Option<(u32, [u8; 32])>,
) -> Result<DeviceSet> {
    let refused =
        |e: String| ClientError::Protocol(format!("the device log of {user} is refused: {e}"));
    if entries.len() > dev::MAX_LOG_ENTRIES {
        return Err(refused(format!("{} entries", entries.len())));
    }
    let mut set = DeviceSet::new(user, root_key);
    let check = |set: &DeviceSet| match seen {
        Some((len, head)) if set.len() == len && set.head() != head => Err(refused(format!(
            "it is not the log seen before: it differs within its first {len} entries"
        ))),
        _ => Ok(()),
    };
    check(&set)?;
    for e in entries {
        set.apply(e, dev::MAX_DEVICES)
            .map_err(|e| refused(e.to_string()))?;
        check(&set)?;
    }
    if let Some((len, _)) = seen {
        if set.len() < len {
            return Err(refused(format!(
                "it has {} entries, but this device saw {len} before",
                set.len()
            )));
        }
    }
    Ok(set)
}

/// Whether `key` (a leaf's signature key) is that of `principal`'s device
/// in `set`.
pub(crate) fn certifies(set: &DeviceSet, principal: &str, key: &[u8]) -> bool {
    dev::parse_principal(principal)
        .and_then(|(_, n)| set.key(n))
        .is_some_and(|k| k.as_slice() == key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    /// A log served later must extend the one seen before: not shorter, not
    /// another.
    #[test]
    fn a_device_log_must_extend_the_one_seen_before() {
        let k = |seed: u8| SigningKey::from_bytes(&[seed; 32]);
        let pk = |seed: u8| k(seed).verifying_key().to_bytes();
        let mut set = DeviceSet::new("ann", pk(1));
        let e1 = set.next_entry(
            1,
            &k(1),
            DeviceChange::Add {
                device: 2,
                key: pk(2),
            },
            1,
        );
        set.apply(&e1, 8).unwrap();
        let seen = Some((set.len(), set.head()));
        let e2 = set.next_entry(2, &k(2), DeviceChange::Remove { device: 1 }, 2);
        let grown = [e1.clone().into(), e2.into()];
        assert_eq!(
            replay_extending("ann", pk(1), &grown, seen).unwrap().len(),
            2
        );
        // Rolled back to before the device seen: refused.
        let e = replay_extending("ann", pk(1), &[], seen).unwrap_err();
        assert!(e.to_string().contains("saw 1 before"), "{e}");
        // Another history of the same length: refused.
        let other = DeviceSet::new("ann", pk(1)).next_entry(
            1,
            &k(1),
            DeviceChange::Add {
                device: 2,
                key: pk(3),
            },
            1,
        );
        let e = replay_extending("ann", pk(1), &[other.into()], seen).unwrap_err();
        assert!(e.to_string().contains("not the log seen before"), "{e}");
        // Nothing seen yet: any valid log.
        assert_eq!(
            replay_extending("ann", pk(1), &[e1.into()], None)
                .unwrap()
                .len(),
            1
        );
    }
}
