//! Streamed answers (server-sent events, chunked bodies) through bearerd: each chunk reaches
//! the app as it arrives, the response header timeout stops once the head is in, and
//! `response_body_idle_timeout` ends a body that goes silent, on HTTP/1.1 and HTTP/2.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{serve, token_endpoint, token_ok, Sidecar};
use tokio::sync::mpsc;

/// A response body whose chunks the test sends, one at a time; it ends when the sender is
/// dropped.
struct Chunks(mpsc::UnboundedReceiver<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// An upstream of server-sent events: each request gets the head at once, then the events
/// the test sends through the channel it finds in `streams`.
async fn events_upstream(
    streams: Arc<Mutex<Vec<mpsc::UnboundedSender<Bytes>>>>,
) -> support::Server {
    serve(move |_request| {
        let streams = Arc::clone(&streams);
        async move {
            let (events, chunks) = mpsc::unbounded_channel();
            streams.lock().unwrap().push(events);
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Chunks(chunks).boxed())
                .unwrap()
        }
    })
    .await
}

async fn sidecar(
    upstream: &support::Server,
    tokens: &support::TokenEndpoint,
    route: &str,
) -> Sidecar {
    Sidecar::start(&format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[upstream]]
name = "api"
listen = "127.0.0.1:0"
url = "{}"
{route}

[upstream.token]
url = "{}"
client_id = "app"
client_secret = "s3cret"
"#,
        upstream.url(""),
        tokens.url("/oauth/token"),
    ))
    .await
}

fn client(http2: bool) -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http()
}

/// The next data chunk of `body`, skipping trailers and empty frames (HTTP/2 may end a
/// stream with an empty DATA frame); `None` at its end.
async fn next_data(body: &mut hyper::body::Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        match body.frame().await? {
            Ok(frame) => match frame.into_data() {
                Ok(data) if !data.is_empty() => return Some(Ok(data)),
                _ => {}
            },
            Err(error) => return Some(Err(error)),
        }
    }
}

/// The sender of the one stream the upstream has opened.
fn stream_of(streams: &Mutex<Vec<mpsc::UnboundedSender<Bytes>>>) -> mpsc::UnboundedSender<Bytes> {
    streams.lock().unwrap().last().unwrap().clone()
}

#[tokio::test]
async fn each_event_reaches_the_app_before_the_stream_ends() {
    for http2 in [false, true] {
        let streams = Arc::default();
        let upstream = events_upstream(Arc::clone(&streams)).await;
        let tokens = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
        let sidecar = sidecar(&upstream, &tokens, "").await;
        let response = client(http2)
            .request(
                Request::get(sidecar.url("api", "/events"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let events = stream_of(&streams);
        events.send(Bytes::from_static(b"data: one\n\n")).unwrap();
        // The upstream has not ended the stream: the event arrives on its own.
        assert_eq!(
            next_data(&mut body).await.unwrap().unwrap(),
            "data: one\n\n"
        );
        // Only now, the signal that it arrived: the second event, and the end.
        events.send(Bytes::from_static(b"data: two\n\n")).unwrap();
        drop(events);
        streams.lock().unwrap().clear();
        assert_eq!(
            next_data(&mut body).await.unwrap().unwrap(),
            "data: two\n\n"
        );
        let end = next_data(&mut body).await;
        assert!(end.is_none(), "http2: {http2}: {end:?}");
    }
}

#[tokio::test]
async fn a_stream_outlives_the_response_header_timeout_once_its_head_is_in() {
    for http2 in [false, true] {
        let streams = Arc::default();
        let upstream = events_upstream(Arc::clone(&streams)).await;
        let tokens = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
        let sidecar = sidecar(&upstream, &tokens, r#"response_header_timeout = "200ms""#).await;
        let response = client(http2)
            .request(
                Request::get(sidecar.url("api", "/events"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        let mut body = response.into_body();
        let events = stream_of(&streams);
        events.send(Bytes::from_static(b"data: one\n\n")).unwrap();
        assert_eq!(
            next_data(&mut body).await.unwrap().unwrap(),
            "data: one\n\n"
        );
        // What is tested is time passing: twice the header timeout, with the stream open.
        tokio::time::sleep(Duration::from_millis(400)).await;
        events.send(Bytes::from_static(b"data: two\n\n")).unwrap();
        drop(events);
        streams.lock().unwrap().clear();
        assert_eq!(
            next_data(&mut body).await.unwrap().unwrap(),
            "data: two\n\n"
        );
        let end = next_data(&mut body).await;
        assert!(end.is_none(), "http2: {http2}: {end:?}");
    }
}

#[tokio::test]
async fn a_body_silent_for_response_body_idle_timeout_is_ended() {
    for http2 in [false, true] {
        let streams = Arc::default();
        let upstream = events_upstream(Arc::clone(&streams)).await;
        let tokens = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
        let sidecar = sidecar(
            &upstream,
            &tokens,
            r#"response_body_idle_timeout = "200ms""#,
        )
        .await;
        let response = client(http2)
            .request(
                Request::get(sidecar.url("api", "/events"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        let mut body = response.into_body();
        let events = stream_of(&streams);
        events.send(Bytes::from_static(b"data: one\n\n")).unwrap();
        assert_eq!(
            next_data(&mut body).await.unwrap().unwrap(),
            "data: one\n\n"
        );
        // The upstream keeps the stream open and sends nothing more: bearerd ends it, which
        // the app sees as a body cut short (HTTP/1.1: the connection closes mid-body;
        // HTTP/2: the stream is reset), not as its end.
        let rest = next_data(&mut body).await;
        assert!(matches!(rest, Some(Err(_))), "http2: {http2}: {rest:?}");
        drop(events);
    }
}

#[tokio::test]
async fn response_body_idle_timeout_zero_is_none() {
    let tokens = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = support::serve(support::echo).await;
    // Parsed as "no limit" (not refused as a zero duration is elsewhere); a request goes.
    let sidecar = sidecar(&upstream, &tokens, r#"response_body_idle_timeout = "0""#).await;
    assert_eq!(
        support::get(&sidecar.url("api", "/x")).await.status,
        StatusCode::OK
    );
}
