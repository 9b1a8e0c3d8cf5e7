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
//! What to keep, start and stop is a [`plan::Plan`], worked out from the two configs alone;
//! this file carries it out.

mod plan;

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
use crate::proxy::metrics::{ProxyMetrics, RouteSeries};
use crate::proxy::{self, body::ReplayBudget, connection::Limits, rewrite::Target};
use crate::tls;
use crate::token::fetch::Fetcher;
use crate::token::metrics::{TokenMetrics, TokenSeries};
use crate::token::source::{self, Handle, Observers, RefreshPolicy, SharedObservers};
use crate::token::SourceKey;
use plan::{ListenerKey, Plan, Serving, Step};

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

/// Every metric family, each registered by the part that owns it.
pub struct MetricFamilies {
    /// The registry they are in, which `/metrics` renders.
    pub registry: Arc<Metrics>,
    token: TokenMetrics,
    proxy: ProxyMetrics,
}

/// One upstream's series in each family.
pub struct UpstreamSeries {
    /// What its token source reports.
    pub token: Arc<TokenSeries>,
    /// What its listener and route report.
    pub proxy: Arc<RouteSeries>,
}

impl MetricFamilies {
    /// A registry with every family registered.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Metrics::new()?;
        Ok(Self {
            token: TokenMetrics::register(&registry)?,
            proxy: ProxyMetrics::register(&registry)?,
            registry: Arc::new(registry),
        })
    }

    /// The series of upstream `name`, exported (at 0) from now on.
    pub fn upstream(&self, name: &str) -> UpstreamSeries {
        UpstreamSeries {
            token: Arc::new(self.token.series(name)),
            proxy: Arc::new(self.proxy.series(name)),
        }
    }

    /// Stops exporting the series of an upstream that a reload removed.
    pub fn forget(&self, series: &UpstreamSeries) {
        self.token.forget(&series.token);
        self.proxy.forget(&series.proxy);
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
}

/// Starts token sources and listeners for `config`. Token sources fetch at once; listeners
/// accept at once, and requests that arrive before the first token wait for it.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    let metrics = MetricFamilies::new()?;
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
        series: HashMap::new(),
        started: false,
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

/// What applying a config needs for one listener, gathered before anything changes.
struct Prepared {
    tls: rustls::ClientConfig,
    target: Target,
    /// A new socket, when the plan starts the listener.
    bound: Option<(TcpListener, SocketAddr)>,
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
            .find(|l| l.serving.upstream.name == upstream)
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
        let plan = Plan::between(self.started.then_some(&self.config), config);
        let mut prepared = self.prepare(&plan).await?;

        // Nothing below fails: the new config is applied whole.
        for name in &plan.gone {
            if let Some(series) = self.series.remove(name) {
                self.metrics.forget(&series);
            }
        }
        for upstream in &config.upstreams {
            if !self.series.contains_key(&upstream.name) {
                let series = self.metrics.upstream(&upstream.name);
                self.series.insert(upstream.name.clone(), series);
            }
        }
        let mut sources = HashMap::with_capacity(plan.sources.len());
        for wanted in &plan.sources {
            let source = match (wanted.step, self.sources.remove(&wanted.key)) {
                (Step::Keep, Some(running)) => running,
                // The TLS settings are part of the key: any user's prepared config will do.
                _ => self.spawn_source(&wanted.key, prepared[&wanted.users[0].name].tls.clone()),
            };
            self.observe(&source, &wanted.users);
            sources.insert(wanted.key.clone(), source);
        }
        let mut listeners = HashMap::with_capacity(plan.listeners.len());
        let mut watched = Vec::with_capacity(plan.listeners.len());
        for wanted in plan.listeners {
            let upstream = wanted.upstream;
            let series = &self.series[&upstream.name];
            let token = sources[&SourceKey::of(upstream)].handle.clone();
            watched.push(admin::Watched {
                name: upstream.name.clone(),
                token: token.clone(),
                metrics: Arc::clone(&series.token),
            });
            let Some(Prepared { tls, target, bound }) = prepared.remove(&upstream.name) else {
                continue; // `prepare` prepares every listener of the plan.
            };
            let running = self.listeners.remove(&wanted.key);
            let build = || self.listener_value(upstream, config, tls, target, token, series);
            let listener = match (wanted.step, running, bound) {
                // Unchanged settings keep their pool too, and the connections in it.
                (Step::Keep, Some(running), _) => running,
                (_, Some(mut running), _) => {
                    running.current.send_replace(build());
                    running.serving = wanted.serving;
                    running
                }
                (_, None, Some((socket, addr))) => {
                    self.spawn_listener(socket, addr, wanted.serving, build())
                }
                (_, None, None) => continue, // `prepare` binds every listener the plan starts.
            };
            listeners.insert(wanted.key, listener);
        }

        // What the new config no longer has: listeners drain, sources stop.
        for key in &plan.stop_listeners {
            if let Some(listener) = self.listeners.remove(key) {
                tracing::info!(upstream = %listener.serving.upstream.name, listen = %listener.addr, "listener removed: draining");
                listener.stop.cancel();
            }
        }
        for key in &plan.stop_sources {
            if let Some(source) = self.sources.remove(key) {
                source.stop.cancel();
            }
        }
        self.admin.watch(watched);
        self.sources = sources;
        self.listeners = listeners;
        self.started = true;
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

    /// Everything that can fail, done before anything changes: TLS settings loaded, targets
    /// checked, the sockets of new listeners bound (and closed again, by drop, if a later one
    /// fails).
    async fn prepare(&self, plan: &Plan<'_>) -> Result<HashMap<String, Prepared>, StartError> {
        let mut prepared = HashMap::with_capacity(plan.listeners.len());
        for wanted in &plan.listeners {
            let upstream = wanted.upstream;
            let tls = tls::client_config(&upstream.tls).map_err(|source| StartError::Tls {
                upstream: upstream.name.clone(),
                source,
            })?;
            let target = Target::new(&upstream.url).map_err(|source| StartError::Target {
                upstream: upstream.name.clone(),
                source,
            })?;
            let bound = match wanted.step {
                Step::Start => Some(bind(upstream).await?),
                Step::Keep | Step::Update => None,
            };
            prepared.insert(upstream.name.clone(), Prepared { tls, target, bound });
        }
        Ok(prepared)
    }

    /// What a listener serves for `upstream`: its one route.
    fn listener_value(
        &self,
        upstream: &config::Upstream,
        config: &Config,
        tls: rustls::ClientConfig,
        target: Target,
        token: Handle,
        series: &UpstreamSeries,
    ) -> Arc<proxy::Listener> {
        let name: Arc<str> = upstream.name.as_str().into();
        let dial = target.dial();
        let route = proxy::Route {
            name: Arc::clone(&name),
            target,
            token,
            pool: Arc::new(proxy::pool::Pool::new(
                tls::connector(tls, upstream.connect_timeout),
                dial,
                self.config.server.max_connections,
            )),
            response_header_timeout: upstream.response_header_timeout,
            metrics: Arc::clone(&series.proxy),
            access_log: config.log.access,
            retry_on_401: upstream.retry_on_401,
            body_idle_timeout: self.config.server.body_idle_timeout,
            replay_budget: self.replay_budget.clone(),
        };
        Arc::new(proxy::Listener {
            name,
            allow_from: upstream.allow_from.clone(),
            metrics: Arc::clone(&series.proxy),
            routes: proxy::Routes::one(route),
        })
    }

    /// Points a source's logs and metrics at the upstreams that now use it.
    fn observe(&self, source: &Source, users: &[&config::Upstream]) {
        let mut observers = source
            .observers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        observers.label = users
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        observers.metrics = users
            .iter()
            .map(|u| Arc::clone(&self.series[&u.name].token))
            .collect();
    }

    fn spawn_source(&self, key: &SourceKey, tls: rustls::ClientConfig) -> Source {
        let observers = SharedObservers::new(RwLock::new(Observers::default()));
        let stop = self.stop_sources.child_token();
        let handle = source::spawn(
            Arc::new(Fetcher::new(key.token.clone(), tls)),
            RefreshPolicy::from(&key.token),
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
        serving: Serving,
        forwarding: Arc<proxy::Listener>,
    ) -> Listener {
        let upstream = &serving.upstream;
        tracing::info!(upstream = %upstream.name, listen = %addr, url = %upstream.url, "listening");
        warn_about_exposure(upstream, addr);
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
