//! `[upstream.token] grant` and the keys each grant needs ([`Grant`]), and how the token is
//! presented upstream ([`Presentation`]).
//!
//! One enum for the config and the fetch: the validator builds it, refusing a key the chosen
//! grant would ignore and a combination the RFCs do not allow, with the reason; the token
//! fetch builds the form from it, and client authentication goes on top unchanged.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use serde::Deserialize;
use toml::Spanned;

use super::client_auth::jws_alg;
use super::credentials::{ClientAuth, JwsAlg};
use super::file;
use super::validate::Validator;
use super::values::{duration, is_loopback_host};
use crate::files::{self, Content, FileError};
use crate::secret::Secret;

/// The grant that obtains a source's tokens (RFC 6749 §4), with what it needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Grant {
    /// `client_credentials` (RFC 6749 §4.4): the client's own credentials.
    #[default]
    ClientCredentials,
    /// `jwt_bearer` (RFC 7523 §2.1): an assertion bearerd signs.
    JwtBearer(JwtBearer),
    /// `token_exchange` (RFC 8693): a subject token traded for another.
    TokenExchange(TokenExchange),
    /// `refresh_token` (RFC 6749 §6): a refresh token, rotated by the server at each use.
    RefreshToken(RefreshToken),
}

impl Grant {
    /// The grant's name, as `grant` is written in the file, audit events and spans.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ClientCredentials => "client_credentials",
            Self::JwtBearer(_) => "jwt_bearer",
            Self::TokenExchange(_) => "token_exchange",
            Self::RefreshToken(_) => "refresh_token",
        }
    }

    /// The `grant_type` form field.
    pub fn grant_type(&self) -> &'static str {
        match self {
            Self::ClientCredentials => "client_credentials",
            Self::JwtBearer(_) => "urn:ietf:params:oauth:grant-type:jwt-bearer",
            Self::TokenExchange(_) => "urn:ietf:params:oauth:grant-type:token-exchange",
            Self::RefreshToken(_) => "refresh_token",
        }
    }
}

/// `[upstream.token.jwt_bearer]`: the assertion of RFC 7523 §3.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JwtBearer {
    /// The key that signs it.
    pub key: JwtKey,
    /// `iss`.
    pub issuer: String,
    /// `sub`; `None`: none (a Google service account acting as itself).
    pub subject: Option<String>,
    /// `aud`; `None` for the token URL.
    pub audience: Option<String>,
    /// The header's `kid`.
    pub key_id: Option<String>,
    /// From `iat` to `exp`.
    pub lifetime: Duration,
    /// Where `scope` goes.
    pub scope_in: ScopeIn,
}

/// The key of a JWT bearer assertion.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JwtKey {
    /// `private_key_file`: a PEM key, read at each fetch.
    Pem {
        /// The file.
        path: PathBuf,
        /// The algorithm, when not the key's usual one.
        alg: Option<JwsAlg>,
    },
    /// `service_account_file`: a Google JSON key, read at each fetch; RS256.
    ServiceAccount {
        /// The file.
        path: PathBuf,
    },
}

impl JwtKey {
    /// The file the key is read from.
    pub fn path(&self) -> &Path {
        match self {
            Self::Pem { path, .. } | Self::ServiceAccount { path } => path,
        }
    }
}

/// `scope_in`: where a JWT bearer request's `scope` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeIn {
    /// The `scope` form field (RFC 7523 §2.1).
    Form,
    /// A `scope` claim of the assertion, as Google wants it.
    Claim,
}

/// `grant = "token_exchange"` (RFC 8693 §2.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenExchange {
    /// Where the subject token comes from: a file, or each app request (on-behalf-of).
    pub subject: SubjectFrom,
    /// `subject_token_type`.
    pub subject_token_type: String,
    /// `actor_token_file` and its type.
    pub actor: Option<ActorToken>,
    /// `requested_token_type`.
    pub requested_token_type: Option<String>,
}

/// Where a token exchange's subject token comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SubjectFrom {
    /// `subject_token_file`: one subject for the source, the file re-read when it changes.
    File(PathBuf),
    /// `subject_token_from = "header:<Name>"`: on-behalf-of, the subject of each app request.
    Header(OnBehalfOf),
}

/// `subject_token_from = "header:<Name>"` and `max_subjects`: tokens exchanged for the
/// subject token each app request carries, cached per subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OnBehalfOf {
    /// The request header that carries the subject token; it never goes upstream.
    pub header: HeaderName,
    /// How many subjects' tokens are kept at most (the least recently used goes first).
    pub max_subjects: usize,
}

impl OnBehalfOf {
    /// Whether the header is `Authorization`, whose `Bearer ` scheme is not the subject's.
    pub fn is_authorization(&self) -> bool {
        self.header == http::header::AUTHORIZATION
    }
}

/// `max_subjects` when not set.
pub const DEFAULT_MAX_SUBJECTS: usize = 1000;

impl TokenExchange {
    /// The on-behalf-of settings, when the subject comes from each request.
    pub fn on_behalf_of(&self) -> Option<&OnBehalfOf> {
        match &self.subject {
            SubjectFrom::Header(on_behalf_of) => Some(on_behalf_of),
            SubjectFrom::File(_) => None,
        }
    }

    /// Whether the token asked for is an access token (or the server's choice, which RFC 8693
    /// §2.1 makes one usually); `token_type = "N_A"` is accepted only when it is not.
    pub fn wants_access_token(&self) -> bool {
        self.requested_token_type
            .as_deref()
            .map_or(true, |t| t == ACCESS_TOKEN_TYPE)
    }
}

/// An actor token and its type (RFC 8693 §2.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActorToken {
    /// The file, re-read when it changes.
    pub file: PathBuf,
    /// `actor_token_type`.
    pub token_type: String,
}

/// `grant = "refresh_token"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RefreshToken {
    /// `refresh_token_file`: the first refresh token of the chain.
    pub file: PathBuf,
}

/// `subject_token_type` when not set.
pub const DEFAULT_SUBJECT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// The token type of an access token (RFC 8693 §3).
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// `[upstream.token.jwt_bearer] lifetime` when not set, as for client assertions.
pub(super) const DEFAULT_JWT_BEARER_LIFETIME: Duration = Duration::from_secs(60);

/// `header` and `prefix`: how the token goes upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Presentation {
    /// The header; `Authorization` by default.
    pub header: HeaderName,
    /// What precedes the token and a space; empty: the token alone.
    pub prefix: String,
}

impl Default for Presentation {
    fn default() -> Self {
        Self {
            header: http::header::AUTHORIZATION,
            prefix: "Bearer".into(),
        }
    }
}

impl Presentation {
    /// Whether this is `Authorization: Bearer`, the value a token is built with.
    pub fn is_default(&self) -> bool {
        self.header == http::header::AUTHORIZATION && self.prefix == "Bearer"
    }
}

/// A Google service-account JSON key: the fields bearerd uses.
pub struct ServiceAccountKey {
    /// `client_email`: the assertion's `iss`.
    pub client_email: String,
    /// `private_key`: PEM, PKCS#8.
    pub private_key: Secret,
    /// `private_key_id`: the header's `kid`.
    pub private_key_id: Option<String>,
    /// `token_uri`: the token endpoint and the assertion's `aud`.
    pub token_uri: String,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("private_key", &self.private_key)
            .field("private_key_id", &self.private_key_id)
            .field("token_uri", &self.token_uri)
            .finish()
    }
}

/// The file as serde reads it; the key goes into a [`Secret`] at once.
#[derive(Deserialize)]
struct RawServiceAccount {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: String,
    private_key: String,
    private_key_id: Option<String>,
    token_uri: String,
}

impl ServiceAccountKey {
    /// The key in `contents`, read from `path`. The message never quotes the file: it holds
    /// the private key.
    pub fn parse(path: &Path, contents: &[u8]) -> Result<Self, String> {
        let raw: RawServiceAccount = serde_json::from_slice(contents).map_err(|e| {
            format!(
                "{} is not a service-account JSON key with client_email, private_key and token_uri ({} at line {} column {})",
                path.display(),
                match e.classify() {
                    serde_json::error::Category::Data => "a field is missing or of the wrong type",
                    _ => "not valid JSON",
                },
                e.line(),
                e.column()
            )
        })?;
        let private_key = Secret::new(raw.private_key);
        if raw.kind.as_deref().is_some_and(|k| k != "service_account") {
            return Err(format!(
                "{}: its type is not \"service_account\" (an external_account file is a workload identity configuration: use grant = \"token_exchange\")",
                path.display()
            ));
        }
        Ok(Self {
            client_email: raw.client_email,
            private_key,
            private_key_id: raw.private_key_id,
            token_uri: raw.token_uri,
        })
    }

    /// Reads and parses the file now, on the calling thread (the config, `--check`).
    pub fn read(path: &Path) -> Result<Self, String> {
        let contents = files::read_sync(path, Content::ServiceAccount)
            .map_err(|e: FileError| e.to_string())?;
        Self::parse(path, &contents)
    }
}

/// What a service-account file gives the rest of `[upstream.token]`.
pub(super) struct ServiceAccountInfo {
    /// `token_uri`.
    pub(super) token_uri: Uri,
}

/// Keys that belong to one grant only, and where they stand.
fn grant_keys(raw: &file::Token) -> Vec<(&'static str, file::Grant, Range<usize>)> {
    use file::Grant::*;
    fn at<T>(value: &Option<Spanned<T>>) -> Option<Range<usize>> {
        value.as_ref().map(Spanned::span)
    }
    [
        ("jwt_bearer", JwtBearer, at(&raw.jwt_bearer)),
        (
            "subject_token_file",
            TokenExchange,
            at(&raw.subject_token_file),
        ),
        (
            "subject_token_from",
            TokenExchange,
            at(&raw.subject_token_from),
        ),
        ("max_subjects", TokenExchange, at(&raw.max_subjects)),
        (
            "subject_token_type",
            TokenExchange,
            at(&raw.subject_token_type),
        ),
        ("actor_token_file", TokenExchange, at(&raw.actor_token_file)),
        ("actor_token_type", TokenExchange, at(&raw.actor_token_type)),
        (
            "requested_token_type",
            TokenExchange,
            at(&raw.requested_token_type),
        ),
        (
            "refresh_token_file",
            RefreshToken,
            at(&raw.refresh_token_file),
        ),
    ]
    .into_iter()
    .filter_map(|(name, grant, span)| span.map(|span| (name, grant, span)))
    .collect()
}

fn grant_name(grant: file::Grant) -> &'static str {
    match grant {
        file::Grant::ClientCredentials => "client_credentials",
        file::Grant::JwtBearer => "jwt_bearer",
        file::Grant::TokenExchange => "token_exchange",
        file::Grant::RefreshToken => "refresh_token",
    }
}

/// `[upstream.token.jwt_bearer] service_account_file`, read now: it names the token URL,
/// which the rest of the table needs. `Err(())`: it is written but unusable (a problem is
/// recorded).
pub(super) fn service_account(
    v: &mut Validator<'_>,
    key: &str,
    raw: &file::Token,
) -> Result<Option<ServiceAccountInfo>, ()> {
    let Some(table) = &raw.jwt_bearer else {
        return Ok(None);
    };
    let Some(path) = &table.get_ref().service_account_file else {
        return Ok(None);
    };
    let full = v.base_dir.join(path.get_ref());
    let name = format!("{key}.jwt_bearer.service_account_file");
    let sa = ServiceAccountKey::read(&full).map_err(|e| v.problem(path.span(), &name, e))?;
    let token_uri = match sa.token_uri.parse::<Uri>() {
        Ok(uri)
            if uri.scheme_str() == Some("https")
                || (uri.scheme_str() == Some("http") && is_loopback_host(uri.host())) =>
        {
            uri
        }
        _ => {
            v.problem(
                path.span(),
                name,
                format!(
                    "its token_uri {:?} is not an https URL",
                    sa.token_uri.chars().take(200).collect::<String>()
                ),
            );
            return Err(());
        }
    };
    Ok(Some(ServiceAccountInfo { token_uri }))
}

/// `grant` and the keys of the chosen grant; a key of another grant is a problem.
pub(super) fn grant(
    v: &mut Validator<'_>,
    key: &str,
    spanned: &Spanned<file::Token>,
    auth: Option<&ClientAuth>,
    client_id: Option<&str>,
) -> Option<Grant> {
    let raw = spanned.get_ref();
    let chosen = raw
        .grant
        .as_ref()
        .map_or(file::Grant::ClientCredentials, |g| *g.get_ref());
    let grant_span = raw.grant.as_ref().map_or(spanned.span(), Spanned::span);
    let mut stray = false;
    for (name, owner, span) in grant_keys(raw) {
        if owner != chosen {
            v.problem(
                span,
                format!("{key}.{name}"),
                format!(
                    "is used by grant = {:?} only, and this table's grant is {:?}",
                    grant_name(owner),
                    grant_name(chosen)
                ),
            );
            stray = true;
        }
    }
    let path = |v: &mut Validator<'_>, value: &Option<Spanned<PathBuf>>, name: &str| match value {
        Some(p) => Some(v.base_dir.join(p.get_ref())),
        None => {
            v.problem(
                spanned.span(),
                format!("{key}.{name}"),
                format!("missing: grant = {:?} needs {name}", grant_name(chosen)),
            );
            None
        }
    };
    let text = |s: &Option<Spanned<String>>| s.as_ref().map(|s| s.get_ref().clone());
    let grant = match chosen {
        file::Grant::ClientCredentials => {
            if matches!(auth, Some(ClientAuth::None)) {
                // RFC 6749 §4.4: the grant is the client's credentials.
                v.problem(
                    raw.auth.as_ref().map_or(grant_span, Spanned::span),
                    format!("{key}.auth"),
                    "auth = \"none\" with grant = \"client_credentials\": that grant is the client's own credentials (RFC 6749 §4.4), so the client must authenticate; choose another auth, or a grant that carries its own proof (jwt_bearer, token_exchange)",
                );
                return None;
            }
            Grant::ClientCredentials
        }
        file::Grant::JwtBearer => Grant::JwtBearer(jwt_bearer(v, key, spanned, client_id)?),
        file::Grant::TokenExchange => {
            let subject = subject_from(v, key, spanned);
            let actor = match (&raw.actor_token_file, &raw.actor_token_type) {
                (Some(file), token_type) => Some(ActorToken {
                    file: v.base_dir.join(file.get_ref()),
                    token_type: text(token_type)
                        .unwrap_or_else(|| DEFAULT_SUBJECT_TOKEN_TYPE.to_owned()),
                }),
                (None, Some(token_type)) => {
                    v.problem(
                        token_type.span(),
                        format!("{key}.actor_token_type"),
                        "is set but actor_token_file is not",
                    );
                    return None;
                }
                (None, None) => None,
            };
            Grant::TokenExchange(TokenExchange {
                subject: subject?,
                subject_token_type: text(&raw.subject_token_type)
                    .unwrap_or_else(|| DEFAULT_SUBJECT_TOKEN_TYPE.to_owned()),
                actor,
                requested_token_type: text(&raw.requested_token_type),
            })
        }
        file::Grant::RefreshToken => {
            let file = path(v, &raw.refresh_token_file, "refresh_token_file");
            let mut kept = true;
            if !v.sealed_cache {
                v.problem(
                    grant_span,
                    format!("{key}.grant"),
                    "grant = \"refresh_token\" needs a [cache] with key_file: the server rotates the refresh token at each use, so one kept only in memory is lost at the next restart (and a person must authorise again), and one kept in clear is a long-lived credential on disk",
                );
                kept = false;
            }
            // The cache names a chain by the source's settings and its DPoP key's thumbprint
            // (a token bound to one key is useless with another): a key made at each start
            // names a new, empty chain, and the file's spent refresh token would be sent.
            if let Some(dpop) = raw.dpop.as_ref().filter(|d| *d.get_ref()) {
                if raw.dpop_key_file.is_none() {
                    v.problem(
                        dpop.span(),
                        format!("{key}.dpop_key_file"),
                        "missing: grant = \"refresh_token\" with dpop needs dpop_key_file: the rotated refresh token is stored under the DPoP key, and a key made at each start would lose the chain at the next restart",
                    );
                    kept = false;
                }
            }
            if !kept {
                return None;
            }
            Grant::RefreshToken(RefreshToken { file: file? })
        }
    };
    (!stray).then_some(grant)
}

/// `subject_token_file`, or `subject_token_from` with `max_subjects`: one of the two.
fn subject_from(
    v: &mut Validator<'_>,
    key: &str,
    spanned: &Spanned<file::Token>,
) -> Option<SubjectFrom> {
    let raw = spanned.get_ref();
    match (&raw.subject_token_file, &raw.subject_token_from) {
        (Some(_), Some(from)) => {
            v.problem(
                from.span(),
                format!("{key}.subject_token_from"),
                "set only one of subject_token_file (one subject for the source) and subject_token_from (the subject of each app request, on-behalf-of)",
            );
            None
        }
        (None, None) => {
            v.problem(
                spanned.span(),
                format!("{key}.subject_token_file"),
                "missing: grant = \"token_exchange\" needs subject_token_file, or subject_token_from = \"header:<Name>\" for on-behalf-of",
            );
            None
        }
        (Some(file), None) => {
            if let Some(max) = &raw.max_subjects {
                v.problem(
                    max.span(),
                    format!("{key}.max_subjects"),
                    "is for on-behalf-of (subject_token_from) only: a subject_token_file is one subject",
                );
                return None;
            }
            Some(SubjectFrom::File(v.base_dir.join(file.get_ref())))
        }
        (None, Some(from)) => {
            let name = format!("{key}.subject_token_from");
            let Some(header) = from.get_ref().strip_prefix("header:") else {
                v.problem(
                    from.span(),
                    name,
                    "must be \"header:<Name>\": the request header that carries the subject token",
                );
                return None;
            };
            let header = match HeaderName::from_bytes(header.trim().as_bytes()) {
                Ok(header) if !FORBIDDEN_HEADERS.contains(&header.as_str()) => header,
                Ok(header) => {
                    v.problem(
                        from.span(),
                        name,
                        format!(
                            "{:?} is a header bearerd sets or the connection owns; choose another",
                            header.as_str()
                        ),
                    );
                    return None;
                }
                Err(_) => {
                    v.problem(
                        from.span(),
                        name,
                        format!("{header:?} is not a valid header name"),
                    );
                    return None;
                }
            };
            let max_subjects = match &raw.max_subjects {
                None => DEFAULT_MAX_SUBJECTS,
                Some(max) if *max.get_ref() >= 1 => *max.get_ref(),
                Some(max) => {
                    v.problem(
                        max.span(),
                        format!("{key}.max_subjects"),
                        "must be at least 1",
                    );
                    return None;
                }
            };
            Some(SubjectFrom::Header(OnBehalfOf {
                header,
                max_subjects,
            }))
        }
    }
}

/// `[upstream.token.jwt_bearer]`.
fn jwt_bearer(
    v: &mut Validator<'_>,
    key: &str,
    spanned: &Spanned<file::Token>,
    client_id: Option<&str>,
) -> Option<JwtBearer> {
    let Some(table) = &spanned.get_ref().jwt_bearer else {
        v.problem(
            spanned.span(),
            format!("{key}.jwt_bearer"),
            format!("missing: grant = \"jwt_bearer\" needs a [{key}.jwt_bearer] table with private_key_file or service_account_file"),
        );
        return None;
    };
    let raw = table.get_ref();
    let key = format!("{key}.jwt_bearer");
    let text = |s: &Option<Spanned<String>>| s.as_ref().map(|s| s.get_ref().clone());
    let lifetime = duration(
        v,
        raw.lifetime.as_ref(),
        &format!("{key}.lifetime"),
        DEFAULT_JWT_BEARER_LIFETIME,
    );
    let scope_in = match raw.scope_in.as_ref().map(|s| *s.get_ref()) {
        Some(file::ScopeIn::Claim) => Some(ScopeIn::Claim),
        Some(file::ScopeIn::Form) => Some(ScopeIn::Form),
        None => None,
    };
    match (&raw.private_key_file, &raw.service_account_file) {
        (Some(_), Some(sa)) => {
            v.problem(
                sa.span(),
                format!("{key}.service_account_file"),
                "set only one of private_key_file and service_account_file: the service-account file holds its own key",
            );
            None
        }
        (None, None) => {
            v.problem(
                table.span(),
                format!("{key}.private_key_file"),
                "missing: set private_key_file (with issuer or client_id) or service_account_file",
            );
            None
        }
        (Some(path), None) => {
            let alg = jws_alg(
                v,
                raw.alg.as_ref(),
                &format!("{key}.alg"),
                &[JwsAlg::Rs256, JwsAlg::Ps256, JwsAlg::Es256, JwsAlg::EdDsa],
            );
            let issuer = match (text(&raw.issuer), client_id) {
                (Some(issuer), _) => issuer,
                (None, Some(id)) => id.to_owned(),
                (None, None) => {
                    v.problem(
                        table.span(),
                        format!("{key}.issuer"),
                        "missing: the assertion's iss is the issuer, or the client_id, and neither is set",
                    );
                    return None;
                }
            };
            Some(JwtBearer {
                key: JwtKey::Pem {
                    path: v.base_dir.join(path.get_ref()),
                    alg,
                },
                // RFC 7523 §3: `sub` is required; for a client acting for itself it is the
                // client, as in a client assertion.
                subject: Some(text(&raw.subject).unwrap_or_else(|| issuer.clone())),
                issuer,
                audience: text(&raw.audience),
                key_id: text(&raw.key_id),
                lifetime,
                scope_in: scope_in.unwrap_or(ScopeIn::Form),
            })
        }
        (None, Some(path)) => {
            // The file names the issuer, the key id and the audience itself.
            for (name, span) in [
                ("issuer", raw.issuer.as_ref().map(Spanned::span)),
                ("key_id", raw.key_id.as_ref().map(Spanned::span)),
                ("alg", raw.alg.as_ref().map(Spanned::span)),
            ] {
                if let Some(span) = span {
                    v.problem(
                        span,
                        format!("{key}.{name}"),
                        "is set by service_account_file (client_email, private_key_id, RS256)",
                    );
                    return None;
                }
            }
            let full = v.base_dir.join(path.get_ref());
            // Read again (service_account read it for the URL) for the names: cheap, and it
            // keeps the key out of the config's memory.
            let sa = ServiceAccountKey::read(&full).ok()?;
            Some(JwtBearer {
                key: JwtKey::ServiceAccount { path: full },
                issuer: sa.client_email.clone(),
                // Google's `sub` is a user to impersonate (domain-wide delegation) only.
                subject: text(&raw.subject),
                audience: Some(text(&raw.audience).unwrap_or(sa.token_uri.clone())),
                key_id: sa.private_key_id,
                lifetime,
                scope_in: scope_in.unwrap_or(ScopeIn::Claim),
            })
        }
    }
}

/// `header` and `prefix`; neither with DPoP, whose header RFC 9449 §7.1 fixes.
pub(super) fn presentation(
    v: &mut Validator<'_>,
    key: &str,
    raw: &file::Token,
    dpop: bool,
) -> Option<Presentation> {
    let mut presentation = Presentation::default();
    if dpop {
        for (name, value) in [("header", &raw.header), ("prefix", &raw.prefix)] {
            if let Some(value) = value {
                v.problem(
                    value.span(),
                    format!("{key}.{name}"),
                    "is not allowed with dpop = true: RFC 9449 §7.1 fixes the token's place as Authorization: DPoP",
                );
                return None;
            }
        }
        return Some(presentation);
    }
    if let Some(header) = &raw.header {
        match HeaderName::from_bytes(header.get_ref().as_bytes()) {
            Ok(name) if !FORBIDDEN_HEADERS.contains(&name.as_str()) => presentation.header = name,
            Ok(name) => {
                v.problem(
                    header.span(),
                    format!("{key}.header"),
                    format!(
                        "{:?} is a header bearerd sets or the connection owns; choose another",
                        name.as_str()
                    ),
                );
                return None;
            }
            Err(_) => {
                v.problem(
                    header.span(),
                    format!("{key}.header"),
                    format!("{:?} is not a valid header name", header.get_ref()),
                );
                return None;
            }
        }
    }
    if let Some(prefix) = &raw.prefix {
        let text = prefix.get_ref();
        if HeaderValue::from_str(text).is_err() || text.trim() != text || text.contains(' ') {
            v.problem(
                prefix.span(),
                format!("{key}.prefix"),
                "must be one word of visible characters (the token follows after a space), or empty for the token alone",
            );
            return None;
        }
        presentation.prefix = text.clone();
    }
    Some(presentation)
}

/// Headers the token may not go in: the connection's, and those bearerd sets itself.
const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-authorization",
    "dpop",
    "traceparent",
];
