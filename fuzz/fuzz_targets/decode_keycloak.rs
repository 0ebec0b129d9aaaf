//! The Keycloak decoder never panics, and what it maps survives the native round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use revsync::event::{decode_native, encode_native};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(event)) = revsync::formats::keycloak::decode(data, "https://kc.example/realms/r")
    {
        assert_eq!(event.revocation.iss(), "https://kc.example/realms/r");
        assert_eq!(
            decode_native(encode_native(&event).as_bytes()).unwrap(),
            event
        );
    }
});
