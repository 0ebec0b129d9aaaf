//! Config parsing never panics on any text, and anything accepted renders and re-parses.
#![no_main]
use libfuzzer_sys::fuzz_target;
use revsync::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text, Vec::new()) {
        let shown = config.to_redacted_toml();
        Config::parse(&shown, Vec::new()).expect("the effective config re-parses");
    }
});
