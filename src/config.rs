//! Configuration: the validated runtime types, loaded from the TOML file.
//!
//! `file.rs` holds the file as written; [`Config::parse`] checks it as a whole and turns it
//! into these types, collecting every problem with the file, line and key it concerns, so
//! a user fixes the file in one pass rather than one error per run.

mod file;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use toml::Spanned;

use crate::secret::SecretSource;
use crate::token::schedule;

/// Admin listener address when `[admin] listen` is not set. Loopback, so that nothing outside
/// the pod reaches it unless the user says so.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";
/// `connect_timeout` when not set: time to open the TCP connection to an upstream.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `response_header_timeout` when not set: from sending the request to the response headers.
pub const DEFAULT_RESPONSE_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// `[upstream.token] timeout` when not set: one whole token request, connect to last byte.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// `[upstream.token] default_lifetime` when not set: the lifetime assumed for a token whose
/// response has no `expires_in` and which is not a JWT with an `exp` claim. Short on purpose:
/// refreshing too early costs one request, holding a dead token costs the app its calls.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// `[upstream.token] max_lifetime` when not set: the longest lifetime believed, whatever the
/// endpoint says, so that a token is fetched again at least daily and no answer can push a
/// refresh past the end of time.
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The longest duration any setting takes: longer ones are typing mistakes, and would
/// overflow the clock arithmetic built on them.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// `[admin] max_connections` when not set: probes and scrapes need a handful; a peer that
/// opens more cannot take file descriptors from the proxy listeners.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, for messages.
    pub path: PathBuf,
    /// `[admin]`
    pub admin: Admin,
    /// `[log]`
    pub log: Log,
    /// `[server]`
    pub server: Server,
    /// `[[upstream]]`, in file order.
    pub upstreams: Vec<Upstream>,
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
    /// See [`DEFAULT_ADMIN_MAX_CONNECTIONS`].
    pub max_connections: usize,
}

/// `[server]`: app connections and shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Server {
    /// See [`DEFAULT_SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
    /// Limits on each listener's connections.
    pub limits: crate::proxy::connection::Limits,
    /// See [`DEFAULT_BODY_IDLE_TIMEOUT`].
    pub body_idle_timeout: Duration,
    /// See [`DEFAULT_REPLAY_MEMORY`].
    pub replay_memory: usize,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// Filter directives (`info`, `warn,bearerd=debug`); `RUST_LOG`, when set, wins.
    pub level: String,
    /// Line format.
    pub format: LogFormat,
    /// One line per proxied request: method, path without query, status, duration.
    pub access: bool,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `[server] shutdown_grace` when not set: how long in-flight requests may take to finish
/// after SIGTERM, below the 30 s Kubernetes waits before SIGKILL.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// `[server] header_read_timeout` when not set: from a request head's first byte to its end.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// `[server] idle_timeout` when not set: how long a kept-alive app connection may wait for
/// its next request.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// `[server] max_header_bytes` when not set; larger request heads are answered 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// The smallest `max_header_bytes` allowed (hyper's minimum read buffer).
pub const MIN_MAX_HEADER_BYTES: usize = 8192;
/// `[server] max_connections` when not set: app connections per listener; more are
/// answered 503 and closed. Chosen with the 128 MiB memory limit of `deploy/`: 512
/// connections each sending a 64 KiB body measured 110 MiB at most (README, sizing).
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// `[server] max_connections` at most: far above what one sidecar serves, and within what a
/// listener's connection count (a semaphore) can hold.
pub const MAX_MAX_CONNECTIONS: usize = 1_000_000;

/// `[server] body_idle_timeout` when not set: how long a request body may make no progress
/// before the request is ended and its memory freed.
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// `[server] replay_memory` when not set: the total size of the request bodies kept, across
/// all listeners, so that a request the upstream answers 401 can be sent again. Past it,
/// requests stream without a replay.
pub const DEFAULT_REPLAY_MEMORY: usize = 16 * 1024 * 1024;

/// `[log] level` when not set.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// One `[[upstream]]`: a local listener and where its requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The configured name, used in logs, metrics and error bodies.
    pub name: String,
    /// The local address the app sends plain HTTP to.
    pub listen: SocketAddr,
    /// Scheme, authority and base path of the upstream (no query).
    pub url: Uri,
    /// See [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// See [`DEFAULT_RESPONSE_HEADER_TIMEOUT`].
    pub response_header_timeout: Duration,
    /// When the upstream answers 401 to a token, fetch a new one and replay the request once
    /// (if its body was kept). Default on.
    pub retry_on_401: bool,
    /// The networks whose peers may connect; `None` (allowed only on a loopback `listen`)
    /// lets every peer in, as only the pod can reach a loopback address.
    pub allow_from: Option<Vec<ipnet::IpNet>>,
    /// `url` may be plain `http://` to a host that is not loopback.
    pub allow_plain_http: bool,
    /// How tokens for this upstream are obtained.
    pub token: TokenSettings,
    /// Trust anchors for the upstream and its token endpoint.
    pub tls: TlsSettings,
}

/// `[upstream.token]`. Upstreams with equal settings (and equal TLS settings) share one token
/// source, hence `Eq + Hash`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenSettings {
    /// The token endpoint.
    pub url: Uri,
    /// The OAuth2 `client_id`.
    pub client_id: String,
    /// Where the client secret is read from, at each token request.
    pub client_secret: SecretSource,
    /// How the client authenticates.
    pub auth: ClientAuth,
    /// `scope` form field.
    pub scope: Option<String>,
    /// `audience` form field (Auth0 requires it).
    pub audience: Option<String>,
    /// `resource` form field (RFC 8707).
    pub resource: Option<String>,
    /// Extra form fields, sent as given.
    pub params: BTreeMap<String, String>,
    /// See [`DEFAULT_TOKEN_TIMEOUT`].
    pub timeout: Duration,
    /// See [`DEFAULT_TOKEN_LIFETIME`].
    pub default_lifetime: Duration,
    /// See [`DEFAULT_MAX_TOKEN_LIFETIME`].
    pub max_lifetime: Duration,
    /// The token `url` may be plain `http://` to a host that is not loopback.
    pub allow_plain_http: bool,
    /// First wait after a failed token request; see [`schedule::backoff`].
    pub backoff_base: Duration,
    /// Longest wait between failed token requests.
    pub backoff_cap: Duration,
}

/// Client authentication at the token endpoint (RFC 6749 §2.3). An enum so that
/// `private_key_jwt`, mTLS and others can join it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientAuth {
    /// `client_secret_basic`: HTTP Basic with the form-urlencoded id and secret (§2.3.1).
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` in the form body (§2.3.1).
    Post,
}

impl fmt::Display for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Basic => "basic",
            Self::Post => "post",
        })
    }
}

/// `[upstream.tls]`
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsSettings {
    /// The built-in trust anchors.
    pub roots: Roots,
    /// Extra trust anchors (PEM), added to `roots`.
    pub ca_file: Option<PathBuf>,
}

/// Which built-in trust anchors to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Roots {
    /// Mozilla's root program, compiled into bearerd: works in an image with no CA bundle.
    #[default]
    Webpki,
    /// The operating system's store, for corporate CAs installed there.
    Native,
    /// None: only `ca_file` is trusted.
    None,
}

/// A config that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read and has problems; each is listed.
    #[error("{}", Problems { path, problems })]
    Invalid {
        /// The path given.
        path: PathBuf,
        /// Every problem found, in file order.
        problems: Vec<Problem>,
    },
}

/// One problem in the config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted key path, like `upstream[0].token.url`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Renders problems one per line as `file:line:column: key: message`.
struct Problems<'a> {
    path: &'a Path,
    problems: &'a [Problem],
}

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.path.display(),
                p.line,
                p.column,
                p.key,
                p.message
            )?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates `text` as if read from `path`. Relative file paths in it are taken relative
    /// to the directory of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut validator = Validator {
            text,
            base_dir: path.parent().unwrap_or(Path::new("")),
            problems: Vec::new(),
        };
        let config = validator.file(path);
        match config {
            Some(config) if validator.problems.is_empty() => Ok(config),
            _ => {
                validator.problems.sort_by_key(|p| (p.line, p.column));
                Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    problems: validator.problems,
                })
            }
        }
    }
}

/// Walks the raw file, collecting problems as it goes.
struct Validator<'a> {
    text: &'a str,
    base_dir: &'a Path,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn file(&mut self, path: &Path) -> Option<Config> {
        let raw = self.deserialize()?;
        let admin_listen = match raw.admin.as_ref().and_then(|a| a.get_ref().listen.as_ref()) {
            Some(listen) => self.socket_addr(listen, "admin.listen"),
            #[allow(clippy::expect_used)] // a constant that a unit test parses
            None => Some(DEFAULT_ADMIN_LISTEN.parse().expect("valid default")),
        };
        let admin_max_connections = self.count(
            raw.admin
                .as_ref()
                .and_then(|a| a.get_ref().max_connections.as_ref()),
            "admin.max_connections",
            DEFAULT_ADMIN_MAX_CONNECTIONS,
            1..=MAX_MAX_CONNECTIONS,
        );
        let log = self.log(raw.log.as_ref());
        let server = self.server(raw.server.as_ref());
        if raw.upstream.is_empty() {
            self.problem(0..0, "upstream", "no [[upstream]] is configured");
        }
        let upstreams: Vec<Option<Upstream>> = raw
            .upstream
            .iter()
            .enumerate()
            .map(|(i, u)| self.upstream(&format!("upstream[{i}]"), u.get_ref()))
            .collect();
        self.check_unique(&raw, admin_listen);
        Some(Config {
            path: path.to_owned(),
            admin: Admin {
                listen: admin_listen?,
                max_connections: admin_max_connections,
            },
            log,
            server,
            upstreams: upstreams.into_iter().collect::<Option<_>>()?,
        })
    }

    /// Serde's pass: syntax, types, unknown and missing keys. It stops at the first problem.
    fn deserialize(&mut self) -> Option<file::File> {
        let deserializer = match toml::Deserializer::parse(self.text) {
            Ok(d) => d,
            Err(e) => {
                self.problem(e.span().unwrap_or(0..0), "(syntax)", e.message());
                return None;
            }
        };
        match serde_path_to_error::deserialize::<_, file::File>(deserializer) {
            Ok(file) => Some(file),
            Err(e) => {
                let key = key_path(e.path());
                let inner = e.into_inner();
                self.problem(inner.span().unwrap_or(0..0), key, inner.message());
                None
            }
        }
    }

    fn server(&mut self, raw: Option<&file::Server>) -> Server {
        let duration =
            |v: &mut Self,
             pick: fn(&file::Server) -> Option<&Spanned<String>>,
             key: &str,
             default| { v.duration(raw.and_then(pick), key, default) };
        let shutdown_grace = duration(
            self,
            |s| s.shutdown_grace.as_ref(),
            "server.shutdown_grace",
            DEFAULT_SHUTDOWN_GRACE,
        );
        let header_read_timeout = duration(
            self,
            |s| s.header_read_timeout.as_ref(),
            "server.header_read_timeout",
            DEFAULT_HEADER_READ_TIMEOUT,
        );
        let idle_timeout = duration(
            self,
            |s| s.idle_timeout.as_ref(),
            "server.idle_timeout",
            DEFAULT_IDLE_TIMEOUT,
        );
        let max_header_bytes = self.count(
            raw.and_then(|s| s.max_header_bytes.as_ref()),
            "server.max_header_bytes",
            DEFAULT_MAX_HEADER_BYTES,
            MIN_MAX_HEADER_BYTES..=usize::MAX,
        );
        let max_connections = self.count(
            raw.and_then(|s| s.max_connections.as_ref()),
            "server.max_connections",
            DEFAULT_MAX_CONNECTIONS,
            1..=MAX_MAX_CONNECTIONS,
        );
        let body_idle_timeout = duration(
            self,
            |s| s.body_idle_timeout.as_ref(),
            "server.body_idle_timeout",
            DEFAULT_BODY_IDLE_TIMEOUT,
        );
        let replay_memory = match raw.and_then(|s| s.replay_memory.as_ref()) {
            None => DEFAULT_REPLAY_MEMORY,
            Some(value) => match parse_size(value.get_ref()) {
                Some(bytes) => bytes,
                None => {
                    self.problem(
                        value.span(),
                        "server.replay_memory",
                        format!(
                            "{:?} is not a size such as \"16MiB\", \"512KiB\" or \"0\"",
                            value.get_ref()
                        ),
                    );
                    DEFAULT_REPLAY_MEMORY
                }
            },
        };
        Server {
            shutdown_grace,
            limits: crate::proxy::connection::Limits {
                header_read_timeout,
                idle_timeout,
                max_header_bytes,
                max_connections,
            },
            body_idle_timeout,
            replay_memory,
        }
    }

    /// A whole number within `range`.
    fn count(
        &mut self,
        value: Option<&Spanned<i64>>,
        key: &str,
        default: usize,
        range: std::ops::RangeInclusive<usize>,
    ) -> usize {
        let Some(value) = value else {
            return default;
        };
        match usize::try_from(*value.get_ref()) {
            Ok(n) if range.contains(&n) => n,
            _ => {
                let (min, max) = (range.start(), range.end());
                let message = if *max == usize::MAX {
                    format!("must be a whole number of at least {min}")
                } else {
                    format!("must be a whole number from {min} to {max}")
                };
                self.problem(value.span(), key, message);
                default
            }
        }
    }

    fn log(&mut self, raw: Option<&file::Log>) -> Log {
        let level = match raw.and_then(|l| l.level.as_ref()) {
            Some(level) => {
                if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(level.get_ref()) {
                    self.problem(
                        level.span(),
                        "log.level",
                        format!("{:?} is not a level or filter: {e}", level.get_ref()),
                    );
                }
                level.get_ref().clone()
            }
            None => DEFAULT_LOG_LEVEL.to_owned(),
        };
        Log {
            level,
            format: match raw.and_then(|l| l.format) {
                None | Some(file::LogFormat::Text) => LogFormat::Text,
                Some(file::LogFormat::Json) => LogFormat::Json,
            },
            access: raw.and_then(|l| l.access).unwrap_or(false),
        }
    }

    fn upstream(&mut self, key: &str, raw: &file::Upstream) -> Option<Upstream> {
        let name = raw.name.get_ref();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            self.problem(
                raw.name.span(),
                format!("{key}.name"),
                format!("{name:?} is not a valid name: use letters, digits, '-', '_' and '.'"),
            );
        }
        let listen = self.socket_addr(&raw.listen, &format!("{key}.listen"));
        let allow_from = raw
            .allow_from
            .as_ref()
            .map(|list| self.networks(list, &format!("{key}.allow_from")));
        if let Some(addr) = listen {
            if !addr.ip().is_loopback() && allow_from.is_none() {
                self.problem(
                    raw.listen.span(),
                    format!("{key}.listen"),
                    format!(
                        "{addr} is not a loopback address: whoever reaches it calls the upstream with bearerd's token. Listen on 127.0.0.1, or set allow_from to the networks that may connect ([\"0.0.0.0/0\", \"::/0\"] for anyone)"
                    ),
                );
            }
        }
        let allow_plain_http = raw.allow_plain_http.unwrap_or(false);
        let url = self.http_url(&raw.url, &format!("{key}.url"), allow_plain_http);
        if let Some(url) = &url {
            if url.query().is_some() {
                self.problem(
                    raw.url.span(),
                    format!("{key}.url"),
                    "must not have a query: the app's query is passed through",
                );
            }
        }
        let connect_timeout = self.duration(
            raw.connect_timeout.as_ref(),
            &format!("{key}.connect_timeout"),
            DEFAULT_CONNECT_TIMEOUT,
        );
        let response_header_timeout = self.duration(
            raw.response_header_timeout.as_ref(),
            &format!("{key}.response_header_timeout"),
            DEFAULT_RESPONSE_HEADER_TIMEOUT,
        );
        let token = self.token(&format!("{key}.token"), &raw.token);
        let tls = match &raw.tls {
            None => TlsSettings {
                roots: Roots::default(),
                ca_file: None,
            },
            Some(spanned) => {
                let tls = spanned.get_ref();
                let settings = TlsSettings {
                    roots: match tls.roots {
                        None | Some(file::Roots::Webpki) => Roots::Webpki,
                        Some(file::Roots::Native) => Roots::Native,
                        Some(file::Roots::None) => Roots::None,
                    },
                    ca_file: tls
                        .ca_file
                        .as_ref()
                        .map(|p| self.base_dir.join(p.get_ref())),
                };
                if settings.roots == Roots::None && settings.ca_file.is_none() {
                    self.problem(
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
            url: url?,
            connect_timeout,
            response_header_timeout,
            retry_on_401: raw.retry_on_401.unwrap_or(true),
            allow_from,
            allow_plain_http,
            token: token?,
            tls,
        })
    }

    fn token(&mut self, key: &str, spanned: &Spanned<file::Token>) -> Option<TokenSettings> {
        let raw = spanned.get_ref();
        let allow_plain_http = raw.allow_plain_http.unwrap_or(false);
        let url = self.http_url(&raw.url, &format!("{key}.url"), allow_plain_http);
        if raw.client_id.get_ref().is_empty() {
            self.problem(raw.client_id.span(), format!("{key}.client_id"), "is empty");
        }
        let sources: Vec<(SecretSource, Range<usize>)> = [
            raw.client_secret_file.as_ref().map(|p| {
                (
                    SecretSource::File(self.base_dir.join(p.get_ref())),
                    p.span(),
                )
            }),
            raw.client_secret_env
                .as_ref()
                .map(|v| (SecretSource::Env(v.get_ref().clone()), v.span())),
            raw.client_secret.as_ref().map(|s| {
                (
                    SecretSource::Inline(crate::secret::Secret::new(s.get_ref().as_str())),
                    s.span(),
                )
            }),
        ]
        .into_iter()
        .flatten()
        .collect();
        let client_secret = match <[_; 1]>::try_from(sources) {
            Ok([(source, _)]) => Some(source),
            Err(sources) if sources.is_empty() => {
                self.problem(
                    spanned.span(),
                    format!("{key}.client_secret_file"),
                    "no client secret: set one of client_secret_file, client_secret_env or client_secret",
                );
                None
            }
            Err(sources) => {
                self.problem(
                    sources[1].1.clone(),
                    format!("{key}.client_secret"),
                    "more than one client secret source: set only one of client_secret_file, client_secret_env or client_secret",
                );
                None
            }
        };
        let params = raw
            .params
            .as_ref()
            .map(|p| p.get_ref().clone())
            .unwrap_or_default();
        for name in params.keys() {
            if RESERVED_FORM_FIELDS.contains(&name.as_str()) {
                self.problem(
                    raw.params.as_ref().map_or(0..0, Spanned::span),
                    format!("{key}.params.{name}"),
                    format!("{name} is set by bearerd; use the dedicated key instead"),
                );
            }
        }
        let backoff_base = self.duration(
            raw.backoff_base.as_ref(),
            &format!("{key}.backoff_base"),
            schedule::DEFAULT_BACKOFF_BASE,
        );
        let backoff_cap = self.duration(
            raw.backoff_cap.as_ref(),
            &format!("{key}.backoff_cap"),
            schedule::DEFAULT_BACKOFF_CAP,
        );
        if backoff_cap < backoff_base {
            self.problem(
                raw.backoff_cap
                    .as_ref()
                    .or(raw.backoff_base.as_ref())
                    .map_or(0..0, Spanned::span),
                format!("{key}.backoff_cap"),
                format!(
                    "is shorter than backoff_base ({})",
                    humantime::format_duration(backoff_base)
                ),
            );
        }
        let default_lifetime = self.duration(
            raw.default_lifetime.as_ref(),
            &format!("{key}.default_lifetime"),
            DEFAULT_TOKEN_LIFETIME,
        );
        let max_lifetime = self.duration(
            raw.max_lifetime.as_ref(),
            &format!("{key}.max_lifetime"),
            DEFAULT_MAX_TOKEN_LIFETIME,
        );
        if default_lifetime > max_lifetime {
            // Name the key that was written: the other one is a default.
            match (&raw.default_lifetime, &raw.max_lifetime) {
                (Some(written), _) => self.problem(
                    written.span(),
                    format!("{key}.default_lifetime"),
                    format!(
                        "is longer than max_lifetime ({})",
                        humantime::format_duration(max_lifetime)
                    ),
                ),
                (None, written) => self.problem(
                    written.as_ref().map_or(0..0, Spanned::span),
                    format!("{key}.max_lifetime"),
                    format!(
                        "is shorter than default_lifetime ({})",
                        humantime::format_duration(default_lifetime)
                    ),
                ),
            }
        }
        let optional = |v: &Option<Spanned<String>>| v.as_ref().map(|s| s.get_ref().clone());
        Some(TokenSettings {
            url: url?,
            client_id: raw.client_id.get_ref().clone(),
            client_secret: client_secret?,
            auth: match raw.auth {
                None | Some(file::ClientAuth::Basic) => ClientAuth::Basic,
                Some(file::ClientAuth::Post) => ClientAuth::Post,
            },
            scope: optional(&raw.scope),
            audience: optional(&raw.audience),
            resource: optional(&raw.resource),
            params,
            timeout: self.duration(
                raw.timeout.as_ref(),
                &format!("{key}.timeout"),
                DEFAULT_TOKEN_TIMEOUT,
            ),
            default_lifetime,
            max_lifetime,
            allow_plain_http,
            backoff_base,
            backoff_cap,
        })
    }

    /// Two listeners on one address would fail at bind time with a vaguer message; names
    /// must be unique because metrics and logs tell upstreams apart by them.
    fn check_unique(&mut self, raw: &file::File, admin: Option<SocketAddr>) {
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
        if let Some(admin) = admin {
            addrs.insert(admin, "[admin]".into());
        }
        for (i, upstream) in raw.upstream.iter().enumerate() {
            let upstream = upstream.get_ref();
            let name = upstream.name.get_ref().as_str();
            if let Some(first) = names.insert(name, i) {
                self.problem(
                    upstream.name.span(),
                    format!("upstream[{i}].name"),
                    format!("{name:?} is already the name of upstream[{first}]"),
                );
            }
            // Port 0 asks the OS for a free port, so it never collides (tests use it).
            if let Ok(addr) = upstream.listen.get_ref().parse::<SocketAddr>() {
                if addr.port() != 0 {
                    if let Some(owner) = addrs.insert(addr, format!("upstream {name:?}")) {
                        self.problem(
                            upstream.listen.span(),
                            format!("upstream[{i}].listen"),
                            format!("{addr} is already the listen address of {owner}"),
                        );
                    }
                }
            }
        }
    }

    fn socket_addr(&mut self, value: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        match value.get_ref().parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.problem(
                    value.span(),
                    key,
                    format!(
                        "{:?} is not an IP address and port such as \"127.0.0.1:8081\"",
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// An absolute `http` or `https` URL without userinfo; plain `http` only to a loopback
    /// host unless `allow_plain_http`, as the secret or the token would cross the network in
    /// the clear.
    fn http_url(
        &mut self,
        value: &Spanned<String>,
        key: &str,
        allow_plain_http: bool,
    ) -> Option<Uri> {
        let text = value.get_ref();
        let authority = text.split_once("://").map_or("", |(_, rest)| {
            rest.split(['/', '?', '#']).next().unwrap_or("")
        });
        if authority.contains('@') {
            // Checked before anything quotes the URL: the userinfo is most likely a password.
            self.problem(
                value.span(),
                key,
                "must not hold a user name or password (user:pass@host): bearerd would print it; give credentials in [upstream.token]",
            );
            return None;
        }
        let uri = self.absolute_url(value, key)?;
        if uri.scheme_str() == Some("http") && !allow_plain_http && !is_loopback_host(uri.host()) {
            self.problem(
                value.span(),
                key,
                format!(
                    "{text:?} is plain http to a host that is not loopback: credentials and tokens would cross the network in the clear. Use https, or set allow_plain_http = true in this table"
                ),
            );
            return None;
        }
        Some(uri)
    }

    /// The networks of an `allow_from` list: at least one, each a CIDR or a single address.
    fn networks(&mut self, list: &Spanned<Vec<Spanned<String>>>, key: &str) -> Vec<ipnet::IpNet> {
        if list.get_ref().is_empty() {
            self.problem(
                list.span(),
                key,
                "is empty, so no one could connect: list the networks that may, such as \"10.0.0.0/8\"",
            );
        }
        list.get_ref()
            .iter()
            .filter_map(|item| {
                let text = item.get_ref().trim();
                let parsed = text.parse::<ipnet::IpNet>().ok().or_else(|| {
                    text.parse::<std::net::IpAddr>()
                        .ok()
                        .map(ipnet::IpNet::from)
                });
                if parsed.is_none() {
                    self.problem(
                        item.span(),
                        key,
                        format!(
                            "{text:?} is not a network such as \"10.0.0.0/8\", \"fd00::/8\" or an address"
                        ),
                    );
                }
                parsed
            })
            .collect()
    }

    fn absolute_url(&mut self, value: &Spanned<String>, key: &str) -> Option<Uri> {
        let text = value.get_ref();
        let uri: Uri = match text.parse() {
            Ok(uri) => uri,
            Err(_) => {
                self.problem(
                    value.span(),
                    key,
                    format!("{text:?} is not an absolute http or https URL"),
                );
                return None;
            }
        };
        // `http::Uri` accepts any digits as a port and then reports none; say so here.
        let port_text = uri
            .authority()
            .and_then(|a| a.as_str().rsplit_once(':'))
            .map(|(_, port)| port)
            .filter(|port| !port.contains(']'));
        if port_text.is_some_and(|port| port.parse::<u16>().is_err()) {
            self.problem(
                value.span(),
                key,
                format!("{text:?}: the port is not a number from 0 to 65535"),
            );
            return None;
        }
        match uri.scheme_str() {
            Some("http" | "https") if uri.authority().is_some() => Some(uri),
            Some("http" | "https") => {
                self.problem(value.span(), key, format!("{text:?} has no host"));
                None
            }
            Some(other) => {
                self.problem(
                    value.span(),
                    key,
                    format!("{text:?}: scheme {other:?} is not http or https"),
                );
                None
            }
            None => {
                self.problem(
                    value.span(),
                    key,
                    format!("{text:?} is not an absolute http or https URL"),
                );
                None
            }
        }
    }

    fn duration(
        &mut self,
        value: Option<&Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else {
            return default;
        };
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.problem(value.span(), key, "must be longer than zero");
                default
            }
            Ok(d) if d > MAX_DURATION => {
                self.problem(value.span(), key, "must be at most a year (\"366d\")");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.problem(
                    value.span(),
                    key,
                    format!(
                        "{:?} is not a duration such as \"10s\" or \"2m\": {e}",
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn problem(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_and_column(self.text, span.start);
        self.problems.push(Problem {
            line,
            column,
            key: key.into(),
            message: message.into(),
        });
    }
}

/// Form fields bearerd sets itself; `params` may not override them.
const RESERVED_FORM_FIELDS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "scope",
    "audience",
    "resource",
];

/// Whether `host` (from a URL) names this machine: `localhost`, a name under `.localhost`
/// (RFC 6761 §6.3), or a loopback address.
fn is_loopback_host(host: Option<&str>) -> bool {
    let Some(host) = host else {
        return false;
    };
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    name.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// A size such as `16MiB`, `512KiB`, `1GiB`, `4096B` or `4096`, in bytes.
fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: usize = number.parse().ok()?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(scale)
}

/// `upstream[0].token.url` out of serde's path, without the segments `Spanned` adds.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut key = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            Segment::Map { key: name } | Segment::Enum { variant: name } => {
                if name.starts_with("$__serde_spanned") {
                    continue;
                }
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(name);
            }
            Segment::Unknown => {}
        }
    }
    if key.is_empty() {
        "(top level)".into()
    } else {
        key
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_admin_listen_parses() {
        assert!(DEFAULT_ADMIN_LISTEN.parse::<SocketAddr>().is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB"), Some(16 << 20));
        assert_eq!(parse_size("512KiB"), Some(512 << 10));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("1 GiB"), Some(1 << 30));
        assert_eq!(parse_size("16MB"), None);
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("99999999999999999999GiB"), None);
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "127.0.0.1",
            "127.8.9.10",
            "[::1]",
            "localhost",
            "LOCALHOST.",
            "api.localhost",
        ] {
            assert!(is_loopback_host(Some(host)), "{host}");
        }
        for host in [
            "10.0.0.1",
            "[::]",
            "0.0.0.0",
            "localhost.example.com",
            "example.com",
        ] {
            assert!(!is_loopback_host(Some(host)), "{host}");
        }
    }

    #[test]
    fn line_and_column_count_from_one() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_and_column(text, 0), (1, 1));
        assert_eq!(line_and_column(text, 6), (2, 1));
        assert_eq!(line_and_column(text, text.find('=').unwrap()), (1, 3));
        assert_eq!(line_and_column(text, text.rfind('=').unwrap()), (2, 4));
        assert_eq!(line_and_column(text, 1000), (3, 1));
    }
}
