//! Prometheus metrics: one [`Metrics`] owning its own `Registry` (never the global one).
//!
//! Each part of bearerd registers the families it owns (`token::metrics`, `proxy::metrics`)
//! and resolves each upstream's series once, so that the request path neither locks nor
//! allocates for metrics. Names and labels are fixed, for dashboards and alerts to rely on;
//! `upstream` is the configured name, and no label ever carries a path or a token.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

/// The registry every family is registered in, with bearerd's own build and process metrics.
/// A clone is another handle on the same registry (tests read it after a shutdown).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
}

/// The metrics could not be set up (a programming error: names are constants).
#[derive(Debug, thiserror::Error)]
#[error("metrics setup failed: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// A registry with `bearerd_build_info` and the process collector where supported.
    pub fn new() -> Result<Self, MetricsError> {
        let metrics = Self {
            registry: Registry::new(),
        };
        let build_info = metrics.register(IntGaugeVec::new(
            Opts::new(
                "bearerd_build_info",
                "Always 1; the version is in the label.",
            ),
            &["version"],
        )?)?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        #[cfg(target_os = "linux")]
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    /// Registers a family and hands it back, for its owner to keep.
    pub(crate) fn register<C: Collector + Clone + 'static>(
        &self,
        family: C,
    ) -> Result<C, MetricsError> {
        self.registry.register(Box::new(family.clone()))?;
        Ok(family)
    }

    /// The registry in the text exposition format (version 0.0.4).
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// A family labelled by `upstream` alone, whose series of one upstream can be removed.
pub(crate) trait RemoveUpstream {
    /// Removes the series of `name`, if there is one.
    fn remove_upstream(&self, name: &str);
}

impl<T: prometheus::core::MetricVecBuilder> RemoveUpstream for prometheus::core::MetricVec<T> {
    fn remove_upstream(&self, name: &str) {
        let _ = self.remove_label_values(&[name]);
    }
}

/// Seconds since the Unix epoch, as timestamp gauges hold them (0 before it).
pub(crate) fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_is_exported_from_the_start() {
        let text = Metrics::new().unwrap().render().unwrap();
        assert!(text.contains(&format!(
            r#"bearerd_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn a_family_registered_twice_is_an_error() {
        let metrics = Metrics::new().unwrap();
        let family = || IntGaugeVec::new(Opts::new("bearerd_x", "x"), &["upstream"]).unwrap();
        metrics.register(family()).unwrap();
        assert!(metrics.register(family()).is_err());
    }
}
