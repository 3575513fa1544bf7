//! Inputs that once broke a fuzz target (`fuzz/regressions/messages/`),
//! replayed on every test run with the same property the target checks:
//! decoding never panics, and whatever decodes re-encodes to the same bytes.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use huddle_core::proto::{decode, encode_body, Control, Event, Message, Request, Response};

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(name: &str, data: &[u8]) {
    if let Ok(m) = decode::<M>(data) {
        assert_eq!(
            encode_body(&m),
            data,
            "{name}: decoded from other bytes than its encoding"
        );
    }
}

#[test]
fn message_decoder_regressions_hold() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/messages");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&path).unwrap();
        round_trip::<Request>(&name, &data);
        round_trip::<Response>(&name, &data);
        round_trip::<Event>(&name, &data);
        round_trip::<Control>(&name, &data);
        seen += 1;
    }
    assert!(
        seen >= 2,
        "expected the committed regression inputs in {}",
        dir.display()
    );
}

/// The first regression: a variant index written as an overlong varint
/// (`0x80 0x00` for 0). Once accepted as the same message, it is refused
/// now that every message has one encoding.
#[test]
fn overlong_varints_are_refused() {
    assert_eq!(decode::<Request>(&[0]), Ok(Request::Challenge));
    assert!(decode::<Request>(&[0x80, 0x00]).is_err());
}
