//! The proxy end to end, in-process: what reaches the upstream, what comes back to the app,
//! and how each failure is answered.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::config::{ConfigBuilder, Server, Tls, Token, Upstream};
use support::{echo, get, send, serve, token_endpoint, token_ok, Sidecar, TestCa};

/// The client `app` with the secret `pw`, at the token endpoint `url`.
fn app(url: &str) -> Token {
    Token::new(url, "app").secret("pw")
}

/// The upstream `api` at `upstream_url`, getting its token from `endpoint`.
fn api(upstream_url: &str, endpoint: &support::TokenEndpoint) -> Upstream {
    Upstream::new("api", upstream_url).token(app(&endpoint.url("/token")))
}

/// bearerd with one upstream `api` at `upstream_url`, getting its token from `endpoint`.
async fn sidecar_for(upstream_url: &str, endpoint: &support::TokenEndpoint) -> Sidecar {
    Sidecar::start(
        &ConfigBuilder::new()
            .upstream(api(upstream_url, endpoint))
            .render(),
    )
    .await
}

#[tokio::test]
async fn forwards_with_the_token_replacing_the_apps_authorization() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok-1", 3600) }).await;
    let upstream = serve(echo).await;
    let sidecar = sidecar_for(&upstream.url("/v2/"), &endpoint).await;

    let request = Request::post(sidecar.url("api", "/users/7?fields=a,b&x=%2F"))
        .header("authorization", "Bearer the-apps-own")
        .header("host", "localhost:1234")
        .header("x-request-id", "abc")
        .body(Full::new(Bytes::from_static(b"{\"name\":\"x\"}")))
        .unwrap();
    let echoed = send(request).await.echo();
    assert_eq!(echoed.method, "POST");
    assert_eq!(echoed.uri, "/v2/users/7?fields=a,b&x=%2F");
    assert_eq!(echoed.headers["authorization"], ["Bearer tok-1"]);
    assert_eq!(
        echoed.header("host"),
        Some(upstream.addr.to_string().as_str())
    );
    assert_eq!(echoed.header("x-request-id"), Some("abc"));
    assert_eq!(echoed.body_bytes, 12);
    sidecar.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_both_ways() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = serve(|request| async move {
        let mut response = echo(request).await;
        let headers = response.headers_mut();
        headers.insert("connection", "x-upstream-hop".parse().unwrap());
        headers.insert("x-upstream-hop", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("proxy-authenticate", "Basic".parse().unwrap());
        headers.insert("x-end-to-end", "kept".parse().unwrap());
        response
    })
    .await;
    let sidecar = sidecar_for(&upstream.url(""), &endpoint).await;
    let request = Request::get(sidecar.url("api", "/"))
        .header("connection", "keep-alive, x-app-hop")
        .header("x-app-hop", "secret-ish")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("upgrade", "websocket")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = send(request).await;
    for name in ["x-upstream-hop", "keep-alive", "proxy-authenticate"] {
        assert!(!answer.headers.contains_key(name), "{name} reached the app");
    }
    assert_eq!(answer.headers["x-end-to-end"], "kept");
    let echoed = answer.echo();
    for name in [
        "x-app-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(echoed.header(name).is_none(), "{name} reached the upstream");
    }
    assert_eq!(echoed.header("x-end-to-end"), Some("kept"));
    sidecar.stop().await;
}

/// hyper answers `Expect: 100-continue` to the app itself when the body is first read, so the
/// upstream never sees the header: with hop-by-hop headers or without, the body still arrives.
#[tokio::test]
async fn expect_is_answered_here_and_not_forwarded() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = serve(echo).await;
    let sidecar = sidecar_for(&upstream.url(""), &endpoint).await;
    for hop_by_hop in [false, true] {
        let mut request = Request::post(sidecar.url("api", "/"))
            .header("expect", "100-continue")
            .header("x-end-to-end", "kept");
        if hop_by_hop {
            request = request.header("keep-alive", "timeout=5");
        }
        let answer = send(
            request
                .body(Full::new(Bytes::from("twelve bytes")))
                .unwrap(),
        )
        .await;
        let echoed = answer.echo();
        assert!(
            echoed.header("expect").is_none(),
            "expect reached the upstream"
        );
        assert!(echoed.header("keep-alive").is_none());
        assert_eq!(echoed.header("x-end-to-end"), Some("kept"));
        assert_eq!(echoed.body_bytes, 12);
    }
    sidecar.stop().await;
}

#[tokio::test]
async fn redirects_are_passed_back_not_followed() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let followed = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&followed);
    let upstream = serve(move |request: Request<hyper::body::Incoming>| {
        let counter = Arc::clone(&counter);
        async move {
            if request.uri().path() == "/elsewhere" {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            Response::builder()
                .status(StatusCode::FOUND)
                .header("location", "/elsewhere")
                .body(support::full(""))
                .unwrap()
        }
    })
    .await;
    let sidecar = sidecar_for(&upstream.url(""), &endpoint).await;
    let answer = get(&sidecar.url("api", "/start")).await;
    assert_eq!(answer.status, StatusCode::FOUND);
    assert_eq!(answer.headers["location"], "/elsewhere");
    assert_eq!(followed.load(Ordering::SeqCst), 0);
    sidecar.stop().await;
}

#[tokio::test]
async fn token_endpoint_down_gives_503_and_nothing_reaches_the_upstream() {
    // A port that was free a moment ago: connecting to it is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reached);
    let upstream = serve(move |request| {
        counter.fetch_add(1, Ordering::SeqCst);
        echo(request)
    })
    .await;
    let config = ConfigBuilder::new().upstream(
        Upstream::new("api", &upstream.url("")).token(app(&format!("http://{closed}/token"))),
    );
    let sidecar = Sidecar::start(&config.render()).await;
    let answer = get(&sidecar.url("api", "/x")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let retry_after: u64 = answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body = answer.json();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(body["upstream"], "api");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("cannot reach the token endpoint 127.0.0.1:"),
        "{detail}"
    );
    assert!(detail.contains("onnection refused"), "{detail}");
    assert_eq!(reached.load(Ordering::SeqCst), 0);
    sidecar.stop().await;
}

#[tokio::test]
async fn upstream_unreachable_gives_502() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let sidecar = sidecar_for(&format!("http://{closed}"), &endpoint).await;
    let answer = get(&sidecar.url("api", "/x")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let body = answer.json();
    assert_eq!(body["error"], "upstream_unreachable");
    assert_eq!(body["upstream"], "api");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("onnection refused"),
        "{body}"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn upstream_too_slow_gives_504() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    // Never answers: the only way out is bearerd's response header timeout.
    let upstream = serve(|_| std::future::pending()).await;
    let config = ConfigBuilder::new()
        .upstream(api(&upstream.url(""), &endpoint).response_header_timeout("300ms"));
    let sidecar = Sidecar::start(&config.render()).await;
    let sent = std::time::Instant::now();
    let answer = get(&sidecar.url("api", "/slow")).await;
    let waited = sent.elapsed();
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    // Not before the limit; and well before the connection watchdog's usual look (every
    // second with the default limits), which a limit this short must not wait for.
    assert!(
        waited >= std::time::Duration::from_millis(300)
            && waited < std::time::Duration::from_millis(900),
        "{waited:?}"
    );
    let body = answer.json();
    assert_eq!(body["error"], "upstream_timeout");
    assert_eq!(
        body["detail"],
        format!("no response headers from {} within 300ms", upstream.addr)
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn upstream_tls_failure_gives_502() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    // A TLS server whose CA bearerd is not told about.
    let upstream = support::serve_tls(echo, &TestCa::new()).await;
    let sidecar = sidecar_for(&upstream.https_url(""), &endpoint).await;
    let answer = get(&sidecar.url("api", "/x")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let body = answer.json();
    assert_eq!(body["error"], "upstream_unreachable");
    assert!(
        body["detail"].as_str().unwrap().contains("certificate"),
        "{body}"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn tls_upstream_and_token_endpoint_behind_a_test_ca() {
    let ca = TestCa::new();
    let endpoint =
        support::token_endpoint_tls(|_, _| async { token_ok("tls-tok", 3600) }, &ca).await;
    let upstream = support::serve_tls(echo, &ca).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.ca_pem).unwrap();
    let config = ConfigBuilder::new().upstream(
        Upstream::new("api", &upstream.https_url("/base"))
            .token(app(&endpoint.server.https_url("/oauth/token")))
            .tls(Tls::new().roots("none").ca_file("ca.pem")),
    );
    let sidecar = Sidecar::start_in(dir, &config.render()).await;
    let echoed = get(&sidecar.url("api", "/x")).await.echo();
    assert_eq!(echoed.header("authorization"), Some("Bearer tls-tok"));
    assert_eq!(echoed.uri, format!("https://{}/base/x", upstream.addr));
    // The test server offers h2 by ALPN, and bearerd takes it.
    assert_eq!(echoed.version, "HTTP/2.0");
    assert_eq!(endpoint.count(), 1);
    sidecar.stop().await;
}

#[tokio::test]
async fn rotated_secret_file_is_used_at_the_next_token_request() {
    // Short-lived tokens, so that the refresher fetches again within about a second.
    let endpoint = token_endpoint(|n, _| async move { token_ok(&format!("tok-{n}"), 2) }).await;
    let upstream = serve(echo).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "first-secret\n").unwrap();
    let config = ConfigBuilder::new().upstream(
        Upstream::new("api", &upstream.url(""))
            .token(Token::new(&endpoint.url("/token"), "app").secret_file("secret")),
    );
    let sidecar = Sidecar::start_in(dir, &config.render()).await;
    endpoint.wait_for_requests(1).await;
    std::fs::write(sidecar.file("secret"), "second-secret\n").unwrap();
    endpoint.wait_for_requests(2).await;

    let secrets: Vec<String> = endpoint
        .requests()
        .iter()
        .take(2)
        .map(|r| r.basic().unwrap().1)
        .collect();
    assert_eq!(secrets, ["first-secret", "second-secret"]);
    sidecar.stop().await;
}

#[tokio::test]
async fn upstreams_with_the_same_token_settings_share_one_token() {
    let endpoint = token_endpoint(|n, _| async move { token_ok(&format!("tok-{n}"), 3600) }).await;
    let upstream = serve(echo).await;
    let token = app(&endpoint.url("/token"));
    let config = ConfigBuilder::new()
        .upstream(Upstream::new("a", &upstream.url("")).token(token.clone()))
        .upstream(Upstream::new("b", &upstream.url("/other")).token(token.clone()))
        .upstream(Upstream::new("c", &upstream.url("")).token(token.scope("different")));
    let sidecar = Sidecar::start(&config.render()).await;
    let a = get(&sidecar.url("a", "/")).await.echo();
    let b = get(&sidecar.url("b", "/")).await.echo();
    let c = get(&sidecar.url("c", "/")).await.echo();
    assert_eq!(a.header("authorization"), b.header("authorization"));
    assert_ne!(a.header("authorization"), c.header("authorization"));
    assert_eq!(endpoint.count(), 2);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_herd_of_1000_causes_one_token_request() {
    const HERD: usize = 1000;
    let release = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::clone(&release);
    // The token endpoint holds its answer until the whole herd is waiting inside bearerd.
    let endpoint = token_endpoint(move |_, _| {
        let gate = Arc::clone(&gate);
        async move {
            gate.notified().await;
            token_ok("herd-token", 3600)
        }
    })
    .await;
    let upstream = serve(echo).await;
    // The whole herd is in at once: the listener must hold more than the default 512.
    let config = ConfigBuilder::new()
        .server(Server::new().max_connections(2000))
        .upstream(api(&upstream.url(""), &endpoint));
    let sidecar = Sidecar::start(&config.render()).await;
    let url = sidecar.url("api", "/herd");
    let herd: Vec<_> = (0..HERD)
        .map(|_| tokio::spawn(support::get_owned(url.clone())))
        .collect();

    // Wait for the signal that all of them are in: bearerd's in-flight gauge.
    let in_flight = r#"bearerd_requests_in_flight{upstream="api"}"#;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let scrape = sidecar.running().metrics().render().unwrap();
        if support::metric(&scrape, in_flight) == Some(HERD as f64) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "herd never all in flight: {:?}",
            support::metric(&scrape, in_flight)
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert_eq!(endpoint.count(), 1);
    release.notify_one();

    for request in herd {
        let answer = request.await.unwrap();
        assert_eq!(
            answer.echo().header("authorization"),
            Some("Bearer herd-token")
        );
    }
    assert_eq!(endpoint.count(), 1);
    sidecar.stop().await;
}

#[tokio::test]
async fn upstream_connections_are_reused_across_requests_and_app_connections() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = serve(echo).await;
    let sidecar = sidecar_for(&upstream.url(""), &endpoint).await;
    // One kept-alive app connection, several requests.
    let client = support::app_client();
    for _ in 0..5 {
        let request = Request::get(sidecar.url("api", "/a"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(
            client.request(request).await.unwrap().status(),
            StatusCode::OK
        );
    }
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
    drop(client);

    // Then a new app connection per request, one after the other, each read to its close.
    for _ in 0..5 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = sidecar.running().local_addr("api").unwrap();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /b HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200 OK"));
    }
    // The kept-alive client's connection may still hold the first upstream connection.
    assert!(upstream.connections.load(Ordering::SeqCst) <= 2);
    sidecar.stop().await;
}

/// An upstream that answers each connection's first request and then closes it, without
/// saying so: the way servers drop idle keep-alive connections.
async fn closing_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_closing_idle_connections_fails_no_request() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = closing_upstream().await;
    let sidecar = sidecar_for(&format!("http://{upstream}"), &endpoint).await;
    let client = support::app_client();
    for _ in 0..5 {
        let request = Request::get(sidecar.url("api", "/x"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let _ = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
    }
    sidecar.stop().await;
}
