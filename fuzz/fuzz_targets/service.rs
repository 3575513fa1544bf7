//! The DS request handler driven by an arbitrary sequence of frames on one
//! connection. One service (and store) lives across inputs, so state built
//! by earlier inputs (users, groups, key packages) is there for later ones.
//! Every request must get an answer and nothing may panic, whatever the
//! order (authentication, groups, posts, reads).
#![no_main]

use std::sync::{Arc, OnceLock};

use huddle_core::frame::Decoder;
use huddle_core::proto::{decode, Request};
use huddle_server::service::{Service, Session};
use huddle_server::store::redb::RedbStore;
use huddle_server::ServerConfig;
use libfuzzer_sys::fuzz_target;

struct World {
    rt: tokio::runtime::Runtime,
    svc: Arc<Service>,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Arc::new(ServerConfig {
            data_dir: dir.path().to_owned(),
            ..ServerConfig::default()
        });
        let svc = rt.block_on(async {
            let store = Arc::new(RedbStore::open(&dir.path().join("db.redb")).expect("store"));
            Service::new(config, store).expect("service")
        });
        World { rt, svc, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let w = world();
    let session = Session::new(u64::from(n), [n; 32], w.svc.budgets.connection());
    let mut d = Decoder::new(1 << 20);
    d.extend(rest);
    w.rt.block_on(async {
        for _ in 0..64 {
            let Ok(Some(body)) = d.next_frame() else { break };
            if let Ok(req) = decode::<Request>(&body) {
                let _ = w.svc.handle(&session, req).await;
            }
        }
    });
});
