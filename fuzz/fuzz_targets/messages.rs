//! Message bodies: decoding must never panic, and whatever decodes has one
//! encoding: re-encoding it gives the very bytes decoded (overlong varints
//! are refused).
#![no_main]

use huddle_core::proto::{decode, encode_body, Control, Event, Message, Request, Response};
use libfuzzer_sys::fuzz_target;

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(m) = decode::<M>(data) {
        assert_eq!(encode_body(&m), data, "a message decoded from other bytes than its encoding");
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Request>(data);
    round_trip::<Response>(data);
    round_trip::<Event>(data);
    round_trip::<Control>(data);
    let _ = huddle_client::app::AppMessage::decode(data);
});
