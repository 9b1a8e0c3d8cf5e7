//! Leaf certificates: one per routed host, minted from the CA on first use, each with one
//! subject alternative name (DNS or IP), kept in a bounded cache and renewed well before it
//! expires. Only a name the caller has already matched to a route is ever minted: a
//! handshake for any other name fails before this is asked.
//!
//! Minting (a key pair and an ECDSA signature, about a millisecond) runs on Tokio's blocking
//! pool, not on a worker that other connections' requests wait for. One mint per host at a
//! time: handshakes for a host whose leaf is being minted wait for that mint's outcome rather
//! than starting their own, so a burst of tunnels to a new host signs once. The mint is a
//! task of its own, so a handshake that gives up (its deadline, the app closing) neither
//! stops it nor makes the next one start over.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;
use tokio::sync::watch;

use super::ca::{self, Ca};

/// How long a leaf is valid: a day. Minting is cheap; a short life bounds a leaked leaf key.
pub(crate) const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);
/// A cached leaf older than this is replaced at its next use: well before it expires, so that
/// a handshake never presents one about to.
pub(crate) const LEAF_RENEW_AFTER: Duration = Duration::from_secs(16 * 60 * 60);
/// How many hosts' leaves are kept: the least recently used goes first beyond it.
pub(crate) const LEAF_CACHE_CAPACITY: usize = 1000;
/// The protocols offered by ALPN inside a tunnel: HTTP/2 first, as browsers and gRPC want.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A leaf could not be minted.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot mint a certificate: {0}")]
pub(crate) struct MintError(Arc<str>);

impl MintError {
    fn new(reason: &dyn std::fmt::Display) -> Self {
        Self(reason.to_string().into())
    }
}

struct Entry {
    config: Arc<ServerConfig>,
    minted: SystemTime,
    /// The cache's clock when last used, for eviction.
    used: u64,
}

/// What a mint sends once it has ended.
type Minted = Option<Result<Arc<ServerConfig>, MintError>>;

/// The leaves of one CA, by host.
pub(crate) struct Leaves {
    shared: Arc<Shared>,
}

/// What a mint on the blocking pool needs too.
struct Shared {
    ca: Arc<Ca>,
    cache: Mutex<Cache>,
    /// [`LEAF_CACHE_CAPACITY`], smaller in tests.
    capacity: usize,
    /// Counts each leaf minted.
    issued: IntCounter,
}

struct Cache {
    entries: HashMap<Box<str>, Entry>,
    /// The mints under way, by host: where their outcome will be sent.
    minting: HashMap<Box<str>, watch::Receiver<Minted>>,
    clock: u64,
}

impl Leaves {
    /// An empty cache of leaves from `ca`, counting each one minted in `issued`.
    pub(crate) fn new(ca: Arc<Ca>, issued: IntCounter) -> Self {
        Self::with_capacity(ca, issued, LEAF_CACHE_CAPACITY)
    }

    fn with_capacity(ca: Arc<Ca>, issued: IntCounter, capacity: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                ca,
                cache: Mutex::new(Cache {
                    entries: HashMap::new(),
                    minting: HashMap::new(),
                    clock: 0,
                }),
                capacity: capacity.max(1),
                issued,
            }),
        }
    }

    /// The TLS settings presenting the leaf of `host` (lowercase; an IPv6 address without
    /// brackets), minting it on the blocking pool when there is none or it is due for renewal,
    /// or waiting for the mint of it already under way.
    pub(crate) async fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, MintError> {
        let now = SystemTime::now();
        let mut outcome = {
            let mut cache = self
                .shared
                .cache
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            cache.clock += 1;
            let clock = cache.clock;
            if let Some(entry) = cache.entries.get_mut(host) {
                let fresh = now
                    .duration_since(entry.minted)
                    .is_ok_and(|age| age < LEAF_RENEW_AFTER);
                if fresh {
                    entry.used = clock;
                    return Ok(Arc::clone(&entry.config));
                }
            }
            match cache.minting.get(host) {
                Some(outcome) => outcome.clone(),
                None => {
                    let (send, outcome) = watch::channel(None);
                    cache.minting.insert(host.into(), outcome.clone());
                    let mint = Mint {
                        shared: Arc::clone(&self.shared),
                        host: host.into(),
                        outcome: outcome.clone(),
                    };
                    drop(cache);
                    tokio::task::spawn_blocking(move || mint.run(now, &send));
                    outcome
                }
            }
        };
        let ended = outcome.wait_for(Option::is_some).await;
        match ended.as_deref() {
            Ok(Some(minted)) => minted.clone(),
            // The mint's task ended without an outcome (the runtime is shutting down).
            Ok(None) | Err(_) => Err(MintError::new(&"the mint did not finish")),
        }
    }

    /// How many leaves are cached.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shared
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len()
    }
}

/// One mint of a host's leaf, on the blocking pool. Dropped, run or not, it takes itself off
/// the mints under way, so that one that never ran (or panicked) does not leave its host's
/// handshakes waiting for it.
struct Mint {
    shared: Arc<Shared>,
    host: Box<str>,
    /// Tells this mint from a later one of the same host.
    outcome: watch::Receiver<Minted>,
}

impl Mint {
    /// Mints, keeps the leaf in the cache and tells whoever waits.
    fn run(self, now: SystemTime, send: &watch::Sender<Minted>) {
        let minted = self.shared.mint(&self.host, now).map(Arc::new);
        if let Ok(config) = &minted {
            self.shared.issued.inc();
            self.shared.keep(&self.host, config, now);
        }
        // Off the list before the outcome is sent: a handshake that comes later finds the
        // leaf in the cache (or, after a failure, starts a mint of its own).
        drop(self);
        send.send_replace(Some(minted));
    }
}

impl Drop for Mint {
    fn drop(&mut self) {
        let mut cache = self
            .shared
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let ours = cache
            .minting
            .get(&self.host)
            .is_some_and(|outcome| outcome.same_channel(&self.outcome));
        if ours {
            cache.minting.remove(&self.host);
        }
    }
}

impl Shared {
    /// Keeps `config` as the leaf of `host`, evicting the least recently used beyond the
    /// capacity.
    fn keep(&self, host: &str, config: &Arc<ServerConfig>, now: SystemTime) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.entries.len() >= self.capacity && !cache.entries.contains_key(host) {
            let oldest = cache
                .entries
                .iter()
                .min_by_key(|(_, entry)| entry.used)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                cache.entries.remove(&oldest);
            }
        }
        let used = cache.clock;
        cache.entries.insert(
            host.into(),
            Entry {
                config: Arc::clone(config),
                minted: now,
                used,
            },
        );
    }

    fn mint(&self, host: &str, now: SystemTime) -> Result<ServerConfig, MintError> {
        let failed = |e: &dyn std::fmt::Display| MintError::new(e);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| failed(&e))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        params.subject_alt_names = vec![match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().map_err(|e| failed(&e))?),
        }];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        // An hour back, for clocks of apps a little behind bearerd's.
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + LEAF_VALIDITY).into();
        params.serial_number = Some(ca::serial());
        let leaf = params
            .signed_by(&key, &self.ca.issuer)
            .map_err(|e| failed(&e))?;
        let chain = vec![leaf.der().clone(), self.ca.cert.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| failed(&e))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| failed(&e))?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future as _;

    fn ca(hosts: &[&str]) -> Arc<Ca> {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::config::Intercept {
            ca_cert_file: dir.path().join("ca.pem"),
            ca_key_file: dir.path().join("ca.key"),
            ca_bundle_file: None,
            passthrough: Vec::new(),
            handshake_timeout: Duration::from_secs(10),
        };
        Arc::new(ca::create(&settings, hosts.iter().copied()).unwrap())
    }

    fn counter() -> IntCounter {
        IntCounter::new("issued", "leaves minted").unwrap()
    }

    /// Whether asking for `host` minted a leaf.
    async fn mints(leaves: &Leaves, host: &str) -> bool {
        let before = leaves.shared.issued.get();
        leaves.server_config(host).await.unwrap();
        leaves.shared.issued.get() > before
    }

    #[tokio::test]
    async fn many_names_keep_at_most_capacity_leaves_the_least_recently_used_going_first() {
        let leaves = Leaves::with_capacity(ca(&["*.example"]), counter(), 3);
        for name in ["a.example", "b.example", "c.example"] {
            assert!(mints(&leaves, name).await);
        }
        // a is used again, so b is the least recently used when d comes.
        assert!(!mints(&leaves, "a.example").await);
        assert!(mints(&leaves, "d.example").await);
        assert_eq!(leaves.len(), 3);
        assert!(!mints(&leaves, "a.example").await);
        assert!(!mints(&leaves, "c.example").await);
        assert!(mints(&leaves, "b.example").await, "b was evicted");
        for i in 0..20 {
            leaves
                .server_config(&format!("n{i}.example"))
                .await
                .unwrap();
        }
        assert_eq!(leaves.len(), 3);
    }

    #[tokio::test]
    async fn a_leaf_is_minted_once_per_host_offering_h2_and_http1() {
        let leaves = Leaves::new(ca(&["api.example", "10.0.0.1"]), counter());
        let first = leaves.server_config("api.example").await.unwrap();
        let again = leaves.server_config("api.example").await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(leaves.shared.issued.get(), 1);
        assert_eq!(first.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(mints(&leaves, "10.0.0.1").await);
        assert_eq!(leaves.len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshakes_for_a_new_host_at_once_wait_for_one_mint() {
        let leaves = Arc::new(Leaves::new(ca(&["api.example"]), counter()));
        let asked = (0..16).map(|_| {
            let leaves = Arc::clone(&leaves);
            tokio::spawn(async move { leaves.server_config("api.example").await.unwrap() })
        });
        let mut configs = Vec::new();
        for handle in asked.collect::<Vec<_>>() {
            configs.push(handle.await.unwrap());
        }
        assert_eq!(leaves.shared.issued.get(), 1);
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
        assert!(leaves.shared.cache.lock().unwrap().minting.is_empty());
    }

    #[tokio::test]
    async fn a_handshake_that_gives_up_leaves_the_mint_to_finish_for_the_next() {
        let leaves = Leaves::new(ca(&["api.example"]), counter());
        // Polled once: the mint is started, then the handshake is dropped.
        {
            let asking = std::pin::pin!(leaves.server_config("api.example"));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let _ = asking.poll(&mut cx);
        }
        leaves.server_config("api.example").await.unwrap();
        assert_eq!(leaves.shared.issued.get(), 1);
    }

    #[tokio::test]
    async fn a_leaf_past_its_renewal_age_is_replaced_at_its_next_use() {
        let leaves = Leaves::new(ca(&["api.example"]), counter());
        let first = leaves.server_config("api.example").await.unwrap();
        {
            let mut cache = leaves.shared.cache.lock().unwrap();
            let entry = cache.entries.get_mut("api.example").unwrap();
            entry.minted -= LEAF_RENEW_AFTER + Duration::from_secs(1);
        }
        let renewed = leaves.server_config("api.example").await.unwrap();
        assert_eq!(leaves.shared.issued.get(), 2);
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert_eq!(leaves.len(), 1);
    }
}
