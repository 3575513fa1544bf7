//! The DS request handler driven by an arbitrary sequence of frames on one
//! connection, against a DS of its own: every input starts from an empty
//! store, so a crash reproduces from its one saved input. Every request must
//! get an answer and nothing may panic, whatever the order
//! (authentication, groups, posts, reads).
#![no_main]

use std::sync::Arc;

use huddle_core::frame::Decoder;
use huddle_core::proto::{decode, Request};
use huddle_server::service::{Service, Session};
use huddle_server::store::redb::RedbStore;
use huddle_server::ServerConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Arc::new(ServerConfig {
        data_dir: dir.path().to_owned(),
        ..ServerConfig::default()
    });
    rt.block_on(async {
        let store = Arc::new(RedbStore::open(&dir.path().join("db.redb")).expect("store"));
        let svc = Service::new(config, store, None).expect("service");
        let session = Session::new(u64::from(n), [n; 32], svc.budgets.connection());
        let mut d = Decoder::new(1 << 20);
        d.extend(rest);
        for _ in 0..64 {
            let Ok(Some(body)) = d.next_frame() else { break };
            if let Ok(req) = decode::<Request>(&body) {
                let _ = svc.handle(&session, req).await;
            }
        }
        svc.close().await;
    });
});
