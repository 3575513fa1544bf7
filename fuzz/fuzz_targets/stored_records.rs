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
    let _ = huddle_server::group::restore_state_for_fuzzing(data);
    let _ = huddle_client::app::AppMessage::decode(data);
});
