//! The Redis backend: one token per source for a whole fleet, sealed with AES-256-GCM (Redis
//! is shared; the key never leaves the pods), with a TTL of the token's remaining lifetime,
//! and a lease so that one process fetches while the others wait for what it stores.
//!
//! Every call is bounded by `[cache] timeout`; a failure is reported to the caller, which
//! fetches for itself. The connection is made at first use and made again after a failure,
//! so that bearerd starts, and serves, while Redis is away.
//!
//! What Redis holds is untrusted (anyone who can write to it can plant values): entries are
//! read with `GETRANGE` up to [`MAX_ENTRY_BYTES`] and one more byte, so that a planted large
//! value cannot grow the reply, and a lease is read with its time to live, so that the caller
//! can tell one that bearerd could not have set. A hostile Redis *server* is out of scope: the
//! `redis` crate buffers each whole reply before bearerd sees it.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

use super::entry::{Entry, SealingKey, MAX_ENTRY_BYTES};
use super::CacheError;

/// Deletes a key only if it still holds the value given: releasing a lease, or deleting a
/// token, must not remove what another process has put there since.
const COMPARE_AND_DELETE: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// The first ARGV[1] + 1 bytes of a value (`GETRANGE`), or nil when there is none: GETRANGE
/// alone answers "" for a missing key, and an empty value is not a missing one.
const READ_BOUNDED: &str = "\
if redis.call('exists', KEYS[1]) == 0 then return false end
return redis.call('getrange', KEYS[1], 0, ARGV[1])";

/// Takes the lease (`SET NX PX`), or, when it is taken, says what holds it: the first 64
/// bytes of its value (bearerd's are 22) and its time to live in ms (-1: none; a value that
/// is not a string counts as none). One script, so that what is seen is the lease that
/// refused.
const TAKE_LEASE: &str = "\
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, '', 0} end
local value = redis.pcall('getrange', KEYS[1], 0, 63)
if type(value) ~= 'string' then return {0, '', -1} end
return {0, value, redis.call('pttl', KEYS[1])}";

/// What holds the lease now, as [`TAKE_LEASE`] says it; `{0, '', -2}` when nothing does.
const LEASE_HOLDER: &str = "\
local ttl = redis.call('pttl', KEYS[1])
if ttl == -2 then return {0, '', -2} end
local value = redis.pcall('getrange', KEYS[1], 0, 63)
if type(value) ~= 'string' then return {1, '', -1} end
return {1, value, ttl}";

/// A lease on fetching a source's token, held until released or expired.
pub(crate) struct Lease {
    key: String,
    value: String,
}

/// The outcome of asking for the lease.
pub(crate) enum Leased {
    /// This process fetches; it releases the lease after storing the token.
    Acquired(Lease),
    /// Something else holds it.
    Busy(Holder),
}

/// A lease held by something else, as seen when it refused this process.
pub(crate) struct Holder {
    /// The start of its value.
    value: Vec<u8>,
    /// Its time to live in ms, negative for none.
    pttl: i64,
}

impl Holder {
    /// How long it has left; `None` if it never expires (no lease of bearerd's).
    pub(crate) fn expires_in(&self) -> Option<Duration> {
        u64::try_from(self.pttl).ok().map(Duration::from_millis)
    }

    /// Whether `other` is this same lease, still there.
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

/// Sealed token entries in one Redis.
pub(crate) struct RedisStore {
    client: redis::Client,
    connection: Mutex<Option<ConnectionManager>>,
    key: SealingKey,
    prefix: String,
    timeout: Duration,
}

impl RedisStore {
    /// A store on `url` (with `password`), sealing with `key`; nothing is connected yet.
    pub(crate) fn new(
        url: &str,
        password: Option<&str>,
        key: SealingKey,
        prefix: String,
        timeout: Duration,
    ) -> Result<Self, CacheError> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| CacheError::Store(format!("cache url: {e}")))?;
        if let Some(password) = password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client =
            redis::Client::open(info).map_err(|e| CacheError::Store(format!("cache url: {e}")))?;
        Ok(Self {
            client,
            connection: Mutex::new(None),
            key,
            prefix,
            timeout,
        })
    }

    fn token_key(&self, digest: &str) -> String {
        format!("{}token:{digest}", self.prefix)
    }

    fn lease_key(&self, digest: &str) -> String {
        format!("{}lease:{digest}", self.prefix)
    }

    /// The connection, made now if there is none; bounded by the timeout.
    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        let mut held = self.connection.lock().await;
        if let Some(connection) = held.as_ref() {
            return Ok(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let connection = tokio::time::timeout(
            self.timeout,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| CacheError::Store("connecting to Redis timed out".into()))?
        .map_err(|e| CacheError::Store(format!("cannot connect to Redis: {e}")))?;
        *held = Some(connection.clone());
        Ok(connection)
    }

    /// Runs one command, bounded by the timeout; a failure drops the connection, so that the
    /// next call connects again.
    async fn call<T, F, Fut>(&self, command: F) -> Result<T, CacheError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let connection = self.connection().await?;
        let outcome = match tokio::time::timeout(self.timeout, command(connection)).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => CacheError::Store(format!("Redis: {e}")),
            Err(_) => CacheError::Store(format!(
                "Redis did not answer within {}",
                humantime::format_duration(self.timeout)
            )),
        };
        *self.connection.lock().await = None;
        Err(outcome)
    }

    /// The value under `key`, at most [`MAX_ENTRY_BYTES`] and one more byte of it (so that a
    /// larger one is told apart and refused); `None` when there is no value.
    async fn read(&self, key: String) -> Result<Option<Vec<u8>>, CacheError> {
        self.call(|mut c| async move {
            redis::Script::new(READ_BOUNDED)
                .key(key)
                .arg(MAX_ENTRY_BYTES)
                .invoke_async(&mut c)
                .await
        })
        .await
    }

    /// The stored entry, if there is one; one that does not open is an error (a miss).
    pub(crate) async fn get(&self, digest: &str) -> Result<Option<Entry>, CacheError> {
        match self.read(self.token_key(digest)).await? {
            None => Ok(None),
            Some(sealed) => super::entry::decode(&sealed, Some(&self.key), digest)
                .map(Some)
                .map_err(|e| CacheError::Unreadable(format!("Redis entry: {e}"))),
        }
    }

    /// Stores `entry`, to expire with its token.
    pub(crate) async fn put(&self, digest: &str, entry: &Entry) -> Result<(), CacheError> {
        let ttl = entry
            .expires_at
            .saturating_sub(crate::jose::unix_now())
            .saturating_mul(1000);
        if ttl == 0 {
            return Ok(());
        }
        let sealed = self
            .key
            .seal(entry, digest)
            .ok_or_else(|| CacheError::Store("cannot seal the entry".into()))?;
        if sealed.len() > MAX_ENTRY_BYTES {
            return Err(CacheError::TooLarge(sealed.len()));
        }
        let key = self.token_key(digest);
        self.call(|mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(sealed)
                .arg("PX")
                .arg(ttl)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// The key entries are sealed with.
    pub(crate) fn key(&self) -> &SealingKey {
        &self.key
    }

    /// A source's refresh token entry, sealed (opened by the caller), if there is one.
    pub(crate) async fn get_refresh(&self, digest: &str) -> Result<Option<Vec<u8>>, CacheError> {
        self.read(self.token_key(digest)).await
    }

    /// Stores a refresh token entry, sealed, with no expiry: the chain outlives its tokens.
    pub(crate) async fn put_refresh(
        &self,
        digest: &str,
        entry: &super::entry::RefreshEntry,
    ) -> Result<(), CacheError> {
        let sealed = self
            .key
            .seal(entry, digest)
            .ok_or_else(|| CacheError::Store("cannot seal the entry".into()))?;
        if sealed.len() > MAX_ENTRY_BYTES {
            return Err(CacheError::TooLarge(sealed.len()));
        }
        let key = self.token_key(digest);
        self.call(|mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(sealed)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Takes the lease on fetching for `digest` for `duration`, or says what holds it.
    pub(crate) async fn lease(
        &self,
        digest: &str,
        duration: Duration,
    ) -> Result<Leased, CacheError> {
        let lease = Lease {
            key: self.lease_key(digest),
            value: crate::jose::random_id().map_err(|e| CacheError::Store(e.to_string()))?,
        };
        let (key, value) = (lease.key.clone(), lease.value.clone());
        let millis = u64::try_from(duration.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let (taken, holder, pttl): (i64, Vec<u8>, i64) = self
            .call(|mut c| async move {
                redis::Script::new(TAKE_LEASE)
                    .key(key)
                    .arg(value)
                    .arg(millis)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(if taken == 1 {
            Leased::Acquired(lease)
        } else {
            Leased::Busy(Holder {
                value: holder,
                pttl,
            })
        })
    }

    /// What holds the lease on fetching for `digest` now, if anything.
    pub(crate) async fn holder(&self, digest: &str) -> Result<Option<Holder>, CacheError> {
        let key = self.lease_key(digest);
        let (held, value, pttl): (i64, Vec<u8>, i64) = self
            .call(|mut c| async move {
                redis::Script::new(LEASE_HOLDER)
                    .key(key)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok((held == 1).then_some(Holder { value, pttl }))
    }

    /// Gives the lease back, if it is still this process's.
    pub(crate) async fn release(&self, lease: Lease) -> Result<(), CacheError> {
        self.compare_and_delete(lease.key, lease.value.into_bytes())
            .await
            .map(drop)
    }

    /// Deletes the stored token if it is still `token_hash`, so that the fleet moves on from a
    /// token an upstream rejected.
    pub(crate) async fn delete_if(
        &self,
        digest: &str,
        token_hash: &str,
    ) -> Result<bool, CacheError> {
        let key = self.token_key(digest);
        let Some(sealed) = self.read(key.clone()).await? else {
            return Ok(false);
        };
        match super::entry::decode::<Entry>(&sealed, Some(&self.key), digest) {
            Ok(entry) if entry.token_hash() == token_hash => {
                self.compare_and_delete(key, sealed).await
            }
            _ => Ok(false),
        }
    }

    async fn compare_and_delete(&self, key: String, value: Vec<u8>) -> Result<bool, CacheError> {
        let deleted: i64 = self
            .call(|mut c| async move {
                redis::Script::new(COMPARE_AND_DELETE)
                    .key(key)
                    .arg(value)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(deleted > 0)
    }
}
