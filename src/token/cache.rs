//! The token cache: a token source's token kept beyond the process, in a file (a restart
//! needs no new token) or in Redis (a fleet of replicas shares one token).
//!
//! `CachedFetch` wraps a source's fetcher. Asked for a token, it first looks in the store
//! for one that is its source's (by `entry::digest`), still usable, and newer than the one
//! the source holds, not yet due for its own refresh; only then does it fetch. With Redis, the
//! fetch goes through a lease: one process fetches and stores, the others wait for what it
//! stores (bounded by the token timeout) and fetch for themselves only if nothing comes. So a
//! fleet asks for about one token per lifetime, whatever its size.
//!
//! The cache can only save token requests, never cost a request its token: any failure of
//! the store (down, slow, a tampered or foreign entry) is a miss, and the source fetches as it
//! would without a cache. An outage is logged once, when it starts, and once when it ends.

mod entry;
mod file;
mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntGauge;

use super::fetch::{Fetch, FetchError};
use super::state::SharedObservers;
use super::Token;
use crate::config::{self, TokenSettings};
use entry::{Entry, SealingKey};

/// How often a process waiting for another's token looks for it.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// The store could not be used, or held something that is not a usable entry.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CacheError {
    /// The store failed (unreachable, slow, an I/O error): an outage.
    #[error("{0}")]
    Store(String),
    /// It answered with something that is not an entry for this source: a miss.
    #[error("{0}")]
    Unreadable(String),
}

/// The cache could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum CacheSetupError {
    /// A file it needs could not be read.
    #[error("[cache] {what} {}: {reason}", path.display())]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The Redis URL cannot be used.
    #[error("[cache] {0}")]
    Url(String),
}

enum Backend {
    File(file::FileStore),
    /// Boxed: one per process, and far larger than a directory name.
    Redis(Box<redis::RedisStore>),
}

/// The process's one cache, shared by its token sources.
pub struct Store {
    backend: Backend,
    /// Whether the last call succeeded, for logging an outage once.
    up: AtomicBool,
    /// `bearerd_token_cache_up{backend}`.
    up_gauge: IntGauge,
}

/// `[cache]` made ready to run: its files read and its key parsed, nothing connected. What
/// `--check` describes, and what the store starts from.
pub(crate) struct Prepared {
    backend: Backend,
}

impl Prepared {
    /// Reads what `settings` names (the key and password files) and builds the store's
    /// client, without connecting.
    pub(crate) fn new(settings: &config::Cache) -> Result<Self, CacheSetupError> {
        let backend = match settings {
            config::Cache::File { dir } => Backend::File(file::FileStore::new(dir.clone())),
            config::Cache::Redis {
                url,
                password_file,
                key_file,
                key_prefix,
                timeout,
            } => {
                let read = |what, path: &std::path::Path| {
                    std::fs::read_to_string(path)
                        .map(zeroize::Zeroizing::new)
                        .map_err(|e| CacheSetupError::File {
                            what,
                            path: path.to_owned(),
                            reason: e.to_string(),
                        })
                };
                let key_text = read("key_file", key_file)?;
                let key = SealingKey::from_base64(&key_text).ok_or_else(|| CacheSetupError::File {
                    what: "key_file",
                    path: key_file.clone(),
                    reason: "does not hold 32 bytes in base64 (make one with: openssl rand -base64 32)".into(),
                })?;
                let password = match password_file {
                    Some(path) => Some(read("password_file", path)?),
                    None => None,
                };
                Backend::Redis(Box::new(
                    redis::RedisStore::new(
                        url,
                        password
                            .as_deref()
                            .map(|p| p.trim_end_matches(['\r', '\n'])),
                        key,
                        key_prefix.clone(),
                        *timeout,
                    )
                    .map_err(|e| CacheSetupError::Url(e.to_string()))?,
                ))
            }
        };
        Ok(Self { backend })
    }
}

impl Store {
    /// The store `prepared` describes, reporting its health in `up_gauge`.
    pub(crate) fn new(prepared: Prepared, up_gauge: IntGauge) -> Self {
        up_gauge.set(1);
        Self {
            backend: prepared.backend,
            up: AtomicBool::new(true),
            up_gauge,
        }
    }

    fn name(&self) -> &'static str {
        match self.backend {
            Backend::File(_) => "file",
            Backend::Redis(_) => "redis",
        }
    }

    /// Notes how a call went: an outage is logged when it starts and when it ends.
    fn note<T>(&self, outcome: &Result<T, CacheError>) {
        match outcome {
            Err(CacheError::Store(error)) => {
                if self.up.swap(false, Ordering::AcqRel) {
                    self.up_gauge.set(0);
                    tracing::warn!(backend = self.name(), %error, "token cache unavailable: token sources fetch for themselves until it is back");
                }
            }
            _ => {
                if !self.up.swap(true, Ordering::AcqRel) {
                    self.up_gauge.set(1);
                    tracing::info!(backend = self.name(), "token cache back");
                }
            }
        }
    }

    async fn get(&self, digest: &str) -> Result<Option<Entry>, CacheError> {
        let outcome = match &self.backend {
            Backend::File(store) => store.get(digest).await,
            Backend::Redis(store) => store.get(digest).await,
        };
        self.note(&outcome);
        outcome
    }

    async fn put(&self, digest: &str, entry: &Entry) -> Result<(), CacheError> {
        let outcome = match &self.backend {
            Backend::File(store) => store.put(digest, entry).await,
            Backend::Redis(store) => store.put(digest, entry).await,
        };
        self.note(&outcome);
        outcome
    }

    async fn delete_if(&self, digest: &str, token_hash: &str) -> Result<bool, CacheError> {
        let outcome = match &self.backend {
            Backend::File(store) => store.delete_if(digest, token_hash).await,
            Backend::Redis(store) => store.delete_if(digest, token_hash).await,
        };
        self.note(&outcome);
        outcome
    }
}

/// A source's fetcher, in front of which the cache stands.
pub(crate) struct CachedFetch {
    inner: Arc<dyn Fetch>,
    store: Arc<Store>,
    digest: String,
    /// The longest a process waits for another's token, and holds the lease: the token timeout.
    wait: Duration,
    /// The hash of the token this source holds, so that the store's copy of it is not taken
    /// for a new one.
    held: Mutex<Option<String>>,
    observers: SharedObservers,
}

impl CachedFetch {
    /// `inner` behind `store`, for the source of `settings` (bound to the DPoP key of
    /// `dpop_thumbprint`, if any).
    pub(crate) fn new(
        inner: Arc<dyn Fetch>,
        store: Arc<Store>,
        settings: &TokenSettings,
        dpop_thumbprint: Option<&str>,
        observers: SharedObservers,
    ) -> Self {
        Self {
            inner,
            store,
            digest: entry::digest(settings, dpop_thumbprint),
            wait: settings.timeout,
            held: Mutex::new(None),
            observers,
        }
    }

    fn count(&self, op: &'static str, outcome: &'static str) {
        if let Ok(observers) = self.observers.read() {
            for metrics in &observers.metrics {
                metrics.cache_operation(self.store.name(), op, outcome);
            }
        }
    }

    fn held(&self) -> Option<String> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn hold(&self, token: &Token) {
        let hash = crate::jose::sha256_base64url(token.access_token().0.as_bytes());
        *self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(hash);
    }

    /// A stored token worth taking: this source's, usable, not the one held, and (unless
    /// none is held, at start) not yet due for a refresh of its own.
    async fn stored(&self) -> Option<Token> {
        let held = self.held();
        match self.store.get(&self.digest).await {
            Ok(Some(entry))
                if entry.usable_for(&self.digest)
                    && held.as_deref() != Some(entry.token_hash().as_str())
                    && (held.is_none() || entry.is_fresh()) =>
            {
                match entry.token() {
                    Some(token) => {
                        self.count("get", "hit");
                        // No token request was made: the refresher logs "token fetched" for
                        // those only, and this line says where the token came from instead.
                        tracing::info!(
                            upstream = %self.observers.read().map(|o| o.label.clone()).unwrap_or_default(),
                            backend = self.store.name(),
                            expires_in = token.lifetime.as_secs(),
                            "token taken from the cache"
                        );
                        Some(token)
                    }
                    None => {
                        self.count("get", "miss");
                        None
                    }
                }
            }
            Ok(Some(entry)) if !entry.usable_for(&self.digest) => {
                // Not a refresh's ordinary miss: another source's entry under this one's
                // name, or a token that has expired (a file left from long ago).
                let why = if entry.source == self.digest {
                    "its token has expired"
                } else {
                    "it belongs to another token source"
                };
                tracing::warn!(
                    backend = self.store.name(),
                    why,
                    "token cache entry unusable: fetching"
                );
                self.count("get", "unreadable");
                None
            }
            Ok(_) => {
                self.count("get", "miss");
                None
            }
            Err(CacheError::Unreadable(why)) => {
                tracing::warn!(backend = self.store.name(), %why, "token cache entry unusable: fetching");
                self.count("get", "unreadable");
                None
            }
            Err(CacheError::Store(_)) => {
                self.count("get", "error");
                None
            }
        }
    }

    /// Fetches, and stores what came.
    async fn fetch_and_store(&self) -> Result<Token, FetchError> {
        let token = self.inner.fetch().await?;
        let outcome = match self
            .store
            .put(&self.digest, &Entry::of(&token, &self.digest))
            .await
        {
            Ok(()) => "stored",
            Err(_) => "error",
        };
        self.count("put", outcome);
        Ok(token)
    }

    async fn fetch_through_cache(&self) -> Result<Token, FetchError> {
        if let Some(token) = self.stored().await {
            self.hold(&token);
            return Ok(token);
        }
        let token = match &self.store.backend {
            Backend::File(_) => self.fetch_and_store().await?,
            Backend::Redis(store) => {
                // The lease outlives a fetch (bounded by the token timeout) a little, and
                // expires by itself if its holder dies.
                let lease = store
                    .lease(&self.digest, self.wait + Duration::from_secs(1))
                    .await;
                self.store.note(&lease);
                match lease {
                    Ok(Some(lease)) => {
                        self.count("lease", "acquired");
                        // Another process may have stored a token and let the lease go
                        // between the look above and the lease: look once more.
                        let outcome = match self.stored().await {
                            Some(token) => Ok(token),
                            None => self.fetch_and_store().await,
                        };
                        let released = store.release(lease).await;
                        self.store.note(&released);
                        outcome?
                    }
                    Ok(None) => {
                        self.count("lease", "busy");
                        match self.wait_for_stored().await {
                            Some(token) => token,
                            // The holder did not deliver in time: fetch for ourselves.
                            None => self.fetch_and_store().await?,
                        }
                    }
                    Err(_) => {
                        self.count("lease", "error");
                        self.inner.fetch().await?
                    }
                }
            }
        };
        self.hold(&token);
        Ok(token)
    }

    /// The token another process is fetching, once it is stored; `None` after the wait.
    async fn wait_for_stored(&self) -> Option<Token> {
        let deadline = tokio::time::Instant::now() + self.wait;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(WAIT_POLL).await;
            if let Some(token) = self.stored().await {
                return Some(token);
            }
            if !self.store.up.load(Ordering::Acquire) {
                return None;
            }
        }
        None
    }
}

impl Fetch for CachedFetch {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Token, FetchError>> + Send + '_>> {
        Box::pin(self.fetch_through_cache())
    }

    fn rejected<'a>(&'a self, token: &'a Token) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let hash = crate::jose::sha256_base64url(token.access_token().0.as_bytes());
            let outcome = match self.store.delete_if(&self.digest, &hash).await {
                Ok(true) => "deleted",
                Ok(false) => "kept",
                Err(_) => "error",
            };
            self.count("delete", outcome);
        })
    }
}

#[cfg(test)]
mod tests;
