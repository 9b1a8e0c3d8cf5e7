//! The running binary as operators observe it: its logs at trace level never hold a secret,
//! `promtool` accepts its scrape, and a real Prometheus server scrapes it.
//!
//! `promtool` and `prometheus` come from Debian's `prometheus` package, which `make test`
//! installs when missing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::daemon::{Daemon, PATIENCE};
use support::{echo, get, json, send, serve, token_endpoint, token_ok, TokenEndpoint};

const CLIENT_SECRET: &str = "client-secret-7Qx9";
const ACCESS_TOKEN: &str = "access-token-Zp4W";
const APP_CREDENTIAL: &str = "app-own-credential-K2v";
const QUERY_SECRET: &str = "query-secret-M8n";

/// A token endpoint that wants `CLIENT_SECRET` and, when given a wrong one, answers 401 with
/// a body that echoes the request (some servers do).
async fn picky_endpoint() -> TokenEndpoint {
    token_endpoint(|_, request| async move {
        let secret = request
            .basic()
            .map(|(_, secret)| secret)
            .or_else(|| request.form.get("client_secret").cloned())
            .unwrap_or_default();
        if secret == CLIENT_SECRET {
            token_ok(ACCESS_TOKEN, 3600)
        } else {
            json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "invalid_client", "error_description": format!("bad body: {}", request.body)}),
            )
        }
    })
    .await
}

/// Runs a whole scenario against the binary with `format` logs at trace level and returns
/// everything it logged.
async fn scenario_log(format: &str) -> String {
    let endpoint = picky_endpoint().await;
    let upstream = serve(echo).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), format!("{CLIENT_SECRET}\n")).unwrap();
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[log]
format = "{format}"
access = true

[[upstream]]
name = "basic"
listen = "127.0.0.1:0"
url = "{upstream}"
[upstream.token]
url = "{token}"
client_id = "app"
client_secret_file = "secret"

[[upstream]]
name = "post"
listen = "127.0.0.1:0"
url = "{upstream}"
[upstream.token]
url = "{token}"
client_id = "app"
client_secret = "{CLIENT_SECRET}"
auth = "post"
scope = "s"

[[upstream]]
name = "wrong"
listen = "127.0.0.1:0"
url = "{upstream}"
[upstream.token]
url = "{token}"
client_id = "app"
client_secret = "{CLIENT_SECRET}-but-wrong"
auth = "post"
"#,
        upstream = upstream.url(""),
        token = endpoint.url("/token"),
    );
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, config).unwrap();
    let mut daemon = Daemon::start_with(path.to_str().unwrap(), &[("RUST_LOG", "trace")]);
    for name in ["basic", "post", "wrong"] {
        let addr = daemon.listen_addr(name);
        let request = Request::get(format!("http://{addr}/data?api_key={QUERY_SECRET}"))
            .header("authorization", format!("Bearer {APP_CREDENTIAL}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let answer = send(request).await;
        if name == "wrong" {
            assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
            // The app learns the status and the error code, never what else the endpoint said.
            let body = String::from_utf8_lossy(&answer.body).into_owned();
            assert!(body.contains(r#"error \"invalid_client\""#), "{body}");
            assert!(!body.contains("bad body"), "{body}");
            assert!(!body.contains(CLIENT_SECRET), "{body}");
        } else {
            assert_eq!(
                answer.echo().header("authorization"),
                Some(format!("Bearer {ACCESS_TOKEN}").as_str())
            );
        }
    }
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(0));
    // The reader thread sees end-of-file once the process is gone.
    let deadline = Instant::now() + PATIENCE;
    while !daemon
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("stopped"))
    {
        assert!(Instant::now() < deadline, "no 'stopped' line");
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = daemon.log.lock().unwrap().join("\n");
    log
}

fn assert_no_secret(log: &str) {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("app:{CLIENT_SECRET}"));
    for secret in [
        CLIENT_SECRET,
        ACCESS_TOKEN,
        &basic,
        APP_CREDENTIAL,
        QUERY_SECRET,
    ] {
        assert!(!log.contains(secret), "{secret} appears in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_in_json_hold_no_secret() {
    let log = scenario_log("json").await;
    for line in log.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value["level"].is_string(), "{line}");
    }
    // The scenario did log what it should: fetches, failures, access lines.
    assert!(log.contains(r#""message":"token fetched""#), "{log}");
    assert!(log.contains(r#""message":"token fetch failed""#), "{log}");
    // The endpoint's echo is logged, with the secret redacted out of it.
    assert!(
        log.contains("bad body: grant_type=client_credentials"),
        "{log}"
    );
    assert!(log.contains("[redacted]"), "{log}");
    assert!(
        log.contains(r#""endpoint_error":"invalid_client""#),
        "{log}"
    );
    assert!(log.contains(r#""path":"/data""#), "{log}");
    assert_no_secret(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_in_text_hold_no_secret() {
    let log = scenario_log("text").await;
    assert!(log.contains("token fetched"), "{log}");
    assert!(log.contains("token fetch failed"), "{log}");
    assert!(log.contains("path=/data"), "{log}");
    assert!(log.contains("TRACE"), "trace level was not on:\n{log}");
    assert_no_secret(&log);
}

/// `tool` from Debian's prometheus package, or a failure that says how to get it.
fn tool(name: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is missing: install Debian's prometheus package (`make test` does)"
    );
    String::from_utf8(found.stdout).unwrap().trim().to_owned()
}

/// A bearerd binary with one upstream whose token was fetched; returns it and its admin address.
async fn running_daemon(
    dir: &std::path::Path,
    endpoint: &TokenEndpoint,
    upstream: &str,
) -> (Daemon, std::net::SocketAddr) {
    let config = support::config(
        "api",
        upstream,
        &endpoint.url("/token"),
        "client_id = \"app\"\nclient_secret = \"pw\"\n",
    );
    let path = dir.join("bearerd.toml");
    std::fs::write(&path, config).unwrap();
    let daemon = Daemon::start(path.to_str().unwrap());
    let proxy = daemon.listen_addr("api");
    let admin = daemon.listen_addr("admin");
    assert_eq!(
        get(&format!("http://{proxy}/x")).await.status,
        StatusCode::OK
    );
    (daemon, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_real_scrape() {
    let promtool = tool("promtool");
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = serve(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, admin) = running_daemon(dir.path(), &endpoint, &upstream.url("")).await;
    let scrape = get(&format!("http://{admin}/metrics")).await;
    assert_eq!(scrape.status, StatusCode::OK);

    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), &scrape.body).unwrap();
    let output = check.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool: {said}");
    assert!(said.trim().is_empty(), "promtool has remarks: {said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_bearerd() {
    let prometheus = tool("prometheus");
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = serve(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, admin) = running_daemon(dir.path(), &endpoint, &upstream.url("")).await;

    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: bearerd\n    static_configs:\n      - targets: ['{admin}']\n"
        ),
    )
    .unwrap();
    // Prometheus cannot report a port it picked, so take a free one from the OS just before.
    let web = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut server = Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stop = scopeguard(move || {
        let _ = server.kill();
        let _ = server.wait();
    });

    let query = format!(
        "http://{web}/api/v1/query?query=bearerd_token_fetch_total%7Boutcome%3D%22success%22%7D"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        if let Ok(Some(answer)) =
            tokio::time::timeout(Duration::from_secs(2), try_get(&query)).await
        {
            let body: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
            if let Some(sample) = body["data"]["result"].get(0) {
                assert_eq!(sample["metric"]["upstream"], "api", "{body}");
                assert_eq!(sample["metric"]["job"], "bearerd", "{body}");
                break sample["value"][1].as_str().unwrap().to_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had bearerd_token_fetch_total"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(value, "1");
    drop(stop);
}

/// A GET that may fail (the server may not be up yet).
async fn try_get(url: &str) -> Option<Bytes> {
    use http_body_util::BodyExt;
    let response = support::app_client()
        .request(Request::get(url).body(Full::new(Bytes::new())).unwrap())
        .await
        .ok()?;
    if response.status() != StatusCode::OK {
        return None;
    }
    Some(response.into_body().collect().await.ok()?.to_bytes())
}

/// Runs `f` when dropped, so the server is stopped even when an assertion fails.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
