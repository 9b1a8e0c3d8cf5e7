//! bearerd against peers that misbehave on purpose: a token endpoint that echoes the request
//! (secret included) or answers absurd lifetimes, an app client that writes raw bytes, and an
//! upstream that records every byte it gets.
//!
//! Each test asserts what must not happen: the secret, in none of its encodings, reaches the
//! app, `/readyz`, `/metrics`, `--fetch-token` or the trace-level log; a token source never
//! stops; no request that must not carry the token reaches the upstream.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use http::StatusCode;
use support::config::{Admin, ConfigBuilder, Log, Server, Token, Upstream};
use support::daemon::{Daemon, BIN, PATIENCE};
use support::raw::{exchange, read_to_close, status_of, RecordingUpstream};
use support::{
    echo, get, json, metric, serve, token_endpoint, token_ok, Sidecar, TokenEndpoint, TokenRequest,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const CLIENT_ID: &str = "app one";
/// Characters that every encoding changes: `/`, `+`, space, `&`, `=`, `%` and non-ASCII.
const SECRET: &str = "s3cr/t+K9 z&y=%ü";

// ---------------------------------------------------------------------------------------------
// Every form of the secret, computed here independently of bearerd's own redactor.
// ---------------------------------------------------------------------------------------------

/// RFC 3986 percent-encoding of everything but the unreserved characters.
fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn form(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The secret as a request carries it, and as an echo may carry that on.
fn secret_forms() -> Vec<String> {
    let std = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let url = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let raw_pair = format!("{CLIENT_ID}:{SECRET}");
    let encoded_pair = format!("{}:{}", form(CLIENT_ID), form(SECRET));
    vec![
        SECRET.to_owned(),
        form(SECRET),
        percent(SECRET),
        percent(SECRET).to_lowercase(),
        std(&raw_pair),
        url(&raw_pair),
        std(&encoded_pair),
        url(&encoded_pair),
        percent(&std(&encoded_pair)),
        // Pieces long enough to give a secret away.
        SECRET[..8].to_owned(),
        std(&encoded_pair)[4..24].to_owned(),
    ]
}

fn assert_no_secret(place: &str, text: &str) {
    for leaked in secret_forms() {
        assert!(
            !text.contains(&leaked),
            "the secret ({leaked:?}) reached {place}:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1. An echoing token endpoint.
// ---------------------------------------------------------------------------------------------

/// The request as an echoing endpoint hands it back: the Authorization header, the form body,
/// both again percent-encoded, and the Basic value decoded.
fn echo_of(request: &TokenRequest) -> String {
    let authorization = request
        .headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let decoded = request
        .basic()
        .map(|(id, secret)| format!("{id}:{secret}"))
        .unwrap_or_default();
    format!(
        "Authorization: {authorization} | body: {} | escaped: {} {} | decoded: {decoded}",
        request.body,
        percent(&authorization),
        percent(&request.body),
    )
}

/// Answers in the shape its path names, each quoting the request it got.
async fn echoing_endpoint() -> TokenEndpoint {
    token_endpoint(|_, request| async move {
        let echo = echo_of(&request);
        match request.path.as_str() {
            // 200 without a token, an error object instead.
            "/ok-error-json" => json(
                StatusCode::OK,
                serde_json::json!({"error": "invalid_request", "error_description": echo}),
            ),
            // 200 without a token, not even JSON.
            "/ok-text" => http::Response::builder()
                .status(StatusCode::OK)
                .body(support::full(echo))
                .unwrap(),
            // An error whose `error` code itself is the echo.
            "/bad-json" => json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": echo, "error_description": echo}),
            ),
            "/unauthorized-text" => http::Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .body(support::full(echo))
                .unwrap(),
            // A redirect whose Location carries the echo, percent-encoded.
            _ => http::Response::builder()
                .status(StatusCode::FOUND)
                .header(
                    "location",
                    format!("https://elsewhere.example/token?echo={}", percent(&echo)),
                )
                .body(support::full(""))
                .unwrap(),
        }
    })
    .await
}

const SHAPES: [(&str, &str, &str); 6] = [
    ("ok-error-json", "/ok-error-json", "basic"),
    ("ok-error-json-post", "/ok-error-json", "post"),
    ("ok-text", "/ok-text", "basic"),
    ("bad-json", "/bad-json", "basic"),
    ("unauthorized-text", "/unauthorized-text", "post"),
    ("redirect", "/redirect", "basic"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoing_token_endpoint_leaks_the_secret_nowhere() {
    let endpoint = echoing_endpoint().await;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), format!("{SECRET}\n")).unwrap();
    let mut config = ConfigBuilder::new().log(Log::new().access(true));
    for (name, path, auth) in SHAPES {
        config = config.upstream(
            Upstream::new(name, &upstream.url()).token(
                Token::new(&endpoint.url(path), CLIENT_ID)
                    .secret_file("secret")
                    .auth(auth),
            ),
        );
    }
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, config.render()).unwrap();
    let path = path.to_str().unwrap().to_owned();

    let mut daemon = Daemon::start_with(&path, &[("RUST_LOG", "trace")]);
    for (name, _, _) in SHAPES {
        let addr = daemon.listen_addr(name);
        let answer = exchange(
            addr,
            b"GET /data HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status_of(&answer), 503, "{name}: {answer}");
        assert!(answer.contains("token_unavailable"), "{name}: {answer}");
        assert!(
            !answer.contains("body:"),
            "{name}: the endpoint's body was quoted: {answer}"
        );
        assert_no_secret(&format!("the app ({name})"), &answer);
    }
    let admin = daemon.listen_addr("admin");
    for page in ["/readyz", "/metrics", "/healthz"] {
        let request =
            format!("GET {page} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
        let answer = exchange(admin, request.as_bytes()).await;
        assert_no_secret(page, &answer);
    }
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(0));
    let log = wait_for_log_line(&daemon, "stopped");
    // The echoes were logged, redacted: the test saw the path it means to test.
    assert!(log.contains("[redacted]"), "{log}");
    assert!(log.contains("the body says"), "{log}");
    assert_no_secret("the trace-level log", &log);
    // Nothing was sent upstream: no token, no request.
    assert_eq!(upstream.received(), "");

    for (name, _, _) in SHAPES {
        let output = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                Command::new(BIN)
                    .args(["--config", &path, "--fetch-token", name])
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert_eq!(output.status.code(), Some(1), "{name}");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(printed.contains("failed"), "{name}: {printed}");
        assert_no_secret(&format!("--fetch-token {name}"), &printed);
    }
}

/// Every line the daemon logged, once a line containing `last` has arrived.
fn wait_for_log_line(daemon: &Daemon, last: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let log = daemon.log.lock().unwrap().join("\n");
        if log.contains(last) {
            return log;
        }
        assert!(Instant::now() < deadline, "no {last:?} line in:\n{log}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Absurd lifetimes: clamped, never a panic, never a stopped source.
// ---------------------------------------------------------------------------------------------

/// A JWT access token whose `exp` claim is `exp`, as written.
fn jwt_with_exp(exp: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.sig",
        b64(r#"{"alg":"none"}"#),
        b64(&format!(r#"{{"exp":{exp}}}"#))
    )
}

#[tokio::test]
async fn absurd_lifetimes_are_clamped_and_the_source_keeps_running() {
    let answers: Vec<serde_json::Value> = vec![
        serde_json::json!({"access_token": "t-float", "expires_in": 1e300}),
        serde_json::from_str(r#"{"access_token": "t-u64", "expires_in": 10000000000000000000}"#)
            .unwrap(),
        serde_json::json!({"access_token": "t-string", "expires_in": "18446744073709551615"}),
        serde_json::json!({"access_token": jwt_with_exp("1e300")}),
        serde_json::json!({"access_token": jwt_with_exp("18446744073709551615")}),
    ];
    for answer in answers {
        let token = answer["access_token"].as_str().unwrap().to_owned();
        let endpoint = token_endpoint(move |_, _| {
            let answer = answer.clone();
            async move { json(StatusCode::OK, answer) }
        })
        .await;
        let upstream = serve(echo).await;
        let config = ConfigBuilder::new().upstream(
            Upstream::new("api", &upstream.url("")).token(
                Token::new(&endpoint.url("/token"), "app")
                    .secret("pw")
                    .max_lifetime("2h"),
            ),
        );
        let sidecar = Sidecar::start(&config.render()).await;
        let answer = get(&sidecar.url("api", "/x")).await;
        assert_eq!(
            answer.echo().header("authorization"),
            Some(format!("Bearer {token}").as_str())
        );
        let held = sidecar.running().token_source("api").unwrap().state();
        assert_eq!(
            held.token.unwrap().lifetime,
            Duration::from_secs(7200),
            "{token}"
        );
        assert!(held.last_error.is_none(), "{token}");
        let admin = sidecar.running().admin_addr();
        assert_eq!(
            get(&format!("http://{admin}/healthz")).await.status,
            StatusCode::OK
        );
        // The source still answers: a rejection makes it fetch again.
        let handle = sidecar.running().token_source("api").unwrap().clone();
        let first = handle.token().await.unwrap();
        let second = handle.replacement_for(&first).await.unwrap();
        assert_eq!(second.generation, first.generation + 1);
        assert_eq!(endpoint.count(), 2);
        sidecar.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Strangers: allow_from, and a capped admin listener.
// ---------------------------------------------------------------------------------------------

/// The upstream `api` at `upstream`, listening on 127.0.0.1:0, client `app` of `token`.
fn api(upstream: &str, token: &str) -> Upstream {
    Upstream::new("api", upstream).token(Token::new(token, "app").secret("pw"))
}

#[tokio::test]
async fn peers_outside_allow_from_are_closed_on_before_a_byte_is_read() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = RecordingUpstream::start().await;
    let config = ConfigBuilder::new().upstream(
        api(&upstream.url(), &endpoint.url("/token")).allow_from(&["10.0.0.0/8", "fd00::/8"]),
    );
    let sidecar = Sidecar::start(&config.render()).await;
    let addr = sidecar.running().local_addr("api").unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // Whatever the peer sends, it gets nothing back but the close.
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(read_to_close(&mut stream).await, "");
    let admin = sidecar.running().admin_addr();
    let scrape =
        String::from_utf8(get(&format!("http://{admin}/metrics")).await.body.to_vec()).unwrap();
    assert_eq!(
        metric(
            &scrape,
            r#"bearerd_connections_refused_total{reason="not_allowed",upstream="api"}"#
        ),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(upstream.received(), "");
    sidecar.stop().await;
}

#[tokio::test]
async fn a_listener_off_loopback_serves_the_peers_allow_from_admits() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = serve(echo).await;
    let config = ConfigBuilder::new().upstream(
        api(&upstream.url(""), &endpoint.url("/token"))
            .listen("0.0.0.0:0")
            .allow_from(&["127.0.0.0/8"]),
    );
    let sidecar = Sidecar::start(&config.render()).await;
    let port = sidecar.running().local_addr("api").unwrap().port();
    let answer = get(&format!("http://127.0.0.1:{port}/x")).await;
    assert_eq!(answer.echo().header("authorization"), Some("Bearer tok"));
    sidecar.stop().await;
}

/// The admin listener holds at most `max_connections`, but a full one does not turn a probe
/// away: the oldest idle connection makes room for it (issue 22).
#[tokio::test]
async fn the_admin_listener_holds_at_most_its_max_connections() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let config = ConfigBuilder::new()
        .admin(Admin::new().max_connections(2))
        .upstream(api("http://127.0.0.1:9", &endpoint.url("/t")));
    let sidecar = Sidecar::start(&config.render()).await;
    let admin = sidecar.running().admin_addr();
    let probe = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    // Two kept-alive connections, each served once, fill the listener.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(admin).await.unwrap();
        stream.write_all(probe).await.unwrap();
        let mut first = [0u8; 12];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut first)
            .await
            .unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        held.push(stream);
    }
    // A third is answered all the same, and the oldest is closed for it.
    let answer = exchange(
        admin,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer:?}");
    let rest = read_to_close(&mut held[0]).await;
    assert!(!rest.contains("HTTP/1.1"), "{rest:?}");
    sidecar.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Requests refused before any token is attached.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_must_not_carry_the_token_never_reach_the_upstream() {
    let endpoint = token_endpoint(|_, _| async { token_ok("the-token", 3600) }).await;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new()
        .log(Log::new().access(true))
        .upstream(api(&upstream.url(), &endpoint.url("/token")));
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, config.render()).unwrap();
    let daemon = Daemon::start(path.to_str().unwrap());
    let addr = daemon.listen_addr("api");
    let admin = daemon.listen_addr("admin");

    let refused: [(&str, u16, &str); 6] = [
        ("TRACE /x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", 405, "echo the request"),
        ("CONNECT api.example.com:443 HTTP/1.1\r\nhost: api.example.com:443\r\nconnection: close\r\n\r\n", 405, "tunnel cannot carry an injected token"),
        ("GET http://other.example/x HTTP/1.1\r\nhost: other.example\r\n\r\n", 400, "names another host"),
        ("POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501, "transfer coding \\\"gzip\\\""),
        // A chunk size that overflows: the app's framing is broken, not the upstream.
        ("POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nfffffffffffffffffffffff\r\n", 400, "malformed"),
        ("OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n", 400, "not a path"),
    ];
    for (request, status, says) in refused {
        let answer = exchange(addr, request.as_bytes()).await;
        assert_eq!(status_of(&answer), status, "{request:?}: {answer}");
        assert!(answer.contains(says), "{request:?}: {answer}");
        assert!(!answer.contains("the-token"), "{answer}");
    }
    assert_eq!(
        upstream.received(),
        "",
        "a refused request reached the upstream"
    );

    // An absolute-form target that names the upstream itself is forwarded.
    let own = format!(
        "GET http://{}/ok HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
        upstream.addr, upstream.addr
    );
    assert_eq!(status_of(&exchange(addr, own.as_bytes()).await), 200);
    let received = upstream.received();
    assert!(received.starts_with("GET /ok HTTP/1.1\r\n"), "{received}");
    assert!(
        received.contains("authorization: Bearer the-token"),
        "{received}"
    );

    // The broken body counts as the app's error: no 502 for the upstream alerts to see.
    let scrape = exchange(
        admin,
        b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        metric(
            &scrape,
            r#"bearerd_requests_total{code="400",upstream="api"}"#
        ),
        Some(3.0),
        "{scrape}"
    );
    assert_eq!(
        metric(
            &scrape,
            r#"bearerd_requests_total{code="502",upstream="api"}"#
        ),
        None,
        "{scrape}"
    );
    // The access log says what the app received.
    let log = wait_for_log_line(&daemon, "method=CONNECT");
    let connect = log.lines().find(|l| l.contains("method=CONNECT")).unwrap();
    assert!(connect.contains("status=405"), "{connect}");
}

// ---------------------------------------------------------------------------------------------
// 5. Bodies under a deadline and a budget.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_body_that_stalls_is_answered_408_and_its_connection_closed() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = RecordingUpstream::start().await;
    let config = ConfigBuilder::new()
        .server(Server::new().body_idle_timeout("200ms"))
        .upstream(api(&upstream.url(), &endpoint.url("/token")));
    let sidecar = Sidecar::start(&config.render()).await;
    let addr = sidecar.running().local_addr("api").unwrap();
    // Kept whole for a replay: nothing is sent upstream before the body is complete.
    let answer = exchange(
        addr,
        b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(answer.contains("request_body_timeout"), "{answer}");
    assert_eq!(upstream.received(), "");
    // Too large to keep: streamed, and ended just the same when it stalls.
    let answer = exchange(
        addr,
        b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\nfirst bytes",
    )
    .await;
    assert_eq!(status_of(&answer), 408, "{answer}");
    sidecar.stop().await;
}

#[tokio::test]
async fn bodies_beyond_the_replay_budget_stream_without_a_replay() {
    for (replay_memory, expected) in [("16MiB", StatusCode::OK), ("0", StatusCode::UNAUTHORIZED)] {
        let endpoint = token_endpoint(|n, _| async move { token_ok(&format!("t{n}"), 3600) }).await;
        // The first token is refused; a replay with the next one succeeds.
        let upstream = serve(|request: http::Request<hyper::body::Incoming>| async move {
            if request.headers()["authorization"] == "Bearer t0" {
                json(StatusCode::UNAUTHORIZED, serde_json::json!({}))
            } else {
                echo(request).await
            }
        })
        .await;
        let config = ConfigBuilder::new()
            .server(Server::new().replay_memory(replay_memory))
            .upstream(api(&upstream.url(""), &endpoint.url("/token")));
        let sidecar = Sidecar::start(&config.render()).await;
        let answer = support::send(
            http::Request::post(sidecar.url("api", "/x"))
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    b"payload",
                )))
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, expected, "replay_memory = {replay_memory:?}");
        sidecar.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// 6. A token source that dies is restarted, and /healthz says so meanwhile.
// ---------------------------------------------------------------------------------------------

/// Panics at its first fetch, as a bug on hostile input would, then succeeds.
struct PanicsOnce(std::sync::atomic::AtomicUsize);

impl bearerd::token::fetch::Fetch for PanicsOnce {
    fn fetch(
        &self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<bearerd::token::Token, bearerd::token::fetch::FetchError>,
                > + Send
                + '_,
        >,
    > {
        let call = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if call == 0 {
                panic!("overflow when adding duration to instant");
            }
            std::future::pending().await
        })
    }
}

#[tokio::test(start_paused = true)]
async fn healthz_fails_while_a_token_source_is_down_and_recovers_when_it_restarts() {
    use bearerd::token::source::{self, Phase, RefreshPolicy, SharedObservers};
    use std::sync::Arc;

    let families = bearerd::sidecar::MetricFamilies::new().unwrap();
    let metrics = Arc::clone(&families.registry);
    let series = families.upstream("api");
    let observers = SharedObservers::default();
    observers.write().unwrap().metrics = vec![Arc::clone(&series.token)];
    let tasks = tokio_util::task::TaskTracker::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let fetcher = Arc::new(PanicsOnce(std::sync::atomic::AtomicUsize::new(0)));
    let handle = source::spawn(
        Arc::clone(&fetcher) as Arc<dyn bearerd::token::fetch::Fetch>,
        RefreshPolicy::default(),
        observers,
        &tasks,
        shutdown.clone(),
    );
    let admin = bearerd::admin::Admin::new(Arc::clone(&metrics), shutdown.clone());
    admin.watch(vec![bearerd::admin::Watched {
        name: "api".into(),
        token: handle.clone(),
        metrics: series.token,
    }]);
    let health = || admin.answer(&http::Method::GET, "/healthz").status();

    // The first fetch panics: the source is down until its restart.
    let unavailable = handle.token().await.unwrap_err();
    assert_eq!(
        unavailable.detail,
        "token source restarting after a failure"
    );
    assert!(handle.is_down());
    assert_eq!(health(), StatusCode::SERVICE_UNAVAILABLE);
    let scrape = metrics.render().unwrap();
    assert_eq!(
        metric(
            &scrape,
            r#"bearerd_token_source_restarts_total{upstream="api"}"#
        ),
        Some(1.0)
    );
    // Restarted, it fetches again (this time the fetch hangs, which is not "down").
    tokio::time::sleep(unavailable.retry_after).await;
    while fetcher.0.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        tokio::task::yield_now().await;
    }
    assert_eq!(handle.state().phase, Phase::Fetching);
    assert_eq!(health(), StatusCode::OK);
    shutdown.cancel();
}

// ---------------------------------------------------------------------------------------------
// 7. An endpoint that echoes the secret in an encoding the request never used.
// ---------------------------------------------------------------------------------------------

/// The secret as an endpoint understood it: from the Basic credentials or from the form.
fn secret_of(request: &TokenRequest) -> String {
    request
        .basic()
        .map(|(_, secret)| secret)
        .or_else(|| request.form.get("client_secret").cloned())
        .unwrap_or_default()
}

/// HTML character references as OWASP's escaper writes them (`&`, `<`, `>`, `"`, `'` and `/`),
/// with Latin-1 letters by name as Java's `escapeHtml4` writes them.
fn html_references(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#x27;".to_owned(),
            '/' => "&#x2F;".to_owned(),
            'ü' => "&uuml;".to_owned(),
            c if c.is_ascii() => c.to_string(),
            c => format!("&#x{:X};", u32::from(c)),
        })
        .collect()
}

/// Every character as an XML decimal character reference.
fn xml_references(text: &str) -> String {
    text.chars()
        .map(|c| format!("&#{};", u32::from(c)))
        .collect()
}

/// JSON string escapes as PHP's `json_encode` writes them with `JSON_HEX_AMP`: `\/`, `&` as
/// `\u0026`, everything outside ASCII as `\uXXXX`.
fn js_escapes(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '/' => "\\/".to_owned(),
            '"' => "\\\"".to_owned(),
            '\\' => "\\\\".to_owned(),
            '&' => "\\u0026".to_owned(),
            c if c.is_ascii() && !c.is_ascii_control() => c.to_string(),
            c => {
                let mut units = [0u16; 2];
                c.encode_utf16(&mut units)
                    .iter()
                    .map(|unit| format!("\\u{unit:04x}"))
                    .collect()
            }
        })
        .collect()
}

/// The secret as the echoes below carry it, and pieces of that long enough to give it away.
fn encoded_secret_forms() -> Vec<String> {
    let mut forms = Vec::new();
    for encoded in [
        html_references(SECRET),
        xml_references(SECRET),
        js_escapes(SECRET),
    ] {
        forms.push(encoded.chars().take(12).collect());
        forms.push(
            encoded
                .chars()
                .rev()
                .take(12)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect(),
        );
        forms.push(encoded);
    }
    forms
}

/// No form of the secret in `text`: none a request carries, none of the echoes below, and not
/// the secret itself once `text` is decoded as bearerd decodes.
fn assert_no_encoded_secret(place: &str, text: &str) {
    assert_no_secret(place, text);
    for leaked in encoded_secret_forms() {
        assert!(
            !text.contains(&leaked),
            "the secret ({leaked:?}) reached {place}:\n{text}"
        );
    }
    let decoded = bearerd::secret::normal::normal_form(text);
    assert!(
        !decoded.contains(SECRET) && !decoded.contains(&SECRET[..8]),
        "the secret reached {place}, encoded:\n{text}"
    );
}

/// (upstream, path, client authentication): each echo, with the secret sent either way.
const ENCODED_SHAPES: [(&str, &str, &str); 6] = [
    ("html", "/html", "basic"),
    ("html-post", "/html", "post"),
    ("xml", "/xml", "post"),
    ("xml-basic", "/xml", "basic"),
    ("js", "/js", "basic"),
    ("js-post", "/js", "post"),
];

/// What each path's answer says around the secret, as bearerd shows it: decoded, the secret
/// redacted.
fn shown_of(path: &str) -> &'static str {
    match path {
        "/html" => "client_secret=\"[redacted]\"&x=1",
        "/xml" => "<client_secret>[redacted]</client_secret>",
        _ => "client_secret \"[redacted]\" is not",
    }
}

/// Answers every token request with an error body that is not JSON and quotes the secret it
/// got in the encoding its path names.
async fn encoding_echo_endpoint() -> TokenEndpoint {
    token_endpoint(|_, request| async move {
        let secret = secret_of(&request);
        assert_eq!(secret, SECRET, "the request carried the secret");
        let (status, content_type, body) = match request.path.as_str() {
            "/html" => (
                StatusCode::UNAUTHORIZED,
                "text/html",
                format!(
                    "<html>\n<body>\n  <h1>401</h1>\n  <p>Unknown client: client_secret=&quot;{}&quot;&amp;x=1</p>\n</body>\n</html>\n",
                    html_references(&secret)
                ),
            ),
            "/xml" => (
                StatusCode::BAD_REQUEST,
                "application/xml",
                format!(
                    "<?xml version=\"1.0\"?>\n<fault><code>invalid_client</code><client_secret>{}</client_secret></fault>",
                    xml_references(&secret)
                ),
            ),
            _ => (
                StatusCode::UNAUTHORIZED,
                "text/plain",
                format!(
                    "invalid_client: client_secret \"{}\" is not known\n",
                    js_escapes(&secret)
                ),
            ),
        };
        http::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(support::full(body))
            .unwrap()
    })
    .await
}

/// A config with one upstream per shape, all fetching from `endpoint`, written into `dir`.
fn encoded_shapes_config(
    endpoint: &TokenEndpoint,
    upstream: &str,
    dir: &std::path::Path,
) -> String {
    std::fs::write(dir.join("secret"), format!("{SECRET}\n")).unwrap();
    let mut config = ConfigBuilder::new().log(Log::new().format("json"));
    for (name, path, auth) in ENCODED_SHAPES {
        config = config.upstream(
            Upstream::new(name, upstream).token(
                Token::new(&endpoint.url(path), CLIENT_ID)
                    .secret_file("secret")
                    .auth(auth),
            ),
        );
    }
    let path = dir.join("bearerd.toml");
    std::fs::write(&path, config.render()).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_echoed_as_character_references_or_escapes_never_reaches_the_log() {
    let endpoint = encoding_echo_endpoint().await;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = encoded_shapes_config(&endpoint, &upstream.url(), dir.path());

    let mut daemon = Daemon::start_with(&path, &[("RUST_LOG", "trace")]);
    for (name, _, _) in ENCODED_SHAPES {
        let answer = exchange(
            daemon.listen_addr(name),
            b"GET /data HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status_of(&answer), 503, "{name}: {answer}");
        assert_no_encoded_secret(&format!("the app ({name})"), &answer);
    }
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(0));
    let log = wait_for_log_line(&daemon, "stopped");
    assert_no_encoded_secret("the trace-level log", &log);
    // Each echo was logged, decoded and redacted: the test saw the path it means to test.
    for (name, path, _) in ENCODED_SHAPES {
        let description = log
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|event| {
                event["fields"]["message"] == "token fetch failed"
                    && event["fields"]["upstream"] == name
            })
            .and_then(|event| {
                event["fields"]["endpoint_error_description"]
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("{name}: no failed fetch logged:\n{log}"));
        assert!(
            description.contains(shown_of(path)),
            "{name}: {description}"
        );
    }
    assert_eq!(upstream.received(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_echoed_as_character_references_or_escapes_is_not_printed_by_fetch_token() {
    let endpoint = encoding_echo_endpoint().await;
    // Never reached: --fetch-token asks the token endpoint only.
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = encoded_shapes_config(&endpoint, &upstream.url(), dir.path());
    for (name, path_of_echo, _) in ENCODED_SHAPES {
        let output = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                Command::new(BIN)
                    .args(["--config", &path, "--fetch-token", name])
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert_eq!(output.status.code(), Some(1), "{name}");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(printed.contains("failed"), "{name}: {printed}");
        assert_no_encoded_secret(&format!("--fetch-token {name}"), &printed);
        // Quoted decoded, the secret redacted.
        assert!(
            printed.contains(shown_of(path_of_echo)),
            "{name}: {printed}"
        );
    }
    assert_eq!(upstream.received(), "");
}
