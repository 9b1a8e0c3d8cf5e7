//! Outbound HTTP: trust anchors from `[upstream.tls]` and the pooled HTTPS client built on them.
//!
//! Token endpoints are reached through [`client`], hyper-util's pooled client; upstreams
//! through `proxy::pool` over the same [`connector`]. Both go over hyper-rustls, speaking
//! HTTP/2 where the server offers it by ALPN and HTTP/1.1 otherwise, and plain HTTP for
//! `http://` URLs.

mod identity;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body::Body;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

use crate::config::{self, Roots, TlsSettings};
use crate::egress::{Dialer, Egress};
use crate::files::{self, Content, FileError};
pub(crate) use identity::{Identity, Loaded as LoadedIdentity};

/// The pooled client used for token requests.
pub(crate) type HttpsClient<B> = Client<Connector, B>;
/// TCP (directly or through the `[egress]` proxy's tunnel), then TLS where the URL says
/// `https`.
pub(crate) type Connector = HttpsConnector<Dialer>;

/// How long an idle pooled connection is kept. Below the 60 s or more that common servers and
/// load balancers allow, so that bearerd closes first rather than reusing a dying connection.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// Trust anchors that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A certificate, key or CA file is missing, not a regular file, or over its size limit.
    #[error(transparent)]
    File(#[from] FileError),
    /// The PEM file is malformed.
    #[error("cannot read ca_file {}: {source}", path.display())]
    CaFile {
        /// The configured path.
        path: PathBuf,
        /// What went wrong.
        source: rustls::pki_types::pem::Error,
    },
    /// The PEM file has no `CERTIFICATE` block.
    #[error("ca_file {} holds no PEM certificate", path.display())]
    CaFileEmpty {
        /// The configured path.
        path: PathBuf,
    },
    /// A certificate in the file is not a usable trust anchor.
    #[error("ca_file {}: certificate #{index} is not a usable trust anchor: {source}", path.display())]
    CaCertificate {
        /// The configured path.
        path: PathBuf,
        /// 1-based position in the file.
        index: usize,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// `roots = "native"` found no usable certificate in the system's store.
    #[error("roots = \"native\": no usable certificate in the system's trust store ({0})")]
    NativeRoots(String),
    /// A client certificate or its key could not be read or used.
    #[error("client certificate: {}: {reason}", path.display())]
    Identity {
        /// The file at fault.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the rustls client configuration for `settings`, presenting `identity` (a client
/// certificate) when given.
pub(crate) fn client_config(
    settings: &TlsSettings,
    identity: Option<&config::Identity>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match settings.roots {
        Roots::Webpki => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Roots::Native => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "the store is empty".to_owned(), ToString::to_string);
                return Err(TlsError::NativeRoots(why));
            }
        }
        Roots::None => {}
    }
    if let Some(path) = &settings.ca_file {
        let pem = files::read_sync(path, Content::CaBundle)?;
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|source| TlsError::CaFile {
                path: path.clone(),
                source,
            })?;
            count += 1;
            roots.add(cert).map_err(|source| TlsError::CaCertificate {
                path: path.clone(),
                index: count,
                source,
            })?;
        }
        if count == 0 {
            return Err(TlsError::CaFileEmpty { path: path.clone() });
        }
    }
    // An explicit provider, rather than the process default, so that another crate in the
    // build enabling a second provider cannot make rustls refuse to pick one.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    Ok(match identity {
        Some(files) => config.with_client_cert_resolver(Arc::new(Identity::new(files)?)),
        None => config.with_no_client_auth(),
    })
}

/// A pooled client over `tls`, for bodies of type `B`.
pub(crate) fn client<B>(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    egress: Option<&Arc<Egress>>,
) -> HttpsClient<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector(tls, connect_timeout, egress))
}

/// The connector under [`client`]: TCP with `connect_timeout` (through `egress`'s proxy for
/// the hosts it covers), then TLS for `https` URLs, offering HTTP/2 and HTTP/1.1 by ALPN.
pub(crate) fn connector(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    egress: Option<&Arc<Egress>>,
) -> Connector {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(tcp(connect_timeout, egress))
}

/// [`connector`] offering HTTP/1.1 alone by ALPN (an upstream's `protocol = "http1"`).
pub(crate) fn http1_connector(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    egress: Option<&Arc<Egress>>,
) -> Connector {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp(connect_timeout, egress))
}

/// TCP connections for any scheme (TLS is the layer above), without Nagle's delay; through
/// `egress` when given.
pub(crate) fn tcp(connect_timeout: Duration, egress: Option<&Arc<Egress>>) -> Dialer {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    Dialer::new(http, egress, connect_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let settings = |ca_file: &std::path::Path| TlsSettings {
            identity: None,
            roots: Roots::None,
            ca_file: Some(ca_file.to_owned()),
        };
        let message = client_config(&settings(&missing), None)
            .unwrap_err()
            .to_string();
        assert!(message.contains("missing.pem"), "{message}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let message = client_config(&settings(&empty), None)
            .unwrap_err()
            .to_string();
        assert!(message.contains("holds no PEM certificate"), "{message}");
    }

    #[test]
    fn webpki_roots_need_no_file() {
        let settings = TlsSettings {
            identity: None,
            roots: Roots::Webpki,
            ca_file: None,
        };
        assert!(client_config(&settings, None).is_ok());
    }
}
