//! The running sidecar: token sources, proxy listeners and the admin listener, started from a
//! config and changed in place by a reload.
//!
//! A config is applied in two steps. First everything that can fail is done without touching
//! what runs: TLS settings are loaded, URLs checked, new listen addresses bound. Only then is
//! anything changed, so a reload that fails leaves the old config running. Token sources
//! whose settings did not change keep their token; a listener whose address did not change
//! keeps its socket and its connections, and serves the next request with the new settings;
//! a listener that goes away stops accepting and drains the requests it has.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Admin};
use crate::config::{self, Config, TlsSettings, TokenSettings};
use crate::metrics::{Metrics, MetricsError, UpstreamMetrics};
use crate::proxy::{self, body::ReplayBudget, rewrite::Target};
use crate::tls;
use crate::token::fetch::Fetcher;
use crate::token::source::{self, Handle, Observers, RefreshPolicy, SharedObservers};

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
    /// An upstream URL cannot be used as a target.
    #[error("upstream {upstream:?}: {source}")]
    Target {
        /// The upstream's name.
        upstream: String,
        /// Why.
        source: proxy::rewrite::BadTarget,
    },
}

/// Upstreams with equal token and TLS settings share one token source.
type SourceKey = (TokenSettings, TlsSettings);

/// A listener is known by its address; port 0 (any free port, as tests use) never matches
/// another, so such listeners are known by their upstream's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ListenerKey {
    Addr(SocketAddr),
    AnyPort(String),
}

impl ListenerKey {
    fn of(upstream: &config::Upstream) -> Self {
        if upstream.listen.port() == 0 {
            Self::AnyPort(upstream.name.clone())
        } else {
            Self::Addr(upstream.listen)
        }
    }
}

struct Source {
    handle: Handle,
    observers: SharedObservers,
    stop: CancellationToken,
}

struct Listener {
    /// The address bound (the real port when 0 was asked for).
    addr: SocketAddr,
    /// What it serves now, and the access-log setting it was built with.
    config: (config::Upstream, bool),
    current: watch::Sender<Arc<proxy::Upstream>>,
    stop: CancellationToken,
}

/// A started sidecar.
pub struct Running {
    config: Config,
    metrics: Arc<Metrics>,
    admin: Arc<Admin>,
    admin_addr: SocketAddr,
    upstream_metrics: HashMap<String, Arc<UpstreamMetrics>>,
    sources: HashMap<SourceKey, Source>,
    listeners: HashMap<ListenerKey, Listener>,
    stop_listeners: CancellationToken,
    listener_tasks: TaskTracker,
    stop_sources: CancellationToken,
    source_tasks: TaskTracker,
    /// Memory for bodies kept for a replay, shared by every listener.
    replay_budget: ReplayBudget,
}

/// Starts token sources and listeners for `config`. Token sources fetch at once; listeners
/// accept at once, and requests that arrive before the first token wait for it.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new()?);
    let stop_listeners = CancellationToken::new();
    let stop_sources = CancellationToken::new();
    let source_tasks = TaskTracker::new();
    let admin = Arc::new(Admin::new(Arc::clone(&metrics), stop_listeners.clone()));
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
        Arc::clone(&admin),
        config.admin.max_connections,
        stop_sources.clone(),
    ));
    let mut running = Running {
        config: config.clone(),
        metrics,
        admin,
        admin_addr,
        upstream_metrics: HashMap::new(),
        sources: HashMap::new(),
        listeners: HashMap::new(),
        stop_listeners,
        listener_tasks: TaskTracker::new(),
        stop_sources,
        source_tasks,
        replay_budget: ReplayBudget::new(config.server.replay_memory),
    };
    if let Err(error) = running.apply(config).await {
        running.stop_sources.cancel();
        return Err(error);
    }
    Ok(running)
}

/// What applying a config needs for one upstream, gathered before anything changes.
struct Prepared<'a> {
    upstream: &'a config::Upstream,
    tls: rustls::ClientConfig,
    target: Target,
    key: ListenerKey,
    /// A new socket, when no listener holds this address yet.
    bound: Option<(TcpListener, SocketAddr)>,
}

impl Running {
    /// The address the admin listener is bound to.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The address an upstream's listener is bound to (useful with port 0).
    pub fn local_addr(&self, upstream: &str) -> Option<SocketAddr> {
        self.listeners
            .values()
            .find(|l| l.config.0.name == upstream)
            .map(|l| l.addr)
    }

    /// The token source of an upstream.
    pub fn token_source(&self, upstream: &str) -> Option<&Handle> {
        let config = self.config.upstreams.iter().find(|u| u.name == upstream)?;
        self.sources
            .get(&(config.token.clone(), config.tls.clone()))
            .map(|s| &s.handle)
    }

    /// Applies a new config, or leaves the running one untouched if it cannot be applied.
    /// `[admin]`, `[server]` and `[log] level`/`format` need a restart; a change to them is
    /// logged and otherwise ignored.
    pub async fn reload(&mut self, config: &Config) -> Result<(), StartError> {
        let old = &self.config;
        for (section, changed) in [
            ("[admin]", old.admin != config.admin),
            ("[server]", old.server != config.server),
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

    async fn apply(&mut self, config: &Config) -> Result<(), StartError> {
        let prepared = self.prepare(config).await?;

        // Nothing below fails: the new config is applied whole.
        let mut sources: HashMap<SourceKey, Source> = HashMap::new();
        let mut listeners: HashMap<ListenerKey, Listener> = HashMap::new();
        let mut upstream_metrics = HashMap::new();
        let mut watched = Vec::new();
        let mut sharing: HashMap<SourceKey, Vec<(String, Arc<UpstreamMetrics>)>> = HashMap::new();
        for Prepared {
            upstream,
            tls,
            target,
            key,
            bound,
        } in prepared
        {
            let metrics = self
                .upstream_metrics
                .remove(&upstream.name)
                .unwrap_or_else(|| Arc::new(self.metrics.upstream(&upstream.name)));
            upstream_metrics.insert(upstream.name.clone(), Arc::clone(&metrics));
            let source_key = (upstream.token.clone(), upstream.tls.clone());
            sharing
                .entry(source_key.clone())
                .or_default()
                .push((upstream.name.clone(), Arc::clone(&metrics)));
            let handle = if let Some(source) = sources.get(&source_key) {
                source.handle.clone()
            } else {
                let source = self
                    .sources
                    .remove(&source_key)
                    .unwrap_or_else(|| self.spawn_source(upstream, tls.clone()));
                let handle = source.handle.clone();
                sources.insert(source_key, source);
                handle
            };
            watched.push(admin::Watched {
                name: upstream.name.clone(),
                token: handle.clone(),
                metrics: Arc::clone(&metrics),
            });

            let wanted = (upstream.clone(), config.log.access);
            let dial = target.dial();
            let build = || {
                Arc::new(proxy::Upstream {
                    name: upstream.name.as_str().into(),
                    target,
                    token: handle,
                    pool: Arc::new(proxy::pool::Pool::new(
                        tls::connector(tls, upstream.connect_timeout),
                        dial,
                        self.config.server.limits.max_connections,
                    )),
                    response_header_timeout: upstream.response_header_timeout,
                    metrics,
                    access_log: config.log.access,
                    retry_on_401: upstream.retry_on_401,
                    allow_from: upstream.allow_from.clone(),
                    body_idle_timeout: self.config.server.body_idle_timeout,
                    replay_budget: self.replay_budget.clone(),
                })
            };
            let listener = match (self.listeners.remove(&key), bound) {
                (Some(mut existing), _) => {
                    // Same address: keep the socket and its connections. Unchanged settings
                    // keep their client too, and with it the upstream connection pool.
                    if existing.config != wanted {
                        existing.current.send_replace(build());
                        existing.config = wanted;
                    }
                    existing
                }
                (None, Some((socket, addr))) => self.spawn_listener(socket, addr, wanted, build()),
                (None, None) => continue, // `prepare` binds every address not yet held.
            };
            listeners.insert(key, listener);
        }

        for (key, users) in &sharing {
            if let Some(source) = sources.get(key) {
                let mut observers = source
                    .observers
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                observers.label = users
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(",");
                observers.metrics = users.iter().map(|(_, m)| Arc::clone(m)).collect();
            }
        }
        // What the new config no longer has: listeners drain, sources stop, series go.
        for (_, listener) in self.listeners.drain() {
            tracing::info!(upstream = %listener.config.0.name, listen = %listener.addr, "listener removed: draining");
            listener.stop.cancel();
        }
        for (_, source) in self.sources.drain() {
            source.stop.cancel();
        }
        for (_, metrics) in self.upstream_metrics.drain() {
            self.metrics.forget(&metrics);
        }
        self.admin.watch(watched);
        self.sources = sources;
        self.listeners = listeners;
        self.upstream_metrics = upstream_metrics;
        // What a reload cannot change stays as it runs, so that new listeners get the running
        // limits and the next reload compares against what really runs.
        let mut running = config.clone();
        running.admin = self.config.admin.clone();
        running.server = self.config.server;
        running.log.level = self.config.log.level.clone();
        running.log.format = self.config.log.format;
        self.config = running;
        Ok(())
    }

    /// Everything that can fail, done before anything changes.
    async fn prepare<'a>(&self, config: &'a Config) -> Result<Vec<Prepared<'a>>, StartError> {
        let mut prepared = Vec::with_capacity(config.upstreams.len());
        for upstream in &config.upstreams {
            let tls = tls::client_config(&upstream.tls).map_err(|source| StartError::Tls {
                upstream: upstream.name.clone(),
                source,
            })?;
            let target = Target::new(&upstream.url).map_err(|source| StartError::Target {
                upstream: upstream.name.clone(),
                source,
            })?;
            let key = ListenerKey::of(upstream);
            let bound = if self.listeners.contains_key(&key) {
                None
            } else {
                // Dropped, and so closed again, if a later step fails.
                Some(bind(upstream).await?)
            };
            prepared.push(Prepared {
                upstream,
                tls,
                target,
                key,
                bound,
            });
        }
        Ok(prepared)
    }

    fn spawn_source(&self, upstream: &config::Upstream, tls: rustls::ClientConfig) -> Source {
        let observers = SharedObservers::new(RwLock::new(Observers::default()));
        let stop = self.stop_sources.child_token();
        let handle = source::spawn(
            Arc::new(Fetcher::new(upstream.token.clone(), tls)),
            RefreshPolicy {
                backoff_base: upstream.token.backoff_base,
                backoff_cap: upstream.token.backoff_cap,
            },
            Arc::clone(&observers),
            &self.source_tasks,
            stop.clone(),
        );
        Source {
            handle,
            observers,
            stop,
        }
    }

    fn spawn_listener(
        &self,
        socket: TcpListener,
        addr: SocketAddr,
        wanted: (config::Upstream, bool),
        forwarding: Arc<proxy::Upstream>,
    ) -> Listener {
        let upstream = &wanted.0;
        tracing::info!(upstream = %upstream.name, listen = %addr, url = %upstream.url, "listening");
        warn_about_exposure(upstream, addr);
        let (current, receiver) = watch::channel(forwarding);
        let stop = self.stop_listeners.child_token();
        self.listener_tasks.spawn(proxy::serve(
            socket,
            receiver,
            self.config.server.limits,
            stop.clone(),
            self.config.server.shutdown_grace,
        ));
        Listener {
            addr,
            config: wanted,
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

async fn bind(upstream: &config::Upstream) -> Result<(TcpListener, SocketAddr), StartError> {
    let failed = |source| StartError::Bind {
        upstream: upstream.name.clone(),
        addr: upstream.listen,
        source,
    };
    let socket = TcpListener::bind(upstream.listen).await.map_err(failed)?;
    let addr = socket.local_addr().map_err(failed)?;
    Ok((socket, addr))
}
