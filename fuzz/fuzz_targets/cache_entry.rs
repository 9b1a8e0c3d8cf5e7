//! Fuzzes the token cache's entry opener (`bearerd::token::cache_fuzzing`): what a token
//! source takes from bytes found in its store (a file, or a Redis value), in clear and sealed,
//! for a Bearer and a DPoP source whose `max_lifetime` is an hour.
//!
//! Checks: no panic; nothing over the entry cap is taken; a token taken is of the source's
//! type and lives at most `max_lifetime`, whatever the entry says; an entry taken in clear is
//! taken the same once sealed; a message about an entry never quotes its `access_token`.
#![no_main]

use std::time::Duration;

use bearerd::token::cache_fuzzing::{open, reseal, MAX_ENTRY_BYTES};
use libfuzzer_sys::fuzz_target;

const MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// The `access_token` the input holds, if it is JSON with one long enough to be told apart
/// from the words of a message.
fn access_token(data: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(data).ok()?;
    let start = text.find("\"access_token\":\"")? + "\"access_token\":\"".len();
    let token = &text[start..start + text[start..].find('"')?];
    (token.len() >= 12).then(|| token.to_owned())
}

fuzz_target!(|data: &[u8]| {
    let quoted = access_token(data);
    for dpop in [false, true] {
        for sealed in [false, true] {
            match open(data, sealed, dpop, MAX_LIFETIME) {
                Ok(token) => {
                    assert!(data.len() <= MAX_ENTRY_BYTES, "{} bytes taken", data.len());
                    assert!(token.lifetime <= MAX_LIFETIME, "{:?}", token.lifetime);
                    let scheme = if dpop { "DPoP " } else { "Bearer " };
                    assert!(token.authorization().as_bytes().starts_with(scheme.as_bytes()));
                    if !sealed {
                        let sealed = reseal(data).expect("an entry taken in clear seals");
                        match open(&sealed, true, dpop, MAX_LIFETIME) {
                            Ok(again) => assert_eq!(again.authorization(), token.authorization()),
                            // The clock may have passed the entry's last second in between.
                            Err(message) => assert!(message.contains("expired"), "{message}"),
                        }
                    }
                }
                Err(message) => {
                    if let Some(token) = &quoted {
                        assert!(!message.contains(token.as_str()), "quoted: {message}");
                    }
                }
            }
        }
    }
});
