//! Mapping a verified SET's claims onto the model never panics, whatever JSON they hold.
#![no_main]
use libfuzzer_sys::fuzz_target;
use revsync::token::VerifiedJws;

fuzz_target!(|data: &[u8]| {
    let Ok(serde_json::Value::Object(claims)) = serde_json::from_slice(data) else {
        return;
    };
    let jws = VerifiedJws {
        iss: "https://as.example".into(),
        header: serde_json::Map::new(),
        claims,
    };
    if let Ok(Some(event)) = revsync::formats::set::map_verified(&jws) {
        assert_eq!(event.revocation.iss(), "https://as.example");
    }
});
