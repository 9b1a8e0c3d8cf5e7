//! An upstream that answers 401 to bearerd's token: the token is replaced once, however
//! many requests saw the 401, and requests that can be replayed are.

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
use http::{Request, StatusCode};
use http_body_util::Full;
use support::config::{ConfigBuilder, Token, Upstream};
use support::{echo, json, send, serve, token_endpoint, token_ok, Server, Sidecar};

/// An upstream that takes only tokens `tok-N` with N at least `accepted_from`, and answers
/// others 401 with a body of its own.
async fn revoking_upstream(accepted_from: Arc<AtomicUsize>) -> Server {
    serve(move |request: Request<hyper::body::Incoming>| {
        let accepted_from = Arc::clone(&accepted_from);
        async move {
            let n: Option<usize> = request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer tok-"))
                .and_then(|n| n.parse().ok());
            if n.is_some_and(|n| n >= accepted_from.load(Ordering::SeqCst)) {
                echo(request).await
            } else {
                json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"message": "token revoked"}),
                )
            }
        }
    })
    .await
}

/// The upstream `api` at `upstream`, client `app` of `token_url`.
fn api(upstream: &Server, token_url: &str) -> Upstream {
    Upstream::new("api", &upstream.url("")).token(app(token_url))
}

/// The client `app` with the secret `pw`.
fn app(token_url: &str) -> Token {
    Token::new(token_url, "app").secret("pw")
}

/// A config of the upstream `api` alone.
fn config(upstream: Upstream) -> String {
    ConfigBuilder::new().upstream(upstream).render()
}

#[tokio::test]
async fn revoked_token_is_replaced_and_the_request_replayed() {
    let endpoint = token_endpoint(|n, _| async move { token_ok(&format!("tok-{n}"), 3600) }).await;
    let accepted_from = Arc::new(AtomicUsize::new(0));
    let upstream = revoking_upstream(Arc::clone(&accepted_from)).await;
    let sidecar = Sidecar::start(&config(api(&upstream, &endpoint.url("/token")))).await;

    let post = |body: &'static str| {
        Request::post(sidecar.url("api", "/items?page=2"))
            .header("content-type", "application/json")
            .header("x-trace", "a")
            .header("x-trace", "b")
            // The app's own Authorization never reaches the upstream, replayed or not.
            .header("authorization", "Basic YXBwOnNlY3JldA==")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    assert_eq!(
        send(post("{}")).await.echo().header("authorization"),
        Some("Bearer tok-0")
    );

    // The server revokes tok-0: the next request sees a 401, and is replayed with tok-1.
    accepted_from.store(1, Ordering::SeqCst);
    let echoed = send(post(r#"{"a":1}"#)).await.echo();
    assert_eq!(echoed.header("authorization"), Some("Bearer tok-1"));
    assert_eq!(echoed.headers["authorization"].len(), 1);
    assert_eq!(echoed.body_bytes, 7, "the replayed request kept its body");
    // ... and its head: method, target, every header with its repeated values, and the
    // upstream's Host.
    assert_eq!(echoed.method, "POST");
    assert_eq!(echoed.uri, "/items?page=2");
    assert_eq!(echoed.header("content-type"), Some("application/json"));
    assert_eq!(echoed.headers["x-trace"], ["a", "b"]);
    assert_eq!(
        echoed.header("host"),
        Some(upstream.addr.to_string().as_str())
    );
    assert_eq!(echoed.headers["host"].len(), 1);
    assert_eq!(endpoint.count(), 2);

    let scrape = sidecar.running().metrics().render().unwrap();
    assert_eq!(
        support::metric(
            &scrape,
            r#"bearerd_upstream_unauthorized_retries_total{upstream="api"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        support::metric(
            &scrape,
            r#"bearerd_requests_total{code="200",upstream="api"}"#
        ),
        Some(2.0)
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_401s_at_once_cause_one_token_request() {
    let endpoint = token_endpoint(|n, _| async move { token_ok(&format!("tok-{n}"), 3600) }).await;
    let accepted_from = Arc::new(AtomicUsize::new(0));
    let upstream = revoking_upstream(Arc::clone(&accepted_from)).await;
    let sidecar = Sidecar::start(&config(api(&upstream, &endpoint.url("/token")))).await;
    support::get(&sidecar.url("api", "/warm")).await.echo();

    accepted_from.store(1, Ordering::SeqCst);
    let url = sidecar.url("api", "/many");
    let requests: Vec<_> = (0..50)
        .map(|_| tokio::spawn(support::get_owned(url.clone())))
        .collect();
    for request in requests {
        assert_eq!(
            request.await.unwrap().echo().header("authorization"),
            Some("Bearer tok-1")
        );
    }
    assert_eq!(endpoint.count(), 2);
    sidecar.stop().await;
}

#[tokio::test]
async fn large_body_is_not_replayed_but_the_token_is_replaced() {
    let endpoint = token_endpoint(|n, _| async move { token_ok(&format!("tok-{n}"), 3600) }).await;
    let accepted_from = Arc::new(AtomicUsize::new(1));
    let upstream = revoking_upstream(Arc::clone(&accepted_from)).await;
    let sidecar = Sidecar::start(&config(api(&upstream, &endpoint.url("/token")))).await;

    let big = Bytes::from(vec![b'x'; 100 * 1024]);
    let answer = send(
        Request::put(sidecar.url("api", "/upload"))
            .body(Full::new(big))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer.json(),
        serde_json::json!({"message": "token revoked"})
    );
    // The rejection still replaced the token for the requests that follow.
    endpoint.wait_for_requests(2).await;
    assert_eq!(
        support::get(&sidecar.url("api", "/after"))
            .await
            .echo()
            .header("authorization"),
        Some("Bearer tok-1")
    );
    assert_eq!(endpoint.count(), 2);
    sidecar.stop().await;
}

#[tokio::test]
async fn retry_on_401_off_passes_the_401_back() {
    let endpoint = token_endpoint(|n, _| async move { token_ok(&format!("tok-{n}"), 3600) }).await;
    let upstream = revoking_upstream(Arc::new(AtomicUsize::new(1))).await;
    let sidecar = Sidecar::start(&config(
        api(&upstream, &endpoint.url("/token")).retry_on_401(false),
    ))
    .await;
    let answer = support::get(&sidecar.url("api", "/x")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(endpoint.count(), 1);
    sidecar.stop().await;
}

#[tokio::test]
async fn failed_replacement_passes_the_upstreams_401_back() {
    let endpoint = token_endpoint(|n, _| async move {
        if n == 0 {
            token_ok("tok-0", 3600)
        } else {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "temporarily_unavailable"}),
            )
        }
    })
    .await;
    let upstream = revoking_upstream(Arc::new(AtomicUsize::new(1))).await;
    // A long backoff: the only token requests are the first and the one the 401 caused.
    let sidecar = Sidecar::start(&config(
        api(&upstream, &endpoint.url("/token")).token(
            app(&endpoint.url("/token"))
                .backoff_base("1h")
                .backoff_cap("1h"),
        ),
    ))
    .await;
    let answer = support::get(&sidecar.url("api", "/x")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer.json(),
        serde_json::json!({"message": "token revoked"})
    );
    assert_eq!(endpoint.count(), 2);
    // Another 401 for the same token does not ask again: the refresher's backoff decides.
    let answer = support::get(&sidecar.url("api", "/y")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(endpoint.count(), 2);
    sidecar.stop().await;
}
