//! The admin listener: `/metrics` for Prometheus, `/healthz` and `/readyz` for Kubernetes.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
                "not found: try /metrics, /healthz or /readyz\n",
            ),
        }
    }

    fn metrics_page(&self) -> Response<Full<Bytes>> {
        // Validity changes with time alone, so it is read at the moment of the scrape.
        let now = Instant::now();
        for upstream in self.upstreams().iter() {
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

    /// 200 when every upstream holds a usable token and bearerd is not shutting down.
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
                let state = upstream.token.state();
                if state.usable_token(now).is_some() {
                    return None;
                }
                let detail = state.why_unusable();
                Some(serde_json::json!({"upstream": upstream.name, "detail": detail}))
            })
            .collect();
        if not_ready.is_empty() {
            json(StatusCode::OK, &serde_json::json!({"ready": true}))
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

/// How long an admin connection may take to send a request head, and stay idle between
/// requests (hyper's header timer covers both): probes and scrapes send at once.
const ADMIN_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `admin` on `listener` until `shutdown`, holding at most `max_connections` at once:
/// more are closed at once, so that no peer can take the file descriptors the proxy needs.
pub(crate) async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    max_connections: usize,
    shutdown: CancellationToken,
) {
    let connections = GracefulShutdown::new();
    let capacity = Arc::new(tokio::sync::Semaphore::new(
        max_connections.min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_READ_TIMEOUT);
    loop {
        let Some((stream, _)) = crate::listener::accept(&listener, "[admin]", &shutdown).await
        else {
            break;
        };
        let Ok(permit) = Arc::clone(&capacity).try_acquire_owned() else {
            tracing::debug!(max_connections, "admin connection refused: listener full");
            drop(stream);
            continue;
        };
        let admin = Arc::clone(&admin);
        let service = service_fn(move |request: Request<Incoming>| {
            let response = admin.answer(request.method(), request.uri().path());
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _permit = permit;
            let _ = connection.await;
        });
    }
    drop(listener);
    // Scrapes and probes are quick; do not hold shutdown for a stuck one.
    tokio::select! {
        () = connections.shutdown() => {}
        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
    }
}
