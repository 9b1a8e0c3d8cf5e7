//! Tokens: fetched by the client-credentials grant, parsed, refreshed ahead of expiry and
//! handed to requests.
//!
//! In data-flow order:
//! - [`fetch`]: one token request (RFC 6749 §4.4.2) and its outcome, with the client
//!   authenticated as configured (`client_auth`);
//! - [`response`]: what the token endpoint answered, success (§5.1) or error (§5.2 and the
//!   vendors' own shapes);
//! - [`schedule`]: pure arithmetic of when to refresh and how long to back off;
//! - [`source`]: the refresher task that keeps one token fresh, and the handle requests read
//!   it through; `on_behalf`: the source of an on-behalf-of exchange instead, which fetches
//!   on demand a token per subject (the subject token each app request carries);
//! - `metrics`: the token metric families, and each upstream's series of them; [`audit`]: an
//!   audit event per token obtained, failed, refused or rejected by an upstream.

pub mod audit;
pub(crate) mod cache;
#[doc(hidden)]
pub use cache::fuzzing as cache_fuzzing;
pub(crate) mod client_auth;
pub(crate) mod credential;
pub(crate) mod dpop;
pub mod fetch;
pub(crate) mod grant;
pub(crate) mod metrics;
pub(crate) mod on_behalf;
mod refresher;
pub mod response;
mod rotation;
pub mod schedule;
pub(crate) mod setup;
pub mod source;
mod state;

use std::fmt;
use std::time::{Duration, SystemTime};

use http::HeaderValue;

use crate::config::{TlsSettings, TokenSettings};
use tokio::time::Instant;

/// What makes two upstreams share one token source: equal token settings, reached with equal
/// TLS settings. A source is known by it across reloads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// `[upstream.token]`
    pub token: TokenSettings,
    /// `[upstream.tls]`, which the token endpoint is reached with too.
    pub tls: TlsSettings,
}

impl SourceKey {
    /// The source `upstream` reads its tokens from.
    pub fn of(upstream: &crate::config::Upstream) -> Self {
        Self {
            token: upstream.token.clone(),
            tls: upstream.tls.clone(),
        }
    }
}

/// A token ready to be sent: the `Authorization` value is built once, when the token arrives,
/// so that requests only clone it.
#[derive(Clone)]
pub struct Token {
    /// `Bearer <access_token>` (or `DPoP <access_token>`), marked sensitive so HTTP/2 never indexes it (RFC 7541 §7.1.3).
    authorization: HeaderValue,
    /// The lifetime the endpoint granted (or that was assumed).
    pub lifetime: Duration,
    /// When the token stops being used: its expiry minus a safety margin.
    pub usable_until: Instant,
    /// Wall-clock expiry, for metrics and `--check` output.
    pub expires_at: SystemTime,
    /// The scope the endpoint granted, if it said.
    pub scope: Option<String>,
    /// For a DPoP-bound token, the `ath` of its proofs: base64url SHA-256 of the token.
    pub(crate) proof_hash: Option<Box<str>>,
    /// Where `lifetime` came from.
    pub lifetime_source: LifetimeSource,
    /// Which token of its source this is: 1 for the first, then counting up. Set by the
    /// refresher when it publishes the token; an upstream's 401 names the token by it.
    pub generation: u64,
    /// On-behalf-of: the SHA-256 of the subject token it was exchanged for (never the subject
    /// itself), by which an upstream's 401 finds the subject to exchange again.
    pub(crate) subject: Option<on_behalf::SubjectKey>,
}

/// Where a token's lifetime came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifetimeSource {
    /// The response's `expires_in`.
    ExpiresIn,
    /// The `exp` claim of the JWT access token (the response had no `expires_in`).
    JwtExp,
    /// `default_lifetime` (no `expires_in`, and not a JWT with `exp`).
    Default,
    /// `max_lifetime`: the endpoint's word for it was longer.
    MaxLifetime,
    /// What was left of a token found in the cache.
    Cached,
    /// On-behalf-of: the subject token's JWT `exp`, sooner than the token's own expiry.
    SubjectExpiry,
}

impl fmt::Display for LifetimeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ExpiresIn => "expires_in",
            Self::JwtExp => "the JWT exp claim",
            Self::Default => "default_lifetime",
            Self::MaxLifetime => "max_lifetime (the endpoint said longer)",
            Self::Cached => "the cache (what is left of its lifetime)",
            Self::SubjectExpiry => "the subject token's exp (sooner than the token's own)",
        })
    }
}

impl Token {
    /// A token that `lifetime` from now stops being valid, sent with `scheme`.
    pub(crate) fn issue(
        access_token: &str,
        scheme: response::TokenType,
        lifetime: Duration,
        lifetime_source: LifetimeSource,
        scope: Option<String>,
    ) -> Result<Self, response::InvalidResponse> {
        let too_long = || response::InvalidResponse {
            reason: "the token's lifetime does not fit this machine's clock".into(),
            said: None,
        };
        let usable_until = Instant::now()
            .checked_add(schedule::usable_for(lifetime))
            .ok_or_else(too_long)?;
        let expires_at = SystemTime::now()
            .checked_add(lifetime)
            .ok_or_else(too_long)?;
        let scheme_name = match scheme {
            response::TokenType::Bearer => "Bearer",
            response::TokenType::DPoP => "DPoP",
        };
        let mut authorization = HeaderValue::try_from(format!("{scheme_name} {access_token}"))
            .map_err(|_| response::InvalidResponse {
                reason: "access_token has characters not allowed in an HTTP header".into(),
                said: None,
            })?;
        authorization.set_sensitive(true);
        let proof_hash = (scheme == response::TokenType::DPoP)
            .then(|| crate::jose::sha256_base64url(access_token.as_bytes()).into_boxed_str());
        Ok(Self {
            authorization,
            lifetime,
            lifetime_source,
            usable_until,
            expires_at,
            scope,
            proof_hash,
            generation: 0,
            subject: None,
        })
    }

    /// The access token alone, and how it is sent.
    pub(crate) fn access_token(&self) -> (&str, response::TokenType) {
        let value = std::str::from_utf8(self.authorization.as_bytes()).unwrap_or_default();
        match value.split_once(' ') {
            Some(("DPoP", token)) => (token, response::TokenType::DPoP),
            Some((_, token)) => (token, response::TokenType::Bearer),
            None => (value, response::TokenType::Bearer),
        }
    }

    /// The `Authorization` header value to send upstream.
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    /// The token after `prefix` and a space (or alone, for an empty prefix), marked
    /// sensitive: for `[upstream.token] prefix`. Only Bearer tokens are presented so (the
    /// config refuses `prefix` with DPoP).
    pub fn presented(&self, prefix: &str) -> HeaderValue {
        let (token, _) = self.access_token();
        let built = if prefix.is_empty() {
            HeaderValue::from_str(token)
        } else {
            HeaderValue::from_str(&format!("{prefix} {token}"))
        };
        // The token was a valid header value after `Bearer `, and the prefix is checked by
        // the config: neither fails, but nothing panics on it.
        let mut value = built.unwrap_or_else(|_| self.authorization.clone());
        value.set_sensitive(true);
        value
    }

    /// Whether the token may still be sent at `now`.
    pub fn is_usable_at(&self, now: Instant) -> bool {
        now < self.usable_until
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("authorization", &"[redacted]")
            .field("lifetime", &self.lifetime)
            .field("lifetime_source", &self.lifetime_source)
            .field("usable_until", &self.usable_until)
            .field("scope", &self.scope)
            .field("generation", &self.generation)
            .finish()
    }
}

#[cfg(test)]
mod presented_tests {
    use super::*;

    #[test]
    fn a_presented_token_is_sensitive_and_has_its_prefix() {
        let token = Token::issue(
            "abc",
            response::TokenType::Bearer,
            Duration::from_secs(60),
            LifetimeSource::ExpiresIn,
            None,
        )
        .unwrap();
        let with_prefix = token.presented("Token");
        assert_eq!(with_prefix, "Token abc");
        assert!(with_prefix.is_sensitive());
        let alone = token.presented("");
        assert_eq!(alone, "abc");
        assert!(alone.is_sensitive());
    }
}
