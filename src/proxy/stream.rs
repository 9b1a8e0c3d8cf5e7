//! A request on an HTTP/2 app connection (h2c): what differs from HTTP/1.1 before and after
//! `forward` does the same work as for any request.
//!
//! Before: `:authority` plays the part of `Host` (RFC 9113 §8.3.1). On a reverse listener the
//! request is given the shape an HTTP/1.1 one has (origin-form, `Host` set from `:authority`),
//! so that routes, refusals and rewriting see one kind of request. A `Host` that differs from
//! `:authority` is refused: a route chosen by one and a log naming the other could not both
//! be right.
//!
//! An extended CONNECT for a WebSocket (RFC 8441) becomes the HTTP/1.1 handshake first
//! ([`upgrade::from_extended_connect`]).
//! Inside an intercepted tunnel, `:authority` must name the tunnel's target (421 otherwise).
//!
//! Around: the stream takes an upstream connection for itself ([`pool::Slot`]) and gives it
//! back once its response has ended ([`Released`]), as it cannot share its app connection's.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{CONNECTION, HOST};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::body::ResponseBody;
use super::connection::RequestGuard;
use super::error::ProxyError;
use super::forward;
use super::intercept::tunnel::to_target;
use super::intercept::Target;
use super::pool::Slot;
use super::route::Listener;
use super::upgrade;
use crate::config::Mode;

/// Answers one stream of an HTTP/2 app connection.
pub(super) async fn serve(
    listener: &Listener,
    mut request: Request<Incoming>,
    guard: &RequestGuard,
    tunnel: Option<&Target>,
) -> Response<Released> {
    // A WebSocket over HTTP/2 (RFC 8441) goes on as the HTTP/1.1 handshake (`upgrade`).
    upgrade::from_extended_connect(&mut request, guard);
    // Inside an intercepted tunnel: `:authority` must name the tunnel's target.
    let checked = match tunnel {
        Some(target) => to_target(&mut request, target),
        None => Ok(()),
    };
    let mut response = match checked.and_then(|()| authority_as_host(&mut request, listener.mode)) {
        Ok(()) => match forward::route(listener, &request) {
            Ok(route) => {
                let slot = Slot::default();
                let on = forward::Connection {
                    slot: &slot,
                    activity: None,
                    trace: None,
                };
                let response = forward::forward(route, listener.mode, on, request).await;
                let idle = route.response_body_idle_timeout.map(BodyIdle::new);
                return response.map(|body| Released { body, slot, idle });
            }
            Err(error) => forward::unrouted(listener, &request, error),
        },
        Err(error) => forward::unrouted(listener, &request, error),
    };
    // bearerd's own answers say `Connection: close` where HTTP/1.1 needs it; HTTP/2 has no
    // such header (RFC 9113 §8.2.2) and ends streams, not connections.
    response.headers_mut().remove(CONNECTION);
    response.map(|body| Released {
        body,
        slot: Slot::default(),
        idle: None,
    })
}

/// Gives `request` the shape of an HTTP/1.1 request to the same listener: on a reverse
/// listener its target becomes origin-form and `:authority` its `Host`. A forward listener
/// keeps the absolute target, whose host chooses the route, as an HTTP/1.1 proxy request's
/// does. Either way a `Host` header must name what `:authority` names.
fn authority_as_host<B>(request: &mut Request<B>, mode: Mode) -> Result<(), ProxyError> {
    let Some(authority) = request.uri().authority().cloned() else {
        // No `:authority`: a `Host`, if any, names the host (RFC 9113 §8.3.1).
        return Ok(());
    };
    let mut hosts = request.headers().get_all(HOST).iter();
    if let Some(host) = hosts.next() {
        if hosts.next().is_some()
            || !host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        {
            return Err(ProxyError::BadRequest {
                reason: "the Host header and :authority name different hosts (RFC 9113 §8.3.1)"
                    .into(),
            });
        }
    }
    if mode == Mode::Reverse {
        let host =
            HeaderValue::from_str(authority.as_str()).map_err(|_| ProxyError::BadRequest {
                reason: ":authority is not a valid host".into(),
            })?;
        request.headers_mut().insert(HOST, host);
        let origin_form = request
            .uri()
            .path_and_query()
            .cloned()
            .map_or_else(|| Uri::from_static("/"), Uri::from);
        *request.uri_mut() = origin_form;
    }
    Ok(())
}

/// A stream's response body, holding the upstream connection the stream took until the body
/// has ended (or the client reset the stream), then giving it back to its pool.
pub(crate) struct Released {
    body: ResponseBody,
    slot: Slot,
    /// The route's `response_body_idle_timeout`: a timer per stream (the watchdog's one
    /// deadline serves HTTP/1.1's one response at a time).
    idle: Option<BodyIdle>,
}

/// A response body's idle deadline, made at its first wait and pushed back whenever a frame
/// arrives (as [`super::body::AppBody`]'s).
struct BodyIdle {
    limit: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
    progressed: bool,
}

impl BodyIdle {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            deadline: None,
            progressed: false,
        }
    }

    /// Whether the body, pending now, has been silent for the limit.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if std::mem::take(&mut self.progressed) {
            deadline.as_mut().reset(Instant::now() + limit);
        }
        deadline.as_mut().poll(cx).is_ready()
    }
}

/// The error that ends a response body silent for its idle timeout (the stream is reset).
#[derive(Debug, thiserror::Error)]
#[error("the upstream's response body sent nothing for {}", humantime::format_duration(*.0))]
struct BodyStalled(Duration);

impl Released {
    /// bearerd's own answer, which holds no upstream connection.
    pub(crate) fn answer(body: ResponseBody) -> Self {
        Self {
            body,
            slot: Slot::default(),
            idle: None,
        }
    }
}

impl Drop for Released {
    fn drop(&mut self) {
        self.slot.release();
    }
}

impl Body for Released {
    type Data = <ResponseBody as Body>::Data;
    type Error = <ResponseBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Some(idle) = &mut this.idle {
            match &polled {
                Poll::Ready(Some(Ok(_))) => idle.progressed = true,
                Poll::Pending if idle.expired(cx) => {
                    return Poll::Ready(Some(Err(BodyStalled(idle.limit).into())));
                }
                _ => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h2(uri: &str, host: Option<&'static str>) -> Request<()> {
        let mut request = Request::builder()
            .uri(uri)
            .version(http::Version::HTTP_2)
            .body(())
            .unwrap();
        if let Some(host) = host {
            request
                .headers_mut()
                .insert(HOST, HeaderValue::from_static(host));
        }
        request
    }

    #[test]
    fn on_a_reverse_listener_authority_becomes_host_and_the_target_origin_form() {
        let mut request = h2("http://localhost:8080/v1/things?x=1", None);
        authority_as_host(&mut request, Mode::Reverse).unwrap();
        assert_eq!(request.uri(), "/v1/things?x=1");
        assert_eq!(request.headers()[HOST], "localhost:8080");
    }

    #[test]
    fn a_forward_listener_keeps_the_absolute_target() {
        let mut request = h2("http://api.example/v1", Some("API.example"));
        authority_as_host(&mut request, Mode::Forward).unwrap();
        assert_eq!(request.uri(), "http://api.example/v1");
    }

    #[test]
    fn a_host_that_differs_from_authority_is_refused() {
        for host in ["other.example", "api.example:8443"] {
            let mut request = h2("http://api.example/v1", Some(host));
            let refused = authority_as_host(&mut request, Mode::Reverse);
            assert!(
                matches!(refused, Err(ProxyError::BadRequest { .. })),
                "{host}"
            );
        }
        let mut same = h2("http://api.example/v1", Some("api.example"));
        assert!(authority_as_host(&mut same, Mode::Reverse).is_ok());
        let mut two = h2("http://api.example/v1", Some("api.example"));
        two.headers_mut()
            .append(HOST, HeaderValue::from_static("api.example"));
        assert!(authority_as_host(&mut two, Mode::Reverse).is_err());
    }

    #[test]
    fn without_authority_the_request_is_left_as_it_came() {
        let mut request = h2("/v1", Some("api.example"));
        authority_as_host(&mut request, Mode::Reverse).unwrap();
        assert_eq!(request.uri(), "/v1");
        assert_eq!(request.headers()[HOST], "api.example");
    }
}
