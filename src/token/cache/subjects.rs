//! The fleet cache of an on-behalf-of source: each subject's token in Redis under an entry of
//! its own, named by the source's digest and the subject's hash
//! ([`entry::subject_digest`]), sealed with the cache key as every entry is. Never in the file
//! cache: a token per user on a pod's disk is a store of other people's credentials, and one
//! process's memory already holds them for as long as they are of use to it.
//!
//! There is no lease: replicas that meet a new subject at the same moment each exchange it
//! once, and the last to store wins; what the lease saves for a source's one token is not
//! worth a round trip and a wait on every new subject.

use std::sync::Arc;

use super::entry::{self, Entry, Expected};
use super::{Backend, CacheError, Store};
use crate::token::on_behalf::SubjectKey;
use crate::token::response::TokenType;
use crate::token::state::SharedObservers;
use crate::token::Token;

/// The tokens of one on-behalf-of source in the fleet's Redis.
pub(crate) struct SubjectStore {
    store: Arc<Store>,
    /// The source's digest, which each subject's entry name starts from.
    digest: String,
    expected: Expected,
    observers: SharedObservers,
}

impl SubjectStore {
    /// The subject store of the source of `settings` (bound to the DPoP key of
    /// `dpop_thumbprint`, if any) in `store`; `None` unless `store` is Redis.
    pub(crate) fn new(
        store: &Arc<Store>,
        settings: &crate::config::TokenSettings,
        dpop_thumbprint: Option<&str>,
        observers: SharedObservers,
    ) -> Option<Self> {
        if !matches!(store.backend, Backend::Redis(_)) {
            return None;
        }
        Some(Self {
            store: Arc::clone(store),
            digest: entry::digest(settings, dpop_thumbprint),
            expected: Expected {
                kind: if dpop_thumbprint.is_some() {
                    TokenType::DPoP
                } else {
                    TokenType::Bearer
                },
                max_lifetime: settings.max_lifetime,
            },
            observers,
        })
    }

    fn count(&self, op: &'static str, outcome: &'static str) {
        if let Ok(observers) = self.observers.read() {
            for metrics in &observers.metrics {
                metrics.cache_operation(self.store.name(), op, outcome);
            }
        }
    }

    /// The subject's token another replica stored, if it is usable and not `refused` (the
    /// hash of a token an upstream rejected here).
    pub(crate) async fn get(&self, subject: &SubjectKey, refused: Option<&str>) -> Option<Token> {
        let digest = entry::subject_digest(&self.digest, &subject.text());
        match self.store.get(&digest).await {
            Ok(Some(entry))
                if entry.usable_for(&digest, &self.expected)
                    && refused != Some(entry.token_hash().as_str()) =>
            {
                match entry.token(&self.expected) {
                    Ok(token) => {
                        self.count("get", "hit");
                        Some(token)
                    }
                    Err(why) => {
                        tracing::warn!(
                            backend = self.store.name(),
                            why,
                            "token cache entry unusable: exchanging"
                        );
                        self.count("get", "unreadable");
                        None
                    }
                }
            }
            Ok(_) => {
                self.count("get", "miss");
                None
            }
            Err(CacheError::Unreadable(why)) => {
                tracing::warn!(
                    backend = self.store.name(),
                    why,
                    "token cache entry unusable: exchanging"
                );
                self.count("get", "unreadable");
                None
            }
            Err(_) => {
                self.count("get", "error");
                None
            }
        }
    }

    /// Stores the subject's new token for the fleet.
    pub(crate) async fn put(&self, subject: &SubjectKey, token: &Token) {
        let digest = entry::subject_digest(&self.digest, &subject.text());
        let outcome = match self.store.put(&digest, &Entry::of(token, &digest)).await {
            Ok(()) => "stored",
            Err(error @ CacheError::TooLarge(_)) => {
                tracing::warn!(backend = self.store.name(), %error, "token not cached");
                "too_large"
            }
            Err(_) => "error",
        };
        self.count("put", outcome);
    }

    /// Deletes the subject's token if it is still `token` (an upstream rejected it).
    pub(crate) async fn delete(&self, subject: &SubjectKey, token: &Token) {
        let digest = entry::subject_digest(&self.digest, &subject.text());
        let hash = crate::jose::sha256_base64url(token.access_token().0.as_bytes());
        let outcome = match self.store.delete_if(&digest, &hash).await {
            Ok(true) => "deleted",
            Ok(false) => "kept",
            Err(_) => "error",
        };
        self.count("delete", outcome);
    }
}
