//! What `bearerd --public-jwk NAME` prints: the public keys of one upstream as a JWK Set
//! (RFC 7517 §5), ready to register with an identity provider.
//!
//! An upstream has up to two keys of its own: the `private_key_jwt` key that signs its client
//! assertions (RFC 7523 §2.2; the IdP verifies them with this public key), and its DPoP key
//! when `dpop_key_file` fixes one (RFC 9449; a key made at each start has nothing fixed to
//! register). Each JWK carries `kid`: the configured `key_id` for the assertion key (the
//! assertion's header names it), else the key's JWK thumbprint (RFC 7638 §3), which is also a
//! DPoP key's `jkt`. Only public members are ever written: the JWKs are built from the public
//! half of the key, never serialised from the private one.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};

use crate::config::{ClientAuth, Config, Upstream};
use crate::jose::{self as jws, SigningKey};

/// The JWK Set of the public keys of the upstream (or route) named `upstream`, as pretty
/// JSON with a final newline; an error says why there is none (no such name, no key of its
/// own, a key file that cannot be read).
pub fn public_jwk(config: &Config, upstream: &str) -> Result<String, String> {
    let Some(found) = config.upstreams.iter().find(|u| u.name == upstream) else {
        let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        return Err(format!(
            "{}: no upstream or route is named {upstream:?}; the names are {}",
            config.path.display(),
            names.join(", ")
        ));
    };
    let keys = keys_of(found)?;
    if keys.is_empty() {
        return Err(format!(
            "{}: upstream {upstream:?} has no key of its own to publish: its auth is {} (a public key is registered for auth = \"private_key_jwt\"), and {}",
            config.path.display(),
            found.token.auth,
            match &found.token.dpop {
                None => "dpop is off",
                Some(_) => "its DPoP key is made anew at each start (set dpop_key_file to keep one)",
            }
        ));
    }
    let set = json!({ "keys": keys });
    // `Value`'s pretty printer writes to a String and cannot fail on it.
    let mut out = serde_json::to_string_pretty(&set).map_err(|e| e.to_string())?;
    out.push('\n');
    Ok(out)
}

/// The upstream's public JWKs: the assertion key, then the DPoP key (once, should both be
/// the same key).
fn keys_of(upstream: &Upstream) -> Result<Vec<Value>, String> {
    let mut keys = Vec::new();
    if let ClientAuth::PrivateKeyJwt {
        key_file,
        alg,
        key_id,
        certificate_file,
        ..
    } = &upstream.token.auth
    {
        let key = SigningKey::from_pem_file(key_file, *alg).map_err(|e| e.to_string())?;
        let mut jwk = public_of(&key)
            .ok_or_else(|| format!("{}: a {} has no public JWK", key_file.display(), key.kind()))?;
        let thumbprint = jws::thumbprint(&jwk);
        let kid = key_id.clone().unwrap_or(thumbprint);
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        jwk["alg"] = json!(key.alg());
        // The assertion's header carries the certificate's `x5t#S256` (RFC 7515 §4.1.8): the
        // IdP may look the key up by it.
        if let Some(certificate) = certificate_file {
            let x5t = jws::certificate_thumbprint(certificate).map_err(|e| e.to_string())?;
            jwk["x5t#S256"] = json!(x5t);
        }
        keys.push(jwk);
    }
    if let Some(path) = upstream
        .token
        .dpop
        .as_ref()
        .and_then(|d| d.key_file.as_ref())
    {
        let key = SigningKey::from_pem_file(path, None).map_err(|e| e.to_string())?;
        let mut jwk = key.public_jwk().ok_or_else(|| {
            format!(
                "{}: a DPoP key must be EC P-256 or Ed25519, not an {}",
                path.display(),
                key.kind()
            )
        })?;
        let thumbprint = jws::thumbprint(&jwk);
        let same_key = keys.iter().any(|k| jws::thumbprint(k) == thumbprint);
        if !same_key {
            jwk["kid"] = json!(thumbprint);
            jwk["use"] = json!("sig");
            jwk["alg"] = json!(key.alg());
            keys.push(jwk);
        }
    }
    Ok(keys)
}

/// The public JWK of a private key: `kty` and the public members only (RFC 7518 §6.2.1 for
/// EC, §6.3.1 for RSA; RFC 8037 §2 for OKP).
fn public_of(key: &SigningKey) -> Option<Value> {
    match key {
        SigningKey::Rsa { key, .. } => {
            let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(key.public());
            Some(json!({
                "kty": "RSA",
                "n": URL_SAFE_NO_PAD.encode(&public.n),
                "e": URL_SAFE_NO_PAD.encode(&public.e),
            }))
        }
        other => other.public_jwk(),
    }
}
