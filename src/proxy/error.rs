//! The one place proxy failures become HTTP answers to the app.
//!
//! Each failure records where it came from (the token source, the app's request, the
//! upstream), and [`ProxyError::status`] maps it: no token → 503, upstream unreachable → 502,
//! upstream too slow → 504; a request bearerd refuses to forward → 400, 405 or 501; an app
//! whose request body stalls → 408. The body is JSON an app or a person can read, and never
//! holds a token or a secret.

use std::error::Error;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::body::{AppBodyError, ResponseBody};
use super::pool::ConnectError;
use crate::errors;
use crate::token::on_behalf::Refusal;
use crate::token::source::Unavailable;

/// Why a request was answered by bearerd rather than by the upstream. Grouped by whose fault
/// it is ([`Fault`]); each variant keeps its cause.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// No usable token: the request was not sent.
    #[error("{}", .0.detail)]
    TokenUnavailable(Unavailable),
    /// On-behalf-of: the request carries no usable subject token (401).
    #[error(
        "{reason}: this route exchanges the subject token of each request (subject_token_from)"
    )]
    SubjectMissing {
        /// What is wrong with it, in bearerd's words.
        reason: &'static str,
    },
    /// On-behalf-of: the token endpoint refused the request's subject token, or it has
    /// expired (401). Nothing is kept of it.
    #[error("{detail}")]
    SubjectRejected {
        /// bearerd's summary: status and error code at most, never the endpoint's words.
        detail: String,
    },

    /// The app's request names a target bearerd does not serve, or one it cannot rewrite.
    #[error("{reason}")]
    BadRequest {
        /// Why, in bearerd's words.
        reason: String,
    },
    /// A method that must never carry the token (`TRACE` echoes it back, `CONNECT` would open
    /// a tunnel bearerd cannot see into).
    #[error("{reason}")]
    MethodNotAllowed {
        /// Why this method is not forwarded.
        reason: &'static str,
    },
    /// A transfer coding bearerd does not know (RFC 9112 §6.1: 501).
    #[error("transfer coding {coding:?} is not supported; only chunked is")]
    UnknownTransferCoding {
        /// The coding, cut to 40 characters.
        coding: String,
    },
    /// The app's request body stalled for `body_idle_timeout` (408), or its framing broke
    /// (400). The source is the [`AppBodyError`], or the upstream exchange it ended.
    #[error("{}", app_body_detail(.source.as_ref()))]
    RequestBody {
        /// No progress for the idle timeout, rather than broken.
        stalled: bool,
        /// What failed.
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },
    /// No route of the listener matches the request.
    #[error("no route of this listener matches the request")]
    NoRoute,
    /// No route of a forward listener names the request's host: bearerd is not an open
    /// proxy. The message names no route or host, which are the operator's to tell.
    #[error(
        "no route of this forward proxy takes this host: bearerd forwards requests to the hosts of its routes only"
    )]
    HostNotServed,
    /// A forward listener's routes name the request's host, but none takes its path: it is
    /// outside every `path_prefix` of them. Answered as [`Self::HostNotServed`] is, with a
    /// message that says which half was refused.
    #[error(
        "this forward proxy serves this host, but no route of it takes this path: on each host it forwards only the paths within a route's path_prefix"
    )]
    PathNotServed,

    /// A CONNECT to a target that is neither a routed host on its port nor a `passthrough`
    /// target: nothing is opened.
    #[error(
        "this forward proxy opens tunnels only to the hosts of its routes (port 443) and to its passthrough targets"
    )]
    TunnelRefused,
    /// A `passthrough` target could not be connected to, directly or through `[egress]`'s
    /// proxy (which refused, wanted credentials, or could not reach it): no tunnel was opened.
    #[error("cannot open a tunnel to the passthrough target {target}: {}", errors::chain(.source.as_ref()))]
    PassthroughUnreachable {
        /// `host:port`.
        target: String,
        /// Connecting took longer than its timeout (504 rather than 502).
        timed_out: bool,
        /// What failed: the dialer's error, the proxy's answer among its causes.
        source: Box<dyn Error + Send + Sync>,
    },
    /// A request inside an intercepted tunnel names another host than the CONNECT did
    /// (RFC 9110 §15.5.20: 421).
    #[error("this connection is a tunnel to {target}: send requests for other hosts through a tunnel of their own")]
    Misdirected {
        /// The CONNECT's target.
        target: String,
    },

    /// The upstream could not be reached: DNS, TCP connect, TLS or HTTP handshake.
    #[error("{}", errors::chain(.source))]
    UpstreamUnreachable {
        /// What failed.
        #[source]
        source: ConnectError,
    },
    /// Connecting to the upstream took longer than `connect_timeout`.
    #[error("{}", errors::chain(.source))]
    ConnectTimeout {
        /// The connector's timeout error.
        #[source]
        source: ConnectError,
    },
    /// The upstream sent no response headers within `response_header_timeout`.
    #[error("no response headers from {authority} within {}", humantime::format_duration(*.after))]
    ResponseTimeout {
        /// The upstream's authority.
        authority: String,
        /// The timeout that passed.
        after: Duration,
    },
    /// A gRPC call to a route whose upstream speaks HTTP/1.1 only: gRPC needs HTTP/2.
    #[error("the upstream {authority} speaks HTTP/1.1 on this route and gRPC needs HTTP/2: for a plain-text gRPC server set protocol = \"h2c\" on the route")]
    NeedsHttp2 {
        /// The upstream's authority.
        authority: String,
    },
    /// The upstream answered an HTTP/2 app's WebSocket (RFC 8441) with a success that is not
    /// a switch: on the app's stream a 2xx would say the tunnel is open.
    #[error("the upstream {authority} answered {status} to the WebSocket handshake instead of switching protocols (101)")]
    NotSwitched {
        /// The upstream's authority.
        authority: String,
        /// What it answered.
        status: StatusCode,
    },
    /// The upstream broke the exchange (reset, malformed response).
    #[error("{}", errors::chain(.source))]
    UpstreamFailed {
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },

    /// The listener already holds `max_connections`.
    #[error("bearerd holds its maximum number of connections on this listener")]
    ListenerFull,
    /// bearerd failed at its own work (a DPoP proof it could not sign).
    #[error("{reason}")]
    Internal {
        /// Why, in bearerd's words.
        reason: String,
    },
}

/// Whose fault a [`ProxyError`] is: what an operator looks at first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// No token could be had (the token endpoint, the credentials, or the network to it).
    TokenSource,
    /// The app sent what bearerd will not forward.
    App,
    /// The upstream could not be reached, was too slow, or broke the exchange.
    Upstream,
    /// bearerd's own limits.
    Bearerd,
}

impl ProxyError {
    /// Classifies a failure to connect to the upstream.
    pub(crate) fn from_connect(source: ConnectError) -> Self {
        // `ConnectError` is transparent: its own chain starts below the dial error.
        let timed_out = match &source {
            ConnectError::Dial(dial) => is_timeout(dial.as_ref()),
            ConnectError::Handshake(handshake) => is_timeout(handshake),
        };
        if timed_out {
            Self::ConnectTimeout { source }
        } else {
            Self::UpstreamUnreachable { source }
        }
    }

    /// A passthrough target that could not be connected to.
    pub(crate) fn passthrough_unreachable(
        target: String,
        source: Box<dyn Error + Send + Sync>,
    ) -> Self {
        Self::PassthroughUnreachable {
            target,
            timed_out: is_timeout(source.as_ref()),
            source,
        }
    }

    /// Classifies a failed exchange: the app's fault when its body failed (it stalled, or its
    /// framing broke), else the upstream's.
    pub(crate) fn from_send(source: hyper::Error) -> Self {
        match AppBodyError::find(&source) {
            Some(found) => Self::RequestBody {
                stalled: matches!(found, AppBodyError::Stalled(_)),
                source: Box::new(source),
            },
            None => Self::UpstreamFailed { source },
        }
    }

    /// The app's body failed before anything was sent.
    pub(crate) fn from_app_body(source: AppBodyError) -> Self {
        Self::RequestBody {
            stalled: matches!(source, AppBodyError::Stalled(_)),
            source: Box::new(source),
        }
    }

    /// Whose fault it is.
    pub(crate) fn fault(&self) -> Fault {
        match self {
            Self::TokenUnavailable(_) => Fault::TokenSource,
            Self::SubjectMissing { .. }
            | Self::SubjectRejected { .. }
            | Self::BadRequest { .. }
            | Self::MethodNotAllowed { .. }
            | Self::UnknownTransferCoding { .. }
            | Self::RequestBody { .. }
            | Self::NoRoute
            | Self::HostNotServed
            | Self::PathNotServed
            | Self::TunnelRefused
            | Self::Misdirected { .. } => Fault::App,
            Self::UpstreamUnreachable { .. }
            | Self::ConnectTimeout { .. }
            | Self::ResponseTimeout { .. }
            | Self::NeedsHttp2 { .. }
            | Self::NotSwitched { .. }
            | Self::PassthroughUnreachable { .. }
            | Self::UpstreamFailed { .. } => Fault::Upstream,
            Self::ListenerFull | Self::Internal { .. } => Fault::Bearerd,
        }
    }

    /// The status the app receives.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::TokenUnavailable(_) | Self::ListenerFull => StatusCode::SERVICE_UNAVAILABLE,
            Self::SubjectMissing { .. } | Self::SubjectRejected { .. } => StatusCode::UNAUTHORIZED,
            Self::BadRequest { .. } | Self::RequestBody { stalled: false, .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::RequestBody { stalled: true, .. } => StatusCode::REQUEST_TIMEOUT,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnknownTransferCoding { .. } => StatusCode::NOT_IMPLEMENTED,
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::HostNotServed | Self::PathNotServed | Self::TunnelRefused => {
                StatusCode::FORBIDDEN
            }
            Self::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            Self::UpstreamUnreachable { .. }
            | Self::UpstreamFailed { .. }
            | Self::NotSwitched { .. }
            | Self::PassthroughUnreachable {
                timed_out: false, ..
            }
            | Self::NeedsHttp2 { .. } => StatusCode::BAD_GATEWAY,
            Self::ConnectTimeout { .. }
            | Self::ResponseTimeout { .. }
            | Self::PassthroughUnreachable {
                timed_out: true, ..
            } => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error` field of the JSON body: stable, for apps to match on.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Self::TokenUnavailable(_) => "token_unavailable",
            Self::SubjectMissing { .. } => "subject_token_missing",
            Self::SubjectRejected { .. } => "subject_token_rejected",
            Self::BadRequest { .. } | Self::RequestBody { stalled: false, .. } => "bad_request",
            Self::RequestBody { stalled: true, .. } => "request_body_timeout",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::UnknownTransferCoding { .. } => "not_implemented",
            Self::NoRoute => "no_route",
            Self::HostNotServed | Self::PathNotServed => "host_not_served",
            Self::TunnelRefused => "tunnel_refused",
            Self::Misdirected { .. } => "misdirected_request",
            Self::PassthroughUnreachable { .. } => "passthrough_unreachable",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::ConnectTimeout { .. } | Self::ResponseTimeout { .. } => "upstream_timeout",
            Self::UpstreamFailed { .. } | Self::NotSwitched { .. } => "upstream_failed",
            Self::NeedsHttp2 { .. } => "upstream_needs_h2c",
            Self::ListenerFull => "too_many_connections",
            Self::Internal { .. } => "internal_error",
        }
    }

    /// The answer to the app: `{"error","upstream","detail"}` with the matching status,
    /// `Retry-After` when waiting helps, and `Connection: close` when the connection cannot
    /// carry another request.
    pub(crate) fn into_response(self, upstream: &str) -> Response<ResponseBody> {
        let (status, headers, body) = self.answer(upstream);
        let mut response = Response::new(Either::Right(Full::new(body)));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }

    /// [`Self::into_response`], or for a gRPC call the same failure as gRPC status
    /// ([`super::grpc`]).
    pub(crate) fn into_response_for(self, upstream: &str, grpc: bool) -> Response<ResponseBody> {
        if grpc {
            super::grpc::error_response(&self, upstream)
        } else {
            self.into_response(upstream)
        }
    }

    /// The same answer as raw HTTP/1.1 bytes, for a connection refused before hyper serves it.
    pub(crate) fn into_http1_bytes(self, upstream: &str) -> Vec<u8> {
        let (status, headers, body) = self.answer(upstream);
        let mut out = format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_str(),
            status.canonical_reason().unwrap_or("")
        )
        .into_bytes();
        for (name, value) in &headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("{CONTENT_LENGTH}: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn answer(self, upstream: &str) -> (StatusCode, HeaderMap, Bytes) {
        let detail = self.to_string();
        let body = serde_json::json!({
            "error": self.code(),
            "upstream": upstream,
            "detail": detail,
        });
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match &self {
            Self::TokenUnavailable(unavailable) => {
                headers.insert(RETRY_AFTER, retry_after_seconds(unavailable.retry_after));
            }
            // RFC 9110 §11.6.1: a 401 says how to authenticate; RFC 6750 §3.1 the error.
            Self::SubjectMissing { .. } => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::SubjectRejected { .. } => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            // RFC 9110 §15.5.6: a 405 says which methods are allowed. Any other method is
            // forwarded, so these stand for "the usual ones".
            Self::MethodNotAllowed { .. } => {
                headers.insert(
                    ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            // The rest of the app's body was not read: the connection cannot carry another
            // request.
            Self::BadRequest { .. }
            | Self::UnknownTransferCoding { .. }
            | Self::RequestBody { .. } => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Self::ListenerFull => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        (self.status(), headers, Bytes::from(body.to_string()))
    }
}

impl From<Refusal> for ProxyError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Missing(reason) => Self::SubjectMissing { reason },
            Refusal::Rejected(detail) => Self::SubjectRejected { detail },
            Refusal::Unavailable(unavailable) => Self::TokenUnavailable(unavailable),
        }
    }
}

/// What the app is told of its body's failure: the [`AppBodyError`] in the chain, with its
/// causes when the framing broke.
fn app_body_detail(error: &(dyn Error + 'static)) -> String {
    match AppBodyError::find(error) {
        Some(found @ AppBodyError::Stalled(_)) => found.to_string(),
        Some(found) => errors::chain(found),
        None => errors::chain(error),
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

    fn dial_error(kind: std::io::ErrorKind) -> ConnectError {
        ConnectError::Dial(Box::new(std::io::Error::new(kind, "dial failed")))
    }

    #[test]
    fn statuses_and_faults() {
        let refused = ProxyError::from_connect(dial_error(std::io::ErrorKind::ConnectionRefused));
        let slow = ProxyError::from_connect(dial_error(std::io::ErrorKind::TimedOut));
        let cases = [
            (refused, 502, "upstream_unreachable", Fault::Upstream),
            (slow, 504, "upstream_timeout", Fault::Upstream),
            (
                ProxyError::ResponseTimeout {
                    authority: "api.example.com".into(),
                    after: Duration::from_secs(30),
                },
                504,
                "upstream_timeout",
                Fault::Upstream,
            ),
            (
                ProxyError::BadRequest { reason: "x".into() },
                400,
                "bad_request",
                Fault::App,
            ),
            (
                ProxyError::MethodNotAllowed { reason: "x" },
                405,
                "method_not_allowed",
                Fault::App,
            ),
            (
                ProxyError::UnknownTransferCoding {
                    coding: "gzip".into(),
                },
                501,
                "not_implemented",
                Fault::App,
            ),
            (
                ProxyError::from_app_body(AppBodyError::Stalled(Duration::from_secs(30))),
                408,
                "request_body_timeout",
                Fault::App,
            ),
            (ProxyError::NoRoute, 404, "no_route", Fault::App),
            (
                ProxyError::ListenerFull,
                503,
                "too_many_connections",
                Fault::Bearerd,
            ),
        ];
        for (error, status, code, fault) in cases {
            assert_eq!(
                (error.status().as_u16(), error.code(), error.fault()),
                (status, code, fault),
                "{error:?}"
            );
        }
        assert_eq!(retry_after_seconds(Duration::ZERO), "1");
        assert_eq!(retry_after_seconds(Duration::from_secs(30)), "30");
    }

    #[test]
    fn errors_keep_their_cause() {
        let error = ProxyError::from_connect(dial_error(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(error.to_string(), "dial failed");
        assert!(error.source().is_some());
        let stalled = ProxyError::from_app_body(AppBodyError::Stalled(Duration::from_secs(30)));
        assert_eq!(
            stalled.to_string(),
            "the request body made no progress for 30s"
        );
        assert!(stalled
            .source()
            .is_some_and(|cause| cause.downcast_ref::<AppBodyError>().is_some()));
    }

    #[test]
    fn a_refused_path_is_not_said_to_be_an_unknown_host() {
        let detail = ProxyError::PathNotServed.to_string();
        assert!(
            detail.contains("serves this host") && detail.contains("path_prefix"),
            "{detail}"
        );
        assert_eq!(ProxyError::PathNotServed.status(), StatusCode::FORBIDDEN);
        assert_eq!(ProxyError::PathNotServed.code(), "host_not_served");
        let detail = ProxyError::HostNotServed.to_string();
        assert!(detail.contains("takes this host"), "{detail}");
    }

    #[test]
    fn a_full_listener_answers_in_raw_http1() {
        let bytes = ProxyError::ListenerFull.into_http1_bytes("payments");
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        for line in [
            "content-type: application/json",
            "retry-after: 1",
            "connection: close",
            &format!("content-length: {}", body.len()),
        ] {
            assert!(head.contains(line), "{line} in {head}");
        }
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "too_many_connections");
        assert_eq!(json["upstream"], "payments");
    }
}
