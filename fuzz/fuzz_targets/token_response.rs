//! Fuzzes what a token endpoint answers (`bearerd::token::response`): `parse_success` and
//! `parse_error` on any bytes, with a redactor holding a client secret, and `jwt_lifetime` on
//! the bytes when they are UTF-8.
//!
//! Checks: no panic; the `Display` and `Debug` of every error never contain the secret, in
//! any of the forms the redactor knows (an endpoint may echo the request back); and a JWT
//! lifetime, when there is one, is at least a second.
#![no_main]

use std::fmt::{Debug, Display};
use std::time::{Duration, UNIX_EPOCH};

use bearerd::secret::Redactor;
use bearerd::token::response::{jwt_lifetime, parse_error, parse_success};
use http::StatusCode;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret-Zx9";

fn assert_no_secret(error: &(impl Display + Debug), redactor: &Redactor) {
    let shown = format!("{error}\n{error:?}");
    // As it is, or in any form the redactor knows (encoded, inside base64 Basic credentials,
    // or wrapped in references and escapes that its normal form decodes).
    let leaked = shown.contains(SECRET) || redactor.finds_in(&shown);
    assert!(!leaked, "the secret is in an error: {shown}");
}

fuzz_target!(|data: &[u8]| {
    let mut redactor = Redactor::new();
    redactor.add_client_secret("fuzz-client", SECRET);

    if let Err(error) = parse_success(data, &redactor) {
        assert_no_secret(&error, &redactor);
    }
    let error = parse_error(StatusCode::UNAUTHORIZED, data, &redactor);
    assert_no_secret(&error, &redactor);

    if let Ok(text) = std::str::from_utf8(data) {
        // A fixed clock, so that a crash reproduces.
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        match jwt_lifetime(text, now) {
            Some(Ok(lifetime)) => assert!(lifetime >= Duration::from_secs(1), "{lifetime:?}"),
            Some(Err(error)) => assert_no_secret(&error, &redactor),
            None => {}
        }
    }
});
