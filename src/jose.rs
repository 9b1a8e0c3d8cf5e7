//! JOSE and the hashes around it, a leaf below `token` and `tls`: JSON Web Signatures in the
//! compact form (RFC 7515 §7.1), made with ring's primitives, for the assertions of
//! `client_secret_jwt` and `private_key_jwt` (RFC 7523) and DPoP proofs (RFC 9449); JWK
//! thumbprints (RFC 7638); SHA-256 in base64url; random ids; the Unix time JWTs count in.
//! Only the encoding is done here; every cryptographic operation is ring's.
//!
//! Key material is never printed: `Debug` shows the key's kind, and what `--check` shows is a
//! SHA-256 fingerprint of the public key.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

use crate::config::JwsAlg;
use crate::files::{self, Content, FileError};

/// Seconds since the Unix epoch, as JWT `iat` and `exp` (and cache entries) count them.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A key that signs JWSs, with its algorithm.
pub(crate) enum SigningKey {
    /// HS256 with a shared secret.
    Hmac(ring::hmac::Key),
    /// RS256 (`pss: false`) or PS256.
    Rsa { key: RsaKeyPair, pss: bool },
    /// ES256.
    Ecdsa(EcdsaKeyPair),
    /// EdDSA with Ed25519.
    Ed25519(Ed25519KeyPair),
}

/// A key that could not be read or used. Says which file and why; never holds key material.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    /// The file is missing, not a regular file, or over its size limit.
    #[error(transparent)]
    File(#[from] FileError),
    /// The file holds no PEM private key.
    #[error("cannot read a PEM private key from {}: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A key of a kind bearerd cannot use, or that ring rejects.
    #[error("{}: {reason}", path.display())]
    Unusable {
        /// The file.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// The certificate file holds no PEM certificate.
    #[error("cannot read a PEM certificate from {}: {reason}", path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The system's random number generator failed.
    #[error("cannot make a key: the random number generator failed")]
    Random,
}

/// Signing failed (ring reports no reason; it happens only when the random number generator
/// does).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("cannot sign: the random number generator failed")]
pub(crate) struct SignError;

impl SigningKey {
    /// An HS256 key from a shared secret (`client_secret_jwt`).
    pub(crate) fn hs256(secret: &[u8]) -> Self {
        Self::Hmac(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    /// The private key in the PEM file at `path` (PKCS#8; RSA also PKCS#1), for `alg`, or for
    /// the key's usual algorithm when `alg` is `None`. Read on the calling thread, by the
    /// bounded reader: for start and `--check`.
    pub(crate) fn from_pem_file(path: &Path, alg: Option<JwsAlg>) -> Result<Self, KeyError> {
        let pem = files::read_sync(path, Content::Key)?;
        Self::from_pem(path, &pem, alg)
    }

    /// The private key in `pem`, read from `path` (which messages name).
    pub(crate) fn from_pem(path: &Path, pem: &[u8], alg: Option<JwsAlg>) -> Result<Self, KeyError> {
        let unusable = |reason: String| KeyError::Unusable {
            path: path.to_owned(),
            reason,
        };
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| KeyError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let key = match &der {
            PrivateKeyDer::Pkcs1(rsa) => RsaKeyPair::from_der(rsa.secret_pkcs1_der())
                .map(|key| Self::Rsa { key, pss: false })
                .map_err(|e| unusable(format!("RSA key rejected: {e}")))?,
            PrivateKeyDer::Sec1(_) => {
                return Err(unusable(
                    "an \"EC PRIVATE KEY\" (SEC1) file: convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.p8`".into(),
                ))
            }
            PrivateKeyDer::Pkcs8(pkcs8) => Self::from_pkcs8(pkcs8.secret_pkcs8_der())
                .ok_or_else(|| {
                    unusable("not an RSA, EC P-256 or Ed25519 private key that ring accepts (other curves and encrypted keys are not supported)".into())
                })?,
            _ => return Err(unusable("a private key of an unknown kind".into())),
        };
        match alg {
            None => Ok(key),
            Some(alg) => key.with_alg(alg).map_err(unusable),
        }
    }

    /// A new key pair for `alg` (ES256 or EdDSA), for DPoP.
    pub(crate) fn generate(alg: JwsAlg) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let pkcs8 = match alg {
            JwsAlg::EdDsa => Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Random)?,
            _ => EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|_| KeyError::Random)?,
        };
        Self::from_pkcs8(pkcs8.as_ref()).ok_or(KeyError::Random)
    }

    fn from_pkcs8(der: &[u8]) -> Option<Self> {
        if let Ok(key) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            return Some(Self::Ed25519(key));
        }
        let rng = SystemRandom::new();
        if let Ok(key) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
        {
            return Some(Self::Ecdsa(key));
        }
        RsaKeyPair::from_pkcs8(der)
            .ok()
            .map(|key| Self::Rsa { key, pss: false })
    }

    /// The same key for `alg`, if it suits the key.
    fn with_alg(self, alg: JwsAlg) -> Result<Self, String> {
        match (self, alg) {
            (Self::Rsa { key, .. }, JwsAlg::Rs256) => Ok(Self::Rsa { key, pss: false }),
            (Self::Rsa { key, .. }, JwsAlg::Ps256) => Ok(Self::Rsa { key, pss: true }),
            (key @ Self::Ecdsa(_), JwsAlg::Es256) | (key @ Self::Ed25519(_), JwsAlg::EdDsa) => {
                Ok(key)
            }
            (key, alg) => Err(format!(
                "assertion_alg {} does not suit {}",
                alg.name(),
                key.kind()
            )),
        }
    }

    /// The `alg` header value.
    pub(crate) fn alg(&self) -> &'static str {
        match self {
            Self::Hmac(_) => "HS256",
            Self::Rsa { pss: false, .. } => "RS256",
            Self::Rsa { pss: true, .. } => "PS256",
            Self::Ecdsa(_) => "ES256",
            Self::Ed25519(_) => "EdDSA",
        }
    }

    /// What kind of key this is: `RSA 2048-bit`, `EC P-256`, `Ed25519`, `HMAC`.
    pub(crate) fn kind(&self) -> String {
        match self {
            Self::Hmac(_) => "HMAC secret".into(),
            Self::Rsa { key, .. } => format!("RSA {}-bit key", key.public().modulus_len() * 8),
            Self::Ecdsa(_) => "EC P-256 key".into(),
            Self::Ed25519(_) => "Ed25519 key".into(),
        }
    }

    /// The public key as a JWK (RFC 7517), for a DPoP proof's header: EC and OKP keys only.
    pub(crate) fn public_jwk(&self) -> Option<Value> {
        match self {
            Self::Ecdsa(key) => {
                // The uncompressed point: 0x04, then x and y, 32 bytes each (SEC 1 §2.3.3).
                let point = key.public_key().as_ref();
                let (x, y) = point.get(1..)?.split_at_checked(32)?;
                Some(serde_json::json!({
                    "kty": "EC",
                    "crv": "P-256",
                    "x": URL_SAFE_NO_PAD.encode(x),
                    "y": URL_SAFE_NO_PAD.encode(y),
                }))
            }
            Self::Ed25519(key) => Some(serde_json::json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "x": URL_SAFE_NO_PAD.encode(key.public_key().as_ref()),
            })),
            Self::Hmac(_) | Self::Rsa { .. } => None,
        }
    }

    /// A fingerprint of the public key for `--check`: base64url SHA-256 of its bytes (for EC
    /// and OKP keys, the JWK thumbprint of RFC 7638, which is also DPoP's `jkt`).
    pub(crate) fn fingerprint(&self) -> Option<String> {
        match self {
            Self::Hmac(_) => None,
            Self::Rsa { key, .. } => Some(sha256_base64url(key.public_key().as_ref())),
            Self::Ecdsa(_) | Self::Ed25519(_) => self.public_jwk().map(|jwk| thumbprint(&jwk)),
        }
    }

    /// `header.claims.signature`, each part base64url-encoded JSON (RFC 7515 §7.1); `alg` is
    /// set in `header` here.
    pub(crate) fn sign(&self, mut header: Value, claims: &Value) -> Result<String, SignError> {
        if let Value::Object(fields) = &mut header {
            fields.insert("alg".into(), Value::from(self.alg()));
        }
        let mut jws = URL_SAFE_NO_PAD.encode(header.to_string());
        jws.push('.');
        jws.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let rng = SystemRandom::new();
        let signature = match self {
            Self::Hmac(key) => ring::hmac::sign(key, jws.as_bytes()).as_ref().to_vec(),
            Self::Rsa { key, pss } => {
                let padding: &dyn signature::RsaEncoding = if *pss {
                    &signature::RSA_PSS_SHA256
                } else {
                    &signature::RSA_PKCS1_SHA256
                };
                let mut out = vec![0; key.public().modulus_len()];
                key.sign(padding, &rng, jws.as_bytes(), &mut out)
                    .map_err(|_| SignError)?;
                out
            }
            Self::Ecdsa(key) => key
                .sign(&rng, jws.as_bytes())
                .map_err(|_| SignError)?
                .as_ref()
                .to_vec(),
            Self::Ed25519(key) => key.sign(jws.as_bytes()).as_ref().to_vec(),
        };
        jws.push('.');
        jws.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(jws)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, {})", self.kind(), self.alg())
    }
}

/// The `x5t#S256` of the first certificate in a PEM file: base64url SHA-256 of its DER. Read
/// on the calling thread, by the bounded reader: for `--check`.
pub(crate) fn certificate_thumbprint(path: &Path) -> Result<String, KeyError> {
    let pem = files::read_sync(path, Content::Certificate)?;
    certificate_thumbprint_of(path, &pem)
}

/// The `x5t#S256` of the first certificate in `pem`, read from `path` (which messages name).
pub(crate) fn certificate_thumbprint_of(path: &Path, pem: &[u8]) -> Result<String, KeyError> {
    let cert = CertificateDer::from_pem_slice(pem).map_err(|e| KeyError::Certificate {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(sha256_base64url(cert.as_ref()))
}

/// Checks that the first certificate of `certificate` is the certificate of the private key
/// in `key`: an assertion whose `x5t#S256` names another key's certificate is refused by the
/// server, so `--check` says so first. A key rustls cannot load is not judged here (the
/// signing key itself is checked on its own).
pub(crate) fn check_certificate_matches(certificate: &Path, key: &Path) -> Result<(), KeyError> {
    let cert_pem = files::read_sync(certificate, Content::Certificate)?;
    let cert = CertificateDer::from_pem_slice(&cert_pem).map_err(|e| KeyError::Certificate {
        path: certificate.to_owned(),
        reason: e.to_string(),
    })?;
    let key_pem = files::read_sync(key, Content::Key)?;
    let Ok(key_der) = PrivateKeyDer::from_pem_slice(&key_pem) else {
        return Ok(());
    };
    let provider = rustls::crypto::ring::default_provider();
    match rustls::sign::CertifiedKey::from_der(vec![cert.into_owned()], key_der, &provider) {
        Err(rustls::Error::InconsistentKeys(_)) => Err(KeyError::Unusable {
            path: certificate.to_owned(),
            reason: format!(
                "is not the certificate of the key in {}: its public key is another's",
                key.display()
            ),
        }),
        _ => Ok(()),
    }
}

/// What `--check` calls a key's fingerprint: the RFC 7638 JWK thumbprint of an EC or Ed25519
/// key (what a DPoP-bound token's `cnf.jkt` holds), the SHA-256 of an RSA public key.
pub(crate) fn describe_fingerprint(key: &SigningKey) -> String {
    match key.public_jwk() {
        Some(jwk) => format!("JWK thumbprint (RFC 7638) {}", thumbprint(&jwk)),
        None => format!(
            "public key SHA-256 {}",
            key.fingerprint().unwrap_or_default()
        ),
    }
}

/// The JWK SHA-256 thumbprint (RFC 7638 §3): the required members in lexical order, as JSON
/// without whitespace, hashed.
pub(crate) fn thumbprint(jwk: &Value) -> String {
    let required: &[&str] = match jwk.get("kty").and_then(Value::as_str) {
        Some("EC") => &["crv", "kty", "x", "y"],
        Some("OKP") => &["crv", "kty", "x"],
        _ => &["e", "kty", "n"],
    };
    let members: Vec<String> = required
        .iter()
        .map(|name| {
            let value = jwk.get(*name).cloned().unwrap_or(Value::Null);
            format!("{}:{value}", Value::from(*name))
        })
        .collect();
    sha256_base64url(format!("{{{}}}", members.join(",")).as_bytes())
}

/// base64url (no padding) of the SHA-256 of `bytes`.
pub(crate) fn sha256_base64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// A unique identifier for a `jti` claim: 16 random bytes, base64url.
pub(crate) fn random_id() -> Result<String, SignError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| SignError)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}
