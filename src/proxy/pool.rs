//! Connections to one upstream, owned by app connections rather than looked up per request.
//!
//! An app connection takes an upstream connection at its first request and keeps it for its
//! whole life, giving it back to [`Pool`] when it closes: a request finds its connection in
//! its own app connection's [`Slot`], with no shared map, hash or lock on the way. An app that
//! opens a connection per request still reuses upstream connections, through the pool's idle
//! list. An upstream that speaks HTTP/2 (chosen by ALPN) gets one connection, which every app
//! connection shares.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

use super::body::RequestBody;
use crate::tls::Connector;

/// How long an idle upstream connection is kept. Below the 60 s or more that common servers
/// and load balancers allow, so that bearerd closes first rather than reusing a dying one.
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// Connections to one upstream.
pub(crate) struct Pool {
    connector: Connector,
    /// Offers HTTP/1.1 alone by ALPN: for the connections an upgrade is sent on.
    upgrades: Connector,
    /// `scheme://authority` of the upstream: what the connector dials.
    dial: Uri,
    /// HTTP/1.1 connections no app connection holds, newest last.
    idle: Mutex<Vec<(http1::SendRequest<RequestBody>, Instant)>>,
    /// The HTTP/2 connection, once the upstream has chosen HTTP/2.
    shared: Mutex<Option<http2::SendRequest<RequestBody>>>,
    /// Idle connections kept at most.
    max_idle: usize,
    /// Speak HTTP/2 on every connection without waiting for ALPN (`protocol = "h2c"`).
    prior_knowledge: bool,
}

/// One connection's sending side.
pub(crate) enum Sender {
    /// Used by one app connection at a time.
    Http1(http1::SendRequest<RequestBody>),
    /// Shared by all (each holds a clone).
    Http2(http2::SendRequest<RequestBody>),
}

/// A request that could not be sent. (No `Debug`: the request carries the token.)
pub(crate) enum SendError {
    /// The connection was gone before the request left: it can go on another connection.
    NotSent(Box<Request<RequestBody>>, hyper::Error),
    /// The exchange failed after the request left.
    Failed(hyper::Error),
}

/// A new connection could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// TCP connect or TLS handshake.
    #[error(transparent)]
    Dial(Box<dyn std::error::Error + Send + Sync>),
    /// The HTTP handshake.
    #[error(transparent)]
    Handshake(hyper::Error),
}

impl Sender {
    /// Whether requests go out as HTTP/2 (absolute URI, no `Host`).
    pub(crate) fn is_http2(&self) -> bool {
        matches!(self, Self::Http2(_))
    }

    /// Sends `request` once the connection can take it.
    pub(crate) async fn send(
        &mut self,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let recovered =
            |mut error: hyper::client::conn::TrySendError<Request<RequestBody>>| match error
                .take_message()
            {
                Some(request) => SendError::NotSent(Box::new(request), error.into_error()),
                None => SendError::Failed(error.into_error()),
            };
        match self {
            Self::Http1(sender) => {
                if let Err(error) = sender.ready().await {
                    return Err(SendError::NotSent(Box::new(request), error));
                }
                sender.try_send_request(request).await.map_err(recovered)
            }
            Self::Http2(sender) => {
                if let Err(error) = sender.ready().await {
                    return Err(SendError::NotSent(Box::new(request), error));
                }
                sender.try_send_request(request).await.map_err(recovered)
            }
        }
    }
}

impl Pool {
    /// A pool for the upstream at `dial` (scheme and authority), keeping at most `max_idle`
    /// idle connections; `prior_knowledge` speaks HTTP/2 on plain TCP from the first byte
    /// (RFC 9113 §3.3).
    pub(crate) fn new(
        connector: Connector,
        upgrades: Connector,
        dial: Uri,
        max_idle: usize,
        prior_knowledge: bool,
    ) -> Self {
        Self {
            connector,
            upgrades,
            dial,
            idle: Mutex::new(Vec::new()),
            shared: Mutex::new(None),
            max_idle,
            prior_knowledge,
        }
    }

    /// A connection for an app connection: the shared HTTP/2 one, an idle HTTP/1.1 one, or a
    /// new one.
    pub(crate) async fn acquire(&self) -> Result<Sender, ConnectError> {
        if let Some(shared) = lock(&self.shared).as_ref().filter(|s| !s.is_closed()) {
            return Ok(Sender::Http2(shared.clone()));
        }
        {
            let mut idle = lock(&self.idle);
            while let Some((sender, since)) = idle.pop() {
                if !sender.is_closed() && since.elapsed() < IDLE_TIMEOUT {
                    return Ok(Sender::Http1(sender));
                }
            }
        }
        self.connect().await
    }

    /// A new connection, whatever the pool holds.
    pub(crate) async fn connect(&self) -> Result<Sender, ConnectError> {
        let io = self
            .connector
            .clone()
            .call(self.dial.clone())
            .await
            .map_err(ConnectError::Dial)?;
        if self.prior_knowledge || io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "upstream HTTP/2 connection ended");
                }
            });
            *lock(&self.shared) = Some(sender.clone());
            Ok(Sender::Http2(sender))
        } else {
            let (sender, connection) = http1::handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            run_http1(connection);
            Ok(Sender::Http1(sender))
        }
    }

    /// A new HTTP/1.1 connection of its own for a request that asks for an upgrade: it can
    /// hand its IO over after a `101`, and is never pooled (after a refusal it is dropped too,
    /// rather than be told apart from one that switched).
    pub(crate) async fn connect_upgradable(
        &self,
    ) -> Result<http1::SendRequest<RequestBody>, ConnectError> {
        let io = self
            .upgrades
            .clone()
            .call(self.dial.clone())
            .await
            .map_err(ConnectError::Dial)?;
        let (sender, connection) = http1::handshake(io)
            .await
            .map_err(ConnectError::Handshake)?;
        run_http1(connection);
        Ok(sender)
    }

    /// Takes back a connection whose app connection has closed.
    pub(crate) fn release(&self, sender: Sender) {
        if let Sender::Http1(sender) = sender {
            let mut idle = lock(&self.idle);
            if !sender.is_closed() && idle.len() < self.max_idle {
                idle.push((sender, Instant::now()));
            }
        }
    }
}

/// What the connector gives: a TCP or TLS stream to the upstream.
type Io = hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>;

/// Runs an HTTP/1.1 upstream connection, pooled or carrying an upgrade, in a task of its own.
/// One function for both, with upgrades for both (a pooled connection never sees a `101`, as
/// its requests never ask for one): hyper's client connection is then one future, polled from
/// one place, and stays inlined into its task. Two (a plain one for the pool, one with
/// upgrades) made its code shared by two callers and no longer inlined: callgrind counted
/// about +200 instructions per request on the HTTP/1.1 path.
fn run_http1(connection: http1::Connection<Io, RequestBody>) {
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream connection ended");
        }
    });
}

/// The upstream connection an app connection holds, with the pool it came from (a reload may
/// give the app connection's next request another upstream).
#[derive(Default)]
pub(crate) struct Slot(Mutex<Option<(Arc<Pool>, Sender)>>);

impl Slot {
    /// The connection held for `pool`, if any; one held for another pool goes back to it.
    pub(crate) fn take(&self, pool: &Arc<Pool>) -> Option<Sender> {
        match lock(&self.0).take() {
            Some((held, sender)) if Arc::ptr_eq(&held, pool) => Some(sender),
            Some((held, sender)) => {
                held.release(sender);
                None
            }
            None => None,
        }
    }

    /// Keeps `sender` for the app connection's next request.
    pub(crate) fn put(&self, pool: &Arc<Pool>, sender: Sender) {
        *lock(&self.0) = Some((Arc::clone(pool), sender));
    }

    /// Gives the connection back when the app connection closes.
    pub(crate) fn release(&self) {
        if let Some((pool, sender)) = lock(&self.0).take() {
            pool.release(sender);
        }
    }
}

/// These locks guard a swap of a few words and never see a panic while held; take the data
/// anyway if one did.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
