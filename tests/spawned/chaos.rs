//! Chaos: a token endpoint that fails at random (500, 429 with Retry-After, connection reset,
//! answers slower than the timeout, truncated and non-JSON bodies) while 50 clients send
//! requests through the bearerd binary for about 15 s, and the upstream answers 401 now and
//! then. Then the endpoint turns healthy.
//!
//! It asserts that no request failed while bearerd held a valid token, that token requests
//! stayed within what the backoff promises, that bearerd recovered within the backoff cap,
//! that its memory stayed bounded, and that nothing panicked. Everything is seeded, bounded in
//! time and count, and on loopback.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::daemon::Daemon;
use support::{json, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SEED: u64 = 0x00be_a4e7;
const CHAOS: Duration = Duration::from_secs(10);
const HEALTHY: Duration = Duration::from_secs(5);
const CLIENTS: usize = 50;
/// The token lifetime the endpoint grants; bearerd uses a token for 9 s of it.
const LIFETIME_SECS: u64 = 10;
const USABLE: Duration = Duration::from_secs(9);
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
const TOKEN_TIMEOUT: Duration = Duration::from_millis(500);
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Peak resident memory allowed; bearerd needs a few MiB.
const RSS_LIMIT_KIB: u64 = 64 * 1024;

/// What the chaotic endpoint did, and when each token was issued.
#[derive(Default)]
struct Ledger {
    requests: AtomicUsize,
    issued: Mutex<Vec<Instant>>,
}

/// One answer of the chaotic token endpoint.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Token,
    ServerError,
    TooManyRequests,
    Reset,
    Slow,
    Truncated,
    NotJson,
}

async fn chaotic_endpoint(healthy: Arc<AtomicBool>, ledger: Arc<Ledger>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(SEED)));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let healthy = Arc::clone(&healthy);
            let ledger = Arc::clone(&ledger);
            let rng = Arc::clone(&rng);
            tokio::spawn(async move {
                let mut stream = stream;
                if read_request(&mut stream).await.is_none() {
                    return;
                }
                ledger.requests.fetch_add(1, Ordering::SeqCst);
                let behaviour = if healthy.load(Ordering::SeqCst) {
                    Behaviour::Token
                } else {
                    use Behaviour::*;
                    let all = [
                        Token,
                        Token,
                        ServerError,
                        TooManyRequests,
                        Reset,
                        Slow,
                        Truncated,
                        NotJson,
                    ];
                    all[rng.lock().unwrap().usize(..all.len())]
                };
                answer(&mut stream, behaviour, &ledger).await;
            });
        }
    });
    addr
}

/// Reads one request head and its body; `None` if the client went away.
async fn read_request(stream: &mut TcpStream) -> Option<()> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buffer);
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                return Some(());
            }
        }
    }
}

async fn answer(stream: &mut TcpStream, behaviour: Behaviour, ledger: &Ledger) {
    let response = |status: &str, extra: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n{extra}content-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let text = match behaviour {
        Behaviour::Token => {
            let n = {
                let mut issued = ledger.issued.lock().unwrap();
                issued.push(Instant::now());
                issued.len()
            };
            response(
                "200 OK",
                "",
                &format!(r#"{{"access_token":"tok-{n}","token_type":"bearer","expires_in":{LIFETIME_SECS}}}"#),
            )
        }
        Behaviour::ServerError => response("500 Internal Server Error", "", r#"{"error":"server_error"}"#),
        Behaviour::TooManyRequests => response(
            "429 Too Many Requests",
            &format!("retry-after: {}\r\n", RETRY_AFTER.as_secs()),
            r#"{"error":"slow_down"}"#,
        ),
        Behaviour::Reset => {
            // Linger 0: closing sends RST rather than FIN. (Deprecated because a non-zero
            // linger blocks the thread on drop; zero does not.)
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
            return;
        }
        Behaviour::Slow => {
            tokio::time::sleep(TOKEN_TIMEOUT * 3).await;
            response("200 OK", "", r#"{"access_token":"late","expires_in":10}"#)
        }
        Behaviour::Truncated => {
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"access_tok".to_owned()
        }
        Behaviour::NotJson => response("200 OK", "", "<html>maintenance</html>"),
    };
    let _ = stream.write_all(text.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// One app request as the load generator saw it.
struct Outcome {
    started: Instant,
    ended: Instant,
    status: StatusCode,
    /// bearerd's own error code, when bearerd (not the upstream) answered.
    bearerd_error: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let healthy = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Ledger::default());
    let token_addr = chaotic_endpoint(Arc::clone(&healthy), Arc::clone(&ledger)).await;
    // The upstream answers 401 to about one request in a hundred, whatever the token.
    let upstream_rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(SEED + 1)));
    let upstream = serve(move |_| {
        let unauthorized = upstream_rng.lock().unwrap().u8(..100) == 0;
        async move {
            if unauthorized {
                json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"message": "unauthorized"}),
                )
            } else {
                json(StatusCode::OK, serde_json::json!({"ok": true}))
            }
        }
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}timeout = \"{}ms\"\nbackoff_base = \"{}ms\"\nbackoff_cap = \"{}ms\"\n",
        support::config(
            "api",
            &upstream.url(""),
            &format!("http://{token_addr}/token"),
            "client_id = \"app\"\nclient_secret = \"pw\"\n"
        ),
        TOKEN_TIMEOUT.as_millis(),
        BACKOFF_BASE.as_millis(),
        BACKOFF_CAP.as_millis(),
    );
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, config).unwrap();
    let mut daemon = Daemon::start_with(path.to_str().unwrap(), &[("RUST_LOG", "info")]);
    let proxy = daemon.listen_addr("api");

    let started = Instant::now();
    let healthy_from = started + CHAOS;
    let end = healthy_from + HEALTHY;
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let outcomes = Arc::clone(&outcomes);
            tokio::spawn(async move {
                let client = support::app_client();
                while Instant::now() < end {
                    let request_started = Instant::now();
                    let request = Request::get(format!("http://{proxy}/data"))
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    let response = client.request(request).await.unwrap();
                    let status = response.status();
                    let body = response.into_body().collect().await.unwrap().to_bytes();
                    let bearerd_error = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| {
                            v.get("upstream")
                                .and(v["error"].as_str().map(str::to_owned))
                        });
                    outcomes.lock().unwrap().push(Outcome {
                        started: request_started,
                        ended: Instant::now(),
                        status,
                        bearerd_error,
                    });
                }
            })
        })
        .collect();
    tokio::time::sleep_until(healthy_from.into()).await;
    healthy.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let peak_rss = daemon.peak_rss_kib();
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(0));

    let outcomes = outcomes.lock().unwrap();
    let issued = ledger.issued.lock().unwrap().clone();
    let token_requests = ledger.requests.load(Ordering::SeqCst);
    let log = daemon.log.lock().unwrap().join("\n");
    let failures: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.bearerd_error.is_some())
        .collect();
    eprintln!(
        "chaos: {} requests, {} answered by bearerd with an error, {} token requests, {} tokens issued, peak RSS {peak_rss} KiB",
        outcomes.len(),
        failures.len(),
        token_requests,
        issued.len()
    );
    assert!(outcomes.len() > CLIENTS * 10, "the load ran");
    assert!(
        issued.len() >= 2,
        "tokens were issued during chaos and after"
    );

    // 1. No request failed while bearerd held a valid token. bearerd holds token k from
    //    just after it was issued until USABLE later; a small slack covers the hand-over.
    let slack = Duration::from_millis(300);
    for failure in &failures {
        let covered = issued
            .iter()
            .any(|&at| at + slack < failure.started && failure.ended + slack < at + USABLE);
        assert!(
            !covered,
            "request failed with {:?} ({}) at {:?} while a valid token existed",
            failure.bearerd_error,
            failure.status,
            failure.started - started
        );
    }

    // 2. Token requests within the backoff's promise: after a failure the next try is at
    //    least BACKOFF_BASE later, and each token may add one request when the upstream
    //    rejects it; successes are spaced further still.
    let elapsed = end - started;
    let bound =
        (elapsed.as_secs_f64() / BACKOFF_BASE.as_secs_f64()).ceil() as usize + issued.len() + 1;
    assert!(
        token_requests <= bound,
        "{token_requests} token requests, more than the {bound} the backoff allows"
    );

    // 3. Recovered within the backoff cap once the endpoint was healthy: a token was issued
    //    (or one still valid was held) no later than the cap, plus a retry-after and a timeout.
    let recovery_deadline = healthy_from + BACKOFF_CAP.max(RETRY_AFTER) + TOKEN_TIMEOUT + slack;
    let recovered = issued
        .iter()
        .any(|&at| at <= recovery_deadline && at + USABLE > healthy_from);
    assert!(
        recovered,
        "no valid token by {:?} after the endpoint healed",
        recovery_deadline - healthy_from
    );
    let late_failures = failures
        .iter()
        .filter(|f| f.started > recovery_deadline)
        .count();
    assert_eq!(late_failures, 0, "requests failed after recovery");

    // 4. Memory stayed bounded, and 5. nothing panicked.
    assert!(peak_rss < RSS_LIMIT_KIB, "peak RSS {peak_rss} KiB");
    assert!(!log.contains("panicked"), "a panic in the log:\n{log}");
}
