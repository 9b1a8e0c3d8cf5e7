//! Client authentication at the token endpoint (RFC 6749 §2.3): what a token request carries
//! for each [`ClientAuth`] method.
//!
//! Each method reads its own credentials, at every fetch so that a rotated secret is picked
//! up, and teaches the fetch's [`Redactor`] every form in which they leave, so that nothing the
//! endpoint echoes back can carry them into a log. A method adds a header, form fields, or
//! (for the TLS-bound methods to come) an identity for the connection.

use base64::Engine;
use http::HeaderValue;
use serde_json::json;

use crate::config::{Assertion, ClientAuth, TokenSettings};
use crate::files::{self, Content};
use crate::jose::{self as jws, unix_now, SigningKey};
use crate::secret::{Redactor, Secret, SecretError};

/// `client_assertion_type` of a JWT assertion (RFC 7523 §2.2).
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// What one token request carries to authenticate the client. (The certificate of
/// `tls_client_auth` travels in the TLS handshake: see `tls::Identity`.)
#[derive(Debug, Default)]
pub(crate) struct Credentials {
    /// The `Authorization` header (`client_secret_basic`), marked sensitive.
    pub(crate) authorization: Option<HeaderValue>,
    /// Form fields, in order, after `grant_type`.
    pub(crate) form: Vec<(&'static str, Secret)>,
}

impl Credentials {
    fn form(fields: Vec<(&'static str, Secret)>) -> Self {
        Self {
            authorization: None,
            form: fields,
        }
    }
}

/// Why a client's credentials could not be presented; no request was sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CredentialError {
    /// The client secret could not be read.
    #[error("{0}")]
    Secret(#[from] SecretError),
    /// Another credential (a key, an assertion, a certificate) could not be read or used; the
    /// text names the file.
    #[error("{0}")]
    Unusable(String),
    /// A credential unfit for the request it goes in (a header value, a signature).
    #[error("{0}")]
    Build(String),
}

/// Reads the credentials of `settings.auth` and returns what the request carries, after
/// adding every form of them to `redactor`. Files are read off the runtime's thread, waiting
/// until `deadline` (the token request's) at most.
pub(crate) async fn present(
    settings: &TokenSettings,
    redactor: &mut Redactor,
    deadline: tokio::time::Instant,
) -> Result<Credentials, CredentialError> {
    let client_id = settings.client_id.as_deref().unwrap_or_default();
    // The client_id goes along with an assertion or a certificate: RFC 7523 §3 lets servers
    // want it, and RFC 8705 §2 requires it.
    let id_field = || {
        settings
            .client_id
            .as_deref()
            .map(|id| ("client_id", Secret::new(id)))
    };
    match &settings.auth {
        ClientAuth::Basic { secret } => {
            let secret = secret.read_within(deadline).await?;
            redactor.add_client_secret(client_id, secret.expose());
            Ok(Credentials {
                authorization: Some(basic_credentials(client_id, &secret)?),
                form: Vec::new(),
            })
        }
        ClientAuth::Post { secret } => {
            let secret = secret.read_within(deadline).await?;
            redactor.add_client_secret(client_id, secret.expose());
            Ok(Credentials::form(vec![
                ("client_id", Secret::new(client_id)),
                ("client_secret", secret),
            ]))
        }
        ClientAuth::SecretJwt { secret, assertion } => {
            let secret = secret.read_within(deadline).await?;
            redactor.add_client_secret(client_id, secret.expose());
            let key = SigningKey::hs256(secret.expose().as_bytes());
            let jwt = sign_assertion(settings, &key, assertion, json!({"typ": "JWT"}))?;
            Ok(with_assertion(id_field(), jwt, redactor))
        }
        ClientAuth::PrivateKeyJwt {
            key_file,
            alg,
            key_id,
            certificate_file,
            assertion,
        } => {
            let pem = files::read(key_file, Content::Key, deadline)
                .await
                .map_err(credentials)?;
            let key = SigningKey::from_pem(key_file, &pem, *alg).map_err(credentials)?;
            let mut header = json!({"typ": "JWT"});
            if let Some(kid) = key_id {
                header["kid"] = json!(kid);
            }
            if let Some(certificate) = certificate_file {
                let pem = files::read(certificate, Content::Certificate, deadline)
                    .await
                    .map_err(credentials)?;
                let x5t = jws::certificate_thumbprint_of(certificate, &pem).map_err(credentials)?;
                header["x5t#S256"] = json!(x5t);
            }
            let jwt = sign_assertion(settings, &key, assertion, header)?;
            Ok(with_assertion(id_field(), jwt, redactor))
        }
        ClientAuth::AssertionFile { path } => {
            let contents = files::read(path, Content::Assertion, deadline)
                .await
                .map_err(credentials)?;
            let jwt = files::text(&contents, path, Content::Assertion)
                .map_err(credentials)?
                .trim();
            if jwt.is_empty() {
                return Err(CredentialError::Unusable(format!(
                    "the assertion file {} is empty",
                    path.display()
                )));
            }
            Ok(with_assertion(id_field(), jwt.to_owned(), redactor))
        }
        // `tls_client_auth`: the certificate is in the handshake; `none`: a public client
        // names itself (RFC 6749 §3.2.1), when it has a client_id.
        ClientAuth::TlsClientAuth { .. } | ClientAuth::None => {
            Ok(Credentials::form(id_field().into_iter().collect()))
        }
    }
}

/// `client_assertion` and its type, after the `client_id` if any; the assertion, a
/// credential for its lifetime, is redacted from whatever comes back.
fn with_assertion(
    client_id: Option<(&'static str, Secret)>,
    jwt: String,
    redactor: &mut Redactor,
) -> Credentials {
    redactor.add(&jwt);
    let mut form: Vec<_> = client_id.into_iter().collect();
    form.push(("client_assertion_type", Secret::new(JWT_BEARER)));
    form.push(("client_assertion", Secret::new(jwt)));
    Credentials::form(form)
}

/// The assertion of RFC 7523 §3: `iss` = `sub` = the client, `aud` the token endpoint (or as
/// configured), a unique `jti`, `iat` now and `exp` a lifetime ahead.
fn sign_assertion(
    settings: &TokenSettings,
    key: &SigningKey,
    assertion: &Assertion,
    header: serde_json::Value,
) -> Result<String, CredentialError> {
    let client_id = settings.client_id.as_deref().unwrap_or_default();
    let now = unix_now();
    let audience = assertion
        .audience
        .clone()
        .unwrap_or_else(|| settings.url.to_string());
    let claims = json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": jws::random_id().map_err(signing_failed)?,
        "iat": now,
        "exp": now.saturating_add(assertion.lifetime.as_secs()),
    });
    key.sign(header, &claims).map_err(signing_failed)
}

/// A credential file that could not be read or used, as a fetch reports it.
fn credentials(error: impl std::error::Error) -> CredentialError {
    CredentialError::Unusable(error.to_string())
}

fn signing_failed(error: jws::SignError) -> CredentialError {
    CredentialError::Build(error.to_string())
}

/// Reads and loads every credential `auth` uses, as a fetch would, without sending anything:
/// for `bearerd --check`. Says what was found (key kind, algorithm, fingerprints), or why it
/// cannot be used.
pub(crate) fn check(auth: &ClientAuth) -> Result<String, String> {
    match auth {
        ClientAuth::Basic { secret } | ClientAuth::Post { secret } => secret
            .read()
            .map(|_| "secret readable".to_owned())
            .map_err(|e| e.to_string()),
        ClientAuth::SecretJwt { secret, .. } => secret
            .read()
            .map(|_| "HS256 with the client secret, secret readable".to_owned())
            .map_err(|e| e.to_string()),
        ClientAuth::PrivateKeyJwt {
            key_file,
            alg,
            certificate_file,
            ..
        } => {
            let key = SigningKey::from_pem_file(key_file, *alg).map_err(|e| e.to_string())?;
            let mut found = format!(
                "{} ({}), {}",
                key.kind(),
                key.alg(),
                jws::describe_fingerprint(&key)
            );
            if let Some(certificate) = certificate_file {
                jws::check_certificate_matches(certificate, key_file).map_err(|e| e.to_string())?;
                let x5t = jws::certificate_thumbprint(certificate).map_err(|e| e.to_string())?;
                found.push_str(&format!(", certificate x5t#S256 {x5t}"));
            }
            Ok(found)
        }
        ClientAuth::AssertionFile { path } => {
            let contents = files::read_sync(path, Content::Assertion).map_err(|e| e.to_string())?;
            match files::text(&contents, path, Content::Assertion) {
                Ok(text) if !text.trim().is_empty() => Ok("assertion file readable".into()),
                Ok(_) => Err(format!("the assertion file {} is empty", path.display())),
                Err(e) => Err(e.to_string()),
            }
        }
        ClientAuth::TlsClientAuth { identity } => crate::tls::LoadedIdentity::read(identity)
            .map(|loaded| format!("certificate sha256 {}", loaded.fingerprint()))
            .map_err(|e| e.to_string()),
        ClientAuth::None => Ok("no client credentials".into()),
    }
}

/// What `bearerd --check` says of `auth` from the config alone: the method and where its
/// credentials come from, never the credentials.
pub(crate) fn describe(auth: &ClientAuth) -> String {
    match auth {
        ClientAuth::Basic { secret }
        | ClientAuth::Post { secret }
        | ClientAuth::SecretJwt { secret, .. } => {
            format!("auth {}, secret from {secret}", auth.method())
        }
        ClientAuth::PrivateKeyJwt {
            key_file, key_id, ..
        } => {
            let mut text = format!("auth private_key_jwt, key from {}", key_file.display());
            if let Some(kid) = key_id {
                text.push_str(&format!(", kid {kid:?}"));
            }
            text
        }
        ClientAuth::AssertionFile { path } => {
            format!(
                "auth client_assertion_file, assertion from {}",
                path.display()
            )
        }
        ClientAuth::TlsClientAuth { identity } => format!(
            "auth tls_client_auth, certificate {} with key {}",
            identity.cert_file.display(),
            identity.key_file.display()
        ),
        ClientAuth::None => "auth none".into(),
    }
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`: RFC 6749 §2.3.1 has both encoded with
/// `application/x-www-form-urlencoded` first, which leaves the usual alphanumeric ids alone.
fn basic_credentials(client_id: &str, secret: &Secret) -> Result<HeaderValue, CredentialError> {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}:{}", encode(client_id), encode(secret.expose()));
    let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
    let mut value = HeaderValue::try_from(format!("Basic {encoded}"))
        .map_err(|e| CredentialError::Build(format!("the Basic header: {e}")))?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests;
