//! On-behalf-of token exchange (`subject_token_from = "header:<Name>"`), end to end through a
//! sidecar against in-process token endpoints that answer per subject: the exchange's form,
//! the subject header never reaching the upstream (HTTP/1.1, HTTP/2, a WebSocket handshake),
//! tokens cached per subject under an LRU bound and the subject's JWT expiry, one flight per
//! subject, the 401 and 503 answers, the upstream's 401, the fleet cache in a real Redis, the
//! subject kept out of logs and metrics, DPoP (the exchange proved, each subject's token bound),
//! and `--fetch-token --subject-token-file`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::config::{string, ConfigBuilder, Table, Token, Upstream};
use support::{echo, json as answer, send, serve, token_endpoint, token_ok, Sidecar};

const HEADER: &str = "x-subject-token";
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// A token endpoint that exchanges subject `s` for `for-<s>-<n>` (the n-th request), refuses
/// subjects starting with `bad` (400 `invalid_grant`, quoting the subject back as a careless
/// server would) and fails for subjects starting with `boom` (500) and `busy` (503, come back
/// in 30 s).
async fn exchanger() -> support::TokenEndpoint {
    token_endpoint(|n, request| async move {
        let subject = request.form.get("subject_token").cloned().unwrap_or_default();
        if subject.starts_with("bad") {
            return answer(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_grant", "error_description": format!("subject {subject} is not valid")}),
            );
        }
        if subject.starts_with("boom") {
            return answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "server_error"}),
            );
        }
        if subject.starts_with("busy") {
            let mut busy = answer(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "temporarily_unavailable"}),
            );
            busy.headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("30"));
            return busy;
        }
        token_ok(&format!("for-{}-{n}", short(&subject)), 3600)
    })
    .await
}

/// A subject as a token names it: JWT subjects are long, their `sub` says who.
fn short(subject: &str) -> String {
    match subject.split('.').nth(1) {
        Some(payload) => URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .and_then(|claims| claims["sub"].as_str().map(str::to_owned))
            .unwrap_or_else(|| subject.to_owned()),
        None => subject.to_owned(),
    }
}

/// An unsigned JWT for `sub`, expiring at `exp` (Unix seconds): bearerd never verifies it.
fn jwt(sub: &str, exp: u64) -> String {
    format!(
        "{}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(json!({"sub": sub, "exp": exp}).to_string())
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `[upstream.token]` of an on-behalf-of exchange at `endpoint`, the subject in `header`.
fn on_behalf(endpoint: &support::TokenEndpoint, header: &str) -> Token {
    Token::new(&endpoint.url("/token"), "gateway")
        .secret("gw-secret")
        .set("grant", string("token_exchange"))
        .set("subject_token_from", string(&format!("header:{header}")))
        .set(
            "subject_token_type",
            string("urn:ietf:params:oauth:token-type:access_token"),
        )
        .audience("downstream-api")
}

fn config(token: Token, upstream: &str) -> ConfigBuilder {
    ConfigBuilder::new().upstream(Upstream::new("api", upstream).token(token))
}

async fn sidecar(token: Token, upstream: &support::Server) -> Sidecar {
    Sidecar::start(&config(token, &upstream.url("/v1")).render()).await
}

/// A GET to the sidecar with `headers`.
fn request(sidecar: &Sidecar, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::get(sidecar.url("api", "/x"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(Bytes::new())).unwrap()
}

async fn as_subject(sidecar: &Sidecar, subject: &str) -> support::Answer {
    send(request(sidecar, &[(HEADER, subject)])).await
}

/// `/status` as JSON.
async fn status(sidecar: &Sidecar) -> Value {
    let mut headers = http::HeaderMap::new();
    headers.insert("accept", "application/json".parse().unwrap());
    let response = sidecar.running().admin().status(
        &http::Method::GET,
        &headers,
        "127.0.0.1".parse().unwrap(),
        &[],
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

fn scrape(sidecar: &Sidecar) -> String {
    sidecar.running().metrics().render().unwrap()
}

#[tokio::test]
async fn the_subject_is_exchanged_per_request_and_never_forwarded() {
    let endpoint = exchanger().await;
    let upstream = serve(echo).await;
    let sidecar = sidecar(on_behalf(&endpoint, "X-Subject-Token"), &upstream).await;
    // Nothing is fetched before a request brings a subject, and /readyz does not wait for one.
    let ready = sidecar
        .running()
        .admin()
        .answer(&http::Method::GET, "/readyz");
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(endpoint.count(), 0);

    let seen = as_subject(&sidecar, "alice").await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer for-alice-0"));
    assert!(!seen.headers.contains_key(HEADER), "{:?}", seen.headers);
    let form = &endpoint.requests()[0].form;
    assert_eq!(form["grant_type"], TOKEN_EXCHANGE);
    assert_eq!(form["subject_token"], "alice");
    assert_eq!(
        form["subject_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(form["audience"], "downstream-api");
    assert_eq!(
        endpoint.requests()[0].basic(),
        Some(("gateway".into(), "gw-secret".into()))
    );

    // The same subject again: its token is held.
    let seen = as_subject(&sidecar, "alice").await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer for-alice-0"));
    assert_eq!(endpoint.count(), 1);
    // Another subject: its own exchange.
    let seen = as_subject(&sidecar, "bob").await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer for-bob-1"));
    assert!(!seen.headers.contains_key(HEADER));
    assert_eq!(endpoint.count(), 2);

    let source = &status(&sidecar).await["token_sources"][0];
    assert_eq!(source["grant"], "token_exchange");
    assert_eq!(source["phase"], "on_demand");
    assert_eq!(source["on_behalf_of"]["header"], HEADER);
    assert_eq!(source["on_behalf_of"]["cached_subjects"], 2);
    assert_eq!(source["on_behalf_of"]["max_subjects"], 1000);
    let page = sidecar.running().admin().status(
        &http::Method::GET,
        &http::HeaderMap::new(),
        "127.0.0.1".parse().unwrap(),
        &[],
    );
    let html = page.into_body().collect().await.unwrap().to_bytes();
    let html = String::from_utf8_lossy(&html);
    assert!(
        html.contains(
            "on behalf of the subject in <code>x-subject-token</code>: 2 of at most 1000 subjects cached"
        ),
        "{html}"
    );
    assert!(!html.contains("alice") && !html.contains("for-bob"));
    assert_eq!(
        support::metric(
            &scrape(&sidecar),
            r#"bearerd_token_subjects{upstream="api"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        support::metric(
            &scrape(&sidecar),
            r#"bearerd_token_fetch_total{outcome="success",upstream="api"}"#
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn with_authorization_the_bearer_scheme_is_stripped_and_the_apps_value_not_forwarded() {
    let endpoint = exchanger().await;
    let upstream = serve(echo).await;
    let sidecar = sidecar(on_behalf(&endpoint, "Authorization"), &upstream).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let value = format!("{scheme} alice-at");
        let seen = send(request(&sidecar, &[("authorization", &value)]))
            .await
            .echo();
        assert_eq!(seen.headers["authorization"], ["Bearer for-alice-at-0"]);
    }
    assert_eq!(endpoint.count(), 1);
    assert_eq!(endpoint.requests()[0].form["subject_token"], "alice-at");

    let basic = send(request(
        &sidecar,
        &[("authorization", "Basic dXNlcjpwYXNz")],
    ))
    .await;
    assert_eq!(basic.status, StatusCode::UNAUTHORIZED);
    assert_eq!(basic.json()["error"], "subject_token_missing");
    assert_eq!(endpoint.count(), 1);
}

#[tokio::test]
async fn without_the_header_401_and_nothing_is_sent_anywhere() {
    let endpoint = exchanger().await;
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&seen);
    let upstream = serve(move |request| {
        counted.fetch_add(1, Ordering::SeqCst);
        echo(request)
    })
    .await;
    let sidecar = sidecar(on_behalf(&endpoint, HEADER), &upstream).await;
    for headers in [
        vec![],
        vec![(HEADER, "")],
        vec![(HEADER, "a"), (HEADER, "b")],
    ] {
        let refused = send(request(&sidecar, &headers)).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(refused.json()["error"], "subject_token_missing");
        assert_eq!(refused.json()["upstream"], "api");
        assert_eq!(refused.headers["www-authenticate"], "Bearer");
    }
    assert_eq!(endpoint.count(), 0);
    assert_eq!(seen.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_refused_subject_is_401_and_not_kept_and_a_failing_endpoint_503() {
    let endpoint = exchanger().await;
    let upstream = serve(echo).await;
    let sidecar = sidecar(on_behalf(&endpoint, HEADER), &upstream).await;
    for attempt in 1..=2 {
        let refused = as_subject(&sidecar, "bad-subject").await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        let body = refused.json();
        assert_eq!(body["error"], "subject_token_rejected");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("invalid_grant"), "{detail}");
        assert!(!detail.contains("bad-subject"), "{detail}");
        // Nothing kept: the next request with it is exchanged (and refused) again.
        assert_eq!(endpoint.count(), attempt);
    }
    assert_eq!(
        status(&sidecar).await["token_sources"][0]["on_behalf_of"]["cached_subjects"],
        0
    );

    let failed = as_subject(&sidecar, "boom-subject").await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failed.json()["error"], "token_unavailable");
    assert!(failed.headers.contains_key("retry-after"));

    // An endpoint that asks to come back later is not asked again for that subject before.
    let before = endpoint.count();
    for _ in 0..3 {
        let busy = as_subject(&sidecar, "busy-subject").await;
        assert_eq!(busy.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.json()["error"], "token_unavailable");
        let wait: u64 = busy.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=30).contains(&wait), "{wait}");
    }
    assert_eq!(endpoint.count(), before + 1);

    // An expired JWT subject is refused without a request.
    let before = endpoint.count();
    let expired = as_subject(&sidecar, &jwt("carol", unix_now() - 60)).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    assert_eq!(expired.json()["error"], "subject_token_rejected");
    assert_eq!(endpoint.count(), before);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_503() {
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/token", closed.local_addr().unwrap());
    drop(closed);
    let upstream = serve(echo).await;
    let token = Token::new(&url, "gateway")
        .secret("s")
        .set("grant", string("token_exchange"))
        .set("subject_token_from", string(&format!("header:{HEADER}")));
    let sidecar = sidecar(token, &upstream).await;
    let failed = as_subject(&sidecar, "alice").await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failed.json()["error"], "token_unavailable");
}

#[tokio::test]
async fn an_endpoint_that_does_not_answer_in_time_is_503() {
    let endpoint = token_endpoint(|_, _| std::future::pending()).await;
    let upstream = serve(echo).await;
    let token = on_behalf(&endpoint, HEADER).set("timeout", string("300ms"));
    let sidecar = sidecar(token, &upstream).await;
    let failed = as_subject(&sidecar, "alice").await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failed.json()["error"], "token_unavailable");
    let detail = failed.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("300ms"), "{detail}");
    assert_eq!(
        support::metric(
            &scrape(&sidecar),
            r#"bearerd_token_fetch_total{outcome="timeout",upstream="api"}"#
        ),
        Some(1.0)
    );
}

/// A token endpoint that holds each answer for a subject in `held` until released.
struct Holding {
    endpoint: support::TokenEndpoint,
    release: Arc<tokio::sync::Semaphore>,
}

async fn holding(held: &'static str) -> Holding {
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = Arc::clone(&release);
    let endpoint = token_endpoint(move |n, request| {
        let gate = Arc::clone(&gate);
        async move {
            let subject = request.form["subject_token"].clone();
            if subject == held {
                gate.acquire().await.unwrap().forget();
            }
            token_ok(&format!("for-{subject}-{n}"), 3600)
        }
    })
    .await;
    Holding { endpoint, release }
}

#[tokio::test]
async fn one_flight_per_subject_and_subjects_do_not_wait_for_each_other() {
    let held = holding("alice").await;
    let upstream = serve(echo).await;
    let sidecar = sidecar(on_behalf(&held.endpoint, HEADER), &upstream).await;
    const N: usize = 8;
    let url = sidecar.url("api", "/x");
    let calls: Vec<_> = (0..N)
        .map(|_| {
            let request = Request::get(&url)
                .header(HEADER, "alice")
                .body(Full::new(Bytes::new()))
                .unwrap();
            tokio::spawn(send(request))
        })
        .collect();
    held.endpoint.wait_for_requests(1).await;
    // Every request is in bearerd, waiting for the one flight.
    let in_flight = format!(r#"bearerd_requests_in_flight{{upstream="api"}} {N}"#);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !scrape(&sidecar).contains(&in_flight) {
        assert!(std::time::Instant::now() < deadline, "{}", scrape(&sidecar));
        tokio::task::yield_now().await;
    }
    // Another subject is exchanged while alice's exchange is held.
    let seen = as_subject(&sidecar, "bob").await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer for-bob-1"));
    assert_eq!(held.endpoint.count(), 2);

    held.release.add_permits(1);
    for call in calls {
        let seen = call.await.unwrap().echo();
        assert_eq!(seen.header("authorization"), Some("Bearer for-alice-0"));
    }
    assert_eq!(
        held.endpoint.count(),
        2,
        "one exchange for alice's {N} requests"
    );
}

#[tokio::test]
async fn at_most_max_subjects_are_kept_the_least_recently_used_going_first() {
    let endpoint = exchanger().await;
    let upstream = serve(echo).await;
    let token = on_behalf(&endpoint, HEADER).set("max_subjects", 2);
    let sidecar = sidecar(token, &upstream).await;
    let token_of = |answer: support::Answer| {
        answer
            .echo()
            .header("authorization")
            .unwrap()
            .trim_start_matches("Bearer ")
            .to_owned()
    };
    assert_eq!(token_of(as_subject(&sidecar, "a").await), "for-a-0");
    assert_eq!(token_of(as_subject(&sidecar, "b").await), "for-b-1");
    // a is used again: b is now the least recently used, and c evicts it.
    assert_eq!(token_of(as_subject(&sidecar, "a").await), "for-a-0");
    assert_eq!(token_of(as_subject(&sidecar, "c").await), "for-c-2");
    assert_eq!(endpoint.count(), 3);
    assert_eq!(token_of(as_subject(&sidecar, "a").await), "for-a-0");
    assert_eq!(endpoint.count(), 3, "a is still held");
    assert_eq!(token_of(as_subject(&sidecar, "b").await), "for-b-3");
    assert_eq!(endpoint.count(), 4, "b was evicted");
    let source = &status(&sidecar).await["token_sources"][0]["on_behalf_of"];
    assert_eq!(source["cached_subjects"], 2);
    assert_eq!(source["max_subjects"], 2);
}

#[tokio::test]
async fn an_upstream_401_replays_once_with_a_new_exchange_for_that_subject() {
    let endpoint = exchanger().await;
    let refused = Arc::new(Mutex::new(vec!["Bearer for-alice-1".to_owned()]));
    let refusing = Arc::clone(&refused);
    let upstream = serve(move |request: Request<hyper::body::Incoming>| {
        let refusing = Arc::clone(&refusing);
        async move {
            let token = request.headers()["authorization"]
                .to_str()
                .unwrap()
                .to_owned();
            if refusing.lock().unwrap().contains(&token) {
                answer(StatusCode::UNAUTHORIZED, json!({"error": "invalid_token"}))
            } else {
                echo(request).await
            }
        }
    })
    .await;
    let sidecar = sidecar(on_behalf(&endpoint, HEADER), &upstream).await;
    let seen = as_subject(&sidecar, "bob").await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer for-bob-0"));
    let seen = as_subject(&sidecar, "alice").await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer for-alice-2"));
    assert_eq!(endpoint.count(), 3);
    assert_eq!(endpoint.requests()[2].form["subject_token"], "alice");
    // The new token is held; bob's was never dropped.
    as_subject(&sidecar, "alice").await.echo();
    as_subject(&sidecar, "bob").await.echo();
    assert_eq!(endpoint.count(), 3);
}

#[tokio::test]
async fn concurrent_401s_of_one_subjects_token_cause_one_new_exchange() {
    const N: usize = 6;
    let endpoint = exchanger().await;
    // Every request with alice's first token waits until all N have arrived, then is
    // refused: the N 401s come back together.
    let together = Arc::new(tokio::sync::Barrier::new(N));
    let upstream = serve(move |request: Request<hyper::body::Incoming>| {
        let together = Arc::clone(&together);
        async move {
            if request.headers()["authorization"] == "Bearer for-alice-0" {
                together.wait().await;
                return answer(StatusCode::UNAUTHORIZED, json!({"error": "invalid_token"}));
            }
            echo(request).await
        }
    })
    .await;
    let sidecar = sidecar(on_behalf(&endpoint, HEADER), &upstream).await;
    let url = sidecar.url("api", "/x");
    let calls: Vec<_> = (0..N)
        .map(|_| {
            let request = Request::get(&url)
                .header(HEADER, "alice")
                .body(Full::new(Bytes::new()))
                .unwrap();
            tokio::spawn(send(request))
        })
        .collect();
    for call in calls {
        let seen = call.await.unwrap().echo();
        assert_eq!(seen.header("authorization"), Some("Bearer for-alice-1"));
    }
    assert_eq!(
        endpoint.count(),
        2,
        "one exchange, then one for the {N} 401s"
    );
}

#[tokio::test]
async fn the_exchanged_token_expires_with_a_jwt_subject() {
    let endpoint = exchanger().await;
    let upstream = serve(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let logs = Logs::capture();
    let sidecar = Sidecar::start_in(
        dir,
        &config(on_behalf(&endpoint, HEADER), &upstream.url("/v1")).render(),
    )
    .await;
    // The endpoint grants an hour; the subject has ten minutes left.
    let exp = unix_now() + 600;
    let subject = jwt("dave", exp);
    let seen = as_subject(&sidecar, &subject).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer for-dave-0"));
    let acquired = logs
        .lines()
        .into_iter()
        .find(|line| line.contains("token acquired"))
        .unwrap();
    let expected = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(exp));
    assert!(
        acquired.contains(&format!("expires_at=\"{expected}\"")),
        "{acquired}"
    );
    let fetched = logs
        .lines()
        .into_iter()
        .find(|line| line.contains("token exchanged on behalf of a subject"))
        .unwrap();
    assert!(
        fetched.contains("lifetime_from=the subject token's exp") && !fetched.contains("dave"),
        "{fetched}"
    );
}

#[tokio::test]
async fn http2_requests_exchange_their_subject_and_grpc_gets_unauthenticated() {
    let endpoint = exchanger().await;
    let upstream = serve(echo).await;
    let sidecar = sidecar(on_behalf(&endpoint, HEADER), &upstream).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let response = client
        .request(request(&sidecar, &[(HEADER, "erin")]))
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let seen: support::Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen.header("authorization"), Some("Bearer for-erin-0"));
    assert!(!seen.headers.contains_key(HEADER));

    let call = Request::post(sidecar.url("api", "/pkg.Service/Method"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let response = client.request(call).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "16");
}

#[tokio::test]
async fn a_websocket_handshake_carries_the_exchanged_token_not_the_subject() {
    let endpoint = exchanger().await;
    let handshakes = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&handshakes);
    // An upstream that records the handshake's head and refuses to switch: what reached it
    // is what matters here (tests/in_process/upgrade.rs covers the tunnel).
    let upstream = serve(move |request: Request<hyper::body::Incoming>| {
        recorded.lock().unwrap().push(request.headers().clone());
        async { answer(StatusCode::FORBIDDEN, json!({"error": "no"})) }
    })
    .await;
    let token = on_behalf(&endpoint, HEADER);
    let config = ConfigBuilder::new()
        .upstream(
            Upstream::new("api", &upstream.url("/v1"))
                .set("upgrade_protocols", "[\"websocket\"]")
                .token(token),
        )
        .render();
    let sidecar = Sidecar::start(&config).await;
    let answer = send(request(
        &sidecar,
        &[
            (HEADER, "frank"),
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
    ))
    .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    let seen = handshakes.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["upgrade"], "websocket");
    assert_eq!(seen[0]["authorization"], "Bearer for-frank-0");
    assert!(seen[0].get(HEADER).is_none());
}

#[tokio::test]
async fn the_subject_is_in_no_log_line_and_no_metric() {
    let logs = Logs::capture();
    let endpoint = exchanger().await;
    let upstream = serve(echo).await;
    let sidecar = sidecar(on_behalf(&endpoint, HEADER), &upstream).await;
    let good = "subject-SECRET-good-0123456789";
    let bad = "bad-SECRET-subject-9876543210";
    as_subject(&sidecar, good).await.echo();
    as_subject(&sidecar, good).await.echo();
    let refused = as_subject(&sidecar, bad).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let metrics = scrape(&sidecar);
    let status = status(&sidecar).await.to_string();
    let lines = logs.lines();
    let all = lines.join("\n");
    assert!(!all.is_empty());
    for (what, text) in [("logs", &all), ("metrics", &metrics), ("/status", &status)] {
        assert!(!text.contains("SECRET"), "a subject in the {what}:\n{text}");
    }
    // The audit events name each subject by its hash.
    let hash = |subject: &str| {
        let mut hash = URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            subject.as_bytes(),
        ));
        hash.truncate(16);
        hash
    };
    let audit: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("bearerd::audit"))
        .collect();
    assert!(
        audit.iter().any(|line| line.contains("token acquired")
            && line.contains(&format!("subject_hash=\"{}\"", hash(good)))),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|line| line.contains("token request refused")
                && line.contains(&format!("subject_hash=\"{}\"", hash(bad)))),
        "{audit:#?}"
    );
    // Metrics count per source, never per subject.
    assert!(!metrics.contains(&hash(good)));
    assert_eq!(
        support::metric(
            &metrics,
            r#"bearerd_token_fetch_total{outcome="rejected",upstream="api"}"#
        ),
        Some(1.0)
    );
}

/// A `[cache]` table for `redis`, sealed with a key written (0600) into `dir`.
fn redis_cache(redis: &support::redis::Redis, dir: &std::path::Path) -> Table {
    use std::os::unix::fs::PermissionsExt;
    let key_file = dir.join("cache.key");
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    Table::new()
        .set("backend", string("redis"))
        .set("url", string(&redis.url()))
        .set("key_file", string(key_file.to_str().unwrap()))
}

#[tokio::test]
async fn two_sidecars_sharing_redis_exchange_a_subject_once() {
    // Blocking calls to Redis below run while the sidecars wait for nothing.
    let redis = support::redis::Redis::start();
    let endpoint = exchanger().await;
    let upstream = serve(echo).await;
    let key_dir = tempfile::tempdir().unwrap();
    let text = config(on_behalf(&endpoint, HEADER), &upstream.url("/v1"))
        .table("cache", redis_cache(&redis, key_dir.path()))
        .render();
    let first = Sidecar::start(&text).await;
    let second = Sidecar::start(&text).await;
    let exp = unix_now() + 600;
    let subject = jwt("grace", exp);
    let seen = as_subject(&first, &subject).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer for-grace-0"));
    let seen = as_subject(&second, &subject).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer for-grace-0"));
    assert_eq!(
        endpoint.count(),
        1,
        "the second sidecar took the fleet's token"
    );
    assert!(!seen.headers.contains_key(HEADER));

    // One entry, named by neither the subject nor its hash, sealed, and gone with the
    // subject's expiry (not the token's hour).
    let keys = redis.keys("*");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let digest = URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        subject.as_bytes(),
    ));
    assert!(!keys[0].contains(&digest[..16]), "{keys:?}");
    let stored = redis.get(&keys[0]).unwrap();
    let stored = String::from_utf8_lossy(&stored);
    assert!(!stored.contains("for-grace") && !stored.contains(&subject));
    let ttl = redis.pttl(&keys[0]);
    assert!(ttl > 0 && ttl <= 600_000, "{ttl}");
    // Another subject is its own entry.
    as_subject(&second, "henry").await.echo();
    assert_eq!(endpoint.count(), 2);
    assert_eq!(redis.keys("*").len(), 2);
}

#[tokio::test]
async fn a_token_an_upstream_rejects_leaves_the_fleet_cache() {
    let redis = support::redis::Redis::start();
    // The second exchange fails: the rejected token's entry must be gone all the same.
    let endpoint = token_endpoint(|n, _| async move {
        if n == 1 {
            return answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "server_error"}),
            );
        }
        token_ok(&format!("for-mia-{n}"), 3600)
    })
    .await;
    let upstream = serve(move |request: Request<hyper::body::Incoming>| async move {
        if request.headers()["authorization"] == "Bearer for-mia-0" {
            return answer(StatusCode::UNAUTHORIZED, json!({"error": "invalid_token"}));
        }
        echo(request).await
    })
    .await;
    let key_dir = tempfile::tempdir().unwrap();
    let text = config(on_behalf(&endpoint, HEADER), &upstream.url("/v1"))
        .table("cache", redis_cache(&redis, key_dir.path()))
        .render();
    let first = Sidecar::start(&text).await;
    // Rejected, and no new token to replay with: the upstream's 401 goes to the app.
    let refused = as_subject(&first, "mia").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.json()["error"], "invalid_token");
    assert_eq!(endpoint.count(), 2);
    assert!(redis.keys("*").is_empty(), "{:?}", redis.keys("*"));
    // Another replica exchanges the subject anew rather than take the rejected token.
    let second = Sidecar::start(&text).await;
    let seen = as_subject(&second, "mia").await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer for-mia-2"));
    assert_eq!(endpoint.count(), 3);
}

#[tokio::test]
async fn the_file_cache_never_holds_an_on_behalf_of_token() {
    let endpoint = exchanger().await;
    let upstream = serve(echo).await;
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("tokens");
    let text = config(on_behalf(&endpoint, HEADER), &upstream.url("/v1"))
        .table(
            "cache",
            Table::new()
                .set("backend", string("file"))
                .set("dir", string(dir.to_str().unwrap())),
        )
        .render();
    let sidecar = Sidecar::start(&text).await;
    as_subject(&sidecar, "ivan").await.echo();
    assert_eq!(endpoint.count(), 1);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[tokio::test]
async fn a_reload_keeps_the_subjects_of_an_unchanged_source() {
    let endpoint = exchanger().await;
    let upstream = serve(echo).await;
    let text = |max: i64, path: &str| {
        config(
            on_behalf(&endpoint, HEADER).set("max_subjects", max),
            &upstream.url(path),
        )
        .render()
    };
    let mut sidecar = Sidecar::start(&text(10, "/v1")).await;
    as_subject(&sidecar, "lena").await.echo();
    let reload = |sidecar: &mut Sidecar, text: String| {
        std::fs::write(sidecar.file("bearerd.toml"), text).unwrap();
        bearerd::config::Config::load(&sidecar.file("bearerd.toml")).unwrap()
    };
    // The route moves; the token settings stay: lena's token is still held.
    let config = reload(&mut sidecar, text(10, "/v2"));
    sidecar
        .running
        .as_mut()
        .unwrap()
        .reload(&config)
        .await
        .unwrap();
    let seen = as_subject(&sidecar, "lena").await.echo();
    assert_eq!(seen.uri, "/v2/x");
    assert_eq!(seen.header("authorization"), Some("Bearer for-lena-0"));
    assert_eq!(endpoint.count(), 1);
    // Other token settings are another source, which starts with no subject.
    let config = reload(&mut sidecar, text(20, "/v2"));
    sidecar
        .running
        .as_mut()
        .unwrap()
        .reload(&config)
        .await
        .unwrap();
    let seen = as_subject(&sidecar, "lena").await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer for-lena-1"));
    assert_eq!(
        status(&sidecar).await["token_sources"][0]["on_behalf_of"]["max_subjects"],
        20
    );
}

#[test]
fn the_config_takes_one_subject_source_and_a_usable_header() {
    let check = |token: Token| {
        let text = ConfigBuilder::new()
            .upstream(Upstream::new("api", "https://api.example.com").token(token))
            .render();
        match bearerd::config::Config::parse(Path::new("/etc/bearerd.toml"), &text) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let exchange = || {
        Token::new("https://auth.example.com/token", "app")
            .secret("s")
            .set("grant", string("token_exchange"))
    };
    let cases = [
        (
            exchange()
                .set("subject_token_file", string("t"))
                .set("subject_token_from", string("header:X-Subject")),
            "upstream[0].token.subject_token_from: set only one of subject_token_file",
        ),
        (
            exchange().set("subject_token_from", string("X-Subject")),
            "upstream[0].token.subject_token_from: must be \"header:<Name>\"",
        ),
        (
            exchange().set("subject_token_from", string("header:Host")),
            "upstream[0].token.subject_token_from: \"host\" is a header bearerd sets",
        ),
        (
            exchange().set("subject_token_from", string("header:bad header")),
            "is not a valid header name",
        ),
        (
            exchange()
                .set("subject_token_file", string("t"))
                .set("max_subjects", 5),
            "upstream[0].token.max_subjects: is for on-behalf-of (subject_token_from) only",
        ),
        (
            exchange()
                .set("subject_token_from", string("header:X-Subject"))
                .set("max_subjects", 0),
            "upstream[0].token.max_subjects: must be at least 1",
        ),
        (
            Token::new("https://auth.example.com/token", "app")
                .secret("s")
                .set("subject_token_from", string("header:X-Subject")),
            "upstream[0].token.subject_token_from: is used by grant = \"token_exchange\" only",
        ),
    ];
    for (token, expected) in cases {
        let error = check(token);
        assert!(error.contains(expected), "{expected}\nnot in\n{error}");
    }
    assert_eq!(
        check(exchange().set("subject_token_from", string("header:Authorization"))),
        ""
    );
}

#[tokio::test]
async fn check_describes_the_source_and_fetch_token_needs_a_subject_file() {
    let endpoint = exchanger().await;
    let dir = tempfile::tempdir().unwrap();
    let text = ConfigBuilder::new()
        .upstream(
            Upstream::new("obo", "https://api.example.com")
                .token(on_behalf(&endpoint, "X-Subject-Token").set("max_subjects", 50)),
        )
        .upstream(
            Upstream::new("plain", "https://other.example.com")
                .token(Token::new(&endpoint.url("/token"), "app").secret("s")),
        )
        .render();
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, &text).unwrap();
    let config = bearerd::config::Config::load(&path).unwrap();

    let described = bearerd::check::check(&config).unwrap();
    assert!(
        described.contains("on-behalf-of: subject token (urn:ietf:params:oauth:token-type:access_token) from each request's x-subject-token header")
            && described.contains("at most 50 subjects"),
        "{described}"
    );
    assert_eq!(endpoint.count(), 0, "--check sends nothing");

    let needs = bearerd::check::fetch_token_for(&config, "obo", false, None)
        .await
        .unwrap_err();
    assert!(needs.contains("--subject-token-file"), "{needs}");
    let subject_file = dir.path().join("subject");
    std::fs::write(&subject_file, "judy-token\n").unwrap();
    let refused = bearerd::check::fetch_token_for(&config, "plain", false, Some(&subject_file))
        .await
        .unwrap_err();
    assert!(
        refused.contains("--subject-token-file is for on-behalf-of upstreams"),
        "{refused}"
    );
    assert_eq!(endpoint.count(), 0);
    let fetched = bearerd::check::fetch_token_for(&config, "obo", true, Some(&subject_file))
        .await
        .unwrap();
    assert!(
        fetched.contains("access token: for-judy-token-0"),
        "{fetched}"
    );
    assert!(
        !fetched.contains("judy-token\n") && fetched.contains("on behalf of the subject with hash")
    );
    assert_eq!(endpoint.requests()[0].form["subject_token"], "judy-token");
}

/// Every log line written on this test's thread (the sidecar's tasks run on it), at every
/// level, audit events included.
struct Logs {
    buffer: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Logs {
    fn capture() -> Self {
        // tracing caches whether a callsite is of interest once, process-wide, against the
        // dispatcher of the thread that reaches it first: a test thread without a subscriber
        // would make it "never" for this one too. A global subscriber that takes every event
        // (and keeps none) makes every thread answer "always"; the capture below is this
        // thread's own.
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
        });
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buffer);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Writer(Arc::clone(&writer)))
            .finish();
        Self {
            buffer,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.buffer.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

struct Writer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The claims of a DPoP proof (not verified here: tests/in_process/auth.rs checks signatures;
/// this test checks what binds the proof to the exchange and to the exchanged token).
fn proof_claims(proof: &str) -> (Value, Value) {
    let mut parts = proof.split('.');
    let mut part = || {
        let bytes = URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap();
        serde_json::from_slice::<Value>(&bytes).unwrap()
    };
    (part(), part())
}

#[tokio::test]
async fn with_dpop_the_exchange_is_proved_and_each_subjects_token_bound_to_the_proofs() {
    // The token endpoint wants a proof on the exchange (no `ath`: no token yet) and issues
    // DPoP-bound tokens per subject.
    let endpoint = token_endpoint(|n, request| async move {
        let subject = request.form.get("subject_token").cloned().unwrap_or_default();
        let Some(proof) = request.headers.get("dpop") else {
            return answer(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_dpop_proof", "error_description": "no proof"}),
            );
        };
        let (header, claims) = proof_claims(proof.to_str().unwrap());
        if header["typ"] != "dpop+jwt" || claims["htm"] != "POST" || claims.get("ath").is_some() {
            return answer(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_dpop_proof", "error_description": claims.to_string()}),
            );
        }
        answer(
            StatusCode::OK,
            json!({"access_token": format!("bound-{subject}-{n}"), "token_type": "DPoP", "expires_in": 3600}),
        )
    })
    .await;
    let upstream = serve(echo).await;
    let token = on_behalf(&endpoint, HEADER).set("dpop", true);
    let sidecar = sidecar(token, &upstream).await;

    let mut thumbprints = Vec::new();
    for (subject, expected) in [("alice", "bound-alice-0"), ("bob", "bound-bob-1")] {
        let seen = as_subject(&sidecar, subject).await.echo();
        assert_eq!(
            seen.header("authorization"),
            Some(format!("DPoP {expected}").as_str()),
            "{:?}",
            seen.headers
        );
        assert!(!seen.headers.contains_key(HEADER));
        let (header, claims) = proof_claims(seen.header("dpop").expect("a DPoP proof"));
        assert_eq!(claims["htm"], "GET");
        let ath = URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            expected.as_bytes(),
        ));
        assert_eq!(
            claims["ath"],
            ath.as_str(),
            "the proof names this subject's token"
        );
        assert!(
            header["jwk"].get("d").is_none(),
            "no private key in a proof"
        );
        thumbprints.push(header["jwk"].to_string());
    }
    assert_eq!(endpoint.count(), 2, "one exchange per subject, each proved");
    assert_eq!(
        thumbprints[0], thumbprints[1],
        "one key proves for every subject of the source"
    );
}
