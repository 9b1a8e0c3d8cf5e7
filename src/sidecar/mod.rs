//! The running sidecar: token sources, proxy listeners and the admin listener, started from a
//! config and changed in place by a reload.
//!
//! A config is applied in two steps. First everything that can fail is done without touching
//! what runs: TLS settings are loaded, URLs checked, new listen addresses bound. Only then is
//! anything changed, so a reload that fails leaves the old config running. Token sources
//! whose settings did not change keep their token; a listener whose address did not change
//! keeps its socket and its connections, and serves the next request with the new settings;
//! a listener that goes away stops accepting and drains the requests it has.
//!
//! What to keep, start and stop is a `plan::Plan`, worked out from the two configs alone;
//! this file carries it out.

mod apply;
mod plan;
mod series;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Admin};
use crate::config::{self, Config};
use crate::metrics::{Metrics, MetricsError};
use crate::proxy::{self, body::ReplayBudget, connection::Limits};
use crate::tls;
use crate::token::cache::{CacheSetupError, CachedFetch, Store};
use crate::token::dpop::DpopKey;
use crate::token::fetch::Fetch;
use crate::token::fetch::Fetcher;
use crate::token::metrics::NonceAt;
use crate::token::setup::{SetupError, SourceSetup};
use crate::token::source::{self, Handle, Observers, RefreshPolicy, SharedObservers};
use crate::token::SourceKey;
use plan::{ListenerKey, Serving};
pub use series::{MetricFamilies, UpstreamSeries};

/// The sidecar could not start, or a reload could not be applied.
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
    Metrics(#[from] MetricsError),
    /// `[cache]` cannot be set up.
    #[error(transparent)]
    Cache(#[from] CacheSetupError),
    /// A token source's TLS settings or DPoP key cannot be used.
    #[error("upstream {upstream:?}: {source}")]
    Source {
        /// The first upstream that uses the source.
        upstream: String,
        /// Why.
        source: SetupError,
    },
    /// An upstream URL cannot be used as a target.
    #[error("upstream {upstream:?}: {source}")]
    Target {
        /// The upstream's name.
        upstream: String,
        /// Why.
        source: proxy::rewrite::BadTarget,
    },
}

struct Source {
    handle: Handle,
    observers: SharedObservers,
    stop: CancellationToken,
    /// The key its tokens are bound to, which every proxied request's proof is signed with.
    dpop: Option<Arc<DpopKey>>,
}

struct Listener {
    /// The address bound (the real port when 0 was asked for).
    addr: SocketAddr,
    /// What it serves now.
    serving: Serving,
    current: watch::Sender<Arc<proxy::Listener>>,
    stop: CancellationToken,
}

/// A started sidecar.
pub struct Running {
    config: Config,
    metrics: MetricFamilies,
    admin: Arc<Admin>,
    admin_addr: SocketAddr,
    /// Each upstream's series, by name: kept across reloads while the name stays.
    series: HashMap<String, UpstreamSeries>,
    /// Whether anything runs yet: the first apply plans from nothing.
    started: bool,
    sources: HashMap<SourceKey, Source>,
    listeners: HashMap<ListenerKey, Listener>,
    stop_listeners: CancellationToken,
    listener_tasks: TaskTracker,
    stop_sources: CancellationToken,
    source_tasks: TaskTracker,
    /// Memory for bodies kept for a replay, shared by every listener.
    replay_budget: ReplayBudget,
    /// `[cache]`, shared by every token source.
    cache: Option<Arc<Store>>,
}

/// Starts token sources and listeners for `config`. Token sources fetch at once; listeners
/// accept at once, and requests that arrive before the first token wait for it.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    let metrics = MetricFamilies::new()?;
    let cache = match &config.cache {
        Some(settings) => {
            let store = Store::new(settings, metrics.cache_up(settings.backend()))?;
            tracing::info!(backend = settings.backend(), "token cache on");
            Some(Arc::new(store))
        }
        None => None,
    };
    let stop_listeners = CancellationToken::new();
    let stop_sources = CancellationToken::new();
    let source_tasks = TaskTracker::new();
    let admin = Arc::new(Admin::new(
        Arc::clone(&metrics.registry),
        stop_listeners.clone(),
    ));
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
    admin::warn_about_exposure(&config.admin, admin_addr);
    // The admin listener outlives the proxy listeners: probes and scrapes see the drain.
    source_tasks.spawn(admin::serve(
        admin_listener,
        Arc::clone(&admin),
        config.admin.clone(),
        stop_sources.clone(),
    ));
    let mut running = Running {
        config: config.clone(),
        metrics,
        admin,
        admin_addr,
        series: HashMap::new(),
        started: false,
        sources: HashMap::new(),
        listeners: HashMap::new(),
        stop_listeners,
        listener_tasks: TaskTracker::new(),
        stop_sources,
        source_tasks,
        replay_budget: ReplayBudget::new(config.server.replay_memory),
        cache,
    };
    if let Err(error) = running.apply(config).await {
        running.stop_sources.cancel();
        return Err(error);
    }
    Ok(running)
}

impl Running {
    /// The address the admin listener is bound to.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics.registry
    }

    /// The address an upstream's listener is bound to (useful with port 0).
    pub fn local_addr(&self, upstream: &str) -> Option<SocketAddr> {
        self.listeners
            .values()
            .find(|l| l.serving.serves(upstream))
            .map(|l| l.addr)
    }

    /// The token source of an upstream.
    pub fn token_source(&self, upstream: &str) -> Option<&Handle> {
        let config = self.config.upstreams.iter().find(|u| u.name == upstream)?;
        self.sources.get(&SourceKey::of(config)).map(|s| &s.handle)
    }

    /// Applies a new config, or leaves the running one untouched if it cannot be applied.
    /// `[admin]`, `[server]` and `[log] level`/`format` need a restart; a change to them is
    /// logged and otherwise ignored.
    pub async fn reload(&mut self, config: &Config) -> Result<(), StartError> {
        let old = &self.config;
        for (section, changed) in [
            ("[admin]", old.admin != config.admin),
            ("[server]", old.server != config.server),
            ("[cache]", old.cache != config.cache),
            (
                "[log] level and format",
                (&old.log.level, old.log.format) != (&config.log.level, config.log.format),
            ),
        ] {
            if changed {
                tracing::warn!(
                    section,
                    "changed in the config file; takes effect at restart"
                );
            }
        }
        self.apply(config).await?;
        tracing::info!(upstreams = config.upstreams.len(), "config reloaded");
        Ok(())
    }

    fn spawn_source(&self, key: &SourceKey, setup: SourceSetup) -> Source {
        let observers = SharedObservers::new(RwLock::new(Observers::default()));
        let stop = self.stop_sources.child_token();
        let counted = Arc::clone(&observers);
        let on_nonce_retry = Box::new(move || {
            if let Ok(observers) = counted.read() {
                for metrics in &observers.metrics {
                    metrics.dpop_nonce_retry(NonceAt::TokenEndpoint);
                }
            }
        });
        let fetcher = Fetcher::new(
            key.token.clone(),
            setup.tls,
            setup.dpop.clone(),
            on_nonce_retry,
        );
        let fetcher: Arc<dyn Fetch> = match &self.cache {
            Some(store) => Arc::new(CachedFetch::new(
                Arc::new(fetcher),
                Arc::clone(store),
                &key.token,
                setup.dpop.as_deref().map(DpopKey::thumbprint),
                Arc::clone(&observers),
            )),
            None => Arc::new(fetcher),
        };
        let handle = source::spawn(
            fetcher,
            RefreshPolicy::from(&key.token),
            Arc::clone(&observers),
            &self.source_tasks,
            stop.clone(),
        );
        Source {
            handle,
            observers,
            stop,
            dpop: setup.dpop,
        }
    }

    fn spawn_listener(
        &self,
        socket: TcpListener,
        addr: SocketAddr,
        serving: Serving,
        forwarding: Arc<proxy::Listener>,
    ) -> Listener {
        for upstream in &serving.routes {
            tracing::info!(upstream = %upstream.name, listen = %addr, url = %upstream.url, "listening");
            warn_about_exposure(upstream, addr);
            warn_about_key_files(upstream);
        }
        let (current, receiver) = watch::channel(forwarding);
        let stop = self.stop_listeners.child_token();
        self.listener_tasks.spawn(proxy::serve(
            socket,
            receiver,
            Limits::from(&self.config.server),
            stop.clone(),
            self.config.server.shutdown_grace,
        ));
        Listener {
            addr,
            serving,
            current,
            stop,
        }
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

/// Says at start what an operator chose to expose: a listener off loopback (only its
/// `allow_from` keeps strangers from the token), plain http to a remote host.
fn warn_about_exposure(upstream: &config::Upstream, addr: SocketAddr) {
    if !addr.ip().is_loopback() {
        let allow_from: Vec<String> = upstream
            .allow_from
            .iter()
            .flatten()
            .map(ToString::to_string)
            .collect();
        tracing::warn!(
            upstream = %upstream.name,
            listen = %addr,
            allow_from = %allow_from.join(","),
            "listener is not on loopback: peers in allow_from can call the upstream with bearerd's token"
        );
    }
    if upstream.allow_plain_http {
        tracing::warn!(upstream = %upstream.name, url = %upstream.url, "allow_plain_http: requests and the token go to the upstream unencrypted");
    }
    if upstream.token.allow_plain_http {
        tracing::warn!(upstream = %upstream.name, token_url = %upstream.token.url, "allow_plain_http: the client credentials go to the token endpoint unencrypted");
    }
}

/// Warns about key files that others than their owner may read.
fn warn_about_key_files(upstream: &config::Upstream) {
    let tls_key = upstream.tls.identity.as_ref().map(|i| i.key_file.as_path());
    for path in upstream.token.key_files().into_iter().chain(tls_key) {
        if crate::secret::readable_by_others(path) {
            tracing::warn!(upstream = %upstream.name, file = %path.display(), "key file is readable by group or others: make it readable by its owner only (chmod 600, or defaultMode: 0400 on a Kubernetes volume)");
        }
    }
}

/// Binds a listener's socket; `name` is its first route's, for the message.
async fn bind(name: &str, listen: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let failed = |source| StartError::Bind {
        upstream: name.to_owned(),
        addr: listen,
        source,
    };
    let socket = TcpListener::bind(listen).await.map_err(failed)?;
    let addr = socket.local_addr().map_err(failed)?;
    Ok((socket, addr))
}
