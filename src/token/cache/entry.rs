//! What the cache holds for one token source: the token, its type, scope and times, bound to
//! the source's digest; sealed with AES-256-GCM in Redis, and in files when `key_file` is set.
//!
//! Whatever a store holds is read as untrusted: at most [`MAX_ENTRY_BYTES`], and a token is
//! taken from it only with its source's token type and a lifetime clamped to the source's
//! `max_lifetime`, as a token from the endpoint would be.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::{ClientAuth, TokenSettings};
use crate::jose as jws;
use crate::token::response::TokenType;
use crate::token::{LifetimeSource, Token};

/// The entry format; another version is a miss.
const VERSION: u32 = 1;

/// The most a store's entry may hold, sealed or not: a token of some 11 KiB (a JWT with many
/// claims) still fits, and a planted file or Redis value cannot make bearerd read more.
pub(crate) const MAX_ENTRY_BYTES: usize = 16 * 1024;

/// What a source takes from the cache: tokens of its own type, living no longer than it lets
/// a token from its endpoint live.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expected {
    /// `Bearer`, or `DPoP` for a source with a DPoP key (RFC 9449 §5).
    pub(crate) kind: TokenType,
    /// `[upstream.token] max_lifetime`.
    pub(crate) max_lifetime: Duration,
}

/// One token as stored.
#[derive(Serialize, Deserialize)]
pub(crate) struct Entry {
    /// [`VERSION`].
    pub(crate) v: u32,
    /// The digest of the source it belongs to.
    pub(crate) source: String,
    pub(crate) access_token: String,
    /// `Bearer` or `DPoP`.
    pub(crate) token_type: String,
    pub(crate) scope: Option<String>,
    /// Unix seconds when it was fetched and when it expires.
    pub(crate) fetched_at: u64,
    pub(crate) expires_at: u64,
}

/// `grant = "refresh_token"`: the newest refresh token of a source's chain, kept under the
/// source's [`refresh_digest`] beside (not in) its token entry, and never expiring with it: an
/// access token may lapse and be deleted (an upstream's 401) while the chain must live on.
#[derive(Serialize, Deserialize)]
pub(crate) struct RefreshEntry {
    /// [`VERSION`].
    pub(crate) v: u32,
    /// The refresh digest of the source it belongs to.
    pub(crate) source: String,
    pub(crate) refresh_token: String,
    /// The fingerprint of `refresh_token_file`'s contents when the chain began: a file that
    /// says something else since (the account was authorised again) wins over this entry.
    pub(crate) origin: String,
    /// Unix seconds when it was stored.
    pub(crate) stored_at: u64,
}

impl std::fmt::Debug for RefreshEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshEntry")
            .field("source", &self.source)
            .field("refresh_token", &"[redacted]")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl RefreshEntry {
    /// The entry of `refresh_token`, of the chain begun from the file `origin`.
    pub(crate) fn new(refresh_token: &str, origin: &str, refresh_digest: &str) -> Self {
        Self {
            v: VERSION,
            source: refresh_digest.to_owned(),
            refresh_token: refresh_token.to_owned(),
            origin: origin.to_owned(),
            stored_at: unix(SystemTime::now()),
        }
    }

    /// Whether it is this source's, of this version.
    pub(crate) fn is_for(&self, refresh_digest: &str) -> bool {
        self.v == VERSION && self.source == refresh_digest
    }
}

/// Where a source's refresh token is kept: its digest and a suffix, so that the token entry
/// and its deletion never touch it.
pub(crate) fn refresh_digest(digest: &str) -> String {
    format!("{digest}-refresh")
}

impl Drop for RefreshEntry {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.refresh_token);
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("source", &self.source)
            .field("access_token", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Entry {
    /// The entry of `token`, fetched now, for the source `digest`.
    pub(crate) fn of(token: &Token, digest: &str) -> Self {
        let (access_token, kind) = token.access_token();
        Self {
            v: VERSION,
            source: digest.to_owned(),
            access_token: access_token.to_owned(),
            token_type: match kind {
                TokenType::Bearer => "Bearer".into(),
                TokenType::DPoP => "DPoP".into(),
            },
            scope: token.scope.clone(),
            fetched_at: unix(SystemTime::now()),
            expires_at: unix(token.expires_at),
        }
    }

    /// A hash naming the token, to tell entries apart without holding tokens around.
    pub(crate) fn token_hash(&self) -> String {
        jws::sha256_base64url(self.access_token.as_bytes())
    }

    /// Whether this entry is usable now for source `digest`: its own, of this version, and
    /// not expired (a token fetched now with that little left would be used too: the
    /// refresher then replaces it soon).
    pub(crate) fn usable_for(&self, digest: &str, expected: &Expected) -> bool {
        self.v == VERSION
            && self.source == digest
            && self
                .remaining(expected, unix(SystemTime::now()))
                .is_some_and(|left| crate::token::schedule::usable_for(left) > Duration::ZERO)
    }

    /// Whether a process holding an older token should take this one rather than fetch: it
    /// is not yet at the point where its own refresh would be due.
    pub(crate) fn is_fresh(&self, expected: &Expected) -> bool {
        let now = unix(SystemTime::now());
        let start = self.fetched_at.min(now);
        let lifetime = self.expiry(expected, now).saturating_sub(start);
        let due = start
            .saturating_add((lifetime as f64 * crate::token::schedule::REFRESH_FRACTION) as u64);
        now < due
    }

    /// When the token stops being taken: its `expires_at`, but no later than `max_lifetime`
    /// after it was fetched, nor after now. (A fetch time in the future, a clock apart or a
    /// planted entry, counts as now.) So no entry, whatever it says, makes a token live
    /// longer than one from the endpoint could.
    fn expiry(&self, expected: &Expected, now: u64) -> u64 {
        let most = self
            .fetched_at
            .min(now)
            .saturating_add(expected.max_lifetime.as_secs());
        self.expires_at.min(most)
    }

    fn remaining(&self, expected: &Expected, now: u64) -> Option<Duration> {
        let expiry = self.expiry(expected, now);
        (expiry > now).then(|| Duration::from_secs(expiry - now))
    }

    /// The token, with what is left of its clamped lifetime; why not, if its type is not the
    /// source's (a Bearer token is refused where DPoP is asked for, and the other way round,
    /// as [`crate::token::fetch`] refuses it from the endpoint) or it has expired.
    pub(crate) fn token(&self, expected: &Expected) -> Result<Token, &'static str> {
        let kind = match self.token_type.as_str() {
            "DPoP" => TokenType::DPoP,
            "Bearer" => TokenType::Bearer,
            _ => return Err("its token_type is neither Bearer nor DPoP"),
        };
        if kind != expected.kind {
            return Err(match expected.kind {
                TokenType::DPoP => "its token is Bearer, and the source uses DPoP",
                TokenType::Bearer => "its token is DPoP, and the source does not use DPoP",
            });
        }
        let remaining = self
            .remaining(expected, unix(SystemTime::now()))
            .ok_or("its token has expired")?;
        Token::issue(
            &self.access_token,
            kind,
            remaining,
            LifetimeSource::Cached,
            self.scope.clone(),
        )
        .map_err(|_| "its token cannot be sent in a header")
    }
}

/// The entry in `bytes` as a store gave them: JSON, or sealed with `key` for `digest` when
/// there is a key. Never quotes what it read: a message names the problem and where.
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    key: Option<&SealingKey>,
    digest: &str,
) -> Result<T, Unreadable> {
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err(Unreadable(format!(
            "larger than {MAX_ENTRY_BYTES} bytes, the most an entry holds"
        )));
    }
    match key {
        Some(key) => key.open(bytes, digest),
        None => serde_json::from_slice(bytes).map_err(|e| {
            // Where, not what: serde's message may quote a value of the entry, a token.
            Unreadable(format!(
                "not a token entry ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        }),
    }
}

/// `entry` as a store keeps it: sealed with `key` for `digest` (base64 text) when there is a
/// key, JSON otherwise. `None` if it cannot be encoded.
pub(crate) fn encode(
    entry: &impl Serialize,
    key: Option<&SealingKey>,
    digest: &str,
) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    match key {
        Some(key) => key
            .seal(entry, digest)
            .map(|text| zeroize::Zeroizing::new(text.into_bytes())),
        None => serde_json::to_vec(entry).ok().map(zeroize::Zeroizing::new),
    }
}

/// A source's identity in the cache: SHA-256 over what makes its tokens what they are, never
/// over a secret. The DPoP key's thumbprint is part of it: a token bound to another key is
/// of no use.
pub(crate) fn digest(settings: &TokenSettings, dpop_thumbprint: Option<&str>) -> String {
    let auth = match &settings.auth {
        ClientAuth::PrivateKeyJwt { key_id, .. } => {
            format!("private_key_jwt:{}", key_id.as_deref().unwrap_or(""))
        }
        other => other.method().to_owned(),
    };
    let mut identity = serde_json::json!({
        "url": settings.url.to_string(),
        "client_id": settings.client_id,
        "auth": auth,
        "scope": settings.scope,
        "audience": settings.audience,
        "resource": settings.resource,
        "params": settings.params,
        "dpop": dpop_thumbprint,
    });
    // The grant joins the identity only when it is not client credentials, so that the
    // entries of existing sources keep their names; with what makes its tokens someone's
    // (the assertion's names, the subject and actor files, the refresh token's file), never
    // a secret.
    if let Some(grant) = grant_identity(&settings.grant) {
        identity["grant"] = grant;
    }
    jws::sha256_base64url(identity.to_string().as_bytes())
}

/// Where an on-behalf-of source keeps the token of one subject: the source's digest and the
/// subject's hash (base64url SHA-256 of the subject token), hashed again. Never the subject
/// token itself, in a key or anywhere in the store.
pub(crate) fn subject_digest(digest: &str, subject_hash: &str) -> String {
    jws::sha256_base64url(format!("{digest}/subject/{subject_hash}").as_bytes())
}

/// What of a grant other than client credentials tells its tokens apart.
fn grant_identity(grant: &crate::config::Grant) -> Option<serde_json::Value> {
    use crate::config::Grant;
    Some(match grant {
        Grant::ClientCredentials => return None,
        Grant::JwtBearer(jwt) => serde_json::json!({
            "name": grant.name(),
            "iss": jwt.issuer,
            "sub": jwt.subject,
            "aud": jwt.audience,
            "key": jwt.key.path(),
            "scope_in": format!("{:?}", jwt.scope_in),
        }),
        Grant::TokenExchange(exchange) => serde_json::json!({
            "name": grant.name(),
            "subject": match &exchange.subject {
                crate::config::SubjectFrom::File(path) => serde_json::json!(path),
                // A source of many subjects: each subject's entry is named apart
                // (`subject_digest`).
                crate::config::SubjectFrom::Header(on_behalf_of) => {
                    serde_json::json!(format!("header:{}", on_behalf_of.header))
                }
            },
            "subject_type": exchange.subject_token_type,
            "actor": exchange.actor.as_ref().map(|a| (&a.file, &a.token_type)),
            "requested": exchange.requested_token_type,
        }),
        Grant::RefreshToken(refresh) => serde_json::json!({
            "name": grant.name(),
            "file": refresh.file,
        }),
    })
}

/// The key entries are sealed with, and its fingerprint.
pub(crate) struct SealingKey(LessSafeKey, String);

/// An entry that cannot be opened: tampered, sealed with another key, too large, or not an
/// entry. The message never quotes the entry.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Unreadable(String);

impl SealingKey {
    /// The key of 32 bytes, decoded from base64 text.
    pub(crate) fn from_base64(text: &str) -> Option<Self> {
        let bytes = zeroize::Zeroizing::new(STANDARD.decode(text.trim()).ok()?);
        if bytes.len() != 32 {
            return None;
        }
        let key = UnboundKey::new(&aead::AES_256_GCM, &bytes).ok()?;
        let hash = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let fingerprint = hash.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Some(Self(LessSafeKey::new(key), fingerprint))
    }

    /// base64(nonce ‖ ciphertext ‖ tag), with `digest` as associated data, so that an entry
    /// copied to another source's key does not open.
    pub(crate) fn seal(&self, entry: &impl Serialize, digest: &str) -> Option<String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut data = zeroize::Zeroizing::new(serde_json::to_vec(entry).ok()?);
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(digest.as_bytes()),
                &mut *data,
            )
            .ok()?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&data);
        Some(STANDARD.encode(sealed))
    }

    /// The entry sealed in `text`, if it opens with this key for `digest`.
    pub(crate) fn open<T: DeserializeOwned>(
        &self,
        text: &[u8],
        digest: &str,
    ) -> Result<T, Unreadable> {
        let unreadable = |why: &str| Unreadable(why.to_owned());
        let raw = STANDARD.decode(text).map_err(|_| {
            unreadable("not sealed: not base64 (an entry in clear, or not an entry)")
        })?;
        if raw.len() < NONCE_LEN {
            return Err(unreadable("too short"));
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| unreadable("nonce"))?;
        let mut sealed = zeroize::Zeroizing::new(sealed.to_vec());
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(digest.as_bytes()), &mut sealed)
            .map_err(|_| unreadable("does not open with this key for this source (tampered, another key, or another source's)"))?;
        serde_json::from_slice(plain).map_err(|_| unreadable("not an entry"))
    }

    /// A short public name of the key, for `--check`: the first 8 bytes of SHA-256 over it,
    /// in hex. Telling two keys apart needs no more, and a hash of 32 random bytes gives
    /// nothing of them away.
    pub(crate) fn fingerprint(&self) -> &str {
        &self.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_credentials_source_keeps_its_digest_and_grants_tell_subjects_apart() {
        use crate::config::{Grant, JwtBearer, JwtKey, ScopeIn};
        let settings = TokenSettings::for_tests(ClientAuth::None);
        // The identity as it was before grants: a cache shared with older replicas still hits.
        let before = serde_json::json!({
            "url": settings.url.to_string(),
            "client_id": settings.client_id,
            "auth": "none",
            "scope": settings.scope,
            "audience": settings.audience,
            "resource": settings.resource,
            "params": settings.params,
            "dpop": None::<&str>,
        });
        assert_eq!(
            digest(&settings, None),
            jws::sha256_base64url(before.to_string().as_bytes())
        );
        let jwt = |subject: &str| TokenSettings {
            grant: Grant::JwtBearer(JwtBearer {
                key: JwtKey::Pem {
                    path: "k.pem".into(),
                    alg: None,
                },
                issuer: "app".into(),
                subject: Some(subject.into()),
                audience: None,
                key_id: None,
                lifetime: Duration::from_secs(60),
                scope_in: ScopeIn::Form,
            }),
            ..TokenSettings::for_tests(ClientAuth::None)
        };
        assert_ne!(digest(&jwt("alice"), None), digest(&jwt("bob"), None));
        assert_ne!(digest(&jwt("alice"), None), digest(&settings, None));
    }

    fn entry(digest: &str, expires_in: u64) -> Entry {
        let now = unix(SystemTime::now());
        Entry {
            v: VERSION,
            source: digest.into(),
            access_token: "tok".into(),
            token_type: "Bearer".into(),
            scope: Some("read".into()),
            fetched_at: now,
            expires_at: now + expires_in,
        }
    }

    #[test]
    fn sealed_entries_open_only_with_their_key_and_source() {
        let key = SealingKey::from_base64(&STANDARD.encode([7u8; 32])).unwrap();
        let other = SealingKey::from_base64(&STANDARD.encode([8u8; 32])).unwrap();
        let sealed = key.seal(&entry("src-a", 600), "src-a").unwrap();
        assert!(!sealed.contains("tok"));
        assert_eq!(
            key.open::<Entry>(sealed.as_bytes(), "src-a")
                .unwrap()
                .access_token,
            "tok"
        );
        assert!(
            key.open::<Entry>(sealed.as_bytes(), "src-b").is_err(),
            "bound to its source"
        );
        assert!(
            other.open::<Entry>(sealed.as_bytes(), "src-a").is_err(),
            "another key"
        );
        let mut tampered = STANDARD.decode(&sealed).unwrap();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(key
            .open::<Entry>(STANDARD.encode(tampered).as_bytes(), "src-a")
            .is_err());
        assert!(key.open::<Entry>(b"garbage!", "src-a").is_err());
        assert!(
            SealingKey::from_base64("c2hvcnQ=").is_none(),
            "not 32 bytes"
        );
    }

    const BEARER: Expected = Expected {
        kind: TokenType::Bearer,
        max_lifetime: Duration::from_secs(3600),
    };

    #[test]
    fn usable_and_fresh_follow_the_clock() {
        let e = entry("s", 600);
        assert!(e.usable_for("s", &BEARER) && e.is_fresh(&BEARER));
        assert!(!e.usable_for("t", &BEARER));
        let mut old = entry("s", 600);
        old.fetched_at -= 500;
        old.expires_at -= 500;
        assert!(old.usable_for("s", &BEARER), "100 s left");
        assert!(!old.is_fresh(&BEARER), "past 70% of its lifetime");
        let expired = entry("s", 0);
        assert!(!expired.usable_for("s", &BEARER));
        assert!(expired.token(&BEARER).is_err());
        let token = e.token(&BEARER).unwrap();
        assert_eq!(token.authorization(), "Bearer tok");
        assert_eq!(token.scope.as_deref(), Some("read"));
        assert!(token.lifetime <= Duration::from_secs(600));
    }

    /// Issue 22: an entry that says ten years is taken for `max_lifetime` at most, counted
    /// from when it says it was fetched (or now, if that is in the future).
    #[test]
    fn a_lifetime_is_clamped_to_max_lifetime() {
        let decade = 10 * 365 * 86_400;
        let planted = entry("s", decade);
        let token = planted.token(&BEARER).unwrap();
        assert!(token.lifetime <= Duration::from_secs(3600), "{token:?}");
        assert!(planted.usable_for("s", &BEARER));

        let mut ancient = entry("s", decade);
        ancient.fetched_at -= 7200;
        assert!(
            !ancient.usable_for("s", &BEARER),
            "fetched 2 h ago, at most 1 h"
        );
        assert!(ancient.token(&BEARER).is_err());

        let mut future = entry("s", decade);
        future.fetched_at += decade;
        assert!(future.token(&BEARER).unwrap().lifetime <= Duration::from_secs(3600));
        // Fresh for 70% of the clamped lifetime, not of ten years.
        let mut late = entry("s", decade);
        late.fetched_at -= 3000;
        assert!(!late.is_fresh(&BEARER));
    }

    /// Issue 22: a Bearer entry is not taken by a DPoP source, nor the other way round, nor
    /// a type that is neither.
    #[test]
    fn the_token_type_must_be_the_sources() {
        let dpop = Expected {
            kind: TokenType::DPoP,
            ..BEARER
        };
        let bearer = entry("s", 600);
        assert!(bearer.token(&dpop).is_err());
        let mut bound = entry("s", 600);
        bound.token_type = "DPoP".into();
        assert_eq!(bound.token(&dpop).unwrap().authorization(), "DPoP tok");
        assert!(bound.token(&BEARER).is_err());
        bound.token_type = "bearer".into();
        assert!(bound.token(&BEARER).is_err());
    }

    #[test]
    fn decode_caps_the_size_and_never_quotes() {
        let key = SealingKey::from_base64(&STANDARD.encode([7u8; 32])).unwrap();
        let e = entry("s", 600);
        let plain = encode(&e, None, "s").unwrap();
        assert_eq!(
            decode::<Entry>(&plain, None, "s").unwrap().access_token,
            "tok"
        );
        assert!(
            decode::<Entry>(&plain, Some(&key), "s").is_err(),
            "a clear entry where sealed ones are kept"
        );
        let sealed = encode(&e, Some(&key), "s").unwrap();
        assert_eq!(
            decode::<Entry>(&sealed, Some(&key), "s")
                .unwrap()
                .access_token,
            "tok"
        );
        let mut large = e;
        large.access_token = "x".repeat(MAX_ENTRY_BYTES);
        let large = encode(&large, None, "s").unwrap();
        let error = decode::<Entry>(&large, None, "s").unwrap_err().to_string();
        assert!(error.contains("16384"), "{error}");
        let error = decode::<Entry>(br#"{"v":"tok-secret"}"#, None, "s")
            .unwrap_err()
            .to_string();
        assert!(!error.contains("tok-secret"), "{error}");
        assert_eq!(key.fingerprint().len(), 16);
    }
}
