//! `bearerd --check`: validate everything that can be validated without sending a request,
//! and describe what would run. Secrets are read to prove they can be, never printed.

use std::collections::HashSet;
use std::fmt::Write;

use crate::config::{Config, Roots};

/// Reads every secret and trust-anchor file of `config`. Returns the description of what would
/// run, or every problem found.
pub fn check(config: &Config) -> Result<String, Vec<String>> {
    let mut out = String::new();
    let mut problems = Vec::new();
    let mut sources = HashSet::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(out, "config {}: valid", config.path.display());
    let _ = writeln!(out, "admin: listen {}", config.admin.listen);
    for upstream in &config.upstreams {
        let token = &upstream.token;
        sources.insert((&upstream.token, &upstream.tls));
        let _ = writeln!(
            out,
            "upstream {}: listen {} -> {} (connect timeout {}, response header timeout {})",
            upstream.name,
            upstream.listen,
            upstream.url,
            humantime::format_duration(upstream.connect_timeout),
            humantime::format_duration(upstream.response_header_timeout),
        );
        let _ = write!(
            out,
            "  token: POST {} as client {:?}, auth {}, secret from {}",
            token.url, token.client_id, token.auth, token.client_secret
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
            " (timeout {}, lifetime if unstated {})",
            humantime::format_duration(token.timeout),
            humantime::format_duration(token.default_lifetime)
        );
        let roots = match upstream.tls.roots {
            Roots::Webpki => "webpki roots",
            Roots::Native => "system roots",
            Roots::None => "no built-in roots",
        };
        let _ = match &upstream.tls.ca_file {
            Some(ca_file) => writeln!(out, "  tls: {roots} + ca_file {}", ca_file.display()),
            None => writeln!(out, "  tls: {roots}"),
        };
        if let Err(e) = token.client_secret.read() {
            problems.push(format!("upstream {}: {e}", upstream.name));
        }
        if let Err(e) = crate::tls::client_config(&upstream.tls) {
            problems.push(format!("upstream {}: {e}", upstream.name));
        }
    }
    let _ = writeln!(out, "token sources: {}", sources.len());
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}
