//! The status page in a real browser: Debian's chromium, headless, loads `/status` from the
//! running binary and dumps the DOM it built. The page must parse into the document it means
//! to be (headings and tables), and a hostile error code from a token endpoint must come out
//! as text, never as an element.
//!
//! `chromium` comes from Debian's package of that name, which `make test` installs when
//! missing (`scripts/install-test-deps.sh`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use support::daemon::{Daemon, PATIENCE};
use support::{echo, get, json, serve, token_endpoint, token_ok};

/// A valid RFC 6749 §5.2 error code, and HTML that would load an image and run script if the
/// page let it through.
const HOSTILE_CODE: &str = "<img src=x onerror=alert(1)>";

/// Debian's chromium, or a failure that says how to get it.
fn chromium() -> String {
    let found = Command::new("sh")
        .args(["-c", "command -v chromium"])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "chromium is missing: install Debian's chromium package (`make test` does)"
    );
    String::from_utf8(found.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_browser_reads_the_status_page_and_runs_nothing_from_the_network() {
    let chromium = chromium();
    let good = token_endpoint(|_, _| async { token_ok("status-token-Jm5", 3600) }).await;
    let hostile = token_endpoint(|_, _| async {
        json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": HOSTILE_CODE}),
        )
    })
    .await;
    let upstream = serve(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[upstream]]
name = "api"
listen = "127.0.0.1:0"
url = "{upstream}"
[upstream.token]
url = "{good}"
client_id = "app"
client_secret = "pw"

[[upstream]]
name = "broken"
listen = "127.0.0.1:0"
url = "{upstream}"
[upstream.token]
url = "{hostile}"
client_id = "app"
client_secret = "pw"
"#,
        upstream = upstream.url(""),
        good = good.url("/token"),
        hostile = hostile.url("/token"),
    );
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, config).unwrap();
    let daemon = Daemon::start(path.to_str().unwrap());
    let api = daemon.listen_addr("api");
    let admin = daemon.listen_addr("admin");
    get(&format!("http://{api}/x")).await.echo();
    // The hostile endpoint has answered once the page says the source failed.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = support::send(
            http::Request::get(format!("http://{admin}/status"))
                .header("accept", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
        if answer.json()["token_sources"][1]["failures"].as_u64() >= Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hostile endpoint was never asked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let profile = tempfile::tempdir().unwrap();
    let output = Command::new(&chromium)
        .args([
            "--headless",
            // Root in a container has no user namespace for chromium's sandbox.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.path().display()),
            "--dump-dom",
            &format!("http://{admin}/status"),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dom = String::from_utf8(output.stdout).unwrap();
    // The document chromium built: title, headings, the tables.
    assert!(dom.contains("<title>bearerd status</title>"), "{dom}");
    assert!(dom.contains("<h1>bearerd status</h1>"), "{dom}");
    assert!(dom.contains("<h2>Token sources</h2>"), "{dom}");
    assert!(dom.contains("<h2>Listeners</h2>"), "{dom}");
    assert_eq!(
        dom.matches("<table>").count(),
        3,
        "sources, and a table per listener: {dom}"
    );
    assert!(dom.contains("<th>Upstreams</th>"), "{dom}");
    // The hostile code is a text node (chromium serialises its text escaped), not an image.
    assert!(
        dom.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "the hostile code as text: {dom}"
    );
    assert!(!dom.contains("<img"), "an element from the network: {dom}");
    assert!(!dom.contains("status-token-Jm5"), "{dom}");
}
