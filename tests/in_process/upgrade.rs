//! Upgrades (WebSocket) through bearerd: the handshake carries the token, the upstream's 101
//! opens a tunnel that copies bytes both ways, a refusal comes back as it was, a protocol the
//! route does not list is dropped, and the tunnel lives under the listener's limits.
//! (Real WebSocket clients and servers: tests/interop/websocket.rs.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use support::{echo, full, serve, token_endpoint, token_ok, Sidecar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// An upstream that switches every request asking for `websocket` to an echo of its bytes
/// (`bye` alone makes it close the connection instead), after checking that the handshake
/// carries bearerd's token; anything else gets `echo`. On `/reply-at-end` it reads until the
/// end of the app's stream and only then answers (`got N bytes`) and closes; on
/// `/half-closing` it shuts its sending side at once and reads, discarding, until the end.
async fn switching_upstream() -> support::Server {
    serve(switching).await
}

/// The handler of [`switching_upstream`].
async fn switching(request: Request<hyper::body::Incoming>) -> http::Response<support::Body> {
    switching_for(request, "Bearer tok-ws", StatusCode::FORBIDDEN).await
}

/// [`switching`], taking `token` only and answering others `refusal`.
async fn switching_for(
    mut request: Request<hyper::body::Incoming>,
    token: &str,
    refusal: StatusCode,
) -> http::Response<support::Body> {
    {
        let wants = request
            .headers()
            .get("upgrade")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        if !wants {
            return echo(request).await;
        }
        if request.headers().get("authorization").map(|v| v.as_bytes()) != Some(token.as_bytes()) {
            return http::Response::builder()
                .status(refusal)
                .body(full("no token"))
                .unwrap();
        }
        let on = hyper::upgrade::on(&mut request);
        let path = request.uri().path().to_owned();
        tokio::spawn(async move {
            let mut io = TokioIo::new(on.await.unwrap());
            let mut buf = [0u8; 1024];
            match path.as_str() {
                "/reply-at-end" => {
                    let mut all = Vec::new();
                    if io.read_to_end(&mut all).await.is_ok() {
                        let reply = format!("got {} bytes", all.len());
                        let _ = io.write_all(reply.as_bytes()).await;
                        let _ = io.shutdown().await;
                    }
                    return;
                }
                "/half-closing" => {
                    let _ = io.shutdown().await;
                    while let Ok(1..) = io.read(&mut buf).await {}
                    return;
                }
                _ => {}
            }
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    // The upstream closes its side: the socket is dropped.
                    Ok(n) if &buf[..n] == b"bye" => break,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        http::Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .body(full(""))
            .unwrap()
    }
}

/// bearerd in front of `upstream`, with `server` the body of its `[server]` table and `route`
/// more keys of its `[[upstream]]`.
async fn sidecar(
    upstream: &support::Server,
    tokens: &support::TokenEndpoint,
    server: &str,
    route: &str,
) -> Sidecar {
    Sidecar::start(&format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[server]
{server}

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

/// An answer to a handshake: the status, headers and body, or the tunnel after a 101.
enum Handshake {
    Switched(TokioIo<Upgraded>, http::HeaderMap),
    Answered(StatusCode, Bytes),
}

/// Sends an HTTP/1.1 request asking to switch to `protocol` on a connection of its own.
async fn handshake(url: &str, protocol: &str) -> Handshake {
    let uri: http::Uri = url.parse().unwrap();
    let authority = uri.authority().unwrap().clone();
    let stream = TcpStream::connect(authority.as_str()).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection.with_upgrades());
    let request = Request::get(uri.path())
        .header("host", authority.as_str())
        .header("connection", "Upgrade")
        .header("upgrade", protocol)
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "13")
        .body(Full::default())
        .unwrap();
    let mut response = sender.send_request(request).await.unwrap();
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let headers = response.headers().clone();
        let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
        Handshake::Switched(TokioIo::new(upgraded), headers)
    } else {
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Handshake::Answered(status, body)
    }
}

async fn scrape(sidecar: &Sidecar) -> String {
    let admin = sidecar.running().admin_addr();
    let scrape = support::get(&format!("http://{admin}/metrics")).await;
    String::from_utf8_lossy(&scrape.body).into_owned()
}

/// `bearerd_upgraded_connections_open` of `api` in `scrape`.
fn open(scrape: &str) -> Option<f64> {
    support::metric(
        scrape,
        r#"bearerd_upgraded_connections_open{upstream="api"}"#,
    )
}

/// Waits until `bearerd_upgraded_connections_open` of `api`, as `render` reads it, is 0.
/// Called once a side has seen the tunnel end (EOF): bearerd's tunnel task ends a moment after
/// the last byte it passed on, so the gauge is looked at until then, within a bound.
async fn wait_until_none_open<F, Fut>(mut render: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = render().await;
        if open(&scrape) == Some(0.0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the tunnel is still counted open:\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn tokens_ws() -> impl std::future::Future<Output = support::TokenEndpoint> {
    token_endpoint(|_, _| async { token_ok("tok-ws", 3600) })
}

#[tokio::test]
async fn a_websocket_handshake_gets_the_token_and_bytes_flow_both_ways_counted() {
    let upstream = switching_upstream().await;
    let tokens = tokens_ws().await;
    let sidecar = sidecar(&upstream, &tokens, "", "").await;
    let Handshake::Switched(mut tunnel, headers) =
        handshake(&sidecar.url("api", "/socket"), "websocket").await
    else {
        panic!("not switched");
    };
    assert_eq!(headers["upgrade"], "websocket");
    assert!(headers["connection"]
        .to_str()
        .unwrap()
        .eq_ignore_ascii_case("upgrade"));
    assert_eq!(
        headers["sec-websocket-accept"],
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    for message in [&b"hello"[..], b"over the tunnel"] {
        tunnel.write_all(message).await.unwrap();
        let mut back = vec![0u8; message.len()];
        tunnel.read_exact(&mut back).await.unwrap();
        assert_eq!(back, message);
    }
    let scrape = scrape(&sidecar).await;
    let value = |series: &str| support::metric(&scrape, series);
    assert_eq!(
        value(r#"bearerd_upgraded_connections_total{upstream="api"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(r#"bearerd_upgraded_connections_open{upstream="api"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(r#"bearerd_upgraded_bytes_total{direction="to_upstream",upstream="api"}"#),
        Some(20.0)
    );
    assert_eq!(
        value(r#"bearerd_upgraded_bytes_total{direction="to_app",upstream="api"}"#),
        Some(20.0)
    );
    assert_eq!(
        value(r#"bearerd_requests_total{code="101",upstream="api"}"#),
        Some(1.0)
    );
    // The app closes; the upstream's echo sees the end and closes too, and so does bearerd:
    // the app sees the end, and the tunnel is no longer counted open.
    tunnel.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tunnel.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    wait_until_none_open(|| self::scrape(&sidecar)).await;
}

/// The upstream closes first: the app sees the end of the stream, closes its side as a
/// WebSocket client does once the server has closed (RFC 6455 §7.1.1), and the tunnel is no
/// longer counted open.
#[tokio::test]
async fn when_the_upstream_closes_the_tunnel_ends_and_is_no_longer_counted_open() {
    let upstream = switching_upstream().await;
    let tokens = tokens_ws().await;
    let sidecar = sidecar(&upstream, &tokens, "", "").await;
    let Handshake::Switched(mut tunnel, _) =
        handshake(&sidecar.url("api", "/socket"), "websocket").await
    else {
        panic!("not switched");
    };
    tunnel.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(open(&scrape(&sidecar).await), Some(1.0));
    tunnel.write_all(b"bye").await.unwrap();
    let mut rest = Vec::new();
    tunnel.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "the upstream's close reached the app");
    tunnel.shutdown().await.unwrap();
    drop(tunnel);
    wait_until_none_open(|| scrape(&sidecar)).await;
}

/// Half-close is passed on: an app that shuts its sending side still gets the answer the
/// upstream sends after it has seen that end.
#[tokio::test]
async fn an_app_that_shuts_its_side_still_gets_the_answer_sent_after_it() {
    let upstream = switching_upstream().await;
    let tokens = tokens_ws().await;
    let sidecar = sidecar(&upstream, &tokens, "", "").await;
    let Handshake::Switched(mut tunnel, _) =
        handshake(&sidecar.url("api", "/reply-at-end"), "websocket").await
    else {
        panic!("not switched");
    };
    tunnel.write_all(b"hello").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tunnel.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"got 5 bytes");
    wait_until_none_open(|| scrape(&sidecar)).await;
}

/// The upstream shuts its side and never closes the rest (it goes on reading): the app sees
/// the end of its stream, and the tunnel ends once the half-closed grace (here the idle
/// timeout, which is shorter than 30 s) is over, whether the app stays silent or goes on
/// writing. Bytes moving do not keep a half-closed tunnel: without the grace, the writing
/// app's tunnel would never be idle and would last until it stopped.
#[tokio::test]
async fn a_half_closed_tunnel_ends_after_its_grace_even_while_the_app_writes() {
    let upstream = switching_upstream().await;
    let tokens = tokens_ws().await;
    let sidecar = sidecar(&upstream, &tokens, r#"upgraded_idle_timeout = "500ms""#, "").await;
    for writing in [false, true] {
        let Handshake::Switched(mut tunnel, _) =
            handshake(&sidecar.url("api", "/half-closing"), "websocket").await
        else {
            panic!("not switched");
        };
        let mut rest = Vec::new();
        tunnel.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the upstream's shutdown reached the app");
        if writing {
            // Until bearerd has closed the app's connection (the upstream drains all).
            let chunk = [b'x'; 1024];
            let ended = tokio::time::timeout(Duration::from_secs(10), async {
                while tunnel.write_all(&chunk).await.is_ok() {}
            })
            .await;
            assert!(ended.is_ok(), "the half-closed tunnel outlived its grace");
        }
        wait_until_none_open(|| scrape(&sidecar)).await;
    }
}

#[tokio::test]
async fn a_refused_upgrade_comes_back_as_it_was_and_its_connection_is_not_reused() {
    let upstream = switching_upstream().await;
    // A token the upstream does not take: it refuses the switch with 403.
    let tokens = token_endpoint(|_, _| async { token_ok("tok-other", 3600) }).await;
    let sidecar = sidecar(&upstream, &tokens, "", "").await;
    let Handshake::Answered(status, body) =
        handshake(&sidecar.url("api", "/socket"), "websocket").await
    else {
        panic!("switched");
    };
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "no token");
    let before = upstream.connections.load(Ordering::SeqCst);
    assert_eq!(
        support::get(&sidecar.url("api", "/plain")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst),
        before + 1,
        "the connection that carried the upgrade went nowhere near the pool"
    );
}

#[tokio::test]
async fn a_protocol_the_route_does_not_list_is_dropped_as_before() {
    let upstream = switching_upstream().await;
    let tokens = tokens_ws().await;
    let sidecar = sidecar(&upstream, &tokens, "", r#"upgrade_protocols = ["x-other"]"#).await;
    // The route lists `x-other` only: a websocket handshake reaches the upstream as a plain
    // GET, which it answers with its echo.
    let Handshake::Answered(status, body) =
        handshake(&sidecar.url("api", "/socket"), "websocket").await
    else {
        panic!("switched");
    };
    assert_eq!(status, StatusCode::OK);
    let seen: support::Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen.header("upgrade"), None);
    assert_eq!(seen.header("authorization"), Some("Bearer tok-ws"));
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_upgraded_idle_timeout() {
    let upstream = switching_upstream().await;
    let tokens = tokens_ws().await;
    let sidecar = sidecar(&upstream, &tokens, r#"upgraded_idle_timeout = "200ms""#, "").await;
    let Handshake::Switched(mut tunnel, _) =
        handshake(&sidecar.url("api", "/socket"), "websocket").await
    else {
        panic!("not switched");
    };
    tunnel.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    tunnel.read_exact(&mut byte).await.unwrap();
    // Nothing more: bearerd ends the tunnel, which the app sees as the end of its stream,
    // and counts it open no more (the app's side still is).
    let mut rest = Vec::new();
    let _ = tunnel.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    wait_until_none_open(|| scrape(&sidecar)).await;
}

#[tokio::test]
async fn a_tunnel_holds_its_connection_against_max_connections_and_ends_at_shutdown() {
    let upstream = switching_upstream().await;
    let tokens = tokens_ws().await;
    let sidecar = sidecar(
        &upstream,
        &tokens,
        "max_connections = 1\nshutdown_grace = \"100ms\"",
        "",
    )
    .await;
    let Handshake::Switched(mut tunnel, _) =
        handshake(&sidecar.url("api", "/socket"), "websocket").await
    else {
        panic!("not switched");
    };
    // The next connection is answered 503 before it sends a byte, and closed.
    let addr = sidecar.running().local_addr("api").unwrap();
    let mut refused = TcpStream::connect(addr).await.unwrap();
    let mut answer = Vec::new();
    refused.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // Shutdown waits out the grace, then closes the tunnel, which is counted open no more.
    let metrics = sidecar.running().metrics().clone();
    assert_eq!(open(&metrics.render().unwrap()), Some(1.0));
    sidecar.stop().await;
    let mut rest = Vec::new();
    let _ = tunnel.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    wait_until_none_open(|| std::future::ready(metrics.render().unwrap())).await;
}

/// An HTTP/2 connection to `addr` whose first request has been answered, so that bearerd's
/// SETTINGS (with `ENABLE_CONNECT_PROTOCOL`) have arrived before an extended CONNECT.
async fn h2_app(sidecar: &Sidecar) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let addr = sidecar.running().local_addr("api").unwrap();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let first = Request::get(format!("http://{addr}/plain"))
        .body(Full::default())
        .unwrap();
    assert_eq!(
        sender.send_request(first).await.unwrap().status(),
        StatusCode::OK
    );
    sender
}

/// An extended CONNECT for a WebSocket (RFC 8441) to `path`.
fn extended_connect(sidecar: &Sidecar, path: &str) -> Request<Full<Bytes>> {
    let addr = sidecar.running().local_addr("api").unwrap();
    let mut request = Request::connect(format!("http://{addr}{path}"))
        .version(http::Version::HTTP_2)
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "chat")
        .body(Full::default())
        .unwrap();
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    request
}

#[tokio::test]
async fn a_websocket_over_http2_becomes_the_http1_handshake_and_its_stream_a_tunnel() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None::<http::HeaderMap>));
    let saw = std::sync::Arc::clone(&seen);
    // The switching upstream, noting the handshake it was sent.
    let upstream = serve(move |request: Request<hyper::body::Incoming>| {
        let saw = std::sync::Arc::clone(&saw);
        async move {
            if request.headers().contains_key("upgrade") {
                *saw.lock().unwrap() = Some(request.headers().clone());
                assert_eq!(request.method(), http::Method::GET);
                assert_eq!(request.version(), http::Version::HTTP_11);
            }
            switching(request).await
        }
    })
    .await;
    let tokens = tokens_ws().await;
    let sidecar = sidecar(&upstream, &tokens, "", "").await;
    let mut app = h2_app(&sidecar).await;
    let mut response = app
        .send_request(extended_connect(&sidecar, "/socket"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("sec-websocket-accept").is_none());
    let mut tunnel = TokioIo::new(hyper::upgrade::on(&mut response).await.unwrap());
    tunnel.write_all(b"over h2").await.unwrap();
    let mut back = [0u8; 7];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"over h2");

    let handshake = seen.lock().unwrap().clone().unwrap();
    assert_eq!(handshake["authorization"], "Bearer tok-ws");
    assert_eq!(handshake["upgrade"], "websocket");
    assert!(handshake["connection"]
        .to_str()
        .unwrap()
        .eq_ignore_ascii_case("upgrade"));
    assert_eq!(handshake["sec-websocket-version"], "13");
    assert_eq!(handshake["sec-websocket-protocol"], "chat");
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(handshake["sec-websocket-key"].as_bytes())
        .unwrap();
    assert_eq!(key.len(), 16);
}

#[tokio::test]
async fn a_websocket_over_http2_to_a_route_without_websocket_is_refused() {
    let upstream = switching_upstream().await;
    let tokens = tokens_ws().await;
    let sidecar = sidecar(&upstream, &tokens, "", "upgrade_protocols = []").await;
    let mut app = h2_app(&sidecar).await;
    let response = app
        .send_request(extended_connect(&sidecar, "/socket"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_websocket_over_http2_ends_at_shutdown_after_the_grace() {
    let upstream = switching_upstream().await;
    let tokens = tokens_ws().await;
    let sidecar = sidecar(&upstream, &tokens, "shutdown_grace = \"100ms\"", "").await;
    let mut app = h2_app(&sidecar).await;
    let mut response = app
        .send_request(extended_connect(&sidecar, "/socket"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut tunnel = TokioIo::new(hyper::upgrade::on(&mut response).await.unwrap());
    tunnel.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    tunnel.read_exact(&mut byte).await.unwrap();
    // The open stream holds the drain until the grace is over; then its connection closes,
    // and the tunnel is counted open no more.
    let metrics = sidecar.running().metrics().clone();
    assert_eq!(open(&metrics.render().unwrap()), Some(1.0));
    sidecar.stop().await;
    let mut rest = Vec::new();
    let _ = tunnel.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    wait_until_none_open(|| std::future::ready(metrics.render().unwrap())).await;
}

#[tokio::test]
async fn a_handshake_answered_401_is_sent_again_with_a_new_token() {
    let upstream = serve(|request: Request<hyper::body::Incoming>| {
        switching_for(request, "Bearer tok-1", StatusCode::UNAUTHORIZED)
    })
    .await;
    let tokens = token_endpoint(|n, _| async move { token_ok(&format!("tok-{n}"), 3600) }).await;
    let sidecar = sidecar(&upstream, &tokens, "", "").await;
    let Handshake::Switched(mut tunnel, _) =
        handshake(&sidecar.url("api", "/socket"), "websocket").await
    else {
        panic!("not switched after the replay");
    };
    tunnel.write_all(b"again").await.unwrap();
    let mut back = [0u8; 5];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"again");
    assert_eq!(tokens.count(), 2, "the rejected token, and its replacement");
}
