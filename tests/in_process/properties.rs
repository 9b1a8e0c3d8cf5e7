//! Property tests (proptest) for the pure parts of bearerd that read untrusted input or do
//! timing arithmetic:
//! - the token endpoint's success parser (`token::response::parse_success`): no panic on any
//!   bytes or wild JSON, exact results for valid grants, and no access token in its errors;
//! - the error parser and JWT reader (`parse_error`, `jwt_lifetime`): no panic, the client
//!   secret scrubbed from whatever is quoted, and the exact lifetime from an `exp` claim;
//! - the config loader (`Config::parse`): no panic on any text or on mutations of a valid file,
//!   and every problem points at a real line of the file and is prefixed with its path;
//! - the refresh schedule (`token::schedule`): refresh delays before expiry and within their
//!   bounds, and backoff within `[base, cap]` (or `Retry-After`) and non-decreasing.
//!
//! Failing cases are not persisted to disk: proptest prints the minimal input instead.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bearerd::config::{Config, ConfigError};
use bearerd::secret::Redactor;
use bearerd::token::response::{jwt_lifetime, parse_error, parse_success};
use bearerd::token::schedule::{
    backoff, refresh_delay, usable_for, MAX_REFRESH_DELAY, MAX_RETRY_AFTER, MIN_REFRESH_DELAY,
};
use http::StatusCode;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde_json::Value;
use support::config::{payments, payments_token, string as toml_string, Admin, ConfigBuilder};

/// `cases` cases, and no `proptest-regressions` files written next to the tests.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases)
    }
}

/// A strategy that picks one of `items`.
fn one_of(items: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::sample::select(items).prop_map(str::to_owned)
}

// ---------------------------------------------------------------------------------------------
// JSON generators: raw JSON text, so that literals serde_json would never write (1e400, -0,
// 20-digit integers) reach the parser too.
// ---------------------------------------------------------------------------------------------

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// A JSON object with the fields in the given order (duplicates allowed).
fn json_object(fields: &[(String, String)]) -> String {
    let fields: Vec<String> = fields
        .iter()
        .map(|(key, value)| format!("{}:{value}", json_string(key)))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// Number literals: in and out of the u64, i64 and f64 ranges, fractional, exponents.
fn wild_number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| Value::from(f).to_string()),
        "-?[0-9]{1,3}(\\.[0-9]{1,12})?([eE][+-]?[0-9]{1,3})?",
        "-?[1-9][0-9]{18,40}",
        one_of(&[
            "0",
            "-0",
            "0.0",
            "-0.0",
            "0.5",
            "1",
            "1.0",
            "-1",
            "1e400",
            "-1e400",
            "1e-400",
            "1.7976931348623157e308",
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775808",
            "-9223372036854775809",
        ]),
    ]
}

/// A JSON string holding a number, perhaps with blanks around it.
fn numeric_string() -> impl Strategy<Value = String> {
    ("[ \t]{0,2}", wild_number(), "[ \t]{0,2}")
        .prop_map(|(before, n, after)| json_string(&format!("{before}{n}{after}")))
}

/// "bearer" in a random mix of upper and lower case.
fn bearer_variant() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<bool>(), 6).prop_map(|upper| {
        "bearer"
            .chars()
            .zip(upper)
            .map(|(c, up)| if up { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

/// Any JSON value, as text: scalars of every type, then arrays and objects of them.
fn wild_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        one_of(&["null", "true", "false", "\"\"", "\"bearer\"", "\"mac\""]),
        wild_number(),
        numeric_string(),
        any::<String>().prop_map(|s| json_string(&s)),
        bearer_variant().prop_map(|s| json_string(&s)),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-z_]{0,6}", inner), 0..4).prop_map(|f| json_object(&f)),
        ]
    })
}

/// Any JSON value that serde_json reads (no `1e400`, no leading zeros).
fn valid_json_value() -> impl Strategy<Value = String> {
    wild_value().prop_filter("valid JSON", |v| serde_json::from_str::<Value>(v).is_ok())
}

/// An access token that cannot turn up in a message by accident.
fn token() -> impl Strategy<Value = String> {
    "tok_[A-Za-z0-9]{12,40}"
}

/// A client secret that cannot turn up by accident, nor be made out of "[redacted]" (it has a
/// digit); `@/+%~` make its form-urlencoded form differ from it.
fn secret() -> impl Strategy<Value = String> {
    "S3c[A-Za-z0-9@/+%~._-]{5,29}"
}

/// The object `fields` describe, in a shuffled order.
fn shuffled_object(fields: Vec<(String, String)>) -> impl Strategy<Value = String> {
    Just(fields)
        .prop_shuffle()
        .prop_map(|fields| json_object(&fields))
}

/// A success-shaped body with every field absent or of any type.
fn wild_success_body() -> impl Strategy<Value = String> {
    let access_token = prop_oneof![
        3 => "[A-Za-z0-9._-]{0,20}".prop_map(|s| json_string(&s)),
        1 => wild_value(),
    ];
    let token_type = prop_oneof![bearer_variant().prop_map(|s| json_string(&s)), wild_value()];
    let expires_in = prop_oneof![wild_number(), numeric_string(), wild_value()];
    let extra_key = prop_oneof![
        "[a-z_]{1,12}",
        one_of(&["access_token", "token_type", "expires_in", "scope", "error"]),
    ];
    (
        prop::option::of(access_token),
        prop::option::of(token_type),
        prop::option::of(expires_in),
        prop::option::of(wild_value()),
        prop::collection::vec((extra_key, wild_value()), 0..3),
    )
        .prop_flat_map(|(access_token, token_type, expires_in, scope, extra)| {
            let mut fields: Vec<(String, String)> = [
                ("access_token", access_token),
                ("token_type", token_type),
                ("expires_in", expires_in),
                ("scope", scope),
            ]
            .into_iter()
            .filter_map(|(key, value)| Some((key.to_owned(), value?)))
            .collect();
            fields.extend(extra);
            shuffled_object(fields)
        })
}

/// What `parse_success` must do with `body`, checked against serde_json's own reading of it.
fn check_success_oracle(body: &[u8]) -> Result<(), TestCaseError> {
    let result = parse_success(body, &Redactor::new());
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
        prop_assert!(result.is_err(), "not a JSON object, yet parsed");
        return Ok(());
    };
    let token = match object.get("access_token") {
        Some(Value::String(t)) if !t.is_empty() => Some(t.as_str()),
        _ => None,
    };
    match &result {
        Ok(grant) => {
            prop_assert_eq!(Some(grant.access_token.expose()), token);
            prop_assert_ne!(grant.expires_in, Some(Duration::ZERO));
            prop_assert_eq!(
                grant.scope.as_deref(),
                object.get("scope").and_then(Value::as_str)
            );
            if let Some(n) = object.get("expires_in").and_then(Value::as_u64) {
                prop_assert_eq!(grant.expires_in, Some(Duration::from_secs(n)));
            }
            if matches!(object.get("expires_in"), None | Some(Value::Null)) {
                prop_assert_eq!(grant.expires_in, None);
            }
        }
        Err(e) => {
            // A usable token with nothing wrong around it must not be refused.
            let bearer = match object.get("token_type") {
                None | Some(Value::Null) => true,
                Some(Value::String(t)) => t.eq_ignore_ascii_case("bearer"),
                Some(_) => false,
            };
            let expires_ok = match object.get("expires_in") {
                None | Some(Value::Null) => true,
                Some(v) => v.as_u64().is_some_and(|n| n > 0),
            };
            prop_assert!(
                token.is_none() || !bearer || !expires_ok,
                "refused a valid grant: {e}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn parse_success_never_panics_on_any_bytes(
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        check_success_oracle(&body)?;
    }

    #[test]
    fn parse_success_never_panics_on_wild_objects(body in wild_success_body()) {
        check_success_oracle(body.as_bytes())?;
    }

    #[test]
    fn valid_grant_parses_exactly(
        token in token(),
        token_type in prop::option::of(bearer_variant()),
        n in 1u64..=1_000_000_000,
        as_string in any::<bool>(),
        scope in prop::option::of(any::<String>()),
        extra in prop::collection::vec(("x_[a-z_]{1,12}", valid_json_value()), 0..3),
        rotate in any::<Index>(),
    ) {
        let expires_in = if as_string { json_string(&n.to_string()) } else { n.to_string() };
        let mut fields = vec![
            ("access_token".to_owned(), json_string(&token)),
            ("expires_in".to_owned(), expires_in),
        ];
        if let Some(t) = &token_type {
            fields.push(("token_type".to_owned(), json_string(t)));
        }
        if let Some(s) = &scope {
            fields.push(("scope".to_owned(), json_string(s)));
        }
        fields.extend(extra);
        let len = fields.len();
        fields.rotate_left(rotate.index(len));
        let body = json_object(&fields);
        let grant = parse_success(body.as_bytes(), &Redactor::new()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(grant.access_token.expose(), token.as_str());
        prop_assert_eq!(grant.expires_in, Some(Duration::from_secs(n)));
        prop_assert_eq!(grant.scope, scope);
    }

    #[test]
    fn expires_in_under_a_second_is_refused(
        token in token(),
        expires_in in prop_oneof![
            one_of(&["0", "-0", "0.0", "-0.0", "0e5", "1e-400", "\"0\"", "\" 0 \"", "\"-0\""]),
            "0\\.[0-9]{1,9}",
            "-[1-9][0-9]{0,25}(\\.[0-9]{1,5})?",
            "\"-[1-9][0-9]{0,25}\"",
            "\"[0-9]{0,5}\\.[0-9]{1,5}\"",
        ],
    ) {
        let body = format!(r#"{{"access_token":"{token}","expires_in":{expires_in}}}"#);
        match parse_success(body.as_bytes(), &Redactor::new()) {
            Ok(grant) => prop_assert!(false, "accepted, expires_in {:?}", grant.expires_in),
            Err(e) => prop_assert!(!e.to_string().contains(&token), "token in {:?}", e),
        }
    }

    #[test]
    fn invalid_response_never_quotes_the_access_token(
        token in token(),
        shape in 0..4u8,
        token_type in prop::option::of(wild_value()),
        expires_in in prop::option::of(prop_oneof![wild_number(), wild_value()]),
        echoes in prop::collection::vec(
            (
                one_of(&[
                    "error", "error_description", "message", "result", "location", "scope",
                    "x_note",
                ]),
                any::<String>(),
                any::<String>(),
            ),
            0..3,
        ),
        corruption in prop_oneof![
            2 => Just(None),
            1 => any::<Index>().prop_map(|at| Some((at, String::new()))),
            1 => (any::<Index>(), any::<String>()).prop_map(Some),
        ],
        form_encoded in prop::bool::weighted(0.1),
    ) {
        let access_token = match shape {
            0 => json_string(&token),
            1 => format!("[{}]", json_string(&token)),
            2 => format!("{{\"value\":{}}}", json_string(&token)),
            _ => format!(" {} ", json_string(&token)),
        };
        let mut fields = vec![("access_token".to_owned(), access_token)];
        if let Some(t) = token_type {
            fields.push(("token_type".to_owned(), t));
        }
        if let Some(e) = expires_in {
            fields.push(("expires_in".to_owned(), e));
        }
        for (key, before, after) in echoes {
            fields.push((key, json_string(&format!("{before}{token}{after}"))));
        }
        let mut body = if form_encoded {
            format!("access_token={token}&token_type=bearer&expires_in=3600")
        } else {
            json_object(&fields)
        };
        if let Some((at, insert)) = corruption {
            // Cut the body at a character boundary and append something else.
            let cut = body.char_indices().map(|(i, _)| i).nth(at.index(body.chars().count()));
            body.truncate(cut.unwrap_or(body.len()));
            body.push_str(&insert);
        }
        if let Err(e) = parse_success(body.as_bytes(), &Redactor::new()) {
            prop_assert!(!e.to_string().contains(&token), "token in {:?}", e);
            prop_assert!(!e.to_string().contains(&token), "token in {}", e);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Error bodies and JWTs.
// ---------------------------------------------------------------------------------------------

fn status() -> impl Strategy<Value = StatusCode> {
    (100u16..1000).prop_map(|code| StatusCode::from_u16(code).unwrap())
}

fn form_encoded(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// An error-shaped JSON object, fields of any type.
fn wild_error_object() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        one_of(&[
            "error",
            "error_description",
            "message",
            "result",
            "location",
            "status",
            "detail"
        ]),
        "[a-z_]{1,10}",
    ];
    prop::collection::vec((key, wild_value()), 0..5).prop_map(|f| json_object(&f))
}

/// Whether a scrubbed `EndpointError` still holds `secret` (or its form-urlencoded form)
/// anywhere a person could read it.
fn leaks(e: &bearerd::token::response::EndpointError, secret: &str) -> Option<String> {
    let encoded = form_encoded(secret);
    let shown = [
        e.error.clone().unwrap_or_default(),
        e.description.clone().unwrap_or_default(),
        e.to_string(),
    ];
    shown
        .into_iter()
        .find(|s| s.contains(secret) || s.contains(&encoded))
}

/// Text with `secret` (or, sometimes, its form-urlencoded form) put between arbitrary pieces.
fn text_with_secret(secret: String) -> impl Strategy<Value = String> {
    prop::collection::vec((any::<String>(), prop::bool::weighted(0.2)), 1..4).prop_map(
        move |pieces| {
            let mut text = String::new();
            for (piece, encoded) in pieces {
                text.push_str(&piece);
                if encoded {
                    text.push_str(&form_encoded(&secret));
                } else {
                    text.push_str(&secret);
                }
            }
            text
        },
    )
}

/// A body holding `secret`: plain text, or a JSON object with it in string fields that the
/// parser quotes (or, nested, in the fallback that quotes the whole object).
fn body_with_secret(secret: String) -> impl Strategy<Value = String> {
    let key = prop_oneof![
        one_of(&[
            "error",
            "error_description",
            "message",
            "result",
            "location",
            "detail"
        ]),
        "[a-z_]{1,10}",
    ];
    let field = (
        key,
        text_with_secret(secret.clone()),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(key, text, nested)| {
            let value = json_string(&text);
            if nested {
                (key, format!("{{\"inner\":[{value}]}}"))
            } else {
                (key, value)
            }
        });
    let other = prop::collection::vec(("[a-z_]{1,10}", valid_json_value()), 0..3);
    prop_oneof![
        text_with_secret(secret),
        (prop::collection::vec(field, 1..4), other).prop_flat_map(|(mut fields, other)| {
            fields.extend(other);
            shuffled_object(fields)
        }),
    ]
}

/// A `SystemTime` up to 2^40 s either side of the epoch, with a sub-second part.
fn system_time() -> impl Strategy<Value = SystemTime> {
    (any::<bool>(), 0u64..(1 << 40), 0u32..1_000_000_000).prop_map(|(after, secs, nanos)| {
        let offset = Duration::new(secs, nanos);
        let time = if after {
            UNIX_EPOCH.checked_add(offset)
        } else {
            UNIX_EPOCH.checked_sub(offset)
        };
        time.unwrap_or(UNIX_EPOCH)
    })
}

fn b64(bytes: &[u8], padded: bool) -> String {
    if padded {
        base64::engine::general_purpose::URL_SAFE.encode(bytes)
    } else {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }
}

/// `exp` values: integers and floats in and out of range, numeric strings, anything.
fn exp_value() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| Value::from(f).to_string()),
        4 => "[0-9]{9,10}(\\.[0-9]{1,6})?",
        1 => wild_number(),
        1 => numeric_string(),
        1 => wild_value(),
    ]
}

/// Token-like strings: arbitrary, dotted, or a JWT whose claims are any JSON, mostly an object
/// with an `exp`.
fn jwt_like() -> impl Strategy<Value = String> {
    let claims = prop_oneof![
        6 => (exp_value(), prop::collection::vec(("[a-df-z]{1,5}", valid_json_value()), 0..3))
            .prop_flat_map(|(exp, mut claims)| {
                claims.push(("exp".to_owned(), exp));
                shuffled_object(claims)
            })
            .prop_map(String::into_bytes),
        1 => prop::collection::vec(
            (prop_oneof![Just("exp".to_owned()), "[a-z]{1,5}"], wild_value()),
            0..4
        )
        .prop_map(|f| json_object(&f).into_bytes()),
        1 => wild_value().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ];
    prop_oneof![
        1 => any::<String>(),
        1 => "[A-Za-z0-9_=.-]{0,40}",
        8 => (claims, any::<bool>(), "[A-Za-z0-9_-]{0,10}", "[A-Za-z0-9_=-]{0,10}").prop_map(
            |(claims, padded, header, signature)| {
                format!("{header}.{}.{signature}", b64(&claims, padded))
            }
        ),
    ]
}

/// A time near today's (where real `exp` claims are), or anywhere 2^40 s around the epoch.
fn jwt_now() -> impl Strategy<Value = SystemTime> {
    prop_oneof![
        (1_000_000_000u64..3_000_000_000, 0u32..1_000_000_000)
            .prop_map(|(s, n)| UNIX_EPOCH + Duration::new(s, n)),
        system_time(),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn parse_error_never_panics(
        status in status(),
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            any::<String>().prop_map(String::into_bytes),
            wild_error_object().prop_map(String::into_bytes),
        ],
        secret in prop::option::of(any::<String>()),
    ) {
        let redactor = redactor(secret.as_deref());
        let e = parse_error(status, &body, &redactor);
        prop_assert_eq!(e.status, status);
        // With nothing scrubbed, a body that is not a JSON object is quoted as a short,
        // single-line excerpt.
        let text = String::from_utf8_lossy(&body);
        let scrubbed = redactor.finds_in(&text);
        let object = matches!(serde_json::from_str::<Value>(&text), Ok(Value::Object(_)));
        if !scrubbed && !object {
            prop_assert_eq!(&e.error, &None);
            let description = e.description.as_deref().unwrap_or_default();
            prop_assert!(!description.is_empty());
            prop_assert!(description.chars().count() <= 201, "{:?}", description);
            prop_assert!(!description.chars().any(char::is_control), "{:?}", description);
        }
    }

    #[test]
    fn parse_error_scrubs_the_secret(
        (secret, body) in secret().prop_flat_map(|s| (Just(s.clone()), body_with_secret(s))),
        status in status(),
    ) {
        let e = parse_error(status, body.as_bytes(), &redactor(Some(&secret)));
        if let Some(shown) = leaks(&e, &secret) {
            prop_assert!(false, "secret {:?} shown in {:?}", secret, shown);
        }
    }

    #[test]
    fn jwt_lifetime_never_panics(token in jwt_like(), now in jwt_now()) {
        if let Some(Ok(lifetime)) = jwt_lifetime(&token, now) {
            // Only a token of three dot-separated parts can have a lifetime.
            prop_assert_eq!(token.split('.').count(), 3);
            prop_assert!(lifetime.subsec_nanos() == 0, "{:?}", lifetime);
        }
    }

    #[test]
    fn jwt_exp_gives_the_exact_lifetime(
        now in 0u64..4_000_000_000,
        ahead in prop_oneof![-1_000_000_000i64..10_000_000_000, -2i64..=2],
        sub_second in prop_oneof![Just(0u32), 1_000_000u32..1_000_000_000],
        other_claims in prop::collection::vec(
            (
                "[a-df-z]{1,5}",
                prop_oneof![
                    any::<i64>().prop_map(|n| n.to_string()),
                    any::<String>().prop_map(|s| json_string(&s)),
                    one_of(&["null", "true", "[]", "{\"exp\":1}"]),
                ],
            ),
            0..3,
        ),
        padded in any::<bool>(),
    ) {
        let exp = now.checked_add_signed(ahead).unwrap_or(0);
        let mut claims = other_claims;
        claims.push(("exp".to_owned(), exp.to_string()));
        let token = format!("{}.{}.sig", b64(br#"{"alg":"RS256"}"#, padded),
            b64(json_object(&claims).as_bytes(), padded));
        // A sub-second part of `now` (1 ms at least, so that f64 seconds keep it) makes the
        // lifetime, in whole seconds, one second shorter.
        let now_time = UNIX_EPOCH + Duration::new(now, sub_second);
        // Under a second left counts as expired: see `jwt_lifetime_is_never_zero`.
        let left = exp as f64 - (now as f64 + f64::from(sub_second) / 1e9);
        match jwt_lifetime(&token, now_time) {
            Some(Ok(lifetime)) => {
                prop_assert!(left >= 1.0, "exp {} is less than a second after now {}", exp, now);
                let expected = exp - now - u64::from(sub_second > 0);
                prop_assert_eq!(lifetime, Duration::from_secs(expected));
            }
            Some(Err(_)) => prop_assert!(left < 1.0, "exp {} is a second or more after now {}", exp, now),
            None => prop_assert!(false, "the exp claim was not read from {}", token),
        }
    }
}

/// A redactor for `secret` (sent with client id `app`), or one that removes nothing.
fn redactor(secret: Option<&str>) -> Redactor {
    let mut redactor = Redactor::new();
    if let Some(secret) = secret {
        redactor.add_client_secret("app", secret);
    }
    redactor
}

/// The leak `parse_error_scrubs_the_secret` cannot see: the scrub runs over the raw body,
/// but JSON string escapes (`\/` from PHP, `\u0026` for `&` from Go, `\"`, `\\`,
/// `\u00e9` from Python's `ensure_ascii`) hide the secret from it, and the parsed field, which
/// is quoted, holds the secret itself. `parse_error` scrubs the
/// parsed values too.
#[test]
fn parse_error_scrubs_json_escaped_secrets() {
    let mut runner = proptest::test_runner::TestRunner::new(config(256));
    let strategy = (
        "S3c[A-Za-z0-9/&<>\"\\\\é]{5,20}",
        prop::collection::vec(any::<bool>(), 25),
        one_of(&["error", "error_description", "message"]),
    );
    let result = runner.run(&strategy, |(secret, escape, key)| {
        let mut escaped = String::new();
        for (c, escape) in secret.chars().zip(escape.into_iter().chain([false; 8])) {
            match c {
                '"' => escaped.push_str("\\\""),
                '\\' => escaped.push_str("\\\\"),
                '/' if escape => escaped.push_str("\\/"),
                c if escape || !c.is_ascii() => {
                    escaped.push_str(&format!("\\u{:04x}", u32::from(c)));
                }
                c => escaped.push(c),
            }
        }
        let body = format!("{{\"{key}\":\"wrong client secret {escaped}\"}}");
        let e = parse_error(
            StatusCode::UNAUTHORIZED,
            body.as_bytes(),
            &redactor(Some(&secret)),
        );
        if let Some(shown) = leaks(&e, &secret) {
            return Err(TestCaseError::fail(format!(
                "secret {secret:?} in body {body} shown in {shown:?}"
            )));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A JWT whose `exp` is less than a second ahead must not get a lifetime of zero (as
/// `parse_success` refuses `expires_in` 0): such a token is never usable and its
/// `refresh_delay` is zero, so the refresher would fetch again at once, in a loop.
#[test]
fn jwt_lifetime_is_never_zero() {
    let mut runner = proptest::test_runner::TestRunner::new(config(256));
    let strategy = (
        1_000_000_000u64..3_000_000_000,
        0u32..1_000_000_000,
        0u64..3,
        0u32..1000,
    );
    let result = runner.run(&strategy, |(now, now_nanos, ahead, exp_millis)| {
        let exp = format!("{}.{exp_millis:03}", now + ahead);
        let claims = format!("{{\"exp\":{exp}}}");
        let token = format!("e30.{}.sig", b64(claims.as_bytes(), false));
        let now = UNIX_EPOCH + Duration::new(now, now_nanos);
        if let Some(Ok(lifetime)) = jwt_lifetime(&token, now) {
            prop_assert!(
                !lifetime.is_zero(),
                "claims {} at {:?} give a zero lifetime",
                claims,
                now.duration_since(UNIX_EPOCH).unwrap()
            );
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Config loader.
// ---------------------------------------------------------------------------------------------

/// The file the mutations start from: `VALID` of tests/support/config.rs with an `[admin]`
/// table before it and a `scope` after it, so that every table but `[server]` and `[log]` has
/// lines to mutate.
fn base() -> String {
    ConfigBuilder::empty()
        .admin(Admin::new().listen("127.0.0.1:9464"))
        .upstream(payments().token(payments_token().scope("read write")))
        .render()
}

/// TOML values of every kind, valid or nearly so, and strings shaped like what each key takes
/// (durations, addresses, URLs, log filters).
fn toml_scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        "[+-]?[0-9_]{1,25}",
        "0x[0-9a-fA-F_]{1,20}",
        "0o[0-7]{1,25}",
        "0b[01]{1,70}",
        any::<f64>().prop_map(|f| format!("{f:?}")),
        one_of(&[
            "true",
            "false",
            "inf",
            "-inf",
            "nan",
            "+nan",
            "1e400",
            "-0.0",
            "6.02e23",
            "1979-05-27T07:32:00Z",
            "1979-05-27",
            "07:32:00",
            "[]",
            "{}",
            "\"\"",
            "''",
            "\"\"\"\n\"\"\"",
        ]),
        // Values each key takes, and values just outside what it takes.
        one_of(&[
            "\"10s\"",
            "\"1ns\"",
            "\"0s\"",
            "\"2h 30m\"",
            "\"99999999999999999999y\"",
            "\"basic\"",
            "\"post\"",
            "\"Basic\"",
            "\"webpki\"",
            "\"native\"",
            "\"none\"",
            "\"json\"",
            "\"text\"",
            "\"info\"",
            "\"warn,bearerd=debug\"",
            "\"bearerd[span{field=1}]=trace\"",
            "\"127.0.0.1:0\"",
            "\"[::1]:8082\"",
            "\"http://localhost\"",
            "\"https://h/p?q=1\"",
            "\"ftp://h/\"",
            "\"https://\"",
            "\"/dev/null\"",
            "\"ca.pem\"",
            "{ grant_type = \"x\" }",
            "{ foo = \"bar\" }",
            "{ foo = 1 }",
            "8192",
            "8191",
            "0",
            "-1",
            "1",
        ]),
        any::<String>().prop_map(|s| toml_string(&s)),
        "'[^'\n]{0,20}'",
        "\"\"\"[a-z \n]{0,20}\"\"\"",
        "\"[0-9]{1,25} ?(ns|us|ms|s|m|h|d|w|M|y|x)( [0-9]{1,5}[a-z]{1,3}){0,2}\"",
        "\"(\\[[0-9a-f:]{0,12}\\]|[0-9.]{0,16}|[a-z]{0,8})(:[0-9]{0,6})?\"",
        "\"([a-z+]{0,6}:)?(//)?[a-z0-9.@:\\[\\]%-]{0,20}(/[a-z0-9?=&%#]{0,10})?\"",
        "\"[a-z_=,:\\[\\]{}./0-9 -]{0,30}\"",
        "\\[ ?(\"[a-z]{0,3}\"|[0-9]{1,3})?( ?, ?[0-9]{1,3}){0,2} ?\\]",
        "\\{ ?([a-z_]{1,12} = \"[a-z]{0,5}\")?( ?, ?[a-z_]{1,12} = [0-9]{1,3}){0,2} ?\\}",
    ]
}

/// Lines to insert: known keys with any value, table headers, or anything.
fn toml_line() -> impl Strategy<Value = String> {
    let key = one_of(&[
        "listen",
        "name",
        "url",
        "connect_timeout",
        "response_header_timeout",
        "retry_on_401",
        "client_id",
        "client_secret",
        "client_secret_env",
        "client_secret_file",
        "auth",
        "scope",
        "audience",
        "resource",
        "params",
        "timeout",
        "default_lifetime",
        "backoff_base",
        "backoff_cap",
        "roots",
        "ca_file",
        "level",
        "format",
        "access",
        "shutdown_grace",
        "header_read_timeout",
        "idle_timeout",
        "max_header_bytes",
        "max_connections",
        "grant_type",
        "token.url",
        "upstream",
    ]);
    prop_oneof![
        4 => (key, toml_scalar()).prop_map(|(k, v)| format!("{k} = {v}")),
        2 => one_of(&[
            "[admin]",
            "[log]",
            "[server]",
            "[[upstream]]",
            "[upstream]",
            "[upstream.token]",
            "[[upstream.token]]",
            "[upstream.tls]",
            "[upstream.token.params]",
            "[admin.listen]",
            "[[admin]]",
            "",
            "#",
            "[",
            "]]",
        ]),
        1 => any::<String>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    InsertChar(Index, char),
    DeleteChar(Index),
    ReplaceChar(Index, char),
    InsertLine(Index, String),
    DeleteLine(Index),
    DuplicateLine(Index, Index),
    ReplaceValue(Index, String),
    SetKey(&'static str, &'static str, String),
}

/// Every key of the file, with the table it belongs in.
const KEYS: &[(&str, &str)] = &[
    ("[admin]", "listen"),
    ("[[upstream]]", "name"),
    ("[[upstream]]", "listen"),
    ("[[upstream]]", "url"),
    ("[[upstream]]", "connect_timeout"),
    ("[[upstream]]", "response_header_timeout"),
    ("[[upstream]]", "retry_on_401"),
    ("[upstream.token]", "url"),
    ("[upstream.token]", "client_id"),
    ("[upstream.token]", "client_secret_file"),
    ("[upstream.token]", "client_secret_env"),
    ("[upstream.token]", "client_secret"),
    ("[upstream.token]", "auth"),
    ("[upstream.token]", "scope"),
    ("[upstream.token]", "audience"),
    ("[upstream.token]", "resource"),
    ("[upstream.token]", "params"),
    ("[upstream.token]", "timeout"),
    ("[upstream.token]", "default_lifetime"),
    ("[upstream.token]", "backoff_base"),
    ("[upstream.token]", "backoff_cap"),
    ("[upstream.tls]", "roots"),
    ("[upstream.tls]", "ca_file"),
    ("[server]", "shutdown_grace"),
    ("[server]", "header_read_timeout"),
    ("[server]", "idle_timeout"),
    ("[server]", "max_header_bytes"),
    ("[server]", "max_connections"),
    ("[log]", "level"),
    ("[log]", "format"),
    ("[log]", "access"),
];

fn mutation() -> impl Strategy<Value = Mutation> {
    let c = prop_oneof![
        3 => prop::sample::select(&['"', '\'', '[', ']', '=', '\n', '#', ' ', '.', ',', '{', '\\'][..]),
        2 => any::<char>(),
    ];
    prop_oneof![
        1 => (any::<Index>(), c.clone()).prop_map(|(at, c)| Mutation::InsertChar(at, c)),
        1 => any::<Index>().prop_map(Mutation::DeleteChar),
        1 => (any::<Index>(), c).prop_map(|(at, c)| Mutation::ReplaceChar(at, c)),
        1 => (any::<Index>(), toml_line()).prop_map(|(at, l)| Mutation::InsertLine(at, l)),
        1 => any::<Index>().prop_map(Mutation::DeleteLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::DuplicateLine(a, b)),
        2 => (any::<Index>(), toml_scalar()).prop_map(|(at, v)| Mutation::ReplaceValue(at, v)),
        3 => set_key(),
    ]
}

/// Sets a key of the file, in its table, to any value.
fn set_key() -> impl Strategy<Value = Mutation> {
    (prop::sample::select(KEYS), toml_scalar())
        .prop_map(|((table, key), value)| Mutation::SetKey(table, key, value))
}

fn apply(text: &str, mutation: &Mutation) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    match mutation {
        Mutation::InsertChar(at, c) => {
            chars.insert(at.index(chars.len() + 1), *c);
            chars.into_iter().collect()
        }
        Mutation::DeleteChar(_) | Mutation::ReplaceChar(..) if chars.is_empty() => String::new(),
        Mutation::DeleteChar(at) => {
            chars.remove(at.index(chars.len()));
            chars.into_iter().collect()
        }
        Mutation::ReplaceChar(at, c) => {
            let at = at.index(chars.len());
            chars[at] = *c;
            chars.into_iter().collect()
        }
        Mutation::InsertLine(at, line) => {
            lines.insert(at.index(lines.len() + 1), line.clone());
            lines.join("\n")
        }
        Mutation::DeleteLine(at) => {
            lines.remove(at.index(lines.len()));
            lines.join("\n")
        }
        Mutation::DuplicateLine(from, to) => {
            let line = lines[from.index(lines.len())].clone();
            lines.insert(to.index(lines.len() + 1), line);
            lines.join("\n")
        }
        Mutation::ReplaceValue(at, value) => {
            let with_values: Vec<usize> = (0..lines.len())
                .filter(|&i| lines[i].contains('='))
                .collect();
            if !with_values.is_empty() {
                let i = with_values[at.index(with_values.len())];
                let key = lines[i].split('=').next().unwrap_or_default().to_owned();
                lines[i] = format!("{key}= {value}");
            }
            lines.join("\n")
        }
        Mutation::SetKey(table, key, value) => {
            // Replace the key's line in its table if it has one, else add one.
            let line = format!("{key} = {value}");
            let Some(start) = lines.iter().position(|l| l.trim() == *table) else {
                lines.extend([(*table).to_owned(), line]);
                return lines.join("\n");
            };
            let end = (start + 1..lines.len())
                .find(|&i| lines[i].starts_with('['))
                .unwrap_or(lines.len());
            let prefix = format!("{key} =");
            match (start + 1..end).find(|&i| lines[i].starts_with(&prefix)) {
                Some(i) => lines[i] = line,
                None => lines.insert(start + 1, line),
            }
            lines.join("\n")
        }
    }
}

fn config_path() -> impl Strategy<Value = PathBuf> {
    prop_oneof![
        "(/[a-z]{1,8}){1,3}/[a-z]{1,8}\\.toml",
        "[a-z]{1,8}\\.toml",
        Just("/etc/bearerd/config.toml".to_owned()),
    ]
    .prop_map(PathBuf::from)
}

/// `Config::parse` returns, and every problem it reports is well placed.
fn check_config(path: &Path, text: &str) -> Result<(), TestCaseError> {
    let err = match Config::parse(path, text) {
        Ok(config) => {
            // What the validator promises of a config it accepts.
            prop_assert!(!config.upstreams.is_empty());
            let mut names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            prop_assert_eq!(names.len(), config.upstreams.len(), "upstream names repeat");
            return Ok(());
        }
        Err(err) => err,
    };
    let shown = err.to_string();
    let ConfigError::Invalid {
        path: reported,
        problems,
    } = err
    else {
        return Err(TestCaseError::fail(format!("not Invalid: {shown}")));
    };
    prop_assert_eq!(reported.as_path(), path);
    prop_assert!(!problems.is_empty(), "Invalid with no problems");
    // At most the line count + 1 (the empty line after a final line break); exactly, the
    // number of line starts. The column is at most one past the end of its line.
    let lines: Vec<&str> = text.split('\n').collect();
    prop_assert!(lines.len() <= text.lines().count() + 1);
    for problem in &problems {
        prop_assert!(
            (1..=lines.len()).contains(&problem.line),
            "problem on line {} of a text of {} lines: {:?}",
            problem.line,
            text.lines().count(),
            problem
        );
        let width = lines[problem.line - 1].chars().count();
        prop_assert!(
            (1..=width + 1).contains(&problem.column),
            "problem at column {} of a line of {} characters: {:?}",
            problem.column,
            width,
            problem
        );
    }
    let prefix = format!("{}:", path.display());
    prop_assert!(
        shown.starts_with(&prefix),
        "{:?} does not start with {:?}",
        shown,
        prefix
    );
    Ok(())
}

#[test]
fn the_base_config_is_valid() {
    let config = Config::parse(Path::new("/etc/bearerd/config.toml"), &base())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.upstreams.len(), 1);
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn config_parse_never_panics_on_any_text(
        path in config_path(),
        text in prop_oneof![
            any::<String>(),
            prop::collection::vec(toml_line(), 0..12).prop_map(|lines| lines.join("\n")),
        ],
    ) {
        check_config(&path, &text)?;
    }

    #[test]
    fn config_parse_reports_mutations_in_place(
        path in config_path(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let text = mutations.iter().fold(base(), |text, m| apply(&text, m));
        check_config(&path, &text)?;
    }

    #[test]
    fn config_parse_reports_bad_values_in_place(
        path in config_path(),
        settings in prop::collection::vec(set_key(), 1..5),
    ) {
        let text = settings.iter().fold(base(), |text, m| apply(&text, m));
        check_config(&path, &text)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Refresh schedule and backoff.
// ---------------------------------------------------------------------------------------------

const TEN_YEARS: u64 = 10 * 366 * 86_400;

/// 1 s to 10 years, in whole seconds or not; short lifetimes, where the bounds meet, often.
fn lifetime() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (1..=TEN_YEARS).prop_map(Duration::from_secs),
        (1..TEN_YEARS, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (1u64..=400).prop_map(Duration::from_secs),
        (1u64..400, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

fn jitter() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), 0.0..1.0f64]
}

/// `(base, cap)`: base in 1 ms..10 s, cap from base to 1 h, at nanosecond resolution.
fn base_and_cap() -> impl Strategy<Value = (Duration, Duration)> {
    (1_000_000u64..=10_000_000_000)
        .prop_flat_map(|base| {
            (
                Just(base),
                prop_oneof![Just(base), base..=3_600_000_000_000],
            )
        })
        .prop_map(|(base, cap)| (Duration::from_nanos(base), Duration::from_nanos(cap)))
}

fn retry_after() -> impl Strategy<Value = Option<Duration>> {
    prop::option::of(prop_oneof![
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (0u64..=2_000_000_000_000).prop_map(Duration::from_nanos),
    ])
}

fn failures() -> impl Strategy<Value = u32> {
    prop_oneof![any::<u32>(), 0u32..40]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn refresh_delay_is_before_expiry_and_within_bounds(
        lifetime in lifetime(),
        jitter in jitter(),
    ) {
        let usable = usable_for(lifetime);
        let delay = refresh_delay(lifetime, jitter);
        prop_assert!(usable <= lifetime);
        prop_assert!(delay < usable, "delay {:?}, usable {:?}", delay, usable);
        prop_assert!(delay <= MAX_REFRESH_DELAY, "{:?}", delay);
        let floor = MIN_REFRESH_DELAY.min(usable.mul_f64(0.9));
        prop_assert!(delay >= floor, "delay {:?} under {:?}", delay, floor);
        // The margin is 30 s, or a tenth of the lifetime if less.
        prop_assert!(usable >= lifetime.saturating_sub(Duration::from_secs(30)));
        let margin = lifetime - usable;
        prop_assert!(margin <= lifetime / 10);
        prop_assert!(margin >= Duration::from_secs(30).min(lifetime / 10), "margin {:?}", margin);
    }

    #[test]
    fn refresh_delay_is_70_to_80_percent_of_long_lifetimes(
        lifetime in lifetime().prop_filter("at least 300 s", |l| *l >= Duration::from_secs(300)),
        jitter in jitter(),
    ) {
        // From 270 s, 90% of the usable time is past 80% of the lifetime, so only the
        // 12 h bound can cut the jittered 70-80%.
        let delay = refresh_delay(lifetime, jitter);
        let low = lifetime.mul_f64(0.7).min(MAX_REFRESH_DELAY);
        let high = lifetime.mul_f64(0.8).min(MAX_REFRESH_DELAY);
        prop_assert!(low <= delay && delay <= high, "{:?} not in {:?}..={:?}", delay, low, high);
        prop_assert!(delay >= MIN_REFRESH_DELAY);
    }

    #[test]
    fn backoff_is_within_base_cap_and_retry_after(
        failures in failures(),
        (base, cap) in base_and_cap(),
        jitter in prop_oneof![Just(0.0), Just(1.0), 0.0..=1.0f64],
        retry_after in retry_after(),
    ) {
        let wait = backoff(failures, base, cap, jitter, retry_after);
        let asked = retry_after.map(|r| r.min(MAX_RETRY_AFTER));
        prop_assert!(wait >= base, "{:?} under base {:?}", wait, base);
        let ceiling = cap.max(asked.unwrap_or_default());
        prop_assert!(wait <= ceiling, "{:?} over {:?}", wait, ceiling);
        if let Some(asked) = asked {
            prop_assert!(wait >= asked, "{:?} under Retry-After {:?}", wait, asked);
        }
    }

    #[test]
    fn backoff_grows_with_failures(
        (fewer, more) in (failures(), failures()).prop_map(|(a, b)| (a.min(b), a.max(b))),
        (base, cap) in base_and_cap(),
        retry_after in retry_after(),
    ) {
        let first = backoff(fewer, base, cap, 1.0, retry_after);
        let later = backoff(more, base, cap, 1.0, retry_after);
        prop_assert!(
            first <= later,
            "{} failures wait {:?}, {} wait {:?}",
            fewer,
            first,
            more,
            later
        );
    }
}
