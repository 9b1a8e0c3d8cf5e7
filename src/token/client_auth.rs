//! Client authentication at the token endpoint (RFC 6749 §2.3): what a token request carries
//! for each [`ClientAuth`] method.
//!
//! Each method reads its own credentials, at every fetch so that a rotated secret is picked
//! up, and teaches the fetch's [`Redactor`] every form in which they leave, so that nothing the
//! endpoint echoes back can carry them into a log. A method adds a header, form fields, or
//! (for the TLS-bound methods to come) an identity for the connection.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::HeaderValue;
use serde_json::json;

use super::fetch::FetchError;
use super::jws::{self, SigningKey};
use crate::config::{Assertion, ClientAuth, TokenSettings};
use crate::secret::{Redactor, Secret};

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

/// Reads the credentials of `settings.auth` and returns what the request carries, after
/// adding every form of them to `redactor`.
pub(crate) fn present(
    settings: &TokenSettings,
    redactor: &mut Redactor,
) -> Result<Credentials, FetchError> {
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
            Ok(Credentials::form(vec![
                ("client_id", Secret::new(client_id)),
                ("client_secret", secret),
            ]))
        }
        ClientAuth::SecretJwt { secret, assertion } => {
            let secret = secret.read()?;
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
            let key =
                SigningKey::from_pem_file(key_file, *alg).map_err(|e| FetchError::Credentials {
                    reason: e.to_string(),
                })?;
            let mut header = json!({"typ": "JWT"});
            if let Some(kid) = key_id {
                header["kid"] = json!(kid);
            }
            if let Some(certificate) = certificate_file {
                let x5t = jws::certificate_thumbprint(certificate).map_err(|e| {
                    FetchError::Credentials {
                        reason: e.to_string(),
                    }
                })?;
                header["x5t#S256"] = json!(x5t);
            }
            let jwt = sign_assertion(settings, &key, assertion, header)?;
            Ok(with_assertion(id_field(), jwt, redactor))
        }
        ClientAuth::AssertionFile { path } => {
            let text = std::fs::read_to_string(path).map_err(|e| FetchError::Credentials {
                reason: format!("cannot read the assertion file {}: {e}", path.display()),
            })?;
            let jwt = text.trim();
            if jwt.is_empty() {
                return Err(FetchError::Credentials {
                    reason: format!("the assertion file {} is empty", path.display()),
                });
            }
            Ok(with_assertion(id_field(), jwt.to_owned(), redactor))
        }
        ClientAuth::TlsClientAuth { .. } => Ok(Credentials::form(id_field().into_iter().collect())),
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
) -> Result<String, FetchError> {
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

fn signing_failed(error: jws::SignError) -> FetchError {
    FetchError::BuildRequest {
        reason: error.to_string(),
    }
}

/// Seconds since the Unix epoch, as JWT `iat` and `exp` count them.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
                "{} ({}), public key sha256 {}",
                key.kind(),
                key.alg(),
                key.fingerprint().unwrap_or_default()
            );
            if let Some(certificate) = certificate_file {
                let x5t = jws::certificate_thumbprint(certificate).map_err(|e| e.to_string())?;
                found.push_str(&format!(", certificate x5t#S256 {x5t}"));
            }
            Ok(found)
        }
        ClientAuth::AssertionFile { path } => match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => Ok("assertion file readable".into()),
            Ok(_) => Err(format!("the assertion file {} is empty", path.display())),
            Err(e) => Err(format!(
                "cannot read the assertion file {}: {e}",
                path.display()
            )),
        },
        ClientAuth::TlsClientAuth { identity } => crate::tls::LoadedIdentity::read(identity)
            .map(|loaded| format!("certificate sha256 {}", loaded.fingerprint()))
            .map_err(|e| e.to_string()),
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
    use crate::config::JwsAlg;
    use crate::secret::SecretSource;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use std::path::PathBuf;
    use std::time::Duration;

    fn inline(secret: &str) -> SecretSource {
        SecretSource::Inline(Secret::new(secret))
    }

    fn settings(auth: ClientAuth) -> TokenSettings {
        TokenSettings {
            url: "https://auth.example.com/oauth/token".parse().unwrap(),
            client_id: Some("my app".into()),
            auth,
            scope: None,
            audience: None,
            resource: None,
            params: Default::default(),
            dpop: None,
            timeout: Duration::from_secs(1),
            default_lifetime: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(86400),
            allow_plain_http: false,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
        }
    }

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/keys")
            .join(name)
    }

    fn form(credentials: &Credentials) -> Vec<(&str, &str)> {
        credentials
            .form
            .iter()
            .map(|(name, value)| (*name, value.expose()))
            .collect()
    }

    /// The header and claims of a compact JWS, and the signed part and signature.
    fn parts(jwt: &str) -> (serde_json::Value, serde_json::Value, String, Vec<u8>) {
        let pieces: Vec<&str> = jwt.split('.').collect();
        assert_eq!(pieces.len(), 3, "{jwt}");
        let json = |s: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap();
        (
            json(pieces[0]),
            json(pieces[1]),
            format!("{}.{}", pieces[0], pieces[1]),
            URL_SAFE_NO_PAD.decode(pieces[2]).unwrap(),
        )
    }

    fn assertion_of(credentials: &Credentials) -> String {
        let fields = form(credentials);
        assert!(
            fields.contains(&("client_assertion_type", JWT_BEARER)),
            "{fields:?}"
        );
        fields
            .iter()
            .find(|(name, _)| *name == "client_assertion")
            .unwrap()
            .1
            .to_owned()
    }

    fn assertion(audience: Option<&str>) -> Assertion {
        Assertion {
            audience: audience.map(str::to_owned),
            lifetime: Duration::from_secs(60),
        }
    }

    #[test]
    fn basic_encodes_id_and_secret_per_rfc_6749_2_3_1() {
        let settings = settings(ClientAuth::Basic {
            secret: inline("p@ss:word"),
        });
        let mut redactor = Redactor::new();
        let credentials = present(&settings, &mut redactor).unwrap();
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
        let settings = settings(ClientAuth::Post {
            secret: inline("p@ss:word"),
        });
        let mut redactor = Redactor::new();
        let credentials = present(&settings, &mut redactor).unwrap();
        assert!(credentials.authorization.is_none());
        assert_eq!(
            form(&credentials),
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
            present(&settings(auth.clone()), &mut Redactor::new()),
            Err(FetchError::Secret(_))
        ));
        assert!(check(&auth).is_err());
        assert_eq!(
            describe(&auth),
            format!("auth basic, secret from {}", auth.secret().unwrap())
        );
    }

    #[test]
    fn client_secret_jwt_is_hs256_over_rfc_7523_claims() {
        let settings = settings(ClientAuth::SecretJwt {
            secret: inline("a shared secret of 32 bytes or more!"),
            assertion: assertion(None),
        });
        let mut redactor = Redactor::new();
        let credentials = present(&settings, &mut redactor).unwrap();
        assert_eq!(form(&credentials)[0], ("client_id", "my app"));
        let jwt = assertion_of(&credentials);
        let (header, claims, signed, signature) = parts(&jwt);
        assert_eq!(header, json!({"alg": "HS256", "typ": "JWT"}));
        assert_eq!(claims["iss"], "my app");
        assert_eq!(claims["sub"], "my app");
        assert_eq!(claims["aud"], "https://auth.example.com/oauth/token");
        let (iat, exp) = (
            claims["iat"].as_u64().unwrap(),
            claims["exp"].as_u64().unwrap(),
        );
        assert_eq!(exp - iat, 60);
        assert!(iat.abs_diff(unix_now()) <= 5);
        let key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            b"a shared secret of 32 bytes or more!",
        );
        ring::hmac::verify(&key, signed.as_bytes(), &signature).unwrap();
        // The assertion is a credential for its lifetime: nothing echoes it back.
        assert!(redactor.finds_in(&format!("got {jwt}")));
        // Each assertion is new.
        let again = assertion_of(&present(&settings, &mut Redactor::new()).unwrap());
        assert_ne!(parts(&again).1["jti"], claims["jti"]);
    }

    #[test]
    fn private_key_jwt_signs_with_each_key_type() {
        use ring::signature::{
            KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ED25519,
            RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256,
        };
        let cases: [(
            &str,
            Option<JwsAlg>,
            &str,
            &dyn ring::signature::VerificationAlgorithm,
        ); 5] = [
            ("rsa-2048.pem", None, "RS256", &RSA_PKCS1_2048_8192_SHA256),
            (
                "rsa-2048-pkcs1.pem",
                Some(JwsAlg::Ps256),
                "PS256",
                &RSA_PSS_2048_8192_SHA256,
            ),
            ("ec-p256.pem", None, "ES256", &ECDSA_P256_SHA256_FIXED),
            ("ed25519.pem", None, "EdDSA", &ED25519),
            ("ed25519.pem", Some(JwsAlg::EdDsa), "EdDSA", &ED25519),
        ];
        for (file, alg, expected, verification) in cases {
            let settings = settings(ClientAuth::PrivateKeyJwt {
                key_file: fixture(file),
                alg,
                key_id: Some("key-1".into()),
                certificate_file: Some(fixture("rsa-2048-cert.pem")),
                assertion: assertion(Some("https://auth.example.com/")),
            });
            let jwt = assertion_of(&present(&settings, &mut Redactor::new()).unwrap());
            let (header, claims, signed, signature) = parts(&jwt);
            assert_eq!(header["alg"], expected, "{file}");
            assert_eq!(header["kid"], "key-1");
            assert_eq!(
                header["x5t#S256"],
                jws::certificate_thumbprint(&fixture("rsa-2048-cert.pem")).unwrap()
            );
            assert_eq!(claims["aud"], "https://auth.example.com/");
            let key = SigningKey::from_pem_file(&fixture(file), alg).unwrap();
            let public = match &key {
                SigningKey::Rsa { key, .. } => key.public_key().as_ref().to_vec(),
                SigningKey::Ecdsa(key) => key.public_key().as_ref().to_vec(),
                SigningKey::Ed25519(key) => key.public_key().as_ref().to_vec(),
                SigningKey::Hmac(_) => unreachable!(),
            };
            UnparsedPublicKey::new(verification, public)
                .verify(signed.as_bytes(), &signature)
                .unwrap_or_else(|_| panic!("{file}: signature does not verify"));
        }
    }

    #[test]
    fn unusable_keys_are_named_with_the_reason() {
        for (file, alg, expected) in [
            ("ec-sec1.pem", None, "openssl pkcs8 -topk8"),
            ("ec-p384.pem", None, "not an RSA, EC P-256 or Ed25519"),
            (
                "ec-p256.pem",
                Some(JwsAlg::Rs256),
                "RS256 does not suit EC P-256",
            ),
            ("missing.pem", None, "missing.pem"),
            ("rsa-2048-cert.pem", None, "cannot read a PEM private key"),
        ] {
            let message = SigningKey::from_pem_file(&fixture(file), alg)
                .unwrap_err()
                .to_string();
            assert!(message.contains(expected), "{file}: {message}");
            assert!(message.contains(file), "{file}: {message}");
        }
    }

    #[test]
    fn an_assertion_file_is_read_at_every_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let mut settings = settings(ClientAuth::AssertionFile { path: path.clone() });
        settings.client_id = None;
        assert!(matches!(
            present(&settings, &mut Redactor::new()),
            Err(FetchError::Credentials { .. })
        ));
        std::fs::write(&path, "eyJhbGciOiJSUzI1NiJ9.e30.first\n").unwrap();
        let mut redactor = Redactor::new();
        let first = present(&settings, &mut redactor).unwrap();
        assert_eq!(
            form(&first),
            [
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", "eyJhbGciOiJSUzI1NiJ9.e30.first")
            ]
        );
        assert!(redactor.finds_in("eyJhbGciOiJSUzI1NiJ9.e30.first"));
        // Kubernetes rotates a projected token by replacing the file.
        std::fs::write(&path, "eyJhbGciOiJSUzI1NiJ9.e30.second").unwrap();
        assert_eq!(
            assertion_of(&present(&settings, &mut Redactor::new()).unwrap()),
            "eyJhbGciOiJSUzI1NiJ9.e30.second"
        );
    }

    #[test]
    fn check_describes_keys_by_fingerprint_only() {
        let auth = ClientAuth::PrivateKeyJwt {
            key_file: fixture("ec-p256.pem"),
            alg: None,
            key_id: Some("k".into()),
            certificate_file: None,
            assertion: assertion(None),
        };
        let found = check(&auth).unwrap();
        assert!(
            found.starts_with("EC P-256 key (ES256), public key sha256 "),
            "{found}"
        );
        let pem = std::fs::read_to_string(fixture("ec-p256.pem")).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!found.contains(&body[..20]));
        assert!(describe(&auth).contains("kid \"k\""));
    }
}
