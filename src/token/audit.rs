//! Audit events: one structured log event each time a token source obtains a token, fails to,
//! is refused one, or learns that an upstream rejected the one it holds, on their own log
//! target ([`TARGET`]) so that a log pipeline can keep them apart from the rest.
//!
//! The fields are a stable format (docs/security.md#audit-events): `event`, `source`, `grant`,
//! `client_auth`, `client_id`, `outcome`, and, as the event has them, `issued_at`,
//! `expires_at`, `token_type`, `token_fingerprint`, `scope`, `subject_hash`, `status`,
//! `error` and `detail`. A token appears only as its fingerprint, the first 16 characters of
//! base64url(SHA-256(token)) — the form of DPoP's `ath` (RFC 9449 §4.2) — which names a token
//! in an upstream's logs without letting anyone use it. A secret, an assertion or a subject
//! never appears.
//!
//! Whether the events are written is the log filter's decision alone: `main.rs` adds a
//! directive for [`TARGET`] (`info`, or `off` with `[log] audit = false`) that outranks the
//! configured level, and nothing here computes a fingerprint for an event nobody writes.

use std::time::SystemTime;

use super::fetch::FetchError;
use super::metrics::FetchOutcome;
use super::response::TokenType;
use super::Token;

/// The log target of every audit event.
pub const TARGET: &str = "bearerd::audit";

/// How many characters of base64url(SHA-256(token)) a fingerprint keeps: 96 bits, enough to
/// tell a source's tokens apart, and no help in guessing one.
const FINGERPRINT_CHARS: usize = 16;

/// What every audit event of one source says of how it obtains tokens; set when the source
/// starts, from its settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Describe {
    /// The grant (RFC 6749 §4), e.g. `client_credentials`.
    pub grant: &'static str,
    /// The client-authentication method, as `bearerd_token_source_info`'s `auth` says it.
    pub client_auth: &'static str,
    /// The OAuth2 client (not a secret: the token endpoint's public name for bearerd).
    pub client_id: Option<String>,
    /// For an on-behalf-of grant, the fingerprint of the subject the tokens are for, in the
    /// form of [`fingerprint`]; `None` for grants without a subject.
    pub subject_hash: Option<String>,
}

impl Describe {
    /// What the events of a source with `settings` say of it.
    pub fn of(settings: &crate::config::TokenSettings) -> Self {
        Self {
            grant: settings.grant_name(),
            client_auth: settings.auth.method(),
            client_id: settings.client_id.clone(),
            subject_hash: None,
        }
    }
}

/// The fingerprint of a token (or of a subject): the first 16 characters of
/// base64url(SHA-256(value)), unpadded.
pub fn fingerprint(value: &str) -> String {
    let mut hash = crate::jose::sha256_base64url(value.as_bytes());
    hash.truncate(FINGERPRINT_CHARS);
    hash
}

/// Whether audit events are written at all: the filter in `main.rs` says.
fn on() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// `time` in RFC 3339, UTC, to the second.
fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// When `token` was obtained: its expiry less its lifetime.
pub(crate) fn issued_at(token: &Token) -> SystemTime {
    token
        .expires_at
        .checked_sub(token.lifetime)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// What an event says of a token: issued, expiry, type and fingerprint.
struct Held {
    issued_at: String,
    expires_at: String,
    token_type: &'static str,
    fingerprint: String,
}

impl Held {
    fn of(token: &Token) -> Self {
        let (access_token, scheme) = token.access_token();
        Self {
            issued_at: rfc3339(issued_at(token)),
            expires_at: rfc3339(token.expires_at),
            token_type: match scheme {
                TokenType::Bearer => "Bearer",
                TokenType::DPoP => "DPoP",
            },
            fingerprint: fingerprint(access_token),
        }
    }
}

/// `event = "acquired"`: the source has a new token, fetched (`outcome = "fetched"`) or taken
/// from the token cache (`outcome = "cached"`).
pub(crate) fn acquired(source: &str, about: &Describe, token: &Token, from_cache: bool) {
    if !on() {
        return;
    }
    let held = Held::of(token);
    tracing::info!(
        target: TARGET,
        event = "acquired",
        source,
        grant = about.grant,
        client_auth = about.client_auth,
        client_id = about.client_id.as_deref(),
        subject_hash = about.subject_hash.as_deref(),
        outcome = if from_cache { "cached" } else { "fetched" },
        issued_at = held.issued_at.as_str(),
        expires_at = held.expires_at.as_str(),
        token_type = held.token_type,
        token_fingerprint = held.fingerprint.as_str(),
        scope = token.scope.as_deref(),
        "token acquired"
    );
}

/// A token request that brought no token: `event = "refused"` when the token endpoint said
/// no (a 4xx, RFC 6749 §5.2: the client is not, or no longer, allowed this token), else
/// `event = "fetch_failed"` (unreachable, timed out, a 5xx, an answer bearerd cannot use, or
/// credentials bearerd could not read). `outcome` is the `bearerd_token_fetch_total` label
/// (or `secret_error`); `detail` the summary `/readyz` gives, never what else the endpoint
/// said.
pub(crate) fn failed(source: &str, about: &Describe, error: &FetchError) {
    if !on() {
        return;
    }
    let outcome = error.outcome();
    let endpoint = error.endpoint();
    let detail = error.summary();
    let fields = (
        outcome.map_or("secret_error", FetchOutcome::label),
        endpoint.map(|e| e.status.as_u16()),
        // The code only if it looks like one (RFC 6749 §5.2), as `/readyz` shows it.
        endpoint.and_then(|e| e.code()),
    );
    if outcome == Some(FetchOutcome::Rejected) {
        tracing::info!(
            target: TARGET,
            event = "refused",
            source,
            grant = about.grant,
            client_auth = about.client_auth,
            client_id = about.client_id.as_deref(),
            subject_hash = about.subject_hash.as_deref(),
            outcome = fields.0,
            status = fields.1,
            error = fields.2,
            detail = detail.as_str(),
            "token request refused"
        );
    } else {
        tracing::info!(
            target: TARGET,
            event = "fetch_failed",
            source,
            grant = about.grant,
            client_auth = about.client_auth,
            client_id = about.client_id.as_deref(),
            subject_hash = about.subject_hash.as_deref(),
            outcome = fields.0,
            status = fields.1,
            error = fields.2,
            detail = detail.as_str(),
            "token request failed"
        );
    }
}

/// `event = "rejected_by_upstream"`: an upstream answered 401 to `token`; once per token,
/// however many requests it rejected. `outcome = "refetching"` when a new token is requested
/// at once, `"refetch_later"` when the last such request was too recent
/// ([`REJECTION_REFETCH_INTERVAL`](super::state::REJECTION_REFETCH_INTERVAL)).
pub(crate) fn rejected_by_upstream(source: &str, about: &Describe, token: &Token, now: bool) {
    if !on() {
        return;
    }
    let held = Held::of(token);
    tracing::info!(
        target: TARGET,
        event = "rejected_by_upstream",
        source,
        grant = about.grant,
        client_auth = about.client_auth,
        client_id = about.client_id.as_deref(),
        subject_hash = about.subject_hash.as_deref(),
        outcome = if now { "refetching" } else { "refetch_later" },
        issued_at = held.issued_at.as_str(),
        expires_at = held.expires_at.as_str(),
        token_type = held.token_type,
        token_fingerprint = held.fingerprint.as_str(),
        "token rejected by upstream"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_the_start_of_the_dpop_ath() {
        // RFC 9449 §7.1's example: ath of "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU".
        let token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU";
        assert_eq!(
            fingerprint(token),
            "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"[..16]
        );
        assert_eq!(fingerprint(token).len(), 16);
    }
}
