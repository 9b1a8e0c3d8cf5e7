//! Leaf certificates: one per routed host, minted from the CA on first use, each with one
//! subject alternative name (DNS or IP), kept in a bounded cache and renewed well before it
//! expires. Only a name the caller has already matched to a route is ever minted: a
//! handshake for any other name fails before this is asked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

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
#[derive(Debug, thiserror::Error)]
#[error("cannot mint a certificate: {0}")]
pub(crate) struct MintError(String);

struct Entry {
    config: Arc<ServerConfig>,
    minted: SystemTime,
    /// The cache's clock when last used, for eviction.
    used: u64,
}

/// The leaves of one CA, by host.
pub(crate) struct Leaves {
    ca: Arc<Ca>,
    cache: Mutex<Cache>,
    /// [`LEAF_CACHE_CAPACITY`], smaller in tests.
    capacity: usize,
}

struct Cache {
    entries: HashMap<Box<str>, Entry>,
    clock: u64,
}

impl Leaves {
    /// An empty cache of leaves from `ca`.
    pub(crate) fn new(ca: Arc<Ca>) -> Self {
        Self::with_capacity(ca, LEAF_CACHE_CAPACITY)
    }

    fn with_capacity(ca: Arc<Ca>, capacity: usize) -> Self {
        Self {
            ca,
            cache: Mutex::new(Cache {
                entries: HashMap::new(),
                clock: 0,
            }),
            capacity: capacity.max(1),
        }
    }

    /// The TLS settings presenting the leaf of `host` (lowercase; an IPv6 address without
    /// brackets), minting it when there is none or it is due for renewal. The second value
    /// says whether one was minted.
    pub(crate) fn server_config(&self, host: &str) -> Result<(Arc<ServerConfig>, bool), MintError> {
        let now = SystemTime::now();
        {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            cache.clock += 1;
            let clock = cache.clock;
            if let Some(entry) = cache.entries.get_mut(host) {
                let fresh = now
                    .duration_since(entry.minted)
                    .is_ok_and(|age| age < LEAF_RENEW_AFTER);
                if fresh {
                    entry.used = clock;
                    return Ok((Arc::clone(&entry.config), false));
                }
            }
        }
        // Minted outside the lock: two handshakes for a new host may both mint, and the
        // second replaces the first; neither waits for the other's signature.
        let config = Arc::new(self.mint(host, now)?);
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
                config: Arc::clone(&config),
                minted: now,
                used,
            },
        );
        Ok((config, true))
    }

    /// How many leaves are cached.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len()
    }

    fn mint(&self, host: &str, now: SystemTime) -> Result<ServerConfig, MintError> {
        let failed = |e: &dyn std::fmt::Display| MintError(e.to_string());
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

    #[test]
    fn many_names_keep_at_most_capacity_leaves_the_least_recently_used_going_first() {
        let leaves = Leaves::with_capacity(ca(&["*.example"]), 3);
        for name in ["a.example", "b.example", "c.example"] {
            assert!(leaves.server_config(name).unwrap().1);
        }
        // a is used again, so b is the least recently used when d comes.
        assert!(!leaves.server_config("a.example").unwrap().1);
        assert!(leaves.server_config("d.example").unwrap().1);
        assert_eq!(leaves.len(), 3);
        assert!(!leaves.server_config("a.example").unwrap().1);
        assert!(!leaves.server_config("c.example").unwrap().1);
        assert!(
            leaves.server_config("b.example").unwrap().1,
            "b was evicted"
        );
        for i in 0..20 {
            leaves.server_config(&format!("n{i}.example")).unwrap();
        }
        assert_eq!(leaves.len(), 3);
    }

    #[test]
    fn a_leaf_is_minted_once_per_host_offering_h2_and_http1() {
        let leaves = Leaves::new(ca(&["api.example", "10.0.0.1"]));
        let (first, minted) = leaves.server_config("api.example").unwrap();
        assert!(minted);
        let (again, minted) = leaves.server_config("api.example").unwrap();
        assert!(!minted);
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(first.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(leaves.server_config("10.0.0.1").unwrap().1);
        assert_eq!(leaves.len(), 2);
    }

    #[test]
    fn a_leaf_past_its_renewal_age_is_replaced_at_its_next_use() {
        let leaves = Leaves::new(ca(&["api.example"]));
        let (first, _) = leaves.server_config("api.example").unwrap();
        {
            let mut cache = leaves.cache.lock().unwrap();
            let entry = cache.entries.get_mut("api.example").unwrap();
            entry.minted -= LEAF_RENEW_AFTER + Duration::from_secs(1);
        }
        let (renewed, minted) = leaves.server_config("api.example").unwrap();
        assert!(minted);
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert_eq!(leaves.len(), 1);
    }
}
