//! The metric families of TLS interception: tunnels opened and refused by reason,
//! certificates issued, handshakes that failed by reason. Labelled by the listener's name
//! (its first route's), never by the host a client asked for: a client choosing names must
//! not choose how many series there are.

use prometheus::{IntCounter, IntCounterVec, Opts};

use crate::metrics::{Metrics, MetricsError};

/// The families, registered once; [`Series`] holds one listener's.
#[derive(Clone)]
pub(crate) struct InterceptMetrics {
    tunnels_total: IntCounterVec,
    certificates_issued_total: IntCounterVec,
    handshake_failures_total: IntCounterVec,
}

/// What became of a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tunnel {
    /// Opened, with TLS terminated by bearerd.
    Intercepted,
    /// Opened blind to a `passthrough` target.
    Passthrough,
    /// Refused: the target is not a routed host on its port, nor a passthrough target.
    NotServed,
    /// Refused: the target is not `host:port`.
    BadTarget,
    /// The passthrough target could not be reached.
    Unreachable,
}

impl Tunnel {
    fn label(self) -> &'static str {
        match self {
            Self::Intercepted => "intercepted",
            Self::Passthrough => "passthrough",
            Self::NotServed => "refused_not_served",
            Self::BadTarget => "refused_bad_target",
            Self::Unreachable => "passthrough_unreachable",
        }
    }
}

/// Why a TLS handshake inside a tunnel failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handshake {
    /// Not finished within `handshake_timeout`.
    Timeout,
    /// The SNI names another host than the CONNECT did.
    SniMismatch,
    /// Not TLS, or a TLS error (the client refused the certificate, no common cipher…).
    Tls,
    /// The client closed before the handshake ended.
    Closed,
    /// A leaf could not be minted.
    Certificate,
}

impl Handshake {
    fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::SniMismatch => "sni_mismatch",
            Self::Tls => "tls_error",
            Self::Closed => "closed",
            Self::Certificate => "certificate",
        }
    }
}

impl InterceptMetrics {
    /// Registers the families in `metrics`.
    pub(crate) fn register(metrics: &Metrics) -> Result<Self, MetricsError> {
        Ok(Self {
            tunnels_total: metrics.register(IntCounterVec::new(
                Opts::new(
                    "bearerd_intercept_tunnels_total",
                    "CONNECT requests on a forward listener with [listener.intercept], by outcome: intercepted, passthrough, or refused_* and passthrough_unreachable.",
                ),
                &["listener", "outcome"],
            )?)?,
            certificates_issued_total: metrics.register(IntCounterVec::new(
                Opts::new(
                    "bearerd_intercept_certificates_issued_total",
                    "Leaf certificates minted from the interception CA.",
                ),
                &["listener"],
            )?)?,
            handshake_failures_total: metrics.register(IntCounterVec::new(
                Opts::new(
                    "bearerd_intercept_handshake_failures_total",
                    "TLS handshakes inside intercepted tunnels that failed, by reason.",
                ),
                &["listener", "reason"],
            )?)?,
        })
    }

    /// The series of listener `name`.
    pub(crate) fn series(&self, name: &str) -> Series {
        Series {
            families: self.clone(),
            name: name.into(),
            certificates: self.certificates_issued_total.with_label_values(&[name]),
        }
    }
}

/// One listener's series.
pub(crate) struct Series {
    families: InterceptMetrics,
    name: Box<str>,
    certificates: IntCounter,
}

impl Series {
    /// Counts a CONNECT's outcome.
    pub(crate) fn tunnel(&self, outcome: Tunnel) {
        self.families
            .tunnels_total
            .with_label_values(&[&*self.name, outcome.label()])
            .inc();
    }

    /// The counter of leaves minted, which the mints (on the blocking pool) count in.
    pub(crate) fn certificates(&self) -> IntCounter {
        self.certificates.clone()
    }

    /// Counts a failed handshake.
    pub(crate) fn handshake_failed(&self, reason: Handshake) {
        self.families
            .handshake_failures_total
            .with_label_values(&[&*self.name, reason.label()])
            .inc();
    }
}
