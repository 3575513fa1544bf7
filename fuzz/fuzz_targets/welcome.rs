//! Welcomes as the DS cuts them: splitting never panics, and whatever
//! splits puts back together for each joiner into a Welcome that splits
//! again into the same shared part and exactly that joiner's secrets.
#![no_main]

use huddle_core::welcome::{join, split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = split(data) else { return };
    for (r, own) in &s.own {
        let again = split(&join(&s.shared, own)).expect("a joined Welcome splits");
        assert_eq!(again.shared, s.shared);
        assert_eq!(again.own, vec![(r.clone(), own.clone())]);
    }
});
