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
//!
//! What a store holds is untrusted, whoever wrote it: entries are read bounded, a token is
//! taken only of its source's type and for at most its `max_lifetime`, and a Redis lease that
//! bearerd could not have set (no expiry, longer than the token timeout and a second, or still
//! there after its time) is treated as absent, so that it cannot hold fetches up.
//!
//! [`prepare`] is the part of start that `--check` runs too: files read, the directory checked
//! or made, the URL parsed, nothing connected; [`Store::new`] takes what it made.

mod entry;
#[cfg(unix)]
mod file;
/// Elsewhere than on Unix, `backend = "file"` is refused at start: it needs a directory
/// handle, `O_NOFOLLOW` and file owners.
#[cfg(not(unix))]
mod file {
    use super::CacheError;

    /// No file store can be made.
    pub(crate) enum FileStore {}

    /// Why not.
    #[derive(Debug, thiserror::Error)]
    #[error("the file cache needs a Unix system")]
    pub(crate) struct DirError;

    impl FileStore {
        pub(crate) fn open(_: &std::path::Path) -> Result<(Self, bool), DirError> {
            Err(DirError)
        }
        pub(crate) fn shown_entry(&self, _: &str) -> String {
            match *self {}
        }
        pub(crate) async fn get(&self, _: &str) -> Result<Option<Vec<u8>>, CacheError> {
            match *self {}
        }
        pub(crate) async fn put(
            &self,
            _: &str,
            _: zeroize::Zeroizing<Vec<u8>>,
        ) -> Result<(), CacheError> {
            match *self {}
        }
        pub(crate) async fn delete(&self, _: &str) -> Result<bool, CacheError> {
            match *self {}
        }
        pub(crate) async fn lock(&self, _: &str) -> Result<Option<FileLock>, CacheError> {
            match *self {}
        }
    }

    /// No lock either.
    pub(crate) enum FileLock {}
}
mod redis;
mod subjects;

pub(crate) use subjects::SubjectStore;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntGauge;

use super::fetch::{Fetch, FetchError};
use super::response::TokenType;
use super::rotation::{FileToken, RefreshChain};
use super::state::SharedObservers;
use super::Token;
use crate::config::{self, TokenSettings};
use crate::secret::Secret;
use entry::{Entry, Expected, RefreshEntry, SealingKey, MAX_ENTRY_BYTES};

/// How often a process waiting for another's token looks for it.
const WAIT_POLL: Duration = Duration::from_millis(100);
/// How much longer than the token timeout a lease lasts: its holder's fetch is bounded by the
/// timeout, and storing the token takes a moment more.
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// The store could not be used, or held something that is not a usable entry.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CacheError {
    /// The store failed (unreachable, slow, an I/O error): an outage.
    #[error("{0}")]
    Store(String),
    /// It answered with something that is not an entry for this source: a miss.
    #[error("{0}")]
    Unreadable(String),
    /// The token's entry would be larger than an entry may be: not stored.
    #[error("the entry would be {0} bytes, more than the {MAX_ENTRY_BYTES} an entry may hold: the token is not cached")]
    TooLarge(usize),
}

/// The cache could not be set up: said at start and by `--check`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CacheSetupError {
    /// A file it needs could not be read.
    #[error("[cache] {what} {}: {reason}", path.display())]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The directory of the file backend cannot hold tokens safely.
    #[error("[cache] dir {}: {reason}", path.display())]
    Dir {
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The Redis URL cannot be used.
    #[error("[cache] {0}")]
    Url(String),
}

enum Backend {
    File {
        store: file::FileStore,
        /// `[cache] key_file`: entries sealed, as in Redis. Boxed, as the Redis store is:
        /// one per process, and far larger than a directory handle.
        key: Option<Box<SealingKey>>,
    },
    /// Boxed: one per process, and far larger than a directory handle.
    Redis(Box<redis::RedisStore>),
}

/// What [`prepare`] made of `[cache]`: its files read, its directory checked (and made), its
/// URL parsed; nothing connected. [`Store::new`] runs it; `--check` describes it.
pub(crate) struct Prepared {
    backend: Backend,
    /// What `--check` says of it, on one line.
    description: String,
    /// Key files that group or others may read: a WARN at start, a WARNING in `--check`.
    loose_key_files: Vec<PathBuf>,
}

/// Reads `[cache]`'s key and password files, checks (or creates) the file backend's
/// directory, and parses the Redis URL; never connects. The one step that `--check` and
/// start share, so that what `--check` accepts, start can run.
pub(crate) fn prepare(settings: &config::Cache) -> Result<Prepared, CacheSetupError> {
    let mut loose_key_files = Vec::new();
    let (backend, description) = match settings {
        config::Cache::File { dir, key_file } => {
            let (store, created) =
                file::FileStore::open(dir).map_err(|e| CacheSetupError::Dir {
                    path: dir.clone(),
                    reason: e.to_string(),
                })?;
            let key = match key_file {
                Some(path) => {
                    if crate::secret::readable_by_others(path) {
                        loose_key_files.push(path.clone());
                    }
                    Some(Box::new(read_key(path)?))
                }
                None => None,
            };
            let made = if created {
                "created, mode 0700"
            } else {
                "bearerd's own, not writable by others"
            };
            let sealed = match (&key, key_file) {
                (Some(key), Some(path)) => sealed_with(key, path),
                _ => "entries in clear: whoever runs as bearerd's user can read them and plant one (set key_file to seal them)".to_owned(),
            };
            (
                Backend::File { store, key },
                format!("file, dir {} ({made}); {sealed}", dir.display()),
            )
        }
        config::Cache::Redis {
            url,
            password_file,
            key_file,
            key_prefix,
            timeout,
        } => {
            if crate::secret::readable_by_others(key_file) {
                loose_key_files.push(key_file.clone());
            }
            let key = read_key(key_file)?;
            let password = match password_file {
                Some(path) => Some(read_file("password_file", path)?),
                None => None,
            };
            let description = format!(
                "redis {}{}, key_prefix {key_prefix:?}, timeout {} (not connected by --check); {}",
                redacted(url),
                password_file
                    .as_ref()
                    .map_or_else(String::new, |p| format!(" (password from {})", p.display())),
                humantime::format_duration(*timeout),
                sealed_with(&key, key_file),
            );
            let store = redis::RedisStore::new(
                url,
                password
                    .as_deref()
                    .map(|p| p.trim_end_matches(['\r', '\n'])),
                key,
                key_prefix.clone(),
                *timeout,
            )
            .map_err(|e| CacheSetupError::Url(e.to_string()))?;
            (Backend::Redis(Box::new(store)), description)
        }
    };
    Ok(Prepared {
        backend,
        description,
        loose_key_files,
    })
}

impl Prepared {
    /// What `--check` says of the cache: the backend, its directory or URL (without
    /// credentials), whether entries are sealed and with which key (by fingerprint).
    pub(crate) fn describe(&self) -> &str {
        &self.description
    }

    /// The key files that group or others may read (warned of by the preparation step).
    pub(crate) fn loose_key_files(&self) -> &[PathBuf] {
        &self.loose_key_files
    }
}

/// "entries sealed (AES-256-GCM) with key_file PATH (key fingerprint F)"
fn sealed_with(key: &SealingKey, path: &Path) -> String {
    format!(
        "entries sealed (AES-256-GCM) with key_file {} (key sha256 {}…)",
        path.display(),
        key.fingerprint()
    )
}

/// `url` without what must not be printed: credentials (validation refuses them, but this is
/// what is shown), query and fragment.
fn redacted(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let rest = match rest.split_once('/') {
        Some((authority, path)) => {
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            format!("{host}/{path}")
        }
        None => rest
            .rsplit_once('@')
            .map_or(rest, |(_, host)| host)
            .to_owned(),
    };
    format!("{scheme}://{rest}")
}

/// The whole of a small secret file.
fn read_file(
    what: &'static str,
    path: &Path,
) -> Result<zeroize::Zeroizing<String>, CacheSetupError> {
    let failed = |reason: String| CacheSetupError::File {
        what,
        path: path.to_owned(),
        reason,
    };
    // The bounded reader every credential file goes through: a FIFO or a device is refused,
    // not waited on.
    let bytes = crate::files::read_sync(path, crate::files::Content::Secret)
        .map_err(|e| failed(e.to_string()))?;
    std::str::from_utf8(&bytes)
        .map(|text| zeroize::Zeroizing::new(text.to_owned()))
        .map_err(|_| failed("is not UTF-8 text".into()))
}

/// The sealing key of `key_file`.
fn read_key(path: &Path) -> Result<SealingKey, CacheSetupError> {
    let text = read_file("key_file", path)?;
    SealingKey::from_base64(&text).ok_or_else(|| CacheSetupError::File {
        what: "key_file",
        path: path.to_owned(),
        reason: "does not hold 32 bytes in base64 (make one with: openssl rand -base64 32)".into(),
    })
}

/// The process's one cache, shared by its token sources.
pub(crate) struct Store {
    backend: Backend,
    /// Whether the last call succeeded, for logging an outage once.
    up: AtomicBool,
    /// `bearerd_token_cache_up{backend}`.
    up_gauge: IntGauge,
}

impl Store {
    /// The store [`prepare`] made ready; warns of key files that others may read, as for
    /// token key files.
    pub(crate) fn new(prepared: Prepared, up_gauge: IntGauge) -> Self {
        up_gauge.set(1);
        Self {
            backend: prepared.backend,
            up: AtomicBool::new(true),
            up_gauge,
        }
    }

    /// Whether the last call to the store succeeded (`bearerd_token_cache_up`).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The backend's name, as metrics and logs say it.
    pub(crate) fn name(&self) -> &'static str {
        match self.backend {
            Backend::File { .. } => "file",
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
            Backend::File { store, key } => match store.get(digest).await {
                Ok(Some(bytes)) => entry::decode(&bytes, key.as_deref(), digest)
                    .map(Some)
                    .map_err(|e| {
                        CacheError::Unreadable(format!("{}: {e}", store.shown_entry(digest)))
                    }),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            },
            Backend::Redis(store) => store.get(digest).await,
        };
        self.note(&outcome);
        outcome
    }

    async fn put(&self, digest: &str, entry: &Entry) -> Result<(), CacheError> {
        let outcome = match &self.backend {
            Backend::File { store, key } => match entry::encode(entry, key.as_deref(), digest) {
                Some(bytes) if bytes.len() > MAX_ENTRY_BYTES => {
                    Err(CacheError::TooLarge(bytes.len()))
                }
                Some(bytes) => store.put(digest, bytes).await,
                None => Err(CacheError::Store("cannot encode the entry".into())),
            },
            Backend::Redis(store) => store.put(digest, entry).await,
        };
        self.note(&outcome);
        outcome
    }

    /// The refresh token entry stored under `digest` (a [`entry::refresh_digest`]).
    async fn get_refresh(&self, digest: &str) -> Result<Option<RefreshEntry>, CacheError> {
        let bytes = match &self.backend {
            Backend::File { store, .. } => store.get(digest).await,
            Backend::Redis(store) => store.get_refresh(digest).await,
        };
        let key = match &self.backend {
            Backend::File { key, .. } => key.as_deref(),
            Backend::Redis(store) => Some(store.key()),
        };
        let outcome = match bytes {
            Ok(Some(bytes)) => entry::decode::<RefreshEntry>(&bytes, key, digest)
                .map(|entry| entry.is_for(digest).then_some(entry))
                .map_err(|e| CacheError::Unreadable(format!("refresh token entry: {e}"))),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        self.note(&outcome);
        outcome
    }

    /// Stores a refresh token entry under `digest`: sealed always (the config requires a
    /// key), the file written atomically.
    async fn put_refresh(&self, digest: &str, entry: &RefreshEntry) -> Result<(), CacheError> {
        let outcome = match &self.backend {
            Backend::File {
                store,
                key: Some(key),
            } => match entry::encode(entry, Some(key), digest) {
                Some(bytes) => store.put(digest, bytes).await,
                None => Err(CacheError::Store("cannot seal the entry".into())),
            },
            Backend::File { key: None, .. } => Err(CacheError::Store(
                "the file cache has no key_file: a refresh token is never stored in clear".into(),
            )),
            Backend::Redis(store) => store.put_refresh(digest, entry).await,
        };
        self.note(&outcome);
        outcome
    }

    async fn delete_if(&self, digest: &str, token_hash: &str) -> Result<bool, CacheError> {
        let outcome = match &self.backend {
            Backend::File { store, .. } => match self.get(digest).await {
                Ok(Some(entry)) if entry.token_hash() == token_hash => store.delete(digest).await,
                Ok(_) | Err(CacheError::Unreadable(_)) => Ok(false),
                Err(e) => Err(e),
            },
            Backend::Redis(store) => store.delete_if(digest, token_hash).await,
        };
        self.note(&outcome);
        outcome
    }
}

/// `bearerd --fetch-token` for `grant = "refresh_token"`: `fetcher` behind the store that
/// `prepared` makes, one fetch under the lease ([`CachedFetch::fetch_leased`]).
pub(crate) async fn fetch_leased(
    fetcher: super::fetch::Fetcher,
    prepared: Prepared,
    settings: &TokenSettings,
    dpop_thumbprint: Option<&str>,
) -> Result<Token, FetchError> {
    // The gauge of a process that serves no metrics.
    let up =
        IntGauge::new("bearerd_token_cache_up", "unused").map_err(|e| FetchError::Credentials {
            reason: format!("cannot set up the cache: {e}"),
        })?;
    let chain = fetcher.chain();
    let cached = CachedFetch::new(
        Arc::new(fetcher),
        Arc::new(Store::new(prepared, up)),
        settings,
        dpop_thumbprint,
        SharedObservers::default(),
        Some(chain),
    );
    cached.fetch_leased().await
}

/// A source's fetcher, in front of which the cache stands.
pub(crate) struct CachedFetch {
    inner: Arc<dyn Fetch>,
    store: Arc<Store>,
    digest: String,
    /// The longest a process waits for another's token, and holds the lease: the token timeout.
    wait: Duration,
    /// What a stored token must be to be taken: the source's type and `max_lifetime`.
    expected: Expected,
    /// The hash of the token this source holds, so that the store's copy of it is not taken
    /// for a new one.
    held: Mutex<Option<String>>,
    observers: SharedObservers,
    /// `grant = "refresh_token"`: the chain, kept in the store beside the token.
    refresh: Option<Refreshing>,
}

/// What keeping a refresh token chain needs.
struct Refreshing {
    chain: Arc<RefreshChain>,
    /// For `refresh_token_file`.
    settings: TokenSettings,
    /// Where the chain is stored: [`entry::refresh_digest`].
    digest: String,
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
        chain: Option<Arc<RefreshChain>>,
    ) -> Self {
        let digest = entry::digest(settings, dpop_thumbprint);
        Self {
            inner,
            store,
            refresh: chain
                .filter(|_| matches!(settings.grant, config::Grant::RefreshToken(_)))
                .map(|chain| Refreshing {
                    chain,
                    settings: settings.clone(),
                    digest: entry::refresh_digest(&digest),
                }),
            digest,
            wait: settings.timeout,
            expected: Expected {
                kind: if dpop_thumbprint.is_some() {
                    TokenType::DPoP
                } else {
                    TokenType::Bearer
                },
                max_lifetime: settings.max_lifetime,
            },
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

    /// A stored token worth taking: this source's, usable, of its type, not the one held,
    /// and (unless none is held, at start) not yet due for a refresh of its own. Its lifetime
    /// is clamped to the source's `max_lifetime`.
    async fn stored(&self) -> Option<Token> {
        let held = self.held();
        let expected = &self.expected;
        let unusable = |why: &str| {
            tracing::warn!(
                backend = self.store.name(),
                why,
                "token cache entry unusable: fetching"
            );
            self.count("get", "unreadable");
            None
        };
        match self.store.get(&self.digest).await {
            Ok(Some(entry))
                if entry.usable_for(&self.digest, expected)
                    && held.as_deref() != Some(entry.token_hash().as_str())
                    && (held.is_none() || entry.is_fresh(expected)) =>
            {
                match entry.token(expected) {
                    Ok(token) => {
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
                    Err(why) => unusable(why),
                }
            }
            Ok(Some(entry)) if !entry.usable_for(&self.digest, expected) => {
                // Not a refresh's ordinary miss: another source's entry under this one's
                // name, or a token that has expired (a file left from long ago).
                unusable(if entry.source == self.digest {
                    "its token has expired"
                } else {
                    "it belongs to another token source"
                })
            }
            Ok(_) => {
                self.count("get", "miss");
                None
            }
            Err(CacheError::Unreadable(why)) => unusable(&why),
            Err(_) => {
                self.count("get", "error");
                None
            }
        }
    }

    /// Before a refresh token is spent: stores one not stored yet, then loads the chain (see
    /// [`RefreshChain::load`]). A store that cannot be read stops the fetch unless this
    /// process holds the chain of the file as it is: the file's token may be spent already.
    async fn load_chain(&self, refreshing: &Refreshing) -> Result<(), FetchError> {
        self.save_chain(refreshing).await;
        let deadline = tokio::time::Instant::now() + self.wait;
        let Some(file) = FileToken::read(&refreshing.settings, deadline).await? else {
            return Ok(());
        };
        let stored = match self.store.get_refresh(&refreshing.digest).await {
            Ok(entry) => {
                self.count("get_refresh", if entry.is_some() { "hit" } else { "miss" });
                entry.map(|e| (Secret::new(e.refresh_token.as_str()), e.origin.clone()))
            }
            Err(CacheError::Unreadable(why)) => {
                // Tampered, or sealed with another key: the file's token is all there is.
                self.count("get_refresh", "unreadable");
                tracing::warn!(backend = self.store.name(), why, "refresh token entry unusable: beginning the chain again from refresh_token_file");
                None
            }
            Err(error) => {
                self.count("get_refresh", "error");
                if refreshing.chain.is_of(&file.origin) {
                    return Ok(());
                }
                return Err(FetchError::Credentials {
                    reason: format!("cannot read the stored refresh token ({error}): the one in refresh_token_file may have been spent already, so it is not sent"),
                });
            }
        };
        refreshing.chain.load(file, stored);
        Ok(())
    }

    /// Stores the chain's newest refresh token if it is not stored yet, trying twice; when
    /// both fail it stays in memory (`/readyz` says so) and is stored before the next fetch.
    async fn save_chain(&self, refreshing: &Refreshing) {
        let Some((token, origin)) = refreshing.chain.unsaved() else {
            return;
        };
        let entry = RefreshEntry::new(token.expose(), &origin, &refreshing.digest);
        let mut outcome = self.store.put_refresh(&refreshing.digest, &entry).await;
        if outcome.is_err() {
            outcome = self.store.put_refresh(&refreshing.digest, &entry).await;
        }
        self.count(
            "put_refresh",
            if outcome.is_ok() { "stored" } else { "error" },
        );
        if let Err(error) = &outcome {
            tracing::error!(backend = self.store.name(), %error, "the new refresh token could not be stored: it is held in memory, and a restart now would lose it");
        }
        refreshing
            .chain
            .stored(&token, outcome.map_err(|e| e.to_string()));
    }

    /// With a refresh token chain, a fetch without the fleet lease is refused: two replicas
    /// would spend the same refresh token, and the server would revoke the chain.
    fn without_lease(&self) -> Result<(), FetchError> {
        match &self.refresh {
            Some(_) => Err(FetchError::Credentials {
                reason: "the fleet lease on the refresh token could not be taken (another replica holds it, or the cache cannot be reached): the refresh token is spent under the lease only".into(),
            }),
            None => Ok(()),
        }
    }

    /// Fetches, and stores what came: with a refresh token chain, the chain is loaded first,
    /// and the new refresh token is stored before the access token is handed out.
    async fn fetch_and_store(&self) -> Result<Token, FetchError> {
        if let Some(refreshing) = &self.refresh {
            self.load_chain(refreshing).await?;
        }
        let fetched = self.inner.fetch().await;
        if let Some(refreshing) = &self.refresh {
            self.save_chain(refreshing).await;
        }
        let token = fetched?;
        let outcome = match self
            .store
            .put(&self.digest, &Entry::of(&token, &self.digest))
            .await
        {
            Ok(()) => "stored",
            Err(error @ CacheError::TooLarge(_)) => {
                tracing::warn!(backend = self.store.name(), %error, "token not cached");
                "too_large"
            }
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
            // A refresh token is spent under the directory's lock, the lease's counterpart:
            // `--fetch-token` may be spending it.
            Backend::File { store, .. } if self.refresh.is_some() => {
                let lock = self.file_lock(store, false).await?;
                // What the lock's last holder stored, if it is newer than the token held.
                let outcome = match self.stored().await {
                    Some(token) => Ok(token),
                    None => self.fetch_and_store().await,
                };
                drop(lock);
                outcome?
            }
            Backend::File { .. } => self.fetch_and_store().await?,
            Backend::Redis(store) => {
                // The lease outlives a fetch (bounded by the token timeout) a little, and
                // expires by itself if its holder dies.
                let lease = store.lease(&self.digest, self.wait + LEASE_MARGIN).await;
                self.store.note(&lease);
                match lease {
                    Ok(redis::Leased::Acquired(lease)) => {
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
                    Ok(redis::Leased::Busy(holder)) if !self.could_be_bearerds(&holder) => {
                        self.ignore_lease(&holder);
                        self.without_lease()?;
                        self.fetch_and_store().await?
                    }
                    Ok(redis::Leased::Busy(holder)) => {
                        self.count("lease", "busy");
                        match self.wait_for_stored(store, holder).await {
                            Some(token) => token,
                            // The holder did not deliver in time: fetch for ourselves.
                            None => {
                                self.without_lease()?;
                                self.fetch_and_store().await?
                            }
                        }
                    }
                    Err(_) => {
                        self.count("lease", "error");
                        self.without_lease()?;
                        self.inner.fetch().await?
                    }
                }
            }
        };
        self.hold(&token);
        Ok(token)
    }

    /// The file backend's lock on spending the refresh token; refused (nothing is spent)
    /// while another process holds it. When the lock file cannot be used at all (the
    /// directory gone, the disk failing) no other process can hold it either: `None`, and the
    /// running bearerd goes on with the chain it holds, as it does when a store fails; with
    /// `strict` (`--fetch-token`, which holds no chain) that is refused too.
    async fn file_lock(
        &self,
        store: &file::FileStore,
        strict: bool,
    ) -> Result<Option<file::FileLock>, FetchError> {
        let lock = store.lock(&self.digest).await;
        self.store.note(&lock);
        match lock {
            Ok(Some(lock)) => {
                self.count("lease", "acquired");
                Ok(Some(lock))
            }
            Ok(None) => {
                self.count("lease", "busy");
                Err(FetchError::Credentials {
                    reason: "another process holds the file cache's lock on the refresh token (bearerd --fetch-token, or a second bearerd on this cache dir): the refresh token is spent under the lock only".into(),
                })
            }
            Err(error) => {
                self.count("lease", "error");
                if !strict {
                    return Ok(None);
                }
                Err(FetchError::Credentials {
                    reason: format!("the file cache's lock on the refresh token cannot be taken ({error}): nothing was spent"),
                })
            }
        }
    }

    /// One token request under the lease, for `bearerd --fetch-token` with a refresh token
    /// chain: the lease taken as the running refresher takes it (Redis's fleet lease, the
    /// file backend's lock) but never waited for: held by another, nothing is spent. The chain
    /// is loaded from the store first (the stored refresh token wins over the file unless the
    /// file changed since the chain began), and the rotated refresh token is stored before
    /// this returns; an error if it could not be.
    pub(crate) async fn fetch_leased(&self) -> Result<Token, FetchError> {
        let Some(refreshing) = &self.refresh else {
            return self.inner.fetch().await;
        };
        let fetched = match &self.store.backend {
            Backend::File { store, .. } => {
                let lock = self.file_lock(store, true).await?;
                let fetched = self.fetch_and_store().await;
                drop(lock);
                fetched
            }
            Backend::Redis(store) => {
                let lease = store.lease(&self.digest, self.wait + LEASE_MARGIN).await;
                self.store.note(&lease);
                match lease {
                    Ok(redis::Leased::Acquired(lease)) => {
                        let fetched = self.fetch_and_store().await;
                        let released = store.release(lease).await;
                        self.store.note(&released);
                        fetched
                    }
                    Ok(redis::Leased::Busy(holder)) => {
                        let expires = holder.expires_in().map_or_else(
                            || "never".to_owned(),
                            |left| humantime::format_duration(left).to_string(),
                        );
                        Err(FetchError::Credentials {
                            reason: format!("the fleet lease on the refresh token is held by another process (a running bearerd refreshing; it expires in {expires}): nothing was spent, try again"),
                        })
                    }
                    Err(error) => Err(FetchError::Credentials {
                        reason: format!("the fleet lease on the refresh token cannot be taken ({error}): nothing was spent"),
                    }),
                }
            }
        };
        if refreshing.chain.unsaved().is_some() {
            // Spent, and its successor is in this process's memory only, which ends now.
            return Err(FetchError::Credentials {
                reason: "the token endpoint rotated the refresh token, and the new one could not be stored in the cache (see the log): it is lost, and a person must authorise again and write the new refresh token to refresh_token_file".into(),
            });
        }
        fetched
    }

    /// Whether a process of this source could have set `holder`'s lease: bearerd's leases
    /// last the token timeout and [`LEASE_MARGIN`] at most, and always expire. (A replica
    /// configured with a longer token timeout sets longer ones: this one then fetches for
    /// itself, one token request more.)
    fn could_be_bearerds(&self, holder: &redis::Holder) -> bool {
        holder
            .expires_in()
            .is_some_and(|left| left <= self.wait + LEASE_MARGIN)
    }

    /// A lease no bearerd set (planted, or kept alive): waiting for it would cost every fetch
    /// the token timeout, so it is treated as absent.
    fn ignore_lease(&self, holder: &redis::Holder) {
        self.count("lease", "ignored");
        let expires = holder.expires_in().map_or_else(
            || "never".to_owned(),
            |left| humantime::format_duration(left).to_string(),
        );
        tracing::warn!(
            backend = self.store.name(),
            %expires,
            "token cache lease not set by bearerd (it outlives the token timeout and a second): fetching without waiting for it"
        );
    }

    /// The token another process is fetching, once it is stored; `None` after the wait, or
    /// as soon as the lease turns out to be none of bearerd's: the same lease still there
    /// after its time was up (a holder's lease expires, and is never extended).
    async fn wait_for_stored(
        &self,
        store: &redis::RedisStore,
        mut holder: redis::Holder,
    ) -> Option<Token> {
        let now = tokio::time::Instant::now;
        let deadline = now() + self.wait;
        let mut recheck = holder.expires_in().map(|left| now() + left + WAIT_POLL);
        while now() < deadline {
            tokio::time::sleep(WAIT_POLL).await;
            if let Some(token) = self.stored().await {
                return Some(token);
            }
            if !self.store.up.load(Ordering::Acquire) {
                return None;
            }
            if recheck.is_some_and(|at| now() >= at) {
                recheck = None;
                let current = store.holder(&self.digest).await;
                self.store.note(&current);
                match current {
                    Ok(Some(next)) if next.same_as(&holder) || !self.could_be_bearerds(&next) => {
                        self.ignore_lease(&next);
                        return None;
                    }
                    // Another process's lease since: wait for it, still within the deadline.
                    Ok(Some(next)) => {
                        recheck = next.expires_in().map(|left| now() + left + WAIT_POLL);
                        holder = next;
                    }
                    Ok(None) | Err(_) => {}
                }
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

/// The entry opener as a source runs it, for the fuzz target `fuzz/fuzz_targets/cache_entry.rs`;
/// not an API.
#[doc(hidden)]
pub mod fuzzing {
    use std::time::Duration;

    use super::entry::{self, Expected, SealingKey};
    use crate::token::response::TokenType;
    use crate::token::Token;

    /// The digest of the source the entries are opened for.
    pub const DIGEST: &str = "fuzz-source";
    /// The most an entry may hold.
    pub const MAX_ENTRY_BYTES: usize = entry::MAX_ENTRY_BYTES;

    /// A fixed key: fuzzing needs reproducible runs, not secrecy.
    fn key() -> Option<SealingKey> {
        SealingKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
    }

    /// What a source of [`DIGEST`] (DPoP or Bearer, with `max_lifetime`) takes from `bytes`
    /// found in its store, in clear or (with `sealed`) sealed with the fixed key; why not,
    /// as the log would say it.
    pub fn open(
        bytes: &[u8],
        sealed: bool,
        dpop: bool,
        max_lifetime: Duration,
    ) -> Result<Token, String> {
        let key = if sealed { key() } else { None };
        let entry = entry::decode::<entry::Entry>(bytes, key.as_ref(), DIGEST)
            .map_err(|e| e.to_string())?;
        let expected = Expected {
            kind: if dpop {
                TokenType::DPoP
            } else {
                TokenType::Bearer
            },
            max_lifetime,
        };
        if !entry.usable_for(DIGEST, &expected) {
            return Err("not this source's, or expired".into());
        }
        entry.token(&expected).map_err(str::to_owned)
    }

    /// The entry in clear in `bytes`, sealed with the fixed key: what [`open`] with `sealed`
    /// must take as it took `bytes` in clear.
    pub fn reseal(bytes: &[u8]) -> Option<Vec<u8>> {
        let key = key()?;
        let entry: entry::Entry = entry::decode(bytes, None, DIGEST).ok()?;
        entry::encode(&entry, Some(&key), DIGEST).map(|sealed| sealed.to_vec())
    }
}

#[cfg(test)]
mod tests;
