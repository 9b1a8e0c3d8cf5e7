//! `[egress]` (issue 27) against a real proxy: Debian's tinyproxy (tests/support/tinyproxy.rs,
//! on a free loopback port) between bearerd processes and in-process token endpoints and
//! upstreams; and, for the answers tinyproxy never gives (502) and for a proxy that never
//! answers, a listener of the test's own.
//!
//! What each test sees of the proxy is its log: the `CONNECT host:port` requests it was asked
//! for. tinyproxy must be installed: without it these tests fail, saying how to install it
//! (`make test` does, through scripts/install-test-deps.sh).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::daemon::{Daemon, BIN, PATIENCE};
use support::tinyproxy::{Settings, Tinyproxy};
use support::{echo, get, serve, serve_tls, token_endpoint, token_endpoint_tls, token_ok, TestCa};

/// The proxy's password in the authentication tests: it must never be logged.
const PROXY_PASSWORD: &str = "pr0xy-pa55word-never-logged";

/// Writes `config` (and the files it names) to `dir`, returning the config's path.
fn write_config(dir: &Path, config: &str) -> String {
    std::fs::write(dir.join("secret"), "client-secret\n").unwrap();
    let path = dir.join("bearerd.toml");
    std::fs::write(&path, config).unwrap();
    path.to_str().unwrap().to_owned()
}

/// One upstream `api` at `upstream` with its token endpoint at `token`, and `egress` (the
/// `[egress]` table's lines) and `tls` (the `[upstream.tls]` table's).
fn config(egress: &str, upstream: &str, token: &str, extra: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[egress]
{egress}

[[upstream]]
name = "api"
listen = "127.0.0.1:0"
url = "{upstream}"
{extra}

[upstream.token]
url = "{token}"
client_id = "abc"
client_secret_file = "secret"
"#
    )
}

/// Runs bearerd on `config_path`, logging at debug so that whatever it might print is seen.
fn start(config_path: &str) -> Daemon {
    tokio::task::block_in_place(|| {
        Daemon::start_with(config_path, &[("RUST_LOG", "debug,h2=info,rustls=info")])
    })
}

/// Writes `config` (and the files it names) to `dir` and runs bearerd on it; the address of its
/// listener `api`.
fn run(dir: &Path, config: &str) -> (Daemon, SocketAddr) {
    let daemon = start(&write_config(dir, config));
    let listen = tokio::task::block_in_place(|| daemon.listen_addr("api"));
    (daemon, listen)
}

/// A tinyproxy on a free loopback port, without credentials.
fn tinyproxy() -> Tinyproxy {
    tokio::task::block_in_place(|| Tinyproxy::start(&Settings::default()))
}

/// Waits until bearerd has logged a line containing every one of `needles`.
fn wait_for_log(daemon: &Daemon, needles: &[&str]) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = daemon
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|line| needles.iter().all(|n| line.contains(n)))
            .cloned();
        if let Some(line) = found {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "bearerd logged no line with {needles:?}; its log:\n{}",
            daemon.log.lock().unwrap().join("\n")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that nothing bearerd logged holds the proxy's password, plain or in Basic form.
fn assert_password_not_logged(daemon: &Daemon) {
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("alice:{PROXY_PASSWORD}"));
    let log = daemon.log.lock().unwrap().join("\n");
    assert!(!log.is_empty());
    assert!(!log.contains(PROXY_PASSWORD), "password logged:\n{log}");
    assert!(!log.contains(&basic), "Basic credentials logged:\n{log}");
}

/// The value of `series` in bearerd's `/metrics`.
async fn metric(daemon: &Daemon, series: &str) -> f64 {
    let admin = tokio::task::block_in_place(|| daemon.listen_addr("admin"));
    let scrape = get(&format!("http://{admin}/metrics")).await;
    support::metric(&String::from_utf8_lossy(&scrape.body), series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_token_endpoint_and_upstream_are_reached_through_the_proxy_with_tls_end_to_end() {
    let ca = TestCa::new();
    let endpoint = token_endpoint_tls(|_, _| async { token_ok("tok-proxied", 3600) }, &ca).await;
    let upstream = serve_tls(echo, &ca).await;
    let proxy = tinyproxy();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.ca_pem).unwrap();
    let (_daemon, listen) = run(
        dir.path(),
        &config(
            &format!("proxy = \"{}\"", proxy.url()),
            &upstream.https_url("/v1"),
            &endpoint.server.https_url("/token"),
            "[upstream.tls]\nca_file = \"ca.pem\"",
        ),
    );
    let seen = get(&format!("http://{listen}/things")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer tok-proxied"));
    assert!(seen.uri.ends_with("/v1/things"), "{}", seen.uri);
    let requests = proxy.requests();
    for target in [endpoint.server.addr, upstream.addr] {
        let connect = format!("CONNECT {target} HTTP/1.1");
        assert!(
            requests.contains(&connect),
            "no {connect:?} in {requests:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_token_endpoint_and_upstream_are_tunnelled_too() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok-plain", 3600) }).await;
    let upstream = serve(echo).await;
    let proxy = tinyproxy();
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, listen) = run(
        dir.path(),
        &config(
            &format!("proxy = \"{}\"", proxy.url()),
            &upstream.url("/"),
            &endpoint.url("/token"),
            "",
        ),
    );
    let seen = get(&format!("http://{listen}/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer tok-plain"));
    let requests = proxy.requests();
    for target in [endpoint.server.addr, upstream.addr] {
        assert!(
            requests.contains(&format!("CONNECT {target} HTTP/1.1")),
            "{target} not tunnelled: {requests:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_in_no_proxy_are_reached_directly_and_the_proxy_sees_nothing_of_them() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok-direct", 3600) }).await;
    let upstream = serve(echo).await;
    let proxy = tinyproxy();
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, listen) = run(
        dir.path(),
        &config(
            &format!(
                "proxy = \"{}\"\nno_proxy = [\".svc.cluster.local\", \"127.0.0.0/8\"]",
                proxy.url()
            ),
            &upstream.url("/"),
            &endpoint.url("/token"),
            "",
        ),
    );
    let seen = get(&format!("http://{listen}/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer tok-direct"));
    // A request of the test's own, after bearerd's: once the proxy has logged it, it would
    // have logged any of bearerd's before it.
    tokio::task::block_in_place(|| {
        let mut marker = TcpStream::connect(proxy.addr()).unwrap();
        marker
            .write_all(b"CONNECT marker.invalid:1 HTTP/1.1\r\nHost: marker.invalid:1\r\n\r\n")
            .unwrap();
        proxy.wait_for_request("marker.invalid");
    });
    assert_eq!(
        proxy.requests(),
        vec!["CONNECT marker.invalid:1 HTTP/1.1".to_owned()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_wants_credentials_gets_them_from_the_file_and_never_in_a_log() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok-auth", 3600) }).await;
    let upstream = serve(echo).await;
    let proxy = tokio::task::block_in_place(|| {
        Tinyproxy::start(&Settings {
            basic_auth: Some(("alice".into(), PROXY_PASSWORD.into())),
            ..Settings::default()
        })
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("proxy-basic"),
        format!("alice:{PROXY_PASSWORD}\n"),
    )
    .unwrap();
    let (daemon, listen) = run(
        dir.path(),
        &config(
            &format!(
                "proxy = \"{}\"\nproxy_authorization_file = \"proxy-basic\"",
                proxy.url()
            ),
            &upstream.url("/"),
            &endpoint.url("/token"),
            "",
        ),
    );
    let seen = get(&format!("http://{listen}/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer tok-auth"));
    assert_eq!(
        seen.header("proxy-authorization"),
        None,
        "the proxy's credentials stay with the proxy"
    );
    assert_eq!(proxy.requests().len(), 2, "{:?}", proxy.requests());
    assert_password_not_logged(&daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_proxy_credentials_are_named_as_such() {
    let endpoint = token_endpoint(|_, _| async { token_ok("never", 3600) }).await;
    let proxy = tokio::task::block_in_place(|| {
        Tinyproxy::start(&Settings {
            basic_auth: Some(("alice".into(), PROXY_PASSWORD.into())),
            ..Settings::default()
        })
    });
    let proxy_name = format!("the proxy 127.0.0.1:{}", proxy.port);
    // No credentials: 407.
    let none = tempfile::tempdir().unwrap();
    let path = write_config(
        none.path(),
        &config(
            &format!("proxy = \"{}\"", proxy.url()),
            "http://127.0.0.1:1/",
            &endpoint.url("/token"),
            "",
        ),
    );
    let daemon = start(&path);
    wait_for_log(
        &daemon,
        &[
            &proxy_name,
            "407 Proxy Authentication Required",
            "set [egress] proxy_authorization_file",
        ],
    );
    assert!(
        metric(
            &daemon,
            r#"bearerd_token_fetch_total{outcome="connect_error",upstream="api"}"#
        )
        .await
            >= 1.0
    );
    drop(daemon);
    // Wrong credentials: tinyproxy answers 401 rather than 407; either is named.
    let wrong = tempfile::tempdir().unwrap();
    std::fs::write(
        wrong.path().join("proxy-basic"),
        format!("alice:not-{PROXY_PASSWORD}\n"),
    )
    .unwrap();
    let path = write_config(
        wrong.path(),
        &config(
            &format!(
                "proxy = \"{}\"\nproxy_authorization_file = \"proxy-basic\"",
                proxy.url()
            ),
            "http://127.0.0.1:1/",
            &endpoint.url("/token"),
            "",
        ),
    );
    let daemon = start(&path);
    let line = wait_for_log(
        &daemon,
        &[
            &proxy_name,
            "refused the credentials of proxy_authorization_file",
        ],
    );
    assert!(
        line.contains("401 Unauthorized") || line.contains("407"),
        "{line}"
    );
    assert_password_not_logged(&daemon);
    assert_eq!(endpoint.count(), 0, "nothing got past the proxy");
}

/// A token endpoint reached directly (`localhost`, in `no_proxy`) and an upstream behind
/// `proxy`: the app's request shows what the upstream's connection failed with.
async fn upstream_behind(
    proxy_url: &str,
    extra: &str,
) -> (support::Answer, Daemon, tempfile::TempDir) {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let dir = tempfile::tempdir().unwrap();
    let token_url = format!("http://localhost:{}/token", endpoint.server.addr.port());
    let (daemon, listen) = run(
        dir.path(),
        &config(
            &format!("proxy = \"{proxy_url}\"\nno_proxy = [\"localhost\"]"),
            "http://127.0.0.1:9/",
            &token_url,
            extra,
        ),
    );
    let answer = get(&format!("http://{listen}/x")).await;
    // The directory outlives the daemon: the secret is read for every token request.
    (answer, daemon, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_forbids_the_port_is_named_with_its_403() {
    let proxy = tokio::task::block_in_place(|| {
        Tinyproxy::start(&Settings {
            connect_ports: vec![443],
            ..Settings::default()
        })
    });
    let (answer, daemon, _dir) = upstream_behind(&proxy.url(), "").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let detail = answer.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.contains(&format!("the proxy 127.0.0.1:{}", proxy.port))
            && detail.contains("CONNECT 127.0.0.1:9 with 403 Forbidden"),
        "{detail}"
    );
    assert_eq!(answer.json()["error"], "upstream_unreachable");
    assert!(
        metric(
            &daemon,
            r#"bearerd_requests_total{code="502",upstream="api"}"#
        )
        .await
            >= 1.0
    );
}

/// A proxy of the test's own that answers every request with `status_line` and closes.
fn answering_proxy(status_line: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut byte = [0_u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                match stream.read(&mut byte) {
                    Ok(1) => request.push(byte[0]),
                    _ => break,
                }
            }
            let _ =
                stream.write_all(format!("{status_line}\r\nContent-Length: 0\r\n\r\n").as_bytes());
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_cannot_reach_the_host_is_named_with_its_502() {
    let proxy = answering_proxy("HTTP/1.1 502 Bad Gateway");
    let (answer, _daemon, _dir) = upstream_behind(&format!("http://{proxy}"), "").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let detail = answer.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.contains(&format!("the proxy {proxy} answered CONNECT 127.0.0.1:9 with 502 Bad Gateway: the proxy could not reach it")),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_never_answers_hits_the_connect_timeout() {
    // The kernel completes connections into the backlog; nothing ever reads or answers them.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = silent.local_addr().unwrap();
    let (answer, daemon, _dir) =
        upstream_behind(&format!("http://{proxy}"), "connect_timeout = \"300ms\"").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    let json = answer.json();
    assert_eq!(json["error"], "upstream_timeout");
    let detail = json["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!(
            "the proxy {proxy} did not open a tunnel to 127.0.0.1:9 within 300ms"
        )),
        "{detail}"
    );
    assert!(
        metric(
            &daemon,
            r#"bearerd_requests_total{code="504",upstream="api"}"#
        )
        .await
            >= 1.0
    );
    drop(silent);
}

#[test]
fn check_shows_which_hosts_go_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("proxy-basic"),
        format!("alice:{PROXY_PASSWORD}\n"),
    )
    .unwrap();
    let path = write_config(
        dir.path(),
        &config(
            "proxy = \"http://proxy.corp.example:3128\"\nno_proxy = [\".svc.cluster.local\"]\nproxy_authorization_file = \"proxy-basic\"",
            "http://api.ns.svc.cluster.local:8080/",
            "https://login.example.com/token",
            "allow_plain_http = true",
        ),
    );
    let output = std::process::Command::new(BIN)
        .args(["--config", &path, "--check"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("egress: proxy http://proxy.corp.example:3128/ (CONNECT tunnels); direct for .svc.cluster.local; Proxy-Authorization (Basic) from"),
        "{stdout}"
    );
    assert!(
        stdout.contains("egress: upstream direct (no_proxy); token endpoint through the proxy proxy.corp.example:3128"),
        "{stdout}"
    );
    assert!(!stdout.contains(PROXY_PASSWORD), "{stdout}");
}

#[test]
fn an_https_or_socks_proxy_is_a_config_error_saying_so() {
    for (proxy, says) in [
        (
            "https://proxy.corp:3128",
            "https:// proxies are not supported",
        ),
        (
            "socks5://proxy.corp:1080",
            "SOCKS proxies are not supported",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            dir.path(),
            &config(
                &format!("proxy = \"{proxy}\""),
                "https://api.example.com/",
                "https://login.example.com/token",
                "",
            ),
        );
        let output = std::process::Command::new(BIN)
            .args(["--config", &path, "--check"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("egress.proxy") && stderr.contains(says),
            "{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upstream_speaks_http2_inside_the_tunnel() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok-h2c", 3600) }).await;
    let upstream = serve(echo).await;
    let proxy = tinyproxy();
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, listen) = run(
        dir.path(),
        &config(
            &format!("proxy = \"{}\"", proxy.url()),
            &upstream.url("/"),
            &endpoint.url("/token"),
            "protocol = \"h2c\"",
        ),
    );
    let seen = get(&format!("http://{listen}/x")).await.echo();
    assert_eq!(seen.version, "HTTP/2.0");
    assert_eq!(seen.header("authorization"), Some("Bearer tok-h2c"));
    assert!(
        proxy
            .requests()
            .contains(&format!("CONNECT {} HTTP/1.1", upstream.addr)),
        "{:?}",
        proxy.requests()
    );
}

/// The proxy variables of a test's environment: every one set, so that none is inherited.
fn proxy_env(http_proxy: &str, no_proxy: &str) -> Vec<(&'static str, String)> {
    let mut env = vec![("RUST_LOG", "debug,h2=info,rustls=info".to_owned())];
    for (upper, lower, value) in [
        ("HTTP_PROXY", "http_proxy", http_proxy),
        ("HTTPS_PROXY", "https_proxy", ""),
        ("ALL_PROXY", "all_proxy", ""),
        ("NO_PROXY", "no_proxy", no_proxy),
    ] {
        env.push((upper, value.to_owned()));
        env.push((lower, value.to_owned()));
    }
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_env_takes_the_proxy_and_its_credentials_from_http_proxy() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok-env", 3600) }).await;
    let upstream = serve(echo).await;
    let proxy = tokio::task::block_in_place(|| {
        Tinyproxy::start(&Settings {
            basic_auth: Some(("alice".into(), PROXY_PASSWORD.into())),
            ..Settings::default()
        })
    });
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &config(
            "use_env = true",
            &upstream.url("/"),
            &endpoint.url("/token"),
            "",
        ),
    );
    let env = proxy_env(
        &format!("http://alice:{PROXY_PASSWORD}@127.0.0.1:{}", proxy.port),
        ".svc.cluster.local",
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let check = std::process::Command::new(BIN)
        .args(["--config", &path, "--check"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "egress: proxies from the environment: HTTP_PROXY=http://127.0.0.1:{}",
            proxy.port
        )),
        "{stdout}"
    );
    assert!(!stdout.contains(PROXY_PASSWORD), "{stdout}");
    let daemon = tokio::task::block_in_place(|| Daemon::start_with(&path, &env));
    let listen = tokio::task::block_in_place(|| daemon.listen_addr("api"));
    let seen = get(&format!("http://{listen}/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer tok-env"));
    assert_eq!(proxy.requests().len(), 2, "{:?}", proxy.requests());
    assert_password_not_logged(&daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_exporter_reaches_the_collector_through_the_proxy() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok-traced", 3600) }).await;
    let upstream = serve(echo).await;
    // Answers every OTLP export with an empty 200.
    let collector =
        serve(|_| async { http::Response::new(support::full(bytes::Bytes::new())) }).await;
    let proxy = tinyproxy();
    let dir = tempfile::tempdir().unwrap();
    let mut text = config(
        &format!("proxy = \"{}\"", proxy.url()),
        &upstream.url("/"),
        &endpoint.url("/token"),
        "",
    );
    text.push_str(&format!(
        "\n[telemetry]\notlp_endpoint = \"{}\"\nsample_ratio = 1.0\n",
        collector.url("")
    ));
    let path = write_config(dir.path(), &text);
    let daemon = start(&path);
    let listen = tokio::task::block_in_place(|| daemon.listen_addr("api"));
    get(&format!("http://{listen}/x")).await.echo();
    // The token fetch's span is always exported; the exporter sends within its interval.
    tokio::task::block_in_place(|| {
        proxy.wait_for_request(&format!("CONNECT {} HTTP/1.1", collector.addr));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_request_through_a_proxy_that_never_answers_times_out_naming_it() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = silent.local_addr().unwrap();
    let endpoint = token_endpoint(|_, _| async { token_ok("never", 3600) }).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &config(
            &format!("proxy = \"http://{proxy}\""),
            "http://127.0.0.1:9/",
            &endpoint.url("/token"),
            "",
        )
        .replace(
            "client_id = \"abc\"",
            "client_id = \"abc\"\ntimeout = \"300ms\"",
        ),
    );
    let daemon = start(&path);
    wait_for_log(
        &daemon,
        &[&format!(
            "token request to {} through the proxy {proxy} timed out after 300ms",
            endpoint.server.addr
        )],
    );
    assert!(
        metric(
            &daemon,
            r#"bearerd_token_fetch_total{outcome="timeout",upstream="api"}"#
        )
        .await
            >= 1.0
    );
    assert_eq!(endpoint.count(), 0);
    drop(silent);
}

#[test]
fn check_reads_the_proxy_credentials_file_without_printing_it() {
    for (contents, says) in [
        (None, "proxy_authorization_file: cannot read"),
        (Some(PROXY_PASSWORD), "must hold user:password on one line"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        if let Some(contents) = contents {
            std::fs::write(dir.path().join("proxy-basic"), contents).unwrap();
        }
        let path = write_config(
            dir.path(),
            &config(
                "proxy = \"http://proxy.corp.example:3128\"\nproxy_authorization_file = \"proxy-basic\"",
                "https://api.example.com/",
                "https://login.example.com/token",
                "",
            ),
        );
        let output = std::process::Command::new(BIN)
            .args(["--config", &path, "--check"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("[egress]: ") && stderr.contains(says),
            "{stderr}"
        );
        assert!(stderr.contains("proxy-basic"), "{stderr}");
        assert!(!stderr.contains(PROXY_PASSWORD), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_cache_is_never_reached_through_the_proxy() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok-cached", 3600) }).await;
    let upstream = serve(echo).await;
    let redis = tokio::task::block_in_place(support::redis::Redis::start);
    let proxy = tinyproxy();
    let dir = tempfile::tempdir().unwrap();
    // 32 bytes, base64, as `openssl rand -base64 32` writes them.
    std::fs::write(
        dir.path().join("cache-key"),
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n",
    )
    .unwrap();
    let mut text = config(
        &format!("proxy = \"{}\"", proxy.url()),
        &upstream.url("/"),
        &endpoint.url("/token"),
        "",
    );
    text.push_str(&format!(
        "\n[cache]\nbackend = \"redis\"\nurl = \"{}\"\nkey_file = \"cache-key\"\ntimeout = \"2s\"\n",
        redis.url()
    ));
    let path = write_config(dir.path(), &text);
    let daemon = start(&path);
    let listen = tokio::task::block_in_place(|| daemon.listen_addr("api"));
    let seen = get(&format!("http://{listen}/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer tok-cached"));
    // The token reached Redis, directly: the proxy was asked for the endpoint and the
    // upstream only.
    let deadline = Instant::now() + PATIENCE;
    while tokio::task::block_in_place(|| redis.keys("bearerd:token:*")).is_empty() {
        assert!(Instant::now() < deadline, "no token stored in Redis");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut requests = proxy.requests();
    requests.sort();
    let mut expected = vec![
        format!("CONNECT {} HTTP/1.1", endpoint.server.addr),
        format!("CONNECT {} HTTP/1.1", upstream.addr),
    ];
    expected.sort();
    assert_eq!(requests, expected, "Redis is at {}", redis.addr());
}

/// A forward listener intercepting `api.payments.test`, with `passthrough` to `target`, and
/// `[egress]`'s `egress` lines; its token endpoint is `token` (put it in `no_proxy` to keep it
/// out of the proxy's log).
fn passthrough_config(egress: &str, target: SocketAddr, token: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[egress]
{egress}

[[listener]]
listen = "127.0.0.1:0"
mode = "forward"

[listener.intercept]
ca_cert_file = "ca.pem"
ca_key_file = "ca.key"
passthrough = ["{target}"]

[[listener.route]]
name = "payments"
host = "api.payments.test"
url = "http://127.0.0.1:9/"
allow_plain_http = true

[listener.route.token]
url = "{token}"
client_id = "abc"
client_secret_file = "secret"
"#
    )
}

/// A TCP peer that answers each read with the same bytes upper-cased.
fn upper_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buffer = [0_u8; 256];
                while let Ok(read @ 1..) = stream.read(&mut buffer) {
                    if stream
                        .write_all(&buffer[..read].to_ascii_uppercase())
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `CONNECT target` to `listen` and reads the answer: the stream (the tunnel, after a
/// 200), the status and the body.
fn app_connect(listen: SocketAddr, target: SocketAddr) -> (TcpStream, u16, String) {
    let mut stream = TcpStream::connect(listen).unwrap();
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .unwrap();
    // Byte by byte up to the end of the head: what follows a 200 is the tunnel's.
    let mut head = Vec::new();
    let mut byte = [0_u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8(head).unwrap();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length = head
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .and_then(|n| n.trim().parse::<usize>().ok())
        })
        .unwrap_or(0);
    let mut body = vec![0_u8; length];
    stream.read_exact(&mut body).unwrap();
    (stream, status, String::from_utf8(body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_tunnel_goes_through_the_egress_proxy() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let peer = upper_echo();
    let proxy = tinyproxy();
    let dir = tempfile::tempdir().unwrap();
    let token_url = format!("http://localhost:{}/token", endpoint.server.addr.port());
    let path = write_config(
        dir.path(),
        &passthrough_config(
            &format!("proxy = \"{}\"\nno_proxy = [\"localhost\"]", proxy.url()),
            peer,
            &token_url,
        ),
    );
    let daemon = start(&path);
    let listen = tokio::task::block_in_place(|| daemon.listen_addr("payments"));
    tokio::task::block_in_place(|| {
        let (mut tunnel, status, body) = app_connect(listen, peer);
        assert_eq!(status, 200, "{body}");
        tunnel.write_all(b"through the proxy").unwrap();
        let mut answer = [0_u8; 17];
        tunnel.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"THROUGH THE PROXY");
        // tinyproxy logs the CONNECT as it opens the tunnel, before any byte goes through.
        assert_eq!(
            proxy.requests(),
            vec![format!("CONNECT {peer} HTTP/1.1")],
            "bearerd's tunnel, and nothing else, went through the proxy"
        );
    });
    assert_eq!(
        metric(
            &daemon,
            r#"bearerd_intercept_tunnels_total{listener="payments",outcome="passthrough"}"#
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_target_the_proxy_refuses_gets_a_502_and_no_tunnel() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let peer = upper_echo();
    // tinyproxy allows CONNECT to port 443 only: it answers 403 for the peer's port.
    let proxy = tokio::task::block_in_place(|| {
        Tinyproxy::start(&Settings {
            connect_ports: vec![443],
            ..Settings::default()
        })
    });
    let dir = tempfile::tempdir().unwrap();
    let token_url = format!("http://localhost:{}/token", endpoint.server.addr.port());
    let path = write_config(
        dir.path(),
        &passthrough_config(
            &format!("proxy = \"{}\"\nno_proxy = [\"localhost\"]", proxy.url()),
            peer,
            &token_url,
        ),
    );
    let daemon = start(&path);
    let listen = tokio::task::block_in_place(|| daemon.listen_addr("payments"));
    let (status, body) = tokio::task::block_in_place(|| {
        let (_, status, body) = app_connect(listen, peer);
        (status, body)
    });
    assert_eq!(status, 502, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "passthrough_unreachable");
    let detail = json["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!(
            "the proxy 127.0.0.1:{} answered CONNECT {peer} with 403 Forbidden",
            proxy.port
        )),
        "{detail}"
    );
    assert_eq!(
        metric(
            &daemon,
            r#"bearerd_intercept_tunnels_total{listener="payments",outcome="passthrough_unreachable"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &daemon,
            r#"bearerd_intercept_tunnels_total{listener="payments",outcome="passthrough"}"#
        )
        .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_target_in_no_proxy_is_reached_directly() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let peer = upper_echo();
    let proxy = tinyproxy();
    let dir = tempfile::tempdir().unwrap();
    let token_url = format!("http://localhost:{}/token", endpoint.server.addr.port());
    let path = write_config(
        dir.path(),
        &passthrough_config(
            &format!(
                "proxy = \"{}\"\nno_proxy = [\"localhost\", \"127.0.0.0/8\"]",
                proxy.url()
            ),
            peer,
            &token_url,
        ),
    );
    let daemon = start(&path);
    let listen = tokio::task::block_in_place(|| daemon.listen_addr("payments"));
    tokio::task::block_in_place(|| {
        let (mut tunnel, status, body) = app_connect(listen, peer);
        assert_eq!(status, 200, "{body}");
        tunnel.write_all(b"direct").unwrap();
        let mut answer = [0_u8; 6];
        tunnel.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"DIRECT");
        // A request of the test's own, after bearerd's: once the proxy has logged it, it
        // would have logged any of bearerd's before it.
        let mut marker = TcpStream::connect(proxy.addr()).unwrap();
        marker
            .write_all(b"CONNECT marker.invalid:1 HTTP/1.1\r\nHost: marker.invalid:1\r\n\r\n")
            .unwrap();
        proxy.wait_for_request("marker.invalid");
    });
    assert_eq!(
        proxy.requests(),
        vec!["CONNECT marker.invalid:1 HTTP/1.1".to_owned()]
    );
}
