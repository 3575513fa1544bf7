//! Media chunk crypto: sealing and opening one chunk in place at the chunk
//! sizes the format allows, and hashing ciphertext with BLAKE3 (what the
//! DS and a downloading member do for every byte).
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use huddle_core::media::{Header, ItemKey, Opener, Sealer, TAG_LEN};
use huddle_core::{GroupId, MediaId};

fn chunk_crypto(c: &mut Criterion) {
    let key = ItemKey::from_bytes([7; 32]);
    let mut g = c.benchmark_group("media_chunk");
    for chunk in [64 * 1024u32, 256 * 1024, 1024 * 1024] {
        // Two full chunks; chunk 0 is a full, non-final one.
        let header = Header::new(
            MediaId([1; 16]),
            GroupId([2; 16]),
            [3; 32],
            chunk,
            2 * u64::from(chunk),
        )
        .unwrap();
        let sealer = Sealer::new(&key, header);
        let opener = Opener::new(&key, header);
        let plain = vec![0x42u8; chunk as usize];
        g.throughput(Throughput::Bytes(u64::from(chunk)));
        let mut buf = Vec::with_capacity(chunk as usize + TAG_LEN);
        g.bench_with_input(BenchmarkId::new("seal", chunk), &plain, |b, plain| {
            b.iter(|| {
                buf.clear();
                buf.extend_from_slice(plain);
                sealer.seal_chunk_in_place(0, false, &mut buf).unwrap();
                black_box(buf.len())
            })
        });
        let mut sealed = plain.clone();
        sealer.seal_chunk_in_place(0, false, &mut sealed).unwrap();
        g.bench_with_input(BenchmarkId::new("open", chunk), &sealed, |b, sealed| {
            b.iter(|| {
                buf.clear();
                buf.extend_from_slice(sealed);
                opener.open_chunk_in_place(0, &mut buf).unwrap();
                black_box(buf.len())
            })
        });
        g.bench_with_input(BenchmarkId::new("blake3", chunk), &sealed, |b, sealed| {
            b.iter(|| blake3::hash(black_box(sealed)))
        });
    }
    g.finish();
}

criterion_group!(benches, chunk_crypto);
criterion_main!(benches);
