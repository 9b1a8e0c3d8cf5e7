//! Tests of a token source: refresh, backoff, single flight, 401 replacement, restarts.

use super::*;
use crate::token::fetch::FetchError;
use crate::token::schedule;
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
                    authorization: http::HeaderValue::try_from(format!("Bearer t{call}")).unwrap(),
                    lifetime,
                    lifetime_source: crate::token::LifetimeSource::ExpiresIn,
                    usable_until: Instant::now() + schedule::usable_for(lifetime),
                    expires_at: std::time::SystemTime::now() + lifetime,
                    scope: None,
                    proof_hash: None,
                    generation: 0,
                    subject: None,
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
