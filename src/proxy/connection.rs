//! Limits on app connections: how long a client may take to send a request head, how long a
//! kept-alive connection may sit idle, and how many connections a listener holds at once.
//!
//! hyper's own header timer also runs while a kept-alive connection is idle, which would tie
//! the two timeouts together; so both are kept here instead. The connection's IO notes when
//! bytes of a new request head start to arrive, the service notes when a request starts and
//! when its response body ends, and a [`watchdog`] task beside the connection closes it when
//! a limit is passed, or drains or closes it on shutdown.
//!
//! The watchdog is a task of its own, not a branch of the connection's task: a `select!` there
//! would poll its timer and shutdown signals again at every wake-up of the connection, several
//! times per request. The connection's task only reads one atomic order ([`serve`]).
//!
//! The watchdog also keeps the response header timeout of the request in flight
//! ([`Activity::within`]), and once the head is in, the response body's idle timeout
//! ([`Activity::expect_body`]): it wakes while a request is open anyway, and a timer of the
//! runtime's for every request cost 2.7% of a request's instructions (callgrind).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Limits of one listener's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// From the first byte of a request head to its end.
    pub header_read_timeout: Duration,
    /// From the end of a response (or the connection's opening) to the next request's first byte.
    pub idle_timeout: Duration,
    /// Largest request head accepted; a larger one is answered 431.
    pub max_header_bytes: usize,
    /// Connections held at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Streams an HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
}

impl From<&crate::config::Server> for Limits {
    fn from(server: &crate::config::Server) -> Self {
        Self {
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            max_header_bytes: server.max_header_bytes,
            max_connections: server.max_connections,
            http2_max_concurrent_streams: server.http2_max_concurrent_streams,
        }
    }
}

/// `Activity::head_started` when no request head is arriving.
const NOT_STARTED: u64 = u64::MAX;

/// [`Activity::order`]: go on serving.
const SERVE: u8 = 0;
/// [`Activity::order`]: finish the request in flight, then close (shutdown).
const DRAIN: u8 = 1;
/// [`Activity::order`]: close now (a limit passed, or the shutdown grace is over).
const CLOSE: u8 = 2;

/// What a connection is doing, shared by its IO, its service and its watchdog. Times are
/// milliseconds since the connection opened.
#[derive(Debug)]
pub(crate) struct Activity {
    opened: Instant,
    /// Requests whose response has not ended.
    open_requests: AtomicUsize,
    /// When the connection last became idle.
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived, or [`NOT_STARTED`].
    head_started: AtomicU64,
    /// The watchdog's order to the connection's task: [`SERVE`], [`DRAIN`] or [`CLOSE`].
    order: AtomicU8,
    /// Wakes the connection's task for a new order.
    order_waker: AtomicWaker,
    /// Tells the watchdog that the connection has ended.
    ended: Notify,
    /// When the response head of the request in flight is due, or [`NOT_STARTED`].
    response_due: AtomicU64,
    /// Set by the watchdog once `response_due` has passed.
    response_late: AtomicBool,
    /// Wakes the request waiting for its response head when it is late.
    response_waker: AtomicWaker,
    /// How often the watchdog looks at the least ([`tick`]): a response due sooner than that
    /// wakes it ([`Activity::nudge`]).
    tick_ms: u64,
    /// Wakes the watchdog to look again now.
    nudge: Notify,
    /// The tunnel of an upgrade this connection switched to, run once hyper has handed the
    /// connection over ([`Activity::hand_over`]).
    tunnel: Handover,
    /// The response body idle timeout of the response being sent, in milliseconds, or
    /// [`NOT_STARTED`] when none is (or it has none): set when its head arrives
    /// ([`Activity::expect_body`]), cleared when the connection is idle again.
    body_limit: AtomicU64,
    /// Frames of response bodies sent so far: the connection's task counts them, the
    /// watchdog looks for a change (no clock is read per frame).
    body_frames: AtomicU64,
    /// A new response body is under way: the watchdog starts its silence from now.
    body_fresh: AtomicBool,
    /// The watchdog's own: `body_frames` when it last changed, and when that was.
    body_seen: AtomicU64,
    body_seen_at: AtomicU64,
}

/// See [`Activity::hand_over`].
#[derive(Default)]
struct Handover(std::sync::Mutex<Option<super::upgrade::Tunnel>>);

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handover")
    }
}

impl Handover {
    fn take(&self) -> Option<super::upgrade::Tunnel> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// A request's response head did not arrive in time ([`Activity::within`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Late;

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// A request head took longer than `header_read_timeout`.
    HeaderRead,
    /// No request for `idle_timeout`.
    Idle,
    /// A response body sent nothing for its route's `response_body_idle_timeout`.
    ResponseBodyIdle,
}

impl Activity {
    /// A connection opened now under `limits`: idle until its first request.
    pub(crate) fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            open_requests: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(NOT_STARTED),
            order: AtomicU8::new(SERVE),
            order_waker: AtomicWaker::new(),
            ended: Notify::new(),
            response_due: AtomicU64::new(NOT_STARTED),
            response_late: AtomicBool::new(false),
            response_waker: AtomicWaker::new(),
            tick_ms: millis(tick(limits)),
            nudge: Notify::new(),
            tunnel: Handover::default(),
            body_limit: AtomicU64::new(NOT_STARTED),
            body_frames: AtomicU64::new(0),
            body_fresh: AtomicBool::new(false),
            body_seen: AtomicU64::new(0),
            body_seen_at: AtomicU64::new(0),
        })
    }

    /// The response head has arrived: its body may then be silent for at most `limit`
    /// (`None`: for ever), which the watchdog keeps. Two stores: no timer of the runtime's per
    /// request, which cost 2.7% (see the module's notes).
    pub(crate) fn expect_body(&self, limit: Option<Duration>) {
        self.body_limit
            .store(limit.map_or(NOT_STARTED, millis), Ordering::Release);
        self.body_fresh.store(true, Ordering::Release);
    }

    /// A frame of the response body went out. Only the connection's task writes the count, so
    /// a plain load and store do (no locked instruction).
    #[inline]
    fn body_progressed(&self) {
        let frames = self.body_frames.load(Ordering::Relaxed);
        self.body_frames
            .store(frames.wrapping_add(1), Ordering::Relaxed);
    }

    /// Whether the response body under way has been silent for its limit; else how long the
    /// watchdog may wait before it looks again, at most `wait`. Only once the head has arrived
    /// (the response header timeout keeps the time before).
    fn check_body(&self, wait: Duration) -> Result<Duration, Expired> {
        let limit = self.body_limit.load(Ordering::Acquire);
        if limit == NOT_STARTED || self.response_due.load(Ordering::Acquire) != NOT_STARTED {
            return Ok(wait);
        }
        let frames = self.body_frames.load(Ordering::Relaxed);
        let now = self.now();
        if self.body_fresh.swap(false, Ordering::AcqRel)
            || frames != self.body_seen.load(Ordering::Relaxed)
        {
            self.body_seen.store(frames, Ordering::Relaxed);
            self.body_seen_at.store(now, Ordering::Relaxed);
            return Ok(wait.min(Duration::from_millis(limit)));
        }
        let silent = now.saturating_sub(self.body_seen_at.load(Ordering::Relaxed));
        if silent >= limit {
            Err(Expired::ResponseBodyIdle)
        } else {
            Ok(wait.min(Duration::from_millis(limit - silent)))
        }
    }

    /// Awaits `exchange` (a request sent upstream, until its response head) for at most
    /// `limit`; past it, the watchdog marks the response late and this answers [`Late`].
    /// The exchange is pinned by the caller: taken by value, the future would be moved once
    /// more into this one's (callgrind: +270 instructions per request in `memcpy`).
    pub(crate) async fn within<F: Future>(
        &self,
        limit: Duration,
        mut exchange: Pin<&mut F>,
    ) -> Result<F::Output, Late> {
        // Milliseconds are truncated, so one more keeps the limit from ending early.
        let limit_ms = millis(limit).saturating_add(1);
        let _awaiting = Awaiting(self);
        self.response_late.store(false, Ordering::Release);
        self.response_due
            .store(self.now().saturating_add(limit_ms), Ordering::Release);
        // The watchdog looks at least every tick; a shorter limit needs it to look sooner.
        if limit_ms < self.tick_ms {
            self.nudge.notify_one();
        }
        poll_fn(|cx| {
            if let Poll::Ready(output) = exchange.as_mut().poll(cx) {
                return Poll::Ready(Ok(output));
            }
            self.response_waker.register(cx.waker());
            // Marked late between the poll and the registration: no waker was there to wake.
            if self.response_late.load(Ordering::Acquire) {
                return Poll::Ready(Err(Late));
            }
            Poll::Pending
        })
        .await
    }

    /// Marks the response in flight late once it is due. Returns how long until it is due,
    /// at most `poll`.
    fn check_response(&self, poll: Duration) -> Duration {
        let due = self.response_due.load(Ordering::Acquire);
        if due == NOT_STARTED {
            return poll;
        }
        let now = self.now();
        if now >= due {
            self.response_late.store(true, Ordering::Release);
            self.response_waker.wake();
            poll
        } else {
            poll.min(Duration::from_millis(due - now))
        }
    }

    /// Orders the connection's task to drain or close (never back to serving).
    fn give_order(&self, order: u8) {
        if self.order.fetch_max(order, Ordering::AcqRel) < order {
            self.order_waker.wake();
        }
    }

    /// The current order; the task behind `cx` is woken when it changes.
    fn poll_order(&self, cx: &Context<'_>) -> u8 {
        let order = self.order.load(Ordering::Acquire);
        if order == CLOSE {
            return order;
        }
        self.order_waker.register(cx.waker());
        // An order given between the load and the registration found no waker to wake.
        self.order.load(Ordering::Acquire)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Gives the connection's task the tunnel of the upgrade its request is switching to, to
    /// run once hyper has handed the connection over. The tunnel counts as a request open, so
    /// that the watchdog's idle timer stays off while it runs (it has a timeout of its own).
    pub(crate) fn hand_over(&self, tunnel: super::upgrade::Tunnel) {
        self.open_requests.fetch_add(1, Ordering::AcqRel);
        // A tunnel is no response body: its idle timeout is its own.
        self.body_limit.store(NOT_STARTED, Ordering::Release);
        *self
            .tunnel
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tunnel);
    }

    /// Tells the watchdog that the connection ended before it was served.
    pub(crate) fn end(&self) {
        self.ended.notify_one();
    }

    /// A request head has been read: the header timer stops until the response ends.
    pub(crate) fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.open_requests.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(NOT_STARTED, Ordering::Release);
        RequestGuard(Arc::clone(self))
    }

    fn bytes_read(&self) {
        if self.open_requests.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == NOT_STARTED
        {
            self.head_started.store(self.now(), Ordering::Release);
        }
    }

    /// Whether a limit has passed, and how long until it might next be worth asking.
    pub(crate) fn check(&self, limits: &Limits) -> Result<Duration, Expired> {
        let poll = tick(limits);
        if self.open_requests.load(Ordering::Acquire) > 0 {
            return self.check_body(self.check_response(poll));
        }
        let now = self.now();
        let head_started = self.head_started.load(Ordering::Acquire);
        let (since, limit, expired) = if head_started == NOT_STARTED {
            let idle_since = self.idle_since.load(Ordering::Acquire);
            (idle_since, limits.idle_timeout, Expired::Idle)
        } else {
            (
                head_started,
                limits.header_read_timeout,
                Expired::HeaderRead,
            )
        };
        let elapsed = Duration::from_millis(now.saturating_sub(since));
        if elapsed >= limit {
            Err(expired)
        } else {
            Ok(poll.min(limit - elapsed))
        }
    }
}

/// Serves `connection` until it ends or its watchdog orders it closed, draining it gracefully
/// when ordered to. Returns the connection's own result, or `None` if it was closed.
pub(crate) async fn serve<C>(mut connection: Pin<&mut C>, activity: &Activity) -> Option<C::Output>
where
    C: Graceful,
{
    let mut draining = false;
    let ended = poll_fn(|cx| {
        match activity.poll_order(cx) {
            CLOSE => return Poll::Ready(None),
            DRAIN if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            _ => {}
        }
        connection.as_mut().poll(cx).map(Some)
    })
    .await;
    match activity.tunnel.take() {
        // The connection was handed over to an upgrade: it is not over yet.
        Some(tunnel) => run_tunnel(tunnel, activity).await,
        None => activity.ended.notify_one(),
    }
    ended
}

/// Runs the tunnel an upgraded connection became until it ends or the watchdog orders the
/// connection closed (its shutdown grace is over). A drain leaves it running: a tunnel has no
/// request boundary at which to stop.
async fn run_tunnel(mut tunnel: super::upgrade::Tunnel, activity: &Activity) {
    poll_fn(|cx| {
        if activity.poll_order(cx) == CLOSE {
            return Poll::Ready(());
        }
        tunnel.as_mut().poll(cx)
    })
    .await;
    activity.ended.notify_one();
}

/// A served connection that can be drained: hyper-util's `GracefulConnection`, which does not
/// cover the HTTP/1.1 connection served with upgrades.
pub(crate) trait Graceful: Future {
    /// Finish the requests in flight, take no more, then end.
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, B, S> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        Self::graceful_shutdown(self);
    }
}

impl<I, B, S, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        Self::graceful_shutdown(self);
    }
}

/// The protocol an app connection speaks, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c): the connection opened with the client preface.
    Http2,
}

/// The client connection preface of HTTP/2 (RFC 9113 §3.4). It was chosen so that no
/// HTTP/1.1 request starts with it: its method `PRI` is not one a client sends.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long to wait before looking again at a connection whose first bytes are a part of the
/// preface and no more: rare (clients send the preface in one write), so a short wait rather
/// than a wake-up per byte.
const PARTIAL_PREFACE_WAIT: Duration = Duration::from_millis(5);

/// Tells HTTP/1.1 from HTTP/2 by peeking at the connection's first bytes, which stay in the
/// socket for the server that then reads them: no buffer or wrapper is left on the IO of
/// either protocol (hyper-util's auto server wraps the IO to replay the bytes it read). The
/// answer comes with the first byte that differs from the preface, or the whole preface.
/// `None` when the connection closed, failed, or its watchdog ordered it closed (or drained)
/// before it said which: nothing was asked yet, so nothing is lost.
pub(crate) async fn detect(
    stream: &tokio::net::TcpStream,
    activity: &Activity,
) -> Option<Protocol> {
    let mut first = [0u8; PREFACE.len()];
    loop {
        let peeked = poll_fn(|cx| {
            if activity.poll_order(cx) != SERVE {
                return Poll::Ready(None);
            }
            let mut buf = ReadBuf::new(&mut first);
            match stream.poll_peek(cx, &mut buf) {
                Poll::Ready(Ok(n)) => Poll::Ready(Some(n)),
                Poll::Ready(Err(_)) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        let seen = first.get(..peeked)?;
        if seen.is_empty() {
            return None;
        }
        if !PREFACE.starts_with(seen) {
            return Some(Protocol::Http1);
        }
        if peeked == PREFACE.len() {
            return Some(Protocol::Http2);
        }
        // A part of the preface: the peer is sending a head, so the header read timeout runs.
        activity.bytes_read();
        tokio::time::sleep(PARTIAL_PREFACE_WAIT).await;
    }
}

/// Watches one connection: closes it when a limit passes, drains it when `shutdown` is
/// cancelled and closes it when `force_close` is. Returns when the connection has ended.
pub(crate) async fn watchdog(
    activity: Arc<Activity>,
    limits: Limits,
    shutdown: CancellationToken,
    force_close: CancellationToken,
    upstream: Arc<str>,
) {
    let mut draining = false;
    loop {
        let wait = match activity.check(&limits) {
            Ok(wait) => wait,
            Err(expired) => {
                tracing::debug!(%upstream, ?expired, "closing app connection");
                activity.give_order(CLOSE);
                return;
            }
        };
        tokio::select! {
            biased;
            () = activity.ended.notified() => return,
            () = force_close.cancelled() => {
                activity.give_order(CLOSE);
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                activity.give_order(DRAIN);
            }
            () = activity.nudge.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Clears the response deadline when the request stops waiting, answered or not (an app that
/// hangs up drops the request's future).
struct Awaiting<'a>(&'a Activity);

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        self.0.response_due.store(NOT_STARTED, Ordering::Release);
    }
}

/// `duration` in whole milliseconds, saturating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// How often the watchdog looks: often enough to keep each limit within a quarter of itself.
fn tick(limits: &Limits) -> Duration {
    (limits.header_read_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Held while a request is open; dropping it (when the response body ends) makes the
/// connection idle again.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    /// The connection the request came on.
    pub(crate) fn activity(&self) -> &Activity {
        &self.0
    }

    /// Another request open on the same connection: an HTTP/2 stream's tunnel, which
    /// outlives its response and must keep the connection from counting as idle.
    pub(crate) fn another(&self) -> RequestGuard {
        self.0.request_started()
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.open_requests.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity.idle_since.store(activity.now(), Ordering::Release);
            activity.body_limit.store(NOT_STARTED, Ordering::Release);
        }
    }
}

/// A response body that releases its request's guard when it ends.
pub(crate) struct Tracked<B> {
    inner: B,
    guard: Option<RequestGuard>,
}

impl<B> Tracked<B> {
    /// Tracks `inner` under `guard`.
    pub(crate) fn new(inner: B, guard: RequestGuard) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    // Forced: out of line it cost about 40 instructions per request (callgrind).
    #[inline(always)]
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                if let Some(guard) = &self.guard {
                    guard.0.body_progressed();
                }
            }
            Poll::Ready(None | Some(Err(_))) => self.guard = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The app connection's IO, noting when a new request head starts to arrive.
pub(crate) struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    /// Wraps `inner`, reporting to `activity`.
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        header_read_timeout: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(300),
        max_header_bytes: 8192,
        max_connections: 1,
        http2_max_concurrent_streams: 1,
    };

    fn backdate(activity: &Activity, field: &AtomicU64, ms: u64) {
        field.store(activity.now().saturating_sub(ms), Ordering::Release);
    }

    #[test]
    fn idle_connection_expires_after_idle_timeout() {
        assert!(Activity::new(&LIMITS).check(&LIMITS).is_ok());
        let opened_long_ago = Activity {
            opened: Instant::now() - Duration::from_millis(400),
            open_requests: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(NOT_STARTED),
            ..Arc::into_inner(Activity::new(&LIMITS)).unwrap()
        };
        assert_eq!(opened_long_ago.check(&LIMITS), Err(Expired::Idle));
    }

    #[test]
    fn a_response_is_late_once_due_and_its_deadline_ends_with_the_wait() {
        let activity = Activity::new(&LIMITS);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let limit = Duration::from_secs(60);
        let pending = std::pin::pin!(std::future::pending::<()>());
        let mut waiting = std::pin::pin!(activity.within(limit, pending));
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        // Not due: the watchdog looks again after its usual tick.
        assert_eq!(activity.check_response(tick(&LIMITS)), tick(&LIMITS));
        let wait = activity.check_response(limit * 2);
        assert!(
            wait <= limit + Duration::from_millis(1) && wait > limit / 2,
            "{wait:?}"
        );
        backdate(&activity, &activity.response_due, 0);
        activity.check_response(tick(&LIMITS));
        assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Ready(Err(Late)));
    }

    #[tokio::test]
    async fn a_response_in_time_is_not_late_and_clears_its_deadline() {
        let activity = Activity::new(&LIMITS);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let answered = activity
            .within(Duration::from_secs(5), std::pin::pin!(async { 7 }))
            .await;
        assert_eq!(answered, Ok(7));
        assert_eq!(activity.response_due.load(Ordering::Acquire), NOT_STARTED);
        // A limit beyond the watchdog's tick waits for the tick; a shorter one wakes it.
        {
            let nudged = std::pin::pin!(activity.nudge.notified());
            assert!(nudged.poll(&mut cx).is_pending());
        }
        let answered = activity
            .within(Duration::from_millis(5), std::pin::pin!(async { 8 }))
            .await;
        assert_eq!(answered, Ok(8));
        let nudged = std::pin::pin!(activity.nudge.notified());
        assert!(nudged.poll(&mut cx).is_ready());
    }

    #[test]
    fn slow_head_expires_after_header_read_timeout_but_an_open_request_does_not() {
        let activity = Arc::new(Activity {
            opened: Instant::now() - Duration::from_millis(1000),
            open_requests: AtomicUsize::new(0),
            idle_since: AtomicU64::new(990),
            head_started: AtomicU64::new(NOT_STARTED),
            ..Arc::into_inner(Activity::new(&LIMITS)).unwrap()
        });
        activity.bytes_read();
        assert!(activity.check(&LIMITS).is_ok());
        backdate(&activity, &activity.head_started, 150);
        assert_eq!(activity.check(&LIMITS), Err(Expired::HeaderRead));

        let guard = activity.request_started();
        assert!(activity.check(&LIMITS).is_ok(), "a request is open");
        activity.bytes_read();
        assert_eq!(activity.head_started.load(Ordering::Acquire), NOT_STARTED);
        drop(guard);
        assert!(activity.check(&LIMITS).is_ok(), "idle again, from now");
    }

    #[test]
    fn a_response_body_silent_for_its_limit_expires_and_a_frame_pushes_it_back() {
        let activity = Arc::new(Activity {
            opened: Instant::now() - Duration::from_millis(1000),
            ..Arc::into_inner(Activity::new(&LIMITS)).unwrap()
        });
        let guard = activity.request_started();
        // No limit ("0"): never.
        activity.expect_body(None);
        assert!(activity.check(&LIMITS).is_ok());
        activity.expect_body(Some(Duration::from_millis(100)));
        assert!(
            activity.check(&LIMITS).is_ok(),
            "a new body starts its silence now"
        );
        backdate(&activity, &activity.body_seen_at, 150);
        assert_eq!(activity.check(&LIMITS), Err(Expired::ResponseBodyIdle));
        activity.body_progressed();
        assert!(activity.check(&LIMITS).is_ok(), "a frame went out");
        backdate(&activity, &activity.body_seen_at, 150);
        drop(guard);
        assert!(
            activity.check(&LIMITS).is_ok(),
            "the body ended: the connection is idle, under its idle timeout"
        );
    }
}
