//! The proxy: one local listener per upstream, forwarding each request with a token.
//!
//! In data-flow order:
//! - [`serve`] (here): accept app connections (HTTP/1.1) and drain them on shutdown;
//! - [`forward`]: take a token, rewrite the request ([`rewrite`]), send it through the pooled
//!   client, stream the answer back;
//! - [`error`]: failures to statuses and JSON bodies.

pub mod error;
pub mod forward;
pub mod rewrite;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::tls::HttpsClient;
use crate::token::source::Handle;

/// Body of an answer to the app: the upstream's, streamed, or bearerd's own error JSON.
pub type ResponseBody = Either<Incoming, Full<Bytes>>;
/// Body of a request to the upstream: the app's, streamed, or kept whole for a replay.
pub type RequestBody = Either<Incoming, Full<Bytes>>;

/// Wait after a failed `accept` (such as running out of file descriptors) before the next, so
/// that the loop does not spin while the condition lasts.
pub(crate) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Everything needed to forward one upstream's requests.
pub struct Upstream {
    /// The configured name.
    pub name: Arc<str>,
    /// Where requests go.
    pub target: rewrite::Target,
    /// The token source this upstream reads.
    pub token: Handle,
    /// The pooled client towards the upstream.
    pub client: HttpsClient<RequestBody>,
    /// From sending a request to the upstream's response headers.
    pub response_header_timeout: Duration,
    /// This upstream's metric series.
    pub metrics: Arc<crate::metrics::UpstreamMetrics>,
    /// Whether to log one line per request.
    pub access_log: bool,
    /// Whether to replay a request the upstream answers 401, with a new token.
    pub retry_on_401: bool,
}

/// Accepts app connections on `listener` until `shutdown`, then waits up to `grace` for the
/// requests in flight to finish.
pub async fn serve(
    listener: TcpListener,
    upstream: Arc<Upstream>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let connections = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    tracing::warn!(upstream = %upstream.name, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Small requests and answers go out at once rather than waiting on Nagle.
        let _ = stream.set_nodelay(true);
        let name = Arc::clone(&upstream.name);
        let for_service = Arc::clone(&upstream);
        let service = service_fn(move |request| {
            let upstream = Arc::clone(&for_service);
            async move { Ok::<_, std::convert::Infallible>(forward::forward(&upstream, request).await) }
        });
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(upstream = %name, %error, "app connection ended with an error");
            }
        });
    }
    // Stop accepting before draining: the listener closes here.
    drop(listener);
    tokio::select! {
        () = connections.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(upstream = %upstream.name, "shutdown grace period over; closing connections still open");
        }
    }
}
