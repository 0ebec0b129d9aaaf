//! The native v1 decoder never panics, and whatever it accepts re-encodes to an event it
//! decodes identically (so `revsync publish lines` round-trips anything it takes).
#![no_main]
use libfuzzer_sys::fuzz_target;
use revsync::event::{decode_native, encode_native};

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = decode_native(data) {
        let again =
            decode_native(encode_native(&event).as_bytes()).expect("re-encoded event decodes");
        assert_eq!(again, event);
    }
});
