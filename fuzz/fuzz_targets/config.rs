//! Fuzzes the config file parser and validator (`bearerd::config::Config::parse`) on any
//! UTF-8 text.
//!
//! Checks: no panic, and every error message starts with the file name, as in
//! `fuzz.toml:3:1: upstream[0].url: ...`, so a user can always tell where the problem is.
#![no_main]

use std::path::Path;

use bearerd::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(error) = Config::parse(Path::new("fuzz.toml"), text) {
        let message = error.to_string();
        assert!(message.starts_with("fuzz.toml:"), "message: {message:?}");
    }
});
