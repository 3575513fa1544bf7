//! A user's devices: who they are, and the signed log that says so.
//!
//! A user is a name and a set of devices. Each device has its own Ed25519
//! key, which is also the MLS signature key of its leaves, and its own key
//! packages. A device is a *principal* of the delivery service and of every
//! group: it authenticates, claims, posts and reads as itself. Its name is
//! the user name for the device that registered the user (device 1), and
//! `USER/N` for the device linked N-th (N ≥ 2). So a user with one device
//! looks exactly as it did before devices existed.
//!
//! The set of devices is a hash-chained log of [`DeviceEntry`]s that starts
//! at the key the user registered with (device 1). Every entry adds or
//! removes one device and is signed by a device that is current just
//! before it. The DS stores the log and refuses an entry that does not
//! extend it; every member replays it from the registration key it pinned
//! on first sight, so a DS cannot add a device to a user without the
//! signature of one of that user's devices.

use std::collections::{BTreeMap, HashSet};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::check_user_name;

/// The most devices a user's log may ever name as current at once, as
/// members check it. A DS sets its own, lower, limit.
pub const MAX_DEVICES: usize = 32;

/// The most entries a device log may hold, as members check it.
pub const MAX_LOG_ENTRIES: usize = 1024;

/// The largest encoded entry accepted.
pub const MAX_ENTRY_BYTES: usize = 512;

/// The principal (DS account and MLS credential identity) of `user`'s
/// device `device`: `user` for device 1, `user/N` for the others.
pub fn principal(user: &str, device: u32) -> String {
    if device == 1 {
        user.to_owned()
    } else {
        format!("{user}/{device}")
    }
}

/// Splits a principal into user and device number, if it is one: a valid
/// user name, optionally followed by `/N` with N ≥ 2 written without
/// leading zeros.
pub fn parse_principal(p: &str) -> Option<(&str, u32)> {
    let (user, device) = match p.split_once('/') {
        None => (p, 1),
        Some((u, n)) => {
            if n.is_empty() || n.starts_with('0') || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let n: u32 = n.parse().ok()?;
            if n < 2 {
                return None;
            }
            (u, n)
        }
    };
    check_user_name(user).ok()?;
    Some((user, device))
}

/// The user a principal belongs to (the whole string if it is not one).
pub fn user_part(p: &str) -> &str {
    p.split_once('/').map_or(p, |(u, _)| u)
}

/// A short, human-comparable fingerprint of a device key: the same form
/// as [`crate::auth::key_fingerprint`].
pub fn fingerprint(key: &[u8; 32]) -> String {
    crate::auth::key_fingerprint(key)
}

/// What one log entry changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceChange {
    /// Device `device` (the next unused number) with key `key`.
    Add {
        /// Its number.
        device: u32,
        /// Its Ed25519 key.
        key: [u8; 32],
    },
    /// Device `device` is revoked: it may no longer authenticate, and its
    /// leaves are removed from every group.
    Remove {
        /// Its number.
        device: u32,
    },
}

/// The signed part of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatement {
    /// Whose devices.
    pub user: String,
    /// Position in the log, from 1.
    pub seq: u32,
    /// Hash of the entry before (for seq 1, [`root_hash`]).
    pub prev: [u8; 32],
    /// When the signer made it, ms since the Unix epoch (its own clock).
    pub time_ms: u64,
    /// The change.
    pub change: DeviceChange,
    /// The device that signs it; current before the entry.
    pub signer: u32,
}

/// One log entry: a statement and its Ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// What is signed.
    pub statement: DeviceStatement,
    /// 64 bytes.
    pub signature: Vec<u8>,
}

/// Why an entry or a log was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DeviceError {
    /// Not an encoded entry, or too large.
    #[error("device entry does not parse: {0}")]
    Malformed(String),
    /// For another user.
    #[error("device entry is for {found}, not {expected}")]
    WrongUser {
        /// Expected user.
        expected: String,
        /// Named in the entry.
        found: String,
    },
    /// Not the next entry of the log.
    #[error("device entry {found} does not follow entry {head} of the log")]
    OutOfOrder {
        /// Entries in the log.
        head: u32,
        /// Its position.
        found: u32,
    },
    /// `prev` is not the hash of the entry before.
    #[error("device entry {0} does not chain to the entry before it")]
    BrokenChain(u32),
    /// The signer is not a current device.
    #[error("device entry {seq} is signed by device {signer}, which is not a current device")]
    SignerNotCurrent {
        /// The entry.
        seq: u32,
        /// The named signer.
        signer: u32,
    },
    /// The signature does not verify.
    #[error("device entry {0} has a bad signature")]
    BadSignature(u32),
    /// An added device is not the next number.
    #[error("a new device must be number {expected}, not {found}")]
    WrongNumber {
        /// The next number.
        expected: u32,
        /// In the entry.
        found: u32,
    },
    /// An added key is, or was, the key of a device.
    #[error("the key of the new device is already a device key of this user")]
    KeyReused,
    /// A removed device is not current.
    #[error("device {0} is not a current device")]
    NotCurrent(u32),
    /// Removing the last device.
    #[error("the last device of a user cannot be removed")]
    LastDevice,
    /// Too many devices or entries.
    #[error("{0}")]
    Limit(String),
}

/// Hash that the first entry of `user`'s log chains to: it commits to the
/// registration key.
pub fn root_hash(user: &str, root_key: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"huddle/1 device log root\0");
    h.update(&[u8::try_from(user.len()).unwrap_or(u8::MAX)]);
    h.update(user.as_bytes());
    h.update(root_key);
    *h.finalize().as_bytes()
}

fn signed_bytes(s: &DeviceStatement) -> Vec<u8> {
    let mut m = b"huddle/1 device entry\0".to_vec();
    m.extend_from_slice(&postcard::to_allocvec(s).expect("a statement encodes"));
    m
}

/// Decodes an entry.
pub fn decode_entry(bytes: &[u8]) -> Result<DeviceEntry, DeviceError> {
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err(DeviceError::Malformed(format!(
            "{} bytes, at most {MAX_ENTRY_BYTES}",
            bytes.len()
        )));
    }
    let (e, rest): (DeviceEntry, _) =
        postcard::take_from_bytes(bytes).map_err(|e| DeviceError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DeviceError::Malformed("trailing bytes".into()));
    }
    if postcard::to_allocvec(&e).ok().as_deref() != Some(bytes) {
        return Err(DeviceError::Malformed("not in its one encoding".into()));
    }
    Ok(e)
}

/// One current device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its number.
    pub device: u32,
    /// Its key.
    pub key: [u8; 32],
    /// When it was added (the signer's clock; 0 for device 1).
    pub added_ms: u64,
}

/// The devices of a user as a log leaves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSet {
    user: String,
    current: BTreeMap<u32, Device>,
    /// Every key a device ever had.
    keys: HashSet<[u8; 32]>,
    /// Number of the next device.
    next: u32,
    /// Entries applied.
    len: u32,
    /// Hash of the last entry (or the root).
    head: [u8; 32],
    /// Removed devices, with their entry's position.
    removed: BTreeMap<u32, u32>,
}

impl DeviceSet {
    /// A user with only its registration key (device 1).
    pub fn new(user: &str, root_key: [u8; 32]) -> Self {
        let mut current = BTreeMap::new();
        current.insert(
            1,
            Device {
                device: 1,
                key: root_key,
                added_ms: 0,
            },
        );
        Self {
            user: user.to_owned(),
            current,
            keys: HashSet::from([root_key]),
            next: 2,
            len: 0,
            head: root_hash(user, &root_key),
            removed: BTreeMap::new(),
        }
    }

    /// Replays a whole log, checking every entry.
    pub fn replay<B: AsRef<[u8]>>(
        user: &str,
        root_key: [u8; 32],
        entries: &[B],
    ) -> Result<Self, DeviceError> {
        Self::replay_checking(user, root_key, entries, true)
    }

    /// Replays a log whose entries were each checked when they were
    /// appended (the DS's own store): every rule but the signatures, which
    /// cost most.
    pub fn replay_stored<B: AsRef<[u8]>>(
        user: &str,
        root_key: [u8; 32],
        entries: &[B],
    ) -> Result<Self, DeviceError> {
        Self::replay_checking(user, root_key, entries, false)
    }

    fn replay_checking<B: AsRef<[u8]>>(
        user: &str,
        root_key: [u8; 32],
        entries: &[B],
        signatures: bool,
    ) -> Result<Self, DeviceError> {
        if entries.len() > MAX_LOG_ENTRIES {
            return Err(DeviceError::Limit(format!(
                "a device log of {} entries; at most {MAX_LOG_ENTRIES}",
                entries.len()
            )));
        }
        let mut set = Self::new(user, root_key);
        for e in entries {
            set.apply_checking(e.as_ref(), MAX_DEVICES, signatures)?;
        }
        Ok(set)
    }

    /// Checks `bytes` as the next entry and applies it; `max_devices`:
    /// the most current devices allowed after it.
    pub fn apply(&mut self, bytes: &[u8], max_devices: usize) -> Result<DeviceEntry, DeviceError> {
        self.apply_checking(bytes, max_devices, true)
    }

    fn apply_checking(
        &mut self,
        bytes: &[u8],
        max_devices: usize,
        signature: bool,
    ) -> Result<DeviceEntry, DeviceError> {
        let e = decode_entry(bytes)?;
        let s = &e.statement;
        if s.user != self.user {
            return Err(DeviceError::WrongUser {
                expected: self.user.clone(),
                found: s.user.clone(),
            });
        }
        if self.len as usize >= MAX_LOG_ENTRIES {
            return Err(DeviceError::Limit(format!(
                "the device log of {} holds {MAX_LOG_ENTRIES} entries, the most allowed",
                self.user
            )));
        }
        if s.seq != self.len + 1 {
            return Err(DeviceError::OutOfOrder {
                head: self.len,
                found: s.seq,
            });
        }
        if s.prev != self.head {
            return Err(DeviceError::BrokenChain(s.seq));
        }
        let signer = self
            .current
            .get(&s.signer)
            .ok_or(DeviceError::SignerNotCurrent {
                seq: s.seq,
                signer: s.signer,
            })?;
        if signature {
            let key = VerifyingKey::from_bytes(&signer.key)
                .map_err(|_| DeviceError::BadSignature(s.seq))?;
            let sig: [u8; 64] = e
                .signature
                .as_slice()
                .try_into()
                .map_err(|_| DeviceError::BadSignature(s.seq))?;
            key.verify_strict(&signed_bytes(s), &Signature::from_bytes(&sig))
                .map_err(|_| DeviceError::BadSignature(s.seq))?;
        }
        match &s.change {
            DeviceChange::Add { device, key } => {
                if *device != self.next {
                    return Err(DeviceError::WrongNumber {
                        expected: self.next,
                        found: *device,
                    });
                }
                if self.keys.contains(key) {
                    return Err(DeviceError::KeyReused);
                }
                if self.current.len() >= max_devices {
                    return Err(DeviceError::Limit(format!(
                        "{} has {} devices, the most allowed",
                        self.user,
                        self.current.len()
                    )));
                }
                if signature {
                    VerifyingKey::from_bytes(key).map_err(|_| {
                        DeviceError::Malformed("the new key is not an Ed25519 key".into())
                    })?;
                }
                self.keys.insert(*key);
                self.current.insert(
                    *device,
                    Device {
                        device: *device,
                        key: *key,
                        added_ms: s.time_ms,
                    },
                );
                self.next += 1;
            }
            DeviceChange::Remove { device } => {
                if !self.current.contains_key(device) {
                    return Err(DeviceError::NotCurrent(*device));
                }
                if self.current.len() == 1 {
                    return Err(DeviceError::LastDevice);
                }
                self.current.remove(device);
                self.removed.insert(*device, s.seq);
            }
        }
        self.len += 1;
        self.head = *blake3::hash(bytes).as_bytes();
        Ok(e)
    }

    /// Makes, signs and returns the next entry (not applied).
    pub fn next_entry(
        &self,
        signer: u32,
        signing_key: &SigningKey,
        change: DeviceChange,
        time_ms: u64,
    ) -> Vec<u8> {
        let statement = DeviceStatement {
            user: self.user.clone(),
            seq: self.len + 1,
            prev: self.head,
            time_ms,
            change,
            signer,
        };
        let signature = signing_key
            .sign(&signed_bytes(&statement))
            .to_bytes()
            .to_vec();
        postcard::to_allocvec(&DeviceEntry {
            statement,
            signature,
        })
        .expect("an entry encodes")
    }

    /// The user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Current devices, by number.
    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.current.values()
    }

    /// The key of current device `device`.
    pub fn key(&self, device: u32) -> Option<[u8; 32]> {
        self.current.get(&device).map(|d| d.key)
    }

    /// The current device whose key is `key`.
    pub fn device_of_key(&self, key: &[u8; 32]) -> Option<u32> {
        self.current
            .values()
            .find(|d| &d.key == key)
            .map(|d| d.device)
    }

    /// Whether `device` was current once and was removed.
    pub fn is_removed(&self, device: u32) -> bool {
        self.removed.contains_key(&device)
    }

    /// Principals of the current devices.
    pub fn principals(&self) -> Vec<String> {
        self.current
            .keys()
            .map(|d| principal(&self.user, *d))
            .collect()
    }

    /// Entries applied.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether no entry was applied (only the registration device).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number the next added device gets.
    pub fn next_device(&self) -> u32 {
        self.next
    }

    /// Hash of the last entry (of the root for an empty log): what a
    /// longer log must chain through to extend this one.
    pub fn head(&self) -> [u8; 32] {
        self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn pk(seed: u8) -> [u8; 32] {
        key(seed).verifying_key().to_bytes()
    }

    #[test]
    fn principals_round_trip_and_refuse_other_forms() {
        assert_eq!(principal("alice", 1), "alice");
        assert_eq!(principal("alice", 7), "alice/7");
        assert_eq!(parse_principal("alice"), Some(("alice", 1)));
        assert_eq!(parse_principal("alice/7"), Some(("alice", 7)));
        for bad in [
            "alice/1", "alice/0", "alice/07", "alice/", "/2", "Alice/2", "a/2/3", "a/x",
        ] {
            assert_eq!(parse_principal(bad), None, "{bad}");
        }
        assert_eq!(user_part("bob/3"), "bob");
        assert_eq!(user_part("bob"), "bob");
    }

    #[test]
    fn a_log_adds_and_removes_devices_signed_by_current_ones() {
        let mut set = DeviceSet::new("alice", pk(1));
        let e1 = set.next_entry(
            1,
            &key(1),
            DeviceChange::Add {
                device: 2,
                key: pk(2),
            },
            5,
        );
        set.apply(&e1, 8).expect("device 1 links device 2");
        let e2 = set.next_entry(
            2,
            &key(2),
            DeviceChange::Add {
                device: 3,
                key: pk(3),
            },
            6,
        );
        set.apply(&e2, 8).expect("device 2 links device 3");
        let e3 = set.next_entry(3, &key(3), DeviceChange::Remove { device: 1 }, 7);
        set.apply(&e3, 8).expect("device 3 revokes device 1");
        assert_eq!(set.principals(), ["alice/2", "alice/3"]);
        assert_eq!(set.device_of_key(&pk(3)), Some(3));
        assert!(set.is_removed(1));
        let again = DeviceSet::replay("alice", pk(1), &[e1.clone(), e2.clone(), e3.clone()])
            .expect("replay");
        assert_eq!(again, set);
        // The removed device signs no more.
        let e4 = set.next_entry(
            1,
            &key(1),
            DeviceChange::Add {
                device: 4,
                key: pk(4),
            },
            8,
        );
        assert_eq!(
            set.clone().apply(&e4, 8),
            Err(DeviceError::SignerNotCurrent { seq: 4, signer: 1 })
        );
    }

    #[test]
    fn forged_reordered_and_reused_entries_are_refused() {
        let set = DeviceSet::new("alice", pk(1));
        // Signed by a key that is not alice's device, claiming to be device 1.
        let forged = set.next_entry(
            1,
            &key(9),
            DeviceChange::Add {
                device: 2,
                key: pk(9),
            },
            1,
        );
        assert_eq!(
            set.clone().apply(&forged, 8),
            Err(DeviceError::BadSignature(1))
        );
        // A signer that does not exist.
        let e = set.next_entry(
            2,
            &key(2),
            DeviceChange::Add {
                device: 2,
                key: pk(2),
            },
            1,
        );
        assert!(matches!(
            set.clone().apply(&e, 8),
            Err(DeviceError::SignerNotCurrent { .. })
        ));
        // Wrong number, reused key, last device.
        let e = set.next_entry(
            1,
            &key(1),
            DeviceChange::Add {
                device: 3,
                key: pk(2),
            },
            1,
        );
        assert_eq!(
            set.clone().apply(&e, 8),
            Err(DeviceError::WrongNumber {
                expected: 2,
                found: 3
            })
        );
        let e = set.next_entry(
            1,
            &key(1),
            DeviceChange::Add {
                device: 2,
                key: pk(1),
            },
            1,
        );
        assert_eq!(set.clone().apply(&e, 8), Err(DeviceError::KeyReused));
        let e = set.next_entry(1, &key(1), DeviceChange::Remove { device: 1 }, 1);
        assert_eq!(set.clone().apply(&e, 8), Err(DeviceError::LastDevice));
        // The same entry twice, or for another user's log.
        let mut s = set.clone();
        let e = s.next_entry(
            1,
            &key(1),
            DeviceChange::Add {
                device: 2,
                key: pk(2),
            },
            1,
        );
        s.apply(&e, 8).expect("first");
        assert!(matches!(
            s.apply(&e, 8),
            Err(DeviceError::OutOfOrder { .. })
        ));
        assert!(matches!(
            DeviceSet::new("bob", pk(1)).apply(&e, 8),
            Err(DeviceError::WrongUser { .. })
        ));
        // Another root: the chain breaks.
        assert_eq!(
            DeviceSet::new("alice", pk(5)).apply(&e, 8),
            Err(DeviceError::BrokenChain(1))
        );
        // The limit.
        assert!(matches!(
            set.clone().apply(&e, 1),
            Err(DeviceError::Limit(_))
        ));
    }

    /// The DS replays its own stored logs without the signatures (they were
    /// checked at append); members always check them.
    #[test]
    fn only_a_stored_log_is_replayed_without_its_signatures() {
        let set = DeviceSet::new("alice", pk(1));
        let forged = set.next_entry(
            1,
            &key(9),
            DeviceChange::Add {
                device: 2,
                key: pk(9),
            },
            1,
        );
        assert_eq!(
            DeviceSet::replay("alice", pk(1), std::slice::from_ref(&forged)),
            Err(DeviceError::BadSignature(1))
        );
        let stored = DeviceSet::replay_stored("alice", pk(1), &[forged]).expect("rules hold");
        assert_eq!(stored.principals(), ["alice", "alice/2"]);
        // Every other rule still holds.
        let e = set.next_entry(1, &key(1), DeviceChange::Remove { device: 1 }, 1);
        assert_eq!(
            DeviceSet::replay_stored("alice", pk(1), &[e]),
            Err(DeviceError::LastDevice)
        );
    }
}
