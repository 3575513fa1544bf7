//! Message bodies: decoding must never panic, and whatever decodes must
//! survive a round trip: re-encoding it and decoding that gives the same
//! message. (Decoders accept overlong varints, so the bytes themselves may
//! differ; encoders always write the shortest form, and nothing in the
//! protocol signs or hashes these encodings.)
#![no_main]

use huddle_core::proto::{decode, encode_body, Control, Event, Message, Request, Response};
use libfuzzer_sys::fuzz_target;

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(m) = decode::<M>(data) {
        let again = encode_body(&m);
        assert!(again.len() <= data.len(), "re-encoding grew the message");
        assert_eq!(decode::<M>(&again).as_ref(), Ok(&m), "a message changed in a round trip");
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Request>(data);
    round_trip::<Response>(data);
    round_trip::<Event>(data);
    round_trip::<Control>(data);
    let _ = huddle_client::app::AppMessage::decode(data);
});
