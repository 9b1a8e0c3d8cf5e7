//! `[telemetry]` against a real OTLP/HTTP receiver (`tests/interop/otlp_receiver.py`, which
//! decodes what bearerd exports with the `opentelemetry-proto` package): the server span is
//! the child of the app's `traceparent`, each upstream attempt a client span whose context
//! the upstream receives, a 401 replay two attempts, the token fetch a span of its own that
//! the request links to; nothing secret in any span. And a collector that is down, hangs or
//! answers errors costs no request, while the drop counter rises.
//!
//! Ignored by a plain `cargo test`: `make interop` makes the virtualenv and runs them with
//! `BEARERD_INTEROP_PYTHON` naming its interpreter.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use support::{echo, json, send, serve, token_endpoint, token_ok, Server, Sidecar};

/// Longest wait for the receiver, the spans, or the drop counter.
const PATIENCE: Duration = Duration::from_secs(60);

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_SPAN_ID: &str = "00f067aa0ba902b7";

/// The receiver, answering as `answer` says (`ok`, `hang` or a status).
struct Receiver {
    child: Child,
    port: u16,
    lines: mpsc::Receiver<String>,
}

impl Receiver {
    fn start(answer: &str) -> Self {
        let python = std::env::var_os("BEARERD_INTEROP_PYTHON").unwrap_or_else(|| {
            panic!(
                "BEARERD_INTEROP_PYTHON is not set: these tests need the interop virtualenv \
                 (opentelemetry-proto); run `make interop` (scripts/interop.sh)"
            )
        });
        let mut child = Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/interop/otlp_receiver.py"
            ))
            .args(["--answer", answer])
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python:?} (BEARERD_INTEROP_PYTHON): {e}"));
        let lines = support::lines_of(child.stdout.take().unwrap());
        let line = lines.recv_timeout(PATIENCE).expect("the receiver's port");
        let port = line.strip_prefix("listening ").unwrap().parse().unwrap();
        Self { child, port, lines }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The spans received until `enough` says they are enough.
    fn spans_until(&self, enough: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + PATIENCE;
        let mut spans = Vec::new();
        while !enough(&spans) {
            let line = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("spans so far: {spans:#?}"));
            if line.starts_with('{') {
                spans.push(serde_json::from_str(&line).unwrap());
            }
        }
        spans
    }

    /// Waits for the `n`th export request to arrive.
    fn requests(&self, n: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let line = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("an export request");
            if line == format!("request {n}") {
                return;
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config of the upstream `api` at `upstream` (client `app`, secret `pw`) with `[telemetry]`
/// exporting to `endpoint`.
fn config(upstream: &Server, token_url: &str, endpoint: &str, ratio: &str) -> String {
    format!(
        "{}\n[telemetry]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"bearerd-test\"\nsample_ratio = {ratio}\n",
        support::config(
            "api",
            &upstream.url(""),
            token_url,
            "client_id = \"app\"\nclient_secret = \"pw\"\nauth = \"basic\"",
        )
    )
}

fn attribute<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

/// The `traceparent` each request reached the upstream with, and each one's `tracestate`.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// An upstream that answers 401 to `tok-1` and echoes requests with any later token, keeping
/// the trace context of each request it gets.
async fn upstream(seen: Seen) -> Server {
    serve(move |request: Request<hyper::body::Incoming>| {
        let seen = Arc::clone(&seen);
        async move {
            let header = |name| {
                request
                    .headers()
                    .get(name)
                    .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
                    .unwrap_or_default()
            };
            seen.lock()
                .unwrap()
                .push((header("traceparent"), header("tracestate")));
            if header("authorization") == "Bearer tok-1" {
                json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "revoked"}),
                )
            } else {
                echo(request).await
            }
        }
    })
    .await
}

#[tokio::test]
#[ignore = "needs the interop virtualenv (opentelemetry-proto): run `make interop`"]
async fn a_replayed_request_is_one_server_span_with_two_attempts_linked_to_its_token_fetch() {
    let receiver = Receiver::start("ok");
    let fetches = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&fetches);
    let tokens = token_endpoint(move |_, _| {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        async move { token_ok(&format!("tok-{n}"), 3600) }
    })
    .await;
    let seen = Seen::default();
    let upstream = upstream(Arc::clone(&seen)).await;
    // Ratio 0: the request is traced because its parent was sampled.
    let sidecar = Sidecar::start(&config(
        &upstream,
        &tokens.url("/token"),
        &receiver.endpoint(),
        "0",
    ))
    .await;

    let request = Request::get(sidecar.url("api", "/things/7?api_key=hush"))
        .header("traceparent", format!("00-{TRACE_ID}-{APP_SPAN_ID}-01"))
        .header("tracestate", "vendor=abc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = send(request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        2,
        "a new token after the 401"
    );
    // Stopping flushes the spans still queued.
    sidecar.stop().await;

    let spans = receiver.spans_until(|spans| {
        spans.iter().filter(|s| s["name"] == "token fetch").count() == 2
            && spans.iter().filter(|s| s["trace_id"] == TRACE_ID).count() == 3
    });
    let in_trace: Vec<&Value> = spans.iter().filter(|s| s["trace_id"] == TRACE_ID).collect();
    let server = in_trace
        .iter()
        .find(|s| s["kind"] == 2)
        .expect("a server span");
    assert_eq!(
        server["parent_span_id"], APP_SPAN_ID,
        "the app's span is the parent"
    );
    assert_eq!(server["service"], "bearerd-test");
    assert_eq!(server["content_type"], "application/x-protobuf");
    assert_eq!(server["name"], "GET api");
    assert_eq!(attribute(server, "http.request.method"), "GET");
    assert_eq!(attribute(server, "url.path"), "/things/7", "no query");
    assert_eq!(attribute(server, "bearerd.route"), "api");
    assert_eq!(attribute(server, "bearerd.upstream.host"), "127.0.0.1");
    assert_eq!(attribute(server, "http.response.status_code"), 200);

    let mut attempts: Vec<&&Value> = in_trace.iter().filter(|s| s["kind"] == 3).collect();
    attempts.sort_by_key(|s| attribute(s, "bearerd.attempt").as_i64());
    assert_eq!(attempts.len(), 2, "the 401 and the replay: {spans:#?}");
    for (attempt, status) in attempts.iter().zip([401, 200]) {
        assert_eq!(attempt["parent_span_id"], server["span_id"]);
        assert_eq!(attribute(attempt, "http.response.status_code"), status);
        let url = attribute(attempt, "url.full").as_str().unwrap();
        assert!(url.ends_with("/things/7"), "{url}");
    }
    // What the upstream got: bearerd's client spans, in the app's trace, with its state.
    let seen = seen.lock().unwrap().clone();
    let expected: Vec<(String, String)> = attempts
        .iter()
        .map(|a| {
            (
                format!("00-{TRACE_ID}-{}-01", a["span_id"].as_str().unwrap()),
                "vendor=abc".to_owned(),
            )
        })
        .collect();
    assert_eq!(seen, expected);

    let fetch_spans: Vec<&Value> = spans
        .iter()
        .filter(|s| s["name"] == "token fetch")
        .collect();
    for fetch in &fetch_spans {
        assert_eq!(fetch["parent_span_id"], "", "a trace of its own");
        assert_eq!(
            attribute(fetch, "bearerd.token.grant"),
            "client_credentials"
        );
        assert_eq!(attribute(fetch, "bearerd.token.client_auth"), "basic");
        assert_eq!(attribute(fetch, "bearerd.token.outcome"), "success");
    }
    // The replay waited for the second fetch, and the request's span says so.
    let links = server["links"].as_array().unwrap();
    assert!(
        links.iter().any(|link| fetch_spans
            .iter()
            .any(|f| link["span_id"] == f["span_id"] && link["trace_id"] == f["trace_id"])),
        "linked to a fetch: {links:?} {fetch_spans:#?}"
    );
    // Never a secret, a token or the query.
    let all = serde_json::to_string(&spans).unwrap();
    for secret in ["pw", "tok-1", "tok-2", "hush", "api_key", "Bearer"] {
        assert!(!all.contains(secret), "{secret} in {all}");
    }
}

/// Sends requests through a sidecar exporting to `endpoint` at ratio 1, all of which must be
/// answered 200, and waits for the drop counter to count spans.
async fn requests_go_through_and_spans_are_counted_as_dropped(endpoint: &str) {
    let tokens = token_endpoint(|_, _| async { token_ok("tok-2", 3600) }).await;
    let upstream = upstream(Seen::default()).await;
    let sidecar = Sidecar::start(&config(&upstream, &tokens.url("/token"), endpoint, "1")).await;
    let admin = sidecar.running().admin_addr();
    let deadline = Instant::now() + PATIENCE;
    loop {
        for _ in 0..10 {
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                support::get(&sidecar.url("api", "/x")),
            )
            .await
            .expect("the request was answered at once");
            assert_eq!(answer.status, StatusCode::OK);
        }
        let scrape = support::get(&format!("http://{admin}/metrics")).await;
        let dropped = support::metric(
            &String::from_utf8_lossy(&scrape.body),
            "bearerd_telemetry_spans_dropped_total",
        );
        if dropped.is_some_and(|d| d > 0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no span counted as dropped");
        // The export of the spans above takes its interval, or its timeout.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sidecar.stop().await;
}

#[tokio::test]
#[ignore = "needs the interop virtualenv (opentelemetry-proto): run `make interop`"]
async fn a_collector_that_is_down_costs_no_request() {
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    requests_go_through_and_spans_are_counted_as_dropped(&endpoint).await;
}

#[tokio::test]
#[ignore = "needs the interop virtualenv (opentelemetry-proto): run `make interop`"]
async fn a_collector_answering_errors_costs_no_request() {
    let receiver = Receiver::start("503");
    requests_go_through_and_spans_are_counted_as_dropped(&receiver.endpoint()).await;
    receiver.requests(1);
}

#[tokio::test]
#[ignore = "needs the interop virtualenv (opentelemetry-proto): run `make interop`"]
async fn a_collector_that_hangs_costs_no_request() {
    let receiver = Receiver::start("hang");
    requests_go_through_and_spans_are_counted_as_dropped(&receiver.endpoint()).await;
    receiver.requests(1);
}
