//! Carrying out a [`Plan`]: everything that can fail first (TLS settings, targets, new
//! sockets), then the changes, none of which can fail, so that a config is applied whole or
//! not at all.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use super::plan::{Plan, Step};
use super::{bind, Running, Source, StartError, UpstreamSeries};
use crate::admin;
use crate::config::{self, Config};
use crate::proxy::{self, rewrite::Target};
use crate::tls;
use crate::token::dpop::{DpopKey, Nonce};
use crate::token::setup::SourceSetup;
use crate::token::source::Handle;
use crate::token::SourceKey;

/// What applying a config needs for one listener, gathered before anything changes.
struct Prepared {
    /// For the upstream (with its client certificate, if any).
    tls: rustls::ClientConfig,
    target: Target,
    /// A new socket, when the plan starts the listener.
    bound: Option<(TcpListener, SocketAddr)>,
}

/// The TLS configuration and DPoP key of each source the plan starts.
fn prepare_sources(plan: &Plan<'_>) -> Result<HashMap<SourceKey, SourceSetup>, StartError> {
    let mut setups = HashMap::new();
    for wanted in &plan.sources {
        if wanted.step == Step::Start {
            let setup = SourceSetup::new(&wanted.key).map_err(|source| StartError::Source {
                upstream: wanted
                    .users
                    .first()
                    .map(|u| u.name.clone())
                    .unwrap_or_default(),
                source,
            })?;
            setups.insert(wanted.key.clone(), setup);
        }
    }
    Ok(setups)
}

impl Running {
    pub(super) async fn apply(&mut self, config: &Config) -> Result<(), StartError> {
        let plan = Plan::between(self.started.then_some(&self.config), config);
        let mut setups = prepare_sources(&plan)?;
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
        // The lookups below by name and key find what `prepare` and the lines above made for
        // every upstream of the plan; each `else` is there only so that nothing can panic.
        let mut sources = HashMap::with_capacity(plan.sources.len());
        for wanted in &plan.sources {
            let source = match (wanted.step, self.sources.remove(&wanted.key)) {
                (Step::Keep, Some(running)) => running,
                _ => {
                    let Some(setup) = setups.remove(&wanted.key) else {
                        continue;
                    };
                    self.spawn_source(&wanted.key, setup)
                }
            };
            self.observe(&source, &wanted.users);
            sources.insert(wanted.key.clone(), source);
        }
        let mut listeners = HashMap::with_capacity(plan.listeners.len());
        let mut watched = Vec::with_capacity(plan.listeners.len());
        for wanted in plan.listeners {
            let upstream = wanted.upstream;
            let (Some(series), Some(source)) = (
                self.series.get(&upstream.name),
                sources.get(&SourceKey::of(upstream)),
            ) else {
                continue;
            };
            let token = source.handle.clone();
            let dpop = source.dpop.clone();
            series.token.describe_source(&upstream.token);
            watched.push(admin::Watched {
                name: upstream.name.clone(),
                token: token.clone(),
                metrics: Arc::clone(&series.token),
            });
            let Some(Prepared { tls, target, bound }) = prepared.remove(&upstream.name) else {
                continue;
            };
            let running = self.listeners.remove(&wanted.key);
            let build =
                || self.listener_value(upstream, config, tls, target, (token, dpop), series);
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
                // `prepare` binds every listener the plan starts.
                (_, None, None) => continue,
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
        running.cache = self.config.cache.clone();
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
            let tls = tls::client_config(&upstream.tls, upstream.tls.identity.as_ref()).map_err(
                |source| StartError::Tls {
                    upstream: upstream.name.clone(),
                    source,
                },
            )?;
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
        (token, dpop): (Handle, Option<Arc<DpopKey>>),
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
            dpop: dpop.map(|key| proxy::RouteDpop {
                key,
                nonce: Nonce::default(),
                retries: series.token.upstream_nonce_retries(),
            }),
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
            .filter_map(|u| self.series.get(&u.name))
            .map(|series| Arc::clone(&series.token))
            .collect();
    }
}
