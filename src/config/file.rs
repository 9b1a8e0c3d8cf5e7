//! The config file as written: raw serde structs that mirror the TOML one to one.
//!
//! Every struct denies unknown keys, and every value the validator may complain about is
//! `Spanned`, so an error can name the line it stands on. Turning these into the runtime
//! types of [`crate::config`] is the validator's job, not serde's.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `[admin]`
    #[serde(default)]
    pub admin: Option<Spanned<Admin>>,
    /// `[log]`
    #[serde(default)]
    pub log: Option<Log>,
    /// `[server]`
    #[serde(default)]
    pub server: Option<Server>,
    /// `[[upstream]]`, one per local listener.
    #[serde(default)]
    pub upstream: Vec<Spanned<Upstream>>,
    /// `[[listener]]`, each with its routes.
    #[serde(default)]
    pub listener: Vec<Spanned<Listener>>,
    /// `[cache]`
    #[serde(default)]
    pub cache: Option<Spanned<Cache>>,
}

/// `[cache]`: where tokens are kept beyond the process.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    /// `"file"` or `"redis"`.
    pub backend: Spanned<CacheBackend>,
    /// file: the directory.
    pub dir: Option<Spanned<PathBuf>>,
    /// redis: `redis://` or `rediss://` URL.
    pub url: Option<Spanned<String>>,
    /// redis: file holding the password.
    pub password_file: Option<Spanned<PathBuf>>,
    /// redis: file holding the 32-byte encryption key, base64.
    pub key_file: Option<Spanned<PathBuf>>,
    /// redis: prefix of every key.
    pub key_prefix: Option<Spanned<String>>,
    /// redis: time allowed for each call.
    pub timeout: Option<Spanned<String>>,
}

/// `backend = "file" | "redis"`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    /// A file per token source in a directory.
    File,
    /// One Redis shared by a fleet.
    Redis,
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address of the admin listener (metrics, probes).
    pub listen: Option<Spanned<String>>,
    /// Connections the admin listener holds at once.
    pub max_connections: Option<Spanned<i64>>,
    /// The networks whose peers may connect; none: every peer.
    pub allow_from: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[server]`: limits on app connections and shutdown.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Time in-flight requests get to finish after SIGTERM.
    pub shutdown_grace: Option<Spanned<String>>,
    /// Time a client may take to send a request head.
    pub header_read_timeout: Option<Spanned<String>>,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Option<Spanned<String>>,
    /// Largest request head, in bytes.
    pub max_header_bytes: Option<Spanned<i64>>,
    /// Connections each listener holds at once.
    pub max_connections: Option<Spanned<i64>>,
    /// Time a request body may make no progress.
    pub body_idle_timeout: Option<Spanned<String>>,
    /// Total of request bodies kept for a 401 replay, such as "16MiB".
    pub replay_memory: Option<Spanned<String>>,
}

/// `[log]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// Level or filter directives, as `RUST_LOG` takes them.
    pub level: Option<Spanned<String>>,
    /// Line format.
    #[serde(default)]
    pub format: Option<LogFormat>,
    /// One line per proxied request.
    #[serde(default)]
    pub access: Option<bool>,
}

/// `format = "text" | "json"`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[[listener]]`: one local address serving a table of routes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Local address the app sends plain HTTP to.
    pub listen: Spanned<String>,
    /// `"reverse"` (the default) or `"forward"`.
    #[serde(default)]
    pub mode: Option<Spanned<Mode>>,
    /// Networks (CIDRs) whose peers may connect; required for a non-loopback `listen`.
    pub allow_from: Option<Spanned<Vec<Spanned<String>>>>,
    /// `[[listener.route]]`, in match order.
    #[serde(default)]
    pub route: Vec<Spanned<Upstream>>,
}

/// `mode = "reverse" | "forward"`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The app calls bearerd's address as if it were the API.
    Reverse,
    /// The app's `HTTP_PROXY` points at bearerd.
    Forward,
}

/// `[[upstream]]`, and `[[listener.route]]` (which takes `host`, `path_prefix` and
/// `strip_prefix`, and has its listener's `listen` and `allow_from`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Name used in logs, metrics and error bodies.
    pub name: Spanned<String>,
    /// Local address the app sends plain HTTP to (`[[upstream]]` only).
    pub listen: Option<Spanned<String>>,
    /// A route's host: exact, or `*.example.com` for one label.
    pub host: Option<Spanned<String>>,
    /// A route's path prefix, matched on segment boundaries.
    pub path_prefix: Option<Spanned<String>>,
    /// Remove `path_prefix` from the path sent upstream.
    pub strip_prefix: Option<Spanned<bool>>,
    /// Where requests go: scheme, host, optional port and base path.
    pub url: Spanned<String>,
    /// Time allowed to open the TCP connection to the upstream.
    pub connect_timeout: Option<Spanned<String>>,
    /// Time allowed from sending a request until the upstream's response headers arrive.
    pub response_header_timeout: Option<Spanned<String>>,
    /// Replay a request once with a new token when the upstream answers 401.
    #[serde(default)]
    pub retry_on_401: Option<bool>,
    /// Networks (CIDRs) whose peers may connect; required for a non-loopback `listen`.
    pub allow_from: Option<Spanned<Vec<Spanned<String>>>>,
    /// Allow a plain `http://` url to a host that is not loopback.
    pub allow_plain_http: Option<bool>,
    /// `[upstream.token]`
    pub token: Spanned<Token>,
    /// `[upstream.tls]`
    #[serde(default)]
    pub tls: Option<Spanned<Tls>>,
}

/// `[upstream.token]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// The token endpoint.
    pub url: Spanned<String>,
    /// The OAuth2 client identifier (optional with `client_assertion_file` only).
    pub client_id: Option<Spanned<String>>,
    /// Path of a file holding the client secret.
    pub client_secret_file: Option<Spanned<PathBuf>>,
    /// Name of an environment variable holding the client secret.
    pub client_secret_env: Option<Spanned<String>>,
    /// The client secret itself.
    pub client_secret: Option<Spanned<String>>,
    /// How the client authenticates to the token endpoint.
    #[serde(default)]
    pub auth: Option<Spanned<ClientAuth>>,
    /// `private_key_jwt`: the PEM private key that signs the assertion.
    pub private_key_file: Option<Spanned<PathBuf>>,
    /// `private_key_jwt`: the signing algorithm, when not the key's usual one.
    pub assertion_alg: Option<Spanned<String>>,
    /// `private_key_jwt`: the `kid` of the assertion's header.
    pub key_id: Option<Spanned<String>>,
    /// `private_key_jwt`: a PEM certificate of the key, for `x5t#S256`.
    pub certificate_file: Option<Spanned<PathBuf>>,
    /// Both JWT methods: the assertion's `aud`, when not the token URL.
    pub assertion_audience: Option<Spanned<String>>,
    /// Both JWT methods: how long an assertion is valid.
    pub assertion_lifetime: Option<Spanned<String>>,
    /// `client_assertion_file`: the file holding an assertion made by someone else.
    pub assertion_file: Option<Spanned<PathBuf>>,
    /// `tls_client_auth`: the PEM client certificate (chain).
    pub cert_file: Option<Spanned<PathBuf>>,
    /// `tls_client_auth`: the PEM private key of `cert_file`.
    pub key_file: Option<Spanned<PathBuf>>,
    /// RFC 9449: DPoP-bound tokens.
    pub dpop: Option<Spanned<bool>>,
    /// The DPoP key (PEM, PKCS#8), so that a restart keeps it.
    pub dpop_key_file: Option<Spanned<PathBuf>>,
    /// The algorithm of a DPoP key bearerd makes.
    pub dpop_alg: Option<Spanned<String>>,
    /// `scope` form field.
    pub scope: Option<Spanned<String>>,
    /// `audience` form field.
    pub audience: Option<Spanned<String>>,
    /// `resource` form field (RFC 8707).
    pub resource: Option<Spanned<String>>,
    /// Extra form fields.
    #[serde(default)]
    pub params: Option<Spanned<BTreeMap<String, String>>>,
    /// Time allowed for one whole token request.
    pub timeout: Option<Spanned<String>>,
    /// Lifetime assumed when the response says nothing of it.
    pub default_lifetime: Option<Spanned<String>>,
    /// Longest lifetime believed, whatever the response says.
    pub max_lifetime: Option<Spanned<String>>,
    /// Allow a plain `http://` token url to a host that is not loopback.
    pub allow_plain_http: Option<bool>,
    /// First wait after a failed token request.
    pub backoff_base: Option<Spanned<String>>,
    /// Longest wait between failed token requests.
    pub backoff_cap: Option<Spanned<String>>,
}

/// `auth = "basic" | "post" | ...`; serde names the allowed values in its error.
#[allow(clippy::enum_variant_names)] // the variants spell the values, `tls_client_auth` too
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_secret_basic`.
    Basic,
    /// `client_secret_post`.
    Post,
    /// A JWT assertion signed HS256 with the client secret.
    ClientSecretJwt,
    /// A JWT assertion signed with a private key.
    PrivateKeyJwt,
    /// A JWT assertion read from a file.
    ClientAssertionFile,
    /// A client certificate in the TLS handshake (RFC 8705).
    TlsClientAuth,
}

/// `[upstream.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Which built-in trust anchors to use.
    #[serde(default)]
    pub roots: Option<Roots>,
    /// PEM file of extra trust anchors.
    pub ca_file: Option<Spanned<PathBuf>>,
    /// PEM client certificate (chain) presented to the upstream.
    pub cert_file: Option<Spanned<PathBuf>>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<Spanned<PathBuf>>,
}

/// `roots = "webpki" | "native" | "none"`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Roots {
    /// Mozilla's root program, compiled in (webpki-roots).
    Webpki,
    /// The operating system's store (rustls-native-certs).
    Native,
    /// Only `ca_file`.
    None,
}
