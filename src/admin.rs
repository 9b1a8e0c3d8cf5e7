//! The admin listener: `/metrics` for Prometheus, `/healthz` and `/readyz` for Kubernetes,
//! `/status` for people (`status`).
//!
//! The kubelet restarts bearerd, or takes its pod out of its Services, when probes fail, so
//! no peer may keep them out: peers outside `[admin] allow_from` are closed on unread, each
//! connection must send its request head within 2 s (`HEAD_DEADLINE`), and when the
//! listener is full the oldest connection that is idle or still sending its head gives way
//! to a new one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(crate) mod status;

use crate::config;
use crate::metrics::Metrics;
use crate::token::metrics::TokenSeries;
use crate::token::source::Handle;

/// The content type of the Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the admin endpoints report on.
pub struct Admin {
    metrics: Arc<Metrics>,
    /// Replaced whole on reload; read by probes and scrapes, never held across an await.
    upstreams: Mutex<Vec<Watched>>,
    /// Cancelled when shutdown begins: `/readyz` turns 503 at once.
    draining: CancellationToken,
    /// What `/status` shows besides the upstreams' state; replaced whole on reload.
    overview: Mutex<status::Overview>,
}

/// One upstream as the admin endpoints see it.
pub struct Watched {
    /// The upstream's name.
    pub name: String,
    /// Its token source.
    pub token: Handle,
    /// Its metric series.
    pub metrics: Arc<TokenSeries>,
}

impl Admin {
    /// An admin over `metrics`, with no upstream yet.
    pub fn new(metrics: Arc<Metrics>, draining: CancellationToken) -> Self {
        Self {
            metrics,
            upstreams: Mutex::new(Vec::new()),
            draining,
            overview: Mutex::new(status::Overview::default()),
        }
    }

    /// Sets what `/status` shows of the config, listeners and cache.
    pub(crate) fn describe(&self, overview: status::Overview) {
        *self
            .overview
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = overview;
    }

    /// Answers `/status` for a peer at `peer`: loopback peers and those in `status_from` get
    /// the page, as JSON when `headers` ask for it, else as HTML; others 403.
    pub fn status(
        &self,
        method: &Method,
        headers: &http::HeaderMap,
        peer: std::net::IpAddr,
        status_from: &[ipnet::IpNet],
    ) -> Response<Full<Bytes>> {
        if *method != Method::GET && *method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        }
        if !status::may_read(peer, status_from) {
            tracing::debug!(%peer, "/status refused: peer neither loopback nor in [admin] status_from");
            return text(
                StatusCode::FORBIDDEN,
                "/status answers loopback peers and [admin] status_from only\n",
            );
        }
        let page = {
            // Held only while the page is built, with no await: the overview's lock, then
            // the upstreams' (nothing takes them in the other order).
            let overview = self
                .overview
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            status::Page::now(&overview, &self.upstreams(), self.draining.is_cancelled())
        };
        if status::wants_json(headers) {
            page.json()
        } else {
            page.html()
        }
    }

    /// Sets the upstreams to report on.
    pub fn watch(&self, upstreams: Vec<Watched>) {
        *self.upstreams() = upstreams;
    }

    fn upstreams(&self) -> std::sync::MutexGuard<'_, Vec<Watched>> {
        // A panic while holding this lock cannot leave the list half-written: take it anyway.
        self.upstreams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Answers one admin request. Public so tests can drive it without a socket.
    pub fn answer(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        let readable = *method == Method::GET || *method == Method::HEAD;
        match path {
            "/metrics" | "/healthz" | "/readyz" if !readable => {
                text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
            }
            "/metrics" => self.metrics_page(),
            "/healthz" => self.health(),
            "/readyz" => self.readiness(),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz, /readyz or /status\n",
            ),
        }
    }

    fn metrics_page(&self) -> Response<Full<Bytes>> {
        // Validity changes with time alone, so it is read at the moment of the scrape.
        let now = Instant::now();
        for upstream in self.upstreams().iter() {
            // An on-behalf-of source holds a token per subject, and none of its own.
            if let Some((held, _)) = upstream.token.subjects_held() {
                upstream.metrics.subjects_held(held);
                continue;
            }
            let state = upstream.token.state();
            let token = state.token.as_ref();
            upstream.metrics.token_state(
                token.map(|t| t.expires_at),
                state.usable_token(now).is_some(),
            );
        }
        match self.metrics.render() {
            Ok(body) => {
                let mut response = Response::new(Full::new(Bytes::from(body)));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
                response
            }
            Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{error}\n")),
        }
    }

    /// 200 unless a token source is down (its refresher ended unexpectedly and awaits its
    /// restart): then 503, so that Kubernetes restarts a sidecar that stays so.
    fn health(&self) -> Response<Full<Bytes>> {
        let down: Vec<String> = self
            .upstreams()
            .iter()
            .filter(|upstream| upstream.token.is_down())
            .map(|upstream| upstream.name.clone())
            .collect();
        if down.is_empty() {
            text(StatusCode::OK, "ok\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("token source down, restarting: {}\n", down.join(", ")),
            )
        }
    }

    /// 200 when every upstream holds a usable token (on-behalf-of sources aside, which fetch
    /// per subject on demand) and bearerd is not shutting down.
    fn readiness(&self) -> Response<Full<Bytes>> {
        if self.draining.is_cancelled() {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"ready": false, "reason": "shutting down"}),
            );
        }
        let now = Instant::now();
        let not_ready: Vec<serde_json::Value> = self
            .upstreams()
            .iter()
            .filter_map(|upstream| {
                // An on-behalf-of source fetches when a request brings a subject: there is
                // nothing for it to be ready with.
                if upstream.token.on_behalf().is_some() {
                    return None;
                }
                let state = upstream.token.state();
                if state.usable_token(now).is_some() {
                    return None;
                }
                let detail = state.why_unusable();
                Some(serde_json::json!({"upstream": upstream.name, "detail": detail}))
            })
            .collect();
        // Ready, but not as it should be: a refresh token held in memory only, an
        // authorisation lost (the token held still works until it expires).
        let degraded: Vec<serde_json::Value> = self
            .upstreams()
            .iter()
            .filter_map(|upstream| {
                let warning = upstream.token.warning()?;
                Some(serde_json::json!({"upstream": upstream.name, "detail": warning}))
            })
            .collect();
        if not_ready.is_empty() && degraded.is_empty() {
            json(StatusCode::OK, &serde_json::json!({"ready": true}))
        } else if not_ready.is_empty() {
            json(
                StatusCode::OK,
                &serde_json::json!({"ready": true, "degraded": degraded}),
            )
        } else {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"ready": false, "upstreams": not_ready}),
            )
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// How long a connection may take to send a complete request head, counted from its opening
/// or from the end of its previous answer. Probes and scrapes send theirs at once; a peer
/// that sends nothing, or half a head, must not keep a place that a probe needs.
const HEAD_DEADLINE: Duration = Duration::from_secs(2);

/// How long an answer may take to be handed to the connection. Answers are small and built at
/// once, so only a peer that does not read (its socket buffers full) takes this long.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// A connection still answering after this long has a peer that does not read: it no longer
/// counts as mid-answer, and may give way to a new connection.
const STALLED_AFTER: Duration = Duration::from_secs(1);

/// Whether the admin listener takes connections from beyond loopback, from anyone: the
/// preparation step warns of it.
pub(crate) fn is_exposed(settings: &config::Admin) -> bool {
    !settings.listen.ip().is_loopback() && settings.allow_from.is_none()
}

/// Serves `admin` on `listener` until `shutdown`, to the peers `settings.allow_from` admits,
/// holding at most `settings.max_connections` at once.
///
/// A full listener does not turn a new connection away: the oldest connection that is idle or
/// still sending its request head is closed for it (a connection mid-answer is not), so that
/// peers holding idle connections cannot starve the kubelet's probes, and each connection must
/// send its request head within [`HEAD_DEADLINE`].
pub(crate) async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    settings: config::Admin,
    shutdown: CancellationToken,
) {
    let connections = GracefulShutdown::new();
    let status_from: Arc<[ipnet::IpNet]> = settings.status_from.clone().into();
    let places = Arc::new(Places::new(settings.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    // The head deadline is kept here (`Place`), where it also covers a kept-alive connection
    // waiting for its next request.
    http.timer(TokioTimer::new()).header_read_timeout(None);
    loop {
        let Some((stream, peer)) = crate::listener::accept(&listener, "[admin]", &shutdown).await
        else {
            break;
        };
        // Closed on before a byte is read, as the proxy listeners do.
        if !crate::listener::admits(settings.allow_from.as_deref(), peer.ip()) {
            tracing::debug!(%peer, "admin connection refused: peer not in [admin] allow_from");
            drop(stream);
            continue;
        }
        let Some(place) = places.admit() else {
            tracing::debug!(
                max_connections = settings.max_connections,
                "admin connection refused: listener full, every connection mid-answer"
            );
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let answering = Arc::clone(&place);
        let admin = Arc::clone(&admin);
        let status_from = Arc::clone(&status_from);
        let service = service_fn(move |request: Request<Incoming>| {
            answering.answering();
            let answer = if request.uri().path() == "/status" {
                admin.status(request.method(), request.headers(), peer.ip(), &status_from)
            } else {
                admin.answer(request.method(), request.uri().path())
            };
            let (parts, body) = answer.into_parts();
            let body = AnswerBody {
                body,
                _done: Answered(Arc::clone(&answering)),
            };
            async move { Ok::<_, std::convert::Infallible>(Response::from_parts(parts, body)) }
        });
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        let places = Arc::clone(&places);
        tokio::spawn(async move {
            place.watch(connection).await;
            places.leave(place.id);
        });
    }
    drop(listener);
    // Scrapes and probes are quick; do not hold shutdown for a stuck one.
    tokio::select! {
        () = connections.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
}

/// The open connections, oldest first, and the room for more.
struct Places {
    max: usize,
    /// By id, which grows with each connection: the first is the oldest.
    open: Mutex<BTreeMap<u64, Arc<Place>>>,
    next_id: AtomicU64,
}

impl Places {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            open: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Place>>> {
        // Every change to the map is one call: a panic cannot leave it half-done.
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a new connection: free, or taken from the oldest connection that is idle
    /// or sending its head (failing that, the oldest stalled mid-answer), which is told to
    /// close. `None` when every connection is mid-answer.
    fn admit(&self) -> Option<Arc<Place>> {
        let mut open = self.open();
        if open.len() >= self.max {
            let now = Instant::now();
            let oldest = |give_way: &dyn Fn(&Place) -> bool| {
                open.iter()
                    .find(|(_, place)| give_way(place))
                    .map(|(&id, _)| id)
            };
            let id = oldest(&|place| place.is_waiting())
                .or_else(|| oldest(&|place| place.is_stalled(now)))?;
            if let Some(evicted) = open.remove(&id) {
                tracing::debug!(
                    "admin listener full: closing its oldest idle (or stalled) connection for a new one"
                );
                evicted.evict.cancel();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let place = Arc::new(Place::new(id));
        open.insert(id, Arc::clone(&place));
        Some(place)
    }

    /// The connection of `id` has ended.
    fn leave(&self, id: u64) {
        self.open().remove(&id);
    }
}

/// What one admin connection is doing, so that the listener knows which may give way.
struct Place {
    id: u64,
    phase: Mutex<Phase>,
    /// Told of each change of phase: the deadline moves.
    changed: Notify,
    /// Cancelled when the connection must give way to a new one.
    evict: CancellationToken,
}

/// A connection's phase: waiting (idle, or receiving a request head) while no answer is open,
/// else answering; and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Phase {
    /// Answers not yet handed whole to the connection (more than one if requests are
    /// pipelined).
    answers: usize,
    since: Instant,
}

impl Place {
    fn new(id: u64) -> Self {
        Self {
            id,
            phase: Mutex::new(Phase {
                answers: 0,
                since: Instant::now(),
            }),
            changed: Notify::new(),
            evict: CancellationToken::new(),
        }
    }

    fn phase(&self) -> Phase {
        // A phase is written whole: a panic cannot leave it half-written.
        *self
            .phase
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One more open answer (`more`) or one fewer; the phase starts again when it turns.
    fn count(&self, more: bool) {
        {
            let mut phase = self
                .phase
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            phase.answers = if more {
                phase.answers.saturating_add(1)
            } else {
                phase.answers.saturating_sub(1)
            };
            if phase.answers == usize::from(more) {
                phase.since = Instant::now();
            }
        }
        // A stored permit if the watcher is not waiting: it looks again either way.
        self.changed.notify_one();
    }

    /// A request head has arrived whole.
    fn answering(&self) {
        self.count(true);
    }

    /// An answer has been handed to the connection.
    fn answered(&self) {
        self.count(false);
    }

    fn is_waiting(&self) -> bool {
        self.phase().answers == 0
    }

    fn is_stalled(&self, now: Instant) -> bool {
        let phase = self.phase();
        phase.answers > 0 && now.saturating_duration_since(phase.since) >= STALLED_AFTER
    }

    /// When the connection must be closed unless its phase changes.
    fn due(&self) -> Instant {
        let phase = self.phase();
        let limit = if phase.answers == 0 {
            HEAD_DEADLINE
        } else {
            ANSWER_DEADLINE
        };
        phase.since + limit
    }

    /// Drives `connection` until it ends, its deadline passes, or it must give way.
    async fn watch<F: std::future::Future>(&self, connection: F) {
        let mut connection = std::pin::pin!(connection);
        loop {
            let due = self.due();
            tokio::select! {
                _ = connection.as_mut() => return,
                () = self.evict.cancelled() => return,
                () = self.changed.notified() => {}
                () = tokio::time::sleep_until(due) => {
                    if self.due() <= Instant::now() {
                        tracing::debug!(phase = ?self.phase(), "admin connection closed: no complete request head within the deadline, or its answer not taken");
                        return;
                    }
                }
            }
        }
    }
}

/// Marks the place answered when dropped: hyper drops the body once it has taken it all (or
/// the connection ends).
struct Answered(Arc<Place>);

impl Drop for Answered {
    fn drop(&mut self) {
        self.0.answered();
    }
}

/// An admin answer's body, which marks its connection answered when done.
struct AnswerBody {
    body: Full<Bytes>,
    _done: Answered,
}

impl http_body::Body for AnswerBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(listen: &str, allow_from: Option<&str>) -> config::Admin {
        config::Admin {
            listen: listen.parse().unwrap(),
            max_connections: 2,
            allow_from: allow_from.map(|net| vec![net.parse().unwrap()]),
            status_from: Vec::new(),
        }
    }

    #[test]
    fn exposed_beyond_loopback_without_allow_from() {
        let exposed = |listen: &str, allow_from| is_exposed(&settings(listen, allow_from));
        assert!(exposed("0.0.0.0:9464", None));
        assert!(exposed("[::]:9464", None));
        assert!(!exposed("0.0.0.0:9464", Some("10.0.0.0/8")));
        assert!(!exposed("127.0.0.1:9464", None));
        assert!(!exposed("[::1]:9464", None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_gives_the_oldest_waiting_place_to_a_new_connection() {
        let places = Places::new(2);
        let first = places.admit().unwrap();
        let second = places.admit().unwrap();
        // The first is answering: the second, though younger, gives way.
        first.answering();
        let third = places.admit().unwrap();
        assert!(!first.evict.is_cancelled());
        assert!(second.evict.is_cancelled());
        // Both open places are answering now: no room, until one has stalled.
        third.answering();
        assert!(places.admit().is_none());
        tokio::time::advance(STALLED_AFTER).await;
        let fourth = places.admit().unwrap();
        assert!(first.evict.is_cancelled(), "the oldest stalled one");
        assert!(!third.evict.is_cancelled());
        // A place that leaves makes room without evicting anyone.
        places.leave(third.id);
        let _fifth = places.admit().unwrap();
        assert!(!fourth.evict.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_is_the_head_deadline_while_waiting_and_moves_with_each_answer() {
        let place = Place::new(0);
        let opened = Instant::now();
        assert_eq!(place.due(), opened + HEAD_DEADLINE);
        tokio::time::advance(Duration::from_millis(500)).await;
        place.answering();
        assert_eq!(
            place.due(),
            opened + Duration::from_millis(500) + ANSWER_DEADLINE
        );
        // Pipelined: a second answer opens before the first is done; waiting again only
        // once both are.
        place.answering();
        tokio::time::advance(Duration::from_millis(100)).await;
        place.answered();
        assert!(!place.is_waiting());
        place.answered();
        assert!(place.is_waiting());
        assert_eq!(
            place.due(),
            opened + Duration::from_millis(600) + HEAD_DEADLINE
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_closed_at_the_head_deadline() {
        let place = Place::new(0);
        let started = Instant::now();
        place.watch(std::future::pending::<()>()).await;
        assert_eq!(started.elapsed(), HEAD_DEADLINE);
    }
}
