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
use super::metrics::TokenSeries;
use super::{refresher, Token};

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
    let supervisor = refresher::Supervisor {
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

#[cfg(test)]
mod tests;
