//! `[upstream.token]`: the token endpoint, the client and how it authenticates, what is asked
//! for, and the refresh timing.

use std::ops::Range;

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
        if raw.client_id.get_ref().is_empty() {
            self.problem(raw.client_id.span(), format!("{key}.client_id"), "is empty");
        }
        let auth = self.client_auth(key, spanned);
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
            client_id: raw.client_id.get_ref().clone(),
            auth: auth?,
            scope: optional(&raw.scope),
            audience: optional(&raw.audience),
            resource: optional(&raw.resource),
            params,
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

impl Validator<'_> {
    /// `auth` and the credentials its method needs; validation asks for those only.
    fn client_auth(&mut self, key: &str, spanned: &Spanned<file::Token>) -> Option<ClientAuth> {
        let raw = spanned.get_ref();
        match raw.auth {
            None | Some(file::ClientAuth::Basic) => {
                let secret = self.client_secret(key, spanned)?;
                Some(ClientAuth::Basic { secret })
            }
            Some(file::ClientAuth::Post) => {
                let secret = self.client_secret(key, spanned)?;
                Some(ClientAuth::Post { secret })
            }
        }
    }

    /// Exactly one of `client_secret_file`, `client_secret_env` and `client_secret`.
    fn client_secret(&mut self, key: &str, spanned: &Spanned<file::Token>) -> Option<SecretSource> {
        let raw = spanned.get_ref();
        let sources: Vec<(SecretSource, Range<usize>)> = [
            raw.client_secret_file.as_ref().map(|p| {
                (
                    SecretSource::File(self.base_dir.join(p.get_ref())),
                    p.span(),
                )
            }),
            raw.client_secret_env
                .as_ref()
                .map(|v| (SecretSource::Env(v.get_ref().clone()), v.span())),
            raw.client_secret.as_ref().map(|s| {
                (
                    SecretSource::Inline(crate::secret::Secret::new(s.get_ref().as_str())),
                    s.span(),
                )
            }),
        ]
        .into_iter()
        .flatten()
        .collect();
        match <[_; 1]>::try_from(sources) {
            Ok([(source, _)]) => Some(source),
            Err(sources) if sources.is_empty() => {
                self.problem(
                    spanned.span(),
                    format!("{key}.client_secret_file"),
                    "no client secret: set one of client_secret_file, client_secret_env or client_secret",
                );
                None
            }
            Err(sources) => {
                self.problem(
                    sources[1].1.clone(),
                    format!("{key}.client_secret"),
                    "more than one client secret source: set only one of client_secret_file, client_secret_env or client_secret",
                );
                None
            }
        }
    }
}

/// Form fields bearerd sets itself; `params` may not override them.
const RESERVED_FORM_FIELDS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "scope",
    "audience",
    "resource",
];
