//! The proxy's metric families: requests by status and duration, requests in flight, requests
//! refused for want of a token, 401 replays, and connections refused, with the series of one
//! upstream resolved once.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

use crate::metrics::{Metrics, MetricsError, RemoveUpstream};

/// Buckets for proxied requests until response headers: sub-millisecond to the 30 s timeout.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Status codes 100–599, each with a slot for its counter, and the slot of every other code.
const STATUS_SLOTS: usize = 501;

/// The slot, and the `code` label, of the codes outside 100–599. hyper passes on any three
/// digits (RFC 9110 §15 defines none above 599): an upstream answering 600–999 must not make
/// a series per code.
const OTHER_STATUS: usize = 500;
const OTHER_STATUS_LABEL: &str = "other";

/// The slot of `status`: its own for 100–599, else [`OTHER_STATUS`].
fn status_slot(status: http::StatusCode) -> usize {
    match status.as_u16() {
        code @ 100..=599 => usize::from(code - 100),
        _ => OTHER_STATUS,
    }
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
    /// Every reason, so that each series exists from the start (at 0).
    pub const ALL: [Self; 2] = [Self::NotAllowed, Self::ListenerFull];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotAllowed => "not_allowed",
            Self::ListenerFull => "listener_full",
        }
    }
}

/// The families the proxy reports to.
pub(crate) struct ProxyMetrics {
    requests_total: IntCounterVec,
    request_duration_seconds: HistogramVec,
    requests_in_flight: IntGaugeVec,
    token_unavailable_total: IntCounterVec,
    unauthorized_retries_total: IntCounterVec,
    connections_refused_total: IntCounterVec,
    upgraded_open: IntGaugeVec,
    upgraded_total: IntCounterVec,
    upgraded_bytes_total: IntCounterVec,
}

/// The `direction` label of `bearerd_upgraded_bytes_total`: bytes the app sent on.
const TO_UPSTREAM: &str = "to_upstream";
/// The `direction` label of `bearerd_upgraded_bytes_total`: bytes the upstream sent on.
const TO_APP: &str = "to_app";

impl ProxyMetrics {
    /// Creates the families and registers them in `metrics`.
    pub(crate) fn register(metrics: &Metrics) -> Result<Self, MetricsError> {
        let upstream = &["upstream"];
        Ok(Self {
            requests_total: metrics.register(IntCounterVec::new(
                Opts::new(
                    "bearerd_requests_total",
                    "Requests answered to the app, by HTTP status sent (100-599, or \"other\").",
                ),
                &["upstream", "code"],
            )?)?,
            request_duration_seconds: metrics.register(HistogramVec::new(
                HistogramOpts::new(
                    "bearerd_request_duration_seconds",
                    "Time from the app's request to the response headers sent back.",
                )
                .buckets(REQUEST_BUCKETS.to_vec()),
                upstream,
            )?)?,
            requests_in_flight: metrics.register(IntGaugeVec::new(
                Opts::new(
                    "bearerd_requests_in_flight",
                    "Requests received and not yet answered with headers.",
                ),
                upstream,
            )?)?,
            token_unavailable_total: metrics.register(IntCounterVec::new(
                Opts::new(
                    "bearerd_token_unavailable_total",
                    "Requests answered 503 because no valid token could be had.",
                ),
                upstream,
            )?)?,
            unauthorized_retries_total: metrics.register(IntCounterVec::new(
                Opts::new(
                    "bearerd_upstream_unauthorized_retries_total",
                    "Requests sent again with a new token after the upstream answered 401.",
                ),
                upstream,
            )?)?,
            connections_refused_total: metrics.register(IntCounterVec::new(
                Opts::new(
                    "bearerd_connections_refused_total",
                    "App connections closed unserved, by reason (not_allowed, listener_full).",
                ),
                &["upstream", "reason"],
            )?)?,
            upgraded_open: metrics.register(IntGaugeVec::new(
                Opts::new(
                    "bearerd_upgraded_connections_open",
                    "Upgraded connections (WebSocket) open now, bytes copied both ways.",
                ),
                upstream,
            )?)?,
            upgraded_total: metrics.register(IntCounterVec::new(
                Opts::new(
                    "bearerd_upgraded_connections_total",
                    "Connections the upstream switched to another protocol (101), since start.",
                ),
                upstream,
            )?)?,
            upgraded_bytes_total: metrics.register(IntCounterVec::new(
                Opts::new(
                    "bearerd_upgraded_bytes_total",
                    "Bytes copied on upgraded connections, by direction (to_upstream, to_app).",
                ),
                &["upstream", "direction"],
            )?)?,
        })
    }

    /// The series of upstream `name`, created now so they are exported (at 0) from the start
    /// (but for `requests_total`, which gets a series per status code as it first occurs).
    pub(crate) fn series(&self, name: &str) -> RouteSeries {
        RouteSeries {
            name: name.to_owned(),
            requests_total: self.requests_total.clone(),
            by_status: std::iter::repeat_with(OnceLock::new)
                .take(STATUS_SLOTS)
                .collect(),
            request_duration: self.request_duration_seconds.with_label_values(&[name]),
            in_flight: self.requests_in_flight.with_label_values(&[name]),
            token_unavailable: self.token_unavailable_total.with_label_values(&[name]),
            unauthorized_retries: self.unauthorized_retries_total.with_label_values(&[name]),
            refused_not_allowed: self
                .connections_refused_total
                .with_label_values(&[name, Refusal::NotAllowed.label()]),
            refused_listener_full: self
                .connections_refused_total
                .with_label_values(&[name, Refusal::ListenerFull.label()]),
            upgraded_open: self.upgraded_open.with_label_values(&[name]),
            upgraded_total: self.upgraded_total.with_label_values(&[name]),
            upgraded_to_upstream: self
                .upgraded_bytes_total
                .with_label_values(&[name, TO_UPSTREAM]),
            upgraded_to_app: self.upgraded_bytes_total.with_label_values(&[name, TO_APP]),
        }
    }

    /// Stops exporting the series of an upstream that a reload removed.
    pub(crate) fn forget(&self, series: &RouteSeries) {
        let name = series.name.as_str();
        for (index, slot) in series.by_status.iter().enumerate() {
            if slot.get().is_none() {
                continue;
            }
            let code = if index == OTHER_STATUS {
                OTHER_STATUS_LABEL.to_owned()
            } else {
                (index + 100).to_string()
            };
            let _ = self.requests_total.remove_label_values(&[name, &code]);
        }
        for family in [
            &self.request_duration_seconds as &dyn RemoveUpstream,
            &self.requests_in_flight,
            &self.token_unavailable_total,
            &self.unauthorized_retries_total,
            &self.upgraded_open,
            &self.upgraded_total,
        ] {
            family.remove_upstream(name);
        }
        for direction in [TO_UPSTREAM, TO_APP] {
            let _ = self
                .upgraded_bytes_total
                .remove_label_values(&[name, direction]);
        }
        for reason in Refusal::ALL {
            let _ = self
                .connections_refused_total
                .remove_label_values(&[name, reason.label()]);
        }
    }
}

/// One upstream's proxy series.
pub struct RouteSeries {
    name: String,
    requests_total: IntCounterVec,
    /// One counter per status code, created on first use: a code that never happens exports
    /// no series, and after the first use the lookup is an atomic load.
    by_status: Vec<OnceLock<IntCounter>>,
    request_duration: Histogram,
    in_flight: IntGauge,
    token_unavailable: IntCounter,
    unauthorized_retries: IntCounter,
    refused_not_allowed: IntCounter,
    refused_listener_full: IntCounter,
    upgraded_open: IntGauge,
    upgraded_total: IntCounter,
    upgraded_to_upstream: IntCounter,
    upgraded_to_app: IntCounter,
}

impl RouteSeries {
    /// A request arrived; the guard counts it in flight until dropped.
    pub fn request_started(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// The app got `status` after `elapsed`.
    pub fn request_answered(&self, status: http::StatusCode, elapsed: Duration) {
        self.request_duration.observe(elapsed.as_secs_f64());
        let slot = status_slot(status);
        if let Some(counter) = self.by_status.get(slot) {
            counter
                .get_or_init(|| {
                    let code = if slot == OTHER_STATUS {
                        OTHER_STATUS_LABEL
                    } else {
                        status.as_str()
                    };
                    self.requests_total
                        .with_label_values(&[self.name.as_str(), code])
                })
                .inc();
        }
    }

    /// A request was answered 503 for want of a token.
    pub fn token_unavailable(&self) {
        self.token_unavailable.inc();
    }

    /// A request was sent again with a new token after a 401.
    pub fn unauthorized_retry(&self) {
        self.unauthorized_retries.inc();
    }

    /// Requests of this route in flight now, for the status page.
    pub(crate) fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// An app connection was closed unserved.
    pub fn connection_refused(&self, why: Refusal) {
        match why {
            Refusal::NotAllowed => &self.refused_not_allowed,
            Refusal::ListenerFull => &self.refused_listener_full,
        }
        .inc();
    }
}

impl RouteSeries {
    /// An upgraded connection opened; the guard counts it open until dropped.
    pub(crate) fn upgrade_opened(&self) -> InFlight<'_> {
        self.upgraded_total.inc();
        self.upgraded_open.inc();
        InFlight(&self.upgraded_open)
    }

    /// The byte counters of upgraded connections: to the upstream, to the app.
    pub(crate) fn upgraded_bytes(&self) -> (IntCounter, IntCounter) {
        (
            self.upgraded_to_upstream.clone(),
            self.upgraded_to_app.clone(),
        )
    }
}

/// Counts a request in flight while it lives.
pub struct InFlight<'a>(&'a IntGauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_exist_from_the_start_and_count() {
        let metrics = Metrics::new().unwrap();
        let families = ProxyMetrics::register(&metrics).unwrap();
        let upstream = families.series("payments");
        let text = metrics.render().unwrap();
        assert!(text.contains(r#"bearerd_requests_in_flight{upstream="payments"} 0"#));
        assert!(text.contains(
            r#"bearerd_connections_refused_total{reason="not_allowed",upstream="payments"} 0"#
        ));
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

        families.forget(&upstream);
        let text = metrics.render().unwrap();
        assert!(!text.contains(r#"upstream="payments""#), "{text}");
    }

    #[test]
    fn codes_outside_100_to_599_share_one_series_that_forget_removes() {
        let metrics = Metrics::new().unwrap();
        let families = ProxyMetrics::register(&metrics).unwrap();
        let upstream = families.series("odd");
        for code in [600, 777, 999, 599, 100] {
            let status = http::StatusCode::from_u16(code).unwrap();
            upstream.request_answered(status, Duration::ZERO);
        }
        let text = metrics.render().unwrap();
        assert!(
            text.contains(r#"bearerd_requests_total{code="other",upstream="odd"} 3"#),
            "{text}"
        );
        assert!(text.contains(r#"bearerd_requests_total{code="599",upstream="odd"} 1"#));
        assert!(text.contains(r#"bearerd_requests_total{code="100",upstream="odd"} 1"#));
        for code in ["600", "777", "999"] {
            assert!(!text.contains(&format!("code=\"{code}\"")), "{text}");
        }
        families.forget(&upstream);
        let text = metrics.render().unwrap();
        assert!(!text.contains(r#"upstream="odd""#), "{text}");
    }
}
