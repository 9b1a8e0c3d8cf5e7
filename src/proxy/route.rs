//! What a listener serves: its routes, each an upstream with its token source and settings, in
//! a table from which each request chooses one.
//!
//! Today every table holds one route, which every request matches (an `[[upstream]]` is a
//! listener with one route); host and path matching are additions to [`Routes::choose`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;

use super::body::ReplayBudget;
use super::metrics::RouteSeries;
use super::pool::Pool;
use super::rewrite::Target;
use crate::token::dpop::{DpopKey, Nonce};
use crate::token::source::Handle;

/// One listener's settings, replaced whole when a reload changes them.
pub struct Listener {
    /// The name in logs and metrics (the upstream's, for an `[[upstream]]`).
    pub name: Arc<str>,
    /// The networks whose peers may connect; `None` for every peer (a loopback listener).
    pub allow_from: Option<Vec<ipnet::IpNet>>,
    /// Where connections refused unserved are counted.
    pub metrics: Arc<RouteSeries>,
    /// Where its requests go.
    pub routes: Routes,
}

impl Listener {
    /// Whether a peer at `ip` may use this listener.
    pub fn admits(&self, ip: IpAddr) -> bool {
        // A listener on `[::]` sees IPv4 peers as `::ffff:a.b.c.d`.
        let ip = ip.to_canonical();
        self.allow_from.as_ref().map_or(true, |networks| {
            networks.iter().any(|net| net.contains(&ip))
        })
    }
}

/// A listener's routes, in match order.
pub struct Routes(Vec<Arc<Route>>);

impl Routes {
    /// A table of one route, which every request matches.
    pub fn one(route: Route) -> Self {
        Self(vec![Arc::new(route)])
    }

    /// The route `request` goes to, if any matches.
    pub fn choose<B>(&self, _request: &Request<B>) -> Option<&Arc<Route>> {
        self.0.first()
    }
}

/// Everything needed to forward a request to one upstream.
pub struct Route {
    /// The configured name, in logs, metrics and error bodies.
    pub name: Arc<str>,
    /// Where requests go.
    pub target: Target,
    /// The token source this route reads.
    pub token: Handle,
    /// Connections to the upstream.
    pub pool: Arc<Pool>,
    /// From sending a request to the upstream's response headers.
    pub response_header_timeout: Duration,
    /// This route's metric series.
    pub metrics: Arc<RouteSeries>,
    /// Whether to log one line per request.
    pub access_log: bool,
    /// Whether to replay a request the upstream answers 401, with a new token.
    pub retry_on_401: bool,
    /// How long the app's request body may make no progress.
    pub body_idle_timeout: Duration,
    /// Memory for request bodies kept for a replay, shared by all listeners.
    pub replay_budget: ReplayBudget,
    /// With `dpop = true`: the proofs every request carries.
    pub dpop: Option<Dpop>,
}

/// What a route's DPoP proofs need (RFC 9449 §7).
pub struct Dpop {
    /// The token source's key.
    pub key: Arc<DpopKey>,
    /// The upstream's latest nonce.
    pub nonce: Nonce,
    /// Counts requests sent again with the upstream's new nonce.
    pub retries: prometheus::IntCounter,
}
