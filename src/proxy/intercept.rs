//! TLS interception on a forward listener (`[listener.intercept]`): what a CONNECT is
//! answered, and the state a listener keeps for it.
//!
//! A CONNECT to a routed host on port 443 is answered `200`; the tunnel is then served as
//! TLS with a leaf for exactly that name ([`leaf`]) from the listener's CA ([`ca`]), and each
//! request inside goes through the same handling as any request to the listener
//! ([`tunnel`]). A CONNECT to a `passthrough` target is tunnelled blind (no TLS termination,
//! no token). Anything else is refused with `403` and a JSON body, and nothing is opened: an
//! IP literal or another port is refused unless a route names it. bearerd is not an open
//! proxy.

pub(crate) mod ca;
mod leaf;
pub(crate) mod metrics;
pub(crate) mod tunnel;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode, Uri};

use super::body::ResponseBody;
use super::error::ProxyError;
use super::route::Listener;
use crate::config;
use metrics::{Series, Tunnel};

pub(crate) use leaf::Leaves;

/// The port a CONNECT to a routed host must name: the one an `https://` URL without a port
/// dials.
const HTTPS_PORT: u16 = 443;

/// A listener's interception: its CA's leaves, its passthrough targets, its limits and series.
pub(crate) struct Intercept {
    /// Leaves of the listener's CA, by host.
    pub leaves: Leaves,
    /// Targets tunnelled blind.
    passthrough: Vec<(String, u16)>,
    /// How long a client may take over its TLS handshake.
    pub handshake_timeout: Duration,
    /// Where tunnels and handshakes are counted.
    pub metrics: Series,
}

impl Intercept {
    /// The interception of a listener with `settings`, signing with `ca`.
    pub(crate) fn new(settings: &config::Intercept, ca: Arc<ca::Ca>, metrics: Series) -> Self {
        Self {
            leaves: Leaves::new(ca),
            passthrough: settings.passthrough.clone(),
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
    pub decision: Decision,
}

/// Answers a CONNECT on a listener with interception: decides, counts a refusal, and for an
/// accepted one leaves the upgrade in `pending` for the connection's task.
pub(crate) fn connect<B>(
    listener: &Listener,
    intercept: &Intercept,
    request: &mut Request<B>,
    pending: &std::sync::Mutex<Option<Pending>>,
) -> Response<ResponseBody> {
    let decision = decide(listener, intercept, request.uri());
    if let Decision::Refuse(reason) = decision {
        intercept.metrics.tunnel(reason);
        return refusal(listener, reason);
    }
    intercept.metrics.tunnel(match decision {
        Decision::Passthrough(_) => Tunnel::Passthrough,
        _ => Tunnel::Intercepted,
    });
    let upgrade = hyper::upgrade::on(request);
    *pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Pending { upgrade, decision });
    accepted()
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
