//! What the cache holds for one token source: the token, its type, scope and times, bound to
//! the source's digest; sealed with AES-256-GCM where the store is shared.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::config::{ClientAuth, TokenSettings};
use crate::jose as jws;
use crate::token::response::TokenType;
use crate::token::{LifetimeSource, Token};

/// The entry format; another version is a miss.
const VERSION: u32 = 1;

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
    pub(crate) fn usable_for(&self, digest: &str) -> bool {
        self.v == VERSION
            && self.source == digest
            && self
                .remaining()
                .is_some_and(|left| crate::token::schedule::usable_for(left) > Duration::ZERO)
    }

    /// Whether a process holding an older token should take this one rather than fetch: it
    /// is not yet at the point where its own refresh would be due.
    pub(crate) fn is_fresh(&self) -> bool {
        let lifetime = self.expires_at.saturating_sub(self.fetched_at);
        let due =
            self.fetched_at + (lifetime as f64 * crate::token::schedule::REFRESH_FRACTION) as u64;
        unix(SystemTime::now()) < due
    }

    fn remaining(&self) -> Option<Duration> {
        let now = unix(SystemTime::now());
        (self.expires_at > now).then(|| Duration::from_secs(self.expires_at - now))
    }

    /// The token, with what is left of its lifetime.
    pub(crate) fn token(&self) -> Option<Token> {
        let kind = match self.token_type.as_str() {
            "DPoP" => TokenType::DPoP,
            _ => TokenType::Bearer,
        };
        Token::issue(
            &self.access_token,
            kind,
            self.remaining()?,
            LifetimeSource::Cached,
            self.scope.clone(),
        )
        .ok()
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
    let identity = serde_json::json!({
        "url": settings.url.to_string(),
        "client_id": settings.client_id,
        "auth": auth,
        "scope": settings.scope,
        "audience": settings.audience,
        "resource": settings.resource,
        "params": settings.params,
        "dpop": dpop_thumbprint,
    });
    jws::sha256_base64url(identity.to_string().as_bytes())
}

/// The key entries are sealed with in a shared store.
pub(crate) struct SealingKey(LessSafeKey);

/// An entry that cannot be opened: tampered, sealed with another key, or not an entry.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Unreadable(&'static str);

impl SealingKey {
    /// The key of 32 bytes, decoded from base64 text.
    pub(crate) fn from_base64(text: &str) -> Option<Self> {
        let bytes = zeroize::Zeroizing::new(STANDARD.decode(text.trim()).ok()?);
        if bytes.len() != 32 {
            return None;
        }
        let key = UnboundKey::new(&aead::AES_256_GCM, &bytes).ok()?;
        Some(Self(LessSafeKey::new(key)))
    }

    /// base64(nonce ‖ ciphertext ‖ tag), with `digest` as associated data, so that an entry
    /// copied to another source's key does not open.
    pub(crate) fn seal(&self, entry: &Entry, digest: &str) -> Option<String> {
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
    pub(crate) fn open(&self, text: &[u8], digest: &str) -> Result<Entry, Unreadable> {
        let raw = STANDARD
            .decode(text)
            .map_err(|_| Unreadable("not base64"))?;
        if raw.len() < NONCE_LEN {
            return Err(Unreadable("too short"));
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Unreadable("nonce"))?;
        let mut sealed = zeroize::Zeroizing::new(sealed.to_vec());
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(digest.as_bytes()), &mut sealed)
            .map_err(|_| Unreadable("does not open with this key for this source (tampered, another key, or another source's)"))?;
        serde_json::from_slice(plain).map_err(|_| Unreadable("not an entry"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            key.open(sealed.as_bytes(), "src-a").unwrap().access_token,
            "tok"
        );
        assert!(
            key.open(sealed.as_bytes(), "src-b").is_err(),
            "bound to its source"
        );
        assert!(
            other.open(sealed.as_bytes(), "src-a").is_err(),
            "another key"
        );
        let mut tampered = STANDARD.decode(&sealed).unwrap();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(key
            .open(STANDARD.encode(tampered).as_bytes(), "src-a")
            .is_err());
        assert!(key.open(b"garbage!", "src-a").is_err());
        assert!(
            SealingKey::from_base64("c2hvcnQ=").is_none(),
            "not 32 bytes"
        );
    }

    #[test]
    fn usable_and_fresh_follow_the_clock() {
        let e = entry("s", 600);
        assert!(e.usable_for("s") && e.is_fresh());
        assert!(!e.usable_for("t"));
        let mut old = entry("s", 600);
        old.fetched_at -= 500;
        old.expires_at -= 500;
        assert!(old.usable_for("s"), "100 s left");
        assert!(!old.is_fresh(), "past 70% of its lifetime");
        let expired = entry("s", 0);
        assert!(!expired.usable_for("s"));
        assert!(expired.token().is_none());
        let token = e.token().unwrap();
        assert_eq!(token.authorization(), "Bearer tok");
        assert_eq!(token.scope.as_deref(), Some("read"));
        assert!(token.lifetime <= Duration::from_secs(600));
    }
}
