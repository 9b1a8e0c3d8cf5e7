//! Inside an accepted CONNECT: the TLS handshake under its deadline, with a leaf for exactly
//! the CONNECT's target; the requests inside, given the shape of a forward proxy's
//! absolute-form requests so that they take the listener's usual path; and blind tunnels to
//! `passthrough` targets.
//!
//! A handshake fails without a certificate being minted when its SNI names another host than
//! the CONNECT did. A request inside whose `Host` or `:authority` names another host gets 421
//! (RFC 9110 §15.5.20): the tunnel was opened, and its certificate minted, for one host only.

use http::header::HOST;
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Uri};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use super::metrics::Handshake;
use super::{Intercept, Target};
use crate::proxy::error::ProxyError;

/// A request's extension marking it as having come through an intercepted tunnel, for the
/// access log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Intercepted;

/// The TLS side of an intercepted tunnel: the handshake with the app, finished by
/// `handshake_timeout` after the tunnel opened. Each failure is counted by reason; no leaf is
/// minted unless the client asked for the CONNECT's own host (or sent no SNI, as for an
/// address).
pub(crate) async fn handshake<IO>(
    io: IO,
    target: &Target,
    intercept: &Intercept,
) -> Result<TlsStream<IO>, Handshake>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + intercept.handshake_timeout;
    let failed = |reason: Handshake| {
        intercept.metrics.handshake_failed(reason);
        tracing::debug!(host = %target.host, ?reason, "TLS handshake in a tunnel failed");
        reason
    };
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout_at(deadline, acceptor).await {
        Err(_) => return Err(failed(Handshake::Timeout)),
        Ok(Err(error)) => return Err(failed(io_reason(&error))),
        Ok(Ok(start)) => start,
    };
    let name = target.certificate_name();
    if let Some(sni) = start.client_hello().server_name() {
        let sni = sni.strip_suffix('.').unwrap_or(sni);
        if !sni.eq_ignore_ascii_case(name) {
            return Err(failed(Handshake::SniMismatch));
        }
    }
    // Minted on the blocking pool (or awaited from a mint under way) within the deadline.
    let config = match tokio::time::timeout_at(deadline, intercept.leaves.server_config(name)).await
    {
        Err(_) => return Err(failed(Handshake::Timeout)),
        Ok(Err(error)) => {
            tracing::warn!(host = %target.host, %error, "cannot mint a leaf certificate");
            return Err(failed(Handshake::Certificate));
        }
        Ok(Ok(config)) => config,
    };
    match tokio::time::timeout_at(deadline, start.into_stream(config)).await {
        Err(_) => Err(failed(Handshake::Timeout)),
        Ok(Err(error)) => Err(failed(io_reason(&error))),
        Ok(Ok(stream)) => Ok(stream),
    }
}

/// A closed connection apart from a TLS failure.
fn io_reason(error: &std::io::Error) -> Handshake {
    match error.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => Handshake::Closed,
        _ => Handshake::Tls,
    }
}

/// Whether the app chose HTTP/2 by ALPN.
pub(crate) fn chose_h2<IO>(stream: &TlsStream<IO>) -> bool {
    stream.get_ref().1.alpn_protocol() == Some(b"h2")
}

/// Gives a request from inside a tunnel to `target` the shape of a forward proxy's
/// absolute-form request to `https://target/…`, after checking that it names that target:
/// its `Host` (HTTP/1.1) or `:authority` (HTTP/2), and an absolute target if it has one.
/// Marks it [`Intercepted`].
pub(crate) fn to_target<B>(request: &mut Request<B>, target: &Target) -> Result<(), ProxyError> {
    let misdirected = || ProxyError::Misdirected {
        target: target.host.to_string(),
    };
    request.extensions_mut().insert(Intercepted);
    if let Some(authority) = request.uri().authority() {
        if !target.is_named_by(authority.as_str()) {
            return Err(misdirected());
        }
    }
    let mut hosts = request.headers().get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) => {
            let named = host.to_str().is_ok_and(|host| target.is_named_by(host));
            if !named {
                return Err(misdirected());
            }
        }
        (Some(_), Some(_)) => {
            return Err(ProxyError::BadRequest {
                reason: "the request has more than one Host header (RFC 9112 §3.2)".into(),
            })
        }
        // HTTP/2 may carry `:authority` alone; HTTP/1.1 needs a Host (RFC 9112 §3.2).
        (None, _) if request.uri().authority().is_some() => {}
        (None, _) => {
            return Err(ProxyError::BadRequest {
                reason: "the request has no Host header (RFC 9112 §3.2)".into(),
            })
        }
    }
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTPS);
    let authority = if target.port == 443 {
        target.host.parse()
    } else {
        format!("{}:{}", target.host, target.port).parse()
    };
    parts.authority = Some(authority.map_err(|_| misdirected())?);
    parts.path_and_query = Some(path);
    *request.uri_mut() = Uri::from_parts(parts).map_err(|_| misdirected())?;
    Ok(())
}

/// Copies bytes both ways between the app's tunnel and a passthrough target (connected to
/// before the CONNECT was answered) until either side closes. No byte is looked at; no token
/// is added.
pub(crate) async fn passthrough(mut app: TokioIo<Upgraded>, mut upstream: TcpStream) {
    let _ = tokio::io::copy_bidirectional(&mut app, &mut upstream).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            host: "api.example".into(),
            port: 443,
        }
    }

    #[test]
    fn an_origin_form_request_for_the_target_becomes_absolute_form() {
        let mut request = Request::builder()
            .uri("/v1/things?x=1")
            .header(HOST, "api.example")
            .body(())
            .unwrap();
        to_target(&mut request, &target()).unwrap();
        assert_eq!(request.uri(), "https://api.example/v1/things?x=1");
        assert!(request.extensions().get::<Intercepted>().is_some());
    }

    #[test]
    fn another_host_is_misdirected() {
        for (uri, host) in [
            ("/v1", Some("other.example")),
            ("/v1", Some("api.example:8443")),
            ("https://other.example/v1", Some("api.example")),
            ("https://other.example/v1", None),
        ] {
            let mut request = Request::builder().uri(uri);
            if let Some(host) = host {
                request = request.header(HOST, host);
            }
            let mut request = request.body(()).unwrap();
            let refused = to_target(&mut request, &target()).unwrap_err();
            assert_eq!(refused.status(), 421, "{uri} {host:?}");
        }
        let mut h2 = Request::builder()
            .uri("https://api.example/v1")
            .body(())
            .unwrap();
        assert!(to_target(&mut h2, &target()).is_ok());
    }
}
