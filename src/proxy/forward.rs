//! Forwarding one request: token first, then rewrite, send, and stream the answer back.

use http::header::{AUTHORIZATION, EXPECT, HOST};
use http::{Request, Response, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::error::ProxyError;
use super::rewrite::strip_hop_by_hop;
use super::{ResponseBody, Upstream};

/// Forwards `request` to `upstream`, answering with the upstream's response or an error JSON.
pub async fn forward(upstream: &Upstream, request: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    let _in_flight = upstream.metrics.request_started();
    // Kept for the access log only; the query is never logged (it may hold credentials).
    let logged = upstream
        .access_log
        .then(|| (request.method().clone(), request.uri().path().to_owned()));
    let response = match try_forward(upstream, request).await {
        Ok(response) => response,
        Err(error) => {
            if let ProxyError::TokenUnavailable(_) = error {
                upstream.metrics.token_unavailable();
            } else {
                tracing::warn!(
                    upstream = %upstream.name,
                    error = error.code(),
                    detail = error.detail(),
                    "request failed"
                );
            }
            error.into_response(&upstream.name)
        }
    };
    let elapsed = started.elapsed();
    upstream
        .metrics
        .request_answered(response.status(), elapsed);
    if let Some((method, path)) = logged {
        tracing::info!(
            target: "bearerd::access",
            upstream = %upstream.name,
            method = %method,
            path = %path,
            status = response.status().as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
    response
}

async fn try_forward(
    upstream: &Upstream,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ProxyError> {
    // The token comes first: without one the request never leaves bearerd.
    let token = upstream
        .token
        .token()
        .await
        .map_err(ProxyError::TokenUnavailable)?;

    let (mut parts, body) = request.into_parts();
    parts.uri = upstream
        .target
        .uri_for(&parts.uri)
        .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    strip_hop_by_hop(&mut parts.headers);
    // The client sets Host (HTTP/1.1) or :authority (HTTP/2) from the URI, i.e. the upstream.
    parts.headers.remove(HOST);
    // hyper already answered `100 Continue` to the app when the body was first read.
    parts.headers.remove(EXPECT);
    // Whatever the app sent is replaced: the upstream sees bearerd's token only.
    parts
        .headers
        .insert(AUTHORIZATION, token.authorization().clone());
    // The client picks HTTP/1.1 or HTTP/2 by ALPN; the app's version does not constrain it.
    parts.version = Version::HTTP_11;

    let sent = upstream.client.request(Request::from_parts(parts, body));
    let response = tokio::time::timeout(upstream.response_header_timeout, sent)
        .await
        .map_err(|_| {
            ProxyError::UpstreamTimeout(format!(
                "no response headers from {} within {}",
                upstream.target.authority(),
                humantime::format_duration(upstream.response_header_timeout)
            ))
        })?
        .map_err(|e| ProxyError::from_client(&e))?;

    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(parts, Either::Left(body)))
}
