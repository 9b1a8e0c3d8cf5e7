//! What a token source is doing, as its refresher publishes it and its handle reads it, and
//! the settings and observers the refresher runs with. Below both `refresher` and `source`,
//! so that neither needs the other's internals.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use super::fetch::FetchError;
use super::metrics::TokenSeries;
use super::Token;

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
    /// An on-behalf-of source: no token of its own, one per subject, fetched on demand
    /// (`on_behalf`); no refresher, and nothing for `/readyz` to wait for.
    OnDemand,
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
    /// With `[telemetry]`: the span of the last fetch, which requests that waited on its
    /// outcome link to.
    pub(crate) fetch_span: Option<opentelemetry::trace::SpanContext>,
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
    /// What the source's audit events say of how it obtains tokens.
    pub audit: super::audit::Describe,
}

/// [`Observers`] as the refresher and the sidecar share them.
pub type SharedObservers = Arc<RwLock<Observers>>;
