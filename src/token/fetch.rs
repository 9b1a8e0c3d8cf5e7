//! One token request by the client-credentials grant (RFC 6749 §4.4.2), and its outcome.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::Instant;

use super::response::{self, EndpointError};
use super::{schedule, LifetimeSource, Token};
use crate::config::{ClientAuth, TokenSettings};
use crate::secret::{Redactor, Secret, SecretError};
use crate::tls::HttpsClient;

/// Largest token response read. Tokens, even JWTs with many claims, are a few KiB; a larger
/// body is a misbehaving endpoint and is not buffered.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

const USER_AGENT_VALUE: &str = concat!("bearerd/", env!("CARGO_PKG_VERSION"));

/// Something that obtains a token: the real [`Fetcher`], or a counting stand-in in tests.
pub trait Fetch: Send + Sync + 'static {
    /// Performs one token request.
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Token, FetchError>> + Send + '_>>;
}

/// Why a token request failed. Messages name statuses, error codes, hosts and sources, never a
/// secret or a token; what the endpoint said is in them only after redaction.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// bearerd could not read the client secret; no request was sent.
    #[error("{0}")]
    Secret(#[from] SecretError),
    /// bearerd could not build its own request (a credential unfit for a header, say); no
    /// request was sent, and the endpoint is not to blame.
    #[error("cannot build the token request: {reason}")]
    BuildRequest {
        /// Why, in bearerd's words.
        reason: String,
    },
    /// No complete answer within the token timeout.
    #[error("token request to {endpoint} timed out after {}", humantime::format_duration(*.after))]
    Timeout {
        /// The token endpoint's authority.
        endpoint: String,
        /// The timeout that passed.
        after: Duration,
    },
    /// Connecting, the TLS handshake, or the exchange itself failed.
    #[error("cannot reach the token endpoint {endpoint}: {}", error_chain(.source.as_ref()))]
    Connect {
        /// The token endpoint's authority.
        endpoint: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The endpoint refused (4xx): wrong credentials, audience, scope, or too many requests.
    #[error("token endpoint {endpoint} rejected the request: {error}")]
    Rejected {
        /// The token endpoint's authority.
        endpoint: String,
        /// What it answered, redacted.
        error: EndpointError,
        /// The wait it asked for with `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// The endpoint failed (5xx).
    #[error("token endpoint {endpoint} failed: {error}")]
    ServerError {
        /// The token endpoint's authority.
        endpoint: String,
        /// What it answered, redacted.
        error: EndpointError,
        /// The wait it asked for with `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// A 2xx answer that holds no usable token, or an answer of another kind.
    #[error("token endpoint {endpoint} sent an unusable response: {problem}")]
    InvalidResponse {
        /// The token endpoint's authority.
        endpoint: String,
        /// What is wrong with it.
        problem: response::InvalidResponse,
    },
}

impl FetchError {
    /// What the endpoint answered, when it answered with an error status.
    pub fn endpoint(&self) -> Option<&EndpointError> {
        match self {
            Self::Rejected { error, .. } | Self::ServerError { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The wait the endpoint asked for with `Retry-After` (on 429 and 503).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Rejected { retry_after, .. } | Self::ServerError { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The failure as the app (in a 503 body) and `/readyz` are told it: the endpoint's host,
    /// the status and a well-formed `error` code, and bearerd's own words; never text the
    /// endpoint chose beyond that code. The log gets the whole [`Display`](std::fmt::Display).
    pub fn summary(&self) -> String {
        match self {
            Self::Rejected {
                endpoint, error, ..
            } => format!(
                "token endpoint {endpoint} rejected the request: {}",
                status_and_code(error)
            ),
            Self::ServerError {
                endpoint, error, ..
            } => format!(
                "token endpoint {endpoint} failed: {}",
                status_and_code(error)
            ),
            Self::InvalidResponse { endpoint, problem } => format!(
                "token endpoint {endpoint} sent an unusable response: {}",
                problem.reason
            ),
            Self::Secret(_)
            | Self::BuildRequest { .. }
            | Self::Timeout { .. }
            | Self::Connect { .. } => self.to_string(),
        }
    }
}

/// `status 401 Unauthorized, error "invalid_client"`: the part of an endpoint's error the app
/// may see.
fn status_and_code(error: &EndpointError) -> String {
    match error.code() {
        Some(code) => format!("status {}, error {code:?}", error.status),
        None => format!("status {}", error.status),
    }
}

/// Fetches tokens for one [`TokenSettings`] over a pooled HTTPS client.
pub struct Fetcher {
    settings: TokenSettings,
    client: HttpsClient<Full<Bytes>>,
}

impl Fetcher {
    /// A fetcher that reaches the token endpoint with `tls`.
    pub fn new(settings: TokenSettings, tls: rustls::ClientConfig) -> Self {
        // One timeout bounds the whole request; the connect timeout just keeps the
        // connector's own error when it is the connect that hangs.
        let client = crate::tls::client(tls, settings.timeout);
        Self { settings, client }
    }

    /// The token endpoint's authority, as messages name it.
    fn endpoint(&self) -> String {
        self.settings
            .url
            .authority()
            .map_or_else(|| self.settings.url.to_string(), ToString::to_string)
    }

    async fn fetch_once(&self) -> Result<Token, FetchError> {
        let secret = self.settings.client_secret.read()?;
        // Whatever comes back is scrubbed of every form in which the request carried the secret.
        let mut redactor = Redactor::new();
        redactor.add_client_secret(&self.settings.client_id, secret.expose());
        let request = build_request(&self.settings, &secret)?;
        let timeout = self.settings.timeout;
        let endpoint = self.endpoint();
        let invalid = |problem| FetchError::InvalidResponse {
            endpoint: self.endpoint(),
            problem,
        };
        let exchange = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|source| FetchError::Connect {
                        endpoint: self.endpoint(),
                        source: Box::new(source),
                    })?;
            let status = response.status();
            // RFC 9110 §10.2.3: Retry-After means "come back later" on 429 and 503.
            let retry_after = matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            )
            .then(|| response.headers().get(RETRY_AFTER))
            .flatten()
            .and_then(parse_retry_after);
            // Redirects are not followed (the secret would go along); say where it pointed,
            // as it usually names the right token URL (a missing trailing slash, say).
            let location = status
                .is_redirection()
                .then(|| response.headers().get(LOCATION))
                .flatten()
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    invalid(response::InvalidResponse {
                        reason: format!(
                            "status {status}, body unreadable: {}",
                            error_chain(e.as_ref())
                        ),
                        said: None,
                    })
                })?
                .to_bytes();
            Ok::<_, FetchError>((status, retry_after, location, body))
        };
        let (status, retry_after, location, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| FetchError::Timeout {
                endpoint: endpoint.clone(),
                after: timeout,
            })??;
        if status.is_success() {
            return self
                .token_from(&body, &redactor)
                .map_err(|problem| FetchError::InvalidResponse { endpoint, problem });
        }
        let error = response::parse_error(status, &body, &redactor);
        Err(if status.is_server_error() {
            FetchError::ServerError {
                endpoint,
                error,
                retry_after,
            }
        } else if status.is_client_error() {
            FetchError::Rejected {
                endpoint,
                error,
                retry_after,
            }
        } else {
            let reason = match location {
                Some(_) => format!(
                    "unexpected status {status}, a redirect: bearerd does not follow them (the secret would go along); set the token url to where it points"
                ),
                None => format!("unexpected status {status}"),
            };
            let said = match location {
                Some(location) => Some(format!("Location {:?}", redactor.redact(&location))),
                None => error.description,
            };
            FetchError::InvalidResponse {
                endpoint,
                problem: response::InvalidResponse { reason, said },
            }
        })
    }

    /// Turns a 2xx body into a [`Token`], working out its lifetime: the endpoint's word for
    /// it, clamped to `max_lifetime` so that no answer can make a token live for ever (or
    /// overflow the clock).
    fn token_from(
        &self,
        body: &[u8],
        redactor: &Redactor,
    ) -> Result<Token, response::InvalidResponse> {
        let grant = response::parse_success(body, redactor)?;
        let now = SystemTime::now();
        let (said, lifetime_source) = match grant.expires_in {
            Some(lifetime) => (lifetime, LifetimeSource::ExpiresIn),
            None => match response::jwt_lifetime(grant.access_token.expose(), now) {
                Some(lifetime) => (lifetime?, LifetimeSource::JwtExp),
                None => (self.settings.default_lifetime, LifetimeSource::Default),
            },
        };
        let (lifetime, lifetime_source) = if said > self.settings.max_lifetime {
            (self.settings.max_lifetime, LifetimeSource::MaxLifetime)
        } else {
            (said, lifetime_source)
        };
        let too_long = || response::InvalidResponse {
            reason: "the token's lifetime does not fit this machine's clock".into(),
            said: None,
        };
        let usable_until = Instant::now()
            .checked_add(schedule::usable_for(lifetime))
            .ok_or_else(too_long)?;
        let expires_at = now.checked_add(lifetime).ok_or_else(too_long)?;
        let mut authorization =
            HeaderValue::try_from(format!("Bearer {}", grant.access_token.expose())).map_err(
                |_| response::InvalidResponse {
                    reason: "access_token has characters not allowed in an HTTP header".into(),
                    said: None,
                },
            )?;
        authorization.set_sensitive(true);
        Ok(Token {
            authorization,
            lifetime,
            lifetime_source,
            usable_until,
            expires_at,
            scope: grant.scope,
            generation: 0,
        })
    }
}

impl Fetch for Fetcher {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Token, FetchError>> + Send + '_>> {
        Box::pin(self.fetch_once())
    }
}

/// The token request: a form POST with the client authenticated as configured.
fn build_request(
    settings: &TokenSettings,
    secret: &Secret,
) -> Result<Request<Full<Bytes>>, FetchError> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials");
    let mut request = Request::post(settings.url.clone())
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ACCEPT, "application/json")
        .header(USER_AGENT, USER_AGENT_VALUE);
    match settings.auth {
        ClientAuth::Basic => {
            request = request.header(
                AUTHORIZATION,
                basic_credentials(&settings.client_id, secret)?,
            );
        }
        ClientAuth::Post => {
            form.append_pair("client_id", &settings.client_id);
            form.append_pair("client_secret", secret.expose());
        }
    }
    let optional = [
        ("scope", &settings.scope),
        ("audience", &settings.audience),
        ("resource", &settings.resource),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            form.append_pair(name, value);
        }
    }
    for (name, value) in &settings.params {
        form.append_pair(name, value);
    }
    request
        .body(Full::new(Bytes::from(form.finish())))
        .map_err(|e| FetchError::BuildRequest {
            reason: e.to_string(),
        })
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`: RFC 6749 §2.3.1 has both encoded with
/// `application/x-www-form-urlencoded` first, which leaves the usual alphanumeric ids alone.
fn basic_credentials(client_id: &str, secret: &Secret) -> Result<HeaderValue, FetchError> {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}:{}", encode(client_id), encode(secret.expose()));
    let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
    let mut value = HeaderValue::try_from(format!("Basic {encoded}")).map_err(|e| {
        FetchError::BuildRequest {
            reason: format!("the Basic header: {e}"),
        }
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// `Retry-After` in its delay-seconds form (RFC 9110 §10.2.3); an HTTP-date is ignored.
fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    value
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// An error and its causes on one line: hyper's top-level messages ("client error (Connect)")
/// say little without the cause ("connection refused", "invalid peer certificate").
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretSource;
    use std::collections::BTreeMap;

    fn settings(auth: ClientAuth) -> TokenSettings {
        TokenSettings {
            url: "https://auth.example.com/oauth/token".parse().unwrap(),
            client_id: "my app".into(),
            client_secret: SecretSource::Inline(Secret::new("p@ss:word")),
            auth,
            scope: Some("read write".into()),
            audience: Some("https://api.example.com".into()),
            resource: None,
            params: BTreeMap::from([("organization".into(), "org_1".into())]),
            timeout: Duration::from_secs(1),
            default_lifetime: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(86400),
            allow_plain_http: false,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
        }
    }

    async fn body_of(request: Request<Full<Bytes>>) -> String {
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn basic_encodes_id_and_secret_per_rfc_6749_2_3_1() {
        let s = settings(ClientAuth::Basic);
        let request = build_request(&s, &s.client_secret.read().unwrap()).unwrap();
        let auth = request.headers()[AUTHORIZATION]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(request.headers()[AUTHORIZATION].is_sensitive());
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), "my+app:p%40ss%3Aword");
        assert_eq!(
            body_of(request).await,
            "grant_type=client_credentials&scope=read+write&audience=https%3A%2F%2Fapi.example.com&organization=org_1"
        );
    }

    #[tokio::test]
    async fn post_puts_credentials_in_the_body() {
        let s = settings(ClientAuth::Post);
        let request = build_request(&s, &s.client_secret.read().unwrap()).unwrap();
        assert!(request.headers().get(AUTHORIZATION).is_none());
        assert_eq!(
            request.headers()[CONTENT_TYPE],
            "application/x-www-form-urlencoded"
        );
        let body = body_of(request).await;
        assert!(
            body.starts_with(
                "grant_type=client_credentials&client_id=my+app&client_secret=p%40ss%3Aword&"
            ),
            "{body}"
        );
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("120")),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT")),
            None
        );
    }
}
