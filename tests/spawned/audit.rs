//! Audit events from the running binary, in the JSON log format: a token acquired, a token
//! request failed and one refused, a token rejected by the upstream (its 401) and its
//! replacement acquired, whatever the log level; and none with `[log] audit = false`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use http::{Request, StatusCode};
use support::daemon::{Daemon, PATIENCE};
use support::{echo, get, json, serve, token_endpoint, token_ok};

const CLIENT_SECRET: &str = "client-secret-Vb6";

/// The n-th token the endpoint issues.
fn token(n: usize) -> String {
    format!("audit-token-{n}-Rk2")
}

/// The fingerprint the audit events give a token, computed here on its own terms: the first
/// 16 characters of base64url(SHA-256(token)), as DPoP's `ath` (RFC 9449 §4.2).
fn fingerprint(token: &str) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash.as_ref());
    text[..16].to_owned()
}

/// The audit events logged so far (JSON lines of target `bearerd::audit`), their fields.
fn audit_events(daemon: &Daemon) -> Vec<serde_json::Value> {
    daemon
        .log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["target"] == "bearerd::audit")
        .map(|event| event["fields"].clone())
        .collect()
}

/// Waits until the daemon has logged an audit event that `wanted` accepts, and returns it.
fn wait_for_event(
    daemon: &Daemon,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(event) = audit_events(daemon).into_iter().find(&wanted) {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no such audit event; log: {:#?}",
            daemon.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Parses the RFC 3339 timestamps of an event.
fn time(value: &serde_json::Value) -> SystemTime {
    humantime::parse_rfc3339(value.as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_say_who_obtained_which_token_whatever_the_level() {
    let endpoint = token_endpoint(|n, _| async move { token_ok(&token(n), 3600) }).await;
    let failing = token_endpoint(|_, _| async {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "temporarily_unavailable"}),
        )
    })
    .await;
    let refusing = token_endpoint(|_, _| async {
        json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "invalid_client", "error_description": "no such client"}),
        )
    })
    .await;
    // Takes tokens from `accepted_from` on, and answers older ones 401.
    let accepted_from = Arc::new(AtomicUsize::new(0));
    let accepting = Arc::clone(&accepted_from);
    let upstream = serve(move |request: Request<hyper::body::Incoming>| {
        let accepting = Arc::clone(&accepting);
        async move {
            let wanted = token(accepting.load(Ordering::SeqCst));
            let sent = request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            if sent == format!("Bearer {wanted}") {
                echo(request).await
            } else {
                json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"message": "revoked"}),
                )
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[log]
format = "json"
level = "error"

[[upstream]]
name = "api"
listen = "127.0.0.1:0"
url = "{upstream}"
[upstream.token]
url = "{good}"
client_id = "app"
client_secret = "{CLIENT_SECRET}"

[[upstream]]
name = "down"
listen = "127.0.0.1:0"
url = "{upstream}"
[upstream.token]
url = "{failing}"
client_id = "other"
client_secret = "{CLIENT_SECRET}"
auth = "post"

[[upstream]]
name = "denied"
listen = "127.0.0.1:0"
url = "{upstream}"
[upstream.token]
url = "{refusing}"
client_id = "stranger"
client_secret = "{CLIENT_SECRET}"
"#,
        upstream = upstream.url(""),
        good = endpoint.url("/token"),
        failing = failing.url("/token"),
        refusing = refusing.url("/token"),
    );
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, config).unwrap();
    // Errors only, but for the "listening" lines the test finds the ports by: audit events
    // come all the same.
    let daemon = Daemon::start_with(
        path.to_str().unwrap(),
        &[("RUST_LOG", "error,bearerd::sidecar=info")],
    );
    let api = daemon.listen_addr("api");
    let answer = get(&format!("http://{api}/first")).await;
    assert_eq!(
        answer.echo().header("authorization"),
        Some(format!("Bearer {}", token(0)).as_str())
    );
    // The upstream revokes the first token: the request is replayed with the second.
    accepted_from.store(1, Ordering::SeqCst);
    let answer = get(&format!("http://{api}/second")).await;
    assert_eq!(
        answer.echo().header("authorization"),
        Some(format!("Bearer {}", token(1)).as_str())
    );

    let first = wait_for_event(&daemon, |e| {
        e["event"] == "acquired" && e["token_fingerprint"] == fingerprint(&token(0))
    });
    assert_eq!(first["source"], "api");
    assert_eq!(first["grant"], "client_credentials");
    assert_eq!(first["client_auth"], "basic");
    assert_eq!(first["client_id"], "app");
    assert_eq!(first["outcome"], "fetched");
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["message"], "token acquired");
    assert_eq!(
        time(&first["expires_at"])
            .duration_since(time(&first["issued_at"]))
            .unwrap(),
        Duration::from_secs(3600)
    );
    let issued_ago = SystemTime::now()
        .duration_since(time(&first["issued_at"]))
        .unwrap();
    assert!(issued_ago < PATIENCE, "{first}");
    assert!(first.get("subject_hash").is_none(), "no subject: {first}");

    let rejected = wait_for_event(&daemon, |e| e["event"] == "rejected_by_upstream");
    assert_eq!(rejected["source"], "api");
    assert_eq!(rejected["token_fingerprint"], fingerprint(&token(0)));
    assert_eq!(rejected["outcome"], "refetching");
    assert_eq!(rejected["issued_at"], first["issued_at"]);
    assert_eq!(rejected["expires_at"], first["expires_at"]);
    let second = wait_for_event(&daemon, |e| {
        e["event"] == "acquired" && e["token_fingerprint"] == fingerprint(&token(1))
    });
    assert_eq!(second["source"], "api");

    let failed = wait_for_event(&daemon, |e| e["event"] == "fetch_failed");
    assert_eq!(failed["source"], "down");
    assert_eq!(failed["client_auth"], "post");
    assert_eq!(failed["client_id"], "other");
    assert_eq!(failed["outcome"], "server_error");
    assert_eq!(failed["status"], 503);
    assert_eq!(failed["error"], "temporarily_unavailable");
    assert!(failed.get("token_fingerprint").is_none(), "{failed}");

    let refused = wait_for_event(&daemon, |e| e["event"] == "refused");
    assert_eq!(refused["source"], "denied");
    assert_eq!(refused["client_id"], "stranger");
    assert_eq!(refused["outcome"], "rejected");
    assert_eq!(refused["status"], 401);
    assert_eq!(refused["error"], "invalid_client");
    let detail = refused["detail"].as_str().unwrap();
    assert!(detail.contains("status 401"), "{detail}");
    assert!(
        !detail.contains("no such client"),
        "only the code: {detail}"
    );

    let log = daemon.log.lock().unwrap().join("\n");
    // The level held for everything else: no info line of the token sources.
    assert!(!log.contains("\"token fetched\""), "{log}");
    for secret in [token(0), token(1), CLIENT_SECRET.to_owned()] {
        assert!(!log.contains(&secret), "{secret} in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_false_writes_no_audit_event() {
    let endpoint = token_endpoint(|n, _| async move { token_ok(&token(n), 3600) }).await;
    let upstream = serve(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[log]
format = "json"
audit = false

[[upstream]]
name = "api"
listen = "127.0.0.1:0"
url = "{upstream}"
[upstream.token]
url = "{good}"
client_id = "app"
client_secret = "{CLIENT_SECRET}"
"#,
        upstream = upstream.url(""),
        good = endpoint.url("/token"),
    );
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, config).unwrap();
    // Even a filter that asks for everything of bearerd's.
    let mut daemon = Daemon::start_with(path.to_str().unwrap(), &[("RUST_LOG", "trace")]);
    let api = daemon.listen_addr("api");
    get(&format!("http://{api}/x")).await.echo();
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(0));
    let deadline = Instant::now() + PATIENCE;
    while !daemon
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("\"stopped\""))
    {
        assert!(Instant::now() < deadline, "no 'stopped' line");
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = daemon.log.lock().unwrap().join("\n");
    // The token was fetched and logged as usual; no audit event said so.
    assert!(log.contains("\"token fetched\""), "{log}");
    assert!(audit_events(&daemon).is_empty(), "{log}");
    assert!(!log.contains("bearerd::audit"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_the_cache_is_acquired_as_cached() {
    let endpoint = token_endpoint(|n, _| async move { token_ok(&token(n), 3600) }).await;
    let upstream = serve(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[log]
format = "json"
[cache]
backend = "file"
dir = "cache"

[[upstream]]
name = "api"
listen = "127.0.0.1:0"
url = "{upstream}"
[upstream.token]
url = "{good}"
client_id = "app"
client_secret = "{CLIENT_SECRET}"
"#,
        upstream = upstream.url(""),
        good = endpoint.url("/token"),
    );
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, config).unwrap();
    // The first bearerd fetches the token and stores it; the second, after a restart, takes
    // it from the cache without a token request.
    for outcome in ["fetched", "cached"] {
        let mut daemon = Daemon::start(path.to_str().unwrap());
        let api = daemon.listen_addr("api");
        get(&format!("http://{api}/x")).await.echo();
        let event = wait_for_event(&daemon, |e| e["event"] == "acquired");
        assert_eq!(event["outcome"], outcome, "{event}");
        assert_eq!(event["token_fingerprint"], fingerprint(&token(0)));
        daemon.signal("TERM");
        assert_eq!(daemon.wait_exit().code(), Some(0));
    }
    assert_eq!(endpoint.count(), 1);
}
