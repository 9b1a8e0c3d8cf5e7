//! HTTP/2 from the app (h2c, prior knowledge) on the listeners that serve HTTP/1.1, HTTP/2 to
//! the upstream (`protocol = "h2c"`), and gRPC's view of bearerd's own failures.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{echo, serve, token_endpoint, token_ok, Body, Sidecar};

/// An app that speaks HTTP/2 with prior knowledge (what gRPC clients do on `http://`).
fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// bearerd with one `[[upstream]]` named `api` to `upstream`, its tokens from `tokens`.
async fn sidecar_for(upstream: &support::Server, tokens: &support::TokenEndpoint) -> Sidecar {
    Sidecar::start(&support::config(
        "api",
        &upstream.url(""),
        &tokens.url("/oauth/token"),
        "client_id = \"app\"\nclient_secret = \"s3cret\"",
    ))
    .await
}

/// A response read whole, with its trailers.
struct H2Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

async fn send_h2(request: Request<Full<Bytes>>) -> H2Answer {
    let response = h2_client().request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    H2Answer {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

/// A gRPC call's request: POST with `application/grpc` and `te: trailers`.
fn grpc_call(url: &str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap()
}

#[tokio::test]
async fn http2_and_http1_on_one_port_both_carry_the_token() {
    let upstream = serve(echo).await;
    let tokens = token_endpoint(|_, _| async { token_ok("tok-h2", 3600) }).await;
    let sidecar = sidecar_for(&upstream, &tokens).await;
    let url = sidecar.url("api", "/v1/things?x=1");

    let over_h2 = send_h2(get(&url)).await;
    assert_eq!(over_h2.status, StatusCode::OK);
    let seen: support::Echo = serde_json::from_slice(&over_h2.body).unwrap();
    assert_eq!(seen.header("authorization"), Some("Bearer tok-h2"));
    assert_eq!(seen.uri, "/v1/things?x=1");
    // `:authority` named bearerd's listener; the upstream is told its own host.
    assert_eq!(
        seen.header("host"),
        Some(upstream.addr.to_string().as_str())
    );

    let over_h1 = support::get(&url).await.echo();
    assert_eq!(over_h1.header("authorization"), Some("Bearer tok-h2"));
    assert_eq!(tokens.count(), 1);
    sidecar.stop().await;
}

#[tokio::test]
async fn many_streams_on_one_connection_each_get_an_answer() {
    let upstream = serve(echo).await;
    let tokens = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let sidecar = sidecar_for(&upstream, &tokens).await;
    let client = h2_client();
    let calls = (0..50).map(|i| {
        let request = get(&sidecar.url("api", &format!("/n/{i}")));
        let client = client.clone();
        async move {
            let response = client.request(request).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let seen: support::Echo = serde_json::from_slice(&body).unwrap();
            (i, seen.uri)
        }
    });
    for (i, uri) in futures_join_all(calls).await {
        assert_eq!(uri, format!("/n/{i}"));
    }
    // One app connection carried them all (the client multiplexes).
    assert_eq!(tokens.count(), 1);
    sidecar.stop().await;
}

/// `futures::future::join_all` without the crate: each future on a task of its own.
async fn futures_join_all<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_host_header_that_differs_from_authority_is_refused() {
    let upstream = serve(echo).await;
    let tokens = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let sidecar = sidecar_for(&upstream, &tokens).await;
    let request = Request::get(sidecar.url("api", "/v1"))
        .header("host", "elsewhere.example")
        .body(Full::default())
        .unwrap();
    let answer = send_h2(request).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains(":authority"),
        "{body}"
    );
    assert!(answer.headers.get("connection").is_none());
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst),
        0,
        "refused before anything was sent"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn a_401_on_a_stream_is_replayed_with_a_new_token() {
    let served = Arc::new(AtomicUsize::new(0));
    let upstream = serve(move |request: Request<hyper::body::Incoming>| async move {
        let token = request.headers()["authorization"]
            .to_str()
            .unwrap()
            .to_owned();
        if token == "Bearer first" {
            Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .body(support::full("expired"))
                .unwrap()
        } else {
            echo(request).await
        }
    })
    .await;
    let issued = Arc::clone(&served);
    let tokens = token_endpoint(move |_, _| {
        let n = issued.fetch_add(1, Ordering::SeqCst);
        async move { token_ok(if n == 0 { "first" } else { "second" }, 3600) }
    })
    .await;
    let sidecar = sidecar_for(&upstream, &tokens).await;
    let request = Request::post(sidecar.url("api", "/v1"))
        .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
        .unwrap();
    let answer = send_h2(request).await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen: support::Echo = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(seen.header("authorization"), Some("Bearer second"));
    assert_eq!(seen.body_bytes, 7);
    sidecar.stop().await;
}

/// A plain-text HTTP/2 upstream (a gRPC server in the cluster): requests go out as HTTP/2,
/// `te: trailers` with them, and the upstream's trailers come back to the app.
#[tokio::test]
async fn an_h2c_upstream_gets_http2_and_its_trailers_reach_the_app() {
    let upstream = serve(|request: Request<hyper::body::Incoming>| async move {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert(
            "x-seen",
            format!(
                "{:?} te={} auth={}",
                request.version(),
                request
                    .headers()
                    .get("te")
                    .map_or("-", |v| v.to_str().unwrap()),
                request.headers()["authorization"].to_str().unwrap()
            )
            .parse()
            .unwrap(),
        );
        let frames = Frames(
            [
                http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
                http_body::Frame::trailers(trailers),
            ]
            .into(),
        );
        let body: Body = BodyExt::boxed(frames);
        Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap()
    })
    .await;
    let tokens = token_endpoint(|_, _| async { token_ok("tok-grpc", 3600) }).await;
    let config = support::config(
        "grpc",
        &upstream.url(""),
        &tokens.url("/oauth/token"),
        "client_id = \"app\"\nclient_secret = \"s3cret\"",
    )
    .replacen("url = \"http://", "protocol = \"h2c\"\nurl = \"http://", 1);
    let sidecar = Sidecar::start(&config).await;
    let answer = send_h2(grpc_call(&sidecar.url("grpc", "/pkg.Svc/Call"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    let trailers = answer.trailers.expect("the upstream's trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(
        trailers["x-seen"],
        "HTTP/2.0 te=trailers auth=Bearer tok-grpc"
    );
    sidecar.stop().await;
}

/// A body of the frames given, data and trailers, each sent as it is polled.
struct Frames(std::collections::VecDeque<http_body::Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// What a gRPC client reads of a call bearerd answered itself.
fn grpc_status(answer: &H2Answer) -> (String, String) {
    assert_eq!(answer.status, StatusCode::OK, "gRPC failures are HTTP 200");
    assert_eq!(answer.headers["content-type"], "application/grpc");
    let status = answer.headers["grpc-status"].to_str().unwrap().to_owned();
    let message = answer
        .headers
        .get("grpc-message")
        .map(|m| m.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, message)
}

#[tokio::test]
async fn bearerds_own_failures_reach_a_grpc_client_as_grpc_status() {
    let upstream = serve(|_| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        support::json(StatusCode::OK, serde_json::json!({}))
    })
    .await;
    let good_tokens = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let no_tokens = token_endpoint(|_, _| async {
        support::json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "invalid_client"}),
        )
    })
    .await;
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
listen = "127.0.0.1:0"

[[listener.route]]
name = "slow"
path_prefix = "/pkg.Slow"
url = "{slow}"
protocol = "h2c"
[listener.route.token]
url = "{good}"
client_id = "app"
client_secret = "s3cret"

[[listener.route]]
name = "http1-only"
path_prefix = "/pkg.Old"
url = "{slow}"
protocol = "http1"
[listener.route.token]
url = "{good}"
client_id = "app"
client_secret = "s3cret"

[[listener.route]]
name = "no-token"
path_prefix = "/pkg.NoToken"
url = "{slow}"
protocol = "h2c"
[listener.route.token]
url = "{bad}"
client_id = "app"
client_secret = "wrong"
"#,
        slow = upstream.url(""),
        good = good_tokens.url("/oauth/token"),
        bad = no_tokens.url("/oauth/token"),
    );
    let sidecar = Sidecar::start(&config).await;
    let url = |path: &str| sidecar.url("slow", path);

    let unknown = send_h2(grpc_call(&url("/pkg.Unknown/Call"))).await;
    let (status, message) = grpc_status(&unknown);
    assert_eq!(status, "12", "UNIMPLEMENTED: {message}");
    assert!(message.starts_with("bearerd no_route"), "{message}");

    let no_token = send_h2(grpc_call(&url("/pkg.NoToken/Call"))).await;
    let (status, message) = grpc_status(&no_token);
    assert_eq!(status, "14", "UNAVAILABLE: {message}");
    assert!(message.contains("token_unavailable"), "{message}");
    assert!(
        !message.contains("wrong"),
        "no secret in the message: {message}"
    );

    let old = send_h2(grpc_call(&url("/pkg.Old/Call"))).await;
    let (status, message) = grpc_status(&old);
    assert_eq!(status, "14", "UNAVAILABLE: {message}");
    assert!(message.contains("protocol = \"h2c\""), "{message}");

    let mut timed = grpc_call(&url("/pkg.Slow/Call"));
    timed
        .headers_mut()
        .insert("grpc-timeout", "200m".parse().unwrap());
    let late = send_h2(timed).await;
    let (status, message) = grpc_status(&late);
    assert_eq!(status, "4", "DEADLINE_EXCEEDED: {message}");
    assert!(message.contains("200ms"), "{message}");

    // The same failure to an app that is not gRPC is the JSON answer.
    let plain = send_h2(get(&url("/pkg.Unknown/Call"))).await;
    assert_eq!(plain.status, StatusCode::NOT_FOUND);
    sidecar.stop().await;
}

/// Shutdown drains an HTTP/2 connection as it does an HTTP/1.1 one: the stream in flight
/// gets its answer, and the connection is told to open no more (GOAWAY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_stream_in_flight_finish() {
    let tokens = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = support::Holding::start().await;
    let mut sidecar = Sidecar::start(&support::config(
        "api",
        &upstream.url(""),
        &tokens.url("/oauth/token"),
        "client_id = \"app\"\nclient_secret = \"s3cret\"",
    ))
    .await;
    let client = h2_client();
    let in_flight = tokio::spawn(client.request(get(&sidecar.url("api", "/slow"))));
    upstream.arrived().await;
    let running = sidecar.running.take().unwrap();
    let shutdown = tokio::spawn(running.shutdown());
    upstream.release();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let seen: support::Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen.uri, "/slow");
    shutdown.await.unwrap();
}

/// Streams are counted and logged as requests: the route's request metrics see each one.
#[tokio::test]
async fn streams_are_counted_per_request() {
    let upstream = serve(echo).await;
    let tokens = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let sidecar = sidecar_for(&upstream, &tokens).await;
    for _ in 0..3 {
        assert_eq!(
            send_h2(get(&sidecar.url("api", "/x"))).await.status,
            StatusCode::OK
        );
    }
    let admin = sidecar.running().admin_addr();
    let scrape = support::get(&format!("http://{admin}/metrics")).await;
    let scrape = String::from_utf8_lossy(&scrape.body).into_owned();
    let answered = scrape
        .lines()
        .filter(|line| {
            line.starts_with("bearerd_requests_total{") && line.contains("upstream=\"api\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert_eq!(answered, 3.0, "{scrape}");
    sidecar.stop().await;
}

/// curl, a client nobody here wrote, speaking HTTP/2 with prior knowledge to bearerd.
#[tokio::test(flavor = "multi_thread")]
async fn curl_with_http2_prior_knowledge_gets_its_answer_with_the_token() {
    let upstream = serve(echo).await;
    let tokens = token_endpoint(|_, _| async { token_ok("tok-curl", 3600) }).await;
    let sidecar = sidecar_for(&upstream, &tokens).await;
    let url = sidecar.url("api", "/via/curl");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["--silent", "--show-error", "--http2-prior-knowledge"])
            .args(["--write-out", "\n%{http_version}"])
            .arg(url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let (body, version) = stdout.rsplit_once('\n').unwrap();
    assert_eq!(version, "2");
    let seen: support::Echo = serde_json::from_str(body).unwrap();
    assert_eq!(seen.header("authorization"), Some("Bearer tok-curl"));
    assert_eq!(seen.uri, "/via/curl");
    sidecar.stop().await;
}
