//! `[upstream.token]`: the token endpoint, the client and how it authenticates, what is asked
//! for, and the refresh timing.

use toml::Spanned;

use super::validate::Validator;
use super::*;

impl Validator<'_> {
    pub(super) fn token(
        &mut self,
        key: &str,
        spanned: &Spanned<file::Token>,
    ) -> Option<TokenSettings> {
        let raw = spanned.get_ref();
        let allow_plain_http = raw.allow_plain_http.unwrap_or(false);
        let url = self.http_url(&raw.url, &format!("{key}.url"), allow_plain_http);
        let auth = self.client_auth(key, spanned);
        let client_id = self.client_id(key, spanned, auth.as_ref());
        let dpop = self.dpop(key, raw);
        let params = raw
            .params
            .as_ref()
            .map(|p| p.get_ref().clone())
            .unwrap_or_default();
        for name in params.keys() {
            if RESERVED_FORM_FIELDS.contains(&name.as_str()) {
                self.problem(
                    raw.params.as_ref().map_or(0..0, Spanned::span),
                    format!("{key}.params.{name}"),
                    format!("{name} is set by bearerd; use the dedicated key instead"),
                );
            }
        }
        let backoff_base = self.duration(
            raw.backoff_base.as_ref(),
            &format!("{key}.backoff_base"),
            DEFAULT_BACKOFF_BASE,
        );
        let backoff_cap = self.duration(
            raw.backoff_cap.as_ref(),
            &format!("{key}.backoff_cap"),
            DEFAULT_BACKOFF_CAP,
        );
        if backoff_cap < backoff_base {
            self.problem(
                raw.backoff_cap
                    .as_ref()
                    .or(raw.backoff_base.as_ref())
                    .map_or(0..0, Spanned::span),
                format!("{key}.backoff_cap"),
                format!(
                    "is shorter than backoff_base ({})",
                    humantime::format_duration(backoff_base)
                ),
            );
        }
        let default_lifetime = self.duration(
            raw.default_lifetime.as_ref(),
            &format!("{key}.default_lifetime"),
            DEFAULT_TOKEN_LIFETIME,
        );
        let max_lifetime = self.duration(
            raw.max_lifetime.as_ref(),
            &format!("{key}.max_lifetime"),
            DEFAULT_MAX_TOKEN_LIFETIME,
        );
        if default_lifetime > max_lifetime {
            // Name the key that was written: the other one is a default.
            match (&raw.default_lifetime, &raw.max_lifetime) {
                (Some(written), _) => self.problem(
                    written.span(),
                    format!("{key}.default_lifetime"),
                    format!(
                        "is longer than max_lifetime ({})",
                        humantime::format_duration(max_lifetime)
                    ),
                ),
                (None, written) => self.problem(
                    written.as_ref().map_or(0..0, Spanned::span),
                    format!("{key}.max_lifetime"),
                    format!(
                        "is shorter than default_lifetime ({})",
                        humantime::format_duration(default_lifetime)
                    ),
                ),
            }
        }
        let optional = |v: &Option<Spanned<String>>| v.as_ref().map(|s| s.get_ref().clone());
        Some(TokenSettings {
            url: url?,
            client_id,
            auth: auth?,
            scope: optional(&raw.scope),
            audience: optional(&raw.audience),
            resource: optional(&raw.resource),
            params,
            dpop,
            timeout: self.duration(
                raw.timeout.as_ref(),
                &format!("{key}.timeout"),
                DEFAULT_TOKEN_TIMEOUT,
            ),
            default_lifetime,
            max_lifetime,
            allow_plain_http,
            backoff_base,
            backoff_cap,
        })
    }
}

/// Form fields bearerd sets itself; `params` may not override them.
const RESERVED_FORM_FIELDS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
    "scope",
    "audience",
    "resource",
];
