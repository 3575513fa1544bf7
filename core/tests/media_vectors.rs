//! Known-answer vectors for the media format, version 1
//! (`tests/vectors/media_v1.json`, specified in `docs/MEDIA.md`).
//!
//! Each case is checked twice: against this crate's implementation, and
//! against a second, independent computation written here from the
//! specification alone (HKDF and AES-256-GCM from the RustCrypto crates via
//! `openmls_rust_crypto`, header bytes and nonces assembled by hand).
#![allow(clippy::unwrap_used)]

use huddle_core::media::{
    open_blob, seal_blob, Header, ItemKey, Opener, Sealer, HEADER_LEN, TAG_LEN,
};
use huddle_core::{GroupId, MediaId};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{AeadType, HashType};
use serde::Deserialize;

const VECTORS: &str = include_str!("vectors/media_v1.json");

/// Bytes of the blob's start and end given for cases too large to store.
const EDGE: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Vectors {
    #[allow(dead_code)]
    description: String,
    #[allow(dead_code)]
    plaintext: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    item_key: String,
    salt: String,
    media_id: String,
    group_id: String,
    chunk_size: u32,
    total_len: u64,
    chunk_key: String,
    nonce_prefix: String,
    header: String,
    chunk_count: u32,
    blob_len: u64,
    blob_blake3: String,
    #[serde(default)]
    blob: Option<String>,
    #[serde(default)]
    blob_head: Option<String>,
    #[serde(default)]
    blob_tail: Option<String>,
}

fn unhex<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).unwrap();
    out
}

/// The plaintext of every case: byte `i` is `i mod 251`.
fn plaintext(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn cases() -> Vec<Case> {
    let v: Vectors = serde_json::from_str(VECTORS).unwrap();
    v.cases
}

impl Case {
    fn header(&self) -> Header {
        Header::new(
            MediaId(unhex(&self.media_id)),
            GroupId(unhex(&self.group_id)),
            unhex(&self.salt),
            self.chunk_size,
            self.total_len,
        )
        .unwrap()
    }

    fn key(&self) -> ItemKey {
        ItemKey::from_bytes(unhex(&self.item_key))
    }

    /// Asserts that `blob` is this case's blob.
    fn check_blob(&self, blob: &[u8], what: &str) {
        let name = &self.name;
        assert_eq!(blob.len() as u64, self.blob_len, "{name}: {what}: length");
        assert_eq!(
            blake3::hash(blob).to_hex().as_str(),
            self.blob_blake3,
            "{name}: {what}: BLAKE3"
        );
        match (&self.blob, &self.blob_head, &self.blob_tail) {
            (Some(full), None, None) => assert_eq!(hex::encode(blob), *full, "{name}: {what}"),
            (None, Some(head), Some(tail)) => {
                assert_eq!(hex::encode(&blob[..EDGE]), *head, "{name}: {what}: head");
                assert_eq!(
                    hex::encode(&blob[blob.len() - EDGE..]),
                    *tail,
                    "{name}: {what}: tail"
                );
            }
            _ => panic!("{name}: give either blob, or blob_head and blob_tail"),
        }
    }
}

#[test]
fn vectors_cover_the_edge_cases() {
    let cases = cases();
    let has = |f: &dyn Fn(&Case) -> bool| cases.iter().any(f);
    assert!(
        has(&|c| c.total_len == 0 && c.chunk_count == 1),
        "empty item"
    );
    assert!(
        has(&|c| c.total_len > 0 && c.total_len < u64::from(c.chunk_size)),
        "one partial chunk"
    );
    assert!(
        has(&|c| c.total_len == 65536 && c.chunk_size == 65536),
        "exactly one full 64 KiB chunk"
    );
    assert!(
        has(&|c| c.chunk_count > 2 && c.total_len % u64::from(c.chunk_size) != 0),
        "several chunks, short last"
    );
    assert!(
        has(&|c| c.chunk_count > 1 && c.total_len % u64::from(c.chunk_size) == 0),
        "several chunks, full last"
    );
}

#[test]
fn implementation_matches_vectors() {
    for case in cases() {
        let name = &case.name;
        let header = case.header();
        let layout = header.layout();
        assert_eq!(hex::encode(header.encode()), case.header, "{name}: header");
        assert_eq!(
            layout.chunk_count(),
            case.chunk_count,
            "{name}: chunk count"
        );
        assert_eq!(layout.blob_len(), case.blob_len, "{name}: blob length");

        let plain = plaintext(case.total_len);
        let blob = seal_blob(&case.key(), header, &plain).unwrap();
        case.check_blob(&blob, "seal_blob");

        let (decoded, opened) = open_blob(&case.key(), &blob).unwrap();
        assert_eq!(decoded, header, "{name}");
        assert!(opened == plain, "{name}: open_blob plaintext");

        // Chunk by chunk, through one buffer each way.
        let sealer = Sealer::new(&case.key(), header);
        let opener = Opener::new(&case.key(), Header::decode(&blob).unwrap());
        let mut streamed = header.encode().to_vec();
        let mut buf = Vec::with_capacity(case.chunk_size as usize + TAG_LEN);
        for (i, piece) in plain
            .chunks(case.chunk_size as usize)
            .chain(plain.is_empty().then_some(&[][..]))
            .enumerate()
        {
            let i = i as u32;
            buf.clear();
            buf.extend_from_slice(piece);
            sealer
                .seal_chunk_in_place(i, i == layout.last_index(), &mut buf)
                .unwrap();
            streamed.extend_from_slice(&buf);
            opener.open_chunk_in_place(i, &mut buf).unwrap();
            assert_eq!(buf, piece, "{name}: chunk {i}");
        }
        case.check_blob(&streamed, "Sealer");
    }
}

#[test]
fn independent_computation_matches_vectors() {
    let crypto = RustCrypto::default();
    for case in cases() {
        let name = &case.name;
        let ikm: [u8; 32] = unhex(&case.item_key);
        let salt: [u8; 32] = unhex(&case.salt);

        // HKDF-SHA256: extract with the salt, expand with the two labels.
        let prk = crypto
            .hkdf_extract(HashType::Sha2_256, &salt, &ikm)
            .unwrap();
        let chunk_key = crypto
            .hkdf_expand(
                HashType::Sha2_256,
                prk.as_slice(),
                b"huddle/1 media chunk key",
                32,
            )
            .unwrap();
        let prefix = crypto
            .hkdf_expand(
                HashType::Sha2_256,
                prk.as_slice(),
                b"huddle/1 media nonce prefix",
                7,
            )
            .unwrap();
        assert_eq!(hex::encode(chunk_key.as_slice()), case.chunk_key, "{name}");
        assert_eq!(hex::encode(prefix.as_slice()), case.nonce_prefix, "{name}");

        // Header, field by field.
        let mut header = Vec::new();
        header.extend_from_slice(b"HDLM");
        header.extend_from_slice(&[1, 0]);
        header.extend_from_slice(&case.chunk_size.to_be_bytes());
        header.extend_from_slice(&case.total_len.to_be_bytes());
        header.extend_from_slice(&hex::decode(&case.media_id).unwrap());
        header.extend_from_slice(&hex::decode(&case.group_id).unwrap());
        header.extend_from_slice(&salt);
        assert_eq!(header.len(), HEADER_LEN);
        assert_eq!(hex::encode(&header), case.header, "{name}: header");

        // Chunks: nonce = prefix || index (u32 BE) || final flag; AAD = header.
        let size = case.chunk_size as u64;
        let count = if case.total_len == 0 {
            1
        } else {
            case.total_len.div_ceil(size)
        };
        assert_eq!(count, u64::from(case.chunk_count), "{name}: chunk count");
        let plain = plaintext(case.total_len);
        let mut blob = header.clone();
        for i in 0..count {
            let start = (i * size) as usize;
            let end = ((i + 1) * size).min(case.total_len) as usize;
            let mut nonce = prefix.as_slice().to_vec();
            nonce.extend_from_slice(&(i as u32).to_be_bytes());
            nonce.push(u8::from(i == count - 1));
            let sealed = crypto
                .aead_encrypt(
                    AeadType::Aes256Gcm,
                    chunk_key.as_slice(),
                    &plain[start..end],
                    &nonce,
                    &header,
                )
                .unwrap();
            assert_eq!(sealed.len(), end - start + 16, "{name}: chunk {i}");
            blob.extend_from_slice(&sealed);
        }
        case.check_blob(&blob, "independent computation");
    }
}

#[test]
fn vectors_refuse_another_key() {
    for case in cases() {
        let blob = seal_blob(&case.key(), case.header(), &plaintext(case.total_len)).unwrap();
        let mut other = *case.key().as_bytes();
        other[0] ^= 1;
        assert!(
            open_blob(&ItemKey::from_bytes(other), &blob).is_err(),
            "{}",
            case.name
        );
    }
}
