//! Carrying out a [`Plan`]: everything that can fail first (TLS settings, targets, new
//! sockets), then the changes, none of which can fail, so that a config is applied whole or
//! not at all.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use super::plan::{ListenerKey, Plan, Step};
use super::prepare::Prepared;
use super::{bind, Running, StartError};
use crate::admin;
use crate::config::{self, Config};
use crate::proxy::{self, RouteSetup, RouteShared};
use crate::token::source::{self, Started};
use crate::token::SourceKey;

/// What intercepting listeners are made with: their CAs by `ca_cert_file`, and `[egress]`
/// for their passthrough tunnels.
struct Intercepts<'a> {
    cas: &'a HashMap<std::path::PathBuf, Arc<proxy::intercept::ca::Ca>>,
    egress: Option<&'a Arc<crate::egress::Egress>>,
}

/// A new listener's socket, and the address it is bound to.
type Bound = (TcpListener, SocketAddr);

impl Running {
    /// Applies `config`, whose preparation found nothing fatal.
    pub(super) async fn apply(
        &mut self,
        config: &Config,
        mut prepared: Prepared,
    ) -> Result<(), StartError> {
        let plan = Plan::between(self.started.then_some(&self.config), config);
        let mut sockets = self.bind(&plan).await?;
        prepared.log();

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
                    let Some(setup) = prepared
                        .sources
                        .remove(&wanted.key)
                        .and_then(|source| source.setup)
                    else {
                        continue;
                    };
                    source::start(
                        &wanted.key,
                        setup,
                        self.cache.as_ref(),
                        &self.source_tasks,
                        self.stop_sources.child_token(),
                        self.telemetry.as_ref(),
                    )
                }
            };
            self.observe(&source, &wanted.users);
            sources.insert(wanted.key.clone(), source);
        }
        let mut watched = Vec::with_capacity(config.upstreams.len());
        for upstream in &config.upstreams {
            let (Some(series), Some(source)) = (
                self.series.get(&upstream.name),
                sources.get(&SourceKey::of(upstream)),
            ) else {
                continue;
            };
            series.token.describe_source(&upstream.token);
            watched.push(admin::Watched {
                name: upstream.name.clone(),
                token: source.handle.clone(),
                metrics: Arc::clone(&series.token),
            });
        }
        let cas = std::mem::take(&mut prepared.intercepts);
        let intercepts = Intercepts {
            cas: &cas,
            egress: prepared.egress.as_ref(),
        };
        let mut listeners = HashMap::with_capacity(plan.listeners.len());
        for wanted in plan.listeners {
            let running = self.listeners.remove(&wanted.key);
            let bound = sockets.remove(&wanted.key);
            let build = |routes: &mut HashMap<String, RouteSetup>| {
                self.listener_value(
                    wanted.listener,
                    &wanted.routes,
                    config,
                    routes,
                    &sources,
                    &intercepts,
                )
            };
            let listener = match (wanted.step, running, bound) {
                // Unchanged settings keep their pools too, and the connections in them.
                (Step::Keep, Some(running), _) => running,
                (_, Some(mut running), _) => {
                    running.current.send_replace(build(&mut prepared.routes));
                    running.serving = wanted.serving;
                    running
                }
                (_, None, Some((socket, addr))) => {
                    let value = build(&mut prepared.routes);
                    self.spawn_listener(socket, addr, wanted.serving, value)
                }
                // `prepare` binds every listener the plan starts.
                (_, None, None) => continue,
            };
            listeners.insert(wanted.key, listener);
        }

        // What the new config no longer has: listeners drain, sources stop.
        for key in &plan.stop_listeners {
            if let Some(listener) = self.listeners.remove(key) {
                tracing::info!(routes = %listener.serving.listener.routes.join(","), listen = %listener.addr, "listener removed: draining");
                listener.stop.cancel();
            }
        }
        for key in &plan.stop_sources {
            if let Some(source) = self.sources.remove(key) {
                source.stop();
            }
        }
        self.admin.watch(watched);
        self.admin.describe(admin::status::Overview::of(
            config,
            |listener| listeners.get(&ListenerKey::of(listener)).map(|l| l.addr),
            |name| self.series.get(name).map(|s| Arc::clone(&s.proxy)),
            self.cache.clone(),
        ));
        self.sources = sources;
        self.listeners = listeners;
        self.started = true;
        // What a reload cannot change stays as it runs, so that new listeners get the running
        // limits and the next reload compares against what really runs.
        let mut running = config.clone();
        running.admin = self.config.admin.clone();
        running.server = self.config.server;
        running.cache = self.config.cache.clone();
        running.telemetry = self.config.telemetry.clone();
        running.log.level = self.config.log.level.clone();
        running.log.format = self.config.log.format;
        running.log.audit = self.config.log.audit;
        self.config = running;
        Ok(())
    }

    /// Binds the sockets of the listeners `plan` starts (closed again, by drop, if a later
    /// one fails): all that can still fail once the config is prepared.
    async fn bind(&self, plan: &Plan<'_>) -> Result<HashMap<ListenerKey, Bound>, StartError> {
        let mut sockets = HashMap::new();
        for wanted in &plan.listeners {
            if wanted.step == Step::Start {
                let name = wanted.listener.routes.first().cloned().unwrap_or_default();
                sockets.insert(
                    wanted.key.clone(),
                    bind(&name, wanted.listener.listen).await?,
                );
            }
        }
        Ok(sockets)
    }

    /// What a listener serves: its routes, each with its credential, pool and series.
    fn listener_value(
        &self,
        listener: &config::Listener,
        routes: &[&config::Upstream],
        config: &Config,
        setups: &mut HashMap<String, RouteSetup>,
        sources: &HashMap<SourceKey, Started>,
        intercepts: &Intercepts<'_>,
    ) -> Arc<proxy::Listener> {
        let shared = RouteShared {
            max_connections: self.config.server.max_connections,
            body_idle_timeout: self.config.server.body_idle_timeout,
            upgraded_idle_timeout: self.config.server.upgraded_idle_timeout,
            replay_budget: self.replay_budget.clone(),
            access_log: config.log.access,
            telemetry: self.telemetry.clone(),
        };
        let mut table = Vec::with_capacity(routes.len());
        for upstream in routes {
            let (Some(setup), Some(series), Some(source)) = (
                setups.remove(&upstream.name),
                self.series.get(&upstream.name),
                sources.get(&SourceKey::of(upstream)),
            ) else {
                continue;
            };
            table.push(proxy::Route::new(
                upstream,
                setup,
                source.credential(&series.token),
                Arc::clone(&series.proxy),
                &shared,
            ));
        }
        let first = routes.first().map_or("", |u| u.name.as_str());
        let metrics = self
            .series
            .get(first)
            .map(|series| Arc::clone(&series.proxy))
            // (Never needed: every route's series are made before its listener.)
            .unwrap_or_else(|| self.metrics.upstream(first).proxy);
        // (A CA is always there for an intercepting listener: `prepare` found it or made it,
        // or the config would not be applied.)
        let intercept = listener.intercept.as_ref().and_then(|settings| {
            let ca = intercepts.cas.get(&settings.ca_cert_file)?;
            Some(Arc::new(proxy::intercept::Intercept::new(
                settings,
                Arc::clone(ca),
                self.metrics.intercept.series(first),
                intercepts.egress,
            )))
        });
        Arc::new(proxy::Listener::new(
            listener,
            first,
            table,
            metrics,
            config.log.access,
            intercept,
        ))
    }

    /// Points a source's logs and metrics at the upstreams that now use it.
    fn observe(&self, source: &Started, users: &[&config::Upstream]) {
        let label = users
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let metrics = users
            .iter()
            .filter_map(|u| self.series.get(&u.name))
            .map(|series| Arc::clone(&series.token))
            .collect();
        source.observed_by(label, metrics);
    }
}
