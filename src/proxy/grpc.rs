//! gRPC over bearerd: telling a gRPC request apart, its deadline, and bearerd's own failures
//! in the form a gRPC client reads.
//!
//! A gRPC client reads a call's outcome from `grpc-status` and `grpc-message`, not from the
//! HTTP status: a JSON 503 is "an HTTP error" to it, with the detail lost. So when bearerd
//! itself cannot serve a gRPC request it answers as a gRPC server would, with a
//! Trailers-Only response (gRPC over HTTP/2, "Responses"): HTTP 200, `content-type:
//! application/grpc`, and the status in the one header block, which ends the stream.

use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::body::ResponseBody;
use super::error::ProxyError;

/// Whether a request is a gRPC call: its `content-type` is `application/grpc`, alone or with
/// a `+format` or `;parameters` after it.
pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|value| {
        let value = value.as_bytes();
        let Some(rest) = value.strip_prefix(b"application/grpc") else {
            return false;
        };
        matches!(rest.first(), None | Some(b'+' | b';'))
    })
}

/// The call's deadline from its `grpc-timeout` header: `1*8DIGIT` and a unit, `H` `M` `S`
/// `m` `u` `n`. `None` when absent or malformed (the call then has no deadline of its own).
pub(super) fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.as_bytes();
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount.saturating_mul(3600)),
        b'M' => Duration::from_secs(amount.saturating_mul(60)),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// gRPC status codes (grpc/doc/statuscodes.md) bearerd answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Code {
    Unknown = 2,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Internal = 13,
    Unimplemented = 12,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl Code {
    /// The code of bearerd's own failure: the cases the gRPC clients of a sidecar need told
    /// apart, then gRPC's mapping of the HTTP status bearerd would have answered
    /// (grpc/doc/http-grpc-status-mapping.md).
    pub(super) fn of(error: &ProxyError) -> Self {
        match error {
            ProxyError::TokenUnavailable(_)
            | ProxyError::UpstreamUnreachable { .. }
            | ProxyError::UpstreamFailed { .. }
            | ProxyError::NotSwitched { .. }
            | ProxyError::NeedsHttp2 { .. } => Self::Unavailable,
            ProxyError::ConnectTimeout { .. } | ProxyError::ResponseTimeout { .. } => {
                Self::DeadlineExceeded
            }
            ProxyError::HostNotServed | ProxyError::PathNotServed => Self::PermissionDenied,
            ProxyError::NoRoute => Self::Unimplemented,
            ProxyError::ListenerFull => Self::ResourceExhausted,
            other => Self::of_status(other.status()),
        }
    }

    /// gRPC's mapping of an HTTP status a server answered without a `grpc-status`.
    fn of_status(status: StatusCode) -> Self {
        match status.as_u16() {
            400 => Self::Internal,
            401 => Self::Unauthenticated,
            403 => Self::PermissionDenied,
            404 => Self::Unimplemented,
            429 | 502 | 503 | 504 => Self::Unavailable,
            _ => Self::Unknown,
        }
    }
}

/// bearerd's failure as a gRPC Trailers-Only response: HTTP 200 with `grpc-status` and a
/// `grpc-message` that says what the JSON body says to other apps (its `error` code, the
/// route and the detail), percent-encoded as the gRPC spec wants it.
pub(super) fn error_response(error: &ProxyError, upstream: &str) -> Response<ResponseBody> {
    let code = Code::of(error);
    let message = format!("bearerd {} ({upstream}): {error}", error.code());
    let mut response = Response::new(Either::Right(Full::default()));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(u16::from(code as u8)));
    if let Ok(value) = HeaderValue::from_str(&percent_encode(&message)) {
        headers.insert("grpc-message", value);
    }
    response
}

/// `grpc-message` encoding: bytes outside printable ASCII, and `%` itself, as `%XX`.
fn percent_encode(message: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: &'static str, value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn grpc_content_types_are_told_apart() {
        for yes in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;charset=utf-8",
        ] {
            assert!(is_grpc(&with("content-type", yes)), "{yes}");
        }
        for no in [
            "application/grpc-web",
            "application/json",
            "application/grpcx",
        ] {
            assert!(!is_grpc(&with("content-type", no)), "{no}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn grpc_timeouts_in_every_unit_and_malformed_ones_ignored() {
        let timeout_of = |value| timeout(&with("grpc-timeout", value));
        assert_eq!(timeout_of("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout_of("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout_of("10S"), Some(Duration::from_secs(10)));
        assert_eq!(timeout_of("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            timeout_of("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(timeout_of("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "123456789S", "10s", "-1S", "1.5S", "10"] {
            assert_eq!(timeout_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(
            percent_encode("no token: 100% é"),
            "no token: 100%25 %C3%A9"
        );
        assert_eq!(percent_encode("a\nb"), "a%0Ab");
    }

    #[test]
    fn bearerd_failures_map_to_the_codes_a_grpc_client_needs() {
        assert_eq!(Code::of(&ProxyError::NoRoute), Code::Unimplemented);
        assert_eq!(Code::of(&ProxyError::HostNotServed), Code::PermissionDenied);
        assert_eq!(Code::of(&ProxyError::PathNotServed), Code::PermissionDenied);
        let timeout = ProxyError::ResponseTimeout {
            authority: "grpc.internal".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(Code::of(&timeout), Code::DeadlineExceeded);
        let needs = ProxyError::NeedsHttp2 {
            authority: "grpc.internal".into(),
        };
        assert_eq!(Code::of(&needs), Code::Unavailable);
        let bad = ProxyError::BadRequest { reason: "x".into() };
        assert_eq!(Code::of(&bad), Code::Internal);
        let method = ProxyError::MethodNotAllowed { reason: "x" };
        assert_eq!(Code::of(&method), Code::Unknown);
        assert_eq!(
            Code::of_status(StatusCode::UNAUTHORIZED),
            Code::Unauthenticated
        );
    }

    #[test]
    fn an_error_response_is_trailers_only_with_status_and_message() {
        let response = error_response(&ProxyError::NoRoute, "payments");
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(headers["grpc-status"], "12");
        let message = headers["grpc-message"].to_str().unwrap();
        assert!(
            message.starts_with("bearerd no_route (payments): no route of this listener"),
            "{message}"
        );
        assert!(http_body::Body::is_end_stream(response.body()));
    }
}
