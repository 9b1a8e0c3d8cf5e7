//! What a token endpoint answers: parsed leniently, reported precisely.
//!
//! Success follows RFC 6749 §5.1 with the liberties real servers take (`token_type` in any
//! case or absent, `expires_in` as a string or absent). Errors follow §5.2 where the server
//! does, and otherwise the vendor shapes seen in the wild: `{"result","location","error"}`
//! (USM Anywhere), a flat map of strings (Alternative Payments' 403),
//! `{"error","message","status",...}` (IBM), or a body that is not JSON at all.
//!
//! Everything an endpoint says is untrusted: what is quoted from it passes through the
//! source's [`Redactor`] (an endpoint may echo the request, secret included, in any
//! encoding), which quotes it in normal form (references and escapes decoded) and redacted,
//! never as it came; and only the status and a well-formed `error` code ever reach the app
//! ([`EndpointError::code`]); the rest is for the log. Success bodies are never quoted: they
//! hold the token.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::StatusCode;
use serde_json::{Map, Value};

use crate::secret::{Redactor, Secret, MAX_NORMALISED_BYTES};

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
    /// `token_type`; `N_A` (RFC 8693 §2.2.1) reads as Bearer, with `not_applicable` set.
    pub token_type: TokenType,
    /// The token is not an access token: `token_type` was `N_A`.
    pub not_applicable: bool,
    /// A new refresh token (RFC 6749 §6: the server may rotate it).
    pub refresh_token: Option<Secret>,
}

/// The kinds of token bearerd can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// `Bearer` (RFC 6750), or no `token_type` at all.
    Bearer,
    /// `DPoP` (RFC 9449 §5): bound to a key, sent with a proof.
    DPoP,
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
    let not_applicable = matches!(object.get("token_type"), Some(Value::String(t)) if t == "N_A");
    let token_type = match object.get("token_type") {
        // §5.1 makes it required, yet some servers leave it out; bearer is what they mean.
        None | Some(Value::Null) => TokenType::Bearer,
        // §5.1: the value is case insensitive.
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => TokenType::Bearer,
        Some(Value::String(t)) if t.eq_ignore_ascii_case("dpop") => TokenType::DPoP,
        // RFC 8693 §2.2.1: a token exchanged for something else than an access token; whether
        // that was asked for is the fetch's to judge.
        Some(Value::String(t)) if t == "N_A" => TokenType::Bearer,
        Some(Value::String(other)) => {
            let shown = plausible_code(&redactor.redact(other))
                .map_or_else(|| "of another kind".to_owned(), |t| format!("{t:?}"));
            return Err(InvalidResponse::new(format!(
                "token_type {shown} is not supported: bearerd sends Bearer and DPoP tokens only"
            )));
        }
        Some(_) => return Err(InvalidResponse::new("token_type is not a string")),
    };
    let expires_in = match object.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(value) => Some(parse_expires_in(value)?),
    };
    // The scope is kept as granted, unless it holds a credential (an endpoint echoing the
    // request): then only its normal form, redacted, is kept. A scope too long to be searched
    // whole is kept redacted too.
    let scope = match object.get("scope") {
        Some(Value::String(scope))
            if scope.len() <= MAX_NORMALISED_BYTES && !redactor.finds_in(scope) =>
        {
            Some(scope.clone())
        }
        Some(Value::String(scope)) => Some(redactor.redact(scope)),
        _ => None,
    };
    let refresh_token = match object.get("refresh_token") {
        Some(Value::String(token)) if !token.is_empty() => Some(Secret::new(token.as_str())),
        None | Some(Value::Null) => None,
        Some(_) => {
            return Err(InvalidResponse::new(
                "refresh_token is not a non-empty string",
            ))
        }
    };
    Ok(Grant {
        access_token,
        expires_in,
        scope,
        token_type,
        not_applicable,
        refresh_token,
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
    let text = String::from_utf8_lossy(body);
    // JSON is parsed as it came, so that its escapes are read as JSON; each string taken out
    // of it is then normalised and redacted on its own. Anything else is quoted only in
    // normal form, redacted before it is cut.
    let (error, description) = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(object)) => error_fields(&object, &|text| redactor.redact(&text)),
        _ => (None, excerpt(&text, redactor)),
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

/// The start of a body, on one line, for a person to recognise (an HTML error page, say): in
/// normal form, redacted, and only then cut.
fn excerpt(text: &str, redactor: &Redactor) -> Option<String> {
    let one_line = redactor.redact_line(text);
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
mod tests;
