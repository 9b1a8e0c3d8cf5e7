//! The client's credentials as the config gives them: how it authenticates at the token
//! endpoint ([`ClientAuth`], each method with what it needs), client certificates, and DPoP.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::secret::SecretSource;

/// Client authentication at the token endpoint (RFC 6749 §2.3): the method and the
/// credentials it needs, each variant owning its own, so that a method that needs no secret
/// has none. `token::client_auth` turns a variant into what a token request carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientAuth {
    /// `client_secret_basic`: HTTP Basic with the form-urlencoded id and secret (§2.3.1).
    Basic {
        /// Where the client secret is read from, at each token request.
        secret: SecretSource,
    },
    /// `client_secret_post`: `client_id` and `client_secret` in the form body (§2.3.1).
    Post {
        /// Where the client secret is read from, at each token request.
        secret: SecretSource,
    },
    /// `client_secret_jwt` (RFC 7523 §2.2, OIDC Core §9): a `client_assertion` JWT signed
    /// HS256 with the client secret.
    SecretJwt {
        /// Where the client secret is read from, at each token request.
        secret: SecretSource,
        /// The assertion's audience and lifetime.
        assertion: Assertion,
    },
    /// `private_key_jwt` (RFC 7523 §2.2, OIDC Core §9): a `client_assertion` JWT signed with a
    /// private key.
    PrivateKeyJwt {
        /// The PEM private key (PKCS#8; RSA also PKCS#1).
        key_file: PathBuf,
        /// The algorithm, when not the key's usual one.
        alg: Option<JwsAlg>,
        /// The header's `kid`.
        key_id: Option<String>,
        /// A PEM certificate of the key, whose SHA-256 goes in the header's `x5t#S256`.
        certificate_file: Option<PathBuf>,
        /// The assertion's audience and lifetime.
        assertion: Assertion,
    },
    /// `client_assertion_file`: an assertion made by someone else (a Kubernetes projected
    /// service-account token, a SPIFFE JWT-SVID), read from the file at each token request.
    AssertionFile {
        /// The file.
        path: PathBuf,
    },
    /// `tls_client_auth` (RFC 8705 §2.1): a client certificate in the TLS handshake.
    TlsClientAuth {
        /// The certificate and its key, re-read when they change.
        identity: Identity,
    },
    /// `none`: the request carries no client credentials, only the `client_id` when one is
    /// set (RFC 6749 §3.2.1, a public client); for servers that authenticate the grant itself
    /// (a JWT bearer assertion, a subject token).
    None,
}

impl ClientAuth {
    /// The method's name, as `auth` is written in the file.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Basic { .. } => "basic",
            Self::Post { .. } => "post",
            Self::SecretJwt { .. } => "client_secret_jwt",
            Self::PrivateKeyJwt { .. } => "private_key_jwt",
            Self::AssertionFile { .. } => "client_assertion_file",
            Self::TlsClientAuth { .. } => "tls_client_auth",
            Self::None => "none",
        }
    }

    /// The client secret, for the methods that use one.
    pub fn secret(&self) -> Option<&SecretSource> {
        match self {
            Self::Basic { secret } | Self::Post { secret } | Self::SecretJwt { secret, .. } => {
                Some(secret)
            }
            Self::PrivateKeyJwt { .. }
            | Self::AssertionFile { .. }
            | Self::TlsClientAuth { .. }
            | Self::None => None,
        }
    }
}

impl fmt::Display for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.method())
    }
}

/// The claims of an assertion bearerd signs besides `iss`, `sub`, `jti` and `iat`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Assertion {
    /// `aud`; `None` for the token endpoint's URL.
    pub audience: Option<String>,
    /// From `iat` to `exp`.
    pub lifetime: Duration,
}

/// `assertion_lifetime` when not set: long enough for the request, short enough that a
/// captured assertion is soon worthless.
pub const DEFAULT_ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// A JWS signing algorithm (RFC 7518 §3.1, RFC 8037 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwsAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// Ed25519.
    EdDsa,
}

impl JwsAlg {
    /// The `alg` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Ps256 => "PS256",
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
        }
    }
}

/// A client certificate and its private key, PEM files re-read when they change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The certificate, then its chain.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
}

/// `dpop = true` (RFC 9449): tokens bound to a key bearerd holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Dpop {
    /// The key (PEM, PKCS#8), so that a restart keeps it; `None` for a key made at start.
    pub key_file: Option<PathBuf>,
    /// The algorithm of a key made at start: ES256 or EdDSA.
    pub alg: JwsAlg,
}
