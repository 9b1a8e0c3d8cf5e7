//! The proxy: local listeners, forwarding each request with a token.
//!
//! In data-flow order:
//! - `serve` (here): accept app connections from the peers `allow_from` admits, within the
//!   `connection` limits, tell HTTP/1.1 from HTTP/2 by their first bytes, and drain them on
//!   shutdown; `stream`: what differs for a request on an HTTP/2 connection; `intercept`: a
//!   CONNECT on a forward listener with `[listener.intercept]`, answered with TLS from a
//!   name-constrained CA and the same handling inside the tunnel;
//! - `route`: what a listener serves, and the route each request goes to;
//! - `forward`: refuse what must never carry the token, take a token, rewrite the request
//!   ([`rewrite`]), send it on the app connection's upstream connection (`pool`) with the
//!   app's body under its deadline (`body`), stream the answer back;
//! - `upgrade`: a request that switches protocols (WebSocket), and the tunnel after the switch;
//! - `error`: failures to statuses and JSON bodies; `metrics`: the proxy's metric families.

pub(crate) mod body;
pub(crate) mod connection;
pub(crate) mod error;
mod forward;
mod grpc;
pub(crate) mod intercept;
pub(crate) mod metrics;
pub(crate) mod pool;
pub mod rewrite;
mod route;
mod stream;
mod upgrade;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use connection::{Activity, Limits, Protocol, Tracked, Watched};
use error::ProxyError;
use metrics::Refusal;
pub(crate) use route::{shadows, Listener, Route, Setup as RouteSetup, Shared as RouteShared};

/// Accepts app connections on `listener` until `shutdown`, then waits up to `grace` for the
/// requests in flight to finish. Each request is forwarded with the upstream settings current
/// when it arrives, so a reload takes effect on kept-alive connections too.
pub(crate) async fn serve(
    socket: TcpListener,
    listener: watch::Receiver<Arc<Listener>>,
    limits: Limits,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let name = Arc::clone(&listener.borrow().name);
    // Cancelled when the grace period is over: connections still open are dropped.
    let force_close = CancellationToken::new();
    // One permit per open connection: all of them back means every connection has ended.
    let max_connections = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let capacity = Arc::new(Semaphore::new(max_connections as usize));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        // The header and idle timers are kept by `connection::watchdog`.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes);
    // Shared by every connection: only the protocol its first bytes choose is used.
    let serving = Arc::new(Serving {
        http1,
        http2: http2_builder(&limits),
        limits,
        shutdown: shutdown.clone(),
        force_close: force_close.clone(),
    });
    loop {
        let Some((stream, peer)) = crate::listener::accept(&socket, &name, &shutdown).await else {
            break;
        };
        // A stranger is closed on before a byte is read: it must not learn even that this is
        // bearerd, let alone use its token.
        if !listener.borrow().admits(peer.ip()) {
            // Debug, not warn: a scan would flood the log; the counter tells the story.
            tracing::debug!(upstream = %name, %peer, "connection refused: peer not in allow_from");
            listener
                .borrow()
                .metrics
                .connection_refused(Refusal::NotAllowed);
            drop(stream);
            continue;
        }
        let Ok(permit) = Arc::clone(&capacity).try_acquire_owned() else {
            tracing::warn!(upstream = %name, max_connections = limits.max_connections, "connection refused: listener full");
            listener
                .borrow()
                .metrics
                .connection_refused(Refusal::ListenerFull);
            tokio::spawn(refuse(stream, Arc::clone(&name)));
            continue;
        };
        // Small requests and answers go out at once rather than waiting on Nagle.
        let _ = stream.set_nodelay(true);
        let activity = Activity::new(&limits);
        tokio::spawn(connection::watchdog(
            Arc::clone(&activity),
            limits,
            shutdown.clone(),
            force_close.clone(),
            Arc::clone(&name),
        ));
        let app = App {
            listener: listener.clone(),
            activity,
            name: Arc::clone(&name),
            serving: Arc::clone(&serving),
        };
        tokio::spawn(async move {
            // Held as long as the connection, and the tunnel a CONNECT makes of it, last.
            let _permit = permit;
            match connection::detect(&stream, &app.activity).await {
                Some(Protocol::Http1) => {
                    if let Some(opened) = app.serve_http1(stream, None).await {
                        opened.serve().await;
                    }
                }
                Some(Protocol::Http2) => app.serve_http2(stream, None).await,
                None => app.activity.end(),
            }
        });
    }
    // Stop accepting before draining: the listener closes here. The watchdogs have seen
    // `shutdown` too and are draining their connections.
    drop(socket);
    tokio::select! {
        _ = capacity.acquire_many(max_connections) => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(upstream = %name, "shutdown grace period over; closing connections still open");
            force_close.cancel();
        }
    }
}

/// What every connection of one listener shares: the protocol builders, the limits, and the
/// shutdown signals, which the connection inside an intercepted tunnel needs too.
struct Serving {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    limits: Limits,
    shutdown: CancellationToken,
    force_close: CancellationToken,
}

/// One accepted app connection, before and while it is served.
struct App {
    listener: watch::Receiver<Arc<Listener>>,
    activity: Arc<Activity>,
    name: Arc<str>,
    serving: Arc<Serving>,
}

/// A CONNECT that was answered 200: the app connection, handed over by hyper, becomes a
/// tunnel (after the HTTP/1.1 connection it came on has ended).
struct Opened {
    pending: intercept::Pending,
    listener: watch::Receiver<Arc<Listener>>,
    name: Arc<str>,
    serving: Arc<Serving>,
}

impl Opened {
    /// Serves the tunnel: TLS and the requests inside, or bytes copied blind to a
    /// passthrough target. A new connection inside, with a watchdog of its own.
    ///
    /// Boxed as `Send`: the connection inside may be HTTP/2, whose CONNECT streams spawn
    /// tunnels in turn (refused at run time inside a tunnel, but the futures' types form a
    /// cycle), and the compiler cannot prove `Send` through that cycle of opaque types.
    fn serve(self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let Opened {
                pending,
                listener,
                name,
                serving,
            } = self;
            let Ok(upgraded) = pending.upgrade.await else {
                return;
            };
            let io = TokioIo::new(upgraded);
            let target = match pending.opening {
                intercept::Opening::Intercept(target) => target,
                intercept::Opening::Passthrough(upstream) => {
                    // Closed with the listener's other connections once the grace is over.
                    tokio::select! {
                        () = intercept::tunnel::passthrough(io, upstream) => {}
                        () = serving.force_close.cancelled() => {}
                    }
                    return;
                }
            };
            let Some(intercept) = listener.borrow().intercept.clone() else {
                return;
            };
            let Ok(tls) = intercept::tunnel::handshake(io, &target, &intercept).await else {
                return;
            };
            let h2 = intercept::tunnel::chose_h2(&tls);
            let activity = Activity::new(&serving.limits);
            tokio::spawn(connection::watchdog(
                Arc::clone(&activity),
                serving.limits,
                serving.shutdown.clone(),
                serving.force_close.clone(),
                Arc::clone(&name),
            ));
            let app = App {
                listener,
                activity,
                name,
                serving,
            };
            let target = Some(Arc::new(target));
            if h2 {
                app.serve_http2(tls, target).await;
            } else {
                // Inside a tunnel, a CONNECT is refused: no tunnel is handed back.
                let _ = app.serve_http1(tls, target).await;
            }
        })
    }
}

impl App {
    /// Serves an HTTP/1.1 connection: its requests one after the other, on the one upstream
    /// connection it holds from its first request on, under its watchdog's timers.
    ///
    /// `tunnel`: the connection is inside an intercepted tunnel to that target, and each
    /// request must name it. Outside one, on a listener that intercepts, a CONNECT it accepts
    /// ends the connection and hands it back as a tunnel to serve.
    async fn serve_http1<IO>(
        self,
        stream: IO,
        tunnel: Option<Arc<intercept::Target>>,
    ) -> Option<Opened>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let App {
            listener,
            activity,
            name,
            serving,
        } = self;
        // Where an accepted CONNECT leaves its upgrade: only on a listener that intercepts,
        // outside a tunnel (made once per connection, not per request).
        let connects = (tunnel.is_none() && listener.borrow().intercept.is_some())
            .then(|| (intercept::PendingSlot::default(), listener.clone()));
        let pending = connects.as_ref().map(|(pending, _)| Arc::clone(pending));
        let io = TokioIo::new(Watched::new(stream, Arc::clone(&activity)));
        let requests = Arc::clone(&activity);
        // The upstream connection this app connection holds, from its first request on.
        let slot = Arc::new(pool::Slot::default());
        let held = Arc::clone(&slot);
        let service = service_fn(move |mut request: Request<Incoming>| {
            let listener = Arc::clone(&listener.borrow());
            let guard = requests.request_started();
            let slot = Arc::clone(&held);
            // A tunnel's request that names another host, or a CONNECT, is answered here.
            // Boxed: the usual request's future carries a pointer's worth more, not an
            // answer's (hyper moves the future whole).
            let early = match (&tunnel, &pending) {
                (Some(target), _) => intercept::tunnel::to_target(&mut request, target)
                    .err()
                    .map(|error| {
                        Box::new(intercept::Answer::Now(forward::unrouted(
                            &listener, &request, error,
                        )))
                    }),
                (None, Some(pending)) if request.method() == Method::CONNECT => {
                    listener.intercept.as_ref().map(|intercept| {
                        Box::new(intercept::connect(
                            &listener,
                            intercept,
                            &mut request,
                            pending,
                        ))
                    })
                }
                _ => None,
            };
            // The route is chosen here rather than in a function of its own: another async
            // layer would make every request's future larger, and hyper moves it whole
            // (callgrind: +180 instructions per request).
            async move {
                let response = match early {
                    Some(answer) => answer.response().await,
                    None => match forward::route(&listener, &request) {
                        Ok(route) => {
                            let on = forward::Connection {
                                slot: &slot,
                                activity: Some(guard.activity()),
                                trace: None,
                            };
                            forward::forward(route, listener.mode, on, request).await
                        }
                        Err(error) => forward::unrouted(&listener, &request, error),
                    },
                };
                Ok::<_, std::convert::Infallible>(response.map(|body| Tracked::new(body, guard)))
            }
        });
        // With upgrades: after a `101` hyper hands the connection over to its tunnel
        // (`upgrade`), which `connection::serve` then runs; after a CONNECT answered 200 it
        // hands the IO back to be intercepted. Nothing changes for a connection that never
        // upgrades.
        let connection = serving.http1.serve_connection(io, service).with_upgrades();
        let mut connection = std::pin::pin!(connection);
        // Whichever way the connection ends, its upstream connection goes back; declared
        // after the connection, so it is dropped, and the upstream connection is back in the
        // pool, before the app sees its connection close.
        let _release = ReleaseOnDrop(slot);
        if let Some(Err(error)) = connection::serve(connection.as_mut(), &activity).await {
            tracing::debug!(upstream = %name, %error, "app connection ended with an error");
        }
        let (pending, listener) = connects?;
        let pending = pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        Some(Opened {
            pending,
            listener,
            name,
            serving,
        })
    }

    /// Serves an HTTP/2 connection: each stream is a request of its own, which takes an
    /// upstream connection from the pool for its exchange and gives it back when its response
    /// has ended, under a response header timer of its own. The watchdog keeps the idle
    /// timeout (no stream open), drains on shutdown (GOAWAY) and closes after the grace.
    /// `tunnel`: as for [`Self::serve_http1`].
    async fn serve_http2<IO>(self, stream: IO, tunnel: Option<Arc<intercept::Target>>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let App {
            listener,
            activity,
            name,
            serving,
        } = self;
        let requests = Arc::clone(&activity);
        // What a CONNECT stream needs to open a tunnel: only on a listener that intercepts,
        // outside a tunnel (made once per connection, not per request).
        let opener = (tunnel.is_none() && listener.borrow().intercept.is_some()).then(|| {
            Arc::new(Opener {
                listener: listener.clone(),
                name: Arc::clone(&name),
                serving: Arc::clone(&serving),
            })
        });
        let service = service_fn(move |request: Request<Incoming>| {
            let listener = Arc::clone(&listener.borrow());
            let guard = requests.request_started();
            let tunnel = tunnel.clone();
            // A CONNECT stream (RFC 9113 §8.5), not an extended CONNECT (RFC 8441, with
            // `:protocol`: a WebSocket, which `stream` serves).
            let connect = opener.as_ref().filter(|_| {
                request.method() == Method::CONNECT
                    && request.extensions().get::<hyper::ext::Protocol>().is_none()
            });
            let connect = connect.map(Arc::clone);
            async move {
                let response = match connect {
                    // Boxed: CONNECTs are few, and the usual stream's future stays as it was.
                    Some(opener) => Box::pin(opener.connect(&listener, request, &guard)).await,
                    None => stream::serve(&listener, request, &guard, tunnel.as_deref()).await,
                };
                Ok::<_, std::convert::Infallible>(response.map(|body| Tracked::new(body, guard)))
            }
        });
        let connection = serving
            .http2
            .serve_connection(TokioIo::new(stream), service);
        let mut connection = std::pin::pin!(connection);
        if let Some(Err(error)) = connection::serve(connection.as_mut(), &activity).await {
            tracing::debug!(upstream = %name, %error, "HTTP/2 app connection ended with an error");
        }
    }
}

/// What an HTTP/2 connection to a listener that intercepts keeps to serve the tunnels its
/// CONNECT streams open.
struct Opener {
    listener: watch::Receiver<Arc<Listener>>,
    name: Arc<str>,
    serving: Arc<Serving>,
}

impl Opener {
    /// Answers a CONNECT stream as an HTTP/1.1 CONNECT is answered (the same decision, 403 or
    /// 502 as JSON); an accepted one's tunnel runs in a task of its own on the stream's IO,
    /// holding a request guard of its own (it outlives the stream's response), so that the
    /// connection does not count as idle while it runs.
    async fn connect(
        &self,
        listener: &Arc<Listener>,
        mut request: Request<Incoming>,
        guard: &connection::RequestGuard,
    ) -> http::Response<stream::Released> {
        // A reload took the interception away: refused as on any listener.
        let Some(intercept) = &listener.intercept else {
            return stream::serve(listener, request, guard, None).await;
        };
        let pending = intercept::PendingSlot::default();
        let answer = intercept::connect(listener, intercept, &mut request, &pending);
        let mut response = Box::new(answer).response().await;
        let accepted = pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(pending) = accepted {
            let opened = Opened {
                pending,
                listener: self.listener.clone(),
                name: Arc::clone(&self.name),
                serving: Arc::clone(&self.serving),
            };
            let held = guard.another();
            let tunnel = opened.serve();
            tokio::spawn(async move {
                tunnel.await;
                drop(held);
            });
        }
        // HTTP/2 has no `Connection` header (RFC 9113 §8.2.2).
        response.headers_mut().remove(http::header::CONNECTION);
        response.map(stream::Released::answer)
    }
}

/// The HTTP/2 server's settings: `[server]`'s limits per connection and per stream, and the
/// defences of h2 against floods made explicit rather than left to defaults that may move.
fn http2_builder(limits: &Limits) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http.timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        // SETTINGS_MAX_HEADER_LIST_SIZE: the request head limit of HTTP/1.1, per stream.
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Rapid reset (CVE-2023-44487): streams the client opened and reset before bearerd
        // accepted them; past this many at once, the connection is ended with GOAWAY.
        .max_pending_accept_reset_streams(Some(HTTP2_MAX_PENDING_RESETS))
        // Streams bearerd itself had to reset for the client's errors; past this many, GOAWAY.
        .max_local_error_reset_streams(Some(HTTP2_MAX_LOCAL_RESETS))
        // Bytes queued for one stream before its response body waits for the client to read.
        .max_send_buf_size(HTTP2_MAX_SEND_BUFFER)
        // RFC 8441: WebSockets over HTTP/2 (an extended CONNECT, `:protocol websocket`).
        .enable_connect_protocol();
    http
}

/// See [`http2_builder`]: h2's own defaults at the time of writing.
const HTTP2_MAX_PENDING_RESETS: usize = 20;
/// See [`http2_builder`].
const HTTP2_MAX_LOCAL_RESETS: usize = 1024;
/// See [`http2_builder`]: 400 KiB, hyper's default.
const HTTP2_MAX_SEND_BUFFER: usize = 400 * 1024;

/// Gives an app connection's upstream connection back to the pool when dropped.
struct ReleaseOnDrop(Arc<pool::Slot>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Answers a connection over the limit with 503 and closes it, without waiting long.
async fn refuse(mut stream: tokio::net::TcpStream, name: Arc<str>) {
    let answer = ProxyError::ListenerFull.into_http1_bytes(&name);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&answer)).await;
    let _ = stream.shutdown().await;
}
