//! Checking a config by hand: `bearerd --check` validates everything that can be validated
//! without sending a request and describes what would run; `bearerd --fetch-token UPSTREAM`
//! performs one token request and describes its outcome. Secrets are read, never printed;
//! the token only when asked.

use std::collections::HashSet;
use std::fmt::Write;

use crate::config::{self, Config, Roots};
use crate::token::setup::SourceSetup;
use crate::token::{client_auth, SourceKey};

/// Reads every secret and trust-anchor file of `config`. Returns the description of what would
/// run, or every problem found.
pub fn check(config: &Config) -> Result<String, Vec<String>> {
    let mut out = String::new();
    let mut problems = Vec::new();
    let mut sources = HashSet::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(out, "config {}: valid", config.path.display());
    let _ = writeln!(
        out,
        "admin: listen {} (at most {} connections{})",
        config.admin.listen,
        config.admin.max_connections,
        match &config.admin.allow_from {
            Some(networks) => format!(
                ", from {}",
                networks
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => String::new(),
        }
    );
    let _ = writeln!(
        out,
        "server: request bodies idle at most {}, {} bytes kept for 401 replays",
        humantime::format_duration(config.server.body_idle_timeout),
        config.server.replay_memory
    );
    for upstream in &config.upstreams {
        let token = &upstream.token;
        sources.insert(SourceKey::of(upstream));
        let _ = writeln!(
            out,
            "upstream {}: listen {} -> {} (connect timeout {}, response header timeout {})",
            upstream.name,
            upstream.listen,
            upstream.url,
            humantime::format_duration(upstream.connect_timeout),
            humantime::format_duration(upstream.response_header_timeout),
        );
        match &upstream.allow_from {
            Some(networks) => {
                let networks: Vec<String> = networks.iter().map(ToString::to_string).collect();
                let _ = writeln!(out, "  peers allowed: {}", networks.join(", "));
            }
            None => {
                let _ = writeln!(out, "  peers allowed: this machine only (loopback)");
            }
        }
        if !upstream.listen.ip().is_loopback() {
            let _ = writeln!(
                out,
                "  WARNING: listens beyond loopback: the peers above can call the upstream with bearerd's token"
            );
        }
        if upstream.allow_plain_http {
            let _ = writeln!(
                out,
                "  WARNING: allow_plain_http: requests and the token go to the upstream unencrypted"
            );
        }
        let client = match &token.client_id {
            Some(id) => format!("as client {id:?}"),
            None => "with no client_id (the assertion names the client)".to_owned(),
        };
        let _ = write!(
            out,
            "  token: POST {} {client}, {}",
            token.url,
            client_auth::describe(&token.auth)
        );
        for (name, value) in [
            ("scope", &token.scope),
            ("audience", &token.audience),
            ("resource", &token.resource),
        ] {
            if let Some(value) = value {
                let _ = write!(out, ", {name} {value:?}");
            }
        }
        for (name, value) in &token.params {
            let _ = write!(out, ", {name} {value:?}");
        }
        let _ = writeln!(
            out,
            " (timeout {}, lifetime if unstated {}, at most {})",
            humantime::format_duration(token.timeout),
            humantime::format_duration(token.default_lifetime),
            humantime::format_duration(token.max_lifetime)
        );
        if token.allow_plain_http {
            let _ = writeln!(
                out,
                "  WARNING: allow_plain_http: the client credentials go to the token endpoint unencrypted"
            );
        }
        let roots = match upstream.tls.roots {
            Roots::Webpki => "webpki roots",
            Roots::Native => "system roots",
            Roots::None => "no built-in roots",
        };
        let _ = match &upstream.tls.ca_file {
            Some(ca_file) => write!(out, "  tls: {roots} + ca_file {}", ca_file.display()),
            None => write!(out, "  tls: {roots}"),
        };
        match &upstream.tls.identity {
            Some(identity) => match crate::tls::LoadedIdentity::read(identity) {
                Ok(loaded) => {
                    let _ = writeln!(
                        out,
                        "; client certificate {} (sha256 {}) to the upstream",
                        identity.cert_file.display(),
                        loaded.fingerprint()
                    );
                }
                Err(e) => {
                    let _ = writeln!(out);
                    problems.push(format!("upstream {}: {e}", upstream.name));
                }
            },
            None => {
                let _ = writeln!(out);
            }
        }
        let tls_key = upstream.tls.identity.as_ref().map(|i| i.key_file.as_path());
        for path in token.key_files().into_iter().chain(tls_key) {
            if crate::secret::readable_by_others(path) {
                let _ = writeln!(
                    out,
                    "  WARNING: key file {} is readable by group or others",
                    path.display()
                );
            }
        }
        match client_auth::check(&token.auth) {
            Ok(found) => {
                let _ = writeln!(out, "  credentials: {found}");
            }
            Err(e) => problems.push(format!("upstream {}: {e}", upstream.name)),
        }
        match SourceSetup::new(&SourceKey::of(upstream)) {
            Ok(setup) => {
                if let Some(key) = &setup.dpop {
                    let kept = match token.dpop.as_ref().and_then(|d| d.key_file.as_ref()) {
                        Some(path) => format!("from {}", path.display()),
                        None => "made at start (a restart makes a new one)".to_owned(),
                    };
                    let _ = writeln!(out, "  dpop: {}, key {kept}", key.describe());
                }
            }
            Err(e) => problems.push(format!("upstream {}: {e}", upstream.name)),
        }
    }
    describe_listeners(config, &mut out);
    let _ = writeln!(out, "token sources: {}", sources.len());
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// Each `[[listener]]`'s route table in match order, and a WARNING for each route that can
/// never match. (A listener of one `[[upstream]]` is described with its upstream above.)
fn describe_listeners(config: &Config, out: &mut String) {
    for listener in &config.listeners {
        let mut routes: Vec<&config::Upstream> = listener
            .routes
            .iter()
            .filter_map(|name| config.upstreams.iter().find(|u| &u.name == name))
            .collect();
        // A request takes the longest matching prefix, the first in the file among equals:
        // so the first route in this order whose host and prefix match is the one it takes.
        routes.sort_by_key(|u| {
            std::cmp::Reverse(u.route.path_prefix.as_ref().map_or(0, String::len))
        });
        if let [only] = routes.as_slice() {
            if only.route == config::RouteMatch::default() && listener.mode == config::Mode::Reverse
            {
                continue;
            }
        }
        let mode = match listener.mode {
            config::Mode::Reverse => "reverse proxy: Host and path",
            config::Mode::Forward => "forward proxy (HTTP_PROXY): the requested host and path",
        };
        let _ = writeln!(
            out,
            "listener {} ({mode}), routes in match order:",
            listener.listen
        );
        for (i, route) in routes.iter().enumerate() {
            let host = route.route.host.as_deref().unwrap_or("any host");
            let path = match (&route.route.path_prefix, route.route.strip_prefix) {
                (Some(prefix), true) => format!("{prefix} (stripped)"),
                (Some(prefix), false) => prefix.clone(),
                (None, _) => "any path".into(),
            };
            let _ = writeln!(
                out,
                "  {}. {}: {host}, {path} -> {}",
                i + 1,
                route.name,
                route.url
            );
            if let Some(earlier) = routes[..i].iter().find(|e| shadows(&e.route, &route.route)) {
                let _ = writeln!(
                    out,
                    "  WARNING: route {} can never match: {} comes first and takes the same requests",
                    route.name, earlier.name
                );
            }
        }
    }
}

/// Whether every request `later` would take goes to `earlier` instead: the same prefix (the
/// first among equals wins) and a host `earlier` takes too.
fn shadows(earlier: &config::RouteMatch, later: &config::RouteMatch) -> bool {
    if earlier.path_prefix != later.path_prefix {
        return false;
    }
    match (earlier.host.as_deref(), later.host.as_deref()) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) if a == b => true,
        (Some(a), Some(b)) => a.strip_prefix("*.").is_some_and(|suffix| {
            !b.starts_with("*.")
                && b.strip_suffix(suffix)
                    .and_then(|label| label.strip_suffix('.'))
                    .is_some_and(|label| !label.is_empty() && !label.contains('.'))
        }),
    }
}

/// Performs one token request for `upstream` and describes the outcome: token type, scope,
/// lifetime and where it came from, expiry. The token itself only with `show_token`.
pub async fn fetch_token(
    config: &Config,
    upstream: &str,
    show_token: bool,
) -> Result<String, String> {
    let Some(found) = config.upstreams.iter().find(|u| u.name == upstream) else {
        let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        return Err(format!(
            "no upstream named {upstream:?}; the config has: {}",
            names.join(", ")
        ));
    };
    let setup =
        SourceSetup::new(&SourceKey::of(found)).map_err(|e| format!("upstream {upstream}: {e}"))?;
    let fetcher = crate::token::fetch::Fetcher::new(
        found.token.clone(),
        setup.tls,
        setup.dpop,
        Box::new(|| {}),
    );
    let started = tokio::time::Instant::now();
    let token = crate::token::fetch::Fetch::fetch(&fetcher)
        .await
        .map_err(|e| {
            format!(
                "upstream {upstream}: token request to {} failed: {e}",
                found.token.url
            )
        })?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "upstream {upstream}: token request to {} succeeded in {} ms",
        found.token.url,
        started.elapsed().as_millis()
    );
    let token_type = if found.token.dpop.is_some() {
        "DPoP"
    } else {
        "Bearer"
    };
    let _ = writeln!(out, "  token type: {token_type}");
    let _ = writeln!(
        out,
        "  scope: {}",
        token
            .scope
            .as_deref()
            .unwrap_or("(not stated by the endpoint)")
    );
    let _ = writeln!(
        out,
        "  lifetime: {} s (from {}), expires {}",
        token.lifetime.as_secs(),
        token.lifetime_source,
        humantime::format_rfc3339_seconds(token.expires_at)
    );
    if show_token {
        let header = token.authorization().to_str().unwrap_or_default();
        let _ = writeln!(
            out,
            "  access token: {}",
            header
                .split_once(' ')
                .map_or(header, |(_scheme, token)| token)
        );
    }
    Ok(out)
}
