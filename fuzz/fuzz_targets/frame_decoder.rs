//! The incremental frame decoder, fed the input in pieces whose sizes come
//! from the input itself; every complete frame is decoded as each message
//! type. Nothing may panic, and the decoder must never hold more than one
//! frame's limit.
#![no_main]

use huddle_core::frame::{self, Decoder};
use huddle_core::proto::{decode, Control, Event, Request, Response};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut d = Decoder::new(MAX);
    for piece in rest.chunks(step) {
        d.extend(piece);
        loop {
            match d.next_frame() {
                Ok(Some(body)) => {
                    assert!(body.len() <= MAX);
                    let _ = decode::<Request>(&body);
                    let _ = decode::<Response>(&body);
                    let _ = decode::<Event>(&body);
                    let _ = decode::<Control>(&body);
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(!e.is_incomplete());
                    return;
                }
            }
        }
        assert!(d.buffered() <= MAX + frame::HEADER_LEN + step);
    }
    // The slice API agrees with the decoder on the first frame.
    let _ = frame::split(rest, MAX);
});
