//! Configuration: the validated runtime types, loaded from the TOML file.
//!
//! `file.rs` holds the file as written; [`Config::parse`] checks it as a whole and turns it
//! into these types, collecting every problem with the file, line and key it concerns, so
//! a user fixes the file in one pass rather than one error per run.
//!
//! These types are plain data: they depend on nothing in bearerd but [`crate::secret`], and
//! the parts that run them (proxy, token, admin) convert from them.

mod client_auth;
mod credentials;
mod egress;
mod file;
mod grant;
mod keys;
mod listener;
mod sources;
mod token;
mod validate;
mod values;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;

pub use credentials::{Assertion, ClientAuth, Dpop, Identity, JwsAlg, DEFAULT_ASSERTION_LIFETIME};
pub use egress::{proxy_env, without_credentials, EgressProxy, ProxyEnv};
pub use grant::{
    ActorToken, Grant, JwtBearer, JwtKey, OnBehalfOf, Presentation, RefreshToken, ScopeIn,
    ServiceAccountKey, SubjectFrom, TokenExchange, ACCESS_TOKEN_TYPE, DEFAULT_MAX_SUBJECTS,
    DEFAULT_SUBJECT_TOKEN_TYPE,
};
use sources::Sources;
pub use sources::CONF_D;
use validate::Validator;

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
    /// The `conf.d/*.toml` files beside it that were merged into it, in merge order.
    pub extra_files: Vec<PathBuf>,
    /// `[admin]`
    pub admin: Admin,
    /// `[log]`
    pub log: Log,
    /// `[server]`
    pub server: Server,
    /// Every route: each `[[upstream]]`, and each `[[listener.route]]`, in file order. Names
    /// are unique across all of them.
    pub upstreams: Vec<Upstream>,
    /// The local listeners: one per `[[upstream]]` (with that one route), and each
    /// `[[listener]]`.
    pub listeners: Vec<Listener>,
    /// `[cache]`; `None`: tokens live in the process only.
    pub cache: Option<Cache>,
    /// `[telemetry]`; `None`: no trace is recorded or exported.
    pub telemetry: Option<Telemetry>,
    /// `[egress]`; `None`: bearerd's own calls go out directly.
    pub egress: Option<Egress>,
}

/// `[egress]`: the HTTP proxy that token requests, upstream connections and the trace
/// exporter go through (the `[cache]` Redis never does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    /// Where the proxy comes from.
    pub proxy: EgressProxy,
    /// Host suffixes, addresses and networks reached directly, in `NO_PROXY`'s syntax.
    pub no_proxy: Vec<String>,
    /// File holding `user:password`, sent as `Proxy-Authorization: Basic`; read again for
    /// every tunnel, so that a rotated Secret is used.
    pub authorization_file: Option<PathBuf>,
}

/// `[telemetry]`: OpenTelemetry traces of proxied requests and token fetches, exported over
/// OTLP/HTTP (protobuf) in the background.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    /// Where spans are posted: `otlp_endpoint` with `/v1/traces` appended.
    pub traces_url: http::Uri,
    /// `service.name` of the resource every span belongs to.
    pub service_name: String,
    /// The share of requests without a parent that are traced; a parent's sampled flag is
    /// followed.
    pub sample_ratio: f64,
}

/// `[telemetry] service_name` when not given.
pub const DEFAULT_SERVICE_NAME: &str = "bearerd";
/// `[telemetry] sample_ratio` when not given: one request in twenty.
pub const DEFAULT_SAMPLE_RATIO: f64 = 0.05;

/// `[cache]`: where tokens are kept beyond the process, so that a restart, or a fleet of
/// replicas, needs no new token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cache {
    /// A file per token source in `dir` (an `emptyDir` survives a container restart).
    File {
        /// The directory: bearerd's own, created (0700) when missing.
        dir: PathBuf,
        /// 32 random bytes in base64: entries are sealed with them (AES-256-GCM), so that a
        /// file planted in `dir` is not taken. `None`: entries in clear.
        key_file: Option<PathBuf>,
    },
    /// One Redis shared by every replica, entries encrypted with the key of `key_file`.
    Redis {
        /// `redis://` or `rediss://` (TLS) URL, without a password.
        url: String,
        /// The password, read at start.
        password_file: Option<PathBuf>,
        /// 32 random bytes in base64.
        key_file: PathBuf,
        /// Prefix of every key bearerd writes.
        key_prefix: String,
        /// Time allowed for each Redis call.
        timeout: Duration,
    },
}

impl Cache {
    /// The backend's name, as metrics and logs say it.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::File { .. } => "file",
            Self::Redis { .. } => "redis",
        }
    }
}

/// `[cache] key_prefix` when not set.
pub const DEFAULT_CACHE_KEY_PREFIX: &str = "bearerd:";
/// `[cache] timeout` when not set: Redis answers in well under a millisecond on a healthy
/// network; a slower one must not hold a token request up.
pub const DEFAULT_CACHE_TIMEOUT: Duration = Duration::from_millis(250);

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
    /// See [`DEFAULT_ADMIN_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// The networks whose peers may connect (the kubelet's node, Prometheus); `None`: every
    /// peer. Others are closed on before a byte is read.
    pub allow_from: Option<Vec<ipnet::IpNet>>,
    /// The networks whose peers may read `/status`, besides loopback peers (which always may,
    /// as `kubectl port-forward` arrives from loopback). Empty by default.
    pub status_from: Vec<ipnet::IpNet>,
}

/// `[server]`: app connections and shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Server {
    /// See [`DEFAULT_SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
    /// See [`DEFAULT_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// See [`DEFAULT_MAX_HEADER_BYTES`].
    pub max_header_bytes: usize,
    /// See [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`DEFAULT_BODY_IDLE_TIMEOUT`].
    pub body_idle_timeout: Duration,
    /// See [`DEFAULT_REPLAY_MEMORY`].
    pub replay_memory: usize,
    /// See [`DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS`].
    pub http2_max_concurrent_streams: u32,
    /// See [`DEFAULT_UPGRADED_IDLE_TIMEOUT`].
    pub upgraded_idle_timeout: Duration,
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
    /// Audit events on the `bearerd::audit` target (token acquired, fetch failed, refused,
    /// rejected by an upstream), whatever `level` says. Default on.
    pub audit: bool,
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

/// `[server] http2_max_concurrent_streams` when not set: the streams an HTTP/2 app connection
/// may have open at once (RFC 9113 §5.1.2: at least 100 is recommended); more are refused
/// with `REFUSED_STREAM`, which a client may retry.
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// `[server] http2_max_concurrent_streams` at most: each open stream may hold an upstream
/// connection and a kept body.
pub const MAX_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 10_000;

/// `[server] upgraded_idle_timeout` when not set: how long an upgraded connection (a
/// WebSocket) may carry no byte in either direction before bearerd closes it.
pub const DEFAULT_UPGRADED_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// `response_body_idle_timeout` when not set: how long an upstream's response body may send
/// nothing once its headers have arrived. Long enough for server-sent events with sparse
/// keep-alives; `"0"` turns it off.
pub const DEFAULT_RESPONSE_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// `upgrade_protocols` when not set.
pub const DEFAULT_UPGRADE_PROTOCOLS: &[&str] = &["websocket"];

/// `[upstream.token] backoff_base` when not set: the first wait after a failed token request.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// `[upstream.token] backoff_cap` when not set: the longest wait between failed token requests.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(60);

/// `[log] level` when not set.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// A local listener and the routes it serves, in match order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// The local address.
    pub listen: SocketAddr,
    /// Reverse proxy (the app calls bearerd's address) or forward proxy (`HTTP_PROXY`).
    pub mode: Mode,
    /// See [`Upstream::allow_from`].
    pub allow_from: Option<Vec<ipnet::IpNet>>,
    /// The names of its routes ([`Config::upstreams`]), in match order.
    pub routes: Vec<String>,
    /// `[listener.intercept]` (forward listeners only): CONNECT tunnels to routed hosts are
    /// opened with TLS from a CA of bearerd's; `None`: CONNECT is refused.
    pub intercept: Option<Intercept>,
}

/// `[listener.intercept]`: TLS interception of CONNECT tunnels to the listener's routed hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intercept {
    /// The CA certificate (PEM) the app trusts.
    pub ca_cert_file: PathBuf,
    /// The CA's key (PEM, PKCS#8); written `0600` when bearerd creates it.
    pub ca_key_file: PathBuf,
    /// Written at start: the system roots and the CA, for apps whose CA setting replaces
    /// the system store (`SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`).
    pub ca_bundle_file: Option<PathBuf>,
    /// `(host, port)` targets tunnelled blind: no TLS termination, no token. Hosts lowercase.
    pub passthrough: Vec<(String, u16)>,
    /// How long a client may take to finish its TLS handshake inside a tunnel.
    pub handshake_timeout: Duration,
}

/// `[listener.intercept] handshake_timeout` when not given.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a listener reads which route a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Requests in origin form (`GET /path`), routed by `Host` and path.
    #[default]
    Reverse,
    /// Requests in absolute form (`GET http://api.example.com/path`), as an app whose
    /// `HTTP_PROXY` names bearerd sends them, routed by that host and path.
    Forward,
}

/// What requests a route takes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteMatch {
    /// The host, lowercase without a trailing dot: exact, or `*.example.com` for any one
    /// label before `example.com`; `None` for any host.
    pub host: Option<String>,
    /// The path prefix (`/v2`), matched on segment boundaries; `None` for any path.
    pub path_prefix: Option<String>,
    /// Whether `path_prefix` is removed from the path sent upstream.
    pub strip_prefix: bool,
}

/// One route: an `[[upstream]]` (a listener with one route of its own), or a
/// `[[listener.route]]`, and where its requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The configured name, used in logs, metrics and error bodies.
    pub name: String,
    /// The local address the app sends plain HTTP to (its listener's).
    pub listen: SocketAddr,
    /// Which requests of its listener it takes.
    pub route: RouteMatch,
    /// Scheme, authority and base path of the upstream (no query).
    pub url: Uri,
    /// See [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// See [`DEFAULT_RESPONSE_HEADER_TIMEOUT`].
    pub response_header_timeout: Duration,
    /// See [`DEFAULT_RESPONSE_BODY_IDLE_TIMEOUT`]; `None` (`"0"`): no limit.
    pub response_body_idle_timeout: Option<Duration>,
    /// The `Upgrade` protocols passed to the upstream, lowercase (default `["websocket"]`).
    pub upgrade_protocols: Vec<String>,
    /// When the upstream answers 401 to a token, fetch a new one and replay the request once
    /// (if its body was kept). Default on.
    pub retry_on_401: bool,
    /// The HTTP version spoken to the upstream.
    pub protocol: UpstreamProtocol,
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

/// `protocol`: which HTTP version bearerd speaks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// An `https://` upstream chooses HTTP/2 or HTTP/1.1 by ALPN; an `http://` one gets
    /// HTTP/1.1.
    #[default]
    Auto,
    /// HTTP/1.1 only (ALPN offers `http/1.1` alone).
    Http1,
    /// HTTP/2 with prior knowledge over plain TCP (RFC 9113 §3.3): an in-cluster gRPC server.
    H2c,
}

impl UpstreamProtocol {
    /// The value as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Http1 => "http1",
            Self::H2c => "h2c",
        }
    }
}

/// `[upstream.token]`. Upstreams with equal settings (and equal TLS settings) share one token
/// source, hence `Eq + Hash`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenSettings {
    /// The token endpoint.
    pub url: Uri,
    /// The OAuth2 `client_id`: always set but with `client_assertion_file`, whose assertion
    /// names the client itself, `auth = "none"` and a service-account file.
    pub client_id: Option<String>,
    /// The grant, with what it needs.
    pub grant: Grant,
    /// How the client authenticates, with the credentials that method needs.
    pub auth: ClientAuth,
    /// How the token goes upstream.
    pub presentation: Presentation,
    /// `scope` form field.
    pub scope: Option<String>,
    /// `audience` form field (Auth0 requires it).
    pub audience: Option<String>,
    /// `resource` form field (RFC 8707).
    pub resource: Option<String>,
    /// Extra form fields, sent as given.
    pub params: BTreeMap<String, String>,
    /// DPoP-bound tokens, when set.
    pub dpop: Option<Dpop>,
    /// See [`DEFAULT_TOKEN_TIMEOUT`].
    pub timeout: Duration,
    /// See [`DEFAULT_TOKEN_LIFETIME`].
    pub default_lifetime: Duration,
    /// See [`DEFAULT_MAX_TOKEN_LIFETIME`].
    pub max_lifetime: Duration,
    /// The token `url` may be plain `http://` to a host that is not loopback.
    pub allow_plain_http: bool,
    /// See [`DEFAULT_BACKOFF_BASE`].
    pub backoff_base: Duration,
    /// See [`DEFAULT_BACKOFF_CAP`].
    pub backoff_cap: Duration,
}

/// What unit tests start from, in one place.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::time::Duration;

    use super::{ClientAuth, TokenSettings};

    impl TokenSettings {
        /// A source authenticating with `auth` at `https://auth.example.com/oauth/token` as
        /// client `my app`, asking for nothing more, with a 1 s timeout; tests change the
        /// fields they are about with `TokenSettings { scope: .., ..for_tests(auth) }`.
        pub(crate) fn for_tests(auth: ClientAuth) -> Self {
            Self {
                url: "https://auth.example.com/oauth/token".parse().unwrap(),
                client_id: Some("my app".into()),
                grant: Default::default(),
                auth,
                presentation: Default::default(),
                scope: None,
                audience: None,
                resource: None,
                params: Default::default(),
                dpop: None,
                timeout: Duration::from_secs(1),
                default_lifetime: Duration::from_secs(300),
                max_lifetime: Duration::from_secs(86400),
                allow_plain_http: false,
                backoff_base: Duration::from_secs(1),
                backoff_cap: Duration::from_secs(60),
            }
        }
    }
}

impl TokenSettings {
    /// The grant's name as the file, the status page, audit events and spans say it.
    pub fn grant_name(&self) -> &'static str {
        self.grant.name()
    }

    /// On-behalf-of: the subject token comes from each app request
    /// (`subject_token_from`), and tokens are fetched per subject, on demand.
    pub fn on_behalf_of(&self) -> Option<&OnBehalfOf> {
        match &self.grant {
            Grant::TokenExchange(exchange) => exchange.on_behalf_of(),
            _ => None,
        }
    }

    /// The private-key files the token source reads: the assertion key, the client
    /// certificate's key, the DPoP key.
    pub fn key_files(&self) -> Vec<&Path> {
        let mut files = Vec::new();
        match &self.auth {
            ClientAuth::PrivateKeyJwt { key_file, .. } => files.push(key_file.as_path()),
            ClientAuth::TlsClientAuth { identity } => files.push(identity.key_file.as_path()),
            _ => {}
        }
        if let Grant::JwtBearer(jwt) = &self.grant {
            files.push(jwt.key.path());
        }
        if let Some(path) = self.dpop.as_ref().and_then(|d| d.key_file.as_ref()) {
            files.push(path.as_path());
        }
        files
    }
}

/// `[upstream.tls]`
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsSettings {
    /// The built-in trust anchors.
    pub roots: Roots,
    /// Extra trust anchors (PEM), added to `roots`.
    pub ca_file: Option<PathBuf>,
    /// The client certificate presented to the upstream (mTLS), not to the token endpoint.
    pub identity: Option<Identity>,
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
    #[error("{}", Problems { problems })]
    Invalid {
        /// The path given (a problem may be in one of its `conf.d` files: see its `file`).
        path: PathBuf,
        /// Every problem found, in file order.
        problems: Vec<Problem>,
    },
}

/// One problem in the config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file: the config file, or one of its `conf.d` files.
    pub file: PathBuf,
    /// The file's place in merge order (0: the config file), to list problems in order.
    pub(crate) file_index: usize,
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
                p.file.display(),
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
    /// Reads and validates the file at `path`, with every `*.toml` of the `conf.d/`
    /// directory beside it ([`CONF_D`]) merged in, by name: tables key by key, `[[upstream]]`
    /// and `[[listener]]` appended; a key set in two files is a problem naming both.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::validate(&Sources::read(path)?)
    }

    /// Validates `text` as if read from `path`, alone (no `conf.d`). Relative file paths in
    /// it are taken relative to the directory of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::parse_files(vec![(path.to_owned(), text.to_owned())])
    }

    /// Validates files as if read by [`Config::load`]: the config file first, then its
    /// `conf.d` files in merge order. Relative file paths in any of them are taken relative
    /// to the directory of the config file.
    pub fn parse_files(files: Vec<(PathBuf, String)>) -> Result<Self, ConfigError> {
        Self::validate(&Sources::new(files))
    }

    /// The merged files checked as a whole.
    fn validate(sources: &Sources) -> Result<Self, ConfigError> {
        let path = sources.main_path();
        let mut validator = Validator {
            sources,
            base_dir: path.parent().unwrap_or(Path::new("")),
            problems: Vec::new(),
            sealed_cache: false,
        };
        let config = validator.file(path);
        match config {
            Some(config) if validator.problems.is_empty() => Ok(config),
            _ => {
                validator
                    .problems
                    .sort_by_key(|p| (p.file_index, p.line, p.column));
                Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    problems: validator.problems,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_admin_listen_parses() {
        assert!(DEFAULT_ADMIN_LISTEN.parse::<SocketAddr>().is_ok());
    }
}
