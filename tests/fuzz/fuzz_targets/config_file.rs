//! A configuration file: TOML into the schema, then validation (which may read the secret
//! files the input names, and nothing else).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_runtime::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = toml::from_str::<Config>(text) {
        let _ = config.validate();
    }
});
