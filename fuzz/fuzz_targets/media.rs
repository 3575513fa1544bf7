//! The media format from the receiving side: header decoding, layout
//! arithmetic, and opening chunks that an attacker controls. Nothing may
//! panic, and no chunk the input made up may open under the fixed key
//! unless it is the chunk that key sealed.
#![no_main]

use huddle_core::media::{open_blob, Header, ItemKey, Opener, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = ItemKey::from_bytes([7; 32]);
    let _ = open_blob(&key, data);
    if let Ok(h) = Header::decode(data) {
        let l = h.layout();
        let _ = l.blob_len();
        let _ = l.chunk_count();
        for off in [0u64, 1, 81, 82, 83, l.blob_len(), l.blob_len().wrapping_add(1), u64::MAX] {
            let _ = l.locate(off);
        }
        let _ = l.span(0, h.total_len());
        let _ = l.span(h.total_len() / 2, h.total_len());
        let opener = Opener::new(&key, h);
        let rest = &data[HEADER_LEN.min(data.len())..];
        if let Ok(n) = l.sealed_len(0) {
            if rest.len() >= n {
                let mut buf = rest[..n].to_vec();
                // Forging a tag is not possible: this must fail.
                assert!(opener.open_chunk_in_place(0, &mut buf).is_err());
            }
        }
    }
});
