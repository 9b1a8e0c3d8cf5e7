//! Forwarding one request: refuse what must never carry the token, then take the token,
//! rewrite, send, and stream the answer back; once more with a new token if the upstream
//! answers 401 and the request can be replayed.

use bytes::Bytes;
use http::header::{EXPECT, HOST, TE, TRANSFER_ENCODING};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use std::future::Future;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

use tokio::time::Instant;

use super::body::{AppBody, ReplayBudget, RequestBody, ResponseBody};
use super::connection::Activity;
use super::error::ProxyError;
use super::grpc;
use super::pool::{SendError, Slot};
use super::rewrite::{remove_hop_by_hop, strip_hop_by_hop, strip_prefix, Carried};
use super::route::{Listener, Route};
use super::upgrade;
use crate::config::Mode;
use crate::telemetry::{Attempt, RequestTrace};
use crate::token::on_behalf::{OnBehalf, Refusal};
use crate::token::Token;

/// Request bodies up to this size (by `Content-Length`) are kept, so that a request the
/// upstream answers 401 can be sent again with a new token. Larger or chunked bodies are
/// streamed and their 401 passed back.
pub(super) const REPLAY_BODY_LIMIT: u64 = 64 * 1024;

/// The route of `listener` that `request` goes to, after refusing the methods that must never
/// carry a token (before any route is looked at: a forward proxy names the same refusal for
/// every host).
pub(super) fn route<'a, B>(
    listener: &'a Listener,
    request: &Request<B>,
) -> Result<&'a std::sync::Arc<Route>, ProxyError> {
    refuse_method(request.method())?;
    listener.routes.choose(request, listener.mode)
}

/// The answer to a request refused before a route was chosen.
pub(super) fn unrouted<B>(
    listener: &Listener,
    request: &Request<B>,
    error: ProxyError,
) -> Response<ResponseBody> {
    log_error(&listener.name, &error, "request refused");
    let response = error.into_response_for(&listener.name, is_grpc(request));
    listener
        .metrics
        .request_answered(response.status(), std::time::Duration::ZERO);
    if listener.access_log {
        log_access(
            &listener.name,
            request.method(),
            request.uri().path(),
            response.status(),
            std::time::Duration::ZERO,
            intercepted(request),
        );
    }
    response
}

/// Whether `request` came through an intercepted tunnel (looked up for the access log only).
fn intercepted<B>(request: &Request<B>) -> bool {
    request
        .extensions()
        .get::<super::intercept::tunnel::Intercepted>()
        .is_some()
}

/// The app connection a request came on: its hold on an upstream connection, and its
/// watchdog's view of it, which keeps the response header timeout of an HTTP/1.1
/// connection's one request in flight. (The streams of an HTTP/2 connection are many at once:
/// each holds a slot of its own and keeps its own timer.)
#[derive(Clone, Copy)]
pub(super) struct Connection<'a> {
    pub slot: &'a Slot,
    pub activity: Option<&'a Activity>,
    /// The request's trace, with `[telemetry]` (set by [`forward`]).
    pub trace: Option<&'a RequestTrace<'a>>,
}

/// Whether `request` is a gRPC call, whose failures bearerd answers in gRPC's terms. gRPC is
/// HTTP/2 only, so an HTTP/1.1 request is not looked at further.
fn is_grpc<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_2 && grpc::is_grpc(request.headers())
}

/// Forwards `request` to `upstream`, answering with the upstream's response or an error JSON.
pub(super) async fn forward(
    upstream: &Route,
    mode: Mode,
    on: Connection<'_>,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let _in_flight = upstream.metrics.request_started();
    // Kept for the access log only; the query is never logged (it may hold credentials).
    let logged = upstream.access_log.then(|| {
        (
            request.method().clone(),
            request.uri().path().to_owned(),
            intercepted(&request),
        )
    });
    let grpc = is_grpc(&request);
    // `[telemetry]` on: the request's server span, which its attempts are children of.
    let trace = upstream
        .telemetry
        .as_ref()
        .map(|telemetry| telemetry.request(&upstream.name, upstream.target.authority(), &request));
    let on = Connection {
        trace: trace.as_ref(),
        ..on
    };
    let response = match try_forward(upstream, mode, on, request, grpc).await {
        Ok(response) => response,
        Err(error) => {
            if let ProxyError::TokenUnavailable(_) = error {
                upstream.metrics.token_unavailable();
            } else {
                log_error(&upstream.name, &error, "request failed");
            }
            error.into_response_for(&upstream.name, grpc)
        }
    };
    if let Some(trace) = trace {
        trace.finish(response.status());
    }
    let elapsed = started.elapsed();
    upstream
        .metrics
        .request_answered(response.status(), elapsed);
    if let Some((method, path, intercepted)) = logged {
        log_access(
            &upstream.name,
            &method,
            &path,
            response.status(),
            elapsed,
            intercepted,
        );
    }
    response
}

/// The warning of a request bearerd answered with an error of its own, `what` saying whether
/// it was refused or failed. (A missing token is counted instead: it would repeat for every
/// request while the source is down.)
fn log_error(name: &str, error: &ProxyError, what: &'static str) {
    tracing::warn!(
        upstream = %name,
        error = error.code(),
        fault = ?error.fault(),
        detail = %error,
        "{what}"
    );
}

/// The access log's line of a request; its query is never logged (it may hold credentials).
/// `intercepted` marks a request that came through a TLS tunnel bearerd terminated.
fn log_access(
    name: &str,
    method: &Method,
    path: &str,
    status: StatusCode,
    elapsed: Duration,
    intercepted: bool,
) {
    // The field only on intercepted requests: the usual line stays as it was.
    if intercepted {
        tracing::info!(
            target: "bearerd::access",
            upstream = %name,
            method = %method,
            path = %path,
            status = status.as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            intercepted = true,
            "request"
        );
        return;
    }
    tracing::info!(
        target: "bearerd::access",
        upstream = %name,
        method = %method,
        path = %path,
        status = status.as_u16(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
}

async fn try_forward(
    upstream: &Route,
    mode: Mode,
    on: Connection<'_>,
    mut request: Request<Incoming>,
    grpc: bool,
) -> Result<Response<ResponseBody>, ProxyError> {
    let carried = Carried::of(request.headers());
    refuse_unforwardable(upstream, mode, &request, carried)?;
    // A gRPC call's own deadline bounds the wait for the upstream's answer too.
    let deadline = match grpc.then(|| grpc::timeout(request.headers())).flatten() {
        Some(call) => call.min(upstream.response_header_timeout),
        None => upstream.response_header_timeout,
    };
    // The token comes next: without one the request never leaves bearerd. An on-behalf-of
    // route's comes from the subject the request carries, whose header is taken out here, on
    // the way every request goes (HTTP/1.1, HTTP/2, an upgrade's handshake, an intercepted
    // tunnel's requests): it never goes upstream.
    let token = match upstream.credential.on_behalf() {
        None => in_trace(on.trace, std::pin::pin!(upstream.credential.token()))
            .await
            .map_err(ProxyError::TokenUnavailable)?,
        Some(on_behalf) => in_trace(on.trace, exchange(on_behalf, request.headers_mut())).await?,
    };

    let (mut parts, body) = request.into_parts();
    let uri = std::mem::take(&mut parts.uri);
    let uri = match upstream.matching.path_prefix.as_deref() {
        Some(prefix) if upstream.matching.strip_prefix => strip_prefix(uri, prefix),
        _ => uri,
    };
    let path_and_query =
        upstream
            .target
            .path_and_query_for(uri)
            .map_err(|e| ProxyError::BadRequest {
                reason: e.to_string(),
            })?;
    // An `Upgrade` the route lets through takes another way (`upgrade`); found only on the
    // way that removes hop-by-hop headers, so a plain request pays nothing for it.
    let upgrade = if carried.hop_by_hop {
        remove_hop_by_hop(&mut parts.headers)
    } else {
        None
    };
    if let Some(protocols) = upgrade {
        if let Some(app_side) = upgrade::accepted(upstream, &protocols, &mut parts)? {
            let to = upgrade::Handshake {
                upstream,
                path_and_query: &path_and_query,
                deadline,
                activity: on.activity,
                trace: on.trace,
            };
            return upgrade::start(to, parts, body, token, protocols, app_side).await;
        }
    }
    if grpc {
        // `te: trailers` is the one TE value HTTP/2 allows (RFC 9113 §8.2.2), and gRPC servers
        // require it: it says the client reads trailers, which bearerd passes on.
        parts
            .headers
            .insert(TE, HeaderValue::from_static("trailers"));
    }
    // hyper already answered `100 Continue` to the app when the body was first read.
    if carried.expect {
        parts.headers.remove(EXPECT);
    }
    // The app's version does not constrain the upstream's, which ALPN chose.
    parts.version = Version::HTTP_11;
    let to = Destination {
        upstream,
        on,
        path_and_query: &path_and_query,
        deadline,
        grpc,
    };

    let body = AppBody::new(body, upstream.body_idle_timeout);
    let body = if upstream.retry_on_401 {
        keep_if_small(body, &upstream.replay_budget).await?
    } else {
        Err(body)
    };
    // The reservation in the replay budget is held until the replay is no longer possible.
    let (kept, _reserved) = match body {
        Ok(kept) => kept,
        Err(streamed) => {
            let response = to.send(parts, &token, Either::Left(streamed)).await?;
            if upstream.retry_on_401
                && response.status() == StatusCode::UNAUTHORIZED
                && !upstream.credential.wants_new_proof(response.headers())
            {
                // Too large to replay, but the next requests should get a new token.
                upstream.credential.reject(&token);
            }
            return Ok(to_app(response));
        }
    };

    // The body is kept, so the request can be sent again if the upstream rejects the token.
    // The head goes out as hyper parsed it, with room for the headers `send` adds; what a
    // replay needs of it is kept aside, and made into a head only for a replay.
    let kept_head = KeptHead::of(&parts, upstream.credential.header());
    let mut first = to.send(parts, &token, full(&kept)).await?;
    if first.status() != StatusCode::UNAUTHORIZED {
        return Ok(to_app(first));
    }
    // RFC 9449 §9: the upstream wants a (newer) nonce in the proof, not another token.
    if upstream.credential.wants_new_proof(first.headers()) {
        upstream.credential.count_proof_retry();
        drop(first);
        first = to.send(kept_head.parts(), &token, full(&kept)).await?;
        if first.status() != StatusCode::UNAUTHORIZED {
            return Ok(to_app(first));
        }
    }
    match upstream.credential.replacement_for(&token).await {
        Ok(replacement) => {
            upstream.metrics.unauthorized_retry();
            drop(first);
            let second = to
                .send(kept_head.parts(), &replacement, full(&kept))
                .await?;
            Ok(to_app(second))
        }
        // No new token: the upstream's own 401 is the truest answer.
        Err(_) => Ok(to_app(first)),
    }
}

/// Polls `waiting` (a wait for a token) with the request's trace context attached, so that a
/// wait on a fetch links the request's span to it. Attached around each poll, from the one
/// place the token's future is polled: wrapped in opentelemetry's `WithContext` for traced
/// requests only, the future had a second caller and was no longer inlined (callgrind: about
/// +70 instructions per request with traces off).
fn in_trace<'a, F: Future + Unpin + 'a>(
    trace: Option<&'a RequestTrace<'a>>,
    mut waiting: F,
) -> impl Future<Output = F::Output> + 'a {
    std::future::poll_fn(move |cx| {
        let _attached = trace.map(|trace| trace.context().clone().attach());
        std::pin::Pin::new(&mut waiting).poll(cx)
    })
}

/// An on-behalf-of route's token: the subject taken out of `headers` and exchanged (or found).
/// Boxed here, outside `try_forward`, as `upgrade::start` is: the exchange's future is large,
/// and made in `try_forward`'s own body it would cost every request a copy.
#[inline(never)]
fn exchange<'a>(
    on_behalf: &'a OnBehalf,
    headers: &'a mut http::HeaderMap,
) -> std::pin::Pin<Box<dyn Future<Output = Result<std::sync::Arc<Token>, Refusal>> + Send + 'a>> {
    Box::pin(on_behalf.token_for(headers))
}

/// Refuses the methods that must never carry a token. Method names are case-sensitive
/// (RFC 9110 §9.1), so hyper gives `trace` or `Connect` as extension methods, not as
/// [`Method::TRACE`]; but some servers match them ignoring case, so they are refused so too.
fn refuse_method(method: &Method) -> Result<(), ProxyError> {
    // Standard names are static strings, and `eq_ignore_ascii_case` compares lengths first:
    // a GET costs three length checks.
    let name = method.as_str();
    if name.eq_ignore_ascii_case("TRACE") {
        // RFC 9110 §9.3.8: the upstream echoes the request back, Authorization included.
        return Err(ProxyError::MethodNotAllowed {
            reason: "TRACE is not forwarded: the upstream would echo the request, token included, back to the caller",
        });
    }
    if name.eq_ignore_ascii_case("TRACK") {
        // IIS's TRACE, by another name.
        return Err(ProxyError::MethodNotAllowed {
            reason: "TRACK is not forwarded: like TRACE, the upstream would echo the request, token included, back to the caller",
        });
    }
    if name.eq_ignore_ascii_case("CONNECT") {
        return Err(ProxyError::MethodNotAllowed {
            reason: "CONNECT is not supported: a TLS tunnel cannot carry an injected token; send plain http:// requests to bearerd, which speaks https to the upstream",
        });
    }
    Ok(())
}

/// Refuses, before any token is taken, the requests that must never carry one.
fn refuse_unforwardable(
    upstream: &Route,
    mode: Mode,
    request: &Request<Incoming>,
    carried: Carried,
) -> Result<(), ProxyError> {
    // An absolute-form target (what an app whose HTTP_PROXY points here sends) names the host
    // the app means: forwarding it to this listener's upstream would hand our token to a
    // request meant for someone else, or send it where the app did not mean.
    // (A forward listener, or a route with a host of its own, was chosen by that very host.)
    let chosen_by_host = mode == Mode::Forward || upstream.matching.host.is_some();
    if let (Some(authority), false) = (request.uri().authority(), chosen_by_host) {
        if !upstream.target.serves(authority) {
            return Err(ProxyError::BadRequest {
                reason: format!(
                    "this listener forwards to {} only, and the request names another host",
                    upstream.target.authority()
                ),
            });
        }
    }
    // hyper has framed the body by `chunked`; any other coding would reach the upstream still
    // applied and no longer announced (the header is hop-by-hop). RFC 9112 §6.1: 501.
    if !carried.transfer_encoding {
        return Ok(());
    }
    for value in request.headers().get_all(TRANSFER_ENCODING) {
        let codings = value.to_str().unwrap_or("(not text)");
        if let Some(unknown) = codings
            .split(',')
            .map(|coding| coding.split(';').next().unwrap_or_default().trim())
            .find(|coding| !coding.eq_ignore_ascii_case("chunked"))
        {
            return Err(ProxyError::UnknownTransferCoding {
                coding: unknown.chars().take(40).collect(),
            });
        }
    }
    Ok(())
}

/// Where a request goes: the upstream, from which app connection, and the path and query
/// there; how long it may wait for the answer's head, and whether it needs HTTP/2 (gRPC).
struct Destination<'a> {
    upstream: &'a Route,
    on: Connection<'a>,
    path_and_query: &'a PathAndQuery,
    deadline: Duration,
    grpc: bool,
}

/// Gives one attempt its credential (and DPoP proof) and, with `[telemetry]`, its client span
/// and `traceparent`: whatever the app sent is replaced, the upstream sees bearerd's
/// credential only. Shared by every request and the upgrade handshake (`upgrade::send`);
/// inlined, as the body was before it was shared (callgrind: about +26 instructions per
/// request when it was called instead, which `#[inline]` alone did not prevent).
#[inline(always)]
pub(super) fn authorize_attempt(
    upstream: &Route,
    parts: &mut Parts,
    token: &Token,
    path_and_query: &PathAndQuery,
    trace: Option<&RequestTrace<'_>>,
) -> Result<Option<Attempt>, ProxyError> {
    upstream
        .credential
        .authorize(&mut parts.headers, token, &parts.method, || {
            upstream.target.htu(path_and_query)
        })
        .map_err(|e| ProxyError::Internal {
            reason: e.to_string(),
        })?;
    Ok(trace.map(|trace| {
        trace.attempt(
            &mut parts.headers,
            &parts.method,
            upstream.target.authority(),
            || upstream.target.htu(path_and_query),
        )
    }))
}

impl Destination<'_> {
    /// Sends the request with `token` on the app connection's upstream connection (taking one
    /// first if it has none), bounded by the response header timeout.
    async fn send(
        &self,
        mut parts: Parts,
        token: &Token,
        body: RequestBody,
    ) -> Result<Response<Incoming>, ProxyError> {
        let upstream = self.upstream;
        let attempt = authorize_attempt(
            upstream,
            &mut parts,
            token,
            self.path_and_query,
            self.on.trace,
        )?;
        let exchange = std::pin::pin!(async {
            // Connecting is rare and its future is large (TCP, TLS, HTTP handshake): boxed, it
            // stays out of the future of every request, which hyper moves into place whole.
            let mut sender = match self.on.slot.take(&upstream.pool) {
                Some(sender) => sender,
                None => Box::pin(upstream.pool.acquire())
                    .await
                    .map_err(ProxyError::from_connect)?,
            };
            if self.grpc && !sender.is_http2() {
                self.on.slot.put(&upstream.pool, sender);
                return Err(ProxyError::NeedsHttp2 {
                    authority: upstream.target.authority().to_string(),
                });
            }
            let request = self.address(Request::from_parts(parts, body), sender.is_http2())?;
            let sent = match sender.send(request).await {
                // The connection was gone before the request left (an idle one the upstream
                // had closed): once more, on a new connection.
                Err(SendError::NotSent(request, _)) => {
                    sender = Box::pin(upstream.pool.connect())
                        .await
                        .map_err(ProxyError::from_connect)?;
                    let request = self.address(*request, sender.is_http2())?;
                    sender.send(request).await
                }
                other => other,
            };
            self.on.slot.put(&upstream.pool, sender);
            if let Ok(response) = &sent {
                upstream.credential.observe(response.headers());
            }
            sent.map_err(|e| match e {
                SendError::NotSent(_, error) | SendError::Failed(error) => {
                    ProxyError::from_send(error)
                }
            })
        });
        let late = || ProxyError::ResponseTimeout {
            authority: upstream.target.authority().to_string(),
            after: self.deadline,
        };
        let waited = match self.on.activity {
            Some(activity) => {
                let sent = activity.within(self.deadline, exchange).await;
                activity.expect_body(upstream.response_body_idle_timeout);
                sent.map_err(|_| late())
            }
            None => tokio::time::timeout(self.deadline, exchange)
                .await
                .map_err(|_| late()),
        };
        // Untraced, the answer is returned as it came, not held for the span.
        let Some(attempt) = attempt else {
            return waited?;
        };
        let sent = waited.and_then(|sent| sent);
        attempt.ended(
            sent.as_ref()
                .map(Response::status)
                .map_err(ProxyError::code),
        );
        sent
    }

    /// Sets the request target and `Host` as the connection's protocol wants them:
    /// origin-form and `Host` for HTTP/1.1, the absolute URI (whose authority becomes
    /// `:authority`) and no `Host` for HTTP/2.
    fn address(
        &self,
        mut request: Request<RequestBody>,
        http2: bool,
    ) -> Result<Request<RequestBody>, ProxyError> {
        let target = &self.upstream.target;
        if http2 {
            *request.uri_mut() = target.absolute(self.path_and_query.clone()).map_err(|e| {
                ProxyError::BadRequest {
                    reason: e.to_string(),
                }
            })?;
            *request.version_mut() = Version::HTTP_2;
            request.headers_mut().remove(HOST);
        } else {
            *request.uri_mut() = Uri::from(self.path_and_query.clone());
            *request.version_mut() = Version::HTTP_11;
            request.headers_mut().insert(HOST, target.host().clone());
        }
        Ok(request)
    }
}

/// A body kept whole for a replay, and its share of the replay budget.
type Kept = (Bytes, Option<OwnedSemaphorePermit>);

/// The whole body when it is empty, or at most [`REPLAY_BODY_LIMIT`] long by its declared
/// length and within the replay budget; otherwise the body untouched, to be streamed.
async fn keep_if_small(
    body: AppBody,
    budget: &ReplayBudget,
) -> Result<Result<Kept, AppBody>, ProxyError> {
    if body.is_end_stream() {
        return Ok(Ok((Bytes::new(), None)));
    }
    let Some(length) = body.size_hint().exact().filter(|&l| l <= REPLAY_BODY_LIMIT) else {
        return Ok(Err(body));
    };
    let Some(reserved) = budget.reserve(length) else {
        return Ok(Err(body));
    };
    let bytes = body.collect().await.map_err(ProxyError::from_app_body)?;
    Ok(Ok((bytes, Some(reserved))))
}

#[inline(always)] // a clone of an `Arc`: out of line (three callers) it cost about 30 instructions per request
fn full(bytes: &Bytes) -> RequestBody {
    Either::Right(Full::new(bytes.clone()))
}

/// What a replay needs of a request head: its method and its headers, but for `Host` and
/// `Authorization`, which [`Destination::send`] replaces in every request it sends. Kept as a
/// list, not a header map: most requests are never replayed, and a list costs one allocation
/// (none when the app sent only `Host`) where a map's clone costs two and its drop as many.
struct KeptHead {
    method: Method,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl KeptHead {
    /// The head of `parts`, without `Host` and the token's `header`.
    fn of(parts: &Parts, header: &http::HeaderName) -> Self {
        let mut headers = Vec::new();
        for (name, value) in &parts.headers {
            if name != HOST && name != header {
                if headers.is_empty() {
                    headers.reserve_exact(parts.headers.len());
                }
                headers.push((name.clone(), value.clone()));
            }
        }
        Self {
            method: parts.method.clone(),
            headers,
        }
    }

    /// A head to send again (its target and `Host` are set by [`Destination::send`]).
    fn parts(&self) -> Parts {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method.clone();
        parts.headers.reserve(self.headers.len() + 3);
        for (name, value) in &self.headers {
            parts.headers.append(name, value.clone());
        }
        parts
    }
}

/// The upstream's response as the app gets it: hop-by-hop headers dropped, body streamed.
fn to_app(response: Response<Incoming>) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, Either::Left(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_track_and_connect_are_refused_in_any_case() {
        for name in [
            "TRACE", "trace", "Trace", "TRACK", "track", "tRaCk", "CONNECT", "connect", "Connect",
        ] {
            let method = Method::from_bytes(name.as_bytes()).unwrap();
            let refused = refuse_method(&method);
            assert!(
                matches!(refused, Err(ProxyError::MethodNotAllowed { .. })),
                "{name}: {refused:?}"
            );
        }
        for name in [
            "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "TRACES",
            "TRAC", "get",
        ] {
            let method = Method::from_bytes(name.as_bytes()).unwrap();
            assert!(refuse_method(&method).is_ok(), "{name}");
        }
    }

    #[test]
    fn the_reason_names_the_method() {
        let reason = |name: &str| {
            refuse_method(&Method::from_bytes(name.as_bytes()).unwrap())
                .unwrap_err()
                .to_string()
        };
        assert!(reason("trace").starts_with("TRACE is not forwarded"));
        assert!(reason("track").starts_with("TRACK is not forwarded"));
        assert!(reason("connect").starts_with("CONNECT is not supported"));
    }
}
