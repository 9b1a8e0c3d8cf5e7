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
mod prepare;
mod series;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Admin};
use crate::config::Config;
use crate::metrics::{Metrics, MetricsError};
use crate::proxy::{self, body::ReplayBudget, connection::Limits};
use crate::telemetry::Telemetry;
use crate::token::cache::Store;
use crate::token::source::{self, Handle};
use crate::token::SourceKey;
use plan::{ListenerKey, Serving};
pub(crate) use prepare::routes_in_match_order;
pub use prepare::{prepare, Finding, Prepared, Severity};
pub use series::{MetricFamilies, UpstreamSeries};

/// The sidecar could not start, or a reload could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// What the config needs could not be prepared: every finding that stops a start, one
    /// per line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Prepare(Vec<Finding>),
    /// Reading the config's files did not finish in time (a file on a stalled mount).
    #[error("reading the config's files did not finish within {}: is a secret, key or certificate on a stalled mount?", humantime::format_duration(*.0))]
    PrepareStuck(Duration),
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
    /// `[telemetry]` could not be started.
    #[error("{0}")]
    Telemetry(String),
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
    sources: HashMap<SourceKey, source::Started>,
    listeners: HashMap<ListenerKey, Listener>,
    stop_listeners: CancellationToken,
    listener_tasks: TaskTracker,
    stop_sources: CancellationToken,
    source_tasks: TaskTracker,
    /// Memory for bodies kept for a replay, shared by every listener.
    replay_budget: ReplayBudget,
    /// `[cache]`, shared by every token source.
    cache: Option<Arc<Store>>,
    /// `[telemetry]`: the tracer routes and token sources share, when on.
    telemetry: Option<Arc<Telemetry>>,
}

/// Starts token sources and listeners for `config`. Token sources fetch at once; listeners
/// accept at once, and requests that arrive before the first token wait for it.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    let mut prepared = prepare_to_run(config).await?;
    let metrics = MetricFamilies::new()?;
    let cache = match (&config.cache, prepared.cache.take()) {
        (Some(settings), Some(ready)) => {
            let store = Store::new(ready, metrics.cache_up(settings.backend()));
            tracing::info!(backend = settings.backend(), "token cache on");
            Some(Arc::new(store))
        }
        _ => None,
    };
    let telemetry = match &config.telemetry {
        Some(settings) => {
            let telemetry = Telemetry::start(settings, &metrics.registry, prepared.egress.as_ref())
                .map_err(|e| StartError::Telemetry(e.to_string()))?;
            tracing::info!(url = %settings.traces_url, sample_ratio = settings.sample_ratio, "traces exported");
            Some(telemetry)
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
        telemetry,
    };
    if let Err(error) = running.apply(config, prepared).await {
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

    /// What the admin listener answers with (tests drive `/status` through it for peers a
    /// loopback socket cannot be).
    pub fn admin(&self) -> &Admin {
        &self.admin
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
    /// `[admin]`, `[server]` and `[log] level`/`format`/`audit` need a restart; a change to them is
    /// logged and otherwise ignored.
    pub async fn reload(&mut self, config: &Config) -> Result<(), StartError> {
        let old = &self.config;
        for (section, changed) in [
            ("[admin]", old.admin != config.admin),
            ("[server]", old.server != config.server),
            ("[cache]", old.cache != config.cache),
            ("[telemetry]", old.telemetry != config.telemetry),
            ("[egress]", old.egress != config.egress),
            (
                "[log] level, format and audit",
                (&old.log.level, old.log.format, old.log.audit)
                    != (&config.log.level, config.log.format, config.log.audit),
            ),
        ] {
            if changed {
                tracing::warn!(
                    section,
                    "changed in the config file; takes effect at restart"
                );
            }
        }
        // `[egress]` takes effect at restart: the routes and token sources this reload makes
        // go through the proxy the running ones use.
        let mut config = config.clone();
        config.egress.clone_from(&self.config.egress);
        let config = &config;
        let prepared = prepare_to_run(config).await?;
        self.apply(config, prepared).await?;
        tracing::info!(upstreams = config.upstreams.len(), "config reloaded");
        Ok(())
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
        // Last: the spans of the requests drained above go out.
        if let Some(telemetry) = &self.telemetry {
            telemetry.shutdown().await;
        }
    }
}

/// The longest a start or reload waits for its preparation: reading files. Long enough for
/// any file a healthy mount serves; a stalled NFS or FUSE mount fails the start or reload
/// instead of holding the runtime's one thread (and with it the proxy, the admin port and
/// signal handling).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(20);

/// `config` prepared off the runtime's thread, or every finding that stops it from running.
async fn prepare_to_run(config: &Config) -> Result<Prepared, StartError> {
    let owned = config.clone();
    let preparing =
        tokio::task::spawn_blocking(move || prepare::prepare_with(&owned, prepare::Create::Ca));
    // (A preparation that panicked, which nothing on input should make it do, is reported
    // the same way: it did not finish.)
    let Ok(Ok(prepared)) = tokio::time::timeout(PREPARE_TIMEOUT, preparing).await else {
        return Err(StartError::PrepareStuck(PREPARE_TIMEOUT));
    };
    let fatal: Vec<Finding> = prepared.fatal().cloned().collect();
    if fatal.is_empty() {
        Ok(prepared)
    } else {
        Err(StartError::Prepare(fatal))
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
