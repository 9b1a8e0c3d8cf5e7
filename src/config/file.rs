//! The config file as written: raw serde structs that mirror the TOML one to one.
//!
//! Every struct denies unknown keys, and every value the validator may complain about is
//! `Spanned`, so an error can name the line it stands on. Turning these into the runtime
//! types of [`crate::config`] is the validator's job, not serde's.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
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
    #[serde(default, deserialize_with = "upstream_tables")]
    pub upstream: Vec<Spanned<Upstream>>,
    /// `[[listener]]`, each with its routes.
    #[serde(default, deserialize_with = "listener_tables")]
    pub listener: Vec<Spanned<Listener>>,
    /// `[cache]`
    #[serde(default)]
    pub cache: Option<Spanned<Cache>>,
    /// `[telemetry]`
    #[serde(default)]
    pub telemetry: Option<Spanned<Telemetry>>,
    /// `[egress]`
    #[serde(default)]
    pub egress: Option<Spanned<Egress>>,
}

/// `[egress]`: the HTTP proxy bearerd's own calls go through.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Egress {
    /// `http://host:port` of the proxy.
    pub proxy: Option<Spanned<String>>,
    /// Hosts (suffixes), addresses and networks reached directly.
    pub no_proxy: Option<Spanned<Vec<Spanned<String>>>>,
    /// File holding `user:password`, sent as Basic.
    pub proxy_authorization_file: Option<Spanned<PathBuf>>,
    /// Take the proxy from `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY`.
    pub use_env: Option<Spanned<bool>>,
}

/// `[telemetry]`: OpenTelemetry traces exported over OTLP/HTTP.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Telemetry {
    /// The collector's OTLP/HTTP base URL; `/v1/traces` is appended.
    pub otlp_endpoint: Spanned<String>,
    /// `service.name` of every span.
    pub service_name: Option<Spanned<String>>,
    /// The share of requests without a sampled parent that are traced.
    pub sample_ratio: Option<Spanned<f64>>,
}

/// `[cache]`: where tokens are kept beyond the process.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Cache {
    /// `"file"` or `"redis"`.
    pub backend: Spanned<CacheBackend>,
    /// file: the directory.
    pub dir: Option<Spanned<PathBuf>>,
    /// redis: `redis://` or `rediss://` URL.
    pub url: Option<Spanned<String>>,
    /// redis: file holding the password.
    pub password_file: Option<Spanned<PathBuf>>,
    /// file (optional) and redis: file holding the 32-byte encryption key, base64.
    pub key_file: Option<Spanned<PathBuf>>,
    /// redis: prefix of every key.
    pub key_prefix: Option<Spanned<String>>,
    /// redis: time allowed for each call.
    pub timeout: Option<Spanned<DurationText>>,
}

/// `backend = "file" | "redis"`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum CacheBackend {
    /// A file per token source in a directory.
    File,
    /// One Redis shared by a fleet.
    Redis,
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Admin {
    /// Address of the admin listener (metrics, probes).
    pub listen: Option<Spanned<String>>,
    /// Connections the admin listener holds at once.
    pub max_connections: Option<Spanned<i64>>,
    /// The networks whose peers may connect; none: every peer.
    pub allow_from: Option<Spanned<Vec<Spanned<String>>>>,
    /// The networks, besides loopback, whose peers may read `/status`.
    pub status_from: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[server]`: limits on app connections and shutdown.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Server {
    /// Time in-flight requests get to finish after SIGTERM.
    pub shutdown_grace: Option<Spanned<DurationText>>,
    /// Time a client may take to send a request head.
    pub header_read_timeout: Option<Spanned<DurationText>>,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Option<Spanned<DurationText>>,
    /// Largest request head, in bytes.
    pub max_header_bytes: Option<Spanned<i64>>,
    /// Connections each listener holds at once.
    pub max_connections: Option<Spanned<i64>>,
    /// Time a request body may make no progress.
    pub body_idle_timeout: Option<Spanned<DurationText>>,
    /// Total of request bodies kept for a 401 replay, such as "16MiB".
    pub replay_memory: Option<Spanned<SizeText>>,
    /// Streams an HTTP/2 app connection may have open at once.
    pub http2_max_concurrent_streams: Option<Spanned<i64>>,
    /// Time an upgraded connection (WebSocket) may carry no byte either way.
    pub upgraded_idle_timeout: Option<Spanned<DurationText>>,
}

/// `[log]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Log {
    /// Level or filter directives, as `RUST_LOG` takes them.
    pub level: Option<Spanned<String>>,
    /// Line format.
    #[serde(default)]
    pub format: Option<LogFormat>,
    /// One line per proxied request.
    #[serde(default)]
    pub access: Option<bool>,
    /// Audit events (target `bearerd::audit`) whatever the level.
    #[serde(default)]
    pub audit: Option<bool>,
}

/// `format = "text" | "json"`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `protocol = "auto" | "http1" | "h2c"`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Protocol {
    /// HTTP/2 when an https upstream chooses it by ALPN, else HTTP/1.1.
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 with prior knowledge over plain text.
    H2c,
}

/// `[[listener]]`: one local address serving a table of routes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Listener {
    /// Local address the app sends plain HTTP to.
    pub listen: Spanned<String>,
    /// `"reverse"` (the default) or `"forward"`.
    #[serde(default)]
    pub mode: Option<Spanned<Mode>>,
    /// Networks (CIDRs) whose peers may connect; required for a non-loopback `listen`.
    pub allow_from: Option<Spanned<Vec<Spanned<String>>>>,
    /// `[[listener.route]]`, in match order.
    #[serde(default, deserialize_with = "route_tables")]
    pub route: Vec<Spanned<Upstream>>,
    /// `[listener.intercept]`: TLS interception of CONNECT tunnels to routed hosts.
    pub intercept: Option<Spanned<Intercept>>,
}

/// `[listener.intercept]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Intercept {
    /// The CA certificate (PEM) the app trusts; created with the key when neither exists.
    pub ca_cert_file: Spanned<PathBuf>,
    /// The CA's private key (PEM, PKCS#8).
    pub ca_key_file: Spanned<PathBuf>,
    /// Where to write the system roots plus the CA, for apps whose CA setting replaces the
    /// system store.
    pub ca_bundle_file: Option<Spanned<PathBuf>>,
    /// `host:port` targets tunnelled blind (no TLS termination, no token).
    pub passthrough: Option<Vec<Spanned<String>>>,
    /// How long a client may take to finish its TLS handshake inside a tunnel.
    pub handshake_timeout: Option<Spanned<DurationText>>,
}

/// `mode = "reverse" | "forward"`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Mode {
    /// The app calls bearerd's address as if it were the API.
    Reverse,
    /// The app's `HTTP_PROXY` points at bearerd.
    Forward,
}

/// `[[upstream]]`, and `[[listener.route]]` (which takes `host`, `path_prefix` and
/// `strip_prefix`, and has its listener's `listen` and `allow_from`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Upstream {
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
    pub connect_timeout: Option<Spanned<DurationText>>,
    /// Time allowed from sending a request until the upstream's response headers arrive.
    pub response_header_timeout: Option<Spanned<DurationText>>,
    /// Time a response body may make no progress; "0" for no limit.
    pub response_body_idle_timeout: Option<Spanned<DurationText>>,
    /// Upgrade protocols passed through (`Upgrade: websocket`).
    pub upgrade_protocols: Option<Spanned<Vec<Spanned<String>>>>,
    /// Replay a request once with a new token when the upstream answers 401.
    #[serde(default)]
    pub retry_on_401: Option<bool>,
    /// The HTTP version spoken to the upstream: "auto", "http1" or "h2c".
    #[serde(default)]
    pub protocol: Option<Spanned<Protocol>>,
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
pub(super) struct Token {
    /// The token endpoint (optional with `service_account_file`, which names it).
    pub url: Option<Spanned<String>>,
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
    pub assertion_lifetime: Option<Spanned<DurationText>>,
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
    pub timeout: Option<Spanned<DurationText>>,
    /// Lifetime assumed when the response says nothing of it.
    pub default_lifetime: Option<Spanned<DurationText>>,
    /// Longest lifetime believed, whatever the response says.
    pub max_lifetime: Option<Spanned<DurationText>>,
    /// Allow a plain `http://` token url to a host that is not loopback.
    pub allow_plain_http: Option<bool>,
    /// First wait after a failed token request.
    pub backoff_base: Option<Spanned<DurationText>>,
    /// Longest wait between failed token requests.
    pub backoff_cap: Option<Spanned<DurationText>>,
    /// Which grant (RFC 6749 §4) obtains the tokens.
    pub grant: Option<Spanned<Grant>>,
    /// `grant = "jwt_bearer"`: the assertion bearerd signs (RFC 7523 §2.1).
    pub jwt_bearer: Option<Spanned<JwtBearer>>,
    /// `grant = "token_exchange"`: the file holding the subject token.
    pub subject_token_file: Option<Spanned<PathBuf>>,
    /// `grant = "token_exchange"`: on-behalf-of, `header:<Name>`, the request header that
    /// carries each request's subject token.
    pub subject_token_from: Option<Spanned<String>>,
    /// `grant = "token_exchange"` with `subject_token_from`: how many subjects' tokens are kept.
    pub max_subjects: Option<Spanned<usize>>,
    /// `grant = "token_exchange"`: the subject token's type.
    pub subject_token_type: Option<Spanned<String>>,
    /// `grant = "token_exchange"`: the file holding the actor token.
    pub actor_token_file: Option<Spanned<PathBuf>>,
    /// `grant = "token_exchange"`: the actor token's type.
    pub actor_token_type: Option<Spanned<String>>,
    /// `grant = "token_exchange"`: the type of token asked for.
    pub requested_token_type: Option<Spanned<String>>,
    /// `grant = "refresh_token"`: the file holding the first refresh token.
    pub refresh_token_file: Option<Spanned<PathBuf>>,
    /// The header the token goes upstream in.
    pub header: Option<Spanned<String>>,
    /// What precedes the token in that header.
    pub prefix: Option<Spanned<String>>,
}

/// `grant = "client_credentials" | ...`; serde names the allowed values in its error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Grant {
    /// RFC 6749 §4.4.
    ClientCredentials,
    /// RFC 7523 §2.1.
    JwtBearer,
    /// RFC 8693.
    TokenExchange,
    /// RFC 6749 §6.
    RefreshToken,
}

/// `[upstream.token.jwt_bearer]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JwtBearer {
    /// The PEM private key that signs the assertion.
    pub private_key_file: Option<Spanned<PathBuf>>,
    /// A Google service-account JSON key, instead of the key and the names.
    pub service_account_file: Option<Spanned<PathBuf>>,
    /// `iss`.
    pub issuer: Option<Spanned<String>>,
    /// `sub`.
    pub subject: Option<Spanned<String>>,
    /// `aud`.
    pub audience: Option<Spanned<String>>,
    /// The header's `kid`.
    pub key_id: Option<Spanned<String>>,
    /// The signing algorithm, when not the key's usual one.
    pub alg: Option<Spanned<String>>,
    /// From `iat` to `exp`.
    pub lifetime: Option<Spanned<DurationText>>,
    /// Where `scope` goes: the form, or a claim of the assertion.
    pub scope_in: Option<Spanned<ScopeIn>>,
}

/// `scope_in = "form" | "claim"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ScopeIn {
    /// The `scope` form field.
    Form,
    /// A `scope` claim of the assertion (Google).
    Claim,
}

/// `auth = "basic" | "post" | ...`; serde names the allowed values in its error.
#[allow(clippy::enum_variant_names)] // the variants spell the values, `tls_client_auth` too
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ClientAuth {
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
    /// No client authentication (a public client, or a grant that authenticates itself).
    None,
}

/// `[upstream.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Tls {
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
pub(super) enum Roots {
    /// Mozilla's root program, compiled in (webpki-roots).
    Webpki,
    /// The operating system's store (rustls-native-certs).
    Native,
    /// Only `ca_file`.
    None,
}

/// A duration as written, such as `"10s"`; the validator parses it. A number is refused here
/// with the unit it lacks, rather than serde's bare "expected a string".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DurationText(pub String);

/// A size as written, such as `"16MiB"`; the validator parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SizeText(pub String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_str(TextWithUnit {
                what: "a duration",
                examples: "\"10s\", \"500ms\" or \"1m\"",
                unit: ("s", "seconds"),
            })
            .map(Self)
    }
}

impl<'de> Deserialize<'de> for SizeText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_str(TextWithUnit {
                what: "a size",
                examples: "\"16MiB\", \"512KiB\" or \"4096B\"",
                unit: ("B", "bytes"),
            })
            .map(Self)
    }
}

/// Reads a string that carries a unit; says what to write when given a bare number.
struct TextWithUnit {
    /// `a duration`
    what: &'static str,
    /// Values to show, quoted as TOML strings.
    examples: &'static str,
    /// The unit a bare whole number most likely meant, and its name.
    unit: (&'static str, &'static str),
}

impl TextWithUnit {
    fn bare_number<E: de::Error>(&self, number: impl fmt::Display, whole: bool) -> E {
        let (what, examples) = (self.what, self.examples);
        let hint = if whole {
            format!(
                " (\"{number}{}\" for {number} {})",
                self.unit.0, self.unit.1
            )
        } else {
            String::new()
        };
        E::custom(format_args!(
            "{number} has no unit: {what} is written as a string such as {examples}{hint}"
        ))
    }
}

impl Visitor<'_> for TextWithUnit {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} such as {}", self.what, self.examples)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<String, E> {
        Ok(text.to_owned())
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<String, E> {
        Ok(text)
    }

    fn visit_i64<E: de::Error>(self, number: i64) -> Result<String, E> {
        Err(self.bare_number(number, number >= 0))
    }

    fn visit_u64<E: de::Error>(self, number: u64) -> Result<String, E> {
        Err(self.bare_number(number, true))
    }

    fn visit_f64<E: de::Error>(self, number: f64) -> Result<String, E> {
        Err(self.bare_number(number, false))
    }
}

/// `[[upstream]]`, refusing `[upstream]`.
fn upstream_tables<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Spanned<Upstream>>, D::Error> {
    d.deserialize_seq(Tables::new(
        "upstream",
        "[[upstream]]",
        "[upstream]",
        "at the head of each upstream",
    ))
}

/// `[[listener]]`, refusing `[listener]`.
fn listener_tables<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Spanned<Listener>>, D::Error> {
    d.deserialize_seq(Tables::new(
        "listener",
        "[[listener]]",
        "[listener]",
        "at the head of each listener",
    ))
}

/// `[[listener.route]]`, refusing `[listener.route]`.
fn route_tables<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Spanned<Upstream>>, D::Error> {
    d.deserialize_seq(Tables::new(
        "listener.route",
        "[[listener.route]]",
        "[listener.route]",
        "at the head of each route, below its [[listener]]",
    ))
}

/// Reads an array of tables; a single table (`[upstream]` for `[[upstream]]`, the most
/// common slip) is refused with the header to write instead.
struct Tables<T> {
    name: &'static str,
    header: &'static str,
    wrong: &'static str,
    place: &'static str,
    items: PhantomData<T>,
}

impl<T> Tables<T> {
    fn new(
        name: &'static str,
        header: &'static str,
        wrong: &'static str,
        place: &'static str,
    ) -> Self {
        Self {
            name,
            header,
            wrong,
            place,
            items: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Tables<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an array of tables, each headed {}", self.header)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(items)
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<Vec<T>, A::Error> {
        Err(de::Error::custom(format_args!(
            "`{}` is an array of tables: write {} (two brackets) {}, not {}",
            self.name, self.header, self.place, self.wrong
        )))
    }
}
