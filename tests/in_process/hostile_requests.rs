//! Requests an attacker's probe found to pass bearerd's request filters (issue 22, part 5),
//! sent as raw bytes: methods that echo the request or open a tunnel in any letter case,
//! disguised dot segments (double encoding, `%u`, overlong UTF-8), duplicate or invalid `Host`
//! headers; and status codes outside 100–599, which must not make a metric series per code
//! that a reload would leave behind.
//!
//! Each refusal is asserted by its status and JSON error, and by the upstream having received
//! nothing: no refused request carries the token anywhere.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::net::SocketAddr;

use http::{Response, StatusCode};
use support::config::{ConfigBuilder, Listener, Route, Token, Upstream};
use support::raw::{exchange, status_of, RecordingUpstream};
use support::{full, metric, serve, token_endpoint, token_ok, Sidecar, TokenEndpoint};

/// The token bearerd holds: it must reach no upstream in these tests but the controls'.
const TOKEN: &str = "the-token";

fn token(endpoint: &TokenEndpoint) -> Token {
    Token::new(&endpoint.url("/token"), "app").secret("pw")
}

/// bearerd with the three kinds of listener, all to `upstream`: an `[[upstream]]` ("api": one
/// route, everything), a reverse `[[listener]]` routed by host ("rev", for `api.rec.test`)
/// and a forward `[[listener]]` ("fwd", for `fwd.rec.test`).
async fn sidecar(upstream: &RecordingUpstream, endpoint: &TokenEndpoint) -> Sidecar {
    let config = ConfigBuilder::new()
        .upstream(
            Upstream::new("api", &upstream.url())
                .allow_plain_http(true)
                .token(token(endpoint)),
        )
        .listener(
            Listener::new("reverse").route(
                Route::named("rev")
                    .host("api.rec.test")
                    .url(&upstream.url())
                    .allow_plain_http(true)
                    .token(token(endpoint)),
            ),
        )
        .listener(
            Listener::new("forward").route(
                Route::named("fwd")
                    .host("fwd.rec.test")
                    .url(&upstream.url())
                    .allow_plain_http(true)
                    .token(token(endpoint)),
            ),
        )
        .render();
    Sidecar::start(&config).await
}

/// A raw answer's status and the `error` of its JSON body (empty if it has none).
fn refusal(answer: &str) -> (u16, String) {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let error = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|json| json["error"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (status_of(answer), error)
}

/// Sends each request (a request line and a `Host` value) and asserts `status` and `error`.
async fn assert_refused(
    addr: SocketAddr,
    requests: &[(String, Vec<&str>)],
    status: u16,
    error: &str,
) {
    for (line, hosts) in requests {
        let mut request = format!("{line} HTTP/1.1\r\n");
        for host in hosts {
            request.push_str(&format!("Host: {host}\r\n"));
        }
        request.push_str("Connection: close\r\n\r\n");
        let answer = exchange(addr, request.as_bytes()).await;
        assert_eq!(
            refusal(&answer),
            (status, error.to_owned()),
            "{request:?}: {answer}"
        );
        assert!(!answer.contains(TOKEN), "{answer}");
    }
}

fn requests(lines: &[String], hosts: &[&'static str]) -> Vec<(String, Vec<&'static str>)> {
    lines.iter().map(|l| (l.clone(), hosts.to_vec())).collect()
}

/// The controls: a plain request on each listener is forwarded with the token, so the
/// refusals above were the filters' doing, not a broken setup.
async fn assert_controls_forwarded(sidecar: &Sidecar, upstream: &RecordingUpstream) {
    let running = sidecar.running();
    let controls = [
        (
            running.local_addr("api").unwrap(),
            "GET /ok",
            "api.rec.test",
        ),
        (
            running.local_addr("rev").unwrap(),
            "GET /ok",
            "API.rec.test:8080",
        ),
        (
            running.local_addr("fwd").unwrap(),
            "GET http://fwd.rec.test/ok",
            "fwd.rec.test",
        ),
    ];
    for (addr, line, host) in controls {
        let request = format!("{line} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = exchange(addr, request.as_bytes()).await;
        assert_eq!(status_of(&answer), 200, "{request:?}: {answer}");
    }
    let received = upstream.received();
    assert_eq!(
        received
            .matches(&format!("authorization: Bearer {TOKEN}"))
            .count(),
        3,
        "{received}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_track_and_connect_are_refused_in_any_case_on_every_listener() {
    let endpoint = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let upstream = RecordingUpstream::start().await;
    let sidecar = sidecar(&upstream, &endpoint).await;
    let running = sidecar.running();
    let methods = ["trace", "Trace", "TRACK", "track", "connect", "Connect"];

    let origin: Vec<String> = methods.iter().map(|m| format!("{m} /x")).collect();
    for name in ["api", "rev"] {
        let addr = running.local_addr(name).unwrap();
        assert_refused(
            addr,
            &requests(&origin, &["api.rec.test"]),
            405,
            "method_not_allowed",
        )
        .await;
    }
    let absolute: Vec<String> = methods
        .iter()
        .map(|m| format!("{m} http://fwd.rec.test/x"))
        .collect();
    assert_refused(
        running.local_addr("fwd").unwrap(),
        &requests(&absolute, &["fwd.rec.test"]),
        405,
        "method_not_allowed",
    )
    .await;
    assert_eq!(
        upstream.received(),
        "",
        "a refused method reached the upstream"
    );

    assert_controls_forwarded(&sidecar, &upstream).await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disguised_dot_segments_are_refused_on_every_listener() {
    let endpoint = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let upstream = RecordingUpstream::start().await;
    let sidecar = sidecar(&upstream, &endpoint).await;
    let running = sidecar.running();
    let paths = [
        "/v2/%252e%252e/admin",
        "/v2/%252E%252E/admin",
        "/v2/..%252fadmin",
        "/v2/..%255cadmin",
        "/v2/%25%32%65%25%32%65/admin",
        "/v2/%u002e%u002e/admin",
        "/v2/%U002E./admin",
        "/v2/%c0%ae%c0%ae/admin",
        "/v2/..%c0%afadmin",
        "/v2/..%c1%9cadmin",
        "/v2/%e0%80%ae%e0%80%ae/admin",
        "/v2/%f0%80%80%ae./admin",
    ];
    let origin: Vec<String> = paths.iter().map(|p| format!("GET {p}")).collect();
    for name in ["api", "rev"] {
        let addr = running.local_addr(name).unwrap();
        assert_refused(
            addr,
            &requests(&origin, &["api.rec.test"]),
            400,
            "bad_request",
        )
        .await;
    }
    let absolute: Vec<String> = paths
        .iter()
        .map(|p| format!("GET http://fwd.rec.test{p}"))
        .collect();
    assert_refused(
        running.local_addr("fwd").unwrap(),
        &requests(&absolute, &["fwd.rec.test"]),
        400,
        "bad_request",
    )
    .await;
    assert_eq!(
        upstream.received(),
        "",
        "a disguised path reached the upstream"
    );

    assert_controls_forwarded(&sidecar, &upstream).await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_or_invalid_host_is_refused_on_reverse_listeners() {
    let endpoint = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let upstream = RecordingUpstream::start().await;
    let sidecar = sidecar(&upstream, &endpoint).await;
    let running = sidecar.running();
    let get = || vec!["GET /x".to_owned()];
    let mut bad: Vec<(String, Vec<&str>)> = vec![
        (get()[0].clone(), vec!["api.rec.test", "api.rec.test"]),
        (get()[0].clone(), vec!["api.rec.test", "evil.test"]),
    ];
    for host in [
        "api.rec.test:65536",
        "api.rec.test:99999",
        "api.rec.test:123456789012345678901234567890",
        "api.rec.test:-1",
        "api.rec.test:+80",
        "api.rec.test:http",
        "api.rec.test:80:80",
        "api.rec.test:8 0",
        "user@api.rec.test",
        "api.rec.test/x",
        "[::1]:65536",
        "[::1",
        "[not-an-address]",
    ] {
        bad.push((get()[0].clone(), vec![host]));
    }
    // The `[[upstream]]`, whose one route takes any host, and a listener routed by host.
    for name in ["api", "rev"] {
        assert_refused(running.local_addr(name).unwrap(), &bad, 400, "bad_request").await;
    }
    assert_eq!(
        upstream.received(),
        "",
        "a request with a bad Host reached the upstream"
    );

    assert_controls_forwarded(&sidecar, &upstream).await;
    sidecar.stop().await;
}

/// An upstream answering 600–999 (hyper passes any three digits on) counts under
/// `code="other"`, not a series per code; and a reload that removes the route removes its
/// series, `other` and the ordinary codes alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_outside_100_to_599_share_one_series_that_a_reload_removes() {
    let endpoint = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let odd = serve(|request: http::Request<hyper::body::Incoming>| async move {
        let code: u16 = request.uri().path()[1..].parse().unwrap();
        Response::builder()
            .status(StatusCode::from_u16(code).unwrap())
            .body(full("odd"))
            .unwrap()
    })
    .await;
    let plain = serve(support::echo).await;
    let odd_route = Upstream::new("odd", &odd.url(""))
        .allow_plain_http(true)
        .token(token(&endpoint));
    let kept_route = Upstream::new("kept", &plain.url(""))
        .allow_plain_http(true)
        .token(token(&endpoint));
    let both = ConfigBuilder::new()
        .upstream(odd_route)
        .upstream(kept_route.clone())
        .render();
    let mut sidecar = Sidecar::start(&both).await;
    let admin = sidecar.running().admin_addr();
    for code in [600, 799, 999, 200, 599] {
        let answer = support::get(&sidecar.url("odd", &format!("/{code}"))).await;
        assert_eq!(answer.status.as_u16(), code);
    }
    let scrape = support::get(&format!("http://{admin}/metrics")).await;
    let scrape = String::from_utf8(scrape.body.to_vec()).unwrap();
    let requests = |code: &str| {
        metric(
            &scrape,
            &format!(r#"bearerd_requests_total{{code="{code}",upstream="odd"}}"#),
        )
    };
    assert_eq!(requests("other"), Some(3.0), "{scrape}");
    assert_eq!(requests("200"), Some(1.0), "{scrape}");
    assert_eq!(requests("599"), Some(1.0), "{scrape}");
    for code in ["600", "799", "999"] {
        assert_eq!(requests(code), None, "{scrape}");
    }

    // The route goes; its series go with it.
    let path = sidecar.file("bearerd.toml");
    std::fs::write(&path, ConfigBuilder::new().upstream(kept_route).render()).unwrap();
    let config = bearerd::config::Config::load(&path).unwrap();
    sidecar
        .running
        .as_mut()
        .unwrap()
        .reload(&config)
        .await
        .unwrap();
    let scrape = support::get(&format!("http://{admin}/metrics")).await;
    let scrape = String::from_utf8(scrape.body.to_vec()).unwrap();
    assert!(!scrape.contains(r#"upstream="odd""#), "{scrape}");
    assert!(scrape.contains(r#"upstream="kept""#), "{scrape}");
    sidecar.stop().await;
}

/// A forward listener refuses a host it does not serve and a path its host's routes do not
/// take with the same status and code, and a detail that says which of the two it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_host_with_an_unserved_path_is_refused_as_such() {
    let upstream = RecordingUpstream::start().await;
    let endpoint = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let config = ConfigBuilder::new()
        .listener(
            Listener::new("forward").route(
                Route::named("v1")
                    .host("pre.rec.test")
                    .path_prefix("/v1")
                    .url(&upstream.url())
                    .allow_plain_http(true)
                    .token(token(&endpoint)),
            ),
        )
        .render();
    let sidecar = Sidecar::start(&config).await;
    let addr = sidecar.running().local_addr("v1").unwrap();
    for (target, detail) in [
        (
            "http://pre.rec.test/v2/x",
            "serves this host, but no route of it takes this path",
        ),
        (
            "http://other.rec.test/v1/x",
            "no route of this forward proxy takes this host",
        ),
    ] {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: pre.rec.test\r\nConnection: close\r\n\r\n");
        let answer = exchange(addr, request.as_bytes()).await;
        assert_eq!(
            refusal(&answer),
            (403, "host_not_served".to_owned()),
            "{answer}"
        );
        assert!(answer.contains(detail), "{target}: {answer}");
    }
    assert_eq!(
        upstream.received(),
        "",
        "a refused request reached the upstream"
    );
    sidecar.stop().await;
}
