//! The admin listener after a scripted scenario: each metric's value and labels, and the
//! health and readiness probes, including readiness turning 503 as soon as shutdown begins.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;
use support::{echo, get, json, serve, token_endpoint, token_ok, Sidecar};

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Two upstreams: `good` gets a token, `bad`'s endpoint rejects the client. A long backoff
/// keeps `bad` at exactly one attempt while the test runs.
async fn scenario() -> (
    Sidecar,
    support::TokenEndpoint,
    support::TokenEndpoint,
    support::Server,
) {
    let good = token_endpoint(|_, _| async { token_ok("good-token", 3600) }).await;
    let bad = token_endpoint(|_, _| async {
        json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "invalid_client", "error_description": "Client authentication failed"}),
        )
    })
    .await;
    let upstream = serve(echo).await;
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[upstream]]
name = "good"
listen = "127.0.0.1:0"
url = "{upstream}"
[upstream.token]
url = "{good}"
client_id = "app"
client_secret = "pw"

[[upstream]]
name = "bad"
listen = "127.0.0.1:0"
url = "{upstream}"
[upstream.token]
url = "{bad}"
client_id = "app"
client_secret = "wrong"
backoff_base = "1h"
backoff_cap = "1h"
"#,
        upstream = upstream.url(""),
        good = good.url("/token"),
        bad = bad.url("/token"),
    );
    let sidecar = Sidecar::start(&config).await;
    (sidecar, good, bad, upstream)
}

#[tokio::test]
async fn metrics_after_a_scripted_scenario() {
    let (sidecar, good, bad, _upstream) = scenario().await;
    for _ in 0..3 {
        assert_eq!(
            get(&sidecar.url("good", "/ok")).await.status,
            StatusCode::OK
        );
    }
    for _ in 0..2 {
        let answer = get(&sidecar.url("bad", "/no")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let admin = sidecar.running().admin_addr();
    let answer = get(&format!("http://{admin}/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let scrape = String::from_utf8(answer.body.to_vec()).unwrap();
    let value = |series: &str| {
        support::metric(&scrape, series)
            .unwrap_or_else(|| panic!("{series} missing from:\n{scrape}"))
    };

    assert_eq!(
        value(r#"bearerd_token_fetch_total{outcome="success",upstream="good"}"#),
        1.0
    );
    assert_eq!(
        value(r#"bearerd_token_fetch_total{outcome="rejected",upstream="good"}"#),
        0.0
    );
    assert_eq!(
        value(r#"bearerd_token_fetch_total{outcome="rejected",upstream="bad"}"#),
        1.0
    );
    assert_eq!(
        value(r#"bearerd_token_fetch_total{outcome="success",upstream="bad"}"#),
        0.0
    );
    assert_eq!(
        value(r#"bearerd_token_fetch_duration_seconds_count{upstream="good"}"#),
        1.0
    );
    assert_eq!(
        value(r#"bearerd_token_fetch_duration_seconds_count{upstream="bad"}"#),
        1.0
    );

    assert_eq!(value(r#"bearerd_token_valid{upstream="good"}"#), 1.0);
    assert_eq!(value(r#"bearerd_token_valid{upstream="bad"}"#), 0.0);
    let expiry = value(r#"bearerd_token_expiry_timestamp_seconds{upstream="good"}"#);
    assert!((expiry - (now() + 3600.0)).abs() < 60.0, "{expiry}");
    assert_eq!(
        value(r#"bearerd_token_expiry_timestamp_seconds{upstream="bad"}"#),
        0.0
    );
    let last = value(r#"bearerd_token_last_success_timestamp_seconds{upstream="good"}"#);
    assert!((now() - last).abs() < 60.0, "{last}");
    assert_eq!(
        value(r#"bearerd_token_last_success_timestamp_seconds{upstream="bad"}"#),
        0.0
    );

    assert_eq!(
        value(r#"bearerd_requests_total{code="200",upstream="good"}"#),
        3.0
    );
    assert_eq!(
        value(r#"bearerd_requests_total{code="503",upstream="bad"}"#),
        2.0
    );
    assert_eq!(
        support::metric(
            &scrape,
            r#"bearerd_requests_total{code="503",upstream="good"}"#
        ),
        None
    );
    assert_eq!(
        value(r#"bearerd_token_unavailable_total{upstream="bad"}"#),
        2.0
    );
    assert_eq!(
        value(r#"bearerd_token_unavailable_total{upstream="good"}"#),
        0.0
    );
    assert_eq!(
        value(r#"bearerd_request_duration_seconds_count{upstream="good"}"#),
        3.0
    );
    assert_eq!(
        value(r#"bearerd_request_duration_seconds_count{upstream="bad"}"#),
        2.0
    );
    assert_eq!(value(r#"bearerd_requests_in_flight{upstream="good"}"#), 0.0);
    assert_eq!(
        value(r#"bearerd_token_secret_errors_total{upstream="good"}"#),
        0.0
    );
    assert_eq!(
        value(&format!(
            r#"bearerd_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert!(value("process_resident_memory_bytes") > 0.0);
    assert!(value("process_open_fds") > 0.0);
    assert!(scrape.contains("process_cpu_seconds_total"));

    // No label carries a path or a token.
    for leaked in ["/ok", "/no", "good-token", "pw", "wrong"] {
        assert!(
            !scrape.contains(&format!("\"{leaked}\"")),
            "{leaked} appears as a label value"
        );
    }
    assert_eq!(good.count(), 1);
    assert_eq!(bad.count(), 1);
    sidecar.stop().await;
}

#[tokio::test]
async fn probes() {
    let (sidecar, _good, bad, _upstream) = scenario().await;
    // Readiness reflects the first fetches: wait until both have an outcome.
    for name in ["good", "bad"] {
        get(&sidecar.url(name, "/")).await;
    }
    let admin = sidecar.running().admin_addr();
    let health = get(&format!("http://{admin}/healthz")).await;
    assert_eq!(health.status, StatusCode::OK);

    let ready = get(&format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    // Status, error code and host: never the endpoint's own words beyond its error code.
    let bad_host = bad.server.addr;
    assert_eq!(
        ready.json(),
        serde_json::json!({
            "ready": false,
            "upstreams": [{
                "upstream": "bad",
                "detail": format!("token endpoint {bad_host} rejected the request: status 401 Unauthorized, error \"invalid_client\"")
            }]
        })
    );

    assert_eq!(
        get(&format!("http://{admin}/nope")).await.status,
        StatusCode::NOT_FOUND
    );
    let post = support::send(
        http::Request::post(format!("http://{admin}/metrics"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_503_at_once_on_shutdown() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = support::Holding::start().await;
    let mut sidecar = Sidecar::start(&support::config(
        "api",
        &upstream.url(""),
        &endpoint.url("/token"),
        "client_id = \"app\"\nclient_secret = \"pw\"\n",
    ))
    .await;
    let admin = sidecar.running().admin_addr();
    let in_flight = tokio::spawn(support::get_owned(sidecar.url("api", "/slow")));
    upstream.arrived().await;
    let ready = get(&format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json(), serde_json::json!({"ready": true}));

    // Shutdown begins while the request is held upstream.
    let running = sidecar.running.take().unwrap();
    let shutdown = tokio::spawn(running.shutdown());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ready = get(&format!("http://{admin}/readyz")).await;
        if ready.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(
                ready.json(),
                serde_json::json!({"ready": false, "reason": "shutting down"})
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    assert!(!in_flight.is_finished());
    upstream.release();
    assert_eq!(in_flight.await.unwrap().status, StatusCode::OK);
    shutdown.await.unwrap();
}

/// A sidecar whose `[admin]` table has `admin` after `listen`.
async fn with_admin(admin: &str) -> (Sidecar, support::TokenEndpoint, support::Server) {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = serve(echo).await;
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
{admin}

[[upstream]]
name = "api"
listen = "127.0.0.1:0"
url = "{upstream}"
[upstream.token]
url = "{endpoint}"
client_id = "app"
client_secret = "pw"
"#,
        upstream = upstream.url(""),
        endpoint = endpoint.url("/token"),
    );
    (Sidecar::start(&config).await, endpoint, upstream)
}

const PROBE: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: bearerd\r\nConnection: close\r\n\r\n";

/// The reproduction of issue 22: as many connections as the admin listener holds (64, the
/// default `max_connections`), sending nothing or half a request head, each opened again as
/// soon as it is closed. Every probe must still be answered, before and after the held
/// connections have all been closed (here by the head deadline) and opened again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_idle_connections_hold_the_admin_port() {
    probes_answer_while_held(64).await;
}

/// More connections than the listener holds: they keep taking each other's places, and a
/// probe still gets one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_more_idle_connections_than_it_holds_churn() {
    probes_answer_while_held(72).await;
}

async fn probes_answer_while_held(held: usize) {
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    let (sidecar, _endpoint, _upstream) = with_admin("").await;
    let admin = sidecar.running().admin_addr();
    // How many held connections have been opened, and closed by bearerd, so far.
    let opened = Arc::new(tokio::sync::watch::Sender::new(0usize));
    let closed = Arc::new(tokio::sync::watch::Sender::new(0usize));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut holders = tokio::task::JoinSet::new();
    for n in 0..held {
        let (opened, closed, stop) = (Arc::clone(&opened), Arc::clone(&closed), stop.clone());
        holders.spawn(async move {
            while !stop.is_cancelled() {
                let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await else {
                    continue;
                };
                if n % 2 == 1 {
                    // Half a head: never the blank line that ends it.
                    let _ = stream
                        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bearerd\r\n")
                        .await;
                }
                opened.send_modify(|n| *n += 1);
                tokio::select! {
                    _ = support::raw::read_to_close(&mut stream) => {}
                    () = stop.cancelled() => break,
                }
                closed.send_modify(|n| *n += 1);
            }
        });
    }
    let wait_for = |counter: &tokio::sync::watch::Sender<usize>, at_least: usize| {
        let mut seen = counter.subscribe();
        async move {
            tokio::time::timeout(support::daemon::PATIENCE, seen.wait_for(|n| *n >= at_least))
                .await
                .expect("the held connections did not turn over")
                .map(|_| ())
                .unwrap();
        }
    };
    // Every holder connected: a probe queues behind them all.
    wait_for(&opened, held).await;
    for round in 0..3 {
        let answer = tokio::time::timeout(
            support::daemon::PATIENCE,
            support::raw::exchange(admin, PROBE),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: no answer"));
        assert!(
            answer.starts_with("HTTP/1.1 200 "),
            "round {round}: the probe was not answered: {answer:?}"
        );
        // Then until every held connection has been closed and opened again, once more.
        let turned_over = *closed.borrow() + held;
        wait_for(&closed, turned_over).await;
    }
    stop.cancel();
    while holders.join_next().await.is_some() {}
    sidecar.stop().await;
}

/// A connection that sends half a request head is closed unanswered at the head deadline
/// (2 s), well before the 10 s it was given before.
#[tokio::test]
async fn a_connection_without_a_whole_head_is_closed_at_the_deadline() {
    use tokio::io::AsyncWriteExt;

    let (sidecar, _endpoint, _upstream) = with_admin("").await;
    let admin = sidecar.running().admin_addr();
    for head in [&b""[..], b"GET /healthz HTTP/1.1\r\nHost: bearerd\r\n"] {
        let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
        stream.write_all(head).await.unwrap();
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(8),
            support::raw::read_to_close(&mut stream),
        )
        .await
        .expect("still open 8 s after the 2 s head deadline");
        assert_eq!(answer, "", "an unfinished head gets no answer");
    }
    // A kept-alive connection gets the same deadline for its next head.
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bearerd\r\n\r\n")
        .await
        .unwrap();
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(8),
        support::raw::read_to_close(&mut stream),
    )
    .await
    .expect("still open 8 s after the answer");
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    sidecar.stop().await;
}

/// `[admin] allow_from`: a peer outside it is closed on before a byte is read; one inside it
/// is answered.
#[tokio::test]
async fn admin_peers_outside_allow_from_are_closed_unread() {
    let (outside, _e1, _u1) = with_admin(r#"allow_from = ["10.0.0.0/8"]"#).await;
    let answer = support::raw::exchange(outside.running().admin_addr(), PROBE).await;
    assert_eq!(answer, "", "127.0.0.1 is outside 10.0.0.0/8: no answer");
    outside.stop().await;

    let (inside, _e2, _u2) = with_admin(r#"allow_from = ["10.0.0.0/8", "127.0.0.1/32"]"#).await;
    let answer = support::raw::exchange(inside.running().admin_addr(), PROBE).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    inside.stop().await;
}

/// `[admin] allow_from` is checked as a listener's is: each entry a network or an address,
/// and not an empty list; `--check` names it.
#[test]
fn admin_allow_from_is_checked_like_a_listeners() {
    use bearerd::config::Config;
    use support::config::{Admin, ConfigBuilder, Token, Upstream};

    let parse = |admin: Admin| {
        let text = ConfigBuilder::empty()
            .admin(admin)
            .upstream(
                Upstream::new("payments", "https://api.example.com/v2")
                    .token(Token::new("https://auth.example.com/token", "abc").secret("pw")),
            )
            .render();
        Config::parse(std::path::Path::new("/etc/bearerd/bearerd.toml"), &text)
    };
    let error = parse(Admin::new().allow_from(&["10.0.0.0/8", "nope"]))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("admin.allow_from: \"nope\" is not a network"),
        "{error}"
    );
    let error = parse(Admin::new().allow_from(&[])).unwrap_err().to_string();
    assert!(
        error.contains("admin.allow_from: is empty, so no one could connect"),
        "{error}"
    );
    let config = parse(Admin::new().allow_from(&["10.0.0.0/16", "192.168.1.7"])).unwrap();
    assert_eq!(
        config.admin.allow_from,
        Some(vec![
            "10.0.0.0/16".parse().unwrap(),
            "192.168.1.7/32".parse().unwrap()
        ])
    );
    let described = bearerd::check::check(&config).unwrap_or_else(|p| panic!("{p:?}"));
    assert!(
        described.contains("at most 64 connections, from 10.0.0.0/16, 192.168.1.7/32)"),
        "{described}"
    );
    assert_eq!(parse(Admin::new()).unwrap().admin.allow_from, None);
}
