//! bearerd between a real WebSocket client and server (Python `websockets`,
//! `tests/interop/ws_peer.py`): the server checks bearerd's token on the handshake, messages
//! are echoed through the tunnel, a refused handshake comes back as the server answered it,
//! the tunnel is counted in the metrics; and a WebSocket over HTTP/2 (RFC 8441) from the `h2`
//! package's client, which `websockets` does not speak. Ignored by a plain `cargo test`:
//! `make interop` makes the virtualenv and sets `BEARERD_INTEROP_PYTHON`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::{peer, support};

use support::{token_endpoint, token_ok, Sidecar};

const TOKEN: &str = "ws-token-1";
const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/ws_peer.py");

/// Runs the peer script as a client with `args` and parses its JSON line.
async fn peer(args: Vec<String>) -> serde_json::Value {
    peer::run(PEER, args).await
}

async fn sidecar(server: &peer::Server, tokens: &support::TokenEndpoint) -> Sidecar {
    Sidecar::start(&format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[upstream]]
name = "ws"
listen = "127.0.0.1:0"
url = "http://127.0.0.1:{}"

[upstream.token]
url = "{}"
client_id = "app"
client_secret = "s3cret"
"#,
        server.port,
        tokens.url("/oauth/token")
    ))
    .await
}

async fn scrape(sidecar: &Sidecar) -> String {
    let admin = sidecar.running().admin_addr();
    let scrape = support::get(&format!("http://{admin}/metrics")).await;
    String::from_utf8_lossy(&scrape.body).into_owned()
}

/// Waits until `bearerd_upgraded_connections_open` of `ws` is 0. Called once the client has
/// exited (its connection closed): bearerd's tunnel task ends a moment after the last byte it
/// passed on, so the gauge is looked at until then, within a bound.
async fn wait_until_none_open(sidecar: &Sidecar) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let scrape = scrape(sidecar).await;
        let open = support::metric(
            &scrape,
            r#"bearerd_upgraded_connections_open{upstream="ws"}"#,
        );
        if open == Some(0.0) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tunnel is still counted open:\n{scrape}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs websockets: make interop"]
async fn a_websocket_client_and_server_talk_through_bearerd_with_its_token() {
    let server = peer::Server::start(PEER, TOKEN);
    let tokens = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let sidecar = sidecar(&server, &tokens).await;
    let addr = sidecar.running().local_addr("ws").unwrap();

    // The app's client sends no token: the server's check passes on bearerd's alone.
    let got = peer(vec![
        "client".into(),
        format!("ws://{addr}/chat"),
        "hello".into(),
        "über".into(),
    ])
    .await;
    assert_eq!(
        got["replies"],
        serde_json::json!(["echo:hello", "echo:über"])
    );

    let scrape = scrape(&sidecar).await;
    let value = |series: &str| support::metric(&scrape, series);
    assert_eq!(
        value(r#"bearerd_upgraded_connections_total{upstream="ws"}"#),
        Some(1.0)
    );
    for direction in ["to_upstream", "to_app"] {
        let bytes = value(&format!(
            r#"bearerd_upgraded_bytes_total{{direction="{direction}",upstream="ws"}}"#
        ))
        .unwrap();
        assert!(bytes > 0.0, "{direction}: {bytes}");
    }
    assert_eq!(
        value(r#"bearerd_requests_total{code="101",upstream="ws"}"#),
        Some(1.0)
    );
    // The client closed (the closing handshake, then TCP) and exited: no tunnel is open.
    wait_until_none_open(&sidecar).await;

    // The server closes first ("bye"): the client sees the close, and no tunnel is open.
    let got = peer(vec![
        "client".into(),
        format!("ws://{addr}/chat"),
        "again".into(),
        "bye".into(),
    ])
    .await;
    assert_eq!(got["replies"], serde_json::json!(["echo:again"]));
    assert_eq!(got["closed_by_server"], 1000);
    wait_until_none_open(&sidecar).await;
    let scrape = self::scrape(&sidecar).await;
    assert_eq!(
        support::metric(
            &scrape,
            r#"bearerd_upgraded_connections_total{upstream="ws"}"#
        ),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs websockets: make interop"]
async fn a_refused_handshake_comes_back_as_the_server_answered_it() {
    let server = peer::Server::start(PEER, TOKEN);
    let tokens = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let sidecar = sidecar(&server, &tokens).await;
    let addr = sidecar.running().local_addr("ws").unwrap();
    let got = peer(vec![
        "client".into(),
        format!("ws://{addr}/refuse"),
        "x".into(),
    ])
    .await;
    assert_eq!(got["refused"], 403);
    assert_eq!(got["body"], "refused by the server\n");

    // A token the server does not take: its 401 passes back too.
    let wrong = token_endpoint(|_, _| async { token_ok("not-the-token", 3600) }).await;
    let sidecar = self::sidecar(&server, &wrong).await;
    let addr = sidecar.running().local_addr("ws").unwrap();
    let got = peer(vec![
        "client".into(),
        format!("ws://{addr}/chat"),
        "x".into(),
    ])
    .await;
    assert_eq!(got["refused"], 401);
    let scrape = scrape(&sidecar).await;
    assert_eq!(
        support::metric(
            &scrape,
            r#"bearerd_upgraded_connections_total{upstream="ws"}"#
        ),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs websockets and h2: make interop"]
async fn a_websocket_over_http2_reaches_the_websockets_server() {
    let server = peer::Server::start(PEER, TOKEN);
    let tokens = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let sidecar = sidecar(&server, &tokens).await;
    let addr = sidecar.running().local_addr("ws").unwrap();
    let got = peer(vec![
        "h2client".into(),
        addr.ip().to_string(),
        addr.port().to_string(),
        "/chat".into(),
        "over-h2".into(),
    ])
    .await;
    assert_eq!(got["settings_connect"], 1, "{got}");
    assert_eq!(got["status"], 200, "{got}");
    assert_eq!(got["reply"], "echo:over-h2", "{got}");
}
