//! TLS interception on a forward listener (issue 24): CONNECT to a routed host is answered
//! with TLS from bearerd's name-constrained CA, and the requests inside are forwarded with the
//! token, over HTTP/1.1 or HTTP/2 as ALPN chose; other CONNECTs are refused with 403 and open
//! nothing; a request for another host inside a tunnel gets 421; a handshake for another name
//! fails without a certificate being minted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use support::config::{ConfigBuilder, Listener, Route, Table, Token};
use support::{echo, metric, serve, token_endpoint, token_ok, Echo, Sidecar};

const TOKEN: &str = "intercepted-token";
const HOST: &str = "api.payments.test";

/// The config of a forward listener intercepting `hosts` (each a route to `upstream_url`), its
/// CA in `ca.pem` and `ca.key` beside the config.
fn config(upstream_url: &str, token_url: &str, hosts: &[&str]) -> String {
    let mut listener = Listener::new("forward").table(
        "intercept",
        Table::new()
            .set("ca_cert_file", "\"ca.pem\"")
            .set("ca_key_file", "\"ca.key\"")
            .set("ca_bundle_file", "\"ca-bundle.pem\"")
            .set("handshake_timeout", "\"2s\""),
    );
    for (i, host) in hosts.iter().enumerate() {
        let name = if i == 0 {
            "payments".to_owned()
        } else {
            format!("r{i}")
        };
        listener = listener.route(
            Route::named(&name)
                .host(host)
                .url(upstream_url)
                .allow_plain_http(true)
                .token(Token::new(token_url, "app").secret("pw")),
        );
    }
    ConfigBuilder::new().listener(listener).render()
}

/// bearerd with a forward listener intercepting `api.payments.test`, whose route goes to a
/// plain-HTTP echo upstream; the CA is created by the start in the sidecar's directory.
async fn sidecar() -> (
    Sidecar,
    SocketAddr,
    (support::Server, support::TokenEndpoint),
) {
    let upstream = serve(echo).await;
    let endpoint = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let config = config(&upstream.url(""), &endpoint.url("/token"), &[HOST]);
    let sidecar = Sidecar::start(&config).await;
    let addr = sidecar.running().local_addr("payments").unwrap();
    (sidecar, addr, (upstream, endpoint))
}

/// Sends `CONNECT target` and reads the answer's head (and body, when it says how long).
async fn connect(addr: SocketAddr, target: &str) -> (TcpStream, u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    // Byte by byte up to the end of the head: what follows a 200 is the tunnel's.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
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
                .map(str::to_owned)
        })
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (stream, status, String::from_utf8(body).unwrap())
}

/// TLS over `stream` to `name`, trusting only the CA at `ca`, offering `alpn`.
async fn tls<IO: AsyncRead + AsyncWrite + Unpin>(
    stream: IO,
    ca: &std::path::Path,
    name: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<IO>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(name.to_owned()).unwrap();
    connector.connect(name, stream).await
}

/// `GET path` with `Host: host` over an HTTP/1.1 connection on `io`.
async fn get_http1<IO>(io: TlsStream<IO>, host: &str, path: &str) -> (StatusCode, Bytes)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

#[tokio::test]
async fn a_routed_host_is_intercepted_and_its_requests_carry_the_token_over_http1() {
    let (sidecar, addr, _upstream) = sidecar().await;
    let ca = sidecar.file("ca.pem");
    assert!(ca.exists(), "the start created the CA");
    let bundle = std::fs::read_to_string(sidecar.file("ca-bundle.pem")).unwrap();
    assert!(bundle.ends_with(&std::fs::read_to_string(&ca).unwrap()));

    let (stream, status, _) = connect(addr, &format!("{HOST}:443")).await;
    assert_eq!(status, 200);
    let tls = tls(stream, &ca, HOST, &[b"http/1.1"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, body) = get_http1(tls, HOST, "/v1/charges?x=1").await;
    assert_eq!(status, StatusCode::OK);
    let echo: Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        echo.header("authorization"),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(echo.uri, "/v1/charges?x=1");

    let scrape = sidecar.running().metrics().render().unwrap();
    let series = |name: &str| metric(&scrape, name).unwrap_or(0.0);
    assert_eq!(
        series("bearerd_intercept_tunnels_total{listener=\"payments\",outcome=\"intercepted\"}"),
        1.0
    );
    assert_eq!(
        series("bearerd_intercept_certificates_issued_total{listener=\"payments\"}"),
        1.0
    );
    sidecar.stop().await;
}

/// Handshakes for a host with no leaf yet, all at once: one leaf is minted (on the blocking
/// pool), the others wait for it, and every one of them gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tunnels_to_a_new_host_mint_one_leaf() {
    const TUNNELS: usize = 12;
    let (sidecar, addr, _upstream) = sidecar().await;
    let ca = sidecar.file("ca.pem");
    // Every tunnel open first, so that the handshakes start together.
    let mut streams = Vec::new();
    for _ in 0..TUNNELS {
        let (stream, status, _) = connect(addr, &format!("{HOST}:443")).await;
        assert_eq!(status, 200);
        streams.push(stream);
    }
    let handshakes = streams.into_iter().map(|stream| {
        let ca = ca.clone();
        tokio::spawn(async move {
            let tls = tls(stream, &ca, HOST, &[b"http/1.1"]).await.unwrap();
            let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            let (status, _) = get_http1(tls, HOST, "/v1").await;
            assert_eq!(status, StatusCode::OK);
            leaf
        })
    });
    let mut leaves = Vec::new();
    for handshake in handshakes.collect::<Vec<_>>() {
        leaves.push(handshake.await.unwrap());
    }
    assert!(
        leaves.iter().all(|leaf| *leaf == leaves[0]),
        "one leaf for all"
    );
    let scrape = sidecar.running().metrics().render().unwrap();
    assert_eq!(
        metric(
            &scrape,
            "bearerd_intercept_certificates_issued_total{listener=\"payments\"}"
        ),
        Some(1.0)
    );
    sidecar.stop().await;
}

/// A CONNECT stream (RFC 9113 §8.5: `:method CONNECT`, `:authority`, no `:scheme` or
/// `:path`) to `target`.
fn connect_stream(target: &str) -> Request<Empty<Bytes>> {
    Request::connect(target)
        .version(http::Version::HTTP_2)
        .body(Empty::new())
        .unwrap()
}

/// CONNECT over HTTP/2 (an app speaking h2c to the listener) gets what it gets over
/// HTTP/1.1: 403 for a host without a route, 200 and a tunnel for a routed host, TLS inside
/// the stream and the token on the requests inside; several tunnels share one connection. An
/// extended CONNECT (RFC 8441, `:protocol`) is not a tunnel: it stays the WebSocket path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_over_http2_is_answered_as_over_http1() {
    let (sidecar, addr, _upstream) = sidecar().await;
    let ca = sidecar.file("ca.pem");
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);

    let refused = sender
        .send_request(connect_stream("other.payments.test:443"))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(refused.headers().get("connection").is_none());
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "tunnel_refused");

    // Two tunnels on the one connection: HTTP/1.1 inside the first, HTTP/2 inside the second.
    let mut tunnels = Vec::new();
    for _ in 0..2 {
        let response = sender
            .send_request(connect_stream(&format!("{HOST}:443")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        tunnels.push(hyper::upgrade::on(response).await.unwrap());
    }
    let second = tunnels.pop().unwrap();
    let first = tunnels.pop().unwrap();
    let inside = tls(TokioIo::new(first), &ca, HOST, &[b"http/1.1"])
        .await
        .unwrap();
    let (status, body) = get_http1(inside, HOST, "/v1/charges").await;
    assert_eq!(status, StatusCode::OK);
    let echo: Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        echo.header("authorization"),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(echo.uri, "/v1/charges");
    let inside = tls(TokioIo::new(second), &ca, HOST, &[b"h2"])
        .await
        .unwrap();
    assert_eq!(inside.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut inner, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(inside))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = inner
        .send_request(
            Request::get(format!("https://{HOST}/v2"))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let echo: Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        echo.header("authorization"),
        Some(&*format!("Bearer {TOKEN}"))
    );

    // An extended CONNECT for a WebSocket goes to the route as the HTTP/1.1 handshake; the
    // echo upstream answers 200 rather than 101, which bearerd reports as such.
    let mut websocket = Request::connect(format!("http://{HOST}/socket"))
        .version(http::Version::HTTP_2)
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())
        .unwrap();
    websocket
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = sender.send_request(websocket).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        json["detail"]
            .as_str()
            .unwrap()
            .contains("instead of switching protocols"),
        "{json}"
    );

    let scrape = sidecar.running().metrics().render().unwrap();
    let series = |name: &str| metric(&scrape, name).unwrap_or(0.0);
    assert_eq!(
        series("bearerd_intercept_tunnels_total{listener=\"payments\",outcome=\"intercepted\"}"),
        2.0
    );
    assert_eq!(
        series(
            "bearerd_intercept_tunnels_total{listener=\"payments\",outcome=\"refused_not_served\"}"
        ),
        1.0
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn http2_is_chosen_by_alpn_inside_the_tunnel() {
    let (sidecar, addr, _upstream) = sidecar().await;
    let (stream, status, _) = connect(addr, &format!("{HOST}:443")).await;
    assert_eq!(status, 200);
    let tls = tls(stream, &sidecar.file("ca.pem"), HOST, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    for path in ["/one", "/two"] {
        let request = Request::get(format!("https://{HOST}{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let echo: Echo = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            echo.header("authorization"),
            Some(&*format!("Bearer {TOKEN}"))
        );
        assert_eq!(echo.uri, path);
    }
    // `:authority` for another host on the same tunnel: 421.
    let request = Request::get("https://other.payments.test/one")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    sidecar.stop().await;
}

#[tokio::test]
async fn a_request_for_another_host_inside_the_tunnel_is_misdirected() {
    let (sidecar, addr, _upstream) = sidecar().await;
    let (stream, _, _) = connect(addr, &format!("{HOST}:443")).await;
    let tls = tls(stream, &sidecar.file("ca.pem"), HOST, &[b"http/1.1"])
        .await
        .unwrap();
    let (status, body) = get_http1(tls, "other.payments.test", "/").await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "misdirected_request");
    assert!(!String::from_utf8_lossy(&body).contains(TOKEN));
    sidecar.stop().await;
}

#[tokio::test]
async fn connect_to_anything_but_a_routed_host_on_443_is_refused_and_opens_nothing() {
    let (sidecar, addr, _upstream) = sidecar().await;
    for target in [
        "other.example:443",
        &format!("{HOST}:8443"),
        "127.0.0.1:443",
        &addr.to_string(),
    ] {
        let (mut stream, status, body) = connect(addr, target).await;
        assert_eq!(status, 403, "{target}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"], "tunnel_refused", "{target}");
        // Nothing was opened: the connection is still HTTP (another request is answered).
        stream
            .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 403");
    }
    let (_, status, _) = connect(addr, "no-port.example").await;
    assert_eq!(status, 400);
    let scrape = sidecar.running().metrics().render().unwrap();
    assert_eq!(
        metric(
            &scrape,
            "bearerd_intercept_tunnels_total{listener=\"payments\",outcome=\"refused_not_served\"}"
        ),
        Some(8.0)
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn a_handshake_for_another_name_or_garbage_fails_without_a_certificate() {
    let (sidecar, addr, _upstream) = sidecar().await;
    let ca = sidecar.file("ca.pem");
    // SNI that differs from the CONNECT's target: no leaf is minted for it (or for the target).
    let (stream, status, _) = connect(addr, &format!("{HOST}:443")).await;
    assert_eq!(status, 200);
    assert!(tls(stream, &ca, "evil.payments.test", &[b"http/1.1"])
        .await
        .is_err());
    // Bytes that are not TLS.
    let (mut stream, status, _) = connect(addr, &format!("{HOST}:443")).await;
    assert_eq!(status, 200);
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: api.payments.test\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    assert!(!String::from_utf8_lossy(&rest).contains(TOKEN));

    let scrape = sidecar.running().metrics().render().unwrap();
    let series = |name: &str| metric(&scrape, name).unwrap_or(0.0);
    assert_eq!(
        series("bearerd_intercept_certificates_issued_total{listener=\"payments\"}"),
        0.0
    );
    assert_eq!(series("bearerd_intercept_handshake_failures_total{listener=\"payments\",reason=\"sni_mismatch\"}"), 1.0);
    assert_eq!(series("bearerd_intercept_handshake_failures_total{listener=\"payments\",reason=\"tls_error\"}"), 1.0);
    sidecar.stop().await;
}

#[tokio::test]
async fn plain_http_absolute_form_keeps_working_on_the_intercepting_listener() {
    let (sidecar, addr, _upstream) = sidecar().await;
    let answer = support::raw::exchange(
        addr,
        format!("GET http://{HOST}/plain HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(support::raw::status_of(&answer), 200, "{answer}");
    assert!(answer.contains(&format!("Bearer {TOKEN}")));
    sidecar.stop().await;
}

#[tokio::test]
async fn check_says_it_would_create_the_ca_then_describes_it_and_a_reload_cannot_widen_it() {
    let dir = tempfile::tempdir().unwrap();
    let text = config("http://127.0.0.1:9", "http://127.0.0.1:9/token", &[HOST]);
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, &text).unwrap();
    let loaded = bearerd::config::Config::load(&path).unwrap();
    let out = bearerd::check::check(&loaded).unwrap_or_else(|p| panic!("{p:?}"));
    assert!(out.contains("a start would create"), "{out}");
    assert!(!dir.path().join("ca.pem").exists() && !dir.path().join("ca.key").exists());

    let mut sidecar = Sidecar::start_in(dir, &text).await;
    let out = bearerd::check::check(&loaded).unwrap_or_else(|p| panic!("{p:?}"));
    assert!(out.contains("SHA-256 fingerprint"), "{out}");
    assert!(
        out.contains(&format!(
            "critical, permitted: {HOST}; excluded: 0.0.0.0/0, ::/0"
        )),
        "{out}"
    );
    assert!(out.contains("names every routed host"), "{out}");
    assert!(!out.contains("PRIVATE KEY"));

    // A route for a host the CA cannot name: --check says so, and a reload is refused.
    let wider = config(
        "http://127.0.0.1:9",
        "http://127.0.0.1:9/token",
        &[HOST, "new.example"],
    );
    std::fs::write(&path, &wider).unwrap();
    let wider = bearerd::config::Config::load(&path).unwrap();
    let problems = bearerd::check::check(&wider).unwrap_err().join("\n");
    assert!(problems.contains("cannot name new.example"), "{problems}");
    let refused = sidecar
        .running
        .as_mut()
        .unwrap()
        .reload(&wider)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("cannot name new.example"), "{refused}");
    sidecar.stop().await;
}

/// Runs `program` with `args` (and `env`) off the runtime's threads; its status and output.
async fn run(
    program: &str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
) -> (bool, String, String) {
    let program = program.to_owned();
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(&program)
            .args(&args)
            .envs(env)
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// curl, a client nobody here wrote: `-x` and `--cacert`, over HTTP/1.1 and over HTTP/2 (its
/// ALPN choice), and with `HTTPS_PROXY` instead of `-x`; a host without a route is refused at
/// the CONNECT.
#[tokio::test]
async fn curl_through_the_proxy_trusting_the_ca_gets_its_answer_with_the_token() {
    let (sidecar, addr, _upstream) = sidecar().await;
    let ca = sidecar.file("ca.pem").display().to_string();
    for (version, expected) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (ok, out, err) = run(
            "curl",
            vec![
                "-sS".into(),
                "-x".into(),
                format!("http://{addr}"),
                "--cacert".into(),
                ca.clone(),
                version.into(),
                "-w".into(),
                "\n%{http_version}".into(),
                format!("https://{HOST}/via/curl?x=1"),
            ],
            vec![],
        )
        .await;
        assert!(ok, "curl {version}: {err}");
        let (body, used) = out.rsplit_once('\n').unwrap();
        assert_eq!(used, expected, "curl {version}");
        let echo: Echo = serde_json::from_str(body).unwrap();
        assert_eq!(
            echo.header("authorization"),
            Some(&*format!("Bearer {TOKEN}"))
        );
        assert_eq!(echo.uri, "/via/curl?x=1");
    }
    let (ok, out, err) = run(
        "curl",
        vec![
            "-sS".into(),
            "--cacert".into(),
            ca.clone(),
            format!("https://{HOST}/via/env"),
        ],
        vec![("HTTPS_PROXY", format!("http://{addr}"))],
    )
    .await;
    assert!(ok, "curl with HTTPS_PROXY: {err}");
    assert!(out.contains(&format!("Bearer {TOKEN}")), "{out}");
    // Not routed: the CONNECT is answered 403, and curl never gets to TLS.
    let (ok, out, _) = run(
        "curl",
        vec![
            "-sS".into(),
            "-x".into(),
            format!("http://{addr}"),
            "--cacert".into(),
            ca,
            "-w".into(),
            "%{http_connect}".into(),
            "https://unrouted.example/".into(),
        ],
        vec![],
    )
    .await;
    assert!(!ok);
    assert_eq!(out, "403");
    sidecar.stop().await;
}

/// `openssl s_client -proxy`: the chain bearerd presents verifies against the CA alone; the
/// leaf has one SAN, the routed host; the CA's Name Constraints are critical and permit only
/// that host.
#[tokio::test]
async fn openssl_reads_the_chain_the_san_and_the_name_constraints() {
    let (sidecar, addr, _upstream) = sidecar().await;
    let ca = sidecar.file("ca.pem").display().to_string();
    let (_, out, err) = run(
        "openssl",
        vec![
            "s_client".into(),
            "-proxy".into(),
            addr.to_string(),
            "-connect".into(),
            format!("{HOST}:443"),
            "-servername".into(),
            HOST.into(),
            "-CAfile".into(),
            ca.clone(),
            "-verify_return_error".into(),
            "-verify_hostname".into(),
            HOST.into(),
            "-showcerts".into(),
        ],
        vec![],
    )
    .await;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}\n{err}");
    // The first certificate shown is the leaf.
    let leaf_pem = out
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .and_then(|rest| rest.split("-----END CERTIFICATE-----").next())
        .map(|body| format!("-----BEGIN CERTIFICATE-----{body}-----END CERTIFICATE-----\n"))
        .unwrap();
    let leaf_path = sidecar.file("leaf.pem");
    std::fs::write(&leaf_path, leaf_pem).unwrap();
    let text = |path: String| {
        run(
            "openssl",
            vec![
                "x509".into(),
                "-noout".into(),
                "-text".into(),
                "-in".into(),
                path,
            ],
            vec![],
        )
    };
    let (ok, leaf, err) = text(leaf_path.display().to_string()).await;
    assert!(ok, "{err}");
    let sans: Vec<&str> = leaf
        .lines()
        .skip_while(|l| !l.contains("Subject Alternative Name"))
        .nth(1)
        .unwrap()
        .split(',')
        .map(str::trim)
        .collect();
    assert_eq!(sans, [format!("DNS:{HOST}")]);
    let (ok, ca_text, err) = text(ca).await;
    assert!(ok, "{err}");
    assert!(
        ca_text.contains("X509v3 Name Constraints: critical"),
        "{ca_text}"
    );
    assert!(ca_text.contains(&format!("DNS:{HOST}")), "{ca_text}");
    assert!(ca_text.contains("CA:TRUE, pathlen:0"), "{ca_text}");
    assert!(ca_text.contains("ASN1 OID: prime256v1"), "{ca_text}");
    sidecar.stop().await;
}

/// A `passthrough` target is tunnelled blind: bytes both ways, no TLS from bearerd, no token,
/// over HTTP/1.1 and over an HTTP/2 CONNECT stream alike. One that cannot be reached gets 502
/// and no tunnel.
#[tokio::test]
async fn a_passthrough_target_is_tunnelled_blind() {
    // A TCP peer that answers what it reads, upper-cased: proof the bytes went both ways.
    let peer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = peer.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 5];
                stream.read_exact(&mut buffer).await.unwrap();
                stream
                    .write_all(&buffer.to_ascii_uppercase())
                    .await
                    .unwrap();
            });
        }
    });
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let upstream = serve(echo).await;
    let endpoint = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let config = ConfigBuilder::new()
        .listener(
            Listener::new("forward")
                .table(
                    "intercept",
                    Table::new()
                        .set("ca_cert_file", "\"ca.pem\"")
                        .set("ca_key_file", "\"ca.key\"")
                        .set("passthrough", format!("[\"{peer_addr}\", \"{closed}\"]")),
                )
                .route(
                    Route::named("payments")
                        .host(HOST)
                        .url(&upstream.url(""))
                        .allow_plain_http(true)
                        .token(Token::new(&endpoint.url("/token"), "app").secret("pw")),
                ),
        )
        .render();
    let sidecar = Sidecar::start(&config).await;
    let addr = sidecar.running().local_addr("payments").unwrap();
    let (mut stream, status, _) = connect(addr, &peer_addr.to_string()).await;
    assert_eq!(status, 200);
    stream.write_all(b"hello").await.unwrap();
    let mut answer = [0u8; 5];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HELLO");
    // The app closes its side: the tunnel ends (a blind tunnel outlives a drain otherwise).
    drop(stream);

    // The same over an HTTP/2 CONNECT stream.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(connect_stream(&peer_addr.to_string()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut tunnel = TokioIo::new(hyper::upgrade::on(response).await.unwrap());
    tunnel.write_all(b"h2 ok").await.unwrap();
    tunnel.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"H2 OK");
    drop(tunnel);

    let (_, status, body) = connect(addr, &closed.to_string()).await;
    assert_eq!(status, 502, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "passthrough_unreachable");
    assert!(
        json["detail"].as_str().unwrap().starts_with(&format!(
            "cannot open a tunnel to the passthrough target {closed}"
        )),
        "{json}"
    );

    let scrape = sidecar.running().metrics().render().unwrap();
    assert_eq!(
        metric(
            &scrape,
            "bearerd_intercept_tunnels_total{listener=\"payments\",outcome=\"passthrough\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &scrape,
            "bearerd_intercept_tunnels_total{listener=\"payments\",outcome=\"passthrough_unreachable\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &scrape,
            "bearerd_intercept_certificates_issued_total{listener=\"payments\"}"
        ),
        Some(0.0)
    );
    sidecar.stop().await;
}

/// A tunnel whose client never starts its TLS handshake is closed at `handshake_timeout`
/// (2 s here) and counted; nothing is minted.
#[tokio::test]
async fn a_handshake_that_never_comes_is_closed_and_counted() {
    let (sidecar, addr, _servers) = sidecar().await;
    let (mut stream, status, _) = connect(addr, &format!("{HOST}:443")).await;
    assert_eq!(status, 200);
    // Half a ClientHello's record header, then silence: bearerd waits for the rest until its
    // deadline, then closes (read answers 0 or a reset).
    stream.write_all(&[0x16, 0x03]).await.unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    assert!(
        rest.is_empty(),
        "nothing is sent to a client that never said hello"
    );
    let scrape = sidecar.running().metrics().render().unwrap();
    let series = |name: &str| metric(&scrape, name).unwrap_or(0.0);
    assert_eq!(
        series(
            "bearerd_intercept_handshake_failures_total{listener=\"payments\",reason=\"timeout\"}"
        ),
        1.0
    );
    assert_eq!(
        series("bearerd_intercept_certificates_issued_total{listener=\"payments\"}"),
        0.0
    );
    sidecar.stop().await;
}

/// What the config refuses: interception on a reverse listener (it is never sent CONNECT), a
/// passthrough entry without a port.
#[test]
fn the_config_refuses_interception_it_could_not_do() {
    let intercept = || {
        Table::new()
            .set("ca_cert_file", "\"ca.pem\"")
            .set("ca_key_file", "\"ca.key\"")
    };
    let route = |host: &str| {
        Route::named("r")
            .host(host)
            .url("https://api.example")
            .token(Token::new("https://auth.example/token", "app").secret("pw"))
    };
    for (listener, expected) in [
        (
            Listener::new("reverse")
                .table("intercept", intercept())
                .route(route("api.example")),
            "needs mode = \"forward\"",
        ),
        (
            Listener::new("forward")
                .table(
                    "intercept",
                    intercept().set("passthrough", "[\"objects.example\"]"),
                )
                .route(route("api.example")),
            "is not host:port",
        ),
    ] {
        let text = ConfigBuilder::new().listener(listener).render();
        let error = bearerd::config::Config::parse(std::path::Path::new("t.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{expected}: {error}");
    }
}

/// A CA the operator brings is used as given: one without name constraints is warned about
/// (its key can impersonate any host), and its leaves still verify.
#[tokio::test]
async fn a_brought_ca_without_name_constraints_is_used_and_warned_about() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "operator's CA");
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("ca.key"), key.serialize_pem()).unwrap();
    let upstream = serve(echo).await;
    let endpoint = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let text = config(&upstream.url(""), &endpoint.url("/token"), &[HOST]);
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, &text).unwrap();
    let loaded = bearerd::config::Config::load(&path).unwrap();
    let out = bearerd::check::check(&loaded).unwrap_or_else(|p| panic!("{p:?}"));
    assert!(out.contains("CN=operator's CA"), "{out}");
    assert!(out.contains("name constraints: none"), "{out}");
    assert!(out.contains("WARNING: the CA at"), "{out}");

    let sidecar = Sidecar::start_in(dir, &text).await;
    let addr = sidecar.running().local_addr("payments").unwrap();
    let (stream, status, _) = connect(addr, &format!("{HOST}:443")).await;
    assert_eq!(status, 200);
    let tls = tls(stream, &sidecar.file("ca.pem"), HOST, &[b"http/1.1"])
        .await
        .unwrap();
    let (status, _) = get_http1(tls, HOST, "/").await;
    assert_eq!(status, StatusCode::OK);
    sidecar.stop().await;
}

/// A route whose host names a port (`alt.payments.test:8443`: the port the app dials) is
/// intercepted on that port, and only there; its requests go to the route.
#[tokio::test]
async fn a_route_host_with_a_port_is_intercepted_on_that_port() {
    let upstream = serve(echo).await;
    let endpoint = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let alt = "alt.payments.test:8443";
    let text = config(&upstream.url(""), &endpoint.url("/token"), &[HOST, alt]);
    let sidecar = Sidecar::start(&text).await;
    let addr = sidecar.running().local_addr("payments").unwrap();
    let ca = sidecar.file("ca.pem").display().to_string();
    let (ok, out, err) = run(
        "curl",
        vec![
            "-sS".into(),
            "-x".into(),
            format!("http://{addr}"),
            "--cacert".into(),
            ca,
            format!("https://{alt}/on/8443"),
        ],
        vec![],
    )
    .await;
    assert!(ok, "{err}");
    let echo: Echo = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        echo.header("authorization"),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(echo.uri, "/on/8443");
    for refused in ["alt.payments.test:443", "alt.payments.test:9443"] {
        let (_, status, _) = connect(addr, refused).await;
        assert_eq!(status, 403, "{refused}");
    }
    sidecar.stop().await;
}

#[tokio::test]
async fn an_on_behalf_of_route_takes_the_subject_out_of_an_intercepted_request() {
    let upstream = serve(echo).await;
    let endpoint = token_endpoint(|_, request| async move {
        token_ok(&format!("for-{}", request.form["subject_token"]), 3600)
    })
    .await;
    let listener = Listener::new("forward")
        .table(
            "intercept",
            Table::new()
                .set("ca_cert_file", "\"ca.pem\"")
                .set("ca_key_file", "\"ca.key\"")
                .set("handshake_timeout", "\"2s\""),
        )
        .route(
            Route::named("payments")
                .host(HOST)
                .url(&upstream.url(""))
                .allow_plain_http(true)
                .token(
                    Token::new(&endpoint.url("/token"), "gateway")
                        .secret("pw")
                        .set("grant", "\"token_exchange\"")
                        .set("subject_token_from", "\"header:Authorization\""),
                ),
        );
    let sidecar = Sidecar::start(&ConfigBuilder::new().listener(listener).render()).await;
    let addr = sidecar.running().local_addr("payments").unwrap();
    let (stream, status, _) = connect(addr, &format!("{HOST}:443")).await;
    assert_eq!(status, 200);
    let io = tls(stream, &sidecar.file("ca.pem"), HOST, &[b"http/1.1"])
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get("/v1/charges")
        .header("host", HOST)
        .header("authorization", "Bearer the-callers-token")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let echo: Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        echo.headers["authorization"],
        ["Bearer for-the-callers-token"]
    );
    assert_eq!(
        endpoint.requests()[0].form["subject_token"],
        "the-callers-token"
    );
    sidecar.stop().await;
}
