//! The token sources' metric families, and the series of one upstream, resolved once.

use std::time::{Duration, SystemTime};

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts,
};

use crate::metrics::{unix_seconds, Metrics, MetricsError, RemoveUpstream};

/// Buckets for token fetches: from a fast local endpoint to the 10 s default timeout.
const FETCH_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How a token request ended, as the `outcome` label of `bearerd_token_fetch_total` says it.
/// [`FetchError::outcome`](super::fetch::FetchError::outcome) classifies failures.
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
    /// `grant = "refresh_token"`: the endpoint answered `invalid_grant` to the refresh token;
    /// a person must authorise again.
    AuthorisationLost,
}

impl FetchOutcome {
    /// Every outcome, so that each series exists from the start (at 0).
    pub const ALL: [Self; 7] = [
        Self::Success,
        Self::Rejected,
        Self::ServerError,
        Self::Timeout,
        Self::ConnectError,
        Self::InvalidResponse,
        Self::AuthorisationLost,
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
            Self::AuthorisationLost => "authorisation_lost",
        }
    }
}

/// Where a server asked for a (newer) DPoP nonce, as the `at` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceAt {
    /// The token endpoint, answering a token request.
    TokenEndpoint,
    /// The upstream, answering a proxied request.
    Upstream,
}

impl NonceAt {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::TokenEndpoint => "token_endpoint",
            Self::Upstream => "upstream",
        }
    }
}

/// The families token sources report to.
pub(crate) struct TokenMetrics {
    source_info: IntGaugeVec,
    cache_operations_total: IntCounterVec,
    cache_up: IntGaugeVec,
    dpop_nonce_retries_total: IntCounterVec,
    fetch_total: IntCounterVec,
    fetch_duration_seconds: HistogramVec,
    expiry_timestamp_seconds: GaugeVec,
    last_success_timestamp_seconds: GaugeVec,
    valid: IntGaugeVec,
    secret_errors_total: IntCounterVec,
    source_restarts_total: IntCounterVec,
    subjects: IntGaugeVec,
}

impl TokenMetrics {
    /// Creates the families and registers them in `metrics`.
    pub(crate) fn register(metrics: &Metrics) -> Result<Self, MetricsError> {
        let upstream = &["upstream"];
        Ok(Self {
            cache_operations_total: metrics.register(IntCounterVec::new(
                Opts::new(
                    "bearerd_token_cache_operations_total",
                    "Token cache operations, by backend, operation (get, put, lease, delete) and outcome.",
                ),
                &["upstream", "backend", "op", "outcome"],
            )?)?,
            cache_up: metrics.register(IntGaugeVec::new(
                Opts::new(
                    "bearerd_token_cache_up",
                    "1 while the token cache answers, 0 during an outage (sources then fetch for themselves).",
                ),
                &["backend"],
            )?)?,
            source_info: metrics.register(IntGaugeVec::new(
                Opts::new(
                    "bearerd_token_source_info",
                    "Always 1; how the upstream's token source authenticates, in the labels.",
                ),
                &["upstream", "auth", "dpop"],
            )?)?,
            dpop_nonce_retries_total: metrics.register(IntCounterVec::new(
                Opts::new(
                    "bearerd_dpop_nonce_retries_total",
                    "Requests sent again with a server's new DPoP nonce, by where it asked (token_endpoint, upstream).",
                ),
                &["upstream", "at"],
            )?)?,
            fetch_total: metrics.register(IntCounterVec::new(
                Opts::new("bearerd_token_fetch_total", "Token requests, by outcome."),
                &["upstream", "outcome"],
            )?)?,
            fetch_duration_seconds: metrics.register(HistogramVec::new(
                HistogramOpts::new(
                    "bearerd_token_fetch_duration_seconds",
                    "Time taken by token requests, whatever their outcome.",
                )
                .buckets(FETCH_BUCKETS.to_vec()),
                upstream,
            )?)?,
            expiry_timestamp_seconds: metrics.register(GaugeVec::new(
                Opts::new(
                    "bearerd_token_expiry_timestamp_seconds",
                    "Unix time at which the held token expires (0 when none is held).",
                ),
                upstream,
            )?)?,
            last_success_timestamp_seconds: metrics.register(GaugeVec::new(
                Opts::new(
                    "bearerd_token_last_success_timestamp_seconds",
                    "Unix time of the last successful token request (0 before the first).",
                ),
                upstream,
            )?)?,
            valid: metrics.register(IntGaugeVec::new(
                Opts::new(
                    "bearerd_token_valid",
                    "1 when a usable token is held, else 0.",
                ),
                upstream,
            )?)?,
            secret_errors_total: metrics.register(IntCounterVec::new(
                Opts::new(
                    "bearerd_token_secret_errors_total",
                    "Token requests not sent because the client credentials could not be read or used.",
                ),
                upstream,
            )?)?,
            source_restarts_total: metrics.register(IntCounterVec::new(
                Opts::new(
                    "bearerd_token_source_restarts_total",
                    "Token sources started again after their refresher ended unexpectedly.",
                ),
                upstream,
            )?)?,
            subjects: metrics.register(IntGaugeVec::new(
                Opts::new(
                    "bearerd_token_subjects",
                    "On-behalf-of sources: the subjects whose tokens are held (at most max_subjects). Never labelled by subject.",
                ),
                upstream,
            )?)?,
        })
    }

    /// The series of upstream `name`, created now so they are exported (at 0) from the start.
    pub(crate) fn series(&self, name: &str) -> TokenSeries {
        let fetch =
            |outcome: FetchOutcome| self.fetch_total.with_label_values(&[name, outcome.label()]);
        let nonce_retries = |at: NonceAt| {
            self.dpop_nonce_retries_total
                .with_label_values(&[name, at.label()])
        };
        TokenSeries {
            name: name.to_owned(),
            cache_operations: self.cache_operations_total.clone(),
            cache_labels: std::sync::Mutex::new(Vec::new()),
            source_info: self.source_info.clone(),
            described: std::sync::Mutex::new(None),
            token_endpoint_nonce_retries: nonce_retries(NonceAt::TokenEndpoint),
            upstream_nonce_retries: nonce_retries(NonceAt::Upstream),
            success: fetch(FetchOutcome::Success),
            rejected: fetch(FetchOutcome::Rejected),
            server_error: fetch(FetchOutcome::ServerError),
            timeout: fetch(FetchOutcome::Timeout),
            connect_error: fetch(FetchOutcome::ConnectError),
            invalid_response: fetch(FetchOutcome::InvalidResponse),
            authorisation_lost: fetch(FetchOutcome::AuthorisationLost),
            fetch_duration: self.fetch_duration_seconds.with_label_values(&[name]),
            secret_errors: self.secret_errors_total.with_label_values(&[name]),
            expiry: self.expiry_timestamp_seconds.with_label_values(&[name]),
            last_success: self
                .last_success_timestamp_seconds
                .with_label_values(&[name]),
            valid: self.valid.with_label_values(&[name]),
            source_restarts: self.source_restarts_total.with_label_values(&[name]),
            subjects: self.subjects.with_label_values(&[name]),
        }
    }

    /// `bearerd_token_cache_up` of `backend`.
    pub(crate) fn cache_up(&self, backend: &str) -> prometheus::IntGauge {
        self.cache_up.with_label_values(&[backend])
    }

    /// Stops exporting the series of an upstream that a reload removed.
    pub(crate) fn forget(&self, series: &TokenSeries) {
        let name = series.name.as_str();
        series.describe(None);
        // Made as operations happened, with labels the cache chose: removed as recorded.
        let cache_labels = std::mem::take(
            &mut *series
                .cache_labels
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for [backend, op, outcome] in &cache_labels {
            let _ = self
                .cache_operations_total
                .remove_label_values(&[name, backend, op, outcome]);
        }
        for at in [NonceAt::TokenEndpoint, NonceAt::Upstream] {
            let _ = self
                .dpop_nonce_retries_total
                .remove_label_values(&[name, at.label()]);
        }
        for outcome in FetchOutcome::ALL {
            let _ = self
                .fetch_total
                .remove_label_values(&[name, outcome.label()]);
        }
        for family in [
            &self.fetch_duration_seconds as &dyn RemoveUpstream,
            &self.expiry_timestamp_seconds,
            &self.last_success_timestamp_seconds,
            &self.valid,
            &self.secret_errors_total,
            &self.source_restarts_total,
            &self.subjects,
        ] {
            family.remove_upstream(name);
        }
    }
}

/// One upstream's token series.
pub struct TokenSeries {
    name: String,
    cache_operations: IntCounterVec,
    /// The `backend`, `op` and `outcome` of each `cache_operations` series made, so that
    /// [`TokenMetrics::forget`] removes every one.
    cache_labels: std::sync::Mutex<Vec<[String; 3]>>,
    source_info: IntGaugeVec,
    /// The `auth` and `dpop` labels of its `bearerd_token_source_info` series.
    described: std::sync::Mutex<Option<(&'static str, &'static str)>>,
    token_endpoint_nonce_retries: IntCounter,
    upstream_nonce_retries: IntCounter,
    success: IntCounter,
    rejected: IntCounter,
    server_error: IntCounter,
    timeout: IntCounter,
    connect_error: IntCounter,
    invalid_response: IntCounter,
    authorisation_lost: IntCounter,
    fetch_duration: Histogram,
    secret_errors: IntCounter,
    expiry: Gauge,
    last_success: Gauge,
    valid: IntGauge,
    source_restarts: IntCounter,
    /// `bearerd_token_subjects`: on-behalf-of sources only (0 for the others).
    subjects: IntGauge,
}

impl TokenSeries {
    /// Exports how the source authenticates, in `bearerd_token_source_info`, replacing what a
    /// previous config said.
    pub fn describe_source(&self, settings: &crate::config::TokenSettings) {
        let dpop = if settings.dpop.is_some() {
            "true"
        } else {
            "false"
        };
        self.describe(Some((settings.auth.method(), dpop)));
    }

    fn describe(&self, labels: Option<(&'static str, &'static str)>) {
        let mut described = self
            .described
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *described == labels {
            return;
        }
        if let Some((auth, dpop)) = described.take() {
            let _ = self
                .source_info
                .remove_label_values(&[&self.name, auth, dpop]);
        }
        if let Some((auth, dpop)) = labels {
            self.source_info
                .with_label_values(&[&self.name, auth, dpop])
                .set(1);
        }
        *described = labels;
    }

    /// A token cache operation ended with `outcome`. (Cache operations are few, one or two
    /// per token request: the series is looked up each time.)
    pub fn cache_operation(&self, backend: &str, op: &str, outcome: &str) {
        {
            let mut made = self
                .cache_labels
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !made
                .iter()
                .any(|[b, o, r]| b == backend && o == op && r == outcome)
            {
                made.push([backend.to_owned(), op.to_owned(), outcome.to_owned()]);
            }
        }
        self.cache_operations
            .with_label_values(&[&self.name, backend, op, outcome])
            .inc();
    }

    /// A request was sent again with a server's new DPoP nonce.
    pub fn dpop_nonce_retry(&self, at: NonceAt) {
        match at {
            NonceAt::TokenEndpoint => &self.token_endpoint_nonce_retries,
            NonceAt::Upstream => &self.upstream_nonce_retries,
        }
        .inc();
    }

    /// The counter of upstream nonce retries, for the proxy to count in.
    pub fn upstream_nonce_retries(&self) -> IntCounter {
        self.upstream_nonce_retries.clone()
    }

    /// A token fetch ended after `elapsed`: with `outcome`, or with no request sent (`None`:
    /// the credentials could not be read or used).
    pub fn fetch_finished(&self, outcome: Option<FetchOutcome>, elapsed: Duration) {
        let Some(outcome) = outcome else {
            self.secret_errors.inc();
            return;
        };
        self.fetch_duration.observe(elapsed.as_secs_f64());
        match outcome {
            FetchOutcome::Success => &self.success,
            FetchOutcome::Rejected => &self.rejected,
            FetchOutcome::ServerError => &self.server_error,
            FetchOutcome::Timeout => &self.timeout,
            FetchOutcome::ConnectError => &self.connect_error,
            FetchOutcome::InvalidResponse => &self.invalid_response,
            FetchOutcome::AuthorisationLost => &self.authorisation_lost,
        }
        .inc();
        if outcome == FetchOutcome::Success {
            self.last_success.set(unix_seconds(SystemTime::now()));
        }
    }

    /// Token requests so far by outcome (`bearerd_token_fetch_total`), and failures to read
    /// or use the credentials (`secret_error`), for the status page.
    pub(crate) fn fetch_counts(&self) -> [(&'static str, u64); 7] {
        [
            (FetchOutcome::Success.label(), self.success.get()),
            (FetchOutcome::Rejected.label(), self.rejected.get()),
            (FetchOutcome::ServerError.label(), self.server_error.get()),
            (FetchOutcome::Timeout.label(), self.timeout.get()),
            (FetchOutcome::ConnectError.label(), self.connect_error.get()),
            (
                FetchOutcome::InvalidResponse.label(),
                self.invalid_response.get(),
            ),
            ("secret_error", self.secret_errors.get()),
        ]
    }

    /// The token source's refresher ended unexpectedly and is started again.
    pub fn source_restarted(&self) {
        self.source_restarts.inc();
    }

    /// Sets how many subjects an on-behalf-of source holds tokens for.
    pub fn subjects_held(&self, count: usize) {
        self.subjects.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Sets the token gauges from the source's state; called before each scrape, so that
    /// validity reflects the time of the scrape.
    pub fn token_state(&self, expires_at: Option<SystemTime>, valid: bool) {
        self.expiry.set(expires_at.map_or(0.0, unix_seconds));
        self.valid.set(i64::from(valid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_exist_from_the_start_count_by_outcome_and_go() {
        let metrics = Metrics::new().unwrap();
        let families = TokenMetrics::register(&metrics).unwrap();
        let series = families.series("payments");
        let line = |outcome: &str| {
            format!(r#"bearerd_token_fetch_total{{outcome="{outcome}",upstream="payments"}}"#)
        };
        let text = metrics.render().unwrap();
        for outcome in FetchOutcome::ALL {
            assert!(
                text.contains(&format!("{} 0", line(outcome.label()))),
                "{text}"
            );
        }

        series.fetch_finished(Some(FetchOutcome::Rejected), Duration::from_millis(5));
        series.fetch_finished(Some(FetchOutcome::Success), Duration::from_millis(5));
        series.fetch_finished(None, Duration::ZERO);
        let text = metrics.render().unwrap();
        assert!(text.contains(&format!("{} 1", line("rejected"))));
        assert!(text.contains(&format!("{} 1", line("success"))));
        assert!(text.contains(&format!("{} 0", line("timeout"))));
        assert!(text.contains(r#"bearerd_token_secret_errors_total{upstream="payments"} 1"#));
        assert!(
            text.contains(r#"bearerd_token_fetch_duration_seconds_count{upstream="payments"} 2"#)
        );

        families.forget(&series);
        let text = metrics.render().unwrap();
        assert!(!text.contains(r#"upstream="payments""#), "{text}");
    }

    #[test]
    fn forget_removes_the_cache_series_too() {
        let metrics = Metrics::new().unwrap();
        let families = TokenMetrics::register(&metrics).unwrap();
        let series = families.series("gone");
        let kept = families.series("kept");
        series.cache_operation("redis", "get", "hit");
        series.cache_operation("redis", "get", "hit");
        series.cache_operation("redis", "lease", "busy");
        kept.cache_operation("redis", "get", "miss");
        let text = metrics.render().unwrap();
        assert!(text.contains(
            r#"bearerd_token_cache_operations_total{backend="redis",op="get",outcome="hit",upstream="gone"} 2"#
        ));
        families.forget(&series);
        let text = metrics.render().unwrap();
        assert!(!text.contains(r#"upstream="gone""#), "{text}");
        assert!(text.contains(r#"upstream="kept""#), "{text}");
    }
}
