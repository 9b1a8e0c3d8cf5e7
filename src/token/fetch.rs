//! One token request by the source's grant (`grant`: client credentials, JWT bearer, token
//! exchange, refresh token), and its outcome.

mod error;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use super::client_auth::{self, Credentials};
use super::dpop::{self, DpopKey, Nonce};
use super::grant;
use super::response::{self, TokenType};
use super::rotation::RefreshChain;
use super::{LifetimeSource, Token};
use crate::config::{Grant, TokenSettings};
use crate::errors;
use crate::secret::{Redactor, Secret};
use crate::tls::HttpsClient;
pub use error::FetchError;

/// Largest token response read. Tokens, even JWTs with many claims, are a few KiB; a larger
/// body is a misbehaving endpoint and is not buffered.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

const USER_AGENT_VALUE: &str = concat!("bearerd/", env!("CARGO_PKG_VERSION"));

/// Something that obtains a token: the real [`Fetcher`], or a counting stand-in in tests.
pub trait Fetch: Send + Sync + 'static {
    /// Performs one token request.
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Token, FetchError>> + Send + '_>>;

    /// An upstream rejected `token` and a new one is about to be fetched: a cache drops it.
    fn rejected<'a>(&'a self, _token: &'a Token) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async {})
    }
}

/// Fetches tokens for one [`TokenSettings`] over a pooled HTTPS client.
pub struct Fetcher {
    settings: TokenSettings,
    client: HttpsClient<Full<Bytes>>,
    /// `[egress]`'s proxy, when the endpoint is reached through it: a request that times out
    /// names it (the whole request's timeout fires before the tunnel's own).
    proxy: Option<String>,
    /// The key tokens are bound to, with `dpop = true`.
    dpop: Option<Arc<DpopKey>>,
    /// The token endpoint's latest DPoP nonce.
    nonce: Nonce,
    /// Called when a token request is sent again with the endpoint's new DPoP nonce.
    on_nonce_retry: Box<dyn Fn() + Send + Sync>,
    /// `grant = "refresh_token"`: the refresh token to spend next, shared with the cache
    /// wrapper that keeps the chain.
    refresh: Arc<RefreshChain>,
}

/// One answer of the token endpoint, read whole.
struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    location: Option<String>,
    /// It sent a DPoP nonce bearerd did not have.
    new_nonce: bool,
    body: Bytes,
}

impl Fetcher {
    /// A fetcher that reaches the token endpoint with `tls` (which presents the client
    /// certificate of `tls_client_auth`), through `egress` when given, binding tokens to
    /// `dpop` when given.
    pub(crate) fn new(
        settings: TokenSettings,
        tls: rustls::ClientConfig,
        egress: Option<&Arc<crate::egress::Egress>>,
        dpop: Option<Arc<DpopKey>>,
        on_nonce_retry: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        // One timeout bounds the whole request; the connect timeout just keeps the
        // connector's own error when it is the connect that hangs.
        let client = crate::tls::client(tls, settings.timeout, egress);
        let proxy = egress.and_then(|egress| match egress.way(&settings.url) {
            crate::egress::Way::Proxy(proxy) => Some(proxy),
            crate::egress::Way::NoProxy | crate::egress::Way::Direct => None,
        });
        Self {
            settings,
            client,
            proxy,
            dpop,
            nonce: Nonce::default(),
            on_nonce_retry,
            refresh: Arc::default(),
        }
    }

    /// The refresh token chain this fetcher spends from, for the cache wrapper that keeps it.
    pub(crate) fn chain(&self) -> Arc<RefreshChain> {
        Arc::clone(&self.refresh)
    }

    /// The token endpoint's authority, as messages name it.
    fn endpoint(&self) -> String {
        self.settings
            .url
            .authority()
            .map_or_else(|| self.settings.url.to_string(), ToString::to_string)
    }

    /// One token exchange for `subject`, a subject token an app request carried
    /// (on-behalf-of): taught to the redactor as the file's subject token is.
    pub(crate) async fn fetch_for(&self, subject: &Secret) -> Result<Token, FetchError> {
        self.fetch_once(Some(subject)).await
    }

    async fn fetch_once(&self, subject: Option<&Secret>) -> Result<Token, FetchError> {
        // Whatever comes back is scrubbed of every form in which the request carried the
        // client's credentials.
        let mut redactor = Redactor::new();
        let timeout = self.settings.timeout;
        // One deadline for the request and for reading the credential files it needs, so that
        // a file that does not answer fails the request in time, with an error naming the
        // file (the reader's deadline is polled before this one's).
        let deadline = tokio::time::Instant::now() + timeout;
        let attempts = async {
            let mut answer = self.exchange(&mut redactor, deadline, subject).await?;
            // RFC 9449 §8: an endpoint that wants a nonce says `use_dpop_nonce` and sends
            // one; the request goes again, once, with it (and new credentials: an assertion's
            // `jti` must not be used twice).
            if self.dpop.is_some() && answer.new_nonce && !answer.status.is_success() {
                let error = response::parse_error(answer.status, &answer.body, &redactor);
                if error.error.as_deref() == Some(dpop::USE_DPOP_NONCE) {
                    (self.on_nonce_retry)();
                    answer = self.exchange(&mut redactor, deadline, subject).await?;
                }
            }
            Ok::<_, FetchError>(answer)
        };
        let answer = tokio::time::timeout_at(deadline, attempts)
            .await
            .map_err(|_| FetchError::Timeout {
                endpoint: match &self.proxy {
                    Some(proxy) => format!("{} through the proxy {proxy}", self.endpoint()),
                    None => self.endpoint(),
                },
                after: timeout,
            })??;
        self.outcome(answer, &redactor)
    }

    /// Sends one token request and reads the answer.
    async fn exchange(
        &self,
        redactor: &mut Redactor,
        deadline: tokio::time::Instant,
        subject: Option<&Secret>,
    ) -> Result<Answer, FetchError> {
        let refresh_token = self.refresh.current(&self.settings, deadline).await?;
        let grant = grant::fields(
            &self.settings,
            redactor,
            deadline,
            refresh_token.as_ref(),
            subject,
        )
        .await?;
        let credentials = client_auth::present(&self.settings, redactor, deadline).await?;
        let mut request = build_request(&self.settings, &grant, credentials)?;
        if let Some(key) = &self.dpop {
            let htu = htu(&self.settings.url);
            let proof = key
                .proof("POST", &htu, None, self.nonce.get().as_deref())
                .map_err(|e| FetchError::BuildRequest {
                    reason: e.to_string(),
                })?;
            request.headers_mut().insert(dpop::DPOP, proof);
        }
        let response =
            self.client
                .request(request)
                .await
                .map_err(|source| FetchError::Connect {
                    endpoint: self.endpoint(),
                    source: Box::new(source),
                })?;
        let status = response.status();
        let new_nonce = self.dpop.is_some() && self.nonce.update(response.headers());
        // RFC 9110 §10.2.3: Retry-After means "come back later" on 429 and 503.
        let retry_after = matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        )
        .then(|| response.headers().get(RETRY_AFTER))
        .flatten()
        .and_then(parse_retry_after);
        // Redirects are not followed (the secret would go along); say where it pointed, as
        // it usually names the right token URL (a missing trailing slash, say).
        let location = status
            .is_redirection()
            .then(|| response.headers().get(LOCATION))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| FetchError::InvalidResponse {
                endpoint: self.endpoint(),
                problem: response::InvalidResponse {
                    reason: format!(
                        "status {status}, body unreadable: {}",
                        errors::chain(e.as_ref())
                    ),
                    said: None,
                },
            })?
            .to_bytes();
        Ok(Answer {
            status,
            retry_after,
            location,
            new_nonce,
            body,
        })
    }

    /// What an answer means: a token, or why not.
    fn outcome(&self, answer: Answer, redactor: &Redactor) -> Result<Token, FetchError> {
        let Answer {
            status,
            retry_after,
            location,
            body,
            ..
        } = answer;
        let endpoint = self.endpoint();
        if status.is_success() {
            return self
                .token_from(&body, redactor)
                .map_err(|problem| FetchError::InvalidResponse { endpoint, problem });
        }
        let error = response::parse_error(status, &body, redactor);
        Err(if status.is_server_error() {
            FetchError::ServerError {
                endpoint,
                error,
                retry_after,
            }
        } else if status.is_client_error()
            && error.error.as_deref() == Some("invalid_grant")
            && matches!(self.settings.grant, Grant::RefreshToken(_))
        {
            // RFC 6749 §5.2: the refresh token is invalid, expired, revoked or was spent
            // elsewhere. Sending it again cannot help; only a new authorisation can.
            self.refresh.lose();
            FetchError::AuthorisationLost {
                endpoint: Some(endpoint.clone()),
                reason: format!(
                    "token endpoint {endpoint} answered invalid_grant to the refresh token ({})",
                    error.status
                ),
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
        if grant.not_applicable {
            let accepted = matches!(&self.settings.grant, Grant::TokenExchange(exchange) if !exchange.wants_access_token());
            if !accepted {
                return Err(response::InvalidResponse {
                    reason: "token_type is N_A, which RFC 8693 §2.2.1 allows only for a token that is not an access token, and an access token was asked for".into(),
                    said: None,
                });
            }
        }
        if let Some(new) = &grant.refresh_token {
            self.refresh.rotate(&self.settings, new);
        }
        // RFC 9449 §5: a DPoP-bound token says so; a Bearer token where DPoP was asked for
        // would be refused by the upstream, and a DPoP token cannot be sent as Bearer.
        let scheme = match (grant.token_type, &self.dpop) {
            (TokenType::Bearer, None) => TokenType::Bearer,
            (TokenType::DPoP, Some(_)) => TokenType::DPoP,
            (TokenType::Bearer, Some(_)) => {
                return Err(response::InvalidResponse {
                    reason: "token_type is Bearer, not DPoP, although dpop = true: the endpoint did not bind the token to bearerd's key (does the client allow DPoP?)".into(),
                    said: None,
                })
            }
            (TokenType::DPoP, None) => {
                return Err(response::InvalidResponse {
                    reason: "token_type is DPoP, but dpop is not set: the token can only be used with proofs; set dpop = true".into(),
                    said: None,
                })
            }
        };
        let (said, lifetime_source) = match grant.expires_in {
            Some(lifetime) => (lifetime, LifetimeSource::ExpiresIn),
            None => match response::jwt_lifetime(grant.access_token.expose(), SystemTime::now()) {
                Some(lifetime) => (lifetime?, LifetimeSource::JwtExp),
                None => (self.settings.default_lifetime, LifetimeSource::Default),
            },
        };
        let (lifetime, lifetime_source) = if said > self.settings.max_lifetime {
            (self.settings.max_lifetime, LifetimeSource::MaxLifetime)
        } else {
            (said, lifetime_source)
        };
        Token::issue(
            grant.access_token.expose(),
            scheme,
            lifetime,
            lifetime_source,
            grant.scope,
        )
    }
}

impl Fetch for Fetcher {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Token, FetchError>> + Send + '_>> {
        Box::pin(self.fetch_once(None))
    }
}

/// The token request: a form POST with the grant's fields and the client authenticated as
/// configured.
fn build_request(
    settings: &TokenSettings,
    grant: &[(&'static str, Secret)],
    credentials: Credentials,
) -> Result<Request<Full<Bytes>>, FetchError> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (name, value) in grant {
        form.append_pair(name, value.expose());
    }
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
    let scope = if grant::scope_in_form(settings) {
        &settings.scope
    } else {
        &None
    };
    let optional = [
        ("scope", scope),
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

/// A DPoP proof's `htu`: the URL without query and fragment (RFC 9449 §4.2).
fn htu(url: &http::Uri) -> String {
    let mut htu = String::new();
    if let (Some(scheme), Some(authority)) = (url.scheme_str(), url.authority()) {
        htu.push_str(scheme);
        htu.push_str("://");
        htu.push_str(authority.as_str());
    }
    htu.push_str(url.path());
    htu
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
            scope: Some("read write".into()),
            audience: Some("https://api.example.com".into()),
            params: BTreeMap::from([("organization".into(), "org_1".into())]),
            ..TokenSettings::for_tests(auth(SecretSource::Inline(Secret::new("p@ss:word"))))
        }
    }

    async fn request_for(settings: &TokenSettings) -> (http::request::Parts, String) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut redactor = Redactor::new();
        let grant = grant::fields(settings, &mut redactor, deadline, None, None)
            .await
            .unwrap();
        let credentials = client_auth::present(settings, &mut redactor, deadline)
            .await
            .unwrap();
        let (parts, body) = build_request(settings, &grant, credentials)
            .unwrap()
            .into_parts();
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
