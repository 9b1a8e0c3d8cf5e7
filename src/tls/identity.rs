//! A client certificate presented in the TLS handshake (RFC 8705 `tls_client_auth`, and mTLS
//! to an upstream), re-read when its files change, so that a certificate rotated by
//! cert-manager is used without a restart.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use super::TlsError;
use crate::config;

/// How often, at most, the files are looked at again (one `stat` each, at a handshake).
const RECHECK_INTERVAL: Duration = Duration::from_secs(10);

/// A certificate and key as loaded.
pub(crate) struct Loaded {
    key: Arc<CertifiedKey>,
    /// The files' modification times when they were read.
    stamps: (Option<SystemTime>, Option<SystemTime>),
}

impl Loaded {
    /// Reads and checks the certificate chain and its key (which must match).
    pub(crate) fn read(files: &config::Identity) -> Result<Self, TlsError> {
        let stamps = stamps(files);
        let failed = |path: &Path, reason: String| TlsError::Identity {
            path: path.to_owned(),
            reason,
        };
        let chain = CertificateDer::pem_file_iter(&files.cert_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| failed(&files.cert_file, e.to_string()))?;
        if chain.is_empty() {
            return Err(failed(&files.cert_file, "holds no PEM certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_file(&files.key_file)
            .map_err(|e| failed(&files.key_file, e.to_string()))?;
        let provider = rustls::crypto::ring::default_provider();
        let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            failed(
                &files.key_file,
                format!("cannot be used with {}: {e}", files.cert_file.display()),
            )
        })?;
        Ok(Self {
            key: Arc::new(key),
            stamps,
        })
    }

    /// base64url SHA-256 of the certificate (its `x5t#S256`, which a certificate-bound token's
    /// `cnf` names).
    pub(crate) fn fingerprint(&self) -> String {
        self.key
            .cert
            .first()
            .map(|cert| crate::token::jws::sha256_base64url(cert.as_ref()))
            .unwrap_or_default()
    }
}

fn stamps(files: &config::Identity) -> (Option<SystemTime>, Option<SystemTime>) {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    (modified(&files.cert_file), modified(&files.key_file))
}

/// The client certificate rustls asks for at each handshake: the one loaded last, read
/// again first when the files have changed.
#[derive(Debug)]
pub(crate) struct Identity {
    files: config::Identity,
    current: Mutex<Current>,
}

struct Current {
    loaded: Loaded,
    checked: Instant,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Current { .. }")
    }
}

impl Identity {
    /// Loads `files` now: a certificate that cannot be used is an error at start.
    pub(crate) fn new(files: &config::Identity) -> Result<Self, TlsError> {
        Ok(Self {
            current: Mutex::new(Current {
                loaded: Loaded::read(files)?,
                checked: Instant::now(),
            }),
            files: files.clone(),
        })
    }

    /// The certificate to present: the loaded one, or the files' new content if they changed
    /// since. A change that cannot be loaded (a half-written rotation) keeps the old one.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.checked.elapsed() >= RECHECK_INTERVAL {
            current.checked = Instant::now();
            if stamps(&self.files) != current.loaded.stamps {
                match Loaded::read(&self.files) {
                    Ok(loaded) => {
                        tracing::info!(
                            cert_file = %self.files.cert_file.display(),
                            sha256 = %loaded.fingerprint(),
                            "client certificate changed: using the new one"
                        );
                        current.loaded = loaded;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "client certificate changed but cannot be loaded; the old one stays");
                        current.loaded.stamps = stamps(&self.files);
                    }
                }
            }
        }
        Arc::clone(&current.loaded.key)
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
