//! A Welcome as the DS stores it: cut into the part every joiner shares
//! (the message header and the encrypted GroupInfo) and each joiner's
//! encrypted group secrets, by key-package reference, so that a Welcome to
//! hundreds of members is stored once plus one small part each; and put
//! back together for one joiner, who receives a Welcome with exactly its
//! own secrets (RFC 9420 §12.4.3.1).
//!
//! Only the TLS framing of `MLSMessage` and `Welcome` is read (RFC 9420
//! §6, §12.4.3.1): no key is involved, and what is inside the parts is not
//! interpreted.

use bytes::Bytes;
use tls_codec::{DeserializeBytes as _, VLBytes};

/// Bytes before the `secrets` vector of a Welcome `MLSMessage`: version,
/// wire format, cipher suite (two each).
pub const HEAD: usize = 6;

/// `wire_format` of a Welcome (RFC 9420 §6).
const WIRE_FORMAT_WELCOME: u16 = 3;

/// A Welcome cut apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The header and the encrypted GroupInfo, shared by every joiner.
    pub shared: Bytes,
    /// Each joiner's `EncryptedGroupSecrets`, encoded, with the
    /// key-package reference it is for (`new_member`), in order.
    pub own: Vec<(Vec<u8>, Bytes)>,
}

/// Why bytes are not a Welcome that can be cut apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WelcomeError {
    /// The bytes end early.
    #[error("the Welcome is truncated")]
    Truncated,
    /// Not an `MLSMessage` carrying a Welcome.
    #[error("not a Welcome message")]
    NotWelcome,
    /// A length is not in its shortest form, or is the reserved encoding.
    #[error("a length is not a valid variable-length integer")]
    BadLength,
    /// An element of the Welcome does not decode.
    #[error("the Welcome does not decode: {0}")]
    Invalid(String),
    /// Bytes follow the Welcome.
    #[error("{0} bytes follow the Welcome")]
    Trailing(usize),
}

/// Reads an MLS variable-length integer (RFC 9420 §2.1.2): the shortest
/// form only. Returns the value and the bytes it took.
pub(crate) fn read_varint(b: &[u8]) -> Result<(usize, usize), WelcomeError> {
    let first = *b.first().ok_or(WelcomeError::Truncated)?;
    let n = match first >> 6 {
        0 => 1,
        1 => 2,
        2 => 4,
        _ => return Err(WelcomeError::BadLength),
    };
    let bytes = b.get(..n).ok_or(WelcomeError::Truncated)?;
    let mut v = usize::from(first & 0x3f);
    for &x in &bytes[1..] {
        v = (v << 8) | usize::from(x);
    }
    let shortest = match v {
        0..=0x3f => 1,
        0x40..=0x3fff => 2,
        _ => 4,
    };
    if n != shortest {
        return Err(WelcomeError::BadLength);
    }
    Ok((v, n))
}

/// Appends an MLS variable-length integer (at most 30 bits).
fn put_varint(out: &mut Vec<u8>, len: usize) {
    if len < 1 << 6 {
        out.push(len as u8);
    } else if len < 1 << 14 {
        out.extend_from_slice(&((len as u16) | 0x4000).to_be_bytes());
    } else {
        out.extend_from_slice(&((len as u32) | 0x8000_0000).to_be_bytes());
    }
}

/// One `opaque<V>` at the start of `b`: its content and the rest.
fn opaque(b: &[u8]) -> Result<(VLBytes, &[u8]), WelcomeError> {
    // The length first, so a padded one is refused whatever tls_codec
    // accepts, and a truncated one before tls_codec sees it (its debug
    // builds assert on a vector cut short).
    let (len, n) = read_varint(b)?;
    if b.len() - n < len {
        return Err(WelcomeError::Truncated);
    }
    VLBytes::tls_deserialize_bytes(b).map_err(|e| WelcomeError::Invalid(format!("{e:?}")))
}

/// Cuts a Welcome `MLSMessage` apart (see the module's description).
pub fn split(bytes: &[u8]) -> Result<Split, WelcomeError> {
    let head = bytes.get(..HEAD).ok_or(WelcomeError::Truncated)?;
    if u16::from_be_bytes([head[2], head[3]]) != WIRE_FORMAT_WELCOME {
        return Err(WelcomeError::NotWelcome);
    }
    let (secrets_len, n) = read_varint(&bytes[HEAD..])?;
    let start = HEAD + n;
    let mut secrets = bytes
        .get(start..start + secrets_len)
        .ok_or(WelcomeError::Truncated)?;
    let group_info = &bytes[start + secrets_len..];
    let mut own = Vec::new();
    while !secrets.is_empty() {
        // EncryptedGroupSecrets: new_member (KeyPackageRef), then the
        // HPKECiphertext (kem_output, ciphertext).
        let (new_member, rest) = opaque(secrets)?;
        let (_kem_output, rest) = opaque(rest)?;
        let (_ciphertext, rest) = opaque(rest)?;
        let taken = secrets.len() - rest.len();
        own.push((
            new_member.as_slice().to_vec(),
            Bytes::copy_from_slice(&secrets[..taken]),
        ));
        secrets = rest;
    }
    // encrypted_group_info, the last field.
    let (_, rest) = opaque(group_info)?;
    if !rest.is_empty() {
        return Err(WelcomeError::Trailing(rest.len()));
    }
    let mut shared = Vec::with_capacity(HEAD + group_info.len());
    shared.extend_from_slice(head);
    shared.extend_from_slice(group_info);
    Ok(Split {
        shared: Bytes::from(shared),
        own,
    })
}

/// The Welcome one joiner receives: the shared part around its own
/// encrypted group secrets (one `EncryptedGroupSecrets`, as [`split`] cut
/// it).
pub fn join(shared: &[u8], own: &[u8]) -> Bytes {
    let (head, rest) = shared.split_at(HEAD.min(shared.len()));
    let mut out = Vec::with_capacity(shared.len() + own.len() + 4);
    out.extend_from_slice(head);
    put_varint(&mut out, own.len());
    out.extend_from_slice(own);
    out.extend_from_slice(rest);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Welcome-shaped message: the header, `n` secrets and a GroupInfo.
    fn welcome(n: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut secrets = Vec::new();
        let mut each = Vec::new();
        for i in 0..n {
            let mut s = Vec::new();
            for part in [vec![i as u8; 32], vec![0xaa; 32], vec![0xbb; 100 + i]] {
                put_varint(&mut s, part.len());
                s.extend_from_slice(&part);
            }
            secrets.extend_from_slice(&s);
            each.push(s);
        }
        let mut out = vec![0, 1, 0, 3, 0, 1];
        put_varint(&mut out, secrets.len());
        out.extend_from_slice(&secrets);
        put_varint(&mut out, 300);
        out.extend_from_slice(&[0xcc; 300]);
        (out, each)
    }

    #[test]
    fn a_welcome_cut_apart_and_joined_for_one_is_that_joiners_welcome() {
        let (w, each) = welcome(3);
        let s = split(&w).unwrap();
        assert_eq!(s.own.len(), 3);
        for (i, (r, own)) in s.own.iter().enumerate() {
            assert_eq!(r, &vec![i as u8; 32]);
            assert_eq!(own.as_ref(), each[i].as_slice());
            // The joined message splits again into the same shared part and
            // exactly this joiner's secrets.
            let again = split(&join(&s.shared, own)).unwrap();
            assert_eq!(again.shared, s.shared);
            assert_eq!(again.own, vec![(r.clone(), own.clone())]);
        }
        // With every joiner's secrets, the original comes back.
        let all: Vec<u8> = each.concat();
        assert_eq!(join(&s.shared, &all).as_ref(), w.as_slice());
    }

    #[test]
    fn malformed_welcomes_are_refused_with_their_reason() {
        let (w, _) = welcome(2);
        assert_eq!(split(&w[..w.len() - 1]), Err(WelcomeError::Truncated));
        assert_eq!(split(&w[..4]), Err(WelcomeError::Truncated));
        let mut trailing = w.clone();
        trailing.push(0);
        assert_eq!(split(&trailing), Err(WelcomeError::Trailing(1)));
        let mut commit = w.clone();
        commit[3] = 1;
        assert_eq!(split(&commit), Err(WelcomeError::NotWelcome));
        // The secrets' length padded to four bytes.
        let (_, n) = read_varint(&w[HEAD..]).unwrap();
        assert_eq!(n, 2);
        let len = u16::from_be_bytes([w[HEAD], w[HEAD + 1]]) & 0x3fff;
        let mut padded = w[..HEAD].to_vec();
        padded.extend_from_slice(&(u32::from(len) | 0x8000_0000).to_be_bytes());
        padded.extend_from_slice(&w[HEAD + 2..]);
        assert_eq!(split(&padded), Err(WelcomeError::BadLength));
        // The reserved two-bit prefix.
        let mut reserved = w.clone();
        reserved[HEAD] |= 0xc0;
        assert_eq!(split(&reserved), Err(WelcomeError::BadLength));
    }
}
