//! `[upstream.token] auth` and the keys each method needs: validation asks for those only,
//! and refuses a key the chosen method would ignore (a `private_key_file` left beside
//! `auth = "basic"` is a mistake the user wants to hear about).

use std::ops::Range;
use std::path::PathBuf;

use toml::Spanned;

use super::credentials::{
    Assertion, ClientAuth, Dpop, Identity, JwsAlg, DEFAULT_ASSERTION_LIFETIME,
};
use super::file;
use super::validate::Validator;
use super::values::duration;
use crate::secret::{Secret, SecretSource};

/// The keys only some methods use, and which.
const METHOD_KEYS: &[(&str, &[file::ClientAuth])] = {
    use file::ClientAuth::*;
    &[
        ("client_secret_file", &[Basic, Post, ClientSecretJwt]),
        ("client_secret_env", &[Basic, Post, ClientSecretJwt]),
        ("client_secret", &[Basic, Post, ClientSecretJwt]),
        ("assertion_audience", &[ClientSecretJwt, PrivateKeyJwt]),
        ("assertion_lifetime", &[ClientSecretJwt, PrivateKeyJwt]),
        ("private_key_file", &[PrivateKeyJwt]),
        ("assertion_alg", &[PrivateKeyJwt]),
        ("key_id", &[PrivateKeyJwt]),
        ("certificate_file", &[PrivateKeyJwt]),
        ("assertion_file", &[ClientAssertionFile]),
        ("cert_file", &[TlsClientAuth]),
        ("key_file", &[TlsClientAuth]),
    ]
};

/// The method's name as the file spells it.
fn method_name(method: file::ClientAuth) -> &'static str {
    match method {
        file::ClientAuth::Basic => "basic",
        file::ClientAuth::Post => "post",
        file::ClientAuth::ClientSecretJwt => "client_secret_jwt",
        file::ClientAuth::PrivateKeyJwt => "private_key_jwt",
        file::ClientAuth::ClientAssertionFile => "client_assertion_file",
        file::ClientAuth::TlsClientAuth => "tls_client_auth",
        file::ClientAuth::None => "none",
    }
}

/// Where a method-specific key stands in the file, if it is written.
fn written_at(raw: &file::Token, name: &str) -> Option<Range<usize>> {
    fn at<T>(value: &Option<Spanned<T>>) -> Option<Range<usize>> {
        value.as_ref().map(Spanned::span)
    }
    match name {
        "client_secret_file" => at(&raw.client_secret_file),
        "client_secret_env" => at(&raw.client_secret_env),
        "client_secret" => at(&raw.client_secret),
        "assertion_audience" => at(&raw.assertion_audience),
        "assertion_lifetime" => at(&raw.assertion_lifetime),
        "private_key_file" => at(&raw.private_key_file),
        "assertion_alg" => at(&raw.assertion_alg),
        "key_id" => at(&raw.key_id),
        "certificate_file" => at(&raw.certificate_file),
        "assertion_file" => at(&raw.assertion_file),
        "cert_file" => at(&raw.cert_file),
        "key_file" => at(&raw.key_file),
        _ => None,
    }
}

/// `auth` and the credentials its method needs.
pub(super) fn client_auth(
    v: &mut Validator<'_>,
    key: &str,
    spanned: &Spanned<file::Token>,
) -> Option<ClientAuth> {
    let raw = spanned.get_ref();
    let method = raw
        .auth
        .as_ref()
        .map_or(file::ClientAuth::Basic, |a| *a.get_ref());
    let mut ignored = false;
    for (name, methods) in METHOD_KEYS {
        if let Some(span) = written_at(raw, name) {
            if !methods.contains(&method) {
                let users: Vec<&str> = methods.iter().map(|m| method_name(*m)).collect();
                v.problem(
                    span,
                    format!("{key}.{name}"),
                    format!(
                        "is not used by auth = {:?}, only by {}",
                        method_name(method),
                        users.join(", ")
                    ),
                );
                ignored = true;
            }
        }
    }
    let auth = match method {
        file::ClientAuth::Basic => ClientAuth::Basic {
            secret: client_secret(v, key, spanned)?,
        },
        file::ClientAuth::Post => ClientAuth::Post {
            secret: client_secret(v, key, spanned)?,
        },
        file::ClientAuth::ClientSecretJwt => ClientAuth::SecretJwt {
            secret: client_secret(v, key, spanned)?,
            assertion: assertion(v, key, raw),
        },
        file::ClientAuth::PrivateKeyJwt => ClientAuth::PrivateKeyJwt {
            key_file: required_path(v, key, spanned, &raw.private_key_file, "private_key_file")?,
            alg: jws_alg(
                v,
                raw.assertion_alg.as_ref(),
                &format!("{key}.assertion_alg"),
                &[JwsAlg::Rs256, JwsAlg::Ps256, JwsAlg::Es256, JwsAlg::EdDsa],
            ),
            key_id: raw.key_id.as_ref().map(|k| k.get_ref().clone()),
            certificate_file: raw
                .certificate_file
                .as_ref()
                .map(|p| v.base_dir.join(p.get_ref())),
            assertion: assertion(v, key, raw),
        },
        file::ClientAuth::ClientAssertionFile => ClientAuth::AssertionFile {
            path: required_path(v, key, spanned, &raw.assertion_file, "assertion_file")?,
        },
        file::ClientAuth::TlsClientAuth => {
            let cert_file = required_path(v, key, spanned, &raw.cert_file, "cert_file");
            let key_file = required_path(v, key, spanned, &raw.key_file, "key_file");
            ClientAuth::TlsClientAuth {
                identity: Identity {
                    cert_file: cert_file?,
                    key_file: key_file?,
                },
            }
        }
        file::ClientAuth::None => ClientAuth::None,
    };
    (!ignored).then_some(auth)
}

/// `client_id`: required, and not empty, but with `client_assertion_file` (whose assertion
/// names the client), `auth = "none"` (a server that wants no client) and a
/// `service_account_file` (which names the client itself: `optional`).
pub(super) fn client_id(
    v: &mut Validator<'_>,
    key: &str,
    spanned: &Spanned<file::Token>,
    auth: Option<&ClientAuth>,
    optional: bool,
) -> Option<String> {
    match &spanned.get_ref().client_id {
        Some(id) if id.get_ref().is_empty() => {
            v.problem(id.span(), format!("{key}.client_id"), "is empty");
            None
        }
        Some(id) => Some(id.get_ref().clone()),
        None if optional
            || matches!(
                auth,
                Some(ClientAuth::AssertionFile { .. } | ClientAuth::None)
            ) =>
        {
            None
        }
        None => {
            v.problem(
                spanned.span(),
                format!("{key}.client_id"),
                "missing: every method but client_assertion_file and none needs the client_id",
            );
            None
        }
    }
}

/// `dpop`, `dpop_key_file` and `dpop_alg`.
pub(super) fn dpop(v: &mut Validator<'_>, key: &str, raw: &file::Token) -> Option<Dpop> {
    let enabled = raw.dpop.as_ref().is_some_and(|d| *d.get_ref());
    if !enabled {
        let stray = [
            (
                "dpop_key_file",
                raw.dpop_key_file.as_ref().map(Spanned::span),
            ),
            ("dpop_alg", raw.dpop_alg.as_ref().map(Spanned::span)),
        ];
        for (name, span) in stray {
            if let Some(span) = span {
                v.problem(span, format!("{key}.{name}"), "is set but dpop is not true");
            }
        }
        return None;
    }
    let alg = jws_alg(
        v,
        raw.dpop_alg.as_ref(),
        &format!("{key}.dpop_alg"),
        &[JwsAlg::Es256, JwsAlg::EdDsa],
    )
    .unwrap_or(JwsAlg::Es256);
    Some(Dpop {
        key_file: raw
            .dpop_key_file
            .as_ref()
            .map(|p| v.base_dir.join(p.get_ref())),
        alg,
    })
}

/// `assertion_audience` and `assertion_lifetime`.
fn assertion(v: &mut Validator<'_>, key: &str, raw: &file::Token) -> Assertion {
    Assertion {
        audience: raw.assertion_audience.as_ref().map(|a| a.get_ref().clone()),
        lifetime: duration(
            v,
            raw.assertion_lifetime.as_ref(),
            &format!("{key}.assertion_lifetime"),
            DEFAULT_ASSERTION_LIFETIME,
        ),
    }
}

/// A JWS algorithm among `allowed`; `None` when not written (or wrong, with a problem).
pub(super) fn jws_alg(
    v: &mut Validator<'_>,
    value: Option<&Spanned<String>>,
    key: &str,
    allowed: &[JwsAlg],
) -> Option<JwsAlg> {
    let value = value?;
    let found = allowed
        .iter()
        .copied()
        .find(|alg| alg.name() == value.get_ref());
    if found.is_none() {
        let names: Vec<&str> = allowed.iter().map(|a| a.name()).collect();
        v.problem(
            value.span(),
            key,
            format!("{:?} is not one of {}", value.get_ref(), names.join(", ")),
        );
    }
    found
}

/// A file the method cannot do without, relative to the config's directory.
fn required_path(
    v: &mut Validator<'_>,
    key: &str,
    spanned: &Spanned<file::Token>,
    value: &Option<Spanned<PathBuf>>,
    name: &str,
) -> Option<PathBuf> {
    match value {
        Some(path) => Some(v.base_dir.join(path.get_ref())),
        None => {
            let method = spanned
                .get_ref()
                .auth
                .as_ref()
                .map_or("basic", |a| method_name(*a.get_ref()));
            v.problem(
                spanned.span(),
                format!("{key}.{name}"),
                format!("missing: auth = {method:?} needs {name}"),
            );
            None
        }
    }
}

/// Exactly one of `client_secret_file`, `client_secret_env` and `client_secret`.
fn client_secret(
    v: &mut Validator<'_>,
    key: &str,
    spanned: &Spanned<file::Token>,
) -> Option<SecretSource> {
    let raw = spanned.get_ref();
    let sources: Vec<(SecretSource, Range<usize>)> = [
        raw.client_secret_file
            .as_ref()
            .map(|p| (SecretSource::File(v.base_dir.join(p.get_ref())), p.span())),
        raw.client_secret_env
            .as_ref()
            .map(|v| (SecretSource::Env(v.get_ref().clone()), v.span())),
        raw.client_secret.as_ref().map(|s| {
            (
                SecretSource::Inline(Secret::new(s.get_ref().as_str())),
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
            v.problem(
                spanned.span(),
                format!("{key}.client_secret_file"),
                "no client secret: set one of client_secret_file, client_secret_env or client_secret",
            );
            None
        }
        Err(sources) => {
            v.problem(
                sources[1].1.clone(),
                format!("{key}.client_secret"),
                "more than one client secret source: set only one of client_secret_file, client_secret_env or client_secret",
            );
            None
        }
    }
}
