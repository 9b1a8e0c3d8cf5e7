//! The refresher task that keeps one source's token fresh, and the supervisor that starts it
//! again should it ever end before shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::fetch::{Fetch, FetchError};
use super::metrics::FetchOutcome;
use super::state::{Phase, RefreshPolicy, SharedObservers, State, REJECTION_REFETCH_INTERVAL};
use super::{audit, schedule, LifetimeSource, Token};
use crate::telemetry::{self, FetchTracing};

/// Runs the refresher, and runs it again if it ever ends before shutdown.
pub(super) struct Supervisor {
    pub(super) fetcher: Arc<dyn Fetch>,
    pub(super) policy: RefreshPolicy,
    pub(super) observers: SharedObservers,
    /// Shared with the refresher, so that the channel, and the token on it, outlive a
    /// refresher that died.
    pub(super) publish: Arc<watch::Sender<State>>,
    pub(super) rejections: watch::Sender<u64>,
    pub(super) tasks: TaskTracker,
    /// `[telemetry]`: what each fetch's span says.
    pub(super) tracing: Option<Arc<FetchTracing>>,
}

impl Supervisor {
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let mut restarts: u32 = 0;
        loop {
            let refresher = Refresher {
                fetcher: Arc::clone(&self.fetcher),
                policy: self.policy.clone(),
                observers: Arc::clone(&self.observers),
                publish: Arc::clone(&self.publish),
                tracing: self.tracing.clone(),
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
    tracing: Option<Arc<FetchTracing>>,
    /// Tokens published so far.
    generations: u64,
}

impl Refresher {
    async fn run(mut self, mut rejected: watch::Receiver<u64>, shutdown: CancellationToken) {
        let mut last_rejection_fetch: Option<Instant> = None;
        loop {
            self.publish.send_modify(|s| s.phase = Phase::Fetching);
            let started = Instant::now();
            let span = self.tracing.as_ref().map(|t| t.start());
            let outcome = tokio::select! {
                outcome = self.fetcher.fetch() => outcome,
                () = shutdown.cancelled() => break,
            };
            let delay = self.record(outcome, started, span);
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
                            let held = self.publish.borrow().token.clone();
                            if let Some(token) = held {
                                self.audit_rejection(&token, true);
                                self.fetcher.rejected(&token).await;
                            }
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
                        let held = self.publish.borrow().token.clone();
                        if let Some(token) = held {
                            self.audit_rejection(&token, false);
                        }
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

    /// What the source's audit events say of it.
    fn audit(&self) -> audit::Describe {
        self.observers
            .read()
            .map(|o| o.audit.clone())
            .unwrap_or_default()
    }

    /// The audit event of an upstream's 401 to `token`: refetching `now`, or later.
    fn audit_rejection(&self, token: &Token, now: bool) {
        audit::rejected_by_upstream(&self.label(), &self.audit(), token, now);
    }

    /// Publishes the outcome of a fetch and returns how long to wait before the next.
    fn record(
        &mut self,
        outcome: Result<Token, FetchError>,
        started: Instant,
        span: Option<opentelemetry_sdk::trace::Span>,
    ) -> Duration {
        let elapsed = started.elapsed();
        let fetch_outcome = match &outcome {
            Ok(_) => Some(FetchOutcome::Success),
            Err(error) => error.outcome(),
        };
        // A token the cache had is no token request: the cache counts it.
        let from_cache =
            matches!(&outcome, Ok(token) if token.lifetime_source == LifetimeSource::Cached);
        if let (Ok(observers), false) = (self.observers.read(), from_cache) {
            for metrics in &observers.metrics {
                metrics.fetch_finished(fetch_outcome, elapsed);
            }
        }
        let fetch_span = span.map(|span| {
            let status = outcome
                .as_ref()
                .err()
                .and_then(FetchError::endpoint)
                .map(|e| e.status);
            let label = fetch_outcome.map_or("secret_error", FetchOutcome::label);
            telemetry::fetch_ended(span, label, status, from_cache)
        });
        let label = self.label();
        match outcome {
            Ok(mut token) => {
                self.generations += 1;
                token.generation = self.generations;
                let delay = schedule::refresh_delay(token.lifetime, fastrand::f64());
                // A token the cache had was not fetched: the cache logged "token taken from
                // the cache", with its backend.
                if from_cache {
                    tracing::debug!(
                        upstream = %label,
                        expires_in = token.lifetime.as_secs(),
                        refresh_in = delay.as_secs(),
                        "refresh scheduled for the token from the cache"
                    );
                } else {
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
                }
                audit::acquired(&label, &self.audit(), &token, from_cache);
                let next = Instant::now() + delay;
                self.publish.send_modify(|s| {
                    s.token = Some(Arc::new(token));
                    s.phase = Phase::Scheduled { next };
                    s.last_error = None;
                    s.failures = 0;
                    s.fetch_span = fetch_span;
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
                audit::failed(&label, &self.audit(), &error);
                let next = Instant::now() + delay;
                let error = Arc::new(error);
                self.publish.send_modify(|s| {
                    s.phase = Phase::BackingOff { next };
                    s.last_error = Some(error);
                    s.failures = failures;
                    s.fetch_span = fetch_span;
                });
                delay
            }
        }
    }
}
