//! The client's home directory: one device's identity, pinned server
//! certificate, settings and database.
//!
//! ```text
//! HOME/client.json      user name, server address, device number (when not 1)
//! HOME/identity.key     Ed25519 secret seed, hex (mode 0600)
//! HOME/server-cert.pem  the pinned server certificate
//! HOME/huddle.db        SQLite: MLS state, groups, cursors, history
//! HOME/locks/GROUP      advisory locks shared by the home's processes
//! ```
//!
//! Registration writes `identity.key` before it asks the DS for the name
//! and `client.json` after the DS bound the name to the key: a home with a
//! key but no settings is a registration that did not finish, and a retry
//! uses the same key (which the DS accepts again). Linking a device does
//! the same: the key first, `client.json` once another device approved it.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ClientError, Result};
use crate::identity::Identity;

/// Settings saved at registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// Registered user name.
    pub name: String,
    /// Server address as given at registration.
    pub server: String,
    /// This device's number among the user's devices: 1 for the device
    /// that registered the user, N for the device linked N-th.
    #[serde(default = "first_device", skip_serializing_if = "is_first_device")]
    pub device: u32,
}

fn first_device() -> u32 {
    1
}

fn is_first_device(d: &u32) -> bool {
    *d == 1
}

impl Settings {
    /// This device's principal: the user name for device 1, `USER/N`
    /// otherwise.
    pub fn principal(&self) -> String {
        huddle_core::devices::principal(&self.name, self.device)
    }
}

/// A client home directory.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    /// The home at `dir` (created when needed).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the database.
    pub fn db_path(&self) -> PathBuf {
        self.dir.join("huddle.db")
    }

    /// Path of the pinned certificate.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("server-cert.pem")
    }

    /// Directory of the group locks ([`crate::lock`]).
    pub fn locks_dir(&self) -> PathBuf {
        self.dir.join("locks")
    }

    /// Directory for downloads in progress.
    pub fn partial_dir(&self) -> PathBuf {
        self.dir.join("partial")
    }

    /// Creates the directory (mode 0700).
    pub fn create(&self) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt as _;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| ClientError::io(format!("creating {}", self.dir.display()), e))
    }

    /// Whether an identity is stored here.
    pub fn is_registered(&self) -> bool {
        self.dir.join("client.json").exists() && self.dir.join("identity.key").exists()
    }

    /// Loads settings and identity.
    pub fn load(&self) -> Result<(Settings, Identity)> {
        if !self.is_registered() {
            return Err(ClientError::NotRegistered);
        }
        let settings: Settings = serde_json::from_slice(
            &fs::read(self.dir.join("client.json"))
                .map_err(|e| ClientError::io("reading client.json", e))?,
        )
        .map_err(|e| ClientError::io("parsing client.json", e))?;
        let hex_seed = fs::read_to_string(self.dir.join("identity.key"))
            .map_err(|e| ClientError::io("reading identity.key", e))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(hex_seed.trim(), &mut seed)
            .map_err(|_| ClientError::Io("identity.key is corrupt".into()))?;
        let identity = Identity::from_seed(&settings.principal(), seed);
        Ok((settings, identity))
    }

    /// Saves settings and identity (the key file with mode 0600).
    pub fn save(&self, settings: &Settings, identity: &Identity) -> Result<()> {
        self.save_identity(identity)?;
        self.save_settings(settings)
    }

    /// Saves the identity key (mode 0600), creating the home.
    pub fn save_identity(&self, identity: &Identity) -> Result<()> {
        self.create()?;
        write_file(
            &self.dir.join("identity.key"),
            format!("{}\n", hex::encode(identity.seed())).as_bytes(),
            0o600,
        )
    }

    /// Saves the settings: the home is registered from then on.
    pub fn save_settings(&self, settings: &Settings) -> Result<()> {
        let json =
            serde_json::to_vec_pretty(settings).map_err(|e| ClientError::io("settings", e))?;
        write_file(&self.dir.join("client.json"), &json, 0o600)
    }

    /// The key of a registration that did not finish (a key saved, no
    /// settings yet), as the identity of `name`.
    pub fn unfinished_identity(&self, name: &str) -> Result<Option<Identity>> {
        let path = self.dir.join("identity.key");
        if self.is_registered() || !path.exists() {
            return Ok(None);
        }
        let hex_seed =
            fs::read_to_string(&path).map_err(|e| ClientError::io("reading identity.key", e))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(hex_seed.trim(), &mut seed)
            .map_err(|_| ClientError::Io("identity.key is corrupt".into()))?;
        Ok(Some(Identity::from_seed(name, seed)))
    }

    /// The pinned certificate (DER, as a list of one), if any. The pin
    /// file holds exactly one PEM block, the DS's own end-entity
    /// certificate (PROTOCOL.md 2): a file with more is refused rather
    /// than read as a set of trust anchors.
    pub fn pinned_certs(&self) -> Result<Option<Vec<Vec<u8>>>> {
        let path = self.cert_path();
        if !path.exists() {
            return Ok(None);
        }
        let certs = read_pem_certs(&path)?;
        if certs.len() != 1 {
            return Err(ClientError::Usage(format!(
                "{} holds {} certificates; it must hold exactly one, the server's own certificate",
                path.display(),
                certs.len()
            )));
        }
        Ok(Some(certs))
    }

    /// Pins `der` as the server certificate.
    pub fn pin_cert(&self, der: &[u8]) -> Result<()> {
        self.create()?;
        let pem = pem_encode(der);
        write_file(&self.cert_path(), pem.as_bytes(), 0o644)
    }
}

/// Reads every certificate of a PEM file, as DER.
pub fn read_pem_certs(path: &Path) -> Result<Vec<Vec<u8>>> {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| ClientError::io(format!("reading {}", path.display()), e))?
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::io(format!("parsing {}", path.display()), e))?;
    if certs.is_empty() {
        return Err(ClientError::Usage(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn pem_encode(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                b64.push(ALPHABET[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Writes a file atomically (temporary file, fsync, rename, directory
/// fsync).
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    huddle_io::write_atomically(path, data, mode)
        .map_err(|e| ClientError::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_file_holds_exactly_one_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().join("h"));
        assert!(home.pinned_certs().expect("no pin file").is_none());
        home.pin_cert(b"first certificate").expect("pin");
        assert_eq!(
            home.pinned_certs().expect("one pin"),
            Some(vec![b"first certificate".to_vec()])
        );
        let two = format!(
            "{}{}",
            pem_encode(b"first certificate"),
            pem_encode(b"a second one")
        );
        std::fs::write(home.cert_path(), two).expect("write");
        let e = home.pinned_certs().expect_err("two blocks are refused");
        assert!(e.to_string().contains("holds 2 certificates"), "{e}");
    }

    #[test]
    fn pem_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        for len in [1usize, 2, 3, 100, 301] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let p = dir.path().join("c.pem");
            fs::write(&p, pem_encode(&der)).unwrap();
            assert_eq!(read_pem_certs(&p).unwrap(), vec![der]);
        }
    }

    #[test]
    fn identity_key_file_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().join("h"));
        let id = Identity::generate("alice");
        home.save(
            &Settings {
                name: "alice".into(),
                server: "127.0.0.1:1".into(),
                device: 1,
            },
            &id,
        )
        .unwrap();
        let mode = fs::metadata(dir.path().join("h/identity.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (_, loaded) = home.load().unwrap();
        assert_eq!(loaded.public(), id.public());
    }
}
