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
use crate::config::{self, Mode, RouteMatch, UpstreamProtocol};
use crate::egress::Egress;
use crate::telemetry::Telemetry;
use crate::tls::{self, TlsError};
use crate::token::credential::Credential;

/// One listener's settings, replaced whole when a reload changes them.
pub(crate) struct Listener {
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
    /// `[listener.intercept]`: CONNECT to its routed hosts is answered with TLS of bearerd's.
    pub intercept: Option<Arc<super::intercept::Intercept>>,
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
        intercept: Option<Arc<super::intercept::Intercept>>,
    ) -> Self {
        Self {
            mode: config.mode,
            access_log,
            name: name.into(),
            allow_from: config.allow_from.clone(),
            metrics,
            routes: Routes::new(routes),
            intercept,
        }
    }

    /// Whether a peer at `ip` may use this listener.
    pub(crate) fn admits(&self, ip: IpAddr) -> bool {
        // A listener on `[::]` sees IPv4 peers as `::ffff:a.b.c.d`.
        let ip = ip.to_canonical();
        self.allow_from.as_ref().map_or(true, |networks| {
            networks.iter().any(|net| net.contains(&ip))
        })
    }
}

/// A listener's routes, in match order.
pub(crate) struct Routes {
    /// Every route, in file order.
    all: Vec<Arc<Route>>,
    /// The positions of the routes of each exact host (lowercase), so that a request looks
    /// only at its host's routes however long the table: 50 routes matched on the last cost
    /// 0.3–1.4 µs per request when each was compared (docs/benchmarks.md).
    by_host: HashMap<Box<str>, Vec<usize>>,
    /// The positions of the routes that any host may reach: a wildcard host, or none.
    any_host: Vec<usize>,
    /// Whether a route's host names a port (`api.example:8443`, the port an intercepted
    /// tunnel is opened to): only then is a forward request's port looked at.
    has_ports: bool,
}

impl Routes {
    /// A table of `routes`, in match order.
    pub(crate) fn new(routes: Vec<Route>) -> Self {
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
        let has_ports = by_host.keys().any(|host| host_port(host).1.is_some());
        Self {
            all: routes.into_iter().map(Arc::new).collect(),
            by_host,
            any_host,
            has_ports,
        }
    }

    /// Whether a route names `host` (lowercase, no trailing dot) on `port`: a route whose host
    /// names that port, or, for 443, one whose host names none (exact or by its one-label
    /// wildcard). A route without a host does not name any.
    pub(crate) fn names_target(&self, host: &str, port: u16) -> bool {
        if port == 443 {
            return self.names_host(host);
        }
        self.has_ports && self.by_host.contains_key(format!("{host}:{port}").as_str())
    }

    /// Whether a route names `host` without a port (lowercase, no trailing dot): by its exact
    /// host or its one-label wildcard. A route without a host does not name any.
    fn names_host(&self, host: &str) -> bool {
        self.by_host.contains_key(host)
            || self.any_host.iter().any(|&position| {
                self.all.get(position).is_some_and(|route| {
                    route.matching.host.is_some() && route.matching.host_matches(host)
                })
            })
    }

    /// The route `request` goes to. A request whose path has `.` or `..` segments is refused:
    /// an upstream would resolve them, and `/v2/../admin` must not reach `/admin` through the
    /// route of `/v2` (nor climb out of an upstream's base path).
    ///
    /// On a reverse listener, two `Host` headers or an invalid one are refused too, whatever
    /// the route (RFC 9112 §3.2: 400).
    pub(crate) fn choose<B>(
        &self,
        request: &Request<B>,
        mode: Mode,
    ) -> Result<&Arc<Route>, ProxyError> {
        let uri = request.uri();
        if has_dot_segments(uri.path()) {
            return Err(ProxyError::BadRequest {
                reason: "the path has . or .. segments (perhaps percent-encoded), or a double-encoded, %u or overlong UTF-8 escape; send it resolved and encoded once".into(),
            });
        }
        let named = match mode {
            Mode::Reverse => host_header(request)?,
            Mode::Forward => None,
        };
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
            // (Only ASCII is left in a checked host.)
            Mode::Reverse => uri
                .host()
                .or_else(|| named.and_then(|host| std::str::from_utf8(host).ok()))
                .unwrap_or(""),
        };
        // Lowercase is compared without copying; the root's trailing dot is ignored.
        let host = host.strip_suffix('.').unwrap_or(host);
        // A forward request naming a port a route names goes to that route: looked up as
        // `host:port` (only when some route names a port).
        let with_port;
        let host = match (mode, uri.port()) {
            (Mode::Forward, Some(port)) if self.has_ports => {
                with_port = format!("{}:{}", host.to_ascii_lowercase(), port.as_str());
                if self.by_host.contains_key(with_port.as_str()) {
                    with_port.as_str()
                } else {
                    host
                }
            }
            _ => host,
        };
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
        // Whether a route names this host (not one that takes any host), for the refusal.
        let mut host_named = false;
        for &position in exact.iter().chain(&self.any_host) {
            let Some(route) = self.all.get(position) else {
                continue;
            };
            if !route.matching.host_matches(host) {
                continue;
            }
            host_named |= route.matching.host.is_some();
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
            (None, Mode::Forward) if host_named => Err(ProxyError::PathNotServed),
            (None, Mode::Forward) => Err(ProxyError::HostNotServed),
            (None, Mode::Reverse) => Err(ProxyError::NoRoute),
        }
    }
}

/// The host of the request's `Host` header, without its port; `None` without one. A request
/// with two `Host` headers, or with one that is not `uri-host [ ":" port ]` (RFC 9110 §7.2:
/// an RFC 3986 §3.2.2 host, a port of digits up to 65535), is refused: RFC 9112 §3.2 says 400.
/// Parsed in place: the usual request, one valid `Host`, costs no allocation.
fn host_header<B>(request: &Request<B>) -> Result<Option<&[u8]>, ProxyError> {
    let mut values = request.headers().get_all(http::header::HOST).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ProxyError::BadRequest {
            reason: "the request has more than one Host header (RFC 9112 §3.2)".into(),
        });
    }
    host_of(value.as_bytes())
        .map(Some)
        .ok_or_else(|| ProxyError::BadRequest {
            reason: "the Host header is not a host and an optional port of 0 to 65535 (RFC 9112 §3.2, RFC 3986 §3.2.2)".into(),
        })
}

/// A route host split into its name and its port, if it names one (`[::1]:8443` included).
fn host_port(host: &str) -> (&str, Option<&str>) {
    let split_at = match host.strip_prefix('[') {
        Some(v6) => v6.find("]:").map(|at| at + 2),
        None => host.find(':'),
    };
    match split_at {
        Some(at) => (&host[..at], host.get(at + 1..)),
        None => (host, None),
    }
}

/// The host of a `Host` value, without its port, if the value is `uri-host [ ":" port ]`. An
/// empty value is allowed (RFC 9112 §3.2: a target without an authority), and so is an empty
/// port (RFC 3986 §3.2.3: `port = *DIGIT`). Every request on a reverse listener comes through
/// here, so the usual value (a name or an IPv4 address, and a port) is read in one pass over
/// its bytes (callgrind: a pass over `&str` with `split_once` and a `match` per byte cost
/// about 400 instructions per request more).
fn host_of(value: &[u8]) -> Option<&[u8]> {
    let (host, port) = match value.strip_prefix(b"[") {
        // IP-literal: an IPv6 address in brackets, kept with them, as `Uri::host` gives it.
        // (IPvFuture and zone identifiers are not used in HTTP: refused.)
        Some(rest) => {
            let end = rest.iter().position(|&b| b == b']')?;
            std::str::from_utf8(&rest[..end])
                .ok()?
                .parse::<std::net::Ipv6Addr>()
                .ok()?;
            let (host, after) = value.split_at(end + 2);
            let port = match after.strip_prefix(b":") {
                Some(port) => port,
                None if after.is_empty() => &[][..],
                None => return None,
            };
            (host, port)
        }
        // IPv4address or reg-name: unreserved, pct-encoded and sub-delims only (RFC 3986
        // §3.2.2); an IPv4 address is made of such characters.
        None => {
            let mut at = 0;
            while let Some(&byte) = value.get(at) {
                if REG_NAME[usize::from(byte)] {
                    at += 1;
                } else if byte == b'%' && hex_at(value, at + 1).is_some() {
                    at += 3;
                } else if byte == b':' {
                    break;
                } else {
                    return None;
                }
            }
            let (host, rest) = value.split_at(at);
            (host, rest.get(1..).unwrap_or_default())
        }
    };
    // Digits only, at most 65535; leading zeros are digits too.
    let mut number: u32 = 0;
    for &byte in port {
        if !byte.is_ascii_digit() {
            return None;
        }
        number = number * 10 + u32::from(byte - b'0');
        if number > u32::from(u16::MAX) {
            return None;
        }
    }
    // ASCII only by now; made a `&str` only where a route is chosen by it.
    Some(host)
}

/// The characters of an RFC 3986 §3.2.2 reg-name besides `%`-escapes: unreserved and
/// sub-delims.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = matches!(
            byte as u8,
            b'A'..=b'Z'
                | b'a'..=b'z'
                | b'0'..=b'9'
                | b'-'
                | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        );
        byte += 1;
    }
    table
};

/// Whether a path has a `.` or `..` segment in any form an upstream server may resolve:
/// percent-encoded (`%2e`), before a path parameter (`..;x`: Tomcat, Jetty, Spring), or
/// between encoded slashes or backslashes (`..%2F`, `..\`, `%5C`: servers that decode
/// them, IIS). Escapes that a server decoding twice, or decoding the wrong way, would turn
/// into such a segment are refused wherever they are ([`has_disguised_escape`]). Most paths
/// have neither a dot nor an escape and are passed at a glance.
fn has_dot_segments(path: &str) -> bool {
    if !path.contains(['.', '%']) {
        return false;
    }
    let decoded = if path.contains('%') {
        if has_disguised_escape(path.as_bytes()) {
            return true;
        }
        std::borrow::Cow::Owned(decode_separators(path))
    } else {
        std::borrow::Cow::Borrowed(path)
    };
    decoded.split(['/', '\\']).any(|segment| {
        let name = segment.split(';').next().unwrap_or_default();
        name == "." || name == ".."
    })
}

/// The byte of the two hex digits at `at`, if there are two.
fn hex_at(bytes: &[u8], at: usize) -> Option<u8> {
    let digit = |at: usize| bytes.get(at).and_then(|&b| char::from(b).to_digit(16));
    let value = digit(at)? * 16 + digit(at + 1)?;
    u8::try_from(value).ok()
}

/// A hex digit at `at`, written as itself or percent-encoded (`%32` is `2`): its value and
/// where the next character starts.
fn layered_digit(bytes: &[u8], at: usize) -> Option<(u32, usize)> {
    match *bytes.get(at)? {
        b'%' => char::from(hex_at(bytes, at + 1)?)
            .to_digit(16)
            .map(|value| (value, at + 3)),
        byte => char::from(byte).to_digit(16).map(|value| (value, at + 1)),
    }
}

/// Whether `byte`, once a second decoding makes it of an escape, would be a separator or a
/// dot, another escape, or the lead byte of an overlong UTF-8 form.
fn is_dangerous_decoded(byte: u32) -> bool {
    matches!(
        byte,
        0x2e | 0x2f | 0x5c | 0x25 | 0xc0 | 0xc1 | 0xe0 | 0xf0 | 0xf8 | 0xfc
    )
}

/// Whether a path has an escape that a server decoding twice or by an older rule would turn
/// into a dot or separator (and so perhaps a dot segment): a double encoding (`%252e`,
/// `%252f`, `%255c`, `%25%32%65`, `%%32%65`), a `%u` escape (`%u002e`, IIS), or an overlong
/// UTF-8 form (`%c0%ae`, `%e0%80%ae`; lenient decoders read them as `.`, `/` or `\`). Every
/// `%c0` and `%c1` is overlong; `%e0` and `%f0` are when their next byte is too small.
fn has_disguised_escape(bytes: &[u8]) -> bool {
    let mut at = 0;
    while let Some(found) = bytes
        .get(at..)
        .and_then(|rest| rest.iter().position(|&b| b == b'%'))
    {
        at += found;
        if matches!(bytes.get(at + 1), Some(b'u' | b'U')) {
            return true;
        }
        match hex_at(bytes, at + 1) {
            // `%25`: what follows is an escape after one decoding.
            Some(0x25) => {
                if disguised_after_percent(bytes, at + 3) {
                    return true;
                }
            }
            Some(0xc0 | 0xc1) => return true,
            Some(lead @ (0xe0 | 0xf0 | 0xf8 | 0xfc)) => {
                // The smallest second byte that is not overlong, for each lead (RFC 3629 §4
                // for the first two; the five- and six-byte forms are not UTF-8 at all).
                let smallest = match lead {
                    0xe0 => 0xa0,
                    0xf0 => 0x90,
                    0xf8 => 0x88,
                    _ => 0x84,
                };
                if bytes.get(at + 3) == Some(&b'%')
                    && hex_at(bytes, at + 4).is_some_and(|next| (0x80..smallest).contains(&next))
                {
                    return true;
                }
            }
            Some(_) => {}
            // A `%` that is not an escape by itself, but `%%32%65` is `%2e` to a decoder
            // that decodes the digits first.
            None => {
                if disguised_after_percent(bytes, at + 1) {
                    return true;
                }
            }
        }
        at += 1;
    }
    false
}

/// Whether the text at `at`, after a `%` that a decoding produced or left, makes an escape a
/// second decoding would turn into something [`is_dangerous_decoded`] (or a `%u` escape).
fn disguised_after_percent(bytes: &[u8], at: usize) -> bool {
    let u_next = match bytes.get(at) {
        Some(b'u' | b'U') => true,
        Some(b'%') => matches!(hex_at(bytes, at + 1), Some(b'u' | b'U')),
        _ => false,
    };
    if u_next {
        return true;
    }
    let Some((high, next)) = layered_digit(bytes, at) else {
        return false;
    };
    let Some((low, _)) = layered_digit(bytes, next) else {
        return false;
    };
    is_dangerous_decoded(high * 16 + low)
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
pub(crate) struct Route {
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
    /// How long the upstream's response body may make no progress; `None`: for ever.
    pub response_body_idle_timeout: Option<Duration>,
    /// The `Upgrade` protocols passed to the upstream (lowercase); others are dropped.
    pub upgrade_protocols: Box<[String]>,
    /// `[server] upgraded_idle_timeout`.
    pub upgraded_idle_timeout: Duration,
    /// Memory for request bodies kept for a replay, shared by all listeners.
    pub replay_budget: ReplayBudget,
    /// `[telemetry]`: the tracer of its requests; `None`, nothing is traced.
    pub(crate) telemetry: Option<Arc<Telemetry>>,
}

/// What a route needs that can fail to load (the upstream's TLS settings and client
/// certificate, its URL as a target), made before anything runs so that a start or reload
/// either has all of it or changes nothing.
pub(crate) struct Setup {
    tls: rustls::ClientConfig,
    target: Target,
    /// The `x5t#S256` of the client certificate presented to the upstream, if any.
    client_certificate: Option<String>,
    /// `[egress]`: the proxy the upstream is reached through, if any.
    egress: Option<Arc<Egress>>,
}

/// A route that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SetupError {
    /// Trust anchors or the client certificate for the upstream.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The URL cannot be used as a target.
    #[error(transparent)]
    Target(#[from] BadTarget),
}

impl Setup {
    /// Loads what `upstream`'s route needs; the upstream is reached through `egress` when
    /// given.
    pub(crate) fn new(
        upstream: &config::Upstream,
        egress: Option<&Arc<Egress>>,
    ) -> Result<Self, SetupError> {
        let identity = upstream.tls.identity.as_ref();
        Ok(Self {
            tls: tls::client_config(&upstream.tls, identity)?,
            target: Target::new(&upstream.url)?,
            client_certificate: identity
                .map(|files| tls::LoadedIdentity::read(files).map(|loaded| loaded.fingerprint()))
                .transpose()?,
            egress: egress.cloned(),
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
    /// `[server] upgraded_idle_timeout`.
    pub(crate) upgraded_idle_timeout: Duration,
    /// Memory for request bodies kept for a replay, shared by every listener.
    pub(crate) replay_budget: ReplayBudget,
    /// `[log] access`.
    pub(crate) access_log: bool,
    /// `[telemetry]`, when on.
    pub(crate) telemetry: Option<Arc<Telemetry>>,
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
        let Setup {
            tls,
            target,
            egress,
            ..
        } = setup;
        let (timeout, egress) = (upstream.connect_timeout, egress.as_ref());
        // An upgrade (WebSocket) is HTTP/1.1 only: its connections offer nothing else by ALPN.
        let upgrades = tls::http1_connector(tls.clone(), timeout, egress);
        let connector = match upstream.protocol {
            UpstreamProtocol::Http1 => upgrades.clone(),
            // h2c through a proxy: the preface goes inside the CONNECT tunnel.
            UpstreamProtocol::Auto | UpstreamProtocol::H2c => tls::connector(tls, timeout, egress),
        };
        let pool = Pool::new(
            connector,
            upgrades,
            target.dial(),
            shared.max_connections,
            upstream.protocol == UpstreamProtocol::H2c,
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
            response_body_idle_timeout: upstream.response_body_idle_timeout,
            upgrade_protocols: upstream.upgrade_protocols.clone().into_boxed_slice(),
            upgraded_idle_timeout: shared.upgraded_idle_timeout,
            replay_budget: shared.replay_budget.clone(),
            telemetry: shared.telemetry.clone(),
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
        let host = |value: &str| {
            host_header(&request(value))
                .unwrap()
                .map(|host| String::from_utf8(host.to_vec()).unwrap())
        };
        assert_eq!(
            host("api.example.com:8080"),
            Some("api.example.com".to_owned())
        );
        assert_eq!(host("api.example.com"), Some("api.example.com".to_owned()));
        assert_eq!(host("[::1]:8443"), Some("[::1]".to_owned()));
        assert_eq!(host("[::1]"), Some("[::1]".to_owned()));
        assert_eq!(host("10.0.0.1:0"), Some("10.0.0.1".to_owned()));
        assert_eq!(
            host("api.example.com:65535"),
            Some("api.example.com".to_owned())
        );
        assert_eq!(
            host("api.example.com:00080"),
            Some("api.example.com".to_owned())
        );
        // RFC 3986 §3.2.3: `port = *DIGIT`; RFC 9112 §3.2: empty when the target has no
        // authority.
        assert_eq!(host("api.example.com:"), Some("api.example.com".to_owned()));
        assert_eq!(host(""), Some("".to_owned()));
        assert_eq!(
            host_header(&Request::get("/").body(()).unwrap()).unwrap(),
            None
        );
    }

    #[test]
    fn two_host_headers_or_an_invalid_one_are_refused() {
        let two = Request::get("/")
            .header("host", "a.example")
            .header("host", "a.example")
            .body(())
            .unwrap();
        assert!(matches!(
            host_header(&two),
            Err(ProxyError::BadRequest { .. })
        ));
        for value in [
            "api.example.com:65536",
            "api.example.com:99999999999999999999",
            "api.example.com:-1",
            "api.example.com:+80",
            "api.example.com:80a",
            "api.example.com:80:80",
            "api.example.com: 80",
            "user@api.example.com",
            "api.example.com/x",
            "api example.com",
            "[::1",
            "[::1]x",
            "[::1]:8080x",
            "[not-v6]",
            "[v1.x]",
            "[fe80::1%25eth0]",
            "%zz.example",
            "a\\b",
        ] {
            let request = Request::get("/").header("host", value).body(()).unwrap();
            assert!(
                matches!(host_header(&request), Err(ProxyError::BadRequest { .. })),
                "{value}"
            );
        }
    }

    #[test]
    fn disguised_dots_and_separators_are_refused() {
        for path in [
            // Double encoding, in either case and with the digits themselves encoded.
            "/v2/%252e%252e/admin",
            "/v2/%252E%252E/admin",
            "/a%252fb",
            "/a%252Fb",
            "/a%255cb",
            "/a%25%32%65",
            "/a%25%32e",
            "/a%%32%65%%32%65/x",
            "/a%25252e",
            "/a%25u002e",
            "/a%25%75002e",
            // %u escapes (IIS).
            "/v2/%u002e%u002e/admin",
            "/%U002F",
            "/a%u",
            // Overlong UTF-8 forms of `.`, `/`, `\`.
            "/%c0%ae%c0%ae/admin",
            "/a%c0%afb",
            "/a%C1%9Cb",
            "/%e0%80%ae",
            "/%E0%80%AF",
            "/%f0%80%80%ae",
            "/%f8%80%80%80%ae",
            "/%fc%80%80%80%80%ae",
            "/%c0",
        ] {
            assert!(has_dot_segments(path), "{path}");
        }
        for path in [
            "/a%20b",
            "/%25",
            "/100%25off",
            "/a%2541",
            "/caf%c3%a9",
            "/%e0%a4%85",
            "/%f0%9f%98%80",
            "/a%2fb",
            "/%",
            "/a%2",
            "/a%e0",
        ] {
            assert!(!has_dot_segments(path), "{path}");
        }
    }
}
