//! Prometheus metrics: one [`Metrics`] owning its own `Registry` (never the global one).
//!
//! Names and labels are fixed, for dashboards and alerts to rely on; `upstream` is the
//! configured name, and no label ever carries a path or a token. Each upstream's series are
//! resolved once at start-up into an [`UpstreamMetrics`], so the request path neither locks
//! nor allocates for metrics.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::token::fetch::FetchError;

/// Buckets for token fetches: from a fast local endpoint to the 10 s default timeout.
const FETCH_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets for proxied requests until response headers: sub-millisecond to the 30 s timeout.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric bearerd exports.
pub struct Metrics {
    registry: Registry,
    token_fetch_total: IntCounterVec,
    token_fetch_duration_seconds: HistogramVec,
    token_expiry_timestamp_seconds: GaugeVec,
    token_last_success_timestamp_seconds: GaugeVec,
    token_valid: IntGaugeVec,
    token_secret_errors_total: IntCounterVec,
    requests_total: IntCounterVec,
    request_duration_seconds: HistogramVec,
    requests_in_flight: IntGaugeVec,
    token_unavailable_total: IntCounterVec,
    upstream_unauthorized_retries_total: IntCounterVec,
    token_source_restarts_total: IntCounterVec,
    connections_refused_total: IntCounterVec,
}

/// Why a listener closed an app connection unserved, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer's address is outside the listener's `allow_from`.
    NotAllowed,
    /// The listener already held `max_connections`.
    ListenerFull,
}

impl Refusal {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotAllowed => "not_allowed",
            Self::ListenerFull => "listener_full",
        }
    }
}

/// How a token fetch ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// A usable token arrived.
    Success,
    /// The endpoint answered 4xx.
    Rejected,
    /// The endpoint answered 5xx.
    ServerError,
    /// No complete answer in time.
    Timeout,
    /// Connecting, TLS or the exchange failed.
    ConnectError,
    /// An answer bearerd cannot use.
    InvalidResponse,
}

impl FetchOutcome {
    /// Every outcome, so that each series exists from the start (at 0).
    pub const ALL: [Self; 6] = [
        Self::Success,
        Self::Rejected,
        Self::ServerError,
        Self::Timeout,
        Self::ConnectError,
        Self::InvalidResponse,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Rejected => "rejected",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::ConnectError => "connect_error",
            Self::InvalidResponse => "invalid_response",
        }
    }

    /// The outcome of a failed fetch; `None` when no request was sent (the credentials could
    /// not be read or used).
    pub fn of(error: &FetchError) -> Option<Self> {
        match error {
            FetchError::Secret(_) | FetchError::BuildRequest { .. } => None,
            FetchError::Timeout { .. } => Some(Self::Timeout),
            FetchError::Connect { .. } => Some(Self::ConnectError),
            FetchError::Rejected { .. } => Some(Self::Rejected),
            FetchError::ServerError { .. } => Some(Self::ServerError),
            FetchError::InvalidResponse { .. } => Some(Self::InvalidResponse),
        }
    }
}

/// The metrics could not be set up (a programming error: names are constants).
#[derive(Debug, thiserror::Error)]
#[error("metrics setup failed: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// Creates and registers every metric, plus the process collector where supported.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let token_fetch_total = IntCounterVec::new(
            Opts::new("bearerd_token_fetch_total", "Token requests, by outcome."),
            &["upstream", "outcome"],
        )?;
        let token_fetch_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "bearerd_token_fetch_duration_seconds",
                "Time taken by token requests, whatever their outcome.",
            )
            .buckets(FETCH_BUCKETS.to_vec()),
            &["upstream"],
        )?;
        let token_expiry_timestamp_seconds = GaugeVec::new(
            Opts::new(
                "bearerd_token_expiry_timestamp_seconds",
                "Unix time at which the held token expires (0 when none is held).",
            ),
            &["upstream"],
        )?;
        let token_last_success_timestamp_seconds = GaugeVec::new(
            Opts::new(
                "bearerd_token_last_success_timestamp_seconds",
                "Unix time of the last successful token request (0 before the first).",
            ),
            &["upstream"],
        )?;
        let token_valid = IntGaugeVec::new(
            Opts::new(
                "bearerd_token_valid",
                "1 when a usable token is held, else 0.",
            ),
            &["upstream"],
        )?;
        let token_secret_errors_total = IntCounterVec::new(
            Opts::new(
                "bearerd_token_secret_errors_total",
                "Token requests not sent because the client credentials could not be read or used.",
            ),
            &["upstream"],
        )?;
        let requests_total = IntCounterVec::new(
            Opts::new(
                "bearerd_requests_total",
                "Requests answered to the app, by HTTP status sent.",
            ),
            &["upstream", "code"],
        )?;
        let request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "bearerd_request_duration_seconds",
                "Time from the app's request to the response headers sent back.",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["upstream"],
        )?;
        let requests_in_flight = IntGaugeVec::new(
            Opts::new(
                "bearerd_requests_in_flight",
                "Requests received and not yet answered with headers.",
            ),
            &["upstream"],
        )?;
        let token_unavailable_total = IntCounterVec::new(
            Opts::new(
                "bearerd_token_unavailable_total",
                "Requests answered 503 because no valid token could be had.",
            ),
            &["upstream"],
        )?;
        let upstream_unauthorized_retries_total = IntCounterVec::new(
            Opts::new(
                "bearerd_upstream_unauthorized_retries_total",
                "Requests sent again with a new token after the upstream answered 401.",
            ),
            &["upstream"],
        )?;
        let token_source_restarts_total = IntCounterVec::new(
            Opts::new(
                "bearerd_token_source_restarts_total",
                "Token sources started again after their refresher ended unexpectedly.",
            ),
            &["upstream"],
        )?;
        let connections_refused_total = IntCounterVec::new(
            Opts::new(
                "bearerd_connections_refused_total",
                "App connections closed unserved, by reason (not_allowed, listener_full).",
            ),
            &["upstream", "reason"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "bearerd_build_info",
                "Always 1; the version is in the label.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        registry.register(Box::new(token_fetch_total.clone()))?;
        registry.register(Box::new(token_fetch_duration_seconds.clone()))?;
        registry.register(Box::new(token_expiry_timestamp_seconds.clone()))?;
        registry.register(Box::new(token_last_success_timestamp_seconds.clone()))?;
        registry.register(Box::new(token_valid.clone()))?;
        registry.register(Box::new(token_secret_errors_total.clone()))?;
        registry.register(Box::new(requests_total.clone()))?;
        registry.register(Box::new(request_duration_seconds.clone()))?;
        registry.register(Box::new(requests_in_flight.clone()))?;
        registry.register(Box::new(token_unavailable_total.clone()))?;
        registry.register(Box::new(upstream_unauthorized_retries_total.clone()))?;
        registry.register(Box::new(token_source_restarts_total.clone()))?;
        registry.register(Box::new(connections_refused_total.clone()))?;
        registry.register(Box::new(build_info))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        Ok(Self {
            registry,
            token_fetch_total,
            token_fetch_duration_seconds,
            token_expiry_timestamp_seconds,
            token_last_success_timestamp_seconds,
            token_valid,
            token_secret_errors_total,
            requests_total,
            request_duration_seconds,
            requests_in_flight,
            token_unavailable_total,
            upstream_unauthorized_retries_total,
            token_source_restarts_total,
            connections_refused_total,
        })
    }

    /// The series of one upstream, created now so they are exported (at 0) from the start.
    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        for outcome in FetchOutcome::ALL {
            self.token_fetch_total
                .with_label_values(&[name, outcome.label()]);
        }
        UpstreamMetrics {
            name: name.to_owned(),
            requests_total: self.requests_total.clone(),
            by_status: std::iter::repeat_with(OnceLock::new)
                .take(STATUS_SLOTS)
                .collect(),
            request_duration: self.request_duration_seconds.with_label_values(&[name]),
            in_flight: self.requests_in_flight.with_label_values(&[name]),
            token_unavailable: self.token_unavailable_total.with_label_values(&[name]),
            unauthorized_retries: self
                .upstream_unauthorized_retries_total
                .with_label_values(&[name]),
            token_fetch: FetchOutcome::ALL
                .map(|o| self.token_fetch_total.with_label_values(&[name, o.label()])),
            token_fetch_duration: self.token_fetch_duration_seconds.with_label_values(&[name]),
            token_secret_errors: self.token_secret_errors_total.with_label_values(&[name]),
            token_expiry: self
                .token_expiry_timestamp_seconds
                .with_label_values(&[name]),
            token_last_success: self
                .token_last_success_timestamp_seconds
                .with_label_values(&[name]),
            token_valid: self.token_valid.with_label_values(&[name]),
            token_source_restarts: self.token_source_restarts_total.with_label_values(&[name]),
            refused_not_allowed: self
                .connections_refused_total
                .with_label_values(&[name, Refusal::NotAllowed.label()]),
            refused_listener_full: self
                .connections_refused_total
                .with_label_values(&[name, Refusal::ListenerFull.label()]),
        }
    }

    /// Stops exporting the series of an upstream that a reload removed.
    pub fn forget(&self, upstream: &UpstreamMetrics) {
        let name = upstream.name.as_str();
        for outcome in FetchOutcome::ALL {
            let _ = self
                .token_fetch_total
                .remove_label_values(&[name, outcome.label()]);
        }
        for (slot, status) in upstream.by_status.iter().zip(100u16..) {
            if slot.get().is_some() {
                let _ = self
                    .requests_total
                    .remove_label_values(&[name, &status.to_string()]);
            }
        }
        let _ = self
            .token_fetch_duration_seconds
            .remove_label_values(&[name]);
        let _ = self
            .token_expiry_timestamp_seconds
            .remove_label_values(&[name]);
        let _ = self
            .token_last_success_timestamp_seconds
            .remove_label_values(&[name]);
        let _ = self.token_valid.remove_label_values(&[name]);
        let _ = self.token_secret_errors_total.remove_label_values(&[name]);
        let _ = self.request_duration_seconds.remove_label_values(&[name]);
        let _ = self.requests_in_flight.remove_label_values(&[name]);
        let _ = self.token_unavailable_total.remove_label_values(&[name]);
        let _ = self
            .upstream_unauthorized_retries_total
            .remove_label_values(&[name]);
        let _ = self
            .token_source_restarts_total
            .remove_label_values(&[name]);
        for reason in [Refusal::NotAllowed, Refusal::ListenerFull] {
            let _ = self
                .connections_refused_total
                .remove_label_values(&[name, reason.label()]);
        }
    }

    /// The registry in the text exposition format (version 0.0.4).
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Status codes 100–599, each with a slot for its counter.
const STATUS_SLOTS: usize = 500;

/// The series of one upstream, resolved once.
pub struct UpstreamMetrics {
    name: String,
    requests_total: IntCounterVec,
    /// One counter per status code, created on first use: a code that never happens exports
    /// no series, and after the first use the lookup is an atomic load.
    by_status: Vec<OnceLock<IntCounter>>,
    request_duration: Histogram,
    in_flight: IntGauge,
    token_unavailable: IntCounter,
    unauthorized_retries: IntCounter,
    token_fetch: [IntCounter; 6],
    token_fetch_duration: Histogram,
    token_secret_errors: IntCounter,
    token_expiry: Gauge,
    token_last_success: Gauge,
    token_valid: IntGauge,
    token_source_restarts: IntCounter,
    refused_not_allowed: IntCounter,
    refused_listener_full: IntCounter,
}

impl UpstreamMetrics {
    /// A request arrived; the guard counts it in flight until dropped.
    pub fn request_started(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// The app got `status` after `elapsed`.
    pub fn request_answered(&self, status: http::StatusCode, elapsed: Duration) {
        self.request_duration.observe(elapsed.as_secs_f64());
        let code = status.as_u16();
        match self.by_status.get(usize::from(code).wrapping_sub(100)) {
            Some(slot) => slot
                .get_or_init(|| {
                    self.requests_total
                        .with_label_values(&[self.name.as_str(), status.as_str()])
                })
                .inc(),
            None => self
                .requests_total
                .with_label_values(&[self.name.as_str(), status.as_str()])
                .inc(),
        }
    }

    /// A request was answered 503 for want of a token.
    pub fn token_unavailable(&self) {
        self.token_unavailable.inc();
    }

    /// The token source's refresher ended unexpectedly and is started again.
    pub fn token_source_restarted(&self) {
        self.token_source_restarts.inc();
    }

    /// An app connection was closed unserved.
    pub fn connection_refused(&self, why: Refusal) {
        match why {
            Refusal::NotAllowed => &self.refused_not_allowed,
            Refusal::ListenerFull => &self.refused_listener_full,
        }
        .inc();
    }

    /// A request was sent again with a new token after a 401.
    pub fn unauthorized_retry(&self) {
        self.unauthorized_retries.inc();
    }

    /// A token fetch ended.
    pub fn fetch_finished(&self, outcome: Result<(), &FetchError>, elapsed: Duration) {
        let outcome = match outcome {
            Ok(()) => FetchOutcome::Success,
            Err(error) => match FetchOutcome::of(error) {
                Some(outcome) => outcome,
                None => {
                    self.token_secret_errors.inc();
                    return;
                }
            },
        };
        self.token_fetch_duration.observe(elapsed.as_secs_f64());
        // `token_fetch` is in the order of `FetchOutcome::ALL`, the declaration order.
        self.token_fetch[outcome as usize].inc();
        if outcome == FetchOutcome::Success {
            self.token_last_success.set(unix_seconds(SystemTime::now()));
        }
    }

    /// Sets the token gauges from the source's state; called before each scrape, so that
    /// validity reflects the time of the scrape.
    pub fn token_state(&self, expires_at: Option<SystemTime>, valid: bool) {
        self.token_expiry.set(expires_at.map_or(0.0, unix_seconds));
        self.token_valid.set(i64::from(valid));
    }
}

/// Counts a request in flight while it lives.
pub struct InFlight<'a>(&'a IntGauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_exist_from_the_start_and_count() {
        let metrics = Metrics::new().unwrap();
        let upstream = metrics.upstream("payments");
        let text = metrics.render().unwrap();
        assert!(
            text.contains(r#"bearerd_token_fetch_total{outcome="rejected",upstream="payments"} 0"#)
        );
        assert!(text.contains(r#"bearerd_requests_in_flight{upstream="payments"} 0"#));
        assert!(text.contains(&format!(
            r#"bearerd_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )));
        assert!(
            !text.contains("bearerd_requests_total{"),
            "no code seen yet"
        );

        {
            let _guard = upstream.request_started();
            assert!(metrics
                .render()
                .unwrap()
                .contains(r#"bearerd_requests_in_flight{upstream="payments"} 1"#));
        }
        upstream.request_answered(http::StatusCode::OK, Duration::from_millis(3));
        upstream.request_answered(http::StatusCode::OK, Duration::from_millis(3));
        upstream.request_answered(http::StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO);
        let text = metrics.render().unwrap();
        assert!(text.contains(r#"bearerd_requests_total{code="200",upstream="payments"} 2"#));
        assert!(text.contains(r#"bearerd_requests_total{code="503",upstream="payments"} 1"#));
        assert!(text.contains(r#"bearerd_requests_in_flight{upstream="payments"} 0"#));
        assert!(text.contains(r#"bearerd_request_duration_seconds_count{upstream="payments"} 3"#));
    }
}
