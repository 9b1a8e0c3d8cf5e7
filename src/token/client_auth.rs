//! Client authentication at the token endpoint (RFC 6749 §2.3): what a token request carries
//! for each [`ClientAuth`] method.
//!
//! Each method reads its own credentials, at every fetch so that a rotated secret is picked
//! up, and teaches the fetch's [`Redactor`] every form in which they leave, so that nothing the
//! endpoint echoes back can carry them into a log. A method adds a header, form fields, or
//! (for the TLS-bound methods to come) an identity for the connection.

use base64::Engine;
use http::HeaderValue;

use super::fetch::FetchError;
use crate::config::ClientAuth;
use crate::secret::{Redactor, Secret, SecretError};

/// What one token request carries to authenticate the client.
#[derive(Debug, Default)]
pub(crate) struct Credentials {
    /// The `Authorization` header (`client_secret_basic`), marked sensitive.
    pub(crate) authorization: Option<HeaderValue>,
    /// Form fields, in order, after `grant_type` (`client_secret_post`).
    pub(crate) form: Vec<(&'static str, Secret)>,
}

/// Reads the credentials of `auth` and returns what the request carries, after adding every
/// form of them to `redactor`.
pub(crate) fn present(
    auth: &ClientAuth,
    client_id: &str,
    redactor: &mut Redactor,
) -> Result<Credentials, FetchError> {
    match auth {
        ClientAuth::Basic { secret } => {
            let secret = secret.read()?;
            redactor.add_client_secret(client_id, secret.expose());
            Ok(Credentials {
                authorization: Some(basic_credentials(client_id, &secret)?),
                form: Vec::new(),
            })
        }
        ClientAuth::Post { secret } => {
            let secret = secret.read()?;
            redactor.add_client_secret(client_id, secret.expose());
            Ok(Credentials {
                authorization: None,
                form: vec![
                    ("client_id", Secret::new(client_id)),
                    ("client_secret", secret),
                ],
            })
        }
    }
}

/// Reads every credential `auth` uses, as a fetch would, without sending anything: for
/// `bearerd --check`.
pub(crate) fn check(auth: &ClientAuth) -> Result<(), SecretError> {
    match auth {
        ClientAuth::Basic { secret } | ClientAuth::Post { secret } => secret.read().map(drop),
    }
}

/// What `bearerd --check` says of `auth`: the method and where its credentials come from,
/// never the credentials.
pub(crate) fn describe(auth: &ClientAuth) -> String {
    match auth {
        ClientAuth::Basic { secret } | ClientAuth::Post { secret } => {
            format!("auth {}, secret from {secret}", auth.method())
        }
    }
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`: RFC 6749 §2.3.1 has both encoded with
/// `application/x-www-form-urlencoded` first, which leaves the usual alphanumeric ids alone.
fn basic_credentials(client_id: &str, secret: &Secret) -> Result<HeaderValue, FetchError> {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}:{}", encode(client_id), encode(secret.expose()));
    let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
    let mut value = HeaderValue::try_from(format!("Basic {encoded}")).map_err(|e| {
        FetchError::BuildRequest {
            reason: format!("the Basic header: {e}"),
        }
    })?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretSource;

    fn inline(secret: &str) -> SecretSource {
        SecretSource::Inline(Secret::new(secret))
    }

    #[test]
    fn basic_encodes_id_and_secret_per_rfc_6749_2_3_1() {
        let auth = ClientAuth::Basic {
            secret: inline("p@ss:word"),
        };
        let mut redactor = Redactor::new();
        let credentials = present(&auth, "my app", &mut redactor).unwrap();
        let header = credentials.authorization.unwrap();
        assert!(header.is_sensitive());
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(header.to_str().unwrap().strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), "my+app:p%40ss%3Aword");
        assert!(credentials.form.is_empty());
        assert!(redactor.finds_in(header.to_str().unwrap()));
    }

    #[test]
    fn post_puts_id_and_secret_in_the_form() {
        let auth = ClientAuth::Post {
            secret: inline("p@ss:word"),
        };
        let mut redactor = Redactor::new();
        let credentials = present(&auth, "my app", &mut redactor).unwrap();
        assert!(credentials.authorization.is_none());
        let form: Vec<(&str, &str)> = credentials
            .form
            .iter()
            .map(|(name, value)| (*name, value.expose()))
            .collect();
        assert_eq!(
            form,
            [("client_id", "my app"), ("client_secret", "p@ss:word")]
        );
        assert!(redactor.finds_in("client_secret=p%40ss%3Aword"));
    }

    #[test]
    fn a_missing_secret_is_reported_before_anything_is_sent() {
        let auth = ClientAuth::Basic {
            secret: SecretSource::Env("BEARERD_TEST_NO_SUCH_VARIABLE".into()),
        };
        assert!(matches!(
            present(&auth, "app", &mut Redactor::new()),
            Err(FetchError::Secret(_))
        ));
        assert!(check(&auth).is_err());
        assert_eq!(
            describe(&auth),
            format!("auth basic, secret from {}", auth.secret().unwrap())
        );
    }
}
