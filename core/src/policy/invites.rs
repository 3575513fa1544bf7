//! Invites: the proofs a holder of an invite's secret makes (to fetch
//! what joining needs, and in the external commit that joins), their
//! checks, and the link-like token that carries the secret.

use super::{Context, Invite, Policy, PolicyError};

/// The `authenticated_data` of an external commit that joins by invite
/// starts with this, then holds the invite's public key (32 bytes) and
/// its signature (64 bytes) of the join.
pub const AAD_INVITE: &[u8] = b"invite";
pub(super) const JOIN_LABEL: &[u8] = b"huddle invite join v1";
const INFO_LABEL: &[u8] = b"huddle invite info v1";

/// What an invite's key signs: `label || group || epoch (u64 BE) ||
/// principal`.
fn invite_message(label: &[u8], group: &[u8; 16], epoch: u64, principal: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(label.len() + 24 + principal.len());
    m.extend_from_slice(label);
    m.extend_from_slice(group);
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(principal.as_bytes());
    m
}

/// A proof of holding `secret`: [`AAD_INVITE`], the key, the signature.
fn invite_proof(
    secret: &ed25519_dalek::SigningKey,
    label: &[u8],
    group: &[u8; 16],
    epoch: u64,
    principal: &str,
) -> Vec<u8> {
    use ed25519_dalek::Signer as _;
    let sig = secret.sign(&invite_message(label, group, epoch, principal));
    let mut out = AAD_INVITE.to_vec();
    out.extend_from_slice(secret.verifying_key().as_bytes());
    out.extend_from_slice(&sig.to_bytes());
    out
}

/// The `authenticated_data` of `principal`'s external commit joining
/// group `group` at `epoch` with the invite whose secret is `secret`.
pub fn join_aad(
    secret: &ed25519_dalek::SigningKey,
    group: &[u8; 16],
    epoch: u64,
    principal: &str,
) -> Vec<u8> {
    invite_proof(secret, JOIN_LABEL, group, epoch, principal)
}

/// The proof `principal` sends to fetch what joining group `group` needs
/// with the invite whose secret is `secret` (PROTOCOL.md 10.6).
pub fn info_proof(
    secret: &ed25519_dalek::SigningKey,
    group: &[u8; 16],
    principal: &str,
) -> Vec<u8> {
    invite_proof(secret, INFO_LABEL, group, 0, principal)
}

/// Checks a proof made by [`info_proof`] against `policy` at
/// `cx.now_ms`; returns the invite.
pub fn check_info_proof<'p>(
    policy: &'p Policy,
    group: &[u8; 16],
    proof: &[u8],
    principal: &str,
    now_ms: u64,
) -> Result<&'p Invite, PolicyError> {
    let cx = Context {
        group,
        aad: proof,
        now_ms,
    };
    check_invite(policy, INFO_LABEL, cx, 0, principal)
}

/// Checks an invite proof (`cx.aad`): the key is an invite of `policy`
/// that has not lapsed at `cx.now_ms`, and the signature verifies.
pub(super) fn check_invite<'p>(
    policy: &'p Policy,
    label: &[u8],
    cx: Context<'_>,
    epoch: u64,
    principal: &str,
) -> Result<&'p Invite, PolicyError> {
    let no = |m: &str| PolicyError::Forbidden(m.to_owned());
    let rest = cx
        .aad
        .strip_prefix(AAD_INVITE)
        .filter(|r| r.len() == 96)
        .ok_or_else(|| no("joining this group needs an invite"))?;
    let key: [u8; 32] = rest[..32].try_into().expect("32 bytes");
    let sig: [u8; 64] = rest[32..].try_into().expect("64 bytes");
    let invite = policy
        .invite(&key)
        .ok_or_else(|| no("the invite was revoked or never existed"))?;
    if invite.expires_ms < cx.now_ms {
        return Err(no("the invite has expired"));
    }
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&key)
        .map_err(|_| no("the invite's key is not a valid key"))?;
    vk.verify_strict(
        &invite_message(label, cx.group, epoch, principal),
        &ed25519_dalek::Signature::from_bytes(&sig),
    )
    .map_err(|_| no("the invite's signature does not verify"))?;
    Ok(invite)
}

/// The link-like token that carries an invite: the group's id and the
/// invite's secret, after `#` so that a link opener never sends it
/// anywhere.
pub fn invite_token(group: &[u8; 16], secret: &ed25519_dalek::SigningKey) -> String {
    format!(
        "huddle://join/{}#{}",
        hex::encode(group),
        hex::encode(secret.to_bytes())
    )
}

/// The group id and secret an invite token carries.
pub fn parse_invite_token(token: &str) -> Result<([u8; 16], ed25519_dalek::SigningKey), String> {
    let bad = || "not a Huddle invite (huddle://join/GROUP#SECRET)".to_owned();
    let rest = token
        .trim()
        .strip_prefix("huddle://join/")
        .ok_or_else(bad)?;
    let (group, secret) = rest.split_once('#').ok_or_else(bad)?;
    let group: [u8; 16] = hex::decode(group)
        .ok()
        .and_then(|g| g.try_into().ok())
        .ok_or_else(bad)?;
    let secret: [u8; 32] = hex::decode(secret)
        .ok()
        .and_then(|g| g.try_into().ok())
        .ok_or_else(bad)?;
    Ok((group, ed25519_dalek::SigningKey::from_bytes(&secret)))
}
