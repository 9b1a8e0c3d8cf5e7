//! Tests of each client authentication method: what a request carries, signatures verified with ring, keys refused with their reason.

use super::*;
use crate::config::JwsAlg;
use crate::secret::SecretSource;
use crate::token::fetch::FetchError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::path::PathBuf;
use std::time::Duration;

/// `present` run to its end on a runtime of its own, with its deadline far off.
fn present(settings: &TokenSettings, redactor: &mut Redactor) -> Result<Credentials, FetchError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(super::present(settings, redactor, deadline))
        .map_err(FetchError::from)
}

fn inline(secret: &str) -> SecretSource {
    SecretSource::Inline(Secret::new(secret))
}

fn settings(auth: ClientAuth) -> TokenSettings {
    TokenSettings::for_tests(auth)
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
        KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ED25519, RSA_PKCS1_2048_8192_SHA256,
        RSA_PSS_2048_8192_SHA256,
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
        found.starts_with("EC P-256 key (ES256), JWK thumbprint (RFC 7638) "),
        "{found}"
    );
    let pem = std::fs::read_to_string(fixture("ec-p256.pem")).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!found.contains(&body[..20]));
    assert!(describe(&auth).contains("kid \"k\""));
}

/// A `certificate_file` that is not the key's own is refused by `--check`: the server would
/// refuse every assertion whose `x5t#S256` names it.
#[test]
fn check_refuses_a_certificate_of_another_key() {
    let auth = |key: &str| ClientAuth::PrivateKeyJwt {
        key_file: fixture(key),
        alg: None,
        key_id: None,
        certificate_file: Some(fixture("rsa-2048-cert.pem")),
        assertion: assertion(None),
    };
    let found = check(&auth("rsa-2048.pem")).unwrap();
    assert!(found.contains("public key SHA-256 "), "{found}");
    assert!(found.contains("certificate x5t#S256 "), "{found}");
    let error = check(&auth("ec-p256.pem")).unwrap_err();
    assert!(
        error.contains("rsa-2048-cert.pem: is not the certificate of the key in")
            && error.contains("ec-p256.pem"),
        "{error}"
    );
}
