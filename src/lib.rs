//! bearerd: a sidecar that adds OAuth2 client-credentials tokens to an app's requests.
//!
//! The app sends plain HTTP to a local port; bearerd forwards it to that port's upstream with
//! `Authorization: Bearer <token>`, fetching the token by the client-credentials grant
//! (RFC 6749 §4.4) and refreshing it before it expires.
//!
//! Modules, in the order data flows through them:
//! - [`config`]: the TOML file, validated into runtime types (`config/file.rs` is the raw
//!   form); [`secret`]: the client secret, redacted everywhere;
//! - [`tls`]: trust anchors and the pooled HTTPS client used for every outbound request;
//! - [`token`]: fetch (`fetch`, `response`), refresh timing (`schedule`), and the refresher
//!   task with the handle requests read tokens through (`source`);
//! - [`proxy`]: the local listeners, request rewriting and forwarding, error answers;
//! - [`metrics`] and [`admin`]: Prometheus metrics, `/metrics`, `/healthz`, `/readyz`;
//! - [`check`]: what `bearerd --check` prints.
//!
//! [`start`] wires them together and returns a [`Running`] sidecar; tests start one
//! in-process on port 0 and read its addresses from it.

pub mod admin;
pub mod check;
pub mod config;
pub mod metrics;
pub mod proxy;
pub mod secret;
pub mod tls;
pub mod token;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use config::{Config, TlsSettings, TokenSettings};
use token::source::{self, Handle, RefreshPolicy};

/// How long in-flight requests may take to finish after a shutdown signal, below the 30 s
/// Kubernetes waits between SIGTERM and SIGKILL.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// The sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Trust anchors for an upstream could not be loaded.
    #[error("upstream {upstream:?}: {source}")]
    Tls {
        /// The upstream's name.
        upstream: String,
        /// Why.
        source: tls::TlsError,
    },
    /// A listener could not be bound.
    #[error("upstream {upstream:?}: cannot listen on {addr}: {source}")]
    Bind {
        /// The upstream's name.
        upstream: String,
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The admin listener could not be bound.
    #[error("[admin]: cannot listen on {addr}: {source}")]
    AdminBind {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Metrics could not be set up.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// An upstream URL cannot be used as a target.
    #[error("upstream {upstream:?}: {source}")]
    Target {
        /// The upstream's name.
        upstream: String,
        /// Why.
        source: proxy::rewrite::BadTarget,
    },
}

/// A started sidecar.
pub struct Running {
    admin_addr: SocketAddr,
    metrics: Arc<metrics::Metrics>,
    listeners: Vec<(String, SocketAddr)>,
    sources: Vec<(String, Handle)>,
    stop_listeners: CancellationToken,
    listener_tasks: TaskTracker,
    stop_sources: CancellationToken,
    source_tasks: TaskTracker,
}

impl Running {
    /// The address the admin listener is bound to.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// The address an upstream's listener is bound to (useful with port 0).
    pub fn local_addr(&self, upstream: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(name, _)| name == upstream)
            .map(|(_, addr)| *addr)
    }

    /// The token source of an upstream.
    pub fn token_source(&self, upstream: &str) -> Option<&Handle> {
        self.sources
            .iter()
            .find(|(name, _)| name == upstream)
            .map(|(_, handle)| handle)
    }

    /// Turns `/readyz` to 503 and stops accepting, lets in-flight requests finish (within the
    /// grace period), then stops the token refreshers and the admin listener. Returns when all
    /// of it is done.
    pub async fn shutdown(self) {
        self.stop_listeners.cancel();
        self.listener_tasks.close();
        self.listener_tasks.wait().await;
        // Only now: requests still draining above may need a token.
        self.stop_sources.cancel();
        self.source_tasks.close();
        self.source_tasks.wait().await;
    }
}

/// Starts token sources and listeners for `config`. Token sources fetch at once; listeners
/// accept at once, and requests that arrive before the first token wait for it.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    let stop_sources = CancellationToken::new();
    let source_tasks = TaskTracker::new();
    let stop_listeners = CancellationToken::new();
    let listener_tasks = TaskTracker::new();
    let metrics = Arc::new(metrics::Metrics::new()?);
    let mut admin = admin::Admin::new(Arc::clone(&metrics), stop_listeners.clone());

    // One source per distinct token settings: upstreams that would fetch the same token
    // share it. TLS settings are part of the key, as they decide which endpoint is trusted.
    type Key<'a> = (&'a TokenSettings, &'a TlsSettings);
    let mut sharing: HashMap<Key, Vec<(&str, Arc<metrics::UpstreamMetrics>)>> = HashMap::new();
    for upstream in &config.upstreams {
        sharing
            .entry((&upstream.token, &upstream.tls))
            .or_default()
            .push((&upstream.name, Arc::new(metrics.upstream(&upstream.name))));
    }
    let mut handles: HashMap<Key, Handle> = HashMap::new();

    let mut listeners = Vec::new();
    let mut sources = Vec::new();
    for upstream in &config.upstreams {
        let tls = tls::client_config(&upstream.tls).map_err(|source| StartError::Tls {
            upstream: upstream.name.clone(),
            source,
        })?;
        let key = (&upstream.token, &upstream.tls);
        let sharers = sharing.get(&key).map(Vec::as_slice).unwrap_or_default();
        let upstream_metrics = sharers
            .iter()
            .find(|(name, _)| *name == upstream.name)
            .map_or_else(
                || Arc::new(metrics.upstream(&upstream.name)),
                |(_, m)| Arc::clone(m),
            );
        let handle = match handles.get(&key) {
            Some(handle) => handle.clone(),
            None => {
                let label = sharers
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(",");
                let observers = sharers.iter().map(|(_, m)| Arc::clone(m)).collect();
                let fetcher = token::fetch::Fetcher::new(upstream.token.clone(), tls.clone());
                let handle = source::spawn(
                    label,
                    Arc::new(fetcher),
                    RefreshPolicy {
                        backoff_base: upstream.token.backoff_base,
                        backoff_cap: upstream.token.backoff_cap,
                    },
                    observers,
                    &source_tasks,
                    stop_sources.clone(),
                );
                handles.insert(key, handle.clone());
                handle
            }
        };
        let target =
            proxy::rewrite::Target::new(&upstream.url).map_err(|source| StartError::Target {
                upstream: upstream.name.clone(),
                source,
            })?;
        let client = tls::client(tls, upstream.connect_timeout);
        let listener =
            TcpListener::bind(upstream.listen)
                .await
                .map_err(|source| StartError::Bind {
                    upstream: upstream.name.clone(),
                    addr: upstream.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            upstream: upstream.name.clone(),
            addr: upstream.listen,
            source,
        })?;
        tracing::info!(upstream = %upstream.name, listen = %addr, url = %upstream.url, "listening");
        admin.watch(
            &upstream.name,
            handle.clone(),
            Arc::clone(&upstream_metrics),
        );
        let forwarding = Arc::new(proxy::Upstream {
            name: upstream.name.as_str().into(),
            target,
            token: handle.clone(),
            client,
            response_header_timeout: upstream.response_header_timeout,
            metrics: upstream_metrics,
            access_log: config.log.access,
            retry_on_401: upstream.retry_on_401,
        });
        listener_tasks.spawn(proxy::serve(
            listener,
            forwarding,
            stop_listeners.clone(),
            DEFAULT_SHUTDOWN_GRACE,
        ));
        listeners.push((upstream.name.clone(), addr));
        sources.push((upstream.name.clone(), handle));
    }

    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| StartError::AdminBind {
            addr: config.admin.listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::AdminBind {
            addr: config.admin.listen,
            source,
        })?;
    tracing::info!(listen = %admin_addr, "admin listening");
    // The admin listener outlives the proxy listeners: probes and scrapes see the drain.
    source_tasks.spawn(admin::serve(
        admin_listener,
        Arc::new(admin),
        stop_sources.clone(),
    ));

    Ok(Running {
        admin_addr,
        metrics,
        listeners,
        sources,
        stop_listeners,
        listener_tasks,
        stop_sources,
        source_tasks,
    })
}

/// Runs `config` until `shutdown` completes, then shuts down gracefully.
pub async fn run(config: &Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let running = start(config).await?;
    shutdown.await;
    tracing::info!("shutting down: no new connections, letting requests in flight finish");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
