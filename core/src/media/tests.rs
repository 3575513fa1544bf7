//! Tests of the media format: sealing and opening chunks, headers, tampering.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;
use crate::ids::{GroupId, MediaId};

const MIN: u32 = MIN_CHUNK_SIZE;

fn key(b: u8) -> ItemKey {
    ItemKey::from_bytes([b; KEY_LEN])
}

fn header(media: u8, group: u8, salt: u8, chunk_size: u32, total_len: u64) -> Header {
    Header::new(
        MediaId([media; 16]),
        GroupId([group; 16]),
        [salt; SALT_LEN],
        chunk_size,
        total_len,
    )
    .unwrap()
}

/// Deterministic pseudo-random bytes from a seed (BLAKE3 in XOF mode).
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// The sealed chunks of a blob, in order.
fn sealed_chunks(layout: Layout, blob: &[u8]) -> Vec<Vec<u8>> {
    (0..layout.chunk_count())
        .map(|i| {
            let at = layout.chunk_offset(i).unwrap() as usize;
            blob[at..at + layout.sealed_len(i).unwrap()].to_vec()
        })
        .collect()
}

/// Opens sealed chunks presented in stream order, as a streaming receiver
/// would: element `i` is opened as chunk `i`.
fn open_stream(opener: &Opener, chunks: &[Vec<u8>]) -> Result<Vec<u8>, MediaError> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        buf.clear();
        buf.extend_from_slice(c);
        opener.open_chunk_in_place(i as u32, &mut buf)?;
        out.extend_from_slice(&buf);
    }
    Ok(out)
}

// ---------------------------------------------------------------- header

#[test]
fn header_encoding_is_the_documented_layout() {
    let h = Header::new(
        MediaId([0x11; 16]),
        GroupId([0x22; 16]),
        [0x33; 32],
        0x0004_0000,
        0x01_0203_0405,
    )
    .unwrap();
    let mut want = Vec::new();
    want.extend_from_slice(b"HDLM");
    want.push(1);
    want.push(0);
    want.extend_from_slice(&[0x00, 0x04, 0x00, 0x00]);
    want.extend_from_slice(&[0, 0, 0, 0x01, 0x02, 0x03, 0x04, 0x05]);
    want.extend_from_slice(&[0x11; 16]);
    want.extend_from_slice(&[0x22; 16]);
    want.extend_from_slice(&[0x33; 32]);
    assert_eq!(want.len(), HEADER_LEN);
    assert_eq!(h.encode().to_vec(), want);
    assert_eq!(Header::decode(&want).unwrap(), h);
    // Bytes after the header are ignored.
    want.extend_from_slice(b"chunk data");
    assert_eq!(Header::decode(&want).unwrap(), h);
}

#[test]
fn header_decode_asks_for_more_bytes() {
    let enc = header(1, 2, 3, MIN, 1000).encode();
    for len in 0..HEADER_LEN {
        let err = Header::decode(&enc[..len]).unwrap_err();
        assert_eq!(
            err,
            MediaError::Incomplete {
                needed: HEADER_LEN - len
            }
        );
        assert!(err.is_incomplete());
    }
}

#[test]
fn header_decode_rejects_invalid_fields() {
    let enc = header(1, 2, 3, MIN, 1000).encode();
    let with = |at: usize, bytes: &[u8]| {
        let mut e = enc;
        e[at..at + bytes.len()].copy_from_slice(bytes);
        Header::decode(&e)
    };
    let magic = Err(MediaError::BadHeader(HeaderFault::Magic));
    assert_eq!(with(0, b"HDLX"), magic);
    assert_eq!(with(0, b"hdlm"), magic);
    // A wrong prefix is refused before the header is complete.
    assert_eq!(Header::decode(b"HX"), magic);
    assert_eq!(Header::decode(b"X"), magic);
    assert_eq!(with(4, &[2]), Err(MediaError::UnsupportedVersion(2)));
    assert_eq!(with(4, &[0]), Err(MediaError::UnsupportedVersion(0)));
    assert_eq!(
        Header::decode(&[b'H', b'D', b'L', b'M', 9]),
        Err(MediaError::UnsupportedVersion(9))
    );
    assert_eq!(
        with(5, &[1]),
        Err(MediaError::BadHeader(HeaderFault::Reserved(1)))
    );
    for bad in [0, 16, MIN - 16, MIN + 8, MAX_CHUNK_SIZE + 16, u32::MAX] {
        assert_eq!(
            with(6, &bad.to_be_bytes()),
            Err(MediaError::InvalidChunkSize(bad))
        );
    }
    for good in [MIN, MIN + 16, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE] {
        assert_eq!(with(6, &good.to_be_bytes()).unwrap().chunk_size(), good);
    }
    let big = MAX_TOTAL_LEN + 1;
    assert_eq!(
        with(10, &big.to_be_bytes()),
        Err(MediaError::TooLarge { total_len: big })
    );
    assert_eq!(
        with(10, &MAX_TOTAL_LEN.to_be_bytes()).unwrap().total_len(),
        MAX_TOTAL_LEN
    );
}

#[test]
fn errors_read_well() {
    assert_eq!(
        MediaError::InvalidChunkSize(5).to_string(),
        "invalid chunk size 5: must be a multiple of 16 between 65536 and 1048576 bytes"
    );
    assert_eq!(
        MediaError::Integrity { chunk: 3 }.to_string(),
        "chunk 3 failed authentication (wrong key, or modified, moved or foreign data)"
    );
    assert_eq!(
        MediaError::BadHeader(HeaderFault::Reserved(7)).to_string(),
        "not a Huddle media header: reserved byte is 0x07, must be 0"
    );
}

// ---------------------------------------------------------------- layout

#[test]
fn layout_arithmetic() {
    let h = HEADER_LEN as u64;
    let t = TAG_LEN as u64;

    let empty = Layout::new(MIN, 0).unwrap();
    assert_eq!(empty.chunk_count(), 1);
    assert_eq!(empty.plaintext_len(0), Ok(0));
    assert_eq!(empty.sealed_len(0), Ok(TAG_LEN));
    assert_eq!(empty.blob_len(), h + t);

    let one = Layout::new(MIN, 1).unwrap();
    assert_eq!(one.chunk_count(), 1);
    assert_eq!(one.plaintext_len(0), Ok(1));

    let full = Layout::new(MIN, u64::from(MIN)).unwrap();
    assert_eq!(full.chunk_count(), 1);
    assert_eq!(full.plaintext_len(0), Ok(MIN as usize));
    assert_eq!(full.blob_len(), h + u64::from(MIN) + t);

    let c = u64::from(MIN);
    let l = Layout::new(MIN, 3 * c + 5).unwrap();
    assert_eq!(l.chunk_count(), 4);
    assert_eq!(l.last_index(), 3);
    assert_eq!(l.plaintext_len(2), Ok(MIN as usize));
    assert_eq!(l.plaintext_len(3), Ok(5));
    assert_eq!(
        l.plaintext_len(4),
        Err(MediaError::NoSuchChunk {
            index: 4,
            chunks: 4
        })
    );
    assert_eq!(l.chunk_offset(0), Ok(h));
    assert_eq!(l.chunk_offset(3), Ok(h + 3 * (c + t)));
    assert!(l.chunk_offset(4).is_err());
    assert_eq!(l.blob_len(), h + 3 * c + 5 + 4 * t);
    assert_eq!(
        l.chunk_offset(3).unwrap() + l.sealed_len(3).unwrap() as u64,
        l.blob_len()
    );

    // The largest item with the smallest chunks still has a u32 count.
    let max = Layout::new(MIN, MAX_TOTAL_LEN).unwrap();
    assert_eq!(max.chunk_count(), 1 << 24);
    assert_eq!(max.blob_len(), h + MAX_TOTAL_LEN + (1 << 24) * t);
    assert_eq!(
        Layout::new(MIN, MAX_TOTAL_LEN + 1),
        Err(MediaError::TooLarge {
            total_len: MAX_TOTAL_LEN + 1
        })
    );
    assert_eq!(
        Layout::new(MIN + 1, 10),
        Err(MediaError::InvalidChunkSize(MIN + 1))
    );
    assert_eq!(
        Layout::new(MAX_CHUNK_SIZE * 2, 10),
        Err(MediaError::InvalidChunkSize(MAX_CHUNK_SIZE * 2))
    );
}

#[test]
fn span_and_locate() {
    let c = u64::from(MIN);
    let h = HEADER_LEN as u64;
    let t = TAG_LEN as u64;
    let l = Layout::new(MIN, 3 * c + 5).unwrap();

    let s = l.span(0, 1).unwrap();
    assert_eq!((s.first, s.last, s.skip), (0, 0, 0));
    assert_eq!((s.blob_start, s.blob_end), (h, h + c + t));

    // A range straddling the boundary of chunks 1 and 2.
    let s = l.span(2 * c - 10, 2 * c + 10).unwrap();
    assert_eq!(s.chunks(), 1..=2);
    assert_eq!(s.skip, MIN as usize - 10);
    assert_eq!(s.blob_start, h + c + t);
    assert_eq!(s.blob_end, h + 3 * (c + t));
    assert_eq!(s.blob_len(), 2 * (c + t));

    // The tail of the item, in the short last chunk.
    let s = l.span(3 * c + 4, 3 * c + 5).unwrap();
    assert_eq!((s.first, s.last, s.skip), (3, 3, 4));
    assert_eq!(s.blob_end, l.blob_len());

    for (start, end) in [(0, 0), (5, 5), (6, 5), (0, 3 * c + 6)] {
        assert_eq!(
            l.span(start, end),
            Err(MediaError::BadRange {
                start,
                end,
                total_len: 3 * c + 5
            })
        );
    }
    assert!(Layout::new(MIN, 0).unwrap().span(0, 1).is_err());

    assert_eq!(l.locate(0), Some(BlobPosition::Header { within: 0 }));
    assert_eq!(l.locate(h - 1), Some(BlobPosition::Header { within: 81 }));
    assert_eq!(
        l.locate(h),
        Some(BlobPosition::Chunk {
            index: 0,
            within: 0
        })
    );
    assert_eq!(
        l.locate(h + c + t - 1),
        Some(BlobPosition::Chunk {
            index: 0,
            within: MIN as usize + TAG_LEN - 1
        })
    );
    assert_eq!(
        l.locate(h + 3 * (c + t) + 20),
        Some(BlobPosition::Chunk {
            index: 3,
            within: 20
        })
    );
    assert_eq!(l.locate(l.blob_len()), Some(BlobPosition::End));
    assert_eq!(l.locate(l.blob_len() + 1), None);
}

// ------------------------------------------------------- sealing/opening

#[test]
fn empty_item_is_one_empty_final_chunk() {
    let h = header(1, 2, 3, MIN, 0);
    let blob = seal_blob(&key(9), h, &[]).unwrap();
    assert_eq!(blob.len(), HEADER_LEN + TAG_LEN);
    assert_eq!(&blob[..HEADER_LEN], &h.encode());
    let (got, plain) = open_blob(&key(9), &blob).unwrap();
    assert_eq!(got, h);
    assert!(plain.is_empty());

    // Streaming: chunk 0 is the final one and holds nothing.
    let sealer = Sealer::new(&key(9), h);
    let mut buf = Vec::new();
    assert_eq!(
        sealer.seal_chunk_in_place(0, false, &mut buf),
        Err(MediaError::LastFlag {
            index: 0,
            last: false,
            final_index: 0
        })
    );
    sealer.seal_chunk_in_place(0, true, &mut buf).unwrap();
    assert_eq!(buf, blob[HEADER_LEN..]);
}

#[test]
fn sealer_checks_index_flag_and_size() {
    let c = MIN as usize;
    let h = header(1, 2, 3, MIN, 2 * c as u64 + 7);
    let sealer = Sealer::new(&key(9), h);

    let mut buf = vec![0u8; c];
    assert_eq!(
        sealer.seal_chunk_in_place(3, false, &mut buf),
        Err(MediaError::NoSuchChunk {
            index: 3,
            chunks: 3
        })
    );
    assert_eq!(
        sealer.seal_chunk_in_place(1, true, &mut buf),
        Err(MediaError::LastFlag {
            index: 1,
            last: true,
            final_index: 2
        })
    );
    assert_eq!(
        sealer.seal_chunk_in_place(2, false, &mut buf),
        Err(MediaError::LastFlag {
            index: 2,
            last: false,
            final_index: 2
        })
    );
    assert_eq!(
        sealer.seal_chunk_in_place(2, true, &mut buf),
        Err(MediaError::ChunkLength {
            index: 2,
            expected: 7,
            actual: c
        })
    );
    let mut short = vec![0u8; c - 1];
    assert_eq!(
        sealer.seal_chunk_in_place(0, false, &mut short),
        Err(MediaError::ChunkLength {
            index: 0,
            expected: c,
            actual: c - 1
        })
    );
    // Refusals leave the buffer as it was.
    assert_eq!(buf, vec![0u8; c]);
    assert_eq!(short, vec![0u8; c - 1]);

    // A buffer with room for the tag is not reallocated.
    let mut buf = Vec::with_capacity(c + TAG_LEN);
    buf.resize(c, 0xaa);
    let ptr = buf.as_ptr();
    sealer.seal_chunk_in_place(0, false, &mut buf).unwrap();
    assert_eq!(buf.len(), c + TAG_LEN);
    assert_eq!(buf.as_ptr(), ptr);

    assert_eq!(
        seal_blob(&key(9), h, &[0u8; 10]),
        Err(MediaError::PlaintextLength {
            expected: 2 * c as u64 + 7,
            actual: 10
        })
    );
}

/// Sealing in a slice gives the bytes sealing in a `Vec` gives, and checks
/// the same things.
#[test]
fn sealing_in_a_slice_matches_sealing_in_place() {
    let c = MIN as usize;
    let plain = bytes(6, 2 * c + 9);
    let h = header(1, 2, 3, MIN, plain.len() as u64);
    let blob = seal_blob(&key(9), h, &plain).unwrap();
    let chunks = sealed_chunks(h.layout(), &blob);
    let sealer = Sealer::new(&key(9), h);
    for (i, piece) in plain.chunks(c).enumerate() {
        let mut slice = piece.to_vec();
        slice.resize(piece.len() + TAG_LEN, 0xee);
        sealer
            .seal_chunk_in_slice(i as u32, i == 2, &mut slice)
            .unwrap();
        assert_eq!(slice, chunks[i], "chunk {i}");
    }
    let mut short = vec![0u8; c + TAG_LEN - 1];
    assert_eq!(
        sealer.seal_chunk_in_slice(0, false, &mut short),
        Err(MediaError::ChunkLength {
            index: 0,
            expected: c,
            actual: c - 1
        })
    );
    assert!(short.iter().all(|&b| b == 0), "left untouched");
    let mut last = vec![0u8; 9 + TAG_LEN];
    assert_eq!(
        sealer.seal_chunk_in_slice(2, false, &mut last),
        Err(MediaError::LastFlag {
            index: 2,
            last: false,
            final_index: 2
        })
    );
}

/// Opening in a slice gives the same plaintext as opening in a `Vec`, and
/// refuses the same chunks, leaving only zeros behind.
#[test]
fn opening_in_a_slice_matches_opening_in_place() {
    let c = MIN as usize;
    let plain = bytes(4, 2 * c + 5);
    let h = header(1, 2, 3, MIN, plain.len() as u64);
    let blob = seal_blob(&key(9), h, &plain).unwrap();
    let chunks = sealed_chunks(h.layout(), &blob);
    let opener = Opener::new(&key(9), h);
    let mut out = Vec::new();
    for (i, sealed) in chunks.iter().enumerate() {
        let mut slice = sealed.clone();
        let n = opener.open_chunk_in_slice(i as u32, &mut slice).unwrap();
        out.extend_from_slice(&slice[..n]);
    }
    assert_eq!(out, plain);

    let mut tampered = chunks[2].clone();
    tampered[3] ^= 1;
    assert_eq!(
        opener.open_chunk_in_slice(2, &mut tampered),
        Err(MediaError::Integrity { chunk: 2 })
    );
    assert!(
        tampered.iter().all(|&b| b == 0),
        "nothing decrypted is left"
    );
    let mut short = chunks[0][..c].to_vec();
    assert_eq!(
        opener.open_chunk_in_slice(0, &mut short),
        Err(MediaError::ChunkLength {
            index: 0,
            expected: c + TAG_LEN,
            actual: c
        })
    );
}

#[test]
fn opener_checks_index_and_size_and_clears_on_failure() {
    let c = MIN as usize;
    let h = header(1, 2, 3, MIN, c as u64 + 7);
    let blob = seal_blob(&key(9), h, &bytes(1, c + 7)).unwrap();
    let chunks = sealed_chunks(h.layout(), &blob);
    let opener = Opener::new(&key(9), h);

    let mut buf = chunks[1].clone();
    assert_eq!(
        opener.open_chunk_in_place(2, &mut buf),
        Err(MediaError::NoSuchChunk {
            index: 2,
            chunks: 2
        })
    );
    assert_eq!(
        opener.open_chunk_in_place(0, &mut buf),
        Err(MediaError::ChunkLength {
            index: 0,
            expected: c + TAG_LEN,
            actual: 7 + TAG_LEN
        })
    );
    assert_eq!(buf, chunks[1]);
    buf.pop();
    assert_eq!(
        opener.open_chunk_in_place(1, &mut buf),
        Err(MediaError::ChunkLength {
            index: 1,
            expected: 7 + TAG_LEN,
            actual: 6 + TAG_LEN
        })
    );

    let mut buf = chunks[1].clone();
    buf[0] ^= 1;
    assert_eq!(
        opener.open_chunk_in_place(1, &mut buf),
        Err(MediaError::Integrity { chunk: 1 })
    );
    assert!(
        buf.is_empty(),
        "no unauthenticated plaintext is left behind"
    );

    let wrong_key = Opener::new(&key(8), h);
    let mut buf = chunks[0].clone();
    assert_eq!(
        wrong_key.open_chunk_in_place(0, &mut buf),
        Err(MediaError::Integrity { chunk: 0 })
    );
}

#[test]
fn open_blob_checks_length() {
    let h = header(1, 2, 3, MIN, 100);
    let blob = seal_blob(&key(9), h, &bytes(2, 100)).unwrap();
    let expected = blob.len() as u64;
    assert_eq!(
        open_blob(&key(9), &blob[..10]),
        Err(MediaError::Truncated {
            expected: HEADER_LEN as u64,
            actual: 10
        })
    );
    assert_eq!(
        open_blob(&key(9), &blob[..blob.len() - 1]),
        Err(MediaError::Truncated {
            expected,
            actual: expected - 1
        })
    );
    let mut longer = blob.clone();
    longer.push(0);
    assert_eq!(
        open_blob(&key(9), &longer),
        Err(MediaError::TrailingData {
            expected,
            actual: expected + 1
        })
    );
    assert_eq!(
        open_blob(&key(8), &blob),
        Err(MediaError::Integrity { chunk: 0 })
    );
}

#[test]
fn keys_never_printed() {
    let raw = [0x5a; KEY_LEN];
    let k = ItemKey::from_bytes(raw);
    let h = header(1, 2, 3, MIN, 10);
    let printed = [
        format!("{k:?}"),
        format!("{:?}", Sealer::new(&k, h)),
        format!("{:?}", Opener::new(&k, h)),
        format!("{:#?}", Sealer::new(&k, h)),
    ];
    for p in printed {
        assert!(!p.contains(&hex::encode(raw)), "{p}");
        assert!(!p.contains("5a5a"), "{p}");
        assert!(!p.contains("90, 90"), "{p}");
        assert!(!p.contains("0x5a"), "{p}");
        assert!(p.contains("hidden"), "{p}");
    }
}

#[test]
fn final_flag_is_bound_to_the_chunk() {
    let c = MIN as usize;
    let h = header(1, 2, 3, MIN, 2 * c as u64 + 9);
    let blob = seal_blob(&key(9), h, &bytes(3, 2 * c + 9)).unwrap();
    let chunks = sealed_chunks(h.layout(), &blob);
    let opener = Opener::new(&key(9), h);

    // The final chunk opened as a non-final one.
    let mut buf = chunks[2].clone();
    assert_eq!(
        opener.open_with_flag(2, false, &mut buf),
        Err(MediaError::Integrity { chunk: 2 })
    );
    // Middle and first chunks opened as the final one (as a truncating
    // attacker would need).
    for (i, chunk) in chunks.iter().enumerate().take(2) {
        let mut buf = chunk.clone();
        assert_eq!(
            opener.open_with_flag(i as u32, true, &mut buf),
            Err(MediaError::Integrity { chunk: i as u32 })
        );
    }
    // With the right flags they open.
    for (i, c) in chunks.iter().enumerate() {
        let mut buf = c.clone();
        opener.open_with_flag(i as u32, i == 2, &mut buf).unwrap();
    }
}

// ------------------------------------------------------------- proptests

/// A chunk size, and a plaintext length of up to three chunks that hits
/// exact multiples, one-byte tails and full-minus-one tails often.
fn shape() -> impl Strategy<Value = (u32, u64)> {
    (
        prop_oneof![Just(MIN), Just(MIN + 16), Just(2 * MIN)],
        0u64..=2,
        prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>()],
    )
        .prop_map(|(cs, full, tail)| {
            let c = u64::from(cs);
            let tail = if tail == u64::MAX { c - 1 } else { tail % c };
            (cs, full * c + tail)
        })
}

/// A shape with at least two chunks, for tests that move chunks around.
fn multi_shape() -> impl Strategy<Value = (u32, u64)> {
    shape().prop_filter("at least two chunks", |&(cs, len)| len > u64::from(cs))
}

struct Item {
    header: Header,
    plain: Vec<u8>,
    blob: Vec<u8>,
}

fn item(cs: u32, len: u64, seed: u64) -> Item {
    let header = header(1, 2, 3, cs, len);
    let plain = bytes(seed, len as usize);
    let blob = seal_blob(&key(9), header, &plain).unwrap();
    Item {
        header,
        plain,
        blob,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn round_trip((cs, len) in shape(), seed in any::<u64>()) {
        let it = item(cs, len, seed);
        let layout = it.header.layout();
        prop_assert_eq!(it.blob.len() as u64, layout.blob_len());
        prop_assert_eq!(&it.blob[..HEADER_LEN], &it.header.encode()[..]);
        let (h, plain) = open_blob(&key(9), &it.blob).unwrap();
        prop_assert_eq!(h, it.header);
        prop_assert_eq!(&plain, &it.plain);

        // Streaming through one buffer gives the same blob.
        let sealer = Sealer::new(&key(9), it.header);
        let mut blob = it.header.encode().to_vec();
        let mut buf = Vec::with_capacity(cs as usize + TAG_LEN);
        for i in 0..layout.chunk_count() {
            let at = i as usize * cs as usize;
            buf.clear();
            buf.extend_from_slice(&it.plain[at..at + layout.plaintext_len(i).unwrap()]);
            sealer.seal_chunk_in_place(i, i == layout.last_index(), &mut buf).unwrap();
            blob.extend_from_slice(&buf);
        }
        prop_assert_eq!(&blob, &it.blob);
        let opener = Opener::new(&key(9), Header::decode(&blob).unwrap());
        prop_assert_eq!(open_stream(&opener, &sealed_chunks(layout, &blob)).unwrap(), it.plain);
    }

    #[test]
    fn range_reads(
        (cs, len) in shape().prop_filter("non-empty", |s| s.1 > 0),
        a in any::<prop::sample::Index>(),
        b in any::<prop::sample::Index>(),
    ) {
        let it = item(cs, len, 7);
        let layout = it.header.layout();
        let (x, y) = (a.index(len as usize) as u64, b.index(len as usize) as u64);
        let (start, end) = (x.min(y), x.max(y) + 1);
        let span = layout.span(start, end).unwrap();
        // Only the needed chunks are fetched.
        let c = u64::from(cs);
        prop_assert!(u64::from(span.first) * c <= start);
        prop_assert!(start < u64::from(span.first + 1) * c);
        prop_assert!(u64::from(span.last) * c < end);
        prop_assert!(end <= u64::from(span.last + 1) * c);
        prop_assert_eq!(span.blob_start, layout.chunk_offset(span.first).unwrap());
        // Decrypt just the fetched bytes.
        let fetched = &it.blob[span.blob_start as usize..span.blob_end as usize];
        let opener = Opener::new(&key(9), it.header);
        let mut out = Vec::new();
        let mut rest = fetched;
        let mut buf = Vec::new();
        for i in span.chunks() {
            let (sealed, tail) = rest.split_at(layout.sealed_len(i).unwrap());
            rest = tail;
            buf.clear();
            buf.extend_from_slice(sealed);
            opener.open_chunk_in_place(i, &mut buf).unwrap();
            out.extend_from_slice(&buf);
        }
        prop_assert!(rest.is_empty());
        let got = &out[span.skip..span.skip + (end - start) as usize];
        prop_assert_eq!(got, &it.plain[start as usize..end as usize]);
    }

    #[test]
    fn resume_from_any_blob_offset((cs, len) in shape(), at in any::<prop::sample::Index>()) {
        let it = item(cs, len, 11);
        let layout = it.header.layout();
        let offset = at.index(it.blob.len() + 1) as u64;
        // Rebuild the rest of the blob from `offset` as a resuming sender does.
        let sealer = Sealer::new(&key(9), it.header);
        let mut rest = Vec::new();
        let mut next = match layout.locate(offset).unwrap() {
            BlobPosition::End => layout.chunk_count(),
            BlobPosition::Header { within } => {
                rest.extend_from_slice(&it.header.encode()[within..]);
                0
            }
            BlobPosition::Chunk { index, within } => {
                let at = index as usize * cs as usize;
                let mut buf = it.plain[at..at + layout.plaintext_len(index).unwrap()].to_vec();
                sealer.seal_chunk_in_place(index, index == layout.last_index(), &mut buf).unwrap();
                rest.extend_from_slice(&buf[within..]);
                index + 1
            }
        };
        while next < layout.chunk_count() {
            let at = next as usize * cs as usize;
            let mut buf = it.plain[at..at + layout.plaintext_len(next).unwrap()].to_vec();
            sealer.seal_chunk_in_place(next, next == layout.last_index(), &mut buf).unwrap();
            rest.extend_from_slice(&buf);
            next += 1;
        }
        prop_assert_eq!(&rest[..], &it.blob[offset as usize..]);
    }

    #[test]
    fn any_flipped_byte_is_refused(
        (cs, len) in shape(),
        at in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let it = item(cs, len, 5);
        let layout = it.header.layout();
        let pos = at.index(it.blob.len());
        let mut blob = it.blob.clone();
        blob[pos] ^= mask;
        let err = open_blob(&key(9), &blob).unwrap_err();
        match pos {
            0..=3 => prop_assert_eq!(err, MediaError::BadHeader(HeaderFault::Magic)),
            4 => prop_assert_eq!(err, MediaError::UnsupportedVersion(1 ^ mask)),
            5 => prop_assert_eq!(err, MediaError::BadHeader(HeaderFault::Reserved(mask))),
            // Chunk size: invalid, or a valid size that changes the
            // expected length, or (for an empty item, whose blob length
            // does not depend on it) a different associated data.
            6..=9 => prop_assert!(
                matches!(
                    err,
                    MediaError::InvalidChunkSize(_)
                        | MediaError::Truncated { .. }
                        | MediaError::TrailingData { .. }
                        | MediaError::Integrity { chunk: 0 }
                ),
                "{:?}", err
            ),
            // Total length: the blob length is strictly increasing in it.
            10..=17 => prop_assert!(
                matches!(
                    err,
                    MediaError::TooLarge { .. }
                        | MediaError::Truncated { .. }
                        | MediaError::TrailingData { .. }
                ),
                "{:?}", err
            ),
            // Ids and salt: the associated data (and, for the salt, the
            // key) changes, so the first chunk fails.
            18..=81 => prop_assert_eq!(err, MediaError::Integrity { chunk: 0 }),
            _ => {
                let Some(BlobPosition::Chunk { index, .. }) = layout.locate(pos as u64) else {
                    unreachable!("a byte after the header is in a chunk");
                };
                prop_assert_eq!(err, MediaError::Integrity { chunk: index });
            }
        }
    }

    #[test]
    fn truncation_is_refused((cs, len) in shape(), at in any::<prop::sample::Index>()) {
        let it = item(cs, len, 6);
        let layout = it.header.layout();
        let cut = at.index(it.blob.len());
        let err = open_blob(&key(9), &it.blob[..cut]).unwrap_err();
        let expected = if cut < HEADER_LEN { HEADER_LEN as u64 } else { layout.blob_len() };
        prop_assert_eq!(err, MediaError::Truncated { expected, actual: cut as u64 });

        // A streaming receiver sees a short chunk, or runs out of chunks.
        if cut >= HEADER_LEN {
            let opener = Opener::new(&key(9), it.header);
            let mut buf = Vec::new();
            let mut complete = 0;
            for i in 0..layout.chunk_count() {
                let start = layout.chunk_offset(i).unwrap() as usize;
                if start >= cut {
                    break;
                }
                let end = (start + layout.sealed_len(i).unwrap()).min(cut);
                buf.clear();
                buf.extend_from_slice(&it.blob[start..end]);
                match opener.open_chunk_in_place(i, &mut buf) {
                    Ok(()) => complete += 1,
                    Err(e) => {
                        prop_assert!(
                            matches!(e, MediaError::ChunkLength { index, .. } if index == i),
                            "{:?}", e
                        );
                        break;
                    }
                }
            }
            prop_assert!(complete < layout.chunk_count());
        }
    }

    #[test]
    fn dropped_chunk_is_refused((cs, len) in multi_shape(), k in any::<prop::sample::Index>()) {
        let it = item(cs, len, 8);
        let layout = it.header.layout();
        let mut chunks = sealed_chunks(layout, &it.blob);
        let k = k.index(chunks.len());
        let dropped = chunks.remove(k);
        let mut blob = it.header.encode().to_vec();
        chunks.iter().for_each(|c| blob.extend_from_slice(c));
        let expected = layout.blob_len();
        prop_assert_eq!(
            open_blob(&key(9), &blob).unwrap_err(),
            MediaError::Truncated { expected, actual: expected - dropped.len() as u64 }
        );
        // Streaming, the chunk that moved into slot k is refused.
        let opener = Opener::new(&key(9), it.header);
        let streamed = open_stream(&opener, &chunks);
        if k == chunks.len() {
            // The final chunk was dropped: the others open, but they are
            // fewer than the header's chunk count, so the item is not
            // complete (and none of them opens as the final chunk, see
            // `final_flag_is_bound_to_the_chunk`).
            prop_assert!(streamed.is_ok());
            prop_assert!((chunks.len() as u32) < layout.chunk_count());
        } else {
            let err = streamed.unwrap_err();
            if chunks[k].len() == layout.sealed_len(k as u32).unwrap() {
                prop_assert_eq!(err, MediaError::Integrity { chunk: k as u32 });
            } else {
                prop_assert!(
                    matches!(err, MediaError::ChunkLength { index, .. } if index == k as u32),
                    "{:?}", err
                );
            }
        }
    }

    #[test]
    fn swapped_chunks_are_refused(
        (cs, len) in multi_shape(),
        a in any::<prop::sample::Index>(),
        b in any::<prop::sample::Index>(),
    ) {
        let it = item(cs, len, 9);
        let layout = it.header.layout();
        let mut chunks = sealed_chunks(layout, &it.blob);
        let n = chunks.len();
        let i = a.index(n);
        let j = (i + 1 + b.index(n - 1)) % n;
        chunks.swap(i, j);
        let mut blob = it.header.encode().to_vec();
        chunks.iter().for_each(|c| blob.extend_from_slice(c));
        prop_assert_eq!(blob.len(), it.blob.len());
        prop_assert_eq!(
            open_blob(&key(9), &blob).unwrap_err(),
            MediaError::Integrity { chunk: i.min(j) as u32 }
        );
    }

    #[test]
    fn duplicated_chunk_is_refused(
        (cs, len) in multi_shape(),
        a in any::<prop::sample::Index>(),
        b in any::<prop::sample::Index>(),
    ) {
        let it = item(cs, len, 10);
        let layout = it.header.layout();
        let chunks = sealed_chunks(layout, &it.blob);
        let n = chunks.len();
        let i = a.index(n);
        let j = (i + 1 + b.index(n - 1)) % n;

        // Chunk i inserted again after itself: the blob is too long, and a
        // streaming receiver refuses the copy in slot i + 1.
        let mut dup = chunks.clone();
        dup.insert(i + 1, chunks[i].clone());
        let mut blob = it.header.encode().to_vec();
        dup.iter().for_each(|c| blob.extend_from_slice(c));
        let expected = layout.blob_len();
        prop_assert_eq!(
            open_blob(&key(9), &blob).unwrap_err(),
            MediaError::TrailingData { expected, actual: expected + chunks[i].len() as u64 }
        );
        let opener = Opener::new(&key(9), it.header);
        let err = open_stream(&opener, &dup).unwrap_err();
        prop_assert!(
            matches!(
                err,
                MediaError::Integrity { chunk } | MediaError::ChunkLength { index: chunk, .. }
                    if chunk == i as u32 + 1
            ) || matches!(err, MediaError::NoSuchChunk { index, .. } if index == n as u32),
            "{:?}", err
        );

        // Chunk i written over chunk j where they have the same size.
        if chunks[i].len() == chunks[j].len() {
            let mut over = chunks.clone();
            over[j] = chunks[i].clone();
            let mut blob = it.header.encode().to_vec();
            over.iter().for_each(|c| blob.extend_from_slice(c));
            prop_assert_eq!(
                open_blob(&key(9), &blob).unwrap_err(),
                MediaError::Integrity { chunk: j as u32 }
            );
        }
    }

    #[test]
    fn foreign_chunks_are_refused(
        (cs, len) in shape(),
        k in any::<prop::sample::Index>(),
        which in 0u8..3,
    ) {
        let it = item(cs, len, 12);
        let layout = it.header.layout();
        // Same key, same plaintext, same layout; one of media id, salt or
        // group id differs.
        let other = match which {
            0 => header(4, 2, 3, cs, len),
            1 => header(1, 2, 4, cs, len),
            _ => header(1, 4, 3, cs, len),
        };
        let foreign = seal_blob(&key(9), other, &it.plain).unwrap();
        let k = k.index(layout.chunk_count() as usize) as u32;
        let at = layout.chunk_offset(k).unwrap() as usize;
        let end = at + layout.sealed_len(k).unwrap();
        let mut blob = it.blob.clone();
        blob[at..end].copy_from_slice(&foreign[at..end]);
        prop_assert_ne!(&blob, &it.blob);
        prop_assert_eq!(open_blob(&key(9), &blob).unwrap_err(), MediaError::Integrity { chunk: k });
        // And the foreign header with this item's chunks.
        let mut blob = it.blob.clone();
        blob[..HEADER_LEN].copy_from_slice(&other.encode());
        prop_assert_eq!(open_blob(&key(9), &blob).unwrap_err(), MediaError::Integrity { chunk: 0 });
    }
}
