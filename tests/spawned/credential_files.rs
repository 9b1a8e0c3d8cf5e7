//! Credential files that are not what they should be — a FIFO, `/dev/zero` behind a symlink,
//! a file over its size limit — with bearerd run as a process: the file is refused with an
//! error that names it (and the limit), and nothing it does stops the proxy, the admin port or
//! signal handling (issue 22, part 3).
//!
//! Each test fails without the bounded reader: a FIFO opened for reading blocks the runtime's
//! only thread until a writer comes (so `/healthz`, the token timeout and SIGTERM all wait),
//! and `/dev/zero` is read until memory runs out.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::config::{ConfigBuilder, Tls, Token, Upstream};
use support::daemon::{Daemon, BIN, PATIENCE};
use support::raw::{exchange, status_of, RecordingUpstream};
use support::{token_endpoint, token_ok, TokenEndpoint};

/// The token `timeout` of every source here: an error about a file must come within it.
const TOKEN_TIMEOUT_MS: u64 = 5000;
/// Peak resident memory bearerd must stay under while refusing `/dev/zero`: several times what
/// it needs, far below what reading the device would take.
const PEAK_RSS_LIMIT_KIB: u64 = 64 * 1024;

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// A token endpoint that would answer, and counts what it gets (it should get nothing).
async fn endpoint() -> TokenEndpoint {
    token_endpoint(|_, _| async { token_ok("the-token", 3600) }).await
}

/// The config of one upstream `api` with `token`, written to `dir`; returns its path.
fn write_config(dir: &Path, upstream_url: &str, token: Token) -> String {
    let config = ConfigBuilder::new().upstream(
        Upstream::new("api", upstream_url).token(
            token
                .timeout(&format!("{TOKEN_TIMEOUT_MS}ms"))
                .backoff_base("100ms")
                .backoff_cap("500ms")
                .allow_plain_http(true),
        ),
    );
    let path = dir.join("bearerd.toml");
    std::fs::write(&path, config.render()).unwrap();
    path.to_str().unwrap().to_owned()
}

/// The first "token fetch failed" line that holds every one of `needles`, waiting for it
/// within [`PATIENCE`]; while waiting, bearerd's peak memory must stay under
/// [`PEAK_RSS_LIMIT_KIB`] (checked at each look, so that a runaway read fails the test before
/// it can take the machine's memory).
fn failed_fetch_line(daemon: &Daemon, needles: &[&str]) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = daemon
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|line| {
                line.contains("token fetch failed") && needles.iter().all(|n| line.contains(n))
            })
            .cloned();
        if let Some(line) = found {
            return line;
        }
        let peak = daemon.peak_rss_kib();
        assert!(
            peak < PEAK_RSS_LIMIT_KIB,
            "bearerd's peak RSS reached {peak} KiB while reading a credential file"
        );
        assert!(
            Instant::now() < deadline,
            "no failed fetch naming {needles:?}; log:\n{}",
            daemon.log.lock().unwrap().join("\n")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `duration_ms` bearerd logged for a fetch: how long the fetch took by its own clock.
fn duration_ms(line: &str) -> u64 {
    line.split("duration_ms=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no duration_ms in {line}"))
}

/// `GET path` on `addr`, which must answer within a few seconds.
async fn get_within(addr: std::net::SocketAddr, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    tokio::time::timeout(Duration::from_secs(10), exchange(addr, request.as_bytes()))
        .await
        .unwrap_or_else(|_| panic!("no answer to GET {path} from {addr}"))
}

/// With `token` reading the FIFO at `fifo`: the fetch fails at once naming the file, the
/// admin port and the proxy answer, no token request goes out, and SIGTERM stops bearerd.
async fn a_fifo_stops_nothing(dir: &Path, fifo: &Path, token: impl FnOnce(&str) -> Token) {
    mkfifo(fifo);
    let endpoint = endpoint().await;
    let upstream = RecordingUpstream::start().await;
    let config = write_config(dir, &upstream.url(), token(&endpoint.url("/token")));
    let mut daemon = Daemon::start(&config);
    let admin = daemon.listen_addr("admin");
    let proxy = daemon.listen_addr("api");

    for page in ["/healthz", "/metrics"] {
        let answer = get_within(admin, page).await;
        assert_eq!(status_of(&answer), 200, "{page}: {answer}");
    }
    let fifo_name = fifo.display().to_string();
    let line = failed_fetch_line(&daemon, &[&fifo_name, "is a FIFO, not a regular file"]);
    assert!(
        duration_ms(&line) < TOKEN_TIMEOUT_MS,
        "the fetch took longer than the token timeout: {line}"
    );
    assert!(line.contains("at most 64 KiB"), "{line}");
    let answer = get_within(admin, "/readyz").await;
    assert_eq!(status_of(&answer), 503, "{answer}");
    let answer = get_within(proxy, "/data").await;
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(answer.contains("token_unavailable"), "{answer}");
    assert_eq!(endpoint.count(), 0, "a token request went out");
    assert_eq!(upstream.received(), "");

    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_as_client_secret_file_stops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("secret");
    a_fifo_stops_nothing(dir.path(), &fifo, |url| {
        Token::new(url, "app").secret_file("secret")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_as_client_assertion_file_stops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("sa-token");
    a_fifo_stops_nothing(dir.path(), &fifo, |url| {
        Token::new(url, "app")
            .auth("client_assertion_file")
            .set("assertion_file", support::config::string("sa-token"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_zero_behind_a_symlink_is_refused_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("sa-token")).unwrap();
    let endpoint = endpoint().await;
    let upstream = RecordingUpstream::start().await;
    let config = write_config(
        dir.path(),
        &upstream.url(),
        Token::new(&endpoint.url("/token"), "app")
            .auth("client_assertion_file")
            .set("assertion_file", support::config::string("sa-token")),
    );
    let mut daemon = Daemon::start(&config);
    // Memory is watched from the start: the refusal is awaited before anything else.
    let line = failed_fetch_line(&daemon, &["sa-token", "is a character device"]);
    assert!(line.contains("at most 64 KiB"), "{line}");
    let admin = daemon.listen_addr("admin");
    assert_eq!(status_of(&get_within(admin, "/healthz").await), 200);
    // Memory was looked at while waiting; once more, after the refusals that followed.
    let peak = daemon.peak_rss_kib();
    assert!(peak < PEAK_RSS_LIMIT_KIB, "peak RSS {peak} KiB");
    assert_eq!(endpoint.count(), 0);

    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_over_its_limit_is_refused_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), vec![b's'; 64 * 1024 + 1]).unwrap();
    let endpoint = endpoint().await;
    let upstream = RecordingUpstream::start().await;
    let config = write_config(
        dir.path(),
        &upstream.url(),
        Token::new(&endpoint.url("/token"), "app").secret_file("secret"),
    );
    let mut daemon = Daemon::start(&config);
    let secret = dir.path().join("secret").display().to_string();
    let line = failed_fetch_line(&daemon, &[&secret, "is larger than its limit of 64 KiB"]);
    assert!(line.contains("client secret file"), "{line}");
    assert_eq!(endpoint.count(), 0);
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(0));
}

/// Runs `bearerd` with `args` to its end, killing it (and failing) if it outlives
/// [`PATIENCE`]; returns its exit code and stderr.
fn run_bounded(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = support::lines_of(child.stderr.take().unwrap());
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bearerd {args:?} did not end within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), stderr.iter().collect::<Vec<_>>().join("\n"))
}

#[tokio::test]
async fn check_and_start_refuse_a_fifo_instead_of_waiting_on_it() {
    let dir = tempfile::tempdir().unwrap();
    mkfifo(&dir.path().join("secret"));
    mkfifo(&dir.path().join("ca.pem"));

    // `--check` reads the secret on its one thread.
    let config = write_config(
        dir.path(),
        "http://127.0.0.1:1",
        Token::new("http://127.0.0.1:1/token", "app").secret_file("secret"),
    );
    let (code, stderr) = run_bounded(&["--config", &config, "--check"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("secret is a FIFO, not a regular file"),
        "{stderr}"
    );

    // A start reads the ca_file before it serves.
    let config = ConfigBuilder::new()
        .upstream(
            Upstream::new("api", "https://127.0.0.1:1")
                .tls(Tls::new().roots("none").ca_file("ca.pem"))
                .token(Token::new("https://127.0.0.1:1/token", "app").secret("pw")),
        )
        .render();
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, config).unwrap();
    let (code, stderr) = run_bounded(&["--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("ca_file"), "{stderr}");
    assert!(stderr.contains("ca.pem is a FIFO"), "{stderr}");
    assert!(stderr.contains("at most 1 MiB"), "{stderr}");
}
