//! Inputs that once broke a fuzz target (`fuzz/regressions/messages/`),
//! replayed on every test run with the same property the target checks:
//! decoding never panics, and whatever decodes survives a round trip.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use huddle_core::proto::{decode, encode_body, Control, Event, Message, Request, Response};

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(name: &str, data: &[u8]) {
    if let Ok(m) = decode::<M>(data) {
        let again = encode_body(&m);
        assert!(
            again.len() <= data.len(),
            "{name}: re-encoding grew the message"
        );
        assert_eq!(
            decode::<M>(&again).as_ref(),
            Ok(&m),
            "{name}: changed in a round trip"
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
/// (`0x80 0x00` for 0) is accepted, and re-encoding writes the short form.
#[test]
fn overlong_varints_decode_to_the_same_message() {
    let short = decode::<Request>(&[0]).unwrap();
    let long = decode::<Request>(&[0x80, 0x00]).unwrap();
    assert_eq!(short, long);
    assert_eq!(encode_body(&long), vec![0]);
}
