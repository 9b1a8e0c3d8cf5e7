//! What a token source needs besides its settings, made before it starts so that a key or
//! certificate that cannot be used stops a start or a reload with a clear error: the TLS
//! configuration for its token endpoint (with the certificate of `tls_client_auth`) and its
//! DPoP key.

use std::sync::Arc;

use super::dpop::DpopKey;
use super::SourceKey;
use crate::config::ClientAuth;
use crate::egress::Egress;
use crate::jose::KeyError;
use crate::tls::{self, TlsError};

/// A source's TLS configuration and DPoP key.
pub(crate) struct SourceSetup {
    /// For the token endpoint.
    pub(crate) tls: rustls::ClientConfig,
    /// The key tokens are bound to, with `dpop = true`.
    pub(crate) dpop: Option<Arc<DpopKey>>,
    /// `[egress]`: the proxy the token endpoint is reached through, if any.
    pub(crate) egress: Option<Arc<Egress>>,
}

/// A source that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SetupError {
    /// Trust anchors, or the client certificate of `tls_client_auth`.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The DPoP key.
    #[error("dpop key: {0}")]
    Dpop(#[from] KeyError),
}

impl SourceSetup {
    /// Loads what `key` needs; its token endpoint is reached through `egress` when given.
    pub(crate) fn new(key: &SourceKey, egress: Option<&Arc<Egress>>) -> Result<Self, SetupError> {
        let identity = match &key.token.auth {
            ClientAuth::TlsClientAuth { identity } => Some(identity),
            _ => None,
        };
        let tls = tls::client_config(&key.tls, identity)?;
        let dpop = match &key.token.dpop {
            Some(settings) => Some(Arc::new(DpopKey::new(settings)?)),
            None => None,
        };
        Ok(Self {
            tls,
            dpop,
            egress: egress.cloned(),
        })
    }
}
