//! Fuzzes request rewriting (`bearerd::proxy::rewrite`): `Target::path_and_query_for` (and
//! `Target::serves`, for an absolute-form target) on the input as an app's request target, and
//! `strip_hop_by_hop` on the input as header lines (`name: value`, one per line; lines that are
//! not a valid header are skipped).
//!
//! Checks: no panic; a rewritten path starts with the base path `/v2/`; and after stripping,
//! no `connection`, `transfer-encoding`, `upgrade` or `proxy-authorization` header is left.
#![no_main]

use bearerd::proxy::rewrite::{strip_hop_by_hop, Target};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;

const ALWAYS_STRIPPED: [&str; 4] = [
    "connection",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

fuzz_target!(|data: &[u8]| {
    let url = Uri::from_static("https://api.example.com/v2");
    let target = Target::new(&url).expect("a fixed, valid upstream URL");
    if let Ok(app) = Uri::try_from(data) {
        if let Some(authority) = app.authority() {
            let _ = target.serves(authority);
        }
        if let Ok(path) = target.path_and_query_for(app) {
            assert!(path.as_str().starts_with("/v2/"), "rewritten to {path}");
        }
    }

    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    strip_hop_by_hop(&mut headers);
    for name in ALWAYS_STRIPPED {
        assert!(!headers.contains_key(name), "{name} left in {headers:?}");
    }
});
