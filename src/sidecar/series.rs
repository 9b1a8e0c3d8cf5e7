//! Every metric family bearerd exports, each registered by the part that owns it, and the
//! series of one upstream in each.

use std::sync::Arc;

use crate::metrics::{Metrics, MetricsError};
use crate::proxy::intercept::metrics::InterceptMetrics;
use crate::proxy::metrics::{ProxyMetrics, RouteSeries};
use crate::token::metrics::{TokenMetrics, TokenSeries};

/// Every metric family, each registered by the part that owns it.
pub struct MetricFamilies {
    /// The registry they are in, which `/metrics` renders.
    pub registry: Arc<Metrics>,
    token: TokenMetrics,
    proxy: ProxyMetrics,
    /// TLS interception's families, labelled by listener.
    pub(crate) intercept: InterceptMetrics,
}

/// One upstream's series in each family.
pub struct UpstreamSeries {
    /// What its token source reports.
    pub token: Arc<TokenSeries>,
    /// What its listener and route report.
    pub proxy: Arc<RouteSeries>,
}

impl MetricFamilies {
    /// A registry with every family registered.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Metrics::new()?;
        Ok(Self {
            token: TokenMetrics::register(&registry)?,
            proxy: ProxyMetrics::register(&registry)?,
            intercept: InterceptMetrics::register(&registry)?,
            registry: Arc::new(registry),
        })
    }

    /// The series of upstream `name`, exported (at 0) from now on.
    pub fn upstream(&self, name: &str) -> UpstreamSeries {
        UpstreamSeries {
            token: Arc::new(self.token.series(name)),
            proxy: Arc::new(self.proxy.series(name)),
        }
    }

    /// `bearerd_token_cache_up` of `backend`.
    pub fn cache_up(&self, backend: &str) -> prometheus::IntGauge {
        self.token.cache_up(backend)
    }

    /// Stops exporting the series of an upstream that a reload removed.
    pub fn forget(&self, series: &UpstreamSeries) {
        self.token.forget(&series.token);
        self.proxy.forget(&series.proxy);
    }
}
