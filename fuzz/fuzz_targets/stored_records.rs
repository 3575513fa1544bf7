//! Everything the DS and the client read back from disk: store records,
//! group state snapshots and the client's application payloads. Corrupt
//! bytes must give an error, never a panic.
#![no_main]

use huddle_core::proto::{InboxItem, LogEntry};
use huddle_server::store::{GroupMeta, MediaRecord, MemberRecord, StoredKeyPackage, UserRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = postcard::from_bytes::<UserRecord>(data);
    let _ = postcard::from_bytes::<StoredKeyPackage>(data);
    let _ = postcard::from_bytes::<GroupMeta>(data);
    let _ = postcard::from_bytes::<MemberRecord>(data);
    let _ = postcard::from_bytes::<MediaRecord>(data);
    let _ = postcard::from_bytes::<LogEntry>(data);
    let _ = postcard::from_bytes::<InboxItem>(data);
    // The DS contains a panic of openmls' storage while decoding state
    // (catch_unwind); libFuzzer's hook would abort on it even so, so it is
    // silenced for this call only. The call must still return.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let _ = huddle_server::group::restore_state_for_fuzzing(data);
    std::panic::set_hook(hook);
    let _ = huddle_client::app::AppMessage::decode(data);
});
