//! Upgrades: a WebSocket (RFC 6455) or another protocol a route lists in `upgrade_protocols`,
//! asked for by an HTTP/1.1 request (`Connection: upgrade`, `Upgrade: …`) or by an HTTP/2
//! extended CONNECT (RFC 8441, which `stream` turns into the HTTP/1.1 handshake first).
//!
//! The handshake is a request like any other: routed, given the token (and a DPoP proof),
//! replayed once on a 401. It goes out on an upstream connection of its own
//! ([`Pool::connect_upgradable`](super::pool::Pool::connect_upgradable)), never pooled. On the
//! upstream's `101` the app gets `101` (or `200` on its HTTP/2 stream), and a [`tunnel`] copies
//! bytes both ways, uninspected, until both sides have closed (one side's close is passed on
//! to the other, which has [`HALF_CLOSED_GRACE`] to close too) or nothing has moved for
//! `[server] upgraded_idle_timeout`. Any other answer goes back to the app as it came.
//!
//! None of this runs for a request without hop-by-hop headers: the `Upgrade` header is found on
//! the way that removes them ([`strip_hop_by_hop_but_upgrade`](super::rewrite::strip_hop_by_hop_but_upgrade)).
//!
//! Who owns a tunnel: on HTTP/1.1 the app connection's task, after hyper has handed its IO over
//! ([`Activity::hand_over`]), so that the connection's `max_connections` permit and its
//! watchdog (close after the shutdown grace) cover the tunnel too. On HTTP/2 a task of its own,
//! holding the stream's request guard; the stream lives inside its connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    CONNECTION, HOST, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::body::{AppBody, RequestBody, ResponseBody};
use super::connection::{Activity, RequestGuard};
use super::error::ProxyError;
use super::forward;
use super::metrics::RouteSeries;
use super::rewrite::strip_hop_by_hop;
use super::route::Route;
use crate::token::Token;

/// A boxed tunnel, run by whoever owns the app side (see the module's notes).
pub(crate) type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Set by `stream` on a request that came as an HTTP/2 extended CONNECT: the app gets `200`
/// rather than `101`, and the tunnel holds the stream's request guard, which keeps its
/// connection from counting as idle. (An `Arc`: extensions must be `Clone`.)
#[derive(Clone)]
pub(crate) struct ExtendedConnect(pub(crate) Arc<RequestGuard>);

/// Turns an HTTP/2 extended CONNECT for a WebSocket (RFC 8441 §4: `:method CONNECT`,
/// `:protocol websocket`) into the HTTP/1.1 handshake (RFC 6455 §4.1) the upstream is sent:
/// `GET` with `Upgrade: websocket`, `Connection: Upgrade`, a key of bearerd's own and version
/// 13; the app's `Sec-WebSocket-Protocol` and `-Extensions` go on as they came. `false` for
/// any other request, which is left as it is (a CONNECT is then refused as every CONNECT).
pub(crate) fn from_extended_connect<B>(request: &mut Request<B>, guard: &RequestGuard) -> bool {
    if request.method() != Method::CONNECT {
        return false;
    }
    let websocket = request
        .extensions()
        .get::<hyper::ext::Protocol>()
        .is_some_and(|protocol| protocol.as_str().eq_ignore_ascii_case("websocket"));
    if !websocket {
        return false;
    }
    let Some(key) = websocket_key() else {
        return false;
    };
    *request.method_mut() = Method::GET;
    let headers = request.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(SEC_WEBSOCKET_KEY, key);
    headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    request
        .extensions_mut()
        .insert(ExtendedConnect(Arc::new(guard.another())));
    true
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64 (RFC 6455 §4.1).
fn websocket_key() -> Option<HeaderValue> {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut nonce = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut nonce).ok()?;
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    HeaderValue::from_str(&key).ok()
}

/// The app side of an upgrade the route lets through: `None` when `protocols` (the request's
/// `Upgrade` header) names one the route does not list, or hyper cannot hand the app's
/// connection over (HTTP/1.0). Then the request goes on without its `Upgrade` header, as any
/// request does: the upstream answers it as a plain request. An HTTP/2 WebSocket has no
/// plain request to fall back to: refused (405, as any CONNECT).
pub(super) fn accepted(
    route: &Route,
    protocols: &HeaderValue,
    parts: &mut Parts,
) -> Result<Option<OnUpgrade>, ProxyError> {
    let listed = |name: &str| {
        // `websocket` or `name/version`: the route lists names.
        let name = name.split('/').next().unwrap_or_default();
        route
            .upgrade_protocols
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(name))
    };
    let all_listed = protocols.to_str().is_ok_and(|text| {
        let mut names = text
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty());
        names.clone().next().is_some() && names.all(listed)
    });
    if all_listed {
        return Ok(parts.extensions.remove::<OnUpgrade>());
    }
    if parts.extensions.get::<ExtendedConnect>().is_some() {
        return Err(ProxyError::MethodNotAllowed {
            reason: "WebSocket is not in this route's upgrade_protocols: its extended CONNECT is refused as any CONNECT is",
        });
    }
    tracing::debug!(upstream = %route.name, "Upgrade header dropped: protocol not in upgrade_protocols");
    Ok(None)
}

/// Where the handshake goes and how long it may wait for the upstream's answer.
pub(super) struct Handshake<'a> {
    pub upstream: &'a Route,
    pub path_and_query: &'a PathAndQuery,
    pub deadline: Duration,
    /// The HTTP/1.1 app connection's watchdog, which will run the tunnel; `None` on HTTP/2.
    pub activity: Option<&'a Activity>,
    /// The request's trace, with `[telemetry]`.
    pub trace: Option<&'a crate::telemetry::RequestTrace<'a>>,
}

/// Sends the handshake `parts` (hop-by-hop headers already gone) with `token`, asking for
/// `protocols`, and answers the app: the upstream's refusal as it came, or the switch, with
/// the tunnel handed to its owner.
///
/// Boxed here, outside the caller: made in `forward::try_forward`'s own body, the handshake's
/// large future cost every plain request a copy more of its head (callgrind: about 100
/// instructions per request).
#[inline(never)]
pub(super) fn start<'a>(
    to: Handshake<'a>,
    parts: Parts,
    body: Incoming,
    token: Arc<Token>,
    protocols: HeaderValue,
    app_side: OnUpgrade,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + 'a>,
> {
    Box::pin(forward(to, parts, body, token, protocols, app_side))
}

async fn forward(
    to: Handshake<'_>,
    mut parts: Parts,
    body: Incoming,
    token: Arc<Token>,
    protocols: HeaderValue,
    app_side: OnUpgrade,
) -> Result<Response<ResponseBody>, ProxyError> {
    let upstream = to.upstream;
    let extended = parts.extensions.remove::<ExtendedConnect>();
    parts
        .headers
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(UPGRADE, protocols);
    parts.version = Version::HTTP_11;
    // A handshake with a body is rare (a WebSocket's has none); one with a body cannot be
    // replayed after a 401.
    let body = AppBody::new(body, upstream.body_idle_timeout);
    let replayable = body.is_end_stream();
    let kept = replayable.then(|| (parts.method.clone(), parts.headers.clone()));
    let mut answer = send(&to, parts, &token, Either::Left(body)).await?;
    if let (Some((method, headers)), StatusCode::UNAUTHORIZED, true) =
        (&kept, answer.status(), upstream.retry_on_401)
    {
        let again = || {
            let (mut parts, ()) = Request::new(()).into_parts();
            parts.method = method.clone();
            parts.headers = headers.clone();
            parts
        };
        let empty = || Either::Right(Full::new(Bytes::new()));
        if upstream.credential.wants_new_proof(answer.headers()) {
            upstream.credential.count_proof_retry();
            answer = send(&to, again(), &token, empty()).await?;
        }
        if answer.status() == StatusCode::UNAUTHORIZED {
            if let Ok(replacement) = upstream.credential.replacement_for(&token).await {
                upstream.metrics.unauthorized_retry();
                answer = send(&to, again(), &replacement, empty()).await?;
            }
        }
    }
    if extended.is_some() && answer.status().is_success() {
        return Err(ProxyError::NotSwitched {
            authority: upstream.target.authority().to_string(),
            status: answer.status(),
        });
    }
    if answer.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused: the upstream's answer, as any answer goes back.
        let (mut parts, body) = answer.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        return Ok(Response::from_parts(parts, Either::Left(body)));
    }
    let upstream_side = hyper::upgrade::on(&mut answer);
    let (mut parts, _) = answer.into_parts();
    let switched_to = parts.headers.get(UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    let tunnel = Box::pin(tunnel(
        app_side,
        upstream_side,
        Arc::clone(&upstream.metrics),
        upstream.upgraded_idle_timeout,
        Arc::clone(&upstream.name),
    ));
    match (extended, to.activity) {
        // RFC 8441 §5: the stream's success is a 2xx; the accept key answers a key the app
        // never sent (bearerd made it up).
        (Some(ExtendedConnect(guard)), _) => {
            parts.status = StatusCode::OK;
            parts.headers.remove(SEC_WEBSOCKET_ACCEPT);
            tokio::spawn(async move {
                let _open = guard;
                tunnel.await;
            });
        }
        (None, Some(activity)) => {
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(switched_to) = switched_to {
                parts.headers.insert(UPGRADE, switched_to);
            }
            activity.hand_over(tunnel);
        }
        (None, None) => {
            // An HTTP/2 request that is not an extended CONNECT cannot carry `Upgrade`
            // (RFC 9113 §8.2.2): hyper refuses it before this; not reached.
            return Err(ProxyError::Internal {
                reason: "an upgrade on an HTTP/2 stream that is not an extended CONNECT".into(),
            });
        }
    }
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(
        parts,
        Either::Right(Full::new(Bytes::new())),
    ))
}

/// Sends the handshake once, on a new connection of its own, bounded by the deadline.
async fn send(
    to: &Handshake<'_>,
    mut parts: Parts,
    token: &Token,
    body: RequestBody,
) -> Result<Response<Incoming>, ProxyError> {
    let upstream = to.upstream;
    let attempt =
        forward::authorize_attempt(upstream, &mut parts, token, to.path_and_query, to.trace)?;
    parts.uri = Uri::from(to.path_and_query.clone());
    parts.headers.insert(HOST, upstream.target.host().clone());
    let exchange = async {
        let mut sender = upstream
            .pool
            .connect_upgradable()
            .await
            .map_err(ProxyError::from_connect)?;
        sender.ready().await.map_err(ProxyError::from_send)?;
        let answer = sender
            .send_request(Request::from_parts(parts, body))
            .await
            .map_err(ProxyError::from_send)?;
        upstream.credential.observe(answer.headers());
        Ok(answer)
    };
    let sent = tokio::time::timeout(to.deadline, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(ProxyError::ResponseTimeout {
                authority: upstream.target.authority().to_string(),
                after: to.deadline,
            })
        });
    if let Some(attempt) = attempt {
        attempt.ended(
            sent.as_ref()
                .map(Response::status)
                .map_err(ProxyError::code),
        );
    }
    sent
}

/// How long a tunnel lives on once one direction has ended (its sender shut it, and the
/// shutdown was passed on), at most; shorter when `upgraded_idle_timeout` is. Half-close is
/// kept, so that a peer that has said all it had to say still gets the rest of the reply,
/// but bounded: a peer that never closes its side (an app that keeps a WebSocket open after
/// the server closed it, never writing) would otherwise hold the tunnel, its
/// `max_connections` permit and its `open` gauge for the whole idle timeout (1h by default).
/// 30 s is long for a WebSocket, whose close frames are exchanged before the server closes
/// (RFC 6455 §7.1.1: the client then closes at once), and enough for the tail of an answer
/// in flight. A protocol that streams a long answer after a half-close (a Docker-style
/// `attach` whose input has ended) is cut after it: the price of not counting on every peer
/// to close.
const HALF_CLOSED_GRACE: Duration = Duration::from_secs(30);

/// Copies bytes both ways between the app and the upstream once both have switched, until
/// both directions have ended, either side fails, nothing moved for `idle_timeout`, or one
/// direction ended [`HALF_CLOSED_GRACE`] ago (or `idle_timeout`, if shorter).
async fn tunnel(
    app_side: OnUpgrade,
    upstream_side: OnUpgrade,
    metrics: Arc<RouteSeries>,
    idle_timeout: Duration,
    name: Arc<str>,
) {
    let (app, upstream) = match tokio::join!(app_side, upstream_side) {
        (Ok(app), Ok(upstream)) => (app, upstream),
        (Err(error), _) | (_, Err(error)) => {
            tracing::debug!(upstream = %name, %error, "upgrade not completed");
            return;
        }
    };
    let _open = metrics.upgrade_opened();
    let moves = Moves::new();
    let (to_upstream, to_app) = metrics.upgraded_bytes();
    let mut app = Counted::new(TokioIo::new(app), to_upstream, &moves);
    let mut upstream = Counted::new(TokioIo::new(upstream), to_app, &moves);
    let grace = HALF_CLOSED_GRACE.min(idle_timeout);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut app, &mut upstream) => {
            if let Err(error) = copied {
                tracing::debug!(upstream = %name, %error, "upgraded connection ended with an error");
            }
        }
        ended = moves.deadline(idle_timeout, grace) => match ended {
            Ended::Idle => tracing::debug!(upstream = %name, ?idle_timeout, "upgraded connection idle; closing"),
            Ended::HalfClosed => tracing::debug!(upstream = %name, ?grace, "upgraded connection half-closed for its grace; closing"),
        },
    }
}

/// When a tunnel's bytes last moved and when its first direction ended, in milliseconds
/// since it opened (atomics: both sides note them from inside `copy_bidirectional`).
struct Moves {
    opened: Instant,
    last: AtomicU64,
    /// [`NOT_YET`] until a side's read sees the end of its stream.
    half_closed: AtomicU64,
    /// Wakes [`Moves::deadline`] when a direction ends, which brings the deadline nearer.
    ended: Notify,
}

/// Why a tunnel's deadline came.
enum Ended {
    Idle,
    HalfClosed,
}

const NOT_YET: u64 = u64::MAX;

impl Moves {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last: AtomicU64::new(0),
            half_closed: AtomicU64::new(NOT_YET),
            ended: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(NOT_YET / 2)
    }

    fn moved(&self) {
        self.last.store(self.now(), Ordering::Relaxed);
    }

    /// A side's stream ended; the first time, the half-closed grace starts.
    fn half_closed(&self) {
        let first = self
            .half_closed
            .compare_exchange(NOT_YET, self.now(), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if first {
            // A permit is kept if the deadline is not waiting at this moment.
            self.ended.notify_one();
        }
    }

    /// Returns when nothing has moved for `idle_timeout`, or a direction ended `grace` ago.
    async fn deadline(&self, idle_timeout: Duration, grace: Duration) -> Ended {
        let at = |ms: u64| self.opened + Duration::from_millis(ms);
        loop {
            let idle = at(self.last.load(Ordering::Relaxed)) + idle_timeout;
            let (due, why) = match self.half_closed.load(Ordering::Relaxed) {
                NOT_YET => (idle, Ended::Idle),
                ms if at(ms) + grace < idle => (at(ms) + grace, Ended::HalfClosed),
                _ => (idle, Ended::Idle),
            };
            if Instant::now() >= due {
                return why;
            }
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = self.ended.notified() => {}
            }
        }
    }
}

/// One side of a tunnel, counting the bytes read from it (the bytes going the other way),
/// noting when any last moved and when its stream ended.
struct Counted<'a, T> {
    inner: T,
    read: IntCounter,
    moves: &'a Moves,
}

impl<'a, T> Counted<'a, T> {
    fn new(inner: T, read: IntCounter, moves: &'a Moves) -> Self {
        Self { inner, read, moves }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.read.inc_by(read as u64);
            self.moves.moved();
        } else if room && matches!(polled, Poll::Ready(Ok(()))) {
            // Nothing read into room for it: the end of this side's stream, which
            // `copy_bidirectional` passes on as a shutdown of the other side's.
            self.moves.half_closed();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
