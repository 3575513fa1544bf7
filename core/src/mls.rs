//! MLS policy shared by the delivery service and the client: the one
//! ciphersuite Huddle speaks, group configuration, and the checks both sides
//! apply to key packages and credentials.

use openmls::prelude::{tls_codec::Deserialize as _, *};
use openmls_traits::crypto::OpenMlsCrypto;
use thiserror::Error;

use crate::devices::parse_principal;

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
/// The group's policy names `creator` (a user name) its owner.
pub fn create_config(creator: &str) -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .with_group_context_extensions(crate::policy::Policy::new_group(creator).extensions())
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
/// last-resort extension, which key packages may carry, and the group
/// policy extension ([`crate::policy::POLICY_EXTENSION`]), which every
/// group's context carries.
pub fn capabilities() -> Capabilities {
    Capabilities::new(
        None,
        Some(&[CIPHERSUITE]),
        Some(&[
            ExtensionType::LastResort,
            ExtensionType::Unknown(crate::policy::POLICY_EXTENSION),
        ]),
        None,
        Some(&[CredentialType::Basic]),
    )
}

/// Checks that a leaf's capabilities list what every Huddle leaf must
/// (PROTOCOL.md 13.2): version `mls10`, [`CIPHERSUITE`], the `last_resort`
/// and `huddle_policy` extensions and basic credentials. Values beyond these (GREASE included)
/// are allowed. The error says what is missing.
pub fn check_capabilities(caps: &Capabilities) -> Result<(), String> {
    let mut missing = Vec::new();
    if !caps.versions().contains(&ProtocolVersion::Mls10) {
        missing.push("version mls10");
    }
    if !caps
        .ciphersuites()
        .contains(&VerifiableCiphersuite::from(CIPHERSUITE))
    {
        missing.push("cipher suite 0x0001");
    }
    if !caps.extensions().contains(&ExtensionType::LastResort) {
        missing.push("extension last_resort (0x000a)");
    }
    if !caps
        .extensions()
        .contains(&ExtensionType::Unknown(crate::policy::POLICY_EXTENSION))
    {
        missing.push("extension huddle_policy (0xf1d0)");
    }
    if !caps.credentials().contains(&CredentialType::Basic) {
        missing.push("credential type basic");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the leaf's capabilities do not list {}",
            missing.join(", ")
        ))
    }
}

/// Checks the total lifetime of a leaf created from a key package (a key
/// package's or a group creator's): at most
/// [`MAX_KEY_PACKAGE_LIFETIME_SECS`]. Returns the span that is too long.
pub fn check_lifetime_span(life: &Lifetime) -> Result<(), u64> {
    let span = life.not_after().saturating_sub(life.not_before());
    if span > MAX_KEY_PACKAGE_LIFETIME_SECS {
        Err(span)
    } else {
        Ok(())
    }
}

/// The MLS credential of a device: a basic credential whose identity is
/// the device's principal in UTF-8 (the user name for device 1, `USER/N`
/// for device N; see [`crate::devices`]).
pub fn credential_for(principal: &str) -> Credential {
    BasicCredential::new(principal.as_bytes().to_vec()).into()
}

/// The principal a credential names, if it is a basic credential holding a
/// valid one.
pub fn principal_of(credential: &Credential) -> Option<String> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    let name = std::str::from_utf8(basic.identity()).ok()?;
    parse_principal(name)?;
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
    /// The leaf's capabilities lack what every Huddle leaf lists.
    #[error("{0}")]
    Capabilities(String),
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
/// epoch), as PROTOCOL.md 10.1 says: it parses, its signatures verify, it
/// uses [`CIPHERSUITE`], its credential names `user`, its signature key is
/// `identity_key`, it is valid at `now` and not for too long in total, and
/// its capabilities are those of [`check_capabilities`]. The DS applies it
/// to published packages, a client to the packages it claims.
pub fn verify_key_package(
    crypto: &impl OpenMlsCrypto,
    bytes: &[u8],
    user: &str,
    identity_key: &[u8; 32],
    now: u64,
) -> Result<KeyPackage, KeyPackageError> {
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
    let found = principal_of(leaf.credential());
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
    check_lifetime_span(life).map_err(KeyPackageError::LifetimeTooLong)?;
    check_capabilities(leaf.capabilities()).map_err(KeyPackageError::Capabilities)?;
    Ok(kp)
}

/// [`verify_key_package`], returning what the DS stores about a package.
pub fn validate_key_package(
    crypto: &impl OpenMlsCrypto,
    bytes: &[u8],
    user: &str,
    identity_key: &[u8; 32],
    now: u64,
) -> Result<CheckedKeyPackage, KeyPackageError> {
    let kp = verify_key_package(crypto, bytes, user, identity_key, now)?;
    let life = kp.life_time();
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
