//! DPoP (RFC 9449): the key a source's tokens are bound to, the proofs that show it is held,
//! and the nonces servers hand out.
//!
//! The key is made at start (ES256 unless `dpop_alg` says EdDSA) or read from
//! `dpop_key_file`, so that a restart keeps it. Every token request and every proxied request
//! carries a fresh proof: a JWT signed with the key, whose header holds the public key and
//! whose claims name the request (`htm`, `htu`), the time (`iat`), a unique `jti`, the server's
//! latest nonce, and for a proxied request the token's hash (`ath`).

use std::sync::Mutex;

use http::{HeaderName, HeaderValue};
use serde_json::json;

use crate::config::{self, JwsAlg};
use crate::jose::{self as jws, unix_now, KeyError, SignError, SigningKey};

/// The header that carries a proof (RFC 9449 §4.1).
pub(crate) const DPOP: HeaderName = HeaderName::from_static("dpop");
/// The header a server's nonce comes in (RFC 9449 §8.1).
pub(crate) const DPOP_NONCE: HeaderName = HeaderName::from_static("dpop-nonce");
/// The `error` a server answers when it wants a (newer) nonce (RFC 9449 §8, §9).
pub(crate) const USE_DPOP_NONCE: &str = "use_dpop_nonce";

/// A source's DPoP key, with its public JWK ready for proofs' headers.
#[derive(Debug)]
pub(crate) struct DpopKey {
    key: SigningKey,
    jwk: serde_json::Value,
    thumbprint: String,
}

impl DpopKey {
    /// The key of `settings`: read from `key_file`, or made now.
    pub(crate) fn new(settings: &config::Dpop) -> Result<Self, KeyError> {
        let key = match &settings.key_file {
            Some(path) => SigningKey::from_pem_file(path, None)?,
            None => SigningKey::generate(settings.alg)?,
        };
        let Some(jwk) = key.public_jwk() else {
            return Err(KeyError::Unusable {
                path: settings.key_file.clone().unwrap_or_default(),
                reason: format!(
                    "a DPoP key must be EC P-256 ({}) or Ed25519 ({}), not an {}",
                    JwsAlg::Es256.name(),
                    JwsAlg::EdDsa.name(),
                    key.kind()
                ),
            });
        };
        let thumbprint = jws::thumbprint(&jwk);
        Ok(Self {
            key,
            jwk,
            thumbprint,
        })
    }

    /// The JWK SHA-256 thumbprint of the public key: what a bound token's `cnf.jkt` holds.
    pub(crate) fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// What `--check` says of the key.
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} ({}), JWK thumbprint (RFC 7638, the jkt of its tokens) {}",
            self.key.kind(),
            self.key.alg(),
            self.thumbprint()
        )
    }

    /// A proof for a request with `method` to `url` (scheme, authority and path: RFC 9449
    /// §4.2 leaves out query and fragment), for `token_hash` (the `ath` of a request that
    /// carries a token) and with the server's `nonce`.
    pub(crate) fn proof(
        &self,
        method: &str,
        url: &str,
        token_hash: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<HeaderValue, SignError> {
        let mut claims = json!({
            "jti": jws::random_id()?,
            "htm": method,
            "htu": url,
            "iat": unix_now(),
        });
        if let Some(ath) = token_hash {
            claims["ath"] = json!(ath);
        }
        if let Some(nonce) = nonce {
            claims["nonce"] = json!(nonce);
        }
        let header = json!({"typ": "dpop+jwt", "jwk": self.jwk});
        let proof = self.key.sign(header, &claims)?;
        // base64url and dots only: always a valid header value.
        HeaderValue::try_from(proof).map_err(|_| SignError)
    }
}

/// The latest nonce a server sent, shared by the requests to it.
#[derive(Debug, Default)]
pub(crate) struct Nonce(Mutex<Option<String>>);

impl Nonce {
    /// The nonce to send now.
    pub(crate) fn get(&self) -> Option<String> {
        self.lock().clone()
    }

    /// Keeps the nonce of a server's answer, if it sent one that is printable ASCII
    /// (RFC 9449 §8.1: `1*NQCHAR`). Returns whether it changed.
    pub(crate) fn update(&self, headers: &http::HeaderMap) -> bool {
        let Some(value) = headers.get(DPOP_NONCE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        if value.is_empty() || !value.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return false;
        }
        let mut current = self.lock();
        if current.as_deref() == Some(value) {
            return false;
        }
        *current = Some(value.to_owned());
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A swap of one string never panics while held; take it anyway if it did.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether an upstream's 401 asks for a nonce: `WWW-Authenticate: DPoP error="use_dpop_nonce"`
/// (RFC 9449 §9).
pub(crate) fn asks_for_nonce(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            let v = v.trim_start();
            v.get(..4).is_some_and(|s| s.eq_ignore_ascii_case("dpop")) && v.contains(USE_DPOP_NONCE)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn a_proof_names_the_request_and_carries_the_public_key() {
        for alg in [JwsAlg::Es256, JwsAlg::EdDsa] {
            let key = DpopKey::new(&config::Dpop {
                key_file: None,
                alg,
            })
            .unwrap();
            let proof = key
                .proof(
                    "POST",
                    "https://api.example.com/v1/x",
                    Some("abc"),
                    Some("n-1"),
                )
                .unwrap();
            let parts: Vec<&str> = proof.to_str().unwrap().split('.').collect();
            let (header, claims) = (decode(parts[0]), decode(parts[1]));
            assert_eq!(header["typ"], "dpop+jwt");
            assert_eq!(header["alg"], alg.name());
            assert!(header["jwk"].get("d").is_none(), "no private part");
            assert_eq!(jws::thumbprint(&header["jwk"]), key.thumbprint());
            assert_eq!(claims["htm"], "POST");
            assert_eq!(claims["htu"], "https://api.example.com/v1/x");
            assert_eq!(claims["ath"], "abc");
            assert_eq!(claims["nonce"], "n-1");
            let other = key.proof("GET", "https://x", None, None).unwrap();
            let other = decode(other.to_str().unwrap().split('.').nth(1).unwrap());
            assert_ne!(other["jti"], claims["jti"]);
            assert!(other.get("ath").is_none() && other.get("nonce").is_none());
        }
    }

    #[test]
    fn rfc_7638_thumbprint_example() {
        // RFC 7638 §3.1's RSA example key and thumbprint.
        let jwk = json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(
            jws::thumbprint(&jwk),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn nonces_are_kept_when_well_formed() {
        let nonce = Nonce::default();
        let mut headers = http::HeaderMap::new();
        assert!(!nonce.update(&headers));
        headers.insert(
            DPOP_NONCE,
            HeaderValue::from_static("eyJ7S_zG.eyJH0-Z.HX4w-7v"),
        );
        assert!(nonce.update(&headers));
        assert!(!nonce.update(&headers), "unchanged");
        assert_eq!(nonce.get().as_deref(), Some("eyJ7S_zG.eyJH0-Z.HX4w-7v"));
        headers.insert(DPOP_NONCE, HeaderValue::from_static("has space"));
        assert!(!nonce.update(&headers));
        assert_eq!(nonce.get().as_deref(), Some("eyJ7S_zG.eyJH0-Z.HX4w-7v"));
    }

    #[test]
    fn a_401_asks_for_a_nonce_only_in_a_dpop_challenge() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("DPoP error=\"use_dpop_nonce\", error_description=\"x\""),
        );
        assert!(asks_for_nonce(&headers));
        headers.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        assert!(!asks_for_nonce(&headers));
    }
}
