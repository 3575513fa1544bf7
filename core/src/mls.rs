//! MLS policy shared by the delivery service and the client: the one
//! ciphersuite Huddle speaks, group configuration, and the checks both sides
//! apply to key packages and credentials.

use openmls::prelude::{tls_codec::Deserialize as _, *};
use openmls_traits::crypto::OpenMlsCrypto;
use thiserror::Error;

use crate::ids::check_user_name;

/// The only ciphersuite Huddle uses.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Past epochs whose secrets a client keeps, so that an application message
/// sent just before a commit still decrypts after the commit is merged. The
/// DS accepts application messages this many epochs behind the current one.
pub const MAX_PAST_EPOCHS: usize = 5;

/// How many out-of-order application messages per sender a client tolerates
/// within an epoch (the DS orders messages, so only past-epoch stragglers
/// arrive out of order).
pub const OUT_OF_ORDER_TOLERANCE: u32 = 128;

/// Lifetime of the key packages this client makes: 60 days.
pub const KEY_PACKAGE_LIFETIME_SECS: u64 = 60 * 24 * 3600;

/// Longest lifetime (`not_after - not_before`) a key package may have: 84
/// days and the hour a maker may back-date `not_before` by (PROTOCOL.md
/// 13.5). A leaf that stays valid for longer keeps a key in the group
/// that long.
pub const MAX_KEY_PACKAGE_LIFETIME_SECS: u64 = 84 * 24 * 3600 + 3600;

/// Configuration for creating a group. Handshake messages go out as
/// PublicMessage so the DS can validate them; application messages are
/// always PrivateMessage (openmls encrypts them whatever the policy).
pub fn create_config() -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            1000,
        ))
        .capabilities(capabilities())
        // Joiners fetch the tree from the DS, which keeps Welcomes small in
        // large groups.
        .use_ratchet_tree_extension(false)
        .build()
}

/// Configuration for joining a group from a Welcome (same policy as
/// [`create_config`]).
pub fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            1000,
        ))
        .use_ratchet_tree_extension(false)
        .build()
}

/// Leaf capabilities of every Huddle client: the defaults plus the
/// last-resort extension, which key packages may carry.
pub fn capabilities() -> Capabilities {
    Capabilities::new(
        None,
        Some(&[CIPHERSUITE]),
        Some(&[ExtensionType::LastResort]),
        None,
        Some(&[CredentialType::Basic]),
    )
}

/// The MLS credential of a user: a basic credential whose identity is the
/// user name in UTF-8.
pub fn credential_for(user: &str) -> Credential {
    BasicCredential::new(user.as_bytes().to_vec()).into()
}

/// The user name a credential names, if it is a basic credential holding a
/// valid user name.
pub fn user_of(credential: &Credential) -> Option<String> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    let name = std::str::from_utf8(basic.identity()).ok()?;
    check_user_name(name).ok()?;
    Some(name.to_owned())
}

/// Why a key package was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyPackageError {
    /// Not a TLS-encoded key package.
    #[error("key package does not parse: {0}")]
    Malformed(String),
    /// Signature, version or structure check failed.
    #[error("key package does not verify: {0}")]
    Invalid(String),
    /// Another ciphersuite than [`CIPHERSUITE`].
    #[error("key package uses ciphersuite {0:?}, expected {CIPHERSUITE:?}")]
    WrongCiphersuite(Ciphersuite),
    /// The credential does not name the expected user.
    #[error("key package credential names {found:?}, expected {expected:?}")]
    WrongUser {
        /// The user whose package it should be.
        expected: String,
        /// What the credential says.
        found: Option<String>,
    },
    /// The signature key is not the user's registered identity key.
    #[error("key package signature key is not the registered identity key")]
    WrongKey,
    /// Expired or not yet valid at `now`.
    #[error("key package is expired or not yet valid")]
    Expired,
    /// Valid for longer than [`MAX_KEY_PACKAGE_LIFETIME_SECS`].
    #[error("key package lifetime of {0} s is longer than {MAX_KEY_PACKAGE_LIFETIME_SECS} s")]
    LifetimeTooLong(u64),
    /// A last-resort package was expected and this one is not marked as such,
    /// or the other way round.
    #[error("key package last-resort marking is wrong: expected {expected}")]
    LastResortMismatch {
        /// Whether a last-resort package was expected.
        expected: bool,
    },
}

/// Facts about a key package that passed [`validate_key_package`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedKeyPackage {
    /// The key package reference (hash), unique per package.
    pub hash_ref: Vec<u8>,
    /// Carries the last-resort extension.
    pub last_resort: bool,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: u64,
}

/// Validates a TLS-encoded key package for `user` whose identity (MLS
/// signature) key is `identity_key`, at time `now` (seconds since the Unix
/// epoch): it parses, its signatures verify, it uses [`CIPHERSUITE`], its
/// credential names `user`, its signature key is `identity_key`, and it is
/// valid at `now`.
pub fn validate_key_package(
    crypto: &impl OpenMlsCrypto,
    bytes: &[u8],
    user: &str,
    identity_key: &[u8; 32],
    now: u64,
) -> Result<CheckedKeyPackage, KeyPackageError> {
    let kp_in = KeyPackageIn::tls_deserialize_exact(bytes)
        .map_err(|e| KeyPackageError::Malformed(e.to_string()))?;
    let kp = kp_in
        .validate(crypto, ProtocolVersion::Mls10)
        .map_err(|e| match e {
            KeyPackageVerifyError::LifetimeError(_) => KeyPackageError::Expired,
            other => KeyPackageError::Invalid(other.to_string()),
        })?;
    if kp.ciphersuite() != CIPHERSUITE {
        return Err(KeyPackageError::WrongCiphersuite(kp.ciphersuite()));
    }
    let leaf = kp.leaf_node();
    let found = user_of(leaf.credential());
    if found.as_deref() != Some(user) {
        return Err(KeyPackageError::WrongUser {
            expected: user.to_owned(),
            found,
        });
    }
    if leaf.signature_key().as_slice() != identity_key.as_slice() {
        return Err(KeyPackageError::WrongKey);
    }
    let life = kp.life_time();
    if now < life.not_before() || now > life.not_after() {
        return Err(KeyPackageError::Expired);
    }
    let span = life.not_after().saturating_sub(life.not_before());
    if span > MAX_KEY_PACKAGE_LIFETIME_SECS {
        return Err(KeyPackageError::LifetimeTooLong(span));
    }
    let hash_ref = kp
        .hash_ref(crypto)
        .map_err(|e| KeyPackageError::Invalid(e.to_string()))?
        .as_slice()
        .to_vec();
    Ok(CheckedKeyPackage {
        hash_ref,
        last_resort: kp.last_resort(),
        not_after: life.not_after(),
    })
}

/// The `signer` leaf index of a GroupInfo `MLSMessage` (RFC 9420
/// §12.4.3), read from its TLS framing alone; `None` if the bytes are not
/// one. The signature is verified against that leaf's key by whoever
/// reads it; a GroupInfo whose `signer` is another leaf than its
/// publisher's would fail every rejoin.
pub fn group_info_signer(bytes: &[u8]) -> Option<u32> {
    /// Skips one `opaque<V>` (or vector) at `pos`.
    fn skip(b: &[u8], pos: usize) -> Option<usize> {
        let (len, n) = crate::welcome::read_varint(b.get(pos..)?).ok()?;
        let end = pos.checked_add(n)?.checked_add(len)?;
        (end <= b.len()).then_some(end)
    }
    // MLSMessage: version, wire_format (4: group_info).
    if bytes.get(2..4)? != [0, 4] {
        return None;
    }
    // GroupContext: version, cipher_suite, group_id, epoch, tree_hash,
    // confirmed_transcript_hash, extensions.
    let mut pos = 4 + 4;
    pos = skip(bytes, pos)?;
    pos += 8;
    for _ in 0..3 {
        pos = skip(bytes, pos)?;
    }
    // GroupInfo: extensions, confirmation_tag, signer, signature.
    pos = skip(bytes, pos)?;
    pos = skip(bytes, pos)?;
    let signer = u32::from_be_bytes(bytes.get(pos..pos + 4)?.try_into().ok()?);
    let end = skip(bytes, pos + 4)?;
    (end == bytes.len()).then_some(signer)
}
