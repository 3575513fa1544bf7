//! What loading a group's MLS state costs a client, by group size and
//! encoding: openmls reads it back for every batch of messages processed.
//!
//! `cargo bench -p huddle-client --bench state`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use huddle_client::db::{LegacyJsonCodec, Provider, StateCodec};
use huddle_client::identity::Identity;
use huddle_core::mls;
use openmls::prelude::*;
use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use rusqlite::Connection;

/// An in-memory database holding a group of `n` members written with `C`.
fn group<C: Codec>(n: usize) -> (Connection, GroupId) {
    let mut conn = Connection::open_in_memory().expect("sqlite");
    SqliteStorageProvider::<C, &mut Connection>::new(&mut conn)
        .run_migrations()
        .expect("migrations");
    let crypto = RustCrypto::default();
    let alice = Identity::generate("alice");
    let gid = {
        let p = Provider::<C>::with_codec(&crypto, &conn);
        let mut g = MlsGroup::new(&p, &alice, &mls::create_config("alice"), alice.credential())
            .expect("group");
        let others = openmls_rust_crypto::OpenMlsRustCrypto::default();
        let kps: Vec<KeyPackage> = (1..n)
            .map(|i| {
                let id = Identity::generate(&format!("m{i}"));
                KeyPackage::builder()
                    .leaf_node_capabilities(mls::capabilities())
                    .build(mls::CIPHERSUITE, &others, &id, id.credential())
                    .expect("key package")
                    .key_package()
                    .clone()
            })
            .collect();
        g.add_members(&p, &alice, &kps).expect("add");
        g.merge_pending_commit(&p).expect("merge");
        g.group_id().clone()
    };
    (conn, gid)
}

fn load<C: Codec>(c: &mut Criterion, name: &str) {
    let mut g = c.benchmark_group(format!("load_group/{name}"));
    let crypto = RustCrypto::default();
    for n in [2usize, 200, 1000] {
        let (conn, gid) = group::<C>(n);
        let p = Provider::<C>::with_codec(&crypto, &conn);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                MlsGroup::load(p.storage(), &gid)
                    .expect("load")
                    .expect("stored")
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    load::<StateCodec>(c, "binary");
    load::<LegacyJsonCodec>(c, "json");
}

criterion_group! {
    name = state;
    config = Criterion::default().sample_size(20);
    targets = benches
}
criterion_main!(state);
