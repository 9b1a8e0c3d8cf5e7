//! A token source: one refresher task that keeps a token fresh, and the [`Handle`] requests
//! read it through.
//!
//! The refresher is the only code that fetches, so however many requests arrive at once there
//! is at most one token request in flight per source. It publishes its [`State`] on a
//! `tokio::sync::watch` channel: requests read the current token with a brief borrow (no lock
//! held across an await), and a request that finds no token waits for the fetch under way
//! rather than starting one.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::fetch::{Fetch, FetchError};
use super::{schedule, Token};
use crate::metrics::{FetchOutcome, UpstreamMetrics};

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
    /// Why the last fetch failed, if it did; never holds a secret.
    pub last_error: Option<Arc<str>>,
    /// When a fetch last succeeded.
    pub last_success: Option<SystemTime>,
    /// Failed fetches since the last success.
    pub failures: u32,
}

impl State {
    /// The token if it may still be sent at `now`.
    pub fn usable_token(&self, now: Instant) -> Option<&Arc<Token>> {
        self.token.as_ref().filter(|t| t.is_usable_at(now))
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
}

impl Handle {
    /// The current state, for readiness and metrics.
    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    /// A usable token: at once when one is held, else after the fetch under way, if any.
    pub async fn token(&self) -> Result<Arc<Token>, Unavailable> {
        // The common case: a token is held. One short read lock, no await.
        if let Some(token) = self.state.borrow().usable_token(Instant::now()) {
            return Ok(Arc::clone(token));
        }
        let mut state = self.state.clone();
        loop {
            {
                let current = state.borrow_and_update();
                let now = Instant::now();
                if let Some(token) = current.usable_token(now) {
                    return Ok(Arc::clone(token));
                }
                let why = || {
                    current.last_error.as_deref().map_or_else(
                        || {
                            if current.token.is_some() {
                                "token expired".to_owned()
                            } else {
                                "no token yet".to_owned()
                            }
                        },
                        ToOwned::to_owned,
                    )
                };
                match current.phase {
                    // Wait for its outcome below: the fetch is bounded by the token timeout.
                    Phase::Fetching => {}
                    Phase::Scheduled { next } | Phase::BackingOff { next } => {
                        return Err(Unavailable {
                            detail: why(),
                            retry_after: next.saturating_duration_since(now),
                        });
                    }
                    Phase::Stopped => {
                        return Err(Unavailable {
                            detail: "bearerd is shutting down".into(),
                            retry_after: Duration::from_secs(1),
                        });
                    }
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
            backoff_base: schedule::DEFAULT_BACKOFF_BASE,
            backoff_cap: schedule::DEFAULT_BACKOFF_CAP,
        }
    }
}

/// Starts the refresher for `fetcher` on `tasks`; it fetches at once and runs until
/// `shutdown` is cancelled. `label` names the source in logs (its upstreams' names), and each
/// fetch is counted in the metrics of every upstream in `observers`.
pub fn spawn(
    label: String,
    fetcher: Arc<dyn Fetch>,
    policy: RefreshPolicy,
    observers: Vec<Arc<UpstreamMetrics>>,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Handle {
    let (publish, state) = watch::channel(State {
        token: None,
        phase: Phase::Fetching,
        last_error: None,
        last_success: None,
        failures: 0,
    });
    let refresher = Refresher {
        label,
        fetcher,
        policy,
        observers,
        publish,
    };
    tasks.spawn(refresher.run(shutdown));
    Handle { state }
}

struct Refresher {
    label: String,
    fetcher: Arc<dyn Fetch>,
    policy: RefreshPolicy,
    observers: Vec<Arc<UpstreamMetrics>>,
    publish: watch::Sender<State>,
}

impl Refresher {
    async fn run(self, shutdown: CancellationToken) {
        loop {
            self.publish.send_modify(|s| s.phase = Phase::Fetching);
            let started = Instant::now();
            let outcome = tokio::select! {
                outcome = self.fetcher.fetch() => outcome,
                () = shutdown.cancelled() => break,
            };
            let delay = self.record(outcome, started);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => break,
            }
        }
        self.publish.send_modify(|s| s.phase = Phase::Stopped);
    }

    /// Publishes the outcome of a fetch and returns how long to wait before the next.
    fn record(&self, outcome: Result<Token, FetchError>, started: Instant) -> Duration {
        let elapsed = started.elapsed();
        for observer in &self.observers {
            observer.fetch_finished(outcome.as_ref().map(|_| ()), elapsed);
        }
        match outcome {
            Ok(token) => {
                let delay = schedule::refresh_delay(token.lifetime, fastrand::f64());
                tracing::info!(
                    upstream = %self.label,
                    outcome = "success",
                    duration_ms = elapsed.as_millis() as u64,
                    expires_in = token.lifetime.as_secs(),
                    refresh_in = delay.as_secs(),
                    scope = token.scope.as_deref().unwrap_or(""),
                    "token fetched"
                );
                let next = Instant::now() + delay;
                self.publish.send_modify(|s| {
                    s.token = Some(Arc::new(token));
                    s.phase = Phase::Scheduled { next };
                    s.last_error = None;
                    s.last_success = Some(SystemTime::now());
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
                    upstream = %self.label,
                    outcome = FetchOutcome::of(&error).map_or("secret_error", FetchOutcome::label),
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
                let message: Arc<str> = error.to_string().into();
                self.publish.send_modify(|s| {
                    s.phase = Phase::BackingOff { next };
                    s.last_error = Some(message);
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

    /// Hands out scripted outcomes and counts the calls.
    struct Scripted {
        calls: AtomicUsize,
        outcomes: Mutex<VecDeque<Result<Duration, &'static str>>>,
    }

    impl Scripted {
        fn new(outcomes: impl IntoIterator<Item = Result<Duration, &'static str>>) -> Arc<Self> {
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
                match outcome {
                    Some(Ok(lifetime)) => Ok(Token {
                        authorization: http::HeaderValue::try_from(format!("Bearer t{call}"))
                            .unwrap(),
                        lifetime,
                        usable_until: Instant::now() + schedule::usable_for(lifetime),
                        expires_at: SystemTime::now() + lifetime,
                        scope: None,
                    }),
                    Some(Err(why)) => Err(FetchError::Connect(why.into())),
                    None => std::future::pending().await,
                }
            })
        }
    }

    fn start(fetcher: Arc<Scripted>) -> (Handle, CancellationToken, TaskTracker) {
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let handle = spawn(
            "test".into(),
            fetcher,
            RefreshPolicy::default(),
            Vec::new(),
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
            failed.last_error.as_deref(),
            Some("cannot reach the token endpoint: down")
        );
        assert_eq!(handle.token().await.unwrap().authorization(), "Bearer t0");

        let recovered = watch
            .wait_for(|s| s.failures == 0 && fetcher.calls.load(Ordering::SeqCst) == 4)
            .await
            .unwrap()
            .clone();
        assert_eq!(recovered.last_error, None);
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
            "cannot reach the token endpoint: connection refused"
        );
        assert!(unavailable.retry_after >= schedule::DEFAULT_BACKOFF_BASE);
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
}
