//! Rewriting an app's request for the upstream: the target URI (with a route's path prefix
//! stripped when it says so) and the hop-by-hop headers.

use http::header::{HeaderName, CONNECTION, EXPECT, TRANSFER_ENCODING};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Uri};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), and so are never
/// forwarded. `Proxy-Authorization` carries credentials meant for a proxy, which must not
/// travel further. `Trailer` and `Proxy-Authenticate` were hop-by-hop in RFC 2616 and are
/// still treated so by common proxies.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
];

/// Which of the headers that forwarding acts on a request carries, found in one look over its
/// names (a comparison each, no hashing): most requests carry none, and then pay no lookup
/// (each of which hashes its name) for any of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    /// Any of the hop-by-hop headers (`HOP_BY_HOP`, with `Connection`, which names others).
    pub hop_by_hop: bool,
    /// `Transfer-Encoding`, one of them.
    pub transfer_encoding: bool,
    /// `Expect`.
    pub expect: bool,
}

impl Carried {
    pub fn of(headers: &HeaderMap) -> Self {
        let mut carried = Self::default();
        for name in headers.keys() {
            if name == EXPECT {
                carried.expect = true;
            } else if HOP_BY_HOP.contains(name) {
                carried.hop_by_hop = true;
                carried.transfer_encoding |= name == TRANSFER_ENCODING;
            }
        }
        carried
    }
}

/// Removes the hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if Carried::of(headers).hop_by_hop {
        remove_hop_by_hop(headers);
    }
}

/// What [`strip_hop_by_hop`] does, for a message [`Carried::of`] found hop-by-hop headers in;
/// answers the `Upgrade` header it removed when `Connection` named it (RFC 9110 §7.8): the
/// protocols a request asks to switch to.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // Collect first: the names are borrowed from the map they are removed from.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let upgrade = if named.contains(&http::header::UPGRADE) {
        headers.get(http::header::UPGRADE).cloned()
    } else {
        None
    };
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    upgrade
}

/// Where an upstream's requests go: its scheme, authority and base path, and the forms of them
/// each request needs, made once.
#[derive(Debug, Clone)]
pub struct Target {
    scheme: Scheme,
    authority: Authority,
    /// The configured path without its trailing `/`: `""` or `/v2`.
    base_path: String,
    /// `Host` for HTTP/1.1: the host, and the port unless it is the scheme's default.
    host: HeaderValue,
}

/// The app's request target cannot be forwarded.
#[derive(Debug, thiserror::Error)]
#[error("request target cannot be forwarded: {0}")]
pub struct BadTarget(String);

impl Target {
    /// The target of an upstream `url`, which config validation has made absolute.
    pub fn new(url: &Uri) -> Result<Self, BadTarget> {
        let (Some(scheme), Some(authority)) = (url.scheme(), url.authority()) else {
            return Err(BadTarget(format!("{url} is not absolute")));
        };
        let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => authority.as_str().to_owned(),
            _ => authority.host().to_owned(),
        };
        // Userinfo (`user@host`) is not sent in Host; config validation allows none anyway.
        let host = host
            .rsplit_once('@')
            .map_or(host.as_str(), |(_, h)| h)
            .to_owned();
        Ok(Self {
            scheme: scheme.clone(),
            authority: authority.clone(),
            base_path: url.path().trim_end_matches('/').to_owned(),
            host: HeaderValue::try_from(host).map_err(|e| BadTarget(e.to_string()))?,
        })
    }

    /// The authority, for messages.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Whether an absolute-form request target naming `authority` means this upstream: the
    /// same host (in any case, with or without the root's trailing dot) and, when the request
    /// names a port, the upstream's port. The scheme is not compared: an app sends `http` to
    /// bearerd for an upstream it reaches over `https`.
    pub fn serves(&self, authority: &Authority) -> bool {
        let bare = |host: &str| host.trim_end_matches('.').to_ascii_lowercase();
        let default_port = if self.scheme == Scheme::HTTPS {
            443
        } else {
            80
        };
        let port = self.authority.port_u16().unwrap_or(default_port);
        bare(authority.host()) == bare(self.authority.host())
            && authority.port_u16().map_or(true, |asked| asked == port)
    }

    /// A DPoP proof's `htu` for a request to `path_and_query`: the upstream URL without query
    /// (RFC 9449 §4.2).
    pub fn htu(&self, path_and_query: &PathAndQuery) -> String {
        let path = path_and_query.path();
        let mut url = String::with_capacity(
            self.scheme.as_str().len() + 3 + self.authority.as_str().len() + path.len(),
        );
        url.push_str(self.scheme.as_str());
        url.push_str("://");
        url.push_str(self.authority.as_str());
        url.push_str(path);
        url
    }

    /// `Host` for HTTP/1.1 requests.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// `scheme://authority`: what to connect to.
    pub fn dial(&self) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
        Uri::from_parts(parts).unwrap_or_default()
    }

    /// The upstream path and query for an app's request target: the app's path and query
    /// joined onto the base path. Only the path and query of an absolute-form target are used,
    /// so an app cannot send bearerd's token elsewhere.
    pub fn path_and_query_for(&self, app: Uri) -> Result<PathAndQuery, BadTarget> {
        let parts = app.into_parts();
        let app_path = parts
            .path_and_query
            .as_ref()
            .map_or("/", PathAndQuery::as_str);
        if !app_path.starts_with('/') {
            // `*` (OPTIONS *) is about the proxy itself, not a resource upstream.
            return Err(BadTarget(format!("{app_path:?} is not a path")));
        }
        if !self.base_path.is_empty() {
            // Two pushes into a buffer of the right size: `format!` costs several times more
            // on every request.
            let mut joined = String::with_capacity(self.base_path.len() + app_path.len());
            joined.push_str(&self.base_path);
            joined.push_str(app_path);
            return PathAndQuery::try_from(joined).map_err(|e| BadTarget(e.to_string()));
        }
        // Without a base path the app's path and query are reused as they are, not copied.
        Ok(parts
            .path_and_query
            .unwrap_or_else(|| PathAndQuery::from_static("/")))
    }

    /// The absolute URI of `path_and_query` at the upstream (HTTP/2 sends it whole).
    pub fn absolute(&self, path_and_query: PathAndQuery) -> Result<Uri, BadTarget> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).map_err(|e| BadTarget(e.to_string()))
    }
}

/// `uri` without the route's path prefix: `/v2/users?x=1` is `/users?x=1` under `/v2`.
pub(crate) fn strip_prefix(uri: Uri, prefix: &str) -> Uri {
    let Some(rest) = uri.path().strip_prefix(prefix) else {
        return uri;
    };
    let mut path = String::with_capacity(rest.len() + 1 + uri.query().map_or(0, |q| q.len() + 1));
    if !rest.starts_with('/') {
        path.push('/');
    }
    path.push_str(rest);
    if let Some(query) = uri.query() {
        path.push('?');
        path.push_str(query);
    }
    PathAndQuery::try_from(path).map_or(uri, Uri::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Target {
        Target::new(&url.parse().unwrap()).unwrap()
    }

    /// The upstream URI an HTTP/2 request for `app` is sent to (HTTP/1.1 sends its path and
    /// query part).
    fn joined(url: &str, app: &str) -> String {
        let target = target(url);
        let path_and_query = target.path_and_query_for(app.parse().unwrap()).unwrap();
        target.absolute(path_and_query).unwrap().to_string()
    }

    #[test]
    fn joins_path_and_query_onto_the_base_path() {
        assert_eq!(
            joined("https://api.example.com/v2", "/users?id=1&x=%20"),
            "https://api.example.com/v2/users?id=1&x=%20"
        );
        assert_eq!(
            joined("https://api.example.com/v2/", "/users"),
            "https://api.example.com/v2/users"
        );
        assert_eq!(
            joined("https://api.example.com", "/"),
            "https://api.example.com/"
        );
        assert_eq!(
            joined("http://127.0.0.1:8080/", "/a/b"),
            "http://127.0.0.1:8080/a/b"
        );
        assert_eq!(
            joined("https://api.example.com/v2", "/"),
            "https://api.example.com/v2/"
        );
    }

    #[test]
    fn absolute_form_keeps_only_path_and_query() {
        assert_eq!(
            joined(
                "https://api.example.com/v2",
                "http://evil.example/steal?q=1"
            ),
            "https://api.example.com/v2/steal?q=1"
        );
    }

    #[test]
    fn host_leaves_out_the_default_port() {
        assert_eq!(
            target("https://api.example.com:443/v2").host(),
            "api.example.com"
        );
        assert_eq!(target("http://api.example.com/").host(), "api.example.com");
        assert_eq!(target("http://127.0.0.1:8080/").host(), "127.0.0.1:8080");
        assert_eq!(target("https://[::1]:8443").host(), "[::1]:8443");
        assert_eq!(
            target("https://api.example.com/v2").dial().to_string(),
            "https://api.example.com/"
        );
    }

    #[test]
    fn absolute_form_must_name_the_upstream() {
        let t = target("https://API.example.com/v2");
        let serves = |authority: &str| t.serves(&authority.parse().unwrap());
        assert!(serves("api.example.com"));
        assert!(serves("api.EXAMPLE.com."));
        assert!(serves("api.example.com:443"));
        assert!(!serves("api.example.com:8443"));
        assert!(!serves("other.example"));
        assert!(!serves("api.example.com.evil.example"));
        assert!(!serves("user@other.example"));
        let t = target("http://127.0.0.1:8080");
        assert!(t.serves(&"127.0.0.1:8080".parse().unwrap()));
        assert!(!t.serves(&"127.0.0.1:80".parse().unwrap()));
    }

    #[test]
    fn asterisk_form_is_refused() {
        assert!(target("https://api.example.com")
            .path_and_query_for("*".parse().unwrap())
            .is_err());
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Session-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-session-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-connection", "keep-alive"),
            ("trailer", "x-checksum"),
            ("content-type", "application/json"),
            ("x-request-id", "42"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-request-id"]);
    }

    #[test]
    fn the_upgrade_is_answered_only_when_connection_names_it() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(*name, HeaderValue::from_static(value));
            }
            map
        };
        let mut asked = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        assert_eq!(remove_hop_by_hop(&mut asked).unwrap(), "websocket");
        assert!(asked.get("upgrade").is_none() && asked.get("connection").is_none());
        assert_eq!(asked["sec-websocket-key"], "k");
        let mut not_named = headers(&[("connection", "close"), ("upgrade", "websocket")]);
        assert!(remove_hop_by_hop(&mut not_named).is_none());
        assert!(not_named.is_empty());
    }

    #[test]
    fn one_look_over_the_names_finds_what_forwarding_acts_on() {
        let carried = |names: &[&'static str]| {
            let mut map = HeaderMap::new();
            for name in names {
                map.append(*name, HeaderValue::from_static("x"));
            }
            Carried::of(&map)
        };
        assert_eq!(carried(&["accept", "host", "x-te"]), Carried::default());
        assert_eq!(
            carried(&["accept", "Expect"]),
            Carried {
                expect: true,
                ..Carried::default()
            }
        );
        assert_eq!(
            carried(&["keep-alive"]),
            Carried {
                hop_by_hop: true,
                ..Carried::default()
            }
        );
        assert_eq!(
            carried(&["transfer-encoding", "expect"]),
            Carried {
                hop_by_hop: true,
                transfer_encoding: true,
                expect: true,
            }
        );
        // Nothing hop-by-hop: left alone, though `Connection` would name it otherwise.
        let mut plain = HeaderMap::new();
        plain.append("x-session-hop", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 1);
    }
}
