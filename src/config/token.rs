//! `[upstream.token]`: the token endpoint, the client and how it authenticates, what is asked
//! for, and the refresh timing.

use toml::Spanned;

use super::client_auth::{client_auth, client_id, dpop};
use super::file;
use super::grant;
use super::validate::Validator;
use super::values::{duration, http_url};
use super::{
    TokenSettings, DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_CAP, DEFAULT_MAX_TOKEN_LIFETIME,
    DEFAULT_TOKEN_LIFETIME, DEFAULT_TOKEN_TIMEOUT,
};

/// `[upstream.token]` (or `[listener.route.token]`) at `key`.
pub(super) fn token(
    v: &mut Validator<'_>,
    key: &str,
    spanned: &Spanned<file::Token>,
) -> Option<TokenSettings> {
    let raw = spanned.get_ref();
    let allow_plain_http = raw.allow_plain_http.unwrap_or(false);
    let service_account = grant::service_account(v, key, raw);
    let url = match (&raw.url, &service_account) {
        (Some(written), Ok(Some(sa))) => {
            let url = http_url(v, written, &format!("{key}.url"), allow_plain_http);
            if url.as_ref().is_some_and(|url| *url != sa.token_uri) {
                v.problem(
                    written.span(),
                    format!("{key}.url"),
                    format!(
                        "differs from the service-account file's token_uri ({}): leave url out, or make them equal",
                        sa.token_uri
                    ),
                );
                None
            } else {
                url
            }
        }
        (Some(written), _) => http_url(v, written, &format!("{key}.url"), allow_plain_http),
        (None, Ok(Some(sa))) => Some(sa.token_uri.clone()),
        (None, Err(())) => None,
        (None, Ok(None)) => {
            v.problem(
                spanned.span(),
                format!("{key}.url"),
                "missing: the token endpoint's URL (only a service_account_file names it itself)",
            );
            None
        }
    };
    let auth = client_auth(v, key, spanned);
    let client_id = client_id(
        v,
        key,
        spanned,
        auth.as_ref(),
        matches!(service_account, Ok(Some(_))),
    );
    let grant = grant::grant(v, key, spanned, auth.as_ref(), client_id.as_deref());
    let dpop = dpop(v, key, raw);
    let presentation = grant::presentation(v, key, raw, dpop.is_some());
    let params = raw
        .params
        .as_ref()
        .map(|p| p.get_ref().clone())
        .unwrap_or_default();
    for name in params.keys() {
        if RESERVED_FORM_FIELDS.contains(&name.as_str()) {
            v.problem(
                raw.params.as_ref().map_or(0..0, Spanned::span),
                format!("{key}.params.{name}"),
                format!("{name} is set by bearerd; use the dedicated key instead"),
            );
        }
    }
    let backoff_base = duration(
        v,
        raw.backoff_base.as_ref(),
        &format!("{key}.backoff_base"),
        DEFAULT_BACKOFF_BASE,
    );
    let backoff_cap = duration(
        v,
        raw.backoff_cap.as_ref(),
        &format!("{key}.backoff_cap"),
        DEFAULT_BACKOFF_CAP,
    );
    if backoff_cap < backoff_base {
        v.problem(
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
    let default_lifetime = duration(
        v,
        raw.default_lifetime.as_ref(),
        &format!("{key}.default_lifetime"),
        DEFAULT_TOKEN_LIFETIME,
    );
    let max_lifetime = duration(
        v,
        raw.max_lifetime.as_ref(),
        &format!("{key}.max_lifetime"),
        DEFAULT_MAX_TOKEN_LIFETIME,
    );
    if default_lifetime > max_lifetime {
        // Name the key that was written: the other one is a default.
        match (&raw.default_lifetime, &raw.max_lifetime) {
            (Some(written), _) => v.problem(
                written.span(),
                format!("{key}.default_lifetime"),
                format!(
                    "is longer than max_lifetime ({})",
                    humantime::format_duration(max_lifetime)
                ),
            ),
            (None, written) => v.problem(
                written.as_ref().map_or(0..0, Spanned::span),
                format!("{key}.max_lifetime"),
                format!(
                    "is shorter than default_lifetime ({})",
                    humantime::format_duration(default_lifetime)
                ),
            ),
        }
    }
    let optional = |s: &Option<Spanned<String>>| s.as_ref().map(|s| s.get_ref().clone());
    Some(TokenSettings {
        url: url?,
        client_id,
        grant: grant?,
        auth: auth?,
        presentation: presentation?,
        scope: optional(&raw.scope),
        audience: optional(&raw.audience),
        resource: optional(&raw.resource),
        params,
        dpop,
        timeout: duration(
            v,
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
    "assertion",
    "subject_token",
    "subject_token_type",
    "actor_token",
    "actor_token_type",
    "requested_token_type",
    "refresh_token",
];
