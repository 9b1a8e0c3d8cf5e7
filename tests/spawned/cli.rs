//! The `bearerd` binary as a user runs it: flags, `--check`, exit codes, signals, and
//! streaming 100 MiB each way without its memory growing with the size.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::path::Path;
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use support::config::{payments, string, ConfigBuilder, Table, Token, Upstream};
use support::daemon::{Daemon, BIN, PATIENCE};
use support::{echo, serve, token_endpoint, token_ok};
use tokio::sync::Notify;

fn bearerd(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("BEARERD_CONFIG")
        .output()
        .unwrap()
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("bearerd.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn help_and_version() {
    let help = bearerd(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8(help.stdout).unwrap();
    assert!(
        text.contains("--config <FILE>") && text.contains("--check"),
        "{text}"
    );
    assert!(text.contains("BEARERD_CONFIG"), "{text}");

    let version = bearerd(&["--version"]);
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8(version.stdout).unwrap().trim(),
        format!("bearerd {}", env!("CARGO_PKG_VERSION"))
    );
}

/// The example upstream's token table, its secret in the file `secret`, up to `audience`.
fn check_token(url: &str) -> Token {
    Token::new(url, "abc").secret_file("secret")
}

/// The config `--check` is shown: the example upstream, with an audience.
fn check_config() -> String {
    ConfigBuilder::empty()
        .upstream(payments().token(
            check_token("https://auth.example.com/oauth/token").audience("https://api.example.com"),
        ))
        .render()
}

#[test]
fn check_describes_what_would_run_without_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "do-not-print-me\n").unwrap();
    let path = write_config(dir.path(), &check_config());
    // The config path may come from the environment.
    let output = Command::new(BIN)
        .arg("--check")
        .env("BEARERD_CONFIG", &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("upstream payments: listen 127.0.0.1:8081 -> https://api.example.com/v2"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "token: POST https://auth.example.com/oauth/token as client \"abc\", auth basic"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("audience \"https://api.example.com\""),
        "{stdout}"
    );
    assert!(!stdout.contains("do-not-print-me") && !stderr.contains("do-not-print-me"));
    assert!(
        stdout.contains("  peers allowed: this machine only (loopback)"),
        "{stdout}"
    );
    assert!(!stdout.contains("WARNING"), "{stdout}");
}

#[test]
fn check_says_what_is_exposed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "s\n").unwrap();
    let exposed = ConfigBuilder::empty()
        .upstream(
            payments()
                .listen("0.0.0.0:8081")
                .allow_from(&["10.0.0.0/8"])
                .token(
                    check_token("http://auth.example.com/oauth/token")
                        .allow_plain_http(true)
                        .audience("https://api.example.com"),
                ),
        )
        .render();
    let path = write_config(dir.path(), &exposed);
    let output = bearerd(&["--check", "--config", &path]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("  peers allowed: 10.0.0.0/8\n"), "{stdout}");
    assert!(
        stdout.contains("  WARNING: listens beyond loopback"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  WARNING: allow_plain_http: the client credentials go to the token endpoint unencrypted"),
        "{stdout}"
    );
}

#[test]
fn check_reports_a_missing_secret_by_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &check_config());
    let output = bearerd(&["--config", &path, "--check"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let secret_path = dir.path().join("secret");
    assert!(
        stderr.contains(&format!(
            "upstream payments: cannot read client secret file {}",
            secret_path.display()
        )),
        "{stderr}"
    );
}

/// `--check` prepares `[cache]` as a start does: it reads the key (a bad one fails here, not
/// only at start) and describes each backend, but never connects to Redis (port 1 of
/// loopback refuses every connection, and `--check` still passes).
#[test]
fn check_prepares_every_cache_backend_and_refuses_a_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "s\n").unwrap();
    let key = dir.path().join("cache.key");
    let redis = |key_file: &Path| {
        Table::new()
            .set("backend", string("redis"))
            .set("url", string("redis://127.0.0.1:1/0"))
            .set("key_file", string(key_file.to_str().unwrap()))
    };
    let run = |cache: Table| {
        let config = ConfigBuilder::empty()
            .upstream(payments().token(check_token("https://auth.example.com/oauth/token")))
            .table("cache", cache)
            .render();
        let output = bearerd(&["--check", "--config", &write_config(dir.path(), &config)]);
        let stdout = String::from_utf8(output.stdout).unwrap();
        let stderr = String::from_utf8(output.stderr).unwrap();
        (output.status.code(), stdout, stderr)
    };

    let entries = dir.path().join("entries");
    let (code, stdout, stderr) = run(Table::new()
        .set("backend", string("file"))
        .set("dir", string(entries.to_str().unwrap())));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "cache: file, dir {} (created, mode 0700)",
            entries.display()
        )),
        "{stdout}"
    );

    std::fs::write(&key, "7Y8k1e2v3Q4k5e6y7S8e9a0l1i2n3g4K5e6y7X8Y9Z0=\n").unwrap();
    let (code, stdout, stderr) = run(redis(&key));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("cache: redis redis://127.0.0.1:1/0, key_prefix \"bearerd:\", timeout 250ms (not connected by --check)"),
        "{stdout}"
    );

    std::fs::write(&key, "not a key\n").unwrap();
    let (code, stdout, stderr) = run(redis(&key));
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "[cache]: key_file {}: does not hold 32 bytes in base64",
            key.display()
        )) && stderr.contains("(bearerd would not start)"),
        "{stderr}"
    );

    let missing = dir.path().join("missing.key");
    let (code, _, stderr) = run(redis(&missing));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("[cache]: key_file {}", missing.display())),
        "{stderr}"
    );
}

#[test]
fn invalid_config_exits_2_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    // `audiense` is line 10: the upstream's 4, a blank line, the token table's header and 3.
    let misspelt = ConfigBuilder::empty()
        .upstream(
            payments().token(
                check_token("https://auth.example.com/oauth/token")
                    .set("audiense", string("https://api.example.com")),
            ),
        )
        .render();
    let path = write_config(dir.path(), &misspelt);
    let output = bearerd(&["--config", &path, "--check"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.starts_with(&format!(
            "{path}:10:1: upstream[0].token.audiense: unknown key `audiense`; did you mean `audience`?"
        )),
        "{stderr}"
    );
}

/// The binary with one upstream `api` at `upstream_url`, and the address it listens on; the
/// directory holds its config and must outlive it.
fn start_daemon(
    upstream_url: &str,
    endpoint: &support::TokenEndpoint,
) -> (Daemon, std::net::SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &daemon_config(upstream_url, &endpoint.url("/token"), "pw"),
    );
    let daemon = Daemon::start(&path);
    let addr = daemon.listen_addr("api");
    (daemon, addr, dir)
}

/// One upstream `api` at `upstream`, client `app` with the secret `secret`.
fn daemon_config(upstream: &str, token_url: &str, secret: &str) -> String {
    ConfigBuilder::new()
        .upstream(Upstream::new("api", upstream).token(Token::new(token_url, "app").secret(secret)))
        .render()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = support::Holding::start().await;
    let (mut daemon, addr, _dir) = start_daemon(&upstream.url(""), &endpoint);

    let in_flight = tokio::spawn(support::get_owned(format!("http://{addr}/slow")));
    upstream.arrived().await;
    daemon.signal("TERM");

    // The listener closes first: new connections are refused while the old request drains.
    let deadline = Instant::now() + PATIENCE;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "listener still open after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    upstream.release();
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.echo().header("authorization"), Some("Bearer tok"));
    let status = daemon.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "log: {:?}",
        daemon.log.lock().unwrap()
    );
}

/// A body of `remaining` bytes made on the fly, 64 KiB at a time, never held whole.
struct Generated {
    remaining: u64,
    chunk: Bytes,
}

impl Generated {
    fn new(size: u64) -> Self {
        Self {
            remaining: size,
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
        }
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// Counts a body's bytes as they pass, keeping none of them.
async fn count_bytes<B: Body<Data = Bytes> + Unpin>(mut body: B) -> u64
where
    B::Error: std::fmt::Debug,
{
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            total += data.len() as u64;
        }
    }
    total
}

const HUNDRED_MIB: u64 = 100 * 1024 * 1024;
/// Far above bearerd's working set (a few MiB) and far below the 100 MiB it must not hold.
const STREAMING_RSS_LIMIT_KIB: u64 = 40 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_100_mib_each_way_without_buffering() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = serve(|request: Request<hyper::body::Incoming>| async move {
        let body = if request.method() == http::Method::POST {
            let received = count_bytes(request.into_body()).await;
            support::full(received.to_string())
        } else {
            Generated::new(HUNDRED_MIB).boxed()
        };
        Response::new(body)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &daemon_config(&upstream.url(""), &endpoint.url("/token"), "pw"),
    );
    let daemon = Daemon::start(&path);
    let addr = daemon.listen_addr("api");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Generated>();

    let upload = client
        .request(
            Request::post(format!("http://{addr}/upload"))
                .body(Generated::new(HUNDRED_MIB))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(upload.status(), StatusCode::OK);
    let received = upload.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(received, HUNDRED_MIB.to_string());

    let download = client
        .request(
            Request::get(format!("http://{addr}/download"))
                .body(Generated::new(0))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    assert_eq!(count_bytes(download.into_body()).await, HUNDRED_MIB);

    let peak = daemon.peak_rss_kib();
    assert!(
        peak < STREAMING_RSS_LIMIT_KIB,
        "bearerd peaked at {peak} KiB while streaming 2 × 100 MiB"
    );
}

impl Daemon {
    /// Waits until a logged line contains `text`.
    fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.log.lock().unwrap().iter().any(|l| l.contains(text)) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_bad_config_keeps_the_running_one() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = serve(echo).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &daemon_config(&upstream.url("/v1"), &endpoint.url("/token"), "pw"),
    );
    let mut daemon = Daemon::start(&path);
    let addr = daemon.listen_addr("api");
    assert_eq!(
        support::get(&format!("http://{addr}/x")).await.echo().uri,
        "/v1/x"
    );

    write_config(
        dir.path(),
        &daemon_config(&upstream.url("/v2"), &endpoint.url("/token"), "pw"),
    );
    daemon.signal("HUP");
    daemon.wait_for_log("config reloaded");
    assert_eq!(
        support::get(&format!("http://{addr}/x")).await.echo().uri,
        "/v2/x"
    );

    write_config(dir.path(), "[[upstream]]\nname = 1\n");
    daemon.signal("HUP");
    daemon.wait_for_log("reload refused: invalid config");
    assert_eq!(
        support::get(&format!("http://{addr}/x")).await.echo().uri,
        "/v2/x"
    );
    assert_eq!(
        endpoint.count(),
        1,
        "the unchanged token source kept its token"
    );

    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_exits_at_once() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    // Never released: the drain would last the whole grace period.
    let upstream = support::Holding::start().await;
    let (mut daemon, addr, _dir) = start_daemon(&upstream.url(""), &endpoint);
    let _in_flight = tokio::spawn(support::get_owned(format!("http://{addr}/hang")));
    upstream.arrived().await;
    daemon.signal("TERM");
    daemon.wait_for_log("shutting down");
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(130));
}

/// Runs the binary off the async runtime, so in-process fixtures keep serving.
async fn bearerd_async(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        bearerd(&args)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_token_reports_the_outcome_and_hides_the_token_unless_asked() {
    let endpoint = token_endpoint(|_, request| async move {
        if request.basic().is_some_and(|(_, secret)| secret == "pw") {
            support::json(
                StatusCode::OK,
                serde_json::json!({"access_token": "secret-token-value", "token_type": "bearer", "expires_in": "3600", "scope": "read"}),
            )
        } else {
            support::json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "invalid_client", "error_description": "bad secret"}),
            )
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &daemon_config("http://127.0.0.1:9/", &endpoint.url("/token"), "pw"),
    );
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--config".to_owned(),
            path.clone(),
            "--fetch-token".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        bearerd_async(args)
    };

    let output = run(&["api"]).await;
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("token type: Bearer"), "{stdout}");
    assert!(stdout.contains("scope: read"), "{stdout}");
    assert!(
        stdout.contains("lifetime: 3600 s (from expires_in), expires "),
        "{stdout}"
    );
    assert!(!stdout.contains("secret-token-value"), "{stdout}");

    let output = run(&["api", "--show-token"]).await;
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains("access token: secret-token-value"),
        "{stdout}"
    );

    let output = run(&["nope"]).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("no upstream named \"nope\"; the config has: api"),
        "{stderr}"
    );
    assert_eq!(endpoint.count(), 2);

    let wrong = write_config(
        dir.path(),
        &daemon_config("http://127.0.0.1:9/", &endpoint.url("/token"), "wrong"),
    );
    let output = bearerd_async(vec![
        "--config".into(),
        wrong,
        "--fetch-token".into(),
        "api".into(),
    ])
    .await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("status 401 Unauthorized, error \"invalid_client\": bad secret"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_token_exchanges_the_subject_file_of_an_on_behalf_of_upstream_only() {
    let endpoint = token_endpoint(|_, request| async move {
        token_ok(&format!("for-{}", request.form["subject_token"]), 600)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let text = ConfigBuilder::new()
        .upstream(
            Upstream::new("obo", "http://127.0.0.1:9/").token(
                Token::new(&endpoint.url("/token"), "gateway")
                    .secret("pw")
                    .set("grant", string("token_exchange"))
                    .set("subject_token_from", string("header:X-Subject")),
            ),
        )
        .upstream(
            Upstream::new("plain", "http://127.0.0.1:9/")
                .token(Token::new(&endpoint.url("/token"), "app").secret("pw")),
        )
        .render();
    let path = write_config(dir.path(), &text);
    let subject = dir.path().join("subject");
    std::fs::write(&subject, "kim-SUBJECT\n").unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--config".to_owned(),
            path.clone(),
            "--fetch-token".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        bearerd_async(args)
    };
    let subject_arg = subject.to_str().unwrap();

    let output = run(&["obo"]).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("give one with --subject-token-file PATH"),
        "{stderr}"
    );
    let output = run(&["plain", "--subject-token-file", subject_arg]).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("--subject-token-file is for on-behalf-of upstreams"),
        "{stderr}"
    );
    assert_eq!(endpoint.count(), 0);

    let output = run(&["obo", "--subject-token-file", subject_arg]).await;
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("on behalf of the subject with hash"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("SUBJECT") && !stderr.contains("SUBJECT"),
        "{stdout}{stderr}"
    );
    assert_eq!(endpoint.count(), 1);
    assert_eq!(endpoint.requests()[0].form["subject_token"], "kim-SUBJECT");
    assert_eq!(
        endpoint.requests()[0].form["grant_type"],
        "urn:ietf:params:oauth:grant-type:token-exchange"
    );
}

// ---------------------------------------------------------------------------------------------
// `--public-jwk NAME`: the upstream's public keys, to register with the identity provider
// ---------------------------------------------------------------------------------------------

/// A test key of tests/fixtures/keys.
fn fixture_key(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
        .to_str()
        .unwrap()
        .to_owned()
}

/// The PKCS#8 DER of a fixture key.
fn fixture_pkcs8(name: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::PrivateKeyDer::from_pem_file(fixture_key(name)).unwrap();
    der.secret_der().to_vec()
}

fn b64(text: &serde_json::Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.as_str().unwrap())
        .unwrap()
}

/// The RFC 7638 §3 thumbprint of `jwk`, worked out here from its required members.
fn thumbprint_of(jwk: &serde_json::Value, members: &[&str]) -> String {
    use base64::Engine;
    let fields: Vec<String> = members
        .iter()
        .map(|m| format!("\"{m}\":\"{}\"", jwk[*m].as_str().unwrap()))
        .collect();
    let canonical = format!("{{{}}}", fields.join(","));
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

/// A `private_key_jwt` upstream `name` signing with the fixture `key`.
fn private_key_jwt(name: &str, key: &str) -> Token {
    Token::new("https://auth.example.com/oauth/token", name)
        .auth("private_key_jwt")
        .set("private_key_file", string(&fixture_key(key)))
}

/// `bearerd --config <config> --public-jwk <name>`, with the config written to a new directory.
fn public_jwk(config: &str, name: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), config);
    bearerd(&["--config", &path, "--public-jwk", name])
}

/// The members a key of `kty` may show: public ones and metadata, never `d`, `p`, `q`, `dp`,
/// `dq`, `qi` or `k`.
fn assert_public_only(jwk: &serde_json::Value) {
    let allowed: &[&str] = match jwk["kty"].as_str().unwrap() {
        "RSA" => &["kty", "n", "e", "kid", "use", "alg", "x5t#S256"],
        "EC" => &["kty", "crv", "x", "y", "kid", "use", "alg", "x5t#S256"],
        "OKP" => &["kty", "crv", "x", "kid", "use", "alg", "x5t#S256"],
        other => panic!("kty {other}"),
    };
    for member in jwk.as_object().unwrap().keys() {
        assert!(allowed.contains(&member.as_str()), "{member} in {jwk}");
    }
}

#[test]
fn public_jwk_prints_the_assertion_and_dpop_keys_that_verify_their_signatures() {
    use ring::signature::{self, KeyPair};
    let config = ConfigBuilder::empty()
        .upstream(
            Upstream::new("ec", "https://api.example.com")
                .listen("127.0.0.1:8081")
                .token(
                    private_key_jwt("ec", "ec-p256.pem")
                        .set("key_id", string("ec-2026"))
                        .set("dpop", true)
                        .set("dpop_key_file", string(&fixture_key("ed25519.pem"))),
                ),
        )
        .upstream(
            Upstream::new("rsa", "https://api.example.com")
                .listen("127.0.0.1:8082")
                .token(
                    private_key_jwt("rsa", "rsa-2048.pem").set("assertion_alg", string("PS256")),
                ),
        )
        .render();

    let output = public_jwk(&config, "ec");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let set: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let [assertion, dpop] = set["keys"].as_array().unwrap().as_slice() else {
        panic!("two keys expected: {set}")
    };
    for jwk in [assertion, dpop] {
        assert_public_only(jwk);
        assert_eq!(jwk["use"], "sig", "{jwk}");
    }
    // The assertion key: its configured kid, and the public point of the fixture key, which
    // verifies what the private key signs.
    assert_eq!(assertion["kid"], "ec-2026");
    assert_eq!(
        (&assertion["kty"], &assertion["crv"], &assertion["alg"]),
        (&"EC".into(), &"P-256".into(), &"ES256".into())
    );
    let rng = ring::rand::SystemRandom::new();
    let message = b"a client assertion";
    let ec = signature::EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &fixture_pkcs8("ec-p256.pem"),
        &rng,
    )
    .unwrap();
    let signed = ec.sign(&rng, message).unwrap();
    let point = [vec![4u8], b64(&assertion["x"]), b64(&assertion["y"])].concat();
    assert_eq!(point, ec.public_key().as_ref());
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point)
        .verify(message, signed.as_ref())
        .unwrap();
    // The DPoP key: no key_id of its own, so its thumbprint, which is its `jkt`.
    assert_eq!(
        (&dpop["kty"], &dpop["crv"]),
        (&"OKP".into(), &"Ed25519".into())
    );
    assert_eq!(dpop["kid"], thumbprint_of(dpop, &["crv", "kty", "x"]));
    let ed = signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&fixture_pkcs8("ed25519.pem"))
        .unwrap();
    signature::UnparsedPublicKey::new(&signature::ED25519, b64(&dpop["x"]))
        .verify(message, ed.sign(message).as_ref())
        .unwrap();

    // RSA, no key_id: the thumbprint is the kid; n and e verify a PS256 signature.
    let output = public_jwk(&config, "rsa");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let set: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let [rsa] = set["keys"].as_array().unwrap().as_slice() else {
        panic!("one key expected: {set}")
    };
    assert_public_only(rsa);
    assert_eq!((&rsa["kty"], &rsa["alg"]), (&"RSA".into(), &"PS256".into()));
    assert_eq!(rsa["kid"], thumbprint_of(rsa, &["e", "kty", "n"]));
    let key = signature::RsaKeyPair::from_pkcs8(&fixture_pkcs8("rsa-2048.pem")).unwrap();
    let mut signed = vec![0; key.public().modulus_len()];
    key.sign(&signature::RSA_PSS_SHA256, &rng, message, &mut signed)
        .unwrap();
    signature::RsaPublicKeyComponents {
        n: b64(&rsa["n"]),
        e: b64(&rsa["e"]),
    }
    .verify(&signature::RSA_PSS_2048_8192_SHA256, message, &signed)
    .unwrap();
}

#[test]
fn public_jwk_says_why_there_is_nothing_to_print() {
    let config = ConfigBuilder::empty().upstream(payments()).render();
    let output = public_jwk(&config, "payments");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(output.stdout.is_empty());
    assert!(
        stderr.contains(
            "upstream \"payments\" has no key of its own to publish: its auth is basic (a public key is registered for auth = \"private_key_jwt\"), and dpop is off"
        ),
        "{stderr}"
    );
    // A DPoP key made at start has no fixed public key either.
    let config = ConfigBuilder::empty()
        .upstream(payments().token(payments_token_with_dpop()))
        .render();
    let stderr = String::from_utf8(public_jwk(&config, "payments").stderr).unwrap();
    assert!(stderr.contains("set dpop_key_file to keep one"), "{stderr}");

    let output = public_jwk(&config, "paymnets");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no upstream or route is named \"paymnets\"; the names are payments"),
        "{stderr}"
    );
    // Not with --check or --fetch-token: one thing at a time.
    let output = bearerd(&["--config", "x.toml", "--check", "--public-jwk", "payments"]);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

/// The token table of [`payments`], with DPoP and no key file.
fn payments_token_with_dpop() -> Token {
    support::config::payments_token().set("dpop", true)
}

// ---------------------------------------------------------------------------------------------
// What a newcomer reads: the log and the refusals say what happened
// ---------------------------------------------------------------------------------------------

/// The first line `daemon` logged that holds `text`, waiting for it up to [`PATIENCE`].
fn wait_for_line(daemon: &Daemon, text: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = daemon
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|line| line.contains(text))
            .cloned();
        if let Some(line) = found {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} in {:?}",
            daemon.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_the_cache_is_logged_as_taken_from_it_not_as_fetched() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new()
        .upstream(
            Upstream::new("api", "http://127.0.0.1:9")
                .token(Token::new(&endpoint.url("/token"), "app").secret("pw")),
        )
        .table(
            "cache",
            support::config::Table::new()
                .set("backend", string("file"))
                .set("dir", string("tokens")),
        )
        .render();
    let path = write_config(dir.path(), &config);

    // The first run fetches the token (and stores it on the way).
    let mut first = Daemon::start(&path);
    wait_for_line(&first, "token fetched");
    first.signal("TERM");
    assert!(first.wait_exit().success());
    assert_eq!(endpoint.count(), 1);

    // The second takes it from the cache, and says so, with the backend.
    let second = Daemon::start(&path);
    let line = wait_for_line(&second, "token taken from the cache");
    assert!(
        line.contains("backend=\"file\"") && line.contains("upstream=api"),
        "{line}"
    );
    assert!(
        !second
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains("token fetched")),
        "{:?}",
        second.log.lock().unwrap()
    );
    assert_eq!(endpoint.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_host_on_a_path_no_route_takes_is_not_called_an_unknown_host() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new()
        .listener(
            support::config::Listener::new("forward").route(
                support::config::Route::named("v2")
                    .host("api.example.test")
                    .path_prefix("/v2")
                    .url("http://127.0.0.1:9")
                    .token(Token::new(&endpoint.url("/token"), "app").secret("pw")),
            ),
        )
        .render();
    let daemon = Daemon::start(&write_config(dir.path(), &config));
    let addr = daemon.listen_addr("v2");
    let answer = support::raw::exchange(
        addr,
        b"GET http://api.example.test/v1/x HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(support::raw::status_of(&answer), 403, "{answer}");
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["error"], "host_not_served", "{json}");
    let detail = json["detail"].as_str().unwrap();
    assert!(
        detail
            .starts_with("this forward proxy serves this host, but no route of it takes this path")
            && !detail.contains("not among them"),
        "{detail}"
    );
    // The route table is the operator's: neither its host nor its prefix is told.
    assert!(
        !detail.contains("api.example.test") && !detail.contains("/v2"),
        "{detail}"
    );
}

// ---------------------------------------------------------------------------------------------
// `--fetch-token` with `grant = "refresh_token"`: through the store and under the lease
// ---------------------------------------------------------------------------------------------

/// A token endpoint whose refresh tokens work once: `rt-0` first, each answer giving the next
/// (`rt-1`, …) with the access token `at-<n>`; a token spent or unknown gets `invalid_grant`.
/// With `first`, its first answer is held until `first` is notified: a refresh in flight.
async fn rotating_endpoint(first: Option<Arc<Notify>>) -> support::TokenEndpoint {
    let valid = Arc::new(Mutex::new("rt-0".to_owned()));
    let issued = Arc::new(AtomicUsize::new(0));
    token_endpoint(move |n, request| {
        let (valid, issued) = (Arc::clone(&valid), Arc::clone(&issued));
        let first = first.clone().filter(|_| n == 0);
        async move {
            if let Some(first) = first {
                first.notified().await;
            }
            let mut current = valid.lock().unwrap();
            if request.form.get("grant_type").map(String::as_str) != Some("refresh_token")
                || request.form.get("refresh_token") != Some(&*current)
            {
                return support::json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "invalid_grant"}),
                );
            }
            let n = issued.fetch_add(1, Ordering::SeqCst);
            *current = format!("rt-{}", n + 1);
            support::json(
                StatusCode::OK,
                serde_json::json!({
                    "access_token": format!("at-{n}"),
                    "token_type": "Bearer",
                    "expires_in": 1800,
                    "refresh_token": *current,
                }),
            )
        }
    })
    .await
}

/// The refresh tokens the endpoint was sent, in order.
fn spent(endpoint: &support::TokenEndpoint) -> Vec<String> {
    endpoint
        .requests()
        .iter()
        .map(|r| r.form.get("refresh_token").cloned().unwrap_or_default())
        .collect()
}

/// A directory with `refresh_token` (`rt-0`), the cache's key, and the config of upstream
/// `api` with the refresh token grant and `cache`; the config's path.
fn refresh_setup(
    endpoint: &support::TokenEndpoint,
    upstream_url: &str,
    cache: Table,
) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("refresh_token"), "rt-0\n").unwrap();
    let key = dir.path().join("cache.key");
    std::fs::write(&key, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = ConfigBuilder::new()
        .upstream(
            Upstream::new("api", upstream_url).token(
                Token::new(&endpoint.url("/token"), "app")
                    .secret("pw")
                    .set("grant", string("refresh_token"))
                    .set("refresh_token_file", string("refresh_token")),
            ),
        )
        .table("cache", cache.set("key_file", string("cache.key")))
        .render();
    let path = write_config(dir.path(), &config);
    (dir, path)
}

/// `bearerd --config PATH --fetch-token api`
async fn fetch_token(path: &str) -> std::process::Output {
    bearerd_async(vec![
        "--config".into(),
        path.into(),
        "--fetch-token".into(),
        "api".into(),
    ])
    .await
}

/// With the file cache: `--fetch-token` spends `rt-0` and stores `rt-1` (sealed: never in
/// clear on disk) before it prints; bearerd started next takes the access token it stored and,
/// when the upstream rejects that, spends `rt-1`, not the file's `rt-0`, which was spent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_token_spends_the_refresh_token_through_the_file_cache_and_bearerd_goes_on_from_it() {
    let endpoint = rotating_endpoint(None).await;
    let rejected = Arc::new(AtomicUsize::new(0));
    let upstream = serve(move |request| {
        let first = rejected.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                support::json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "invalid_token"}),
                )
            } else {
                echo(request).await
            }
        }
    })
    .await;
    let cache = Table::new()
        .set("backend", string("file"))
        .set("dir", string("tokens"));
    let (dir, path) = refresh_setup(&endpoint, &upstream.url("/v1"), cache);

    let output = fetch_token(&path).await;
    let (stdout, stderr) = (
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    );
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("token request to"), "{stdout}");
    for secret in ["at-0", "rt-0", "rt-1"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stdout}{stderr}"
        );
    }
    assert_eq!(spent(&endpoint), ["rt-0"]);
    for entry in std::fs::read_dir(dir.path().join("tokens")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("rt-1"), "sealed");
    }

    let daemon = tokio::task::block_in_place(|| Daemon::start(&path));
    let addr = tokio::task::block_in_place(|| daemon.listen_addr("api"));
    let seen = support::get(&format!("http://{addr}/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer at-1"));
    assert_eq!(spent(&endpoint), ["rt-0", "rt-1"], "each spent once");
}

/// With Redis, while a running bearerd holds the fleet lease (its refresh at the endpoint,
/// the answer held): `--fetch-token` is refused, saying why, and sends nothing. Once the
/// holder has stored `rt-1` and let the lease go, `--fetch-token` spends `rt-1`, the stored
/// one, not the file's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_token_is_refused_while_another_holds_the_fleet_lease_and_spends_nothing() {
    let redis = tokio::task::block_in_place(support::redis::Redis::start);
    let answer_first = Arc::new(Notify::new());
    let endpoint = rotating_endpoint(Some(Arc::clone(&answer_first))).await;
    let upstream = serve(echo).await;
    let cache = Table::new()
        .set("backend", string("redis"))
        .set("url", string(&redis.url()));
    let (_dir, path) = refresh_setup(&endpoint, &upstream.url("/v1"), cache);
    let daemon = tokio::task::block_in_place(|| Daemon::start(&path));
    tokio::time::timeout(PATIENCE, endpoint.wait_for_requests(1))
        .await
        .expect("the running bearerd sent no token request");
    let leases = tokio::task::block_in_place(|| redis.keys("bearerd:lease:*"));
    assert_eq!(leases.len(), 1, "the running bearerd holds the lease");

    let output = fetch_token(&path).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("the fleet lease on the refresh token is held by another process")
            && stderr.contains("nothing was spent"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "nothing printed");
    assert_eq!(spent(&endpoint), ["rt-0"], "only the holder's");

    answer_first.notify_one();
    let addr = tokio::task::block_in_place(|| daemon.listen_addr("api"));
    // The app's request is answered once the holder has stored rt-1 and released the lease.
    let seen = support::get(&format!("http://{addr}/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer at-0"));
    let output = fetch_token(&path).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(spent(&endpoint), ["rt-0", "rt-1"], "each spent once");
}
