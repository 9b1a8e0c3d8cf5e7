//! `GET /status`: what every token source and listener is doing now, as a page a person reads
//! in a browser (plain HTML, no script) or as JSON for `Accept: application/json`.
//!
//! It reads the same state as `/readyz` and `/metrics`: each source's published state, the
//! fetch counters and in-flight gauges of its series, the cache's health. It shows no secret,
//! token, key or subject; what came from the network (an endpoint's error code) is summarised
//! as `/readyz` does and, like every value on the page, HTML-escaped. Only loopback peers
//! (`kubectl port-forward`) and `[admin] status_from` networks may read it: it names the
//! token endpoints' clients and the routes, which the probes' and scrapers' networks need not
//! learn.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, VARY};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use tokio::time::Instant;

use super::Watched;
use crate::config::{self, Config, Mode};
use crate::proxy::metrics::RouteSeries;
use crate::token::audit::issued_at;
use crate::token::cache::Store;
use crate::token::source::Phase;

/// What the status page shows besides each upstream's token state, set by the sidecar at
/// start and on each reload.
#[derive(Default)]
pub(crate) struct Overview {
    /// The config file bearerd runs.
    config_file: PathBuf,
    /// How each upstream's source obtains tokens, by upstream name.
    sources: BTreeMap<String, Obtains>,
    /// The listeners, in file order.
    listeners: Vec<ListenerInfo>,
    /// `[cache]`, when there is one.
    cache: Option<Arc<Store>>,
}

/// How a source obtains its tokens.
struct Obtains {
    grant: &'static str,
    client_auth: &'static str,
    dpop: bool,
}

/// A listener: where, how, and its routes in match order.
struct ListenerInfo {
    listen: SocketAddr,
    mode: Mode,
    routes: Vec<RouteInfo>,
}

/// A route: what it takes, where it goes, and its series (for the requests in flight).
struct RouteInfo {
    name: String,
    matching: config::RouteMatch,
    upstream: String,
    series: Option<Arc<RouteSeries>>,
}

impl Overview {
    /// The overview of `config`, whose listeners are bound where `bound` says, counting
    /// requests in the series `series` gives each route.
    pub(crate) fn of(
        config: &Config,
        bound: impl Fn(&config::Listener) -> Option<SocketAddr>,
        series: impl Fn(&str) -> Option<Arc<RouteSeries>>,
        cache: Option<Arc<Store>>,
    ) -> Self {
        let sources = config
            .upstreams
            .iter()
            .map(|upstream| {
                let token = &upstream.token;
                let obtains = Obtains {
                    grant: token.grant_name(),
                    client_auth: token.auth.method(),
                    dpop: token.dpop.is_some(),
                };
                (upstream.name.clone(), obtains)
            })
            .collect();
        let listeners = config
            .listeners
            .iter()
            .map(|listener| ListenerInfo {
                listen: bound(listener).unwrap_or(listener.listen),
                mode: listener.mode,
                routes: crate::sidecar::routes_in_match_order(config, listener)
                    .into_iter()
                    .map(|upstream| RouteInfo {
                        name: upstream.name.clone(),
                        matching: upstream.route.clone(),
                        upstream: where_to(&upstream.url),
                        series: series(&upstream.name),
                    })
                    .collect(),
            })
            .collect();
        Self {
            config_file: config.path.clone(),
            sources,
            listeners,
            cache,
        }
    }
}

/// Scheme, host, port and base path of an upstream URL: never userinfo, never a query.
fn where_to(url: &http::Uri) -> String {
    let scheme = url.scheme_str().unwrap_or("https");
    let host = url.host().unwrap_or("");
    let port = url.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!("{scheme}://{host}{port}{}", url.path())
}

/// Whether `peer` may read the status page: loopback, or in `status_from`.
pub(crate) fn may_read(peer: IpAddr, status_from: &[ipnet::IpNet]) -> bool {
    // A listener on `[::]` sees IPv4 peers as `::ffff:a.b.c.d`.
    let peer = peer.to_canonical();
    peer.is_loopback() || status_from.iter().any(|net| net.contains(&peer))
}

/// Whether the client asked for JSON: an `Accept` naming `application/json` (not at q=0).
pub(crate) fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let refused = parts.any(|p| p.eq_ignore_ascii_case("q=0") || p == "q=0.0");
            media.eq_ignore_ascii_case("application/json") && !refused
        })
}

/// The page as data: what the JSON form is, and what the HTML form shows.
#[derive(Debug, Serialize)]
pub(crate) struct Page {
    /// bearerd's version.
    version: &'static str,
    /// The config file it runs.
    config_file: String,
    /// When the page was made (RFC 3339, UTC).
    generated_at: String,
    /// What `/readyz` would answer now: every upstream has a usable token, and no shutdown.
    ready: bool,
    /// Whether shutdown has begun.
    draining: bool,
    token_sources: Vec<SourceView>,
    cache: Option<CacheView>,
    listeners: Vec<ListenerView>,
}

#[derive(Debug, Serialize)]
struct SourceView {
    /// The upstreams that share it, in file order.
    upstreams: Vec<String>,
    grant: &'static str,
    client_auth: &'static str,
    dpop: bool,
    /// `ready` (a usable token), `not_ready` or `down` (restarting after a failure).
    state: &'static str,
    /// What the refresher does: fetching, scheduled, backing_off, restarting, stopped.
    phase: &'static str,
    /// Seconds until the next refresh or retry, when one is scheduled.
    next_attempt_in_seconds: Option<u64>,
    /// Why there is no usable token, as `/readyz` says it.
    not_ready_because: Option<String>,
    token: Option<TokenView>,
    /// The last failed token request, summarised as `/readyz` does; cleared by a success.
    last_error: Option<String>,
    /// Failed requests since the last success.
    failures: u32,
    /// Token requests by outcome, as `bearerd_token_fetch_total` counts them.
    fetches: BTreeMap<&'static str, u64>,
    /// On-behalf-of sources: a token per subject, fetched on demand.
    #[serde(skip_serializing_if = "Option::is_none")]
    on_behalf_of: Option<OnBehalfView>,
}

#[derive(Debug, Serialize)]
struct OnBehalfView {
    /// The request header the subject token comes in.
    header: String,
    /// Subjects whose tokens are held now.
    cached_subjects: usize,
    /// The most held (`max_subjects`).
    max_subjects: usize,
}

#[derive(Debug, Serialize)]
struct TokenView {
    /// When bearerd obtained it (its last refresh), RFC 3339.
    obtained_at: String,
    /// Seconds since then.
    age_seconds: u64,
    /// Its expiry, RFC 3339.
    expires_at: String,
    /// Seconds until then (0 once past).
    expires_in_seconds: u64,
    /// Whether it is still sent (expiry less the safety margin not yet reached).
    usable: bool,
    /// Where its lifetime came from (expires_in, the JWT exp claim, the cache, ...).
    lifetime_from: String,
}

#[derive(Debug, Serialize)]
struct CacheView {
    backend: &'static str,
    /// Whether its last call succeeded.
    up: bool,
}

#[derive(Debug, Serialize)]
struct ListenerView {
    listen: String,
    mode: &'static str,
    /// Requests of its routes received and not yet answered with headers.
    in_flight: i64,
    /// Its routes, in the order requests are matched against them.
    routes: Vec<RouteView>,
}

#[derive(Debug, Serialize)]
struct RouteView {
    name: String,
    /// The host it takes (`*.example.com` for any one label), or none for any host.
    host: Option<String>,
    /// The path prefix it takes, or none for any path.
    path_prefix: Option<String>,
    strip_prefix: bool,
    /// Where its requests go: scheme, host, port and base path.
    upstream: String,
    in_flight: i64,
}

impl Page {
    /// The page of `overview` and `watched` as they are now.
    pub(crate) fn now(overview: &Overview, watched: &[Watched], draining: bool) -> Self {
        let now = Instant::now();
        let wall = SystemTime::now();
        // Upstreams that share a source are one source: grouped by their handles.
        let mut groups: Vec<Vec<&Watched>> = Vec::new();
        for upstream in watched {
            match groups.iter_mut().find(|group| {
                group
                    .first()
                    .is_some_and(|g| g.token.same_source(&upstream.token))
            }) {
                Some(group) => group.push(upstream),
                None => groups.push(vec![upstream]),
            }
        }
        let token_sources: Vec<SourceView> = groups
            .iter()
            .filter_map(|group| source_view(group, overview, now, wall))
            .collect();
        let ready = !draining && token_sources.iter().all(|s| s.state == "ready");
        Self {
            version: env!("CARGO_PKG_VERSION"),
            config_file: overview.config_file.display().to_string(),
            generated_at: rfc3339(wall),
            ready,
            draining,
            token_sources,
            cache: overview.cache.as_ref().map(|store| CacheView {
                backend: store.name(),
                up: store.is_up(),
            }),
            listeners: overview.listeners.iter().map(listener_view).collect(),
        }
    }

    /// The JSON form.
    pub(crate) fn json(&self) -> Response<Full<Bytes>> {
        let body = serde_json::to_vec_pretty(self).unwrap_or_default();
        respond(body, "application/json")
    }

    /// The HTML form.
    pub(crate) fn html(&self) -> Response<Full<Bytes>> {
        let mut response = respond(self.render().into_bytes(), "text/html; charset=utf-8");
        // Nothing on the page may run or load anything, should a value ever escape escaping.
        response.headers_mut().insert(
            "content-security-policy",
            HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
        );
        response
    }
}

fn source_view(
    group: &[&Watched],
    overview: &Overview,
    now: Instant,
    wall: SystemTime,
) -> Option<SourceView> {
    let first = group.first()?;
    if let Some(on_behalf) = first.token.on_behalf() {
        return Some(on_behalf_view(group, overview, on_behalf));
    }
    let state = first.token.state();
    let usable = state.usable_token(now).is_some();
    let obtains = overview.sources.get(&first.name);
    let (phase, next) = match state.phase {
        Phase::Fetching => ("fetching", None),
        Phase::Scheduled { next } => ("scheduled", Some(next)),
        Phase::BackingOff { next } => ("backing_off", Some(next)),
        Phase::Restarting { next } => ("restarting", Some(next)),
        Phase::Stopped => ("stopped", None),
        Phase::OnDemand => ("on_demand", None),
    };
    let token = state.token.as_ref().map(|token| {
        let obtained = issued_at(token);
        TokenView {
            obtained_at: rfc3339(obtained),
            age_seconds: wall.duration_since(obtained).unwrap_or_default().as_secs(),
            expires_at: rfc3339(token.expires_at),
            expires_in_seconds: token
                .expires_at
                .duration_since(wall)
                .unwrap_or_default()
                .as_secs(),
            usable: token.is_usable_at(now),
            lifetime_from: token.lifetime_source.to_string(),
        }
    });
    Some(SourceView {
        upstreams: group.iter().map(|w| w.name.clone()).collect(),
        grant: obtains.map_or("client_credentials", |o| o.grant),
        client_auth: obtains.map_or("", |o| o.client_auth),
        dpop: obtains.is_some_and(|o| o.dpop),
        state: if first.token.is_down() {
            "down"
        } else if usable {
            "ready"
        } else {
            "not_ready"
        },
        phase,
        next_attempt_in_seconds: next.map(|n| n.saturating_duration_since(now).as_secs()),
        not_ready_because: (!usable).then(|| state.why_unusable()),
        token,
        last_error: state.last_error.as_ref().map(|e| e.summary()),
        failures: state.failures,
        fetches: first.metrics.fetch_counts().into_iter().collect(),
        on_behalf_of: None,
    })
}

/// An on-behalf-of source: always `ready` (it has nothing to wait for), with its subjects.
fn on_behalf_view(
    group: &[&Watched],
    overview: &Overview,
    on_behalf: &crate::token::on_behalf::OnBehalf,
) -> SourceView {
    let names: Vec<String> = group.iter().map(|w| w.name.clone()).collect();
    let obtains = names.first().and_then(|name| overview.sources.get(name));
    SourceView {
        upstreams: names,
        grant: obtains.map_or("token_exchange", |o| o.grant),
        client_auth: obtains.map_or("", |o| o.client_auth),
        dpop: obtains.is_some_and(|o| o.dpop),
        state: "ready",
        phase: "on_demand",
        next_attempt_in_seconds: None,
        not_ready_because: None,
        token: None,
        last_error: None,
        failures: 0,
        fetches: group
            .first()
            .map(|w| w.metrics.fetch_counts().into_iter().collect())
            .unwrap_or_default(),
        on_behalf_of: Some(OnBehalfView {
            header: on_behalf.header().to_string(),
            cached_subjects: on_behalf.subjects_held(),
            max_subjects: on_behalf.max_subjects(),
        }),
    }
}

fn listener_view(listener: &ListenerInfo) -> ListenerView {
    let routes: Vec<RouteView> = listener
        .routes
        .iter()
        .map(|route| RouteView {
            name: route.name.clone(),
            host: route.matching.host.clone(),
            path_prefix: route.matching.path_prefix.clone(),
            strip_prefix: route.matching.strip_prefix,
            upstream: route.upstream.clone(),
            in_flight: route.series.as_ref().map_or(0, |s| s.in_flight()),
        })
        .collect();
    ListenerView {
        listen: listener.listen.to_string(),
        mode: match listener.mode {
            Mode::Reverse => "reverse",
            Mode::Forward => "forward",
        },
        in_flight: routes.iter().map(|r| r.in_flight).sum(),
        routes,
    }
}

fn respond(body: Vec<u8>, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The state of now: no cache may keep it.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(VARY, HeaderValue::from_static("accept"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `time` in RFC 3339, UTC, to the second.
fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// `seconds` as a person reads it: `4m 12s`.
fn human(seconds: u64) -> String {
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

/// `text` safe between tags and inside quoted attributes (the five characters HTML gives
/// meaning to). Small enough to keep here rather than add a crate for it.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The style sheet: readable tables, no external resource.
const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1b1b1b;max-width:80rem}\
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.15rem;margin:1.6rem 0 .5rem}h3{font-size:1rem;margin:1rem 0 .4rem}\
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}\
th{background:#f2f2f2}code{font-size:.9em}.ready{color:#176117;font-weight:600}.not_ready,.down{color:#a11;font-weight:600}\
.muted{color:#666}";

impl Page {
    /// The HTML page: every value from the config or the network goes through [`escape`].
    fn render(&self) -> String {
        let mut html = String::with_capacity(4096);
        let _ = write!(
            html,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>bearerd status</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
             <h1>bearerd status</h1>\n<p>version <code>{}</code> · config <code>{}</code> · \
             {} · generated {}</p>\n",
            escape(self.version),
            escape(&self.config_file),
            if self.draining {
                "<span class=\"not_ready\">shutting down</span>"
            } else if self.ready {
                "<span class=\"ready\">ready</span>"
            } else {
                "<span class=\"not_ready\">not ready</span>"
            },
            escape(&self.generated_at),
        );
        self.render_sources(&mut html);
        self.render_cache(&mut html);
        self.render_listeners(&mut html);
        html.push_str(
            "<p class=\"muted\">The same as JSON: <code>curl -H 'Accept: application/json' \
             http://ADMIN/status</code>. No token, secret, key or subject is shown.</p>\n\
             </body>\n</html>\n",
        );
        html
    }

    fn render_sources(&self, html: &mut String) {
        html.push_str(
            "<h2>Token sources</h2>\n<table>\n<thead><tr><th>Upstreams</th><th>Grant</th>\
             <th>Client auth</th><th>State</th><th>Token age</th><th>Expires in</th>\
             <th>Last refresh</th><th>Next attempt</th><th>Last error</th><th>Fetches</th>\
             </tr></thead>\n<tbody>\n",
        );
        for source in &self.token_sources {
            let upstreams: Vec<String> = source.upstreams.iter().map(|u| escape(u)).collect();
            let auth = if source.dpop {
                format!("{} + DPoP", escape(source.client_auth))
            } else {
                escape(source.client_auth)
            };
            let mut state = format!(
                "<span class=\"{0}\">{1}</span> ({2})",
                source.state,
                source.state.replace('_', " "),
                source.phase.replace('_', " ")
            );
            // Why, unless the last error (its own column) says it.
            if let (Some(why), None) = (&source.not_ready_because, &source.last_error) {
                let _ = write!(state, "<br>{}", escape(why));
            }
            if let Some(on_behalf) = &source.on_behalf_of {
                let _ = write!(
                    state,
                    "<br>on behalf of the subject in <code>{}</code>: {} of at most {} subjects cached",
                    escape(&on_behalf.header),
                    on_behalf.cached_subjects,
                    on_behalf.max_subjects
                );
            }
            let (age, expires, refreshed) = match &source.token {
                Some(token) => (
                    human(token.age_seconds),
                    if token.expires_in_seconds == 0 {
                        "expired".to_owned()
                    } else {
                        human(token.expires_in_seconds)
                    },
                    format!(
                        "{}<br><span class=\"muted\">lifetime from {}</span>",
                        escape(&token.obtained_at),
                        escape(&token.lifetime_from)
                    ),
                ),
                None => ("—".to_owned(), "—".to_owned(), "never".to_owned()),
            };
            let next = source
                .next_attempt_in_seconds
                .map_or_else(|| "—".to_owned(), |s| format!("in {}", human(s)));
            let error = match &source.last_error {
                Some(error) => format!(
                    "{}<br><span class=\"muted\">{} failure(s) since the last success</span>",
                    escape(error),
                    source.failures
                ),
                None => "none".to_owned(),
            };
            let fetches: Vec<String> = source
                .fetches
                .iter()
                .filter(|(_, &count)| count > 0)
                .map(|(outcome, count)| format!("{} {count}", escape(outcome)))
                .collect();
            let fetches = if fetches.is_empty() {
                "none".to_owned()
            } else {
                fetches.join("<br>")
            };
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{auth}</td><td>{state}</td><td>{age}</td>\
                 <td>{expires}</td><td>{refreshed}</td><td>{next}</td><td>{error}</td>\
                 <td>{fetches}</td></tr>",
                upstreams.join("<br>"),
                escape(source.grant),
            );
        }
        html.push_str("</tbody>\n</table>\n");
    }

    fn render_cache(&self, html: &mut String) {
        html.push_str("<h2>Token cache</h2>\n");
        match &self.cache {
            Some(cache) => {
                let _ = writeln!(
                    html,
                    "<p>backend <code>{}</code>: {}</p>",
                    escape(cache.backend),
                    if cache.up {
                        "<span class=\"ready\">up</span>"
                    } else {
                        "<span class=\"down\">down</span> (sources fetch for themselves)"
                    }
                );
            }
            None => html.push_str("<p>none: tokens live in this process only</p>\n"),
        }
    }

    fn render_listeners(&self, html: &mut String) {
        html.push_str("<h2>Listeners</h2>\n");
        for listener in &self.listeners {
            let _ = writeln!(
                html,
                "<h3><code>{}</code> · {} proxy · {} in flight</h3>\n<table>\n<thead><tr>\
                 <th>#</th><th>Route</th><th>Host</th><th>Path prefix</th><th>Upstream</th>\
                 <th>In flight</th></tr></thead>\n<tbody>",
                escape(&listener.listen),
                listener.mode,
                listener.in_flight,
            );
            for (position, route) in listener.routes.iter().enumerate() {
                let any = "<span class=\"muted\">any</span>";
                let prefix = match &route.path_prefix {
                    Some(prefix) if route.strip_prefix => {
                        format!("<code>{}</code> (stripped)", escape(prefix))
                    }
                    Some(prefix) => format!("<code>{}</code>", escape(prefix)),
                    None => any.to_owned(),
                };
                let _ = writeln!(
                    html,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{prefix}</td><td><code>{}</code></td>\
                     <td>{}</td></tr>",
                    position + 1,
                    escape(&route.name),
                    route
                        .host
                        .as_deref()
                        .map_or_else(|| any.to_owned(), |h| format!("<code>{}</code>", escape(h))),
                    escape(&route.upstream),
                    route.in_flight,
                );
            }
            html.push_str("</tbody>\n</table>\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_character_html_gives_meaning_to() {
        let hostile = r#"<script>alert("x")</script> & 'y'"#;
        let escaped = escape(hostile);
        assert_eq!(
            escaped,
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert!(!escaped.contains(['<', '>', '"', '\'']));
    }

    #[test]
    fn loopback_peers_and_status_from_may_read() {
        let nets: Vec<ipnet::IpNet> = vec!["10.1.0.0/16".parse().unwrap()];
        assert!(may_read("127.0.0.1".parse().unwrap(), &[]));
        assert!(may_read("::1".parse().unwrap(), &[]));
        assert!(may_read("::ffff:127.0.0.1".parse().unwrap(), &[]));
        assert!(may_read("10.1.2.3".parse().unwrap(), &nets));
        assert!(may_read("::ffff:10.1.2.3".parse().unwrap(), &nets));
        assert!(!may_read("10.2.0.1".parse().unwrap(), &nets));
        assert!(!may_read("192.168.1.1".parse().unwrap(), &[]));
    }

    #[test]
    fn json_only_when_asked_for() {
        let accept = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::ACCEPT, HeaderValue::from_str(value).unwrap());
            wants_json(&headers)
        };
        assert!(accept("application/json"));
        assert!(accept("text/plain, Application/JSON;q=0.5"));
        assert!(!accept(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        ));
        assert!(!accept("application/json;q=0"));
        assert!(!wants_json(&HeaderMap::new()));
    }

    #[test]
    fn an_upstream_url_is_shown_without_userinfo_or_query() {
        let url: http::Uri = "https://user:pw@api.example.com:8443/v1?k=v"
            .parse()
            .unwrap();
        assert_eq!(where_to(&url), "https://api.example.com:8443/v1");
    }
}
