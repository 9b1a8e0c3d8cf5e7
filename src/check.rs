//! Checking a config by hand: `bearerd --check` validates everything that can be validated
//! without sending a request and describes what would run; `bearerd --fetch-token UPSTREAM`
//! performs one token request (a refresh token spent through the cache and its lease) and
//! describes its outcome. Secrets are read, never printed; the token only when asked.

use std::fmt::Write;

use crate::config::{self, Config, Roots};
use crate::egress::{Egress, Way};
use crate::sidecar::{prepare, Prepared, Severity};
use crate::token::{client_auth, SourceKey};

/// Prepares `config` as a start would (every secret, key, certificate and `[cache]` file is
/// read; nothing is connected) and describes what would run. Returns the description, or
/// every problem found (each marked as stopping a start or not).
pub fn check(config: &Config) -> Result<String, Vec<String>> {
    let prepared = prepare(config);
    let out = describe(config, &prepared);
    let problems: Vec<String> = prepared
        .findings
        .iter()
        .filter_map(|finding| match finding.severity {
            Severity::Fatal => Some(format!("{finding} (bearerd would not start)")),
            Severity::Problem => Some(finding.to_string()),
            Severity::Warning => None,
        })
        .collect();
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// What `prepared` would run, with its warnings beside what they are about.
fn describe(config: &Config, prepared: &Prepared) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(out, "config {}: valid", config.path.display());
    for extra in &config.extra_files {
        let _ = writeln!(out, "  merged: {}", extra.display());
    }
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
    warnings(&mut out, prepared, "[admin]", "");
    let _ = writeln!(
        out,
        "server: request bodies idle at most {}, {} kept for 401 replays",
        duration(config.server.body_idle_timeout),
        size(config.server.replay_memory)
    );
    if let Some(cache) = &prepared.cache {
        let _ = writeln!(out, "cache: {}", cache.describe());
        warnings(&mut out, prepared, "[cache]", "");
    }
    if let Some(egress) = &config.egress {
        let _ = writeln!(out, "egress: {}", describe_egress(egress));
        if let (Some(ways), Some(telemetry)) = (&prepared.egress, &config.telemetry) {
            let _ = writeln!(
                out,
                "  trace collector {}: {}",
                telemetry.traces_url,
                way(ways, &telemetry.traces_url)
            );
        }
        warnings(&mut out, prepared, "[egress]", "");
    }
    for upstream in &config.upstreams {
        describe_upstream(&mut out, prepared, upstream);
    }
    describe_listeners(config, prepared, &mut out);
    let _ = writeln!(out, "token sources: {}", prepared.sources.len());
    out
}

/// `[egress]` on one line: where the proxy comes from, what bypasses it, its credentials.
fn describe_egress(egress: &config::Egress) -> String {
    let mut out = match &egress.proxy {
        config::EgressProxy::Fixed(uri) => format!("proxy {uri} (CONNECT tunnels)"),
        config::EgressProxy::Environment(env) => {
            let named: Vec<String> = env
                .proxies()
                .map(|(name, value)| format!("{name}={}", config::without_credentials(value)))
                .collect();
            if named.is_empty() {
                "use_env: the environment names no proxy, so every call goes out directly".into()
            } else {
                format!(
                    "proxies from the environment: {} (CONNECT tunnels)",
                    named.join(", ")
                )
            }
        }
    };
    let mut no_proxy: Vec<&str> = egress.no_proxy.iter().map(String::as_str).collect();
    if let config::EgressProxy::Environment(env) = &egress.proxy {
        no_proxy.extend(env.no.split(',').map(str::trim).filter(|s| !s.is_empty()));
    }
    if !no_proxy.is_empty() {
        let _ = write!(out, "; direct for {}", no_proxy.join(", "));
    }
    if let Some(path) = &egress.authorization_file {
        let _ = write!(out, "; Proxy-Authorization (Basic) from {}", path.display());
    }
    out
}

/// Where connections to `url` go, in words.
fn way(egress: &Egress, url: &http::Uri) -> String {
    match egress.way(url) {
        Way::Proxy(proxy) => format!("through the proxy {proxy}"),
        Way::NoProxy => "direct (no_proxy)".into(),
        Way::Direct => "direct (no proxy for its scheme)".into(),
    }
}

fn describe_upstream(out: &mut String, prepared: &Prepared, upstream: &config::Upstream) {
    let token = &upstream.token;
    let _ = writeln!(
        out,
        "upstream {}: listen {} -> {} (connect timeout {}, response header timeout {})",
        upstream.name,
        upstream.listen,
        upstream.url,
        duration(upstream.connect_timeout),
        duration(upstream.response_header_timeout),
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
    let client = match &token.client_id {
        Some(id) => format!("as client {id:?}"),
        None => "with no client_id".to_owned(),
    };
    let _ = write!(
        out,
        "  token: POST {} {client}, {}",
        token.url,
        client_auth::describe(&token.auth)
    );
    // The default grant goes unsaid, as it always did.
    if !matches!(token.grant, config::Grant::ClientCredentials) {
        let _ = write!(out, ", {}", crate::token::grant::describe(token));
    }
    if !token.presentation.is_default() {
        let _ = write!(
            out,
            ", sent as {}: {}",
            token.presentation.header,
            match token.presentation.prefix.as_str() {
                "" => "<token>".to_owned(),
                prefix => format!("{prefix} <token>"),
            }
        );
    }
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
        duration(token.timeout),
        duration(token.default_lifetime),
        duration(token.max_lifetime)
    );
    let roots = match upstream.tls.roots {
        Roots::Webpki => "webpki roots",
        Roots::Native => "system roots",
        Roots::None => "no built-in roots",
    };
    let _ = match &upstream.tls.ca_file {
        Some(ca_file) => write!(out, "  tls: {roots} + ca_file {}", ca_file.display()),
        None => write!(out, "  tls: {roots}"),
    };
    match prepared
        .routes
        .get(&upstream.name)
        .and_then(|route| route.client_certificate())
    {
        Some(fingerprint) => {
            let cert = upstream
                .tls
                .identity
                .as_ref()
                .map(|i| i.cert_file.display().to_string())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "; client certificate {cert} (x5t#S256 {fingerprint}) to the upstream"
            );
        }
        None => {
            let _ = writeln!(out);
        }
    }
    if let Some(egress) = &prepared.egress {
        let _ = writeln!(
            out,
            "  egress: upstream {}; token endpoint {}",
            way(egress, &upstream.url),
            way(egress, &token.url)
        );
    }
    if let Some(source) = prepared.sources.get(&SourceKey::of(upstream)) {
        if let Some(found) = &source.credentials {
            let _ = writeln!(out, "  credentials: {found}");
        }
        if let Some(key) = source.setup.as_ref().and_then(|setup| setup.dpop.as_ref()) {
            let kept = match token.dpop.as_ref().and_then(|d| d.key_file.as_ref()) {
                Some(path) => format!("from {}", path.display()),
                None => "made at start (a restart makes a new one)".to_owned(),
            };
            let _ = writeln!(out, "  dpop: {}, key {kept}", key.describe());
        }
    }
    warnings(out, prepared, &format!("upstream {}", upstream.name), "");
}

/// Each warning of `prepared` about `subject` whose message starts with `about`, as a
/// `WARNING:` line.
fn warnings(out: &mut String, prepared: &Prepared, subject: &str, about: &str) {
    for finding in prepared.of(Severity::Warning) {
        if finding.subject == subject && finding.message.starts_with(about) {
            let _ = writeln!(out, "  WARNING: {}", finding.message);
        }
    }
}

/// Each `[[listener]]`'s route table in match order, with the warning of each route that can
/// never match. (A listener of one `[[upstream]]` is described with its upstream above.)
fn describe_listeners(config: &Config, prepared: &Prepared, out: &mut String) {
    for listener in &config.listeners {
        let routes = crate::sidecar::routes_in_match_order(config, listener);
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
        let subject = format!("listener {}", listener.listen);
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
            warnings(out, prepared, &subject, &format!("route {} ", route.name));
        }
        if let Some(settings) = &listener.intercept {
            describe_intercept(out, prepared, settings, &routes);
            warnings(out, prepared, &format!("{subject} intercept"), "");
        }
    }
}

/// A listener's TLS interception: its CA (subject, fingerprint, expiry, constraints, and the
/// routed hosts it cannot name), or the CA a start would create.
fn describe_intercept(
    out: &mut String,
    prepared: &Prepared,
    settings: &config::Intercept,
    routes: &[&config::Upstream],
) {
    use crate::proxy::intercept::ca;
    let hosts: Vec<&str> = routes
        .iter()
        .filter_map(|route| route.route.host.as_deref())
        .collect();
    let _ = writeln!(
        out,
        "  intercept: CONNECT to the routed hosts (port 443, or the one a host names) is answered with TLS (handshake within {}); passthrough: {}",
        duration(settings.handshake_timeout),
        if settings.passthrough.is_empty() {
            "none".to_owned()
        } else {
            settings
                .passthrough
                .iter()
                .map(|(host, port)| format!("{host}:{port}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    match prepared.intercepts.get(&settings.ca_cert_file) {
        Some(found) => {
            let d = &found.description;
            let _ = writeln!(
                out,
                "  CA {}: {}",
                settings.ca_cert_file.display(),
                d.subject
            );
            let _ = writeln!(out, "    SHA-256 fingerprint {}", d.fingerprint);
            let _ = writeln!(
                out,
                "    expires {}",
                humantime::format_rfc3339_seconds(d.not_after)
            );
            match &d.constraints {
                Some(constraints) => {
                    let _ = writeln!(out, "    name constraints: {}", constraints.describe());
                }
                None => {
                    let _ = writeln!(out, "    name constraints: none (it may name any host)");
                }
            }
            let cannot = ca::cannot_name(d, hosts.iter().copied());
            if cannot.is_empty() {
                let _ = writeln!(out, "    names every routed host");
            } else {
                let _ = writeln!(out, "    cannot name: {}", cannot.join(", "));
            }
        }
        None => {
            let _ = writeln!(
                out,
                "  CA: none yet; a start would create {} and {} (ECDSA P-256, valid {}, name constraints permitting only {})",
                settings.ca_cert_file.display(),
                settings.ca_key_file.display(),
                duration(ca::CREATED_CA_VALIDITY),
                hosts.join(", ")
            );
        }
    }
    if let Some(bundle) = &settings.ca_bundle_file {
        let _ = writeln!(
            out,
            "  CA bundle (system roots and the CA) written at start to {}",
            bundle.display()
        );
    }
}

/// A duration as the config takes it: `10s`, `1h 30m`, `1d`, `500ms`.
fn duration(d: std::time::Duration) -> String {
    let mut parts = Vec::new();
    let mut secs = d.as_secs();
    for (unit, length) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= length {
            parts.push(format!("{}{unit}", secs / length));
            secs %= length;
        }
    }
    let millis = d.subsec_millis();
    if millis > 0 || parts.is_empty() {
        parts.push(format!("{millis}ms"));
    }
    parts.join(" ")
}

/// A size in the largest binary unit that divides it: `16 MiB`, `64 KiB`, `1000 bytes`.
fn size(bytes: usize) -> String {
    for (unit, length) in [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= length && bytes % length == 0 {
            return format!("{} {unit}", bytes / length);
        }
    }
    format!("{bytes} bytes")
}

/// Performs one token request for `upstream` and describes the outcome: token type, scope,
/// lifetime and where it came from, expiry. The token itself only with `show_token`. A
/// refresh token is spent as the running bearerd spends it: through the `[cache]`, under its
/// lease (refused, nothing sent, while another process holds it), the rotated one stored
/// before this returns.
pub async fn fetch_token(
    config: &Config,
    upstream: &str,
    show_token: bool,
) -> Result<String, String> {
    fetch_token_for(config, upstream, show_token, None).await
}

/// [`fetch_token`], for an on-behalf-of upstream with the subject token in `subject_file`
/// (`--subject-token-file`), which it needs and other upstreams refuse.
pub async fn fetch_token_for(
    config: &Config,
    upstream: &str,
    show_token: bool,
    subject_file: Option<&std::path::Path>,
) -> Result<String, String> {
    let Some(found) = config.upstreams.iter().find(|u| u.name == upstream) else {
        let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        return Err(format!(
            "no upstream named {upstream:?}; the config has: {}",
            names.join(", ")
        ));
    };
    // With dpop, the config holds a dpop_key_file (it refuses the grant otherwise): the chain
    // is named by the DPoP key's thumbprint, so this process finds the running bearerd's.
    let refreshing = matches!(found.token.grant, crate::config::Grant::RefreshToken(_));
    // Read before anything is prepared: a wrong flag is said first.
    let subject_token = match (found.token.on_behalf_of(), subject_file) {
        (Some(on_behalf_of), None) => {
            return Err(format!(
                "upstream {upstream}: on-behalf-of (subject_token_from = \"header:{}\"): the subject comes with each request; give one with --subject-token-file PATH",
                on_behalf_of.header
            ))
        }
        (None, Some(_)) => {
            return Err(format!(
                "upstream {upstream}: --subject-token-file is for on-behalf-of upstreams (grant = \"token_exchange\" with subject_token_from) only; this one's grant is {:?}{}",
                found.token.grant_name(),
                if matches!(found.token.grant, crate::config::Grant::TokenExchange(_)) {
                    ", which reads its subject_token_file"
                } else {
                    ""
                }
            ))
        }
        (Some(_), Some(path)) => Some(
            crate::token::grant::token_file_sync(path)
                .map_err(|e| format!("upstream {upstream}: --subject-token-file: {e}"))?,
        ),
        (None, None) => None,
    };
    let mut prepared = prepare(config);
    let subject = format!("upstream {upstream}");
    let Some(setup) = prepared
        .sources
        .remove(&SourceKey::of(found))
        .and_then(|source| source.setup)
    else {
        let why: Vec<String> = prepared
            .fatal()
            .filter(|f| f.subject == subject)
            .map(ToString::to_string)
            .collect();
        return Err(why.join("\n"));
    };
    let thumbprint = setup.dpop.as_ref().map(|key| key.thumbprint().to_owned());
    let fetcher = crate::token::fetch::Fetcher::new(
        found.token.clone(),
        setup.tls,
        setup.egress.as_ref(),
        setup.dpop,
        Box::new(|| {}),
    );
    let started = tokio::time::Instant::now();
    let fetched = if refreshing {
        // Through the store and under the lease, as the running bearerd spends it: the
        // rotated refresh token is stored before anything is printed.
        let Some(cache) = prepared.cache.take() else {
            let why: Vec<String> = prepared
                .fatal()
                .filter(|f| f.subject == "[cache]")
                .map(ToString::to_string)
                .collect();
            return Err(why.join("\n"));
        };
        crate::token::cache::fetch_leased(fetcher, cache, &found.token, thumbprint.as_deref()).await
    } else if let Some(subject) = &subject_token {
        fetcher.fetch_for(subject).await
    } else {
        crate::token::fetch::Fetch::fetch(&fetcher).await
    };
    let token = fetched.map_err(|e| {
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
    if let Some(subject) = &subject_token {
        let _ = writeln!(
            out,
            "  on behalf of the subject with hash {} (the subject token is never printed)",
            crate::token::on_behalf::SubjectKey::of(subject).fingerprint()
        );
    }
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
