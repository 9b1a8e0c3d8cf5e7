//! The Redis backend: one token per source for a whole fleet, sealed with AES-256-GCM (Redis
//! is shared; the key never leaves the pods), with a TTL of the token's remaining lifetime,
//! and a lease so that one process fetches while the others wait for what it stores.
//!
//! Every call is bounded by `[cache] timeout`; a failure is reported to the caller, which
//! fetches for itself. The connection is made at first use and made again after a failure,
//! so that bearerd starts, and serves, while Redis is away.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use tokio::sync::Mutex;

use super::entry::{Entry, SealingKey};
use super::CacheError;

/// Deletes a key only if it still holds the value given: releasing a lease, or deleting a
/// token, must not remove what another process has put there since.
const COMPARE_AND_DELETE: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// A lease on fetching a source's token, held until released or expired.
pub(crate) struct Lease {
    key: String,
    value: String,
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

    /// The stored entry, if there is one; one that does not open is an error (a miss).
    pub(crate) async fn get(&self, digest: &str) -> Result<Option<Entry>, CacheError> {
        let key = self.token_key(digest);
        let value: Option<Vec<u8>> = self.call(|mut c| async move { c.get(key).await }).await?;
        match value {
            None => Ok(None),
            Some(sealed) => self
                .key
                .open(&sealed, digest)
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

    /// Takes the lease on fetching for `digest` for `duration`, or `None` if another process
    /// holds it.
    pub(crate) async fn lease(
        &self,
        digest: &str,
        duration: Duration,
    ) -> Result<Option<Lease>, CacheError> {
        let lease = Lease {
            key: self.lease_key(digest),
            value: crate::jose::random_id().map_err(|e| CacheError::Store(e.to_string()))?,
        };
        let (key, value) = (lease.key.clone(), lease.value.clone());
        let millis = u64::try_from(duration.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let taken: Option<String> = self
            .call(|mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(taken.map(|_| lease))
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
        let lookup = key.clone();
        let value: Option<Vec<u8>> = self
            .call(|mut c| async move { c.get(lookup).await })
            .await?;
        let Some(sealed) = value else {
            return Ok(false);
        };
        match self.key.open(&sealed, digest) {
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
