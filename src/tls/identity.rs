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
use crate::files::{self as bounded, Content};

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
        // The bounded reader: this also runs in rustls's callback at a handshake, on the
        // runtime's thread, where a FIFO must be refused rather than waited on.
        let pem = bounded::read_sync(&files.cert_file, Content::Certificate)?;
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| failed(&files.cert_file, e.to_string()))?;
        if chain.is_empty() {
            return Err(failed(&files.cert_file, "holds no PEM certificate".into()));
        }
        let pem = bounded::read_sync(&files.key_file, Content::Key)?;
        let key = PrivateKeyDer::from_pem_slice(&pem)
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
            .map(|cert| crate::jose::sha256_base64url(cert.as_ref()))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key, written to `dir`; returns the files.
    fn write_identity(dir: &Path) -> config::Identity {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["bearerd-client".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let files = config::Identity {
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
        };
        std::fs::write(&files.cert_file, cert.pem()).unwrap();
        std::fs::write(&files.key_file, key.serialize_pem()).unwrap();
        files
    }

    fn presented(identity: &Identity) -> Vec<u8> {
        identity.current().cert[0].as_ref().to_vec()
    }

    #[test]
    fn a_rotated_certificate_is_used_once_it_is_looked_at_again() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_identity(dir.path());
        let identity = Identity::new(&files).unwrap();
        let first = presented(&identity);

        // cert-manager writes a new pair; a half-written one (a key without its certificate)
        // is never used.
        std::fs::write(&files.cert_file, "not a certificate").unwrap();
        let backdate = |identity: &Identity| {
            let mut current = identity.current.lock().unwrap();
            current.checked = Instant::now() - RECHECK_INTERVAL;
            // Modification times may not have moved within the clock's resolution.
            current.loaded.stamps = (None, None);
        };
        backdate(&identity);
        assert_eq!(
            presented(&identity),
            first,
            "a broken pair keeps the old one"
        );

        write_identity(dir.path());
        assert_eq!(presented(&identity), first, "not looked at again yet");
        backdate(&identity);
        let second = presented(&identity);
        assert_ne!(second, first);
        assert_eq!(Loaded::read(&files).unwrap().key.cert[0].as_ref(), second);
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let (one, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut files = write_identity(one.path());
        files.key_file = write_identity(other.path()).key_file;
        let message = Identity::new(&files).unwrap_err().to_string();
        assert!(message.contains("cannot be used with"), "{message}");
        assert!(message.contains("tls.key"), "{message}");
    }
}
