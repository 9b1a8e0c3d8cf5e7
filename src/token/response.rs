//! What a token endpoint answers: parsed leniently, reported precisely.
//!
//! Success follows RFC 6749 §5.1 with the liberties real servers take (`token_type` in any
//! case or absent, `expires_in` as a string or absent). Errors follow §5.2 where the server
//! does, and otherwise the vendor shapes seen in the wild: `{"result","location","error"}`
//! (USM Anywhere), a flat map of strings (Alternative Payments' 403),
//! `{"error","message","status",...}` (IBM), or a body that is not JSON at all.
//!
//! Everything an endpoint says is untrusted: what is quoted from it passes through the
//! source's [`Redactor`] (an endpoint may echo the request, secret included), and only the
//! status and a well-formed `error` code ever reach the app ([`EndpointError::code`]); the
//! rest is for the log. Success bodies are never quoted: they hold the token.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::StatusCode;
use serde_json::{Map, Value};

use crate::secret::{Redactor, Secret};

/// Characters of a non-JSON error body quoted in messages.
const EXCERPT_CHARS: usize = 200;
/// Longest `error` code passed on to the app; RFC 6749's own codes are under 30 characters.
const MAX_ERROR_CODE_CHARS: usize = 64;

/// A successful token response (RFC 6749 §5.1).
#[derive(Debug)]
pub struct Grant {
    /// The access token.
    pub access_token: Secret,
    /// `expires_in`, when the response has it.
    pub expires_in: Option<Duration>,
    /// `scope`, when the response has it.
    pub scope: Option<String>,
}

/// A 2xx response bearerd cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidResponse {
    /// What is wrong, in bearerd's words: never quotes the body.
    pub reason: String,
    /// What the endpoint said instead of a token (an error object in a 200), redacted: for
    /// the log only.
    pub said: Option<String>,
}

impl InvalidResponse {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            said: None,
        }
    }
}

impl fmt::Display for InvalidResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)?;
        if let Some(said) = &self.said {
            write!(f, "; the body says {said}")?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidResponse {}

/// Parses a 2xx body; anything quoted from it goes through `redactor`.
pub fn parse_success(body: &[u8], redactor: &Redactor) -> Result<Grant, InvalidResponse> {
    let value: Value = serde_json::from_slice(body)
        // serde_json's message names a position only, never the content.
        .map_err(|e| InvalidResponse::new(format!("body is not JSON ({e})")))?;
    let Value::Object(object) = value else {
        return Err(InvalidResponse::new("body is not a JSON object"));
    };
    let access_token = match object.get("access_token") {
        Some(Value::String(token)) if !token.is_empty() => Secret::new(token.as_str()),
        Some(_) => {
            return Err(InvalidResponse::new(
                "access_token is not a non-empty string",
            ))
        }
        None => {
            // Some servers answer 200 with an error object; the log says what it said.
            return Err(InvalidResponse {
                reason: "no access_token".into(),
                said: describe_json_error(&object, redactor),
            });
        }
    };
    match object.get("token_type") {
        // §5.1 makes it required, yet some servers leave it out; bearer is what they mean.
        None | Some(Value::Null) => {}
        // §5.1: the value is case insensitive.
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(Value::String(other)) => {
            let shown = plausible_code(&redactor.redact(other))
                .map_or_else(|| "of another kind".to_owned(), |t| format!("{t:?}"));
            return Err(InvalidResponse::new(format!(
                "token_type {shown} is not supported: bearerd sends Bearer tokens only"
            )));
        }
        Some(_) => return Err(InvalidResponse::new("token_type is not a string")),
    }
    let expires_in = match object.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(value) => Some(parse_expires_in(value)?),
    };
    let scope = match object.get("scope") {
        Some(Value::String(scope)) => Some(redactor.redact(scope)),
        _ => None,
    };
    Ok(Grant {
        access_token,
        expires_in,
        scope,
    })
}

/// `expires_in` as a JSON number or a numeric string, in whole seconds, above zero.
fn parse_expires_in(value: &Value) -> Result<Duration, InvalidResponse> {
    let seconds = match value {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    // Any u64 makes a valid `Duration`; a lifetime too long to add to a clock is clamped by
    // the fetcher (`max_lifetime`), never added as it is.
    match seconds {
        Some(0) => Err(InvalidResponse::new("expires_in is 0")),
        Some(seconds) => Ok(Duration::from_secs(seconds)),
        None => Err(InvalidResponse::new(
            "expires_in is not a positive number of seconds",
        )),
    }
}

/// Time left until the `exp` claim of a JWT access token, if the token is a JWT with one.
///
/// The claims are read, not verified: bearerd only needs to know when to refresh, and the
/// upstream is the one that verifies the token.
pub fn jwt_lifetime(token: &str, now: SystemTime) -> Option<Result<Duration, InvalidResponse>> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let payload = payload.trim_end_matches('=');
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
    // Under a second left is as good as expired: a zero lifetime would mean fetching again
    // at once, in a loop.
    if exp < now + 1.0 {
        return Some(Err(InvalidResponse::new(
            "the token's JWT exp claim is already past",
        )));
    }
    // Whole seconds; `as` saturates, so an `exp` far beyond any clock gives the longest
    // `Duration` rather than a panic, and the fetcher clamps it to `max_lifetime`.
    Some(Ok(Duration::from_secs((exp - now) as u64)))
}

/// A non-2xx answer from the token endpoint, reduced to what a person needs to act on it.
/// Every piece of text in it has been through the source's [`Redactor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The error code (`error` in RFC 6749 §5.2), when there is one.
    pub error: Option<String>,
    /// The explanation: `error_description`, the vendor's message, or an excerpt of the body.
    pub description: Option<String>,
}

impl EndpointError {
    /// The error code, if it looks like one: short, printable ASCII of the §5.2 set, and not
    /// redacted. This is all of the endpoint's words that the app and `/readyz` ever see.
    pub fn code(&self) -> Option<&str> {
        self.error.as_deref().and_then(plausible_code)
    }
}

/// `text` if it could be an RFC 6749 §5.2 `error` code (NQSCHAR: printable ASCII but `"` and
/// `\`), of a modest length and holding nothing redacted.
fn plausible_code(text: &str) -> Option<&str> {
    let well_formed = !text.is_empty()
        && text.len() <= MAX_ERROR_CODE_CHARS
        && text
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\')
        && !text.contains(crate::secret::REDACTED);
    well_formed.then_some(text)
}

impl fmt::Display for EndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "status {}", self.status)?;
        if let Some(error) = &self.error {
            write!(f, ", error {error:?}")?;
        }
        if let Some(description) = &self.description {
            write!(f, ": {description}")?;
        }
        Ok(())
    }
}

/// Reads an error body. Everything quoted goes through `redactor`, in case the server echoes
/// the request back.
pub fn parse_error(status: StatusCode, body: &[u8], redactor: &Redactor) -> EndpointError {
    let scrub = |text: String| redactor.redact(&text);
    // Scrubbed before parsing, and each piece again after: JSON escapes (`\/`, `\u0026`) and
    // folded whitespace can hide the secret from one pass but not from the other. Always
    // before anything is cut, so that no part of a secret survives.
    let text = scrub(String::from_utf8_lossy(body).into_owned());
    let (error, description) = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(object)) => error_fields(&object, &scrub),
        _ => (None, excerpt(&text, &scrub)),
    };
    EndpointError {
        status,
        error,
        description,
    }
}

/// The error code and explanation out of a JSON error object, whatever its shape, each piece
/// passed through `scrub`.
fn error_fields(
    object: &Map<String, Value>,
    scrub: &dyn Fn(String) -> String,
) -> (Option<String>, Option<String>) {
    let text = |key: &str| match object.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(scrub(s.clone())),
        _ => None,
    };
    // RFC 6749 §5.2; IBM adds `message`; USM Anywhere uses `result` and `location`.
    let error = text("error");
    let mut details: Vec<String> = Vec::new();
    for detail in ["error_description", "message", "result"]
        .into_iter()
        .filter_map(text)
    {
        // IBM's `message` often restates `error_description`; say it once.
        if !details.iter().any(|d| detail.contains(d.as_str())) {
            details.push(detail);
        }
    }
    if let Some(location) = text("location") {
        details.push(format!("at {location}"));
    }
    if error.is_some() || !details.is_empty() {
        return (error, (!details.is_empty()).then(|| details.join("; ")));
    }
    // Another shape, such as a flat map of strings: quote it compactly.
    let flat = object
        .iter()
        .map(|(key, value)| {
            scrub(match value {
                Value::String(s) => format!("{key}: {s}"),
                other => format!("{key}: {other}"),
            })
        })
        .collect::<Vec<_>>()
        .join("; ");
    (None, truncate(&flat))
}

/// `error: description` out of an error-shaped object, for a 200 that carries one.
fn describe_json_error(object: &Map<String, Value>, redactor: &Redactor) -> Option<String> {
    match error_fields(object, &|text| redactor.redact(&text)) {
        (Some(error), Some(description)) => Some(format!("{error:?}: {description}")),
        (Some(error), None) => Some(format!("{error:?}")),
        _ => None,
    }
}

/// The start of a body, on one line, for a person to recognise (an HTML error page, say).
fn excerpt(text: &str, scrub: &dyn Fn(String) -> String) -> Option<String> {
    let one_line = scrub(text.split_whitespace().collect::<Vec<_>>().join(" "));
    if one_line.is_empty() {
        return Some("(empty body)".into());
    }
    truncate(&format!("body: {one_line}"))
}

fn truncate(text: &str) -> Option<String> {
    if text.is_empty() {
        return None;
    }
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(EXCERPT_CHARS)
        .collect();
    if text.chars().count() > EXCERPT_CHARS {
        Some(format!("{cleaned}…"))
    } else {
        Some(cleaned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> Redactor {
        Redactor::new()
    }

    fn redacting(secret: &str) -> Redactor {
        let mut redactor = Redactor::new();
        redactor.add_client_secret("app", secret);
        redactor
    }

    fn jwt(claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b64(r#"{"alg":"RS256"}"#), b64(claims))
    }

    #[test]
    fn success_per_rfc() {
        let grant = parse_success(
            br#"{"access_token":"abc","token_type":"Bearer","expires_in":3600,"scope":"read write"}"#,
            &none(),
        )
        .unwrap();
        assert_eq!(grant.access_token.expose(), "abc");
        assert_eq!(grant.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!(grant.scope.as_deref(), Some("read write"));
    }

    #[test]
    fn token_type_any_case_or_absent() {
        for body in [
            r#"{"access_token":"a","token_type":"bearer","expires_in":899}"#,
            r#"{"access_token":"a","token_type":"BEARER","expires_in":899}"#,
            r#"{"access_token":"a","expires_in":899}"#,
        ] {
            assert!(parse_success(body.as_bytes(), &none()).is_ok(), "{body}");
        }
        let err =
            parse_success(br#"{"access_token":"a","token_type":"mac"}"#, &none()).unwrap_err();
        assert!(err.reason.contains("\"mac\""), "{err}");
    }

    #[test]
    fn expires_in_number_or_string() {
        let parse = |v: &str| {
            parse_success(
                format!(r#"{{"access_token":"a","expires_in":{v}}}"#).as_bytes(),
                &none(),
            )
            .map(|g| g.expires_in)
        };
        assert_eq!(parse("86400"), Ok(Some(Duration::from_secs(86400))));
        assert_eq!(parse(r#""3600""#), Ok(Some(Duration::from_secs(3600))));
        assert_eq!(parse("59.9"), Ok(Some(Duration::from_secs(59))));
        assert_eq!(parse("null"), Ok(None));
        assert!(parse("0").is_err());
        assert!(parse("-5").is_err());
        assert!(parse(r#""soon""#).is_err());
    }

    #[test]
    fn missing_token_quotes_the_error_not_the_body() {
        let err = parse_success(
            br#"{"error":"invalid_scope","error_description":"bad"}"#,
            &none(),
        )
        .unwrap_err();
        assert_eq!(err.reason, "no access_token");
        assert_eq!(
            err.to_string(),
            r#"no access_token; the body says "invalid_scope": bad"#
        );
        let err = parse_success(b"access_token=s3cr3t&token_type=bearer", &none()).unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn jwt_exp_gives_the_lifetime() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let token = jwt(r#"{"sub":"app","exp":1003600}"#);
        assert_eq!(
            jwt_lifetime(&token, now),
            Some(Ok(Duration::from_secs(3600)))
        );
        assert!(matches!(
            jwt_lifetime(&jwt(r#"{"exp":999999}"#), now),
            Some(Err(_))
        ));
        assert_eq!(jwt_lifetime(&jwt(r#"{"sub":"no exp"}"#), now), None);
        assert_eq!(jwt_lifetime("opaque-token", now), None);
        assert_eq!(jwt_lifetime("a.%%%.c", now), None);
    }

    #[test]
    fn rfc_error_shape() {
        let e = parse_error(
            StatusCode::UNAUTHORIZED,
            br#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
            &none(),
        );
        assert_eq!(e.error.as_deref(), Some("invalid_client"));
        assert_eq!(
            e.to_string(),
            r#"status 401 Unauthorized, error "invalid_client": Client authentication failed"#
        );
    }

    #[test]
    fn vendor_error_shapes() {
        // USM Anywhere
        let e = parse_error(
            StatusCode::UNAUTHORIZED,
            br#"{"result":"Unauthorized","location":"/api/2.0/oauth/token","error":"Bad credentials"}"#,
            &none(),
        );
        assert_eq!(e.error.as_deref(), Some("Bad credentials"));
        assert_eq!(
            e.description.as_deref(),
            Some("Unauthorized; at /api/2.0/oauth/token")
        );
        // Alternative Payments 403: a flat string map.
        let e = parse_error(
            StatusCode::FORBIDDEN,
            br#"{"code":"forbidden","detail":"Invalid credentials"}"#,
            &none(),
        );
        assert_eq!(e.error, None);
        assert_eq!(
            e.description.as_deref(),
            Some("code: forbidden; detail: Invalid credentials")
        );
        // IBM Watson Work
        let e = parse_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"error":"server_error","message":"Try later","status":"500","path":"/oauth/token"}"#,
            &none(),
        );
        assert_eq!(e.error.as_deref(), Some("server_error"));
        assert_eq!(e.description.as_deref(), Some("Try later"));
    }

    #[test]
    fn non_json_error_is_excerpted_and_scrubbed() {
        let body = format!(
            "<html>\n<body>Bad gateway for pw=hunter2 or h%40ck {}</body>",
            "x".repeat(500)
        );
        let e = parse_error(
            StatusCode::BAD_GATEWAY,
            body.as_bytes(),
            &redacting("hunter2"),
        );
        let description = e.description.unwrap();
        assert!(
            description.starts_with("body: <html> <body>Bad gateway"),
            "{description}"
        );
        assert!(description.contains("[redacted]"));
        assert!(!description.contains("hunter2"));
        let e = parse_error(StatusCode::BAD_GATEWAY, body.as_bytes(), &redacting("h@ck"));
        assert!(!e.description.unwrap().contains("h%40ck"));
        assert!(description.chars().count() <= EXCERPT_CHARS + 1);
        assert_eq!(
            parse_error(StatusCode::BAD_GATEWAY, b"", &none())
                .description
                .as_deref(),
            Some("(empty body)")
        );
    }

    #[test]
    fn an_echoed_request_leaves_no_secret_in_what_is_quoted() {
        let redactor = redacting("s3cr3t pw");
        let basic = base64::engine::general_purpose::STANDARD.encode("app:s3cr3t+pw");
        // A 200 without a token, echoing the request: form body and Basic header.
        let body = format!(
            r#"{{"error":"invalid_request","error_description":"got client_secret=s3cr3t+pw and Basic {basic}"}}"#
        );
        let err = parse_success(body.as_bytes(), &redactor).unwrap_err();
        let shown = err.to_string();
        assert!(!redactor.finds_in(&shown), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        // The same as an error body, and as a `Location`-style percent-encoded echo.
        let escaped = basic.replace('=', "%3D").replace('+', "%2B");
        let e = parse_error(
            StatusCode::BAD_REQUEST,
            format!("echo: Basic {basic} /x?a={escaped}").as_bytes(),
            &redactor,
        );
        assert!(!redactor.finds_in(&e.to_string()), "{e}");
    }

    #[test]
    fn only_a_well_formed_error_code_is_offered_to_the_app() {
        let code = |error: &str| {
            let body = serde_json::json!({ "error": error }).to_string();
            parse_error(
                StatusCode::BAD_REQUEST,
                body.as_bytes(),
                &redacting("s3cr3t"),
            )
            .code()
            .map(str::to_owned)
        };
        assert_eq!(code("invalid_client").as_deref(), Some("invalid_client"));
        assert_eq!(code("Bad credentials").as_deref(), Some("Bad credentials"));
        assert_eq!(code("leaked s3cr3t"), None);
        assert_eq!(code("line\nbreak"), None);
        assert_eq!(code(&"x".repeat(65)), None);
        assert_eq!(code("<script>\"</script>"), None);
    }

    #[test]
    fn absurd_lifetimes_parse_without_overflow() {
        for v in ["1e300", "10000000000000000000", "\"18446744073709551615\""] {
            let body = format!(r#"{{"access_token":"a","expires_in":{v}}}"#);
            let grant = parse_success(body.as_bytes(), &none()).unwrap();
            assert!(
                grant.expires_in.unwrap() > Duration::from_secs(1 << 40),
                "{v}"
            );
        }
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        for exp in ["1e300", "18446744073709551615"] {
            let token = jwt(&format!(r#"{{"exp":{exp}}}"#));
            assert!(matches!(jwt_lifetime(&token, now), Some(Ok(_))), "{exp}");
        }
    }
}
