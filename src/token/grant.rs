//! The grant's part of a token request: `grant_type` and the fields that go with it, for each
//! [`Grant`]. Client authentication (`client_auth`) is added on top, unchanged.
//!
//! Like client credentials, whatever a grant sends is read at each fetch (a rotated subject
//! token or key is picked up) and taught to the fetch's [`Redactor`] before it leaves, so
//! that nothing the endpoint echoes back can carry it into a log.

use std::path::Path;

use serde_json::json;

use super::client_auth::CredentialError;
use crate::config::{
    Grant, JwsAlg, JwtBearer, JwtKey, ScopeIn, ServiceAccountKey, SubjectFrom, TokenSettings,
};
use crate::files::{self, Content};
use crate::jose::{self as jws, unix_now, SigningKey};
use crate::secret::{Redactor, Secret};

/// The form fields of the grant, `grant_type` first; `refresh_token` is the refresh token of
/// the chain for `grant = "refresh_token"` (held by the fetch, not read here), `subject` the
/// app request's subject token for an on-behalf-of exchange.
pub(crate) async fn fields(
    settings: &TokenSettings,
    redactor: &mut Redactor,
    deadline: tokio::time::Instant,
    refresh_token: Option<&Secret>,
    subject: Option<&Secret>,
) -> Result<Vec<(&'static str, Secret)>, CredentialError> {
    let mut form = vec![("grant_type", Secret::new(settings.grant.grant_type()))];
    match &settings.grant {
        Grant::ClientCredentials => {}
        Grant::JwtBearer(jwt) => {
            let assertion = assertion(settings, jwt, deadline).await?;
            redactor.add(&assertion);
            form.push(("assertion", Secret::new(assertion)));
        }
        Grant::TokenExchange(exchange) => {
            let subject = match (&exchange.subject, subject) {
                (SubjectFrom::File(path), _) => token_file(path, deadline).await?,
                (SubjectFrom::Header(_), Some(subject)) => subject.clone(),
                (SubjectFrom::Header(on_behalf_of), None) => {
                    return Err(CredentialError::Unusable(format!(
                        "on-behalf-of: no subject token (it comes from each request's {} header)",
                        on_behalf_of.header
                    )))
                }
            };
            redactor.add(subject.expose());
            form.push(("subject_token", subject));
            form.push((
                "subject_token_type",
                Secret::new(exchange.subject_token_type.as_str()),
            ));
            if let Some(actor) = &exchange.actor {
                let token = token_file(&actor.file, deadline).await?;
                redactor.add(token.expose());
                form.push(("actor_token", token));
                form.push(("actor_token_type", Secret::new(actor.token_type.as_str())));
            }
            if let Some(requested) = &exchange.requested_token_type {
                form.push(("requested_token_type", Secret::new(requested.as_str())));
            }
        }
        Grant::RefreshToken(_) => {
            let token = refresh_token
                .ok_or_else(|| CredentialError::Unusable("no refresh token is held".into()))?;
            redactor.add(token.expose());
            form.push(("refresh_token", token.clone()));
        }
    }
    Ok(form)
}

/// Whether `scope` goes in the form: not when the assertion carries it.
pub(crate) fn scope_in_form(settings: &TokenSettings) -> bool {
    !matches!(&settings.grant, Grant::JwtBearer(jwt) if jwt.scope_in == ScopeIn::Claim)
}

/// A token file's contents, trimmed (a trailing line break is the editor's, not the token's);
/// an empty file is an error.
pub(crate) async fn token_file(
    path: &Path,
    deadline: tokio::time::Instant,
) -> Result<Secret, CredentialError> {
    let contents = files::read(path, Content::Token, deadline)
        .await
        .map_err(unusable)?;
    token_text(path, &contents)
}

/// The same, read now on the calling thread (`--check`, start).
pub(crate) fn token_file_sync(path: &Path) -> Result<Secret, CredentialError> {
    let contents = files::read_sync(path, Content::Token).map_err(unusable)?;
    token_text(path, &contents)
}

fn token_text(path: &Path, contents: &[u8]) -> Result<Secret, CredentialError> {
    let text = files::text(contents, path, Content::Token)
        .map_err(unusable)?
        .trim();
    if text.is_empty() {
        return Err(CredentialError::Unusable(format!(
            "the token file {} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(text))
}

/// The key of a JWT bearer assertion, read now, and its `kid`.
async fn signing_key(
    jwt: &JwtBearer,
    deadline: tokio::time::Instant,
) -> Result<(SigningKey, Option<String>), CredentialError> {
    match &jwt.key {
        JwtKey::Pem { path, alg } => {
            let pem = files::read(path, Content::Key, deadline)
                .await
                .map_err(unusable)?;
            let key = SigningKey::from_pem(path, &pem, *alg).map_err(unusable)?;
            Ok((key, jwt.key_id.clone()))
        }
        JwtKey::ServiceAccount { path } => {
            let contents = files::read(path, Content::ServiceAccount, deadline)
                .await
                .map_err(unusable)?;
            service_account_key(path, &contents)
        }
    }
}

/// The RS256 key of a service-account file and its `private_key_id`.
fn service_account_key(
    path: &Path,
    contents: &[u8],
) -> Result<(SigningKey, Option<String>), CredentialError> {
    let sa = ServiceAccountKey::parse(path, contents).map_err(CredentialError::Unusable)?;
    let key = SigningKey::from_pem(
        path,
        sa.private_key.expose().as_bytes(),
        Some(JwsAlg::Rs256),
    )
    .map_err(unusable)?;
    Ok((key, sa.private_key_id))
}

/// The assertion of RFC 7523 §3 for the grant of §2.1: `iss`, `sub` (when set), `aud`, a
/// fresh `jti`, `iat` now, `exp` a lifetime ahead, and with `scope_in = "claim"` the scope.
async fn assertion(
    settings: &TokenSettings,
    jwt: &JwtBearer,
    deadline: tokio::time::Instant,
) -> Result<String, CredentialError> {
    let (key, kid) = signing_key(jwt, deadline).await?;
    let now = unix_now();
    let mut claims = json!({
        "iss": jwt.issuer,
        "aud": jwt.audience.clone().unwrap_or_else(|| settings.url.to_string()),
        "jti": jws::random_id().map_err(|e| CredentialError::Build(e.to_string()))?,
        "iat": now,
        "exp": now.saturating_add(jwt.lifetime.as_secs()),
    });
    if let Some(subject) = &jwt.subject {
        claims["sub"] = json!(subject);
    }
    if jwt.scope_in == ScopeIn::Claim {
        if let Some(scope) = &settings.scope {
            claims["scope"] = json!(scope);
        }
    }
    let mut header = json!({"typ": "JWT"});
    if let Some(kid) = kid {
        header["kid"] = json!(kid);
    }
    key.sign(header, &claims)
        .map_err(|e| CredentialError::Build(e.to_string()))
}

fn unusable(error: impl std::error::Error) -> CredentialError {
    CredentialError::Unusable(error.to_string())
}

/// Reads and loads what the grant uses, as a fetch would, without sending anything: for
/// `bearerd --check`. Never spends a refresh token.
pub(crate) fn check(settings: &TokenSettings) -> Option<Result<String, String>> {
    match &settings.grant {
        Grant::ClientCredentials => None,
        Grant::JwtBearer(jwt) => Some(match &jwt.key {
            JwtKey::Pem { path, alg } => SigningKey::from_pem_file(path, *alg)
                .map(|key| {
                    format!(
                        "jwt_bearer key {} ({}), {}",
                        key.kind(),
                        key.alg(),
                        jws::describe_fingerprint(&key)
                    )
                })
                .map_err(|e| e.to_string()),
            JwtKey::ServiceAccount { path } => files::read_sync(path, Content::ServiceAccount)
                .map_err(|e| e.to_string())
                .and_then(|contents| {
                    service_account_key(path, &contents).map_err(|e| e.to_string())
                })
                .map(|(key, kid)| {
                    format!(
                        "service account {}, key {} ({}), kid {:?}",
                        jwt.issuer,
                        key.kind(),
                        key.alg(),
                        kid.unwrap_or_default()
                    )
                }),
        }),
        Grant::TokenExchange(exchange) => Some(
            match &exchange.subject {
                SubjectFrom::File(path) => token_file_sync(path).map(|_| ()),
                // Each request brings its own: nothing to read now.
                SubjectFrom::Header(_) => Ok(()),
            }
            .and_then(|()| match &exchange.actor {
                Some(actor) => token_file_sync(&actor.file).map(|_| ()),
                None => Ok(()),
            })
            .map(|()| match &exchange.subject {
                SubjectFrom::File(_) => "subject token readable".to_owned(),
                SubjectFrom::Header(_) if exchange.actor.is_some() => {
                    "actor token readable (the subject comes with each request)".to_owned()
                }
                SubjectFrom::Header(_) => {
                    "nothing to read (the subject comes with each request)".to_owned()
                }
            })
            .map_err(|e| e.to_string()),
        ),
        Grant::RefreshToken(refresh) => Some(
            token_file_sync(&refresh.file)
                .map(|_| "refresh_token_file readable (not spent by --check)".to_owned())
                .map_err(|e| e.to_string()),
        ),
    }
}

/// What `bearerd --check` says of the grant from the config alone: never a credential.
pub(crate) fn describe(settings: &TokenSettings) -> String {
    match &settings.grant {
        Grant::ClientCredentials => "grant client_credentials".into(),
        Grant::JwtBearer(jwt) => format!(
            "grant jwt_bearer, iss {:?}, key from {}",
            jwt.issuer,
            jwt.key.path().display()
        ),
        Grant::TokenExchange(exchange) => match &exchange.subject {
            SubjectFrom::File(path) => format!(
                "grant token_exchange, subject token ({}) from {}",
                exchange.subject_token_type,
                path.display()
            ),
            SubjectFrom::Header(on_behalf_of) => format!(
                "grant token_exchange on-behalf-of: subject token ({}) from each request's {} header{} (never forwarded), tokens fetched on demand and cached per subject, at most {} subjects",
                exchange.subject_token_type,
                on_behalf_of.header,
                if on_behalf_of.is_authorization() {
                    " (its Bearer scheme stripped)"
                } else {
                    ""
                },
                on_behalf_of.max_subjects
            ),
        },
        Grant::RefreshToken(refresh) => format!(
            "grant refresh_token, first refresh token from {}",
            refresh.file.display()
        ),
    }
}

#[cfg(test)]
mod tests;
