//! Reloading the config in place: what changes, what keeps running, and what a bad config
//! leaves alone.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use http::StatusCode;
use support::config::{ConfigBuilder, Server, Tls, Token, Upstream};
use support::{echo, get, serve, token_endpoint, token_ok, Sidecar};

/// The upstream `name` at `url`, listening on 127.0.0.1:0, client `app` of `token_url`.
fn upstream_block(name: &str, url: &str, token_url: &str) -> Upstream {
    Upstream::new(name, url).token(app(token_url))
}

/// The client `app` with the secret `pw`.
fn app(token_url: &str) -> Token {
    Token::new(token_url, "app").secret("pw")
}

/// A config of `upstreams` (and `[admin]` on port 0).
fn with_admin(upstreams: &[Upstream]) -> String {
    upstreams
        .iter()
        .fold(ConfigBuilder::new(), |config, u| config.upstream(u.clone()))
        .render()
}

fn load(sidecar: &Sidecar, text: &str) -> bearerd::config::Config {
    let path = sidecar.file("bearerd.toml");
    std::fs::write(&path, text).unwrap();
    bearerd::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn reload_changes_routes_keeps_unchanged_tokens_and_adds_listeners() {
    let endpoint = token_endpoint(|n, _| async move { token_ok(&format!("tok-{n}"), 3600) }).await;
    let upstream = serve(echo).await;
    let token_url = endpoint.url("/token");
    let mut sidecar = Sidecar::start(&with_admin(&[upstream_block(
        "a",
        &upstream.url("/v1"),
        &token_url,
    )]))
    .await;
    let a = sidecar.running().local_addr("a").unwrap();
    assert_eq!(get(&sidecar.url("a", "/x")).await.echo().uri, "/v1/x");

    // a moves to /v2 (same token settings); b is added with the same token settings too.
    let config = load(
        &sidecar,
        &with_admin(&[
            upstream_block("a", &upstream.url("/v2"), &token_url),
            upstream_block("b", &upstream.url("/b"), &token_url),
        ]),
    );
    sidecar
        .running
        .as_mut()
        .unwrap()
        .reload(&config)
        .await
        .unwrap();

    assert_eq!(sidecar.running().local_addr("a"), Some(a), "same listener");
    let echoed = get(&sidecar.url("a", "/x")).await.echo();
    assert_eq!(echoed.uri, "/v2/x");
    assert_eq!(
        echoed.header("authorization"),
        Some("Bearer tok-0"),
        "token kept"
    );
    let echoed = get(&sidecar.url("b", "/y")).await.echo();
    assert_eq!(echoed.uri, "/b/y");
    assert_eq!(
        echoed.header("authorization"),
        Some("Bearer tok-0"),
        "token shared"
    );
    assert_eq!(endpoint.count(), 1);

    // Changed token settings make a new source, and so a new token.
    let config = load(
        &sidecar,
        &with_admin(&[upstream_block("a", &upstream.url("/v2"), &token_url)
            .token(app(&token_url).scope("more"))]),
    );
    sidecar
        .running
        .as_mut()
        .unwrap()
        .reload(&config)
        .await
        .unwrap();
    assert_eq!(
        get(&sidecar.url("a", "/x"))
            .await
            .echo()
            .header("authorization"),
        Some("Bearer tok-1")
    );
    assert_eq!(sidecar.running().local_addr("b"), None, "b removed");
    let scrape = sidecar.running().metrics().render().unwrap();
    assert!(
        !scrape.contains(r#"upstream="b""#),
        "b's series are gone:\n{scrape}"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn removed_listener_drains_its_request_in_flight() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = support::Holding::start().await;
    let token_url = endpoint.url("/token");
    let keep = upstream_block("keep", &upstream.url(""), &token_url);
    let mut sidecar = Sidecar::start(&with_admin(&[
        keep.clone(),
        upstream_block("gone", &upstream.url(""), &token_url),
    ]))
    .await;
    let gone = sidecar.running().local_addr("gone").unwrap();
    let in_flight = tokio::spawn(support::get_owned(format!("http://{gone}/slow")));
    upstream.arrived().await;

    let config = load(&sidecar, &with_admin(&[keep]));
    sidecar
        .running
        .as_mut()
        .unwrap()
        .reload(&config)
        .await
        .unwrap();
    // The listener closes at once; its request in flight carries on.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while tokio::net::TcpStream::connect(gone).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "removed listener still accepts"
        );
        tokio::task::yield_now().await;
    }
    assert!(!in_flight.is_finished());
    upstream.release();
    assert_eq!(in_flight.await.unwrap().status, StatusCode::OK);
    sidecar.stop().await;
}

#[tokio::test]
async fn a_reload_that_cannot_apply_keeps_the_running_config() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = serve(echo).await;
    let token_url = endpoint.url("/token");
    let mut sidecar = Sidecar::start(&with_admin(&[upstream_block(
        "a",
        &upstream.url("/v1"),
        &token_url,
    )]))
    .await;

    // A missing CA file, and a listen address another socket holds.
    let moved = upstream_block("a", &upstream.url("/v2"), &token_url);
    let bad_ca = moved.clone().tls(Tls::new().ca_file("missing.pem"));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bad_listen = upstream_block("b", &upstream.url("/b"), &token_url)
        .listen(&taken.local_addr().unwrap().to_string());
    for (bad, expected) in [
        (with_admin(&[bad_ca]), "missing.pem"),
        (with_admin(&[moved, bad_listen]), "cannot listen on"),
    ] {
        let config = load(&sidecar, &bad);
        let error = sidecar
            .running
            .as_mut()
            .unwrap()
            .reload(&config)
            .await
            .unwrap_err();
        assert!(error.to_string().contains(expected), "{error}");
        assert_eq!(get(&sidecar.url("a", "/x")).await.echo().uri, "/v1/x");
        assert_eq!(sidecar.running().local_addr("b"), None);
    }
    assert_eq!(endpoint.count(), 1);
    sidecar.stop().await;
}

#[tokio::test]
async fn server_settings_stay_as_they_run_until_a_restart() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = serve(echo).await;
    let token_url = endpoint.url("/token");
    let a = upstream_block("a", &upstream.url(""), &token_url);
    let mut sidecar = Sidecar::start(
        &ConfigBuilder::new()
            .server(Server::new().max_connections(1))
            .upstream(a.clone())
            .render(),
    )
    .await;

    // The reload asks for more connections and adds a listener: the new listener still gets
    // the running limit of one connection.
    let b = upstream_block("b", &upstream.url(""), &token_url);
    let config = load(
        &sidecar,
        &ConfigBuilder::new()
            .server(Server::new().max_connections(100))
            .upstream(a)
            .upstream(b)
            .render(),
    );
    sidecar
        .running
        .as_mut()
        .unwrap()
        .reload(&config)
        .await
        .unwrap();
    let addr = sidecar.running().local_addr("b").unwrap();
    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    first
        .write_all(b"GET /x HTTP/1.1\r\nhost: app\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    first.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut answer = Vec::new();
    second.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    sidecar.stop().await;
}
