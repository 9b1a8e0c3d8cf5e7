//! TLS interception on a forward listener (`[listener.intercept]`): what a CONNECT is
//! answered, and the state a listener keeps for it.
//!
//! A CONNECT to a routed host on port 443 is answered `200`; the tunnel is then served as
//! TLS with a leaf for exactly that name ([`leaf`]) from the listener's CA ([`ca`]), and each
//! request inside goes through the same handling as any request to the listener
//! ([`tunnel`]). A CONNECT to a `passthrough` target is tunnelled blind (no TLS termination,
//! no token), over a connection bearerd opens before it answers, through `[egress]`'s proxy
//! when one is set for the target (as bearerd's own calls are): a target that cannot be
//! reached, or that the proxy refuses, gets `502` and a JSON body rather than a `200` on a
//! dead tunnel. Anything else is refused with `403` and a JSON body, and nothing is opened: an
//! IP literal or another port is refused unless a route names it. bearerd is not an open
//! proxy.

pub(crate) mod ca;
mod leaf;
pub(crate) mod metrics;
pub(crate) mod tunnel;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{Request, Response, StatusCode, Uri};
use tokio::net::TcpStream;
use tower_service::Service as _;

use super::body::ResponseBody;
use super::error::ProxyError;
use super::route::Listener;
use crate::config;
use crate::egress::{Dialer, Egress};
use metrics::{Series, Tunnel};

pub(crate) use leaf::Leaves;

/// The port a CONNECT to a routed host must name: the one an `https://` URL without a port
/// dials.
const HTTPS_PORT: u16 = 443;

/// How long bearerd waits to connect to a passthrough target (through the proxy: until the
/// proxy has answered its CONNECT).
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener's interception: its CA's leaves, its passthrough targets, its limits and series.
pub(crate) struct Intercept {
    /// Leaves of the listener's CA, by host.
    pub leaves: Leaves,
    /// Targets tunnelled blind.
    passthrough: Vec<(String, u16)>,
    /// Connects to passthrough targets: directly, or through `[egress]` as bearerd's own
    /// calls do.
    dialer: Dialer,
    /// How long a client may take over its TLS handshake.
    pub handshake_timeout: Duration,
    /// Where tunnels and handshakes are counted.
    pub metrics: Series,
}

impl Intercept {
    /// The interception of a listener with `settings`, signing with `ca`; passthrough
    /// tunnels go through `egress` when given.
    pub(crate) fn new(
        settings: &config::Intercept,
        ca: Arc<ca::Ca>,
        metrics: Series,
        egress: Option<&Arc<Egress>>,
    ) -> Self {
        Self {
            leaves: Leaves::new(ca, metrics.certificates()),
            passthrough: settings.passthrough.clone(),
            dialer: crate::tls::tcp(PASSTHROUGH_CONNECT_TIMEOUT, egress),
            handshake_timeout: settings.handshake_timeout,
            metrics,
        }
    }
}

/// Where a CONNECT asked to go: the host as a URI names it (lowercase, no trailing dot, an
/// IPv6 address in brackets) and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The host.
    pub host: Box<str>,
    /// The port.
    pub port: u16,
}

impl Target {
    /// The host as a certificate names it: an IPv6 address without brackets.
    pub(crate) fn certificate_name(&self) -> &str {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
    }

    /// Whether `authority` (a request's `Host` or `:authority`) names this target: the same
    /// host, and this port or (for 443) none.
    pub(crate) fn is_named_by(&self, authority: &str) -> bool {
        let Ok(authority) = authority.parse::<http::uri::Authority>() else {
            return false;
        };
        let host = authority.host();
        let host = host.strip_suffix('.').unwrap_or(host);
        let port_matches = match authority.port_u16() {
            Some(port) => port == self.port,
            None => self.port == HTTPS_PORT,
        };
        port_matches && host.eq_ignore_ascii_case(&self.host) && !authority.as_str().contains('@')
    }
}

/// What a CONNECT gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// TLS terminated by bearerd; requests inside go to the route.
    Intercept(Target),
    /// Bytes copied both ways to the target, unseen.
    Passthrough(Target),
    /// Refused with 403 (or 400 for a target that is not `host:port`).
    Refuse(Tunnel),
}

/// What a CONNECT with target `uri` (authority-form, RFC 9110 §9.3.6) gets on `listener`.
pub(crate) fn decide(listener: &Listener, intercept: &Intercept, uri: &Uri) -> Decision {
    let Some(authority) = uri.authority() else {
        return Decision::Refuse(Tunnel::BadTarget);
    };
    let (Some(port), false) = (authority.port_u16(), authority.as_str().contains('@')) else {
        return Decision::Refuse(Tunnel::BadTarget);
    };
    if uri
        .path_and_query()
        .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Decision::Refuse(Tunnel::BadTarget);
    }
    let host = authority.host();
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host.is_empty() {
        return Decision::Refuse(Tunnel::BadTarget);
    }
    let target = Target {
        host: host.into(),
        port,
    };
    if intercept
        .passthrough
        .iter()
        .any(|(h, p)| *p == port && **h == *target.host)
    {
        return Decision::Passthrough(target);
    }
    // A route names the host (exactly, or by its one-label wildcard) and this port (443, or
    // the one its host names): an IP literal only when a route's host is that address.
    if listener.routes.names_target(&target.host, port) {
        return Decision::Intercept(target);
    }
    Decision::Refuse(Tunnel::NotServed)
}

/// The answer to a refused CONNECT: 403 with bearerd's JSON body (400 for a malformed target).
pub(crate) fn refusal(listener: &Listener, reason: Tunnel) -> Response<ResponseBody> {
    let error = match reason {
        Tunnel::BadTarget => ProxyError::BadRequest {
            reason: "a CONNECT names its target as host:port (RFC 9110 §9.3.6)".into(),
        },
        _ => ProxyError::TunnelRefused,
    };
    tracing::debug!(listener = %listener.name, ?reason, "CONNECT refused");
    error.into_response(&listener.name)
}

/// The answer to an accepted CONNECT: 200 with no body (RFC 9110 §9.3.6).
pub(crate) fn accepted() -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::Right(http_body_util::Full::new(
        bytes::Bytes::new(),
    )));
    *response.status_mut() = StatusCode::OK;
    response
}

/// What an accepted CONNECT leaves for its connection's task: the upgrade to await and where
/// the tunnel goes.
pub(crate) struct Pending {
    /// Resolves to the app connection's IO once hyper has sent the 200.
    pub upgrade: hyper::upgrade::OnUpgrade,
    /// Intercept or passthrough.
    pub opening: Opening,
}

/// Where an accepted tunnel goes.
pub(crate) enum Opening {
    /// TLS terminated by bearerd; requests inside go to the route.
    Intercept(Target),
    /// Bytes copied blind to the target, over the connection already opened to it.
    Passthrough(TcpStream),
}

/// The answer to a CONNECT: at once, or once a passthrough target has been connected to.
pub(crate) enum Answer {
    /// Decided without waiting.
    Now(Response<ResponseBody>),
    /// Connecting to a passthrough target: `200` once connected, `502` (`504`) if not.
    Dialling(Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>),
}

impl Answer {
    /// The response. The answer stays in its box until it is ready: the request's future
    /// holds a pointer, not a response, while it waits.
    pub(crate) async fn response(self: Box<Self>) -> Response<ResponseBody> {
        match *self {
            Self::Now(response) => response,
            Self::Dialling(dialling) => dialling.await,
        }
    }
}

/// Where an accepted CONNECT's [`Pending`] is left for the task that serves the tunnel.
pub(crate) type PendingSlot = Arc<Mutex<Option<Pending>>>;

/// Answers a CONNECT on a listener with interception: decides, counts a refusal, and for an
/// accepted one leaves the upgrade in `pending` for the task that serves the tunnel (for a
/// passthrough target, once it is connected to).
pub(crate) fn connect<B>(
    listener: &Arc<Listener>,
    intercept: &Arc<Intercept>,
    request: &mut Request<B>,
    pending: &PendingSlot,
) -> Answer {
    let decision = decide(listener, intercept, request.uri());
    let target = match decision {
        Decision::Refuse(reason) => {
            intercept.metrics.tunnel(reason);
            return Answer::Now(refusal(listener, reason));
        }
        Decision::Intercept(target) => {
            intercept.metrics.tunnel(Tunnel::Intercepted);
            let upgrade = hyper::upgrade::on(request);
            leave(pending, upgrade, Opening::Intercept(target));
            return Answer::Now(accepted());
        }
        Decision::Passthrough(target) => target,
    };
    let upgrade = hyper::upgrade::on(request);
    let (listener, intercept, pending) = (
        Arc::clone(listener),
        Arc::clone(intercept),
        Arc::clone(pending),
    );
    Answer::Dialling(Box::pin(async move {
        match dial(&intercept, &target).await {
            Ok(upstream) => {
                intercept.metrics.tunnel(Tunnel::Passthrough);
                leave(&pending, upgrade, Opening::Passthrough(upstream));
                accepted()
            }
            Err(error) => {
                intercept.metrics.tunnel(Tunnel::Unreachable);
                tracing::warn!(listener = %listener.name, %error, "passthrough target unreachable");
                error.into_response(&listener.name)
            }
        }
    }))
}

fn leave(pending: &PendingSlot, upgrade: hyper::upgrade::OnUpgrade, opening: Opening) {
    *pending.lock().unwrap_or_else(PoisonError::into_inner) = Some(Pending { upgrade, opening });
}

/// A connection to the passthrough `target`, through `[egress]`'s proxy unless there is none
/// or `no_proxy` names the host: as an `https://` target, which a CONNECT tunnel carries by
/// convention (`HTTPS_PROXY` is the proxy of `use_env`).
async fn dial(intercept: &Intercept, target: &Target) -> Result<TcpStream, ProxyError> {
    let to = format!("{}:{}", target.host, target.port);
    let unreachable = |source: Box<dyn std::error::Error + Send + Sync>| {
        ProxyError::passthrough_unreachable(to.clone(), source)
    };
    let uri: Uri = format!("https://{to}")
        .parse()
        .map_err(|e: http::uri::InvalidUri| unreachable(e.into()))?;
    let dialling = intercept.dialer.clone().call(uri);
    match tokio::time::timeout(PASSTHROUGH_CONNECT_TIMEOUT, dialling).await {
        Ok(Ok(io)) => {
            let stream = io.into_inner();
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(error)) => Err(unreachable(error)),
        // DNS is outside HttpConnector's connect timeout.
        Err(_) => Err(unreachable(Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no connection within {}",
                humantime::format_duration(PASSTHROUGH_CONNECT_TIMEOUT)
            ),
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_is_named_by_its_host_with_its_port_or_none_for_443() {
        let target = Target {
            host: "api.example".into(),
            port: 443,
        };
        assert!(target.is_named_by("api.example"));
        assert!(target.is_named_by("API.example.:443"));
        assert!(!target.is_named_by("api.example:8443"));
        assert!(!target.is_named_by("other.example"));
        assert!(!target.is_named_by("user@api.example"));
        let v6 = Target {
            host: "[::1]".into(),
            port: 443,
        };
        assert!(v6.is_named_by("[::1]:443"));
        assert_eq!(v6.certificate_name(), "::1");
    }
}
