//! Listeners and their routes: `[[upstream]]` (a listener with one route of its own) and
//! `[[listener]]` with its `[[listener.route]]` table; where each listens, who may connect,
//! and which requests each route takes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;

use http::Uri;
use toml::Spanned;

use super::credentials::Identity;
use super::file;
use super::token::token;
use super::validate::Validator;
use super::values::{duration, http_url, networks, socket_addr};
use super::{
    Intercept, Listener, Mode, Roots, RouteMatch, TlsSettings, Upstream, UpstreamProtocol,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_RESPONSE_BODY_IDLE_TIMEOUT,
    DEFAULT_RESPONSE_HEADER_TIMEOUT, DEFAULT_UPGRADE_PROTOCOLS,
};

/// A `[[listener]]` as its routes see it.
struct ListenerAt {
    listen: Option<SocketAddr>,
    allow_from: Option<Vec<ipnet::IpNet>>,
}

/// Every route and listener of the file.
pub(super) fn listeners(
    v: &mut Validator<'_>,
    raw: &file::File,
) -> (Option<Vec<Upstream>>, Option<Vec<Listener>>) {
    if raw.upstream.is_empty() && raw.listener.is_empty() {
        v.problem(
            0..0,
            "upstream",
            "no [[upstream]] or [[listener]] is configured",
        );
    }
    let mut upstreams = Vec::new();
    let mut listeners = Vec::new();
    let mut complete = true;
    for (i, spanned) in raw.upstream.iter().enumerate() {
        match one_route(v, &format!("upstream[{i}]"), spanned, None) {
            Some(upstream) => {
                listeners.push(Listener {
                    listen: upstream.listen,
                    mode: Mode::Reverse,
                    allow_from: upstream.allow_from.clone(),
                    routes: vec![upstream.name.clone()],
                    intercept: None,
                });
                upstreams.push(upstream);
            }
            None => complete = false,
        }
    }
    for (i, spanned) in raw.listener.iter().enumerate() {
        let key = format!("listener[{i}]");
        let listener = spanned.get_ref();
        let listen = socket_addr(v, &listener.listen, &format!("{key}.listen"));
        let allow_from = listener
            .allow_from
            .as_ref()
            .map(|list| networks(v, list, &format!("{key}.allow_from")));
        if let Some(addr) = listen {
            check_exposure(v, addr, allow_from.as_ref(), listener.listen.span(), &key);
        }
        let mode = match listener.mode.as_ref().map(|m| *m.get_ref()) {
            None | Some(file::Mode::Reverse) => Mode::Reverse,
            Some(file::Mode::Forward) => Mode::Forward,
        };
        if listener.route.is_empty() {
            v.problem(
                spanned.span(),
                format!("{key}.route"),
                "no [[listener.route]]: the listener would answer every request 404",
            );
        }
        let intercept = listener
            .intercept
            .as_ref()
            .map(|raw| intercept(v, &key, raw, mode));
        let at = ListenerAt { listen, allow_from };
        let mut routes = Vec::new();
        for (j, route) in listener.route.iter().enumerate() {
            let route_key = format!("{key}.route[{j}]");
            if mode == Mode::Forward && route.get_ref().host.is_none() {
                v.problem(
                    route.span(),
                    format!("{route_key}.host"),
                    "missing: on a forward listener a route is chosen by the host the app asks for",
                );
            }
            match one_route(v, &route_key, route, Some(&at)) {
                Some(upstream) => {
                    routes.push(upstream.name.clone());
                    upstreams.push(upstream);
                }
                None => complete = false,
            }
        }
        match at.listen {
            Some(listen) => listeners.push(Listener {
                listen,
                mode,
                allow_from: at.allow_from,
                routes,
                intercept,
            }),
            None => complete = false,
        }
    }
    if complete {
        (Some(upstreams), Some(listeners))
    } else {
        (None, None)
    }
}

/// `[listener.intercept]`: on a forward listener only (a reverse listener has no CONNECT to
/// intercept); each `passthrough` entry is `host:port`, the port required (a CONNECT names one).
fn intercept(
    v: &mut Validator<'_>,
    key: &str,
    raw: &Spanned<file::Intercept>,
    mode: Mode,
) -> Intercept {
    let key = format!("{key}.intercept");
    if mode != Mode::Forward {
        v.problem(
            raw.span(),
            &key,
            "TLS interception needs mode = \"forward\": only a forward proxy is sent CONNECT",
        );
    }
    let settings = raw.get_ref();
    let mut passthrough = Vec::new();
    for entry in settings.passthrough.iter().flatten() {
        match passthrough_target(entry.get_ref()) {
            Some(target) => passthrough.push(target),
            None => v.problem(
                entry.span(),
                format!("{key}.passthrough"),
                format!(
                    "{:?} is not host:port (such as \"objects.internal.example:443\")",
                    entry.get_ref()
                ),
            ),
        }
    }
    Intercept {
        ca_cert_file: v.base_dir.join(settings.ca_cert_file.get_ref()),
        ca_key_file: v.base_dir.join(settings.ca_key_file.get_ref()),
        ca_bundle_file: settings
            .ca_bundle_file
            .as_ref()
            .map(|p| v.base_dir.join(p.get_ref())),
        passthrough,
        handshake_timeout: duration(
            v,
            settings.handshake_timeout.as_ref(),
            &format!("{key}.handshake_timeout"),
            DEFAULT_HANDSHAKE_TIMEOUT,
        ),
    }
}

/// `host:port` as a CONNECT names it: the host lowercase, without a trailing dot.
pub(crate) fn passthrough_target(text: &str) -> Option<(String, u16)> {
    let authority: http::uri::Authority = text.parse().ok()?;
    let port = authority.port_u16()?;
    let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
    let valid = !host.is_empty() && !authority.as_str().contains('@');
    valid.then_some((host, port))
}

/// A listener off loopback needs `allow_from`: whoever reaches it calls the upstream
/// with bearerd's token.
fn check_exposure(
    v: &mut Validator<'_>,
    addr: SocketAddr,
    allow_from: Option<&Vec<ipnet::IpNet>>,
    span: Range<usize>,
    key: &str,
) {
    if !addr.ip().is_loopback() && allow_from.is_none() {
        v.problem(
            span,
            format!("{key}.listen"),
            format!(
                "{addr} is not a loopback address: whoever reaches it calls the upstream with bearerd's token. Listen on 127.0.0.1, or set allow_from to the networks that may connect ([\"0.0.0.0/0\", \"::/0\"] for anyone)"
            ),
        );
    }
}

/// `host`, `path_prefix` and `strip_prefix`.
fn route_match(v: &mut Validator<'_>, key: &str, raw: &file::Upstream) -> RouteMatch {
    let host = raw.host.as_ref().and_then(|host| {
        let text = host.get_ref().trim_end_matches('.').to_ascii_lowercase();
        let bare = text.strip_prefix("*.").unwrap_or(&text);
        let valid = !bare.is_empty()
            && !bare.contains('*')
            && bare
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '[' | ']' | ':'));
        if valid {
            Some(text)
        } else {
            v.problem(
                host.span(),
                format!("{key}.host"),
                format!(
                    "{:?} is not a host name, an address, or *.example.com (one label)",
                    host.get_ref()
                ),
            );
            None
        }
    });
    let path_prefix = raw.path_prefix.as_ref().and_then(|prefix| {
        let text = prefix.get_ref();
        let valid = text.starts_with('/')
            && !text.contains(['?', '#', '%'])
            && !text.split('/').any(|segment| segment == "." || segment == "..");
        if valid {
            // "/v2/" and "/v2" match the same requests: on segment boundaries.
            // "/" is every path: the same as no prefix.
            let trimmed = text.trim_end_matches('/');
            (!trimmed.is_empty()).then(|| trimmed.to_owned())
        } else {
            v.problem(
                prefix.span(),
                format!("{key}.path_prefix"),
                format!(
                    "{text:?} is not a path such as \"/v2\" (no query, no percent-escapes, no . or .. segments)"
                ),
            );
            None
        }
    });
    let strip_prefix = raw.strip_prefix.as_ref().is_some_and(|s| *s.get_ref());
    if strip_prefix && path_prefix.is_none() && raw.path_prefix.is_none() {
        if let Some(spanned) = &raw.strip_prefix {
            v.problem(
                spanned.span(),
                format!("{key}.strip_prefix"),
                "there is no path_prefix to strip",
            );
        }
    }
    RouteMatch {
        host,
        path_prefix,
        strip_prefix,
    }
}

/// One route: an `[[upstream]]` (`at` is `None`: it has its own `listen` and
/// `allow_from`) or a `[[listener.route]]` of the listener `at`.
fn one_route(
    v: &mut Validator<'_>,
    key: &str,
    spanned: &Spanned<file::Upstream>,
    at: Option<&ListenerAt>,
) -> Option<Upstream> {
    let raw = spanned.get_ref();
    let name = raw.name.get_ref();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        v.problem(
            raw.name.span(),
            format!("{key}.name"),
            format!("{name:?} is not a valid name: use letters, digits, '-', '_' and '.'"),
        );
    }
    let (listen, allow_from) = match at {
        Some(at) => {
            for (name, span) in [
                ("listen", raw.listen.as_ref().map(Spanned::span)),
                ("allow_from", raw.allow_from.as_ref().map(Spanned::span)),
            ] {
                if let Some(span) = span {
                    v.problem(
                        span,
                        format!("{key}.{name}"),
                        "belongs to the [[listener]], not to one of its routes",
                    );
                }
            }
            (at.listen, at.allow_from.clone())
        }
        None => {
            for (name, span) in [
                ("host", raw.host.as_ref().map(Spanned::span)),
                ("path_prefix", raw.path_prefix.as_ref().map(Spanned::span)),
                ("strip_prefix", raw.strip_prefix.as_ref().map(Spanned::span)),
            ] {
                if let Some(span) = span {
                    v.problem(
                        span,
                        format!("{key}.{name}"),
                        "routes by host and path are for [[listener.route]]: an [[upstream]] takes every request of its listen address",
                    );
                }
            }
            let Some(listen_text) = &raw.listen else {
                v.problem(spanned.span(), format!("{key}.listen"), "missing");
                return None;
            };
            let listen = socket_addr(v, listen_text, &format!("{key}.listen"));
            let allow_from = raw
                .allow_from
                .as_ref()
                .map(|list| networks(v, list, &format!("{key}.allow_from")));
            if let Some(addr) = listen {
                check_exposure(v, addr, allow_from.as_ref(), listen_text.span(), key);
            }
            (listen, allow_from)
        }
    };
    let route = route_match(v, key, raw);
    let allow_plain_http = raw.allow_plain_http.unwrap_or(false);
    let url = http_url(v, &raw.url, &format!("{key}.url"), allow_plain_http);
    if let Some(url) = &url {
        if url.query().is_some() {
            v.problem(
                raw.url.span(),
                format!("{key}.url"),
                "must not have a query: the app's query is passed through",
            );
        }
    }
    let connect_timeout = duration(
        v,
        raw.connect_timeout.as_ref(),
        &format!("{key}.connect_timeout"),
        DEFAULT_CONNECT_TIMEOUT,
    );
    let response_header_timeout = duration(
        v,
        raw.response_header_timeout.as_ref(),
        &format!("{key}.response_header_timeout"),
        DEFAULT_RESPONSE_HEADER_TIMEOUT,
    );
    let response_body_idle_timeout = match &raw.response_body_idle_timeout {
        // "0": a body may be silent for as long as it likes (a stream that only the app ends).
        Some(text) if text.get_ref().0.trim() == "0" => None,
        text => Some(duration(
            v,
            text.as_ref(),
            &format!("{key}.response_body_idle_timeout"),
            DEFAULT_RESPONSE_BODY_IDLE_TIMEOUT,
        )),
    };
    let upgrade_protocols = upgrade_protocols(v, key, raw);
    let protocol = upstream_protocol(v, key, raw, url.as_ref());
    let token = token(v, &format!("{key}.token"), &raw.token);
    let tls = match &raw.tls {
        None => TlsSettings {
            roots: Roots::default(),
            ca_file: None,
            identity: None,
        },
        Some(spanned) => {
            let tls = spanned.get_ref();
            let settings = TlsSettings {
                roots: match tls.roots {
                    None | Some(file::Roots::Webpki) => Roots::Webpki,
                    Some(file::Roots::Native) => Roots::Native,
                    Some(file::Roots::None) => Roots::None,
                },
                ca_file: tls.ca_file.as_ref().map(|p| v.base_dir.join(p.get_ref())),
                identity: match (&tls.cert_file, &tls.key_file) {
                    (Some(cert), Some(key)) => Some(Identity {
                        cert_file: v.base_dir.join(cert.get_ref()),
                        key_file: v.base_dir.join(key.get_ref()),
                    }),
                    (None, None) => None,
                    (Some(_), None) | (None, Some(_)) => {
                        v.problem(
                            spanned.span(),
                            format!("{key}.tls.cert_file"),
                            "cert_file and key_file go together: set both, or neither",
                        );
                        None
                    }
                },
            };
            if settings.roots == Roots::None && settings.ca_file.is_none() {
                v.problem(
                    spanned.span(),
                    format!("{key}.tls.ca_file"),
                    "roots = \"none\" needs a ca_file, or nothing would be trusted",
                );
            }
            settings
        }
    };
    Some(Upstream {
        name: name.clone(),
        listen: listen?,
        route,
        url: url?,
        connect_timeout,
        response_header_timeout,
        response_body_idle_timeout,
        upgrade_protocols,
        retry_on_401: raw.retry_on_401.unwrap_or(true),
        protocol,
        allow_from,
        allow_plain_http,
        token: token?,
        tls,
    })
}

/// `protocol`: h2c is HTTP/2 over plain TCP, so it needs an `http://` url; an `https://`
/// upstream that speaks HTTP/2 says so by ALPN.
/// `upgrade_protocols`: names of `Upgrade` protocols (RFC 9110 §7.8), kept lowercase as they
/// are matched ignoring case. `h2c` is refused: an HTTP/2 upgrade is not something bearerd
/// can pass through (its app side would have to speak HTTP/2 to bearerd).
fn upgrade_protocols(v: &mut Validator<'_>, key: &str, raw: &file::Upstream) -> Vec<String> {
    let Some(list) = &raw.upgrade_protocols else {
        return DEFAULT_UPGRADE_PROTOCOLS
            .iter()
            .map(|&name| name.to_owned())
            .collect();
    };
    let field = format!("{key}.upgrade_protocols");
    let mut names = Vec::with_capacity(list.get_ref().len());
    for name in list.get_ref() {
        let text = name.get_ref().trim();
        let is_token = !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b));
        if !is_token {
            v.problem(
                name.span(),
                &field,
                format!("{text:?} is not a protocol name such as \"websocket\""),
            );
        } else if text.eq_ignore_ascii_case("h2c") || text.to_ascii_lowercase().starts_with("h2c/")
        {
            v.problem(
                name.span(),
                &field,
                "h2c cannot be passed through as an upgrade: send HTTP/2 to bearerd with prior knowledge instead",
            );
        } else {
            names.push(text.to_ascii_lowercase());
        }
    }
    names
}

fn upstream_protocol(
    v: &mut Validator<'_>,
    key: &str,
    raw: &file::Upstream,
    url: Option<&Uri>,
) -> UpstreamProtocol {
    let Some(spanned) = &raw.protocol else {
        return UpstreamProtocol::Auto;
    };
    let protocol = match spanned.get_ref() {
        file::Protocol::Auto => UpstreamProtocol::Auto,
        file::Protocol::Http1 => UpstreamProtocol::Http1,
        file::Protocol::H2c => UpstreamProtocol::H2c,
    };
    if protocol == UpstreamProtocol::H2c && url.and_then(Uri::scheme_str) == Some("https") {
        v.problem(
            spanned.span(),
            format!("{key}.protocol"),
            "h2c is HTTP/2 over plain TCP and needs an http:// url; an https:// upstream that speaks HTTP/2 chooses it by ALPN with protocol = \"auto\"",
        );
    }
    protocol
}

/// Two listeners on one address would fail at bind time with a vaguer message; names
/// must be unique because metrics and logs tell routes apart by them.
pub(super) fn check_unique(v: &mut Validator<'_>, raw: &file::File, admin: Option<SocketAddr>) {
    let mut names: HashMap<&str, (String, Range<usize>)> = HashMap::new();
    let mut addrs: HashMap<SocketAddr, (String, Option<Range<usize>>)> = HashMap::new();
    if let Some(admin) = admin {
        addrs.insert(admin, ("[admin]".into(), None));
    }
    // Set in another file (conf.d): name it, so both files are named.
    let elsewhere =
        |v: &Validator<'_>, first: Option<&Range<usize>>, here: &Range<usize>| match first {
            Some(first) if v.other_file(first, here) => format!(" (at {})", v.place(first)),
            _ => String::new(),
        };
    let routes = raw
        .upstream
        .iter()
        .enumerate()
        .map(|(i, u)| (format!("upstream[{i}]"), u.get_ref()))
        .chain(raw.listener.iter().enumerate().flat_map(|(i, l)| {
            l.get_ref()
                .route
                .iter()
                .enumerate()
                .map(move |(j, r)| (format!("listener[{i}].route[{j}]"), r.get_ref()))
        }));
    for (key, route) in routes {
        let name = route.name.get_ref().as_str();
        if let Some((first, at)) = names.insert(name, (key.clone(), route.name.span())) {
            let note = elsewhere(v, Some(&at), &route.name.span());
            v.problem(
                route.name.span(),
                format!("{key}.name"),
                format!("{name:?} is already the name of {first}{note}"),
            );
        }
    }
    let upstream_listens = raw.upstream.iter().enumerate().filter_map(|(i, u)| {
        let u = u.get_ref();
        let owner = format!("upstream {:?}", u.name.get_ref());
        Some((format!("upstream[{i}].listen"), u.listen.as_ref()?, owner))
    });
    let listener_listens = raw.listener.iter().enumerate().map(|(i, l)| {
        (
            format!("listener[{i}].listen"),
            &l.get_ref().listen,
            format!("listener[{i}]"),
        )
    });
    for (key, listen, owner) in upstream_listens.chain(listener_listens) {
        // Port 0 asks the OS for a free port, so it never collides (tests use it).
        if let Ok(addr) = listen.get_ref().parse::<SocketAddr>() {
            if addr.port() != 0 {
                if let Some((first, at)) = addrs.insert(addr, (owner, Some(listen.span()))) {
                    let note = elsewhere(v, at.as_ref(), &listen.span());
                    v.problem(
                        listen.span(),
                        key,
                        format!("{addr} is already the listen address of {first}{note}"),
                    );
                }
            }
        }
    }
}
