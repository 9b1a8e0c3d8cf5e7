//! One token request by the client-credentials grant (RFC 6749 §4.4.2), and its outcome.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::Instant;

use super::client_auth::{self, Credentials};
use super::metrics::FetchOutcome;
use super::response::{self, EndpointError};
use super::{schedule, LifetimeSource, Token};
use crate::config::TokenSettings;
use crate::errors;
use crate::secret::{Redactor, SecretError};
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
    #[error("cannot reach the token endpoint {endpoint}: {}", errors::chain(.source.as_ref()))]
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
    /// How the request ended, for `bearerd_token_fetch_total`; `None` when none was sent (the
    /// credentials could not be read or used, or bearerd could not build its request).
    pub fn outcome(&self) -> Option<FetchOutcome> {
        match self {
            Self::Secret(_) | Self::BuildRequest { .. } => None,
            Self::Timeout { .. } => Some(FetchOutcome::Timeout),
            Self::Connect { .. } => Some(FetchOutcome::ConnectError),
            Self::Rejected { .. } => Some(FetchOutcome::Rejected),
            Self::ServerError { .. } => Some(FetchOutcome::ServerError),
            Self::InvalidResponse { .. } => Some(FetchOutcome::InvalidResponse),
        }
    }

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
        // Whatever comes back is scrubbed of every form in which the request carried the
        // client's credentials.
        let mut redactor = Redactor::new();
        let credentials =
            client_auth::present(&self.settings.auth, &self.settings.client_id, &mut redactor)?;
        let request = build_request(&self.settings, credentials)?;
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
                            errors::chain(e.as_ref())
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
    credentials: Credentials,
) -> Result<Request<Full<Bytes>>, FetchError> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials");
    let mut request = Request::post(settings.url.clone())
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ACCEPT, "application/json")
        .header(USER_AGENT, USER_AGENT_VALUE);
    if let Some(authorization) = credentials.authorization {
        request = request.header(AUTHORIZATION, authorization);
    }
    for (name, value) in &credentials.form {
        form.append_pair(name, value.expose());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientAuth;
    use crate::secret::{Secret, SecretSource};
    use std::collections::BTreeMap;

    fn settings(auth: fn(SecretSource) -> ClientAuth) -> TokenSettings {
        TokenSettings {
            url: "https://auth.example.com/oauth/token".parse().unwrap(),
            client_id: "my app".into(),
            auth: auth(SecretSource::Inline(Secret::new("p@ss:word"))),
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

    async fn request_for(settings: &TokenSettings) -> (http::request::Parts, String) {
        let credentials =
            client_auth::present(&settings.auth, &settings.client_id, &mut Redactor::new())
                .unwrap();
        let (parts, body) = build_request(settings, credentials).unwrap().into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn basic_leaves_the_form_to_the_grant() {
        let (parts, body) = request_for(&settings(|secret| ClientAuth::Basic { secret })).await;
        assert!(parts.headers[AUTHORIZATION].is_sensitive());
        assert!(parts.headers[AUTHORIZATION]
            .to_str()
            .unwrap()
            .starts_with("Basic "));
        assert_eq!(
            body,
            "grant_type=client_credentials&scope=read+write&audience=https%3A%2F%2Fapi.example.com&organization=org_1"
        );
    }

    #[tokio::test]
    async fn post_puts_credentials_in_the_body() {
        let (parts, body) = request_for(&settings(|secret| ClientAuth::Post { secret })).await;
        assert!(parts.headers.get(AUTHORIZATION).is_none());
        assert_eq!(
            parts.headers[CONTENT_TYPE],
            "application/x-www-form-urlencoded"
        );
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
