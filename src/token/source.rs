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

use super::fetch::{Fetch, FetchError};
use super::metrics::{FetchOutcome, TokenSeries};
use super::{schedule, Token};

/// Shortest time between two fetches caused by upstream 401s. A rejection sooner than this
/// after the last one is answered from the token held (the request gets the upstream's 401),
/// and the fetch waits for the interval to pass.
pub const REJECTION_REFETCH_INTERVAL: Duration = Duration::from_secs(5);

/// What a source is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A token request is in flight.
    Fetching,
    /// The last fetch succeeded; the next is due at `next`.
    Scheduled {
        /// When the refresh is due.
        next: Instant,
    },
    /// The last fetch failed; the next try is at `next`.
    BackingOff {
        /// When the next try is due.
        next: Instant,
    },
    /// The refresher ended unexpectedly and is started again at `next`.
    Restarting {
        /// When it starts again.
        next: Instant,
    },
    /// The source has stopped (shutdown).
    Stopped,
}

/// Everything known about a source, as published after each change.
#[derive(Debug, Clone)]
pub struct State {
    /// The newest token, kept after a failed refresh for as long as it is usable.
    pub token: Option<Arc<Token>>,
    /// What the refresher is doing.
    pub phase: Phase,
    /// Why the last fetch failed, if it did. Its `Display` is for the log (redacted); what
    /// the app and `/readyz` see is its [`FetchError::summary`].
    pub last_error: Option<Arc<FetchError>>,
    /// Failed fetches since the last success.
    pub failures: u32,
    /// The newest token generation whose rejection by an upstream the refresher has acted on
    /// (0 for none).
    pub rejection_handled: u64,
}

impl State {
    /// The token if it may still be sent at `now`.
    pub fn usable_token(&self, now: Instant) -> Option<&Arc<Token>> {
        self.token.as_ref().filter(|t| t.is_usable_at(now))
    }

    /// Why no usable token is held, for the app and for readiness: never text the token
    /// endpoint chose beyond its status and error code.
    pub fn why_unusable(&self) -> String {
        match (&self.last_error, &self.token) {
            (Some(error), _) => error.summary(),
            (None, _) if matches!(self.phase, Phase::Restarting { .. }) => {
                "token source restarting after a failure".to_owned()
            }
            (None, Some(_)) => "token expired".to_owned(),
            (None, None) => "no token yet".to_owned(),
        }
    }
}

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
}

impl Handle {
    /// The current state, for readiness and metrics.
    pub fn state(&self) -> State {
        self.state.borrow().clone()
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
            if let Some(answer) = decide(&state.borrow_and_update(), Instant::now()) {
                return answer;
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
    }
}

/// Settings of the refresher besides what to fetch.
#[derive(Debug, Clone)]
pub struct RefreshPolicy {
    /// First wait after a failure.
    pub backoff_base: Duration,
    /// Longest wait after failures.
    pub backoff_cap: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            backoff_base: crate::config::DEFAULT_BACKOFF_BASE,
            backoff_cap: crate::config::DEFAULT_BACKOFF_CAP,
        }
    }
}

impl From<&crate::config::TokenSettings> for RefreshPolicy {
    fn from(settings: &crate::config::TokenSettings) -> Self {
        Self {
            backoff_base: settings.backoff_base,
            backoff_cap: settings.backoff_cap,
        }
    }
}

/// The upstreams a source serves: their names, for logs, and their metric series, in which
/// each fetch is counted. Shared with the sidecar, which changes it when a reload moves
/// upstreams onto or off an existing source.
#[derive(Default)]
pub struct Observers {
    /// The upstreams' names, joined by commas.
    pub label: String,
    /// The upstreams' metric series.
    pub metrics: Vec<Arc<TokenSeries>>,
}

/// [`Observers`] as the refresher and the sidecar share them.
pub type SharedObservers = Arc<RwLock<Observers>>;

/// Starts the refresher for `fetcher` on `tasks`, under its supervisor; it fetches at once
/// and runs until `shutdown` is cancelled, reporting each fetch to `observers`.
pub fn spawn(
    fetcher: Arc<dyn Fetch>,
    policy: RefreshPolicy,
    observers: SharedObservers,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Handle {
    let (publish, state) = watch::channel(State {
        token: None,
        phase: Phase::Fetching,
        last_error: None,
        failures: 0,
        rejection_handled: 0,
    });
    let (rejections, _) = watch::channel(0);
    let supervisor = Supervisor {
        fetcher,
        policy,
        observers,
        publish: Arc::new(publish),
        rejections: rejections.clone(),
        tasks: tasks.clone(),
    };
    tasks.spawn(supervisor.run(shutdown));
    Handle { state, rejections }
}

/// Runs the refresher, and runs it again if it ever ends before shutdown.
struct Supervisor {
    fetcher: Arc<dyn Fetch>,
    policy: RefreshPolicy,
    observers: SharedObservers,
    /// Shared with the refresher, so that the channel, and the token on it, outlive a
    /// refresher that died.
    publish: Arc<watch::Sender<State>>,
    rejections: watch::Sender<u64>,
    tasks: TaskTracker,
}

impl Supervisor {
    async fn run(self, shutdown: CancellationToken) {
        let mut restarts: u32 = 0;
        loop {
            let refresher = Refresher {
                fetcher: Arc::clone(&self.fetcher),
                policy: self.policy.clone(),
                observers: Arc::clone(&self.observers),
                publish: Arc::clone(&self.publish),
                // Generations go on counting across restarts: a 401 names a token by them.
                generations: self
                    .publish
                    .borrow()
                    .token
                    .as_ref()
                    .map_or(0, |t| t.generation),
            };
            let started = Instant::now();
            let ended = self
                .tasks
                .spawn(refresher.run(self.rejections.subscribe(), shutdown.clone()))
                .await;
            if shutdown.is_cancelled() {
                break;
            }
            // A refresher that ran well for a while starts again at the shortest backoff.
            if started.elapsed() > self.policy.backoff_cap {
                restarts = 0;
            }
            restarts = restarts.saturating_add(1);
            let why = match ended {
                Ok(()) => "it returned".to_owned(),
                Err(error) if error.is_panic() => panic_message(error.into_panic()),
                Err(error) => error.to_string(),
            };
            let delay = schedule::backoff(
                restarts,
                self.policy.backoff_base,
                self.policy.backoff_cap,
                fastrand::f64(),
                None,
            );
            let label = label_of(&self.observers);
            tracing::error!(
                upstream = %label,
                why = %why,
                restarts,
                restart_in_ms = delay.as_millis() as u64,
                "token source stopped unexpectedly: restarting it"
            );
            if let Ok(observers) = self.observers.read() {
                for metrics in &observers.metrics {
                    metrics.source_restarted();
                }
            }
            let next = Instant::now() + delay;
            self.publish
                .send_modify(|s| s.phase = Phase::Restarting { next });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => break,
            }
        }
        self.publish.send_modify(|s| s.phase = Phase::Stopped);
    }
}

/// The names of the upstreams a source serves, for logs.
fn label_of(observers: &SharedObservers) -> String {
    observers
        .read()
        .map(|o| o.label.clone())
        .unwrap_or_default()
}

/// The message a panic carried, when it is text.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => format!("panic: {message}"),
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(message) => format!("panic: {message}"),
            Err(_) => "panic".to_owned(),
        },
    }
}

struct Refresher {
    fetcher: Arc<dyn Fetch>,
    policy: RefreshPolicy,
    observers: SharedObservers,
    publish: Arc<watch::Sender<State>>,
    /// Tokens published so far.
    generations: u64,
}

impl Refresher {
    async fn run(mut self, mut rejected: watch::Receiver<u64>, shutdown: CancellationToken) {
        let mut last_rejection_fetch: Option<Instant> = None;
        loop {
            self.publish.send_modify(|s| s.phase = Phase::Fetching);
            let started = Instant::now();
            let outcome = tokio::select! {
                outcome = self.fetcher.fetch() => outcome,
                () = shutdown.cancelled() => break,
            };
            let delay = self.record(outcome, started);
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    () = shutdown.cancelled() => return,
                    Ok(()) = rejected.changed() => {
                        let generation = *rejected.borrow_and_update();
                        if !self.is_news(generation) {
                            continue;
                        }
                        let now = Instant::now();
                        let allowed = last_rejection_fetch
                            .map_or(now, |last| last + REJECTION_REFETCH_INTERVAL);
                        if allowed <= now {
                            tracing::info!(upstream = %self.label(), "upstream rejected the token: fetching a new one");
                            // One update, so that waiters see the fetch coming.
                            self.publish.send_modify(|s| {
                                s.rejection_handled = generation;
                                s.phase = Phase::Fetching;
                            });
                            last_rejection_fetch = Some(now);
                            break;
                        }
                        // Too soon after the last one: the waiting requests get the
                        // upstream's 401, and the fetch happens when the interval has passed,
                        // unless the schedule comes first.
                        tracing::info!(upstream = %self.label(), "upstream rejected the token again soon: fetching a new one later");
                        self.publish.send_modify(|s| s.rejection_handled = generation);
                        if allowed < sleep.deadline() {
                            sleep.as_mut().reset(allowed);
                            last_rejection_fetch = Some(allowed);
                        }
                    }
                }
            }
        }
    }

    /// Whether a rejection of `generation` is news: it names the token held (not one already
    /// replaced) and has not been acted on.
    fn is_news(&self, generation: u64) -> bool {
        let state = self.publish.borrow();
        let holds_rejected = state
            .token
            .as_ref()
            .is_some_and(|t| t.generation == generation);
        holds_rejected && generation > state.rejection_handled
    }

    /// The source's upstreams, for logs.
    fn label(&self) -> String {
        label_of(&self.observers)
    }

    /// Publishes the outcome of a fetch and returns how long to wait before the next.
    fn record(&mut self, outcome: Result<Token, FetchError>, started: Instant) -> Duration {
        let elapsed = started.elapsed();
        let fetch_outcome = match &outcome {
            Ok(_) => Some(FetchOutcome::Success),
            Err(error) => error.outcome(),
        };
        if let Ok(observers) = self.observers.read() {
            for metrics in &observers.metrics {
                metrics.fetch_finished(fetch_outcome, elapsed);
            }
        }
        let label = self.label();
        match outcome {
            Ok(mut token) => {
                self.generations += 1;
                token.generation = self.generations;
                let delay = schedule::refresh_delay(token.lifetime, fastrand::f64());
                tracing::info!(
                    upstream = %label,
                    outcome = "success",
                    duration_ms = elapsed.as_millis() as u64,
                    expires_in = token.lifetime.as_secs(),
                    lifetime_from = %token.lifetime_source,
                    refresh_in = delay.as_secs(),
                    scope = token.scope.as_deref().unwrap_or(""),
                    "token fetched"
                );
                let next = Instant::now() + delay;
                self.publish.send_modify(|s| {
                    s.token = Some(Arc::new(token));
                    s.phase = Phase::Scheduled { next };
                    s.last_error = None;
                    s.failures = 0;
                });
                delay
            }
            Err(error) => {
                let failures = self.publish.borrow().failures.saturating_add(1);
                let delay = schedule::backoff(
                    failures,
                    self.policy.backoff_base,
                    self.policy.backoff_cap,
                    fastrand::f64(),
                    error.retry_after(),
                );
                let holding = self.publish.borrow().usable_token(Instant::now()).is_some();
                let endpoint = error.endpoint();
                tracing::warn!(
                    upstream = %label,
                    outcome = fetch_outcome.map_or("secret_error", FetchOutcome::label),
                    duration_ms = elapsed.as_millis() as u64,
                    status = endpoint.map(|e| e.status.as_u16()),
                    endpoint_error = endpoint.and_then(|e| e.error.as_deref()),
                    endpoint_error_description = endpoint.and_then(|e| e.description.as_deref()),
                    failures,
                    retry_in_ms = delay.as_millis() as u64,
                    still_holding_valid_token = holding,
                    error = %error,
                    "token fetch failed"
                );
                let next = Instant::now() + delay;
                let error = Arc::new(error);
                self.publish.send_modify(|s| {
                    s.phase = Phase::BackingOff { next };
                    s.last_error = Some(error);
                    s.failures = failures;
                });
                delay
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// What a scripted fetch does: `Ok(lifetime)`, `Err(why)`; [`PANIC`] panics instead.
    type Outcome = Result<Duration, &'static str>;

    /// A scripted failure that panics rather than return, as a bug on hostile input would.
    const PANIC: Outcome = Err("panic");

    /// Hands out scripted outcomes and counts the calls.
    struct Scripted {
        calls: AtomicUsize,
        outcomes: Mutex<VecDeque<Outcome>>,
    }

    impl Scripted {
        fn new(outcomes: impl IntoIterator<Item = Outcome>) -> Arc<Self> {
            Arc::new(Self {
                calls: AtomicUsize::new(0),
                outcomes: Mutex::new(outcomes.into_iter().collect()),
            })
        }
    }

    impl Fetch for Scripted {
        fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Token, FetchError>> + Send + '_>> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            let outcome = self.outcomes.lock().unwrap().pop_front();
            Box::pin(async move {
                #[allow(clippy::panic)] // the very thing under test
                if outcome == Some(PANIC) {
                    panic!("overflow when adding duration to instant");
                }
                match outcome {
                    Some(Ok(lifetime)) => Ok(Token {
                        authorization: http::HeaderValue::try_from(format!("Bearer t{call}"))
                            .unwrap(),
                        lifetime,
                        lifetime_source: crate::token::LifetimeSource::ExpiresIn,
                        usable_until: Instant::now() + schedule::usable_for(lifetime),
                        expires_at: std::time::SystemTime::now() + lifetime,
                        scope: None,
                        generation: 0,
                    }),
                    Some(Err(why)) => Err(FetchError::Connect {
                        endpoint: "auth.example".into(),
                        source: why.into(),
                    }),
                    None => std::future::pending().await,
                }
            })
        }
    }

    fn start(fetcher: Arc<Scripted>) -> (Handle, CancellationToken, TaskTracker) {
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let handle = spawn(
            fetcher,
            RefreshPolicy::default(),
            SharedObservers::default(),
            &tasks,
            shutdown.clone(),
        );
        (handle, shutdown, tasks)
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_before_expiry_without_any_request() {
        let lifetime = Duration::from_secs(100);
        let fetcher = Scripted::new([Ok(lifetime), Ok(lifetime)]);
        let (handle, _shutdown, _tasks) = start(Arc::clone(&fetcher));
        let mut watch = handle.state.clone();

        // The first fetch happens at start-up.
        watch.wait_for(|s| s.token.is_some()).await.unwrap();
        let first = handle.state().token.unwrap();
        let fetched_at = Instant::now();

        // Nobody asks for a token; time passes (paused clock, advanced by the runtime).
        watch
            .wait_for(|s| {
                s.token
                    .as_ref()
                    .is_some_and(|t| t.authorization() != first.authorization())
            })
            .await
            .unwrap();
        let refreshed_after = fetched_at.elapsed();
        assert!(
            refreshed_after >= lifetime.mul_f64(0.7)
                && refreshed_after < schedule::usable_for(lifetime),
            "refreshed after {refreshed_after:?}"
        );
        assert!(
            first.is_usable_at(Instant::now()),
            "old token had not expired yet"
        );
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 2);
        assert_eq!(handle.token().await.unwrap().authorization(), "Bearer t1");
    }

    #[tokio::test(start_paused = true)]
    async fn failed_refresh_keeps_serving_the_valid_token_and_backs_off() {
        let lifetime = Duration::from_secs(600);
        let fetcher = Scripted::new([Ok(lifetime), Err("down"), Err("down"), Ok(lifetime)]);
        let (handle, _shutdown, _tasks) = start(Arc::clone(&fetcher));
        let mut watch = handle.state.clone();

        let failed = watch.wait_for(|s| s.failures == 1).await.unwrap().clone();
        assert!(failed.token.is_some());
        assert_eq!(
            failed.last_error.as_ref().map(|e| e.to_string()).as_deref(),
            Some("cannot reach the token endpoint auth.example: down")
        );
        assert_eq!(handle.token().await.unwrap().authorization(), "Bearer t0");

        let recovered = watch
            .wait_for(|s| s.failures == 0 && fetcher.calls.load(Ordering::SeqCst) == 4)
            .await
            .unwrap()
            .clone();
        assert!(recovered.last_error.is_none());
        assert_eq!(handle.token().await.unwrap().authorization(), "Bearer t3");
    }

    #[tokio::test(start_paused = true)]
    async fn no_token_reports_why_and_when_to_retry() {
        let fetcher = Scripted::new([Err("connection refused")]);
        let (handle, _shutdown, _tasks) = start(fetcher);
        // The request arrives during the first fetch and waits for its outcome.
        let unavailable = handle.token().await.unwrap_err();
        assert_eq!(
            unavailable.detail,
            "cannot reach the token endpoint auth.example: connection refused"
        );
        assert!(unavailable.retry_after >= crate::config::DEFAULT_BACKOFF_BASE);
    }

    #[tokio::test(start_paused = true)]
    async fn many_waiters_cause_one_fetch() {
        let fetcher = Scripted::new([Ok(Duration::from_secs(3600))]);
        let (handle, _shutdown, _tasks) = start(Arc::clone(&fetcher));
        let waiters: Vec<_> = (0..1000)
            .map(|_| {
                let handle = handle.clone();
                tokio::spawn(async move { handle.token().await })
            })
            .collect();
        for waiter in waiters {
            assert!(waiter.await.unwrap().is_ok());
        }
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_the_refresher() {
        let fetcher = Scripted::new([Ok(Duration::from_secs(3600))]);
        let (handle, shutdown, tasks) = start(fetcher);
        handle.token().await.unwrap();
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
        assert_eq!(handle.state().phase, Phase::Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn many_401s_for_one_token_cause_one_fetch() {
        let hour = Duration::from_secs(3600);
        let fetcher = Scripted::new([Ok(hour), Ok(hour)]);
        let (handle, _shutdown, _tasks) = start(Arc::clone(&fetcher));
        let rejected = handle.token().await.unwrap();
        assert_eq!(rejected.generation, 1);
        let reports: Vec<_> = (0..100)
            .map(|_| {
                let handle = handle.clone();
                let rejected = Arc::clone(&rejected);
                tokio::spawn(async move { handle.replacement_for(&rejected).await })
            })
            .collect();
        for report in reports {
            let replacement = report.await.unwrap().unwrap();
            assert_eq!(replacement.generation, 2);
            assert_eq!(replacement.authorization(), "Bearer t1");
        }
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 2);

        // A late report of the replaced token gets the new one without another fetch.
        let late = handle.replacement_for(&rejected).await.unwrap();
        assert_eq!(late.generation, 2);
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_replacement_is_reported_once_and_not_retried_in_a_loop() {
        let hour = Duration::from_secs(3600);
        let fetcher = Scripted::new([Ok(hour), Err("down")]);
        let (handle, _shutdown, _tasks) = start(Arc::clone(&fetcher));
        let rejected = handle.token().await.unwrap();
        let error = handle.replacement_for(&rejected).await.unwrap_err();
        assert_eq!(
            error.detail,
            "cannot reach the token endpoint auth.example: down"
        );
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 2);
        // Reported again: the refresher already acted on this token; no new fetch.
        assert!(handle.replacement_for(&rejected).await.is_err());
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 2);
        // The rejected token stays in use meanwhile: the 401 may not have been its fault.
        assert_eq!(handle.token().await.unwrap().generation, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn rejections_in_quick_succession_fetch_at_most_once_per_interval() {
        let hour = Duration::from_secs(3600);
        let fetcher = Scripted::new([Ok(hour), Ok(hour), Ok(hour)]);
        let (handle, _shutdown, _tasks) = start(Arc::clone(&fetcher));
        let first = handle.token().await.unwrap();
        let second = handle.replacement_for(&first).await.unwrap();
        let replaced_at = Instant::now();
        assert_eq!(second.generation, 2);

        // The new token is rejected at once too: the request gets no replacement now...
        assert!(handle.replacement_for(&second).await.is_err());
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 2);
        // ...and the fetch comes when the interval has passed.
        let mut watch = handle.state.clone();
        watch
            .wait_for(|s| s.token.as_ref().is_some_and(|t| t.generation == 3))
            .await
            .unwrap();
        assert!(replaced_at.elapsed() >= REJECTION_REFETCH_INTERVAL);
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresher_that_panics_is_restarted_and_keeps_its_token() {
        let hour = Duration::from_secs(3600);
        let fetcher = Scripted::new([Ok(hour), PANIC, Ok(hour)]);
        let (handle, _shutdown, _tasks) = start(Arc::clone(&fetcher));
        let first = handle.token().await.unwrap();
        assert_eq!(first.generation, 1);

        // The refresh panics: the source is down, the token it held is still served.
        let mut watch = handle.state.clone();
        watch
            .wait_for(|s| matches!(s.phase, Phase::Restarting { .. }))
            .await
            .unwrap();
        assert!(handle.is_down());
        assert_eq!(handle.token().await.unwrap().generation, 1);

        // Restarted after the backoff, it fetches again and counts on from where it was.
        let replaced = watch
            .wait_for(|s| s.token.as_ref().is_some_and(|t| t.generation == 2))
            .await
            .unwrap()
            .clone();
        assert!(!handle.is_down());
        assert!(matches!(replaced.phase, Phase::Scheduled { .. }));
        assert_eq!(fetcher.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waiting_on_a_fetch_that_panics_is_answered() {
        let fetcher = Scripted::new([PANIC]);
        let (handle, _shutdown, _tasks) = start(fetcher);
        let unavailable = handle.token().await.unwrap_err();
        assert_eq!(
            unavailable.detail,
            "token source restarting after a failure"
        );
        assert!(unavailable.retry_after >= crate::config::DEFAULT_BACKOFF_BASE);
    }
}
