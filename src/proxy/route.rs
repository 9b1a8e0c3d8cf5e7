//! What a listener serves: its routes, each an upstream with its token source and settings, in
//! a table from which each request chooses one.
//!
//! An `[[upstream]]` is a listener with one route that takes every request; a
//! `[[listener]]` has a table, and each request goes to the route whose host matches and
//! whose path prefix is the longest on a segment boundary (the first, among equals). A
//! reverse listener reads the host from `Host`, a forward listener from the absolute-form
//! target an app with `HTTP_PROXY` sends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;

use super::body::ReplayBudget;
use super::error::ProxyError;
use super::metrics::RouteSeries;
use super::pool::Pool;
use super::rewrite::{BadTarget, Target};
use crate::config::{self, Mode, RouteMatch};
use crate::tls::{self, TlsError};
use crate::token::credential::Credential;

/// One listener's settings, replaced whole when a reload changes them.
pub struct Listener {
    /// Reverse or forward proxy.
    pub mode: Mode,
    /// Whether to log one line per request (for those refused before a route is chosen).
    pub access_log: bool,
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
    /// The listener of `config` serving `routes`. What is refused before a route is chosen is
    /// counted in `metrics` and answered under `name`: its first route's, so that a listener
    /// of one route (an `[[upstream]]`) is that route.
    pub(crate) fn new(
        config: &config::Listener,
        name: &str,
        routes: Vec<Route>,
        metrics: Arc<RouteSeries>,
        access_log: bool,
    ) -> Self {
        Self {
            mode: config.mode,
            access_log,
            name: name.into(),
            allow_from: config.allow_from.clone(),
            metrics,
            routes: Routes::new(routes),
        }
    }

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
pub struct Routes {
    /// Every route, in file order.
    all: Vec<Arc<Route>>,
    /// The positions of the routes of each exact host (lowercase), so that a request looks
    /// only at its host's routes however long the table: 50 routes matched on the last cost
    /// 0.3–1.4 µs per request when each was compared (docs/benchmarks.md).
    by_host: HashMap<Box<str>, Vec<usize>>,
    /// The positions of the routes that any host may reach: a wildcard host, or none.
    any_host: Vec<usize>,
}

impl Routes {
    /// A table of `routes`, in match order.
    pub fn new(routes: Vec<Route>) -> Self {
        let mut by_host: HashMap<Box<str>, Vec<usize>> = HashMap::new();
        let mut any_host = Vec::new();
        for (position, route) in routes.iter().enumerate() {
            match route.matching.host.as_deref() {
                Some(host) if !host.starts_with("*.") => {
                    by_host.entry(host.into()).or_default().push(position);
                }
                _ => any_host.push(position),
            }
        }
        Self {
            all: routes.into_iter().map(Arc::new).collect(),
            by_host,
            any_host,
        }
    }

    /// The route `request` goes to. A request whose path has `.` or `..` segments is refused:
    /// an upstream would resolve them, and `/v2/../admin` must not reach `/admin` through the
    /// route of `/v2` (nor climb out of an upstream's base path).
    pub fn choose<B>(&self, request: &Request<B>, mode: Mode) -> Result<&Arc<Route>, ProxyError> {
        let uri = request.uri();
        if has_dot_segments(uri.path()) {
            return Err(ProxyError::BadRequest {
                reason: "the path has . or .. segments (perhaps percent-encoded); send it resolved"
                    .into(),
            });
        }
        // An `[[upstream]]`: one route that takes everything, nothing to look at.
        if let [only] = self.all.as_slice() {
            if mode == Mode::Reverse && only.matching.takes_everything() {
                return Ok(only);
            }
        }
        let host = match mode {
            Mode::Forward => uri.host().ok_or_else(|| ProxyError::BadRequest {
                reason: "this is a forward proxy: send absolute-form requests (set HTTP_PROXY=http://<this address>) for http:// URLs of the hosts it serves".into(),
            })?,
            Mode::Reverse => uri.host().or_else(|| host_header(request)).unwrap_or(""),
        };
        // Lowercase is compared without copying; the root's trailing dot is ignored.
        let host = host.strip_suffix('.').unwrap_or(host);
        // Hosts are lowercase in the index; a request's seldom is not.
        let lowercase;
        let exact = match self.by_host.get(host) {
            Some(positions) => positions.as_slice(),
            None if host.bytes().any(|b| b.is_ascii_uppercase()) => {
                lowercase = host.to_ascii_lowercase();
                self.by_host
                    .get(lowercase.as_str())
                    .map_or(&[][..], Vec::as_slice)
            }
            None => &[],
        };
        // The longest prefix wins; among equals, the first in the file.
        let mut best: Option<(usize, usize)> = None;
        for &position in exact.iter().chain(&self.any_host) {
            let Some(route) = self.all.get(position) else {
                continue;
            };
            if !route.matching.host_matches(host) {
                continue;
            }
            let Some(length) = route.matching.prefix_length(uri.path()) else {
                continue;
            };
            let better = best.map_or(true, |(longest, first)| {
                length > longest || (length == longest && position < first)
            });
            if better {
                best = Some((length, position));
            }
        }
        match (best.and_then(|(_, position)| self.all.get(position)), mode) {
            (Some(route), _) => Ok(route),
            (None, Mode::Forward) => Err(ProxyError::HostNotServed),
            (None, Mode::Reverse) => Err(ProxyError::NoRoute),
        }
    }
}

/// The host of the `Host` header, without its port.
fn host_header<B>(request: &Request<B>) -> Option<&str> {
    let value = request.headers().get(http::header::HOST)?.to_str().ok()?;
    Some(match value.strip_prefix('[') {
        // `[::1]:8080` is `[::1]`, as `Uri::host` gives IPv6 literals.
        Some(rest) => rest.find(']').map_or(value, |end| &value[..end + 2]),
        None => value.split(':').next().unwrap_or(value),
    })
}

/// Whether a path has a `.` or `..` segment in any form an upstream server may resolve:
/// percent-encoded (`%2e`), before a path parameter (`..;x`: Tomcat, Jetty, Spring), or
/// between encoded slashes or backslashes (`..%2F`, `..\`, `%5C`: servers that decode
/// them, IIS). Most paths have neither a dot nor an escape and are passed at a glance.
fn has_dot_segments(path: &str) -> bool {
    if !path.contains(['.', '%']) {
        return false;
    }
    let decoded = if path.contains('%') {
        std::borrow::Cow::Owned(decode_separators(path))
    } else {
        std::borrow::Cow::Borrowed(path)
    };
    decoded.split(['/', '\\']).any(|segment| {
        let name = segment.split(';').next().unwrap_or_default();
        name == "." || name == ".."
    })
}

/// `path` with the escapes of `.`, `/`, `\` and `;` decoded, and no others.
fn decode_separators(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at + 1..at + 3).unwrap_or_default();
        let decoded = match escape.to_ascii_lowercase().as_str() {
            "2e" => Some('.'),
            "2f" => Some('/'),
            "5c" => Some('\\'),
            "3b" => Some(';'),
            _ => None,
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[at + 3..];
            }
            None => {
                out.push('%');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether every request `later` would take goes to `earlier` instead: the same prefix (the
/// first among equals wins) and a host `earlier` takes too, matched as requests are.
pub(crate) fn shadows(earlier: &RouteMatch, later: &RouteMatch) -> bool {
    if earlier.path_prefix != later.path_prefix {
        return false;
    }
    match (earlier.host.as_deref(), later.host.as_deref()) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(_), Some(wildcard)) if wildcard.starts_with("*.") => earlier.host == later.host,
        (Some(_), Some(host)) => earlier.host_matches(host),
    }
}

/// How a route matches, compared with what a request names.
trait Matching {
    fn takes_everything(&self) -> bool;
    fn host_matches(&self, host: &str) -> bool;
    fn prefix_length(&self, path: &str) -> Option<usize>;
}

impl Matching for RouteMatch {
    fn takes_everything(&self) -> bool {
        self.host.is_none() && self.path_prefix.is_none()
    }

    /// Whether `host` (any case, no trailing dot) is the route's (lowercase).
    fn host_matches(&self, host: &str) -> bool {
        match self.host.as_deref() {
            None => true,
            Some(pattern) => match pattern.strip_prefix("*.") {
                // One label: `a.example.com`, not `example.com` nor `a.b.example.com`.
                Some(suffix) => {
                    host.len() > suffix.len() + 1 && {
                        let (label, rest) = host.split_at(host.len() - suffix.len() - 1);
                        rest.as_bytes()[0] == b'.'
                            && rest[1..].eq_ignore_ascii_case(suffix)
                            && !label.contains('.')
                    }
                }
                None => host.eq_ignore_ascii_case(pattern),
            },
        }
    }

    /// The length of the route's prefix if `path` falls under it (on a segment boundary), 0
    /// for a route without one; `None` if it does not.
    fn prefix_length(&self, path: &str) -> Option<usize> {
        let Some(prefix) = self.path_prefix.as_deref() else {
            return Some(0);
        };
        if prefix == "/" {
            return Some(1);
        }
        let rest = path.strip_prefix(prefix)?;
        (rest.is_empty() || rest.starts_with('/')).then_some(prefix.len())
    }
}

/// Everything needed to forward a request to one upstream.
pub struct Route {
    /// The configured name, in logs, metrics and error bodies.
    pub name: Arc<str>,
    /// Which requests it takes.
    pub matching: RouteMatch,
    /// Where requests go.
    pub target: Target,
    /// What authorizes its requests: the token, and with DPoP the proof.
    pub(crate) credential: Credential,
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
}

/// What a route needs that can fail to load (the upstream's TLS settings and client
/// certificate, its URL as a target), made before anything runs so that a start or reload
/// either has all of it or changes nothing.
pub(crate) struct Setup {
    tls: rustls::ClientConfig,
    target: Target,
    /// The `x5t#S256` of the client certificate presented to the upstream, if any.
    client_certificate: Option<String>,
}

/// A route that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Trust anchors or the client certificate for the upstream.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The URL cannot be used as a target.
    #[error(transparent)]
    Target(#[from] BadTarget),
}

impl Setup {
    /// Loads what `upstream`'s route needs.
    pub(crate) fn new(upstream: &config::Upstream) -> Result<Self, SetupError> {
        let identity = upstream.tls.identity.as_ref();
        Ok(Self {
            tls: tls::client_config(&upstream.tls, identity)?,
            target: Target::new(&upstream.url)?,
            client_certificate: identity
                .map(|files| tls::LoadedIdentity::read(files).map(|loaded| loaded.fingerprint()))
                .transpose()?,
        })
    }

    /// The `x5t#S256` of the client certificate presented to the upstream, if any.
    pub(crate) fn client_certificate(&self) -> Option<&str> {
        self.client_certificate.as_deref()
    }
}

/// What every route shares: the server's limits and memory for replays.
pub(crate) struct Shared {
    /// `[server] max_connections`: the most upstream connections a route's pool holds.
    pub(crate) max_connections: usize,
    /// `[server] body_idle_timeout`.
    pub(crate) body_idle_timeout: Duration,
    /// Memory for request bodies kept for a replay, shared by every listener.
    pub(crate) replay_budget: ReplayBudget,
    /// `[log] access`.
    pub(crate) access_log: bool,
}

impl Route {
    /// The route of `upstream`, with what `setup` loaded, authorized by `credential`,
    /// counted in `metrics`.
    pub(crate) fn new(
        upstream: &config::Upstream,
        setup: Setup,
        credential: Credential,
        metrics: Arc<RouteSeries>,
        shared: &Shared,
    ) -> Self {
        let Setup { tls, target, .. } = setup;
        let pool = Pool::new(
            tls::connector(tls, upstream.connect_timeout),
            target.dial(),
            shared.max_connections,
        );
        Self {
            name: upstream.name.as_str().into(),
            matching: upstream.route.clone(),
            target,
            credential,
            pool: Arc::new(pool),
            response_header_timeout: upstream.response_header_timeout,
            metrics,
            access_log: shared.access_log,
            retry_on_401: upstream.retry_on_401,
            body_idle_timeout: shared.body_idle_timeout,
            replay_budget: shared.replay_budget.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(host: Option<&str>, prefix: Option<&str>) -> RouteMatch {
        RouteMatch {
            host: host.map(str::to_owned),
            path_prefix: prefix.map(str::to_owned),
            strip_prefix: false,
        }
    }

    #[test]
    fn hosts_match_exactly_in_any_case_or_by_one_wildcard_label() {
        let exact = rule(Some("api.example.com"), None);
        assert!(exact.host_matches("api.example.com"));
        assert!(exact.host_matches("API.Example.COM"));
        assert!(!exact.host_matches("api.example.com.evil"));
        assert!(!exact.host_matches("xapi.example.com"));
        let wildcard = rule(Some("*.example.com"), None);
        assert!(wildcard.host_matches("a.example.com"));
        assert!(wildcard.host_matches("A.EXAMPLE.com"));
        assert!(!wildcard.host_matches("a.b.example.com"), "one label only");
        assert!(!wildcard.host_matches("example.com"));
        assert!(!wildcard.host_matches(".example.com"));
        assert!(!wildcard.host_matches("aexample.com"));
        assert!(rule(Some("[::1]"), None).host_matches("[::1]"));
        assert!(rule(None, None).host_matches("anything"));
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let v2 = rule(None, Some("/v2"));
        assert_eq!(v2.prefix_length("/v2"), Some(3));
        assert_eq!(v2.prefix_length("/v2/users"), Some(3));
        assert_eq!(v2.prefix_length("/v2x"), None);
        assert_eq!(v2.prefix_length("/v"), None);
        assert_eq!(
            v2.prefix_length("/v2%2Fusers"),
            None,
            "an escaped / is not a boundary"
        );
        assert_eq!(rule(None, Some("/")).prefix_length("/anything"), Some(1));
        assert_eq!(rule(None, None).prefix_length("/x"), Some(0));
    }

    #[test]
    fn dot_segments_are_found_also_when_escaped() {
        for path in [
            "/v2/../admin",
            "/v2/./x",
            "/..",
            "/v2/%2e%2e/admin",
            "/v2/%2E./x",
            "/a/.%2e",
        ] {
            assert!(has_dot_segments(path), "{path}");
        }
        for path in [
            "/v2/users",
            "/.well-known/x",
            "/a..b",
            "/.../",
            "/v2/%2e%2e%2e",
            "/",
        ] {
            assert!(!has_dot_segments(path), "{path}");
        }
    }

    #[test]
    fn the_host_header_loses_its_port() {
        let request = |host: &str| Request::get("/").header("host", host).body(()).unwrap();
        assert_eq!(
            host_header(&request("api.example.com:8080")),
            Some("api.example.com")
        );
        assert_eq!(
            host_header(&request("api.example.com")),
            Some("api.example.com")
        );
        assert_eq!(host_header(&request("[::1]:8443")), Some("[::1]"));
        assert_eq!(host_header(&request("[::1]")), Some("[::1]"));
    }
}
