//! The one place proxy failures become HTTP answers to the app.
//!
//! Each failure records where it came from (the token source, the app's request, the
//! upstream), and [`ProxyError::status`] maps it: no token → 503, upstream unreachable → 502,
//! upstream too slow → 504; a request bearerd refuses to forward → 400, 405 or 501; an app
//! whose request body stalls → 408. The body is JSON an app or a person can read, and never
//! holds a token or a secret.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::pool::ConnectError;
use super::ResponseBody;
use crate::token::fetch::error_chain;
use crate::token::source::Unavailable;

/// Why a request was answered by bearerd rather than by the upstream.
#[derive(Debug)]
pub enum ProxyError {
    /// No usable token: the request was not sent.
    TokenUnavailable(Unavailable),
    /// The app's request cannot be forwarded: a target bearerd does not serve, or a body
    /// whose framing is broken.
    BadRequest(String),
    /// A method that must never carry the token (`TRACE` echoes it back, `CONNECT` would open
    /// a tunnel bearerd cannot see into).
    MethodNotAllowed(String),
    /// A transfer coding bearerd does not know (RFC 9112 §6.1: 501).
    NotImplemented(String),
    /// The app's request body made no progress for `body_idle_timeout`.
    RequestBodyTimeout(String),
    /// The upstream could not be reached: DNS, TCP connect, or TLS handshake.
    UpstreamUnreachable(String),
    /// The upstream did not connect or answer in time.
    UpstreamTimeout(String),
    /// The upstream broke the exchange (reset, malformed response).
    UpstreamFailed(String),
}

impl ProxyError {
    /// Classifies a failure to connect to the upstream.
    pub fn from_connect(error: &ConnectError) -> Self {
        let detail = error_chain(error);
        if is_timeout(error) {
            Self::UpstreamTimeout(detail)
        } else {
            Self::UpstreamUnreachable(detail)
        }
    }

    /// The status the app receives.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TokenUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UpstreamUnreachable(_) | Self::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `error` field of the JSON body: stable, for apps to match on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TokenUnavailable(_) => "token_unavailable",
            Self::BadRequest(_) => "bad_request",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::NotImplemented(_) => "not_implemented",
            Self::RequestBodyTimeout(_) => "request_body_timeout",
            Self::UpstreamUnreachable(_) => "upstream_unreachable",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamFailed(_) => "upstream_failed",
        }
    }

    /// What went wrong, for the JSON body and the log; never holds a secret.
    pub fn detail(&self) -> &str {
        match self {
            Self::TokenUnavailable(unavailable) => &unavailable.detail,
            Self::BadRequest(detail)
            | Self::MethodNotAllowed(detail)
            | Self::NotImplemented(detail)
            | Self::RequestBodyTimeout(detail)
            | Self::UpstreamUnreachable(detail)
            | Self::UpstreamTimeout(detail)
            | Self::UpstreamFailed(detail) => detail,
        }
    }

    /// The answer to the app: `{"error","upstream","detail"}` with the matching status, and
    /// `Retry-After` when no token is available.
    pub fn into_response(self, upstream: &str) -> Response<ResponseBody> {
        let body = serde_json::json!({
            "error": self.code(),
            "upstream": upstream,
            "detail": self.detail(),
        });
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match &self {
            Self::TokenUnavailable(unavailable) => {
                headers.insert(RETRY_AFTER, retry_after_seconds(unavailable.retry_after));
            }
            // RFC 9110 §15.5.6: a 405 says which methods are allowed. Any other method is
            // forwarded, so these stand for "the usual ones".
            Self::MethodNotAllowed(_) => {
                headers.insert(
                    ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            // The rest of the app's body was not read: the connection cannot carry another
            // request.
            Self::BadRequest(_) | Self::NotImplemented(_) | Self::RequestBodyTimeout(_) => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// Whole seconds, rounded up and at least 1: `Retry-After: 0` would invite a tight loop.
fn retry_after_seconds(wait: Duration) -> HeaderValue {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(seconds.max(1))
}

/// A connect timeout surfaces as an `io::Error` of kind `TimedOut` somewhere in the chain.
fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn token_unavailable_is_503_json_with_retry_after() {
        let error = ProxyError::TokenUnavailable(Unavailable {
            detail: "token endpoint failed: status 500".into(),
            retry_after: Duration::from_millis(1500),
        });
        let response = error.into_response("payments");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "error": "token_unavailable",
                "upstream": "payments",
                "detail": "token endpoint failed: status 500",
            })
        );
    }

    #[test]
    fn statuses() {
        let d = String::new;
        assert_eq!(ProxyError::UpstreamUnreachable(d()).status(), 502);
        assert_eq!(ProxyError::UpstreamFailed(d()).status(), 502);
        assert_eq!(ProxyError::UpstreamTimeout(d()).status(), 504);
        assert_eq!(ProxyError::BadRequest(d()).status(), 400);
        assert_eq!(ProxyError::MethodNotAllowed(d()).status(), 405);
        assert_eq!(ProxyError::NotImplemented(d()).status(), 501);
        assert_eq!(ProxyError::RequestBodyTimeout(d()).status(), 408);
        assert_eq!(retry_after_seconds(Duration::ZERO), "1");
        assert_eq!(retry_after_seconds(Duration::from_secs(30)), "30");
    }
}
