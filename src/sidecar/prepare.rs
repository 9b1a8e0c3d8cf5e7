//! The one preparation step behind both `bearerd --check` and start (and every reload): read
//! every file, build every key and TLS setting, check every URL, and collect every problem
//! found rather than stopping at the first. What `--check` accepts, start can run, because
//! both run this; `--check` only describes what it prepared.
//!
//! Each finding says whether it stops a start ([`Severity::Fatal`]: a TLS or CA file, a key, a
//! `[cache]` file), is a problem bearerd starts with and reports until it is fixed
//! ([`Severity::Problem`]: a client secret not there yet, which a start answers with 503 and
//! `/readyz` down until it appears), or is a warning about what the operator chose
//! ([`Severity::Warning`]: a listener off loopback, plain http, a key file others can read, a
//! route that can never match). Nothing here connects anywhere: not to a token endpoint, an
//! upstream or Redis.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{self, Config};
use crate::egress::Egress;
use crate::proxy::intercept::ca::{self, Ca, Found};
use crate::proxy::{self, RouteSetup};
use crate::token::cache::{self, CacheSetupError};
use crate::token::client_auth;
use crate::token::setup::SourceSetup;
use crate::token::SourceKey;

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// bearerd cannot start (or reload) with it.
    Fatal,
    /// bearerd starts, but cannot do all of its work until it is fixed.
    Problem,
    /// Worth knowing; nothing fails.
    Warning,
}

/// One thing the preparation found.
#[derive(Debug, Clone)]
pub struct Finding {
    /// How much it matters.
    pub severity: Severity,
    /// What it is about: `upstream "name"`, `[cache]`, `listener 127.0.0.1:8080`.
    pub subject: String,
    /// What is wrong, and what to do. Never holds a secret.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.message)
    }
}

/// What a source's preparation found.
pub(crate) struct PreparedSource {
    /// Its TLS configuration and DPoP key; `None` when they could not be loaded (a fatal
    /// finding says why).
    pub(crate) setup: Option<SourceSetup>,
    /// What its credentials are, as `--check` describes them; `None` when they cannot be read
    /// now (a finding says why).
    pub(crate) credentials: Option<String>,
}

/// Everything a config needs that can fail, loaded, and every finding.
pub struct Prepared {
    /// Each route's TLS settings and target, by upstream name.
    pub(crate) routes: HashMap<String, RouteSetup>,
    /// Each token source's, by key.
    pub(crate) sources: HashMap<SourceKey, PreparedSource>,
    /// `[cache]`, read but not connected.
    pub(crate) cache: Option<cache::Prepared>,
    /// `[egress]`: the proxy every route, token source and the trace exporter go through.
    pub(crate) egress: Option<Arc<Egress>>,
    /// Each intercepting listener's CA, by `ca_cert_file`: read, or created by a start
    /// (`--check` creates nothing: a CA still to be created is absent here).
    pub(crate) intercepts: HashMap<PathBuf, Arc<Ca>>,
    /// In the order found: `[cache]` and `[admin]` first, then each upstream, then each
    /// listener.
    pub findings: Vec<Finding>,
}

impl Prepared {
    /// The findings that stop a start.
    pub fn fatal(&self) -> impl Iterator<Item = &Finding> {
        self.of(Severity::Fatal)
    }

    /// The findings of `severity`.
    pub fn of(&self, severity: Severity) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.severity == severity)
    }

    /// Logs every finding that does not stop a start, as start and reload report them.
    pub(crate) fn log(&self) {
        for finding in &self.findings {
            match finding.severity {
                Severity::Fatal => {}
                Severity::Problem => {
                    tracing::error!(subject = %finding.subject, "{}", finding.message);
                }
                Severity::Warning => {
                    tracing::warn!(subject = %finding.subject, "{}", finding.message);
                }
            }
        }
    }
}

/// Prepares everything `config` needs. Reads files; connects nowhere; creates nothing (an
/// interception CA that does not exist yet is reported as one a start would create).
pub fn prepare(config: &Config) -> Prepared {
    prepare_with(config, Create::Nothing)
}

/// What a preparation may create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Create {
    /// Nothing: `--check`.
    Nothing,
    /// An interception CA whose files are both absent, and each `ca_bundle_file`: a start or
    /// a reload.
    Ca,
}

/// [`prepare`], creating what `create` allows.
pub(crate) fn prepare_with(config: &Config, create: Create) -> Prepared {
    let mut prepared = Prepared {
        routes: HashMap::new(),
        sources: HashMap::new(),
        cache: None,
        egress: config.egress.as_ref().map(|e| Arc::new(Egress::new(e))),
        intercepts: HashMap::new(),
        findings: Vec::new(),
    };
    if let Some(egress) = &config.egress {
        if let Err(problem) = crate::egress::check_authorization(egress) {
            prepared.found(
                Severity::Problem,
                "[egress]",
                format!("{problem} (bearerd starts, and every call through the proxy fails until it can be read)"),
            );
        }
    }
    if let Some(settings) = &config.cache {
        match cache::prepare(settings) {
            Ok(cache) => {
                for path in cache.loose_key_files() {
                    prepared.found(Severity::Warning, "[cache]", loose_key_file(path));
                }
                prepared.cache = Some(cache);
            }
            Err(error) => prepared.found(Severity::Fatal, "[cache]", cache_message(&error)),
        }
    }
    if crate::admin::is_exposed(&config.admin) {
        prepared.found(
            Severity::Warning,
            "[admin]",
            "listens beyond loopback without allow_from: any peer that reaches it can hold its connections and read /metrics; set [admin] allow_from to the node's and Prometheus's networks".into(),
        );
    }
    for upstream in &config.upstreams {
        prepared.prepare_upstream(upstream);
    }
    for listener in &config.listeners {
        prepared.check_routes(config, listener);
        if let Some(settings) = &listener.intercept {
            prepared.prepare_intercept(config, listener, settings, create);
        }
    }
    prepared
}

impl Prepared {
    /// Notes a finding, once: the upstream and its token endpoint share their TLS settings,
    /// and a CA file that cannot be read is one problem, not two.
    fn found(&mut self, severity: Severity, subject: impl Into<String>, message: String) {
        let finding = Finding {
            severity,
            subject: subject.into(),
            message,
        };
        let known = self.findings.iter().any(|f| {
            (f.severity, &f.subject, &f.message)
                == (finding.severity, &finding.subject, &finding.message)
        });
        if !known {
            self.findings.push(finding);
        }
    }

    fn prepare_upstream(&mut self, upstream: &config::Upstream) {
        let subject = format!("upstream {}", upstream.name);
        match RouteSetup::new(upstream, self.egress.as_ref()) {
            Ok(setup) => {
                self.routes.insert(upstream.name.clone(), setup);
            }
            Err(error) => self.found(Severity::Fatal, &subject, error.to_string()),
        }
        let key = SourceKey::of(upstream);
        if !self.sources.contains_key(&key) {
            let setup = match SourceSetup::new(&key, self.egress.as_ref()) {
                Ok(setup) => Some(setup),
                Err(error) => {
                    self.found(Severity::Fatal, &subject, error.to_string());
                    None
                }
            };
            let grant = crate::token::grant::check(&upstream.token).unwrap_or(Ok(String::new()));
            let checked = client_auth::check(&upstream.token.auth).and_then(|found| {
                grant.map(|grant| match grant.is_empty() {
                    true => found,
                    false => format!("{found}; {grant}"),
                })
            });
            let credentials = match checked {
                Ok(found) => Some(found),
                Err(error) => {
                    self.found(
                        Severity::Problem,
                        &subject,
                        format!("{error} (bearerd starts without it, and answers 503 until it can be read)"),
                    );
                    None
                }
            };
            self.sources
                .insert(key, PreparedSource { setup, credentials });
        }
        self.warn_about_exposure(upstream, &subject);
    }

    /// What an operator chose to expose: a listener off loopback (only its `allow_from`
    /// keeps strangers from the token), plain http, key files others may read.
    fn warn_about_exposure(&mut self, upstream: &config::Upstream, subject: &str) {
        if !upstream.listen.ip().is_loopback() {
            let allowed: Vec<String> = upstream
                .allow_from
                .iter()
                .flatten()
                .map(ToString::to_string)
                .collect();
            self.found(
                Severity::Warning,
                subject,
                format!(
                    "listens beyond loopback ({}): peers in allow_from ({}) can call the upstream with bearerd's token",
                    upstream.listen,
                    allowed.join(", ")
                ),
            );
        }
        if upstream.allow_plain_http {
            self.found(
                Severity::Warning,
                subject,
                format!(
                    "allow_plain_http: requests and the token go to the upstream unencrypted ({})",
                    upstream.url
                ),
            );
        }
        if upstream.token.allow_plain_http {
            self.found(
                Severity::Warning,
                subject,
                format!(
                    "allow_plain_http: the client credentials go to the token endpoint unencrypted ({})",
                    upstream.token.url
                ),
            );
        }
        let tls_key = upstream.tls.identity.as_ref().map(|i| i.key_file.as_path());
        for path in upstream.token.key_files().into_iter().chain(tls_key) {
            if crate::secret::readable_by_others(path) {
                self.found(Severity::Warning, subject, loose_key_file(path));
            }
        }
    }

    /// A warning for each route of `listener` that can never match: a route earlier in match
    /// order takes every request it would.
    fn check_routes(&mut self, config: &Config, listener: &config::Listener) {
        let routes = routes_in_match_order(config, listener);
        for (i, route) in routes.iter().enumerate() {
            if let Some(earlier) = routes[..i]
                .iter()
                .find(|e| proxy::shadows(&e.route, &route.route))
            {
                self.found(
                    Severity::Warning,
                    format!("listener {}", listener.listen),
                    format!(
                        "route {} can never match: {} comes first and takes the same requests",
                        route.name, earlier.name
                    ),
                );
            }
        }
    }
}

impl Prepared {
    /// Reads (or, with [`Create::Ca`], creates) the CA of an intercepting listener, checks
    /// that it can name every routed host, and writes the `ca_bundle_file`.
    fn prepare_intercept(
        &mut self,
        config: &Config,
        listener: &config::Listener,
        settings: &config::Intercept,
        create: Create,
    ) {
        let subject = format!("listener {} intercept", listener.listen);
        let hosts: Vec<&str> = routes_in_match_order(config, listener)
            .iter()
            .filter_map(|route| route.route.host.as_deref())
            .collect();
        let ca = match ca::find(settings) {
            Err(error) => {
                self.found(Severity::Fatal, &subject, error.to_string());
                return;
            }
            Ok(Found::Absent(Err(reason))) => {
                self.found(
                    Severity::Fatal,
                    &subject,
                    format!(
                        "no CA at {}, and bearerd cannot create one: {reason}",
                        settings.ca_cert_file.display()
                    ),
                );
                return;
            }
            Ok(Found::Absent(Ok(()))) if create == Create::Nothing => return,
            Ok(Found::Absent(Ok(()))) => match ca::create(settings, hosts.iter().copied()) {
                Ok(ca) => {
                    tracing::info!(
                        cert = %settings.ca_cert_file.display(),
                        fingerprint = %ca.description.fingerprint,
                        "created the interception CA, constrained to the routed hosts"
                    );
                    ca
                }
                Err(error) => {
                    self.found(Severity::Fatal, &subject, error.to_string());
                    return;
                }
            },
            Ok(Found::Ca(ca)) => *ca,
        };
        let cannot = ca::cannot_name(&ca.description, hosts.iter().copied());
        if !cannot.is_empty() {
            self.found(
                Severity::Fatal,
                &subject,
                format!(
                    "the CA at {} cannot name {} (its name constraints do not permit them); bearerd never re-mints a CA an app may already trust: remove both CA files for a new one, or bring a CA that permits them",
                    settings.ca_cert_file.display(),
                    cannot.join(", ")
                ),
            );
        }
        let soon = std::time::SystemTime::now() + CA_EXPIRY_WARNING;
        if ca.description.not_after < soon {
            self.found(
                Severity::Warning,
                &subject,
                format!(
                    "the CA at {} expires at {}: apps will refuse its leaves after that",
                    settings.ca_cert_file.display(),
                    humantime::format_rfc3339_seconds(ca.description.not_after)
                ),
            );
        }
        if ca.description.constraints.is_none() {
            self.found(
                Severity::Warning,
                &subject,
                format!(
                    "the CA at {} has no name constraints: its key can impersonate any host to the apps that trust it",
                    settings.ca_cert_file.display()
                ),
            );
        }
        if crate::secret::readable_by_others(&settings.ca_key_file) {
            self.found(
                Severity::Warning,
                &subject,
                loose_key_file(&settings.ca_key_file),
            );
        }
        if let (Some(bundle), Create::Ca) = (&settings.ca_bundle_file, create) {
            if let Err(error) = ca::write_bundle(bundle, &ca.cert) {
                self.found(Severity::Fatal, &subject, error.to_string());
            }
        }
        self.intercepts
            .insert(settings.ca_cert_file.clone(), Arc::new(ca));
    }
}

/// A CA that expires sooner than this is warned about: 30 days.
const CA_EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 60 * 60);

/// The routes of `listener` in the order a request tries them: the longest path prefix
/// first, the first in the file among equals (a stable sort keeps file order).
pub(crate) fn routes_in_match_order<'a>(
    config: &'a Config,
    listener: &config::Listener,
) -> Vec<&'a config::Upstream> {
    let mut routes: Vec<&config::Upstream> = listener
        .routes
        .iter()
        .filter_map(|name| config.upstreams.iter().find(|u| &u.name == name))
        .collect();
    routes.sort_by_key(|u| std::cmp::Reverse(u.route.path_prefix.as_ref().map_or(0, String::len)));
    routes
}

/// The warning of a key file that group or others may read.
fn loose_key_file(path: &std::path::Path) -> String {
    format!("key file {} is readable by group or others: make it readable by its owner only (chmod 600, or defaultMode: 0400 on a Kubernetes volume)", path.display())
}

/// `[cache]`'s error without its own `[cache]` prefix (the finding's subject says it).
fn cache_message(error: &CacheSetupError) -> String {
    let text = error.to_string();
    text.strip_prefix("[cache] ").unwrap_or(&text).to_owned()
}
