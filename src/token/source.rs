//! A token source: one refresher task that keeps a token fresh, and the [`Handle`] requests
//! read it through.
//!
//! The refresher is the only code that fetches, so however many requests arrive at once there
//! is at most one token request in flight per source. It publishes its [`State`] on a
//! `tokio::sync::watch` channel: requests read the current token with a brief borrow (no lock
//! held across an await), and a request that finds no token waits for the fetch under way
//! rather than starting one.
//!
//! When an upstream answers 401 to a token, the request reports it with
//! [`Handle::replacement_for`]: the refresher fetches a new token at once, but only once per
//! rejected token however many requests report it, and at most once per
//! [`REJECTION_REFETCH_INTERVAL`], so an upstream that answers 401 for reasons of its own
//! cannot turn into a storm of token requests.
//!
//! The refresher runs under a supervisor: should it ever end for any reason but shutdown (a
//! panic on input nobody foresaw), the supervisor logs it at ERROR, counts it, reports the
//! source down (`/healthz` answers 503), and starts it again after a backoff, keeping the
//! token it held.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cache::{CachedFetch, Store};
use super::credential::Credential;
use super::dpop::DpopKey;
use super::fetch::{Fetch, Fetcher};
use super::metrics::{NonceAt, TokenSeries};
use super::on_behalf::OnBehalf;
use super::rotation::RefreshChain;
use super::setup::SourceSetup;
pub use super::state::{
    Observers, Phase, RefreshPolicy, SharedObservers, State, REJECTION_REFETCH_INTERVAL,
};
use super::{refresher, SourceKey, Token};
use crate::telemetry::{FetchTracing, Telemetry};

/// No usable token can be had for a request now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// Why, for the app and the logs; never holds a secret.
    pub detail: String,
    /// When it is worth trying again.
    pub retry_after: Duration,
}

/// A cheap-to-clone reader of one source's token.
#[derive(Clone)]
pub struct Handle {
    state: watch::Receiver<State>,
    /// The newest generation an upstream rejected; the refresher watches it.
    rejections: watch::Sender<u64>,
    /// `grant = "refresh_token"`: the chain, whose trouble `/readyz` shows.
    chain: Option<Arc<RefreshChain>>,
    /// On-behalf-of: the tokens of its subjects, fetched on demand; the state channel then
    /// says [`Phase::OnDemand`] for ever.
    on_behalf: Option<Arc<OnBehalf>>,
}

impl Handle {
    /// What `/readyz` should say of the source even while it holds a usable token: the
    /// newest refresh token is not stored, or the authorisation is lost.
    pub fn warning(&self) -> Option<String> {
        self.chain.as_ref().and_then(|chain| chain.warning())
    }

    /// On-behalf-of: the source's subjects and their tokens. Such a source has no token of
    /// its own and does not gate readiness.
    pub(crate) fn on_behalf(&self) -> Option<&Arc<OnBehalf>> {
        self.on_behalf.as_ref()
    }

    /// On-behalf-of: how many subjects' tokens are held, and at most; `None` for other
    /// sources.
    pub fn subjects_held(&self) -> Option<(usize, usize)> {
        self.on_behalf
            .as_ref()
            .map(|o| (o.subjects_held(), o.max_subjects()))
    }

    /// The current state, for readiness and metrics.
    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    /// Whether `other` reads the same source (upstreams with equal token settings share one).
    pub fn same_source(&self, other: &Handle) -> bool {
        self.state.same_channel(&other.state)
    }

    /// Whether the source is down: its refresher ended unexpectedly and awaits its restart.
    /// `/healthz` fails while any source is.
    pub fn is_down(&self) -> bool {
        matches!(self.state.borrow().phase, Phase::Restarting { .. })
    }

    /// A usable token: at once when one is held, else after the fetch under way, if any.
    pub async fn token(&self) -> Result<Arc<Token>, Unavailable> {
        // The common case: a token is held. One short read lock, no await.
        if let Some(token) = self.state.borrow().usable_token(Instant::now()) {
            return Ok(Arc::clone(token));
        }
        self.wait_for(|state, now| match state.usable_token(now) {
            Some(token) => Some(Ok(Arc::clone(token))),
            // Wait for its outcome: the fetch is bounded by the token timeout.
            None if state.phase == Phase::Fetching => None,
            None => Some(Err(unavailable(state, now))),
        })
        .await
    }

    /// A token newer than `rejected`, which an upstream has just answered 401 to.
    ///
    /// The first report of a token makes the refresher fetch a new one at once; later reports
    /// of the same token wait for that fetch. If it fails, or a newer token was rejected too,
    /// the answer is `Err` and the caller passes the upstream's 401 on.
    pub async fn replacement_for(&self, rejected: &Token) -> Result<Arc<Token>, Unavailable> {
        self.reject(rejected);
        let generation = rejected.generation;
        self.wait_for(|state, now| match state.usable_token(now) {
            Some(token) if token.generation > generation => Some(Ok(Arc::clone(token))),
            _ if state.rejection_handled >= generation && state.phase != Phase::Fetching => {
                Some(Err(unavailable(state, now)))
            }
            _ => None,
        })
        .await
    }

    /// Reports that an upstream answered 401 to `rejected`, without waiting for a new token.
    pub fn reject(&self, rejected: &Token) {
        let generation = rejected.generation;
        self.rejections.send_if_modified(|newest| {
            let newer = generation > *newest;
            if newer {
                *newest = generation;
            }
            newer
        });
    }

    /// Waits until `decide` returns an answer for the current state.
    async fn wait_for(
        &self,
        decide: impl Fn(&State, Instant) -> Option<Result<Arc<Token>, Unavailable>>,
    ) -> Result<Arc<Token>, Unavailable> {
        let mut state = self.state.clone();
        loop {
            {
                let current = state.borrow_and_update();
                if let Some(answer) = decide(&current, Instant::now()) {
                    // A traced request links to the fetch whose outcome it got.
                    if let Some(fetch) = &current.fetch_span {
                        crate::telemetry::link_to_fetch(fetch);
                    }
                    return answer;
                }
            }
            if state.changed().await.is_err() {
                return Err(Unavailable {
                    detail: "token source stopped".into(),
                    retry_after: Duration::from_secs(1),
                });
            }
        }
    }
}

fn unavailable(state: &State, now: Instant) -> Unavailable {
    match state.phase {
        Phase::Scheduled { next } | Phase::BackingOff { next } | Phase::Restarting { next } => {
            Unavailable {
                detail: state.why_unusable(),
                retry_after: next.saturating_duration_since(now),
            }
        }
        Phase::Fetching => Unavailable {
            detail: state.why_unusable(),
            retry_after: Duration::from_secs(1),
        },
        Phase::Stopped => Unavailable {
            detail: "bearerd is shutting down".into(),
            retry_after: Duration::from_secs(1),
        },
        // Its requests take their tokens from `on_behalf`, never from here.
        Phase::OnDemand => Unavailable {
            detail: "an on-behalf-of source has no token of its own".into(),
            retry_after: Duration::from_secs(1),
        },
    }
}

/// A running token source: the handle its routes read, and what the sidecar keeps of it to
/// point its logs and metrics at the upstreams that use it, give each route its credential,
/// and stop it.
pub(crate) struct Started {
    /// What requests read the token through.
    pub(crate) handle: Handle,
    observers: SharedObservers,
    stop: CancellationToken,
    /// The key its tokens are bound to, which every proxied request's proof is signed with.
    dpop: Option<Arc<DpopKey>>,
    /// How its token goes upstream.
    presentation: crate::config::Presentation,
}

/// Starts the source of `key` on `tasks` with what `setup` loaded: a fetcher (behind `cache`,
/// when there is one) and its refresher, which fetches at once and runs until `stop` is
/// cancelled.
pub(crate) fn start(
    key: &SourceKey,
    setup: SourceSetup,
    cache: Option<&Arc<Store>>,
    tasks: &TaskTracker,
    stop: CancellationToken,
    telemetry: Option<&Arc<Telemetry>>,
) -> Started {
    let observers = SharedObservers::new(RwLock::new(Observers {
        audit: super::audit::Describe::of(&key.token),
        ..Observers::default()
    }));
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
        setup.egress.as_ref(),
        setup.dpop.clone(),
        on_nonce_retry,
    );
    if let Some(settings) = key.token.on_behalf_of() {
        // No refresher: tokens are fetched by the requests that need them, per subject.
        let cache = cache.and_then(|store| {
            super::cache::SubjectStore::new(
                store,
                &key.token,
                setup.dpop.as_deref().map(DpopKey::thumbprint),
                Arc::clone(&observers),
            )
        });
        let on_behalf = Arc::new(OnBehalf::new(
            settings.clone(),
            fetcher,
            cache,
            Arc::clone(&observers),
            telemetry.map(|t| t.fetches(&key.token)),
        ));
        let (_, state) = watch::channel(State {
            token: None,
            phase: Phase::OnDemand,
            last_error: None,
            failures: 0,
            rejection_handled: 0,
            fetch_span: None,
        });
        let (rejections, _) = watch::channel(0);
        return Started {
            handle: Handle {
                state,
                rejections,
                chain: None,
                on_behalf: Some(on_behalf),
            },
            observers,
            stop,
            dpop: setup.dpop,
            presentation: key.token.presentation.clone(),
        };
    }
    let chain =
        matches!(key.token.grant, crate::config::Grant::RefreshToken(_)).then(|| fetcher.chain());
    // The cache sits in front of the fetcher: a token another process stored saves a request.
    let fetcher: Arc<dyn Fetch> = match cache {
        Some(store) => Arc::new(CachedFetch::new(
            Arc::new(fetcher),
            Arc::clone(store),
            &key.token,
            setup.dpop.as_deref().map(DpopKey::thumbprint),
            Arc::clone(&observers),
            chain.clone(),
        )),
        None => Arc::new(fetcher),
    };
    let mut handle = spawn_traced(
        fetcher,
        RefreshPolicy::from(&key.token),
        Arc::clone(&observers),
        tasks,
        stop.clone(),
        telemetry.map(|t| t.fetches(&key.token)),
    );
    handle.chain = chain;
    Started {
        handle,
        observers,
        stop,
        dpop: setup.dpop,
        presentation: key.token.presentation.clone(),
    }
}

impl Started {
    /// The credential of a route that reads this source, counting in `series`.
    pub(crate) fn credential(&self, series: &TokenSeries) -> Credential {
        Credential::new(
            self.handle.clone(),
            self.dpop.clone(),
            &self.presentation,
            series,
        )
    }

    /// Points the source's logs (`label`: the upstreams' names) and metrics at the upstreams
    /// that now use it.
    pub(crate) fn observed_by(&self, label: String, metrics: Vec<Arc<TokenSeries>>) {
        let mut observers = self
            .observers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        observers.label = label;
        observers.metrics = metrics;
    }

    /// Stops the refresher.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

/// Starts the refresher for `fetcher` on `tasks`, under its supervisor; it fetches at once
/// and runs until `shutdown` is cancelled, reporting each fetch to `observers`.
pub fn spawn(
    fetcher: Arc<dyn Fetch>,
    policy: RefreshPolicy,
    observers: SharedObservers,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Handle {
    spawn_traced(fetcher, policy, observers, tasks, shutdown, None)
}

/// [`spawn`], each fetch traced by `tracing` when `[telemetry]` is on.
fn spawn_traced(
    fetcher: Arc<dyn Fetch>,
    policy: RefreshPolicy,
    observers: SharedObservers,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
    tracing: Option<FetchTracing>,
) -> Handle {
    let (publish, state) = watch::channel(State {
        token: None,
        phase: Phase::Fetching,
        last_error: None,
        failures: 0,
        rejection_handled: 0,
        fetch_span: None,
    });
    let (rejections, _) = watch::channel(0);
    let supervisor = refresher::Supervisor {
        fetcher,
        policy,
        observers,
        publish: Arc::new(publish),
        rejections: rejections.clone(),
        tasks: tasks.clone(),
        tracing: tracing.map(Arc::new),
    };
    tasks.spawn(supervisor.run(shutdown));
    Handle {
        state,
        rejections,
        chain: None,
        on_behalf: None,
    }
}

#[cfg(test)]
mod tests;
