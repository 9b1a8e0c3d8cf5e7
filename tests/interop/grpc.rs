//! bearerd between a real gRPC client and server (Python grpcio, `tests/interop/grpc_peer.py`):
//! the four kinds of call with metadata and trailers over h2c on both sides, the server
//! checking bearerd's token on every call, and the status codes a gRPC client reads when
//! bearerd cannot serve a call itself. Ignored by a plain `cargo test`: `make interop` makes
//! the virtualenv with grpcio and sets `BEARERD_INTEROP_PYTHON`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::{peer, support};

use support::{token_endpoint, token_ok, Sidecar};

const TOKEN: &str = "grpc-token-1";
const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/grpc_peer.py");

/// Runs the peer script as a client with `args` and parses its JSON line.
async fn peer(args: Vec<String>) -> serde_json::Value {
    peer::run(PEER, args).await
}

fn target(sidecar: &Sidecar, upstream: &str) -> String {
    sidecar.running().local_addr(upstream).unwrap().to_string()
}

fn upstream(name: &str, url: &str, protocol: &str, token_url: &str) -> String {
    format!(
        r#"
[[upstream]]
name = "{name}"
listen = "127.0.0.1:0"
url = "{url}"
protocol = "{protocol}"
[upstream.token]
url = "{token_url}"
client_id = "app"
client_secret = "s3cret"
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs grpcio: make interop"]
async fn the_four_kinds_of_call_pass_with_the_token_metadata_and_trailers() {
    let server = peer::Server::start(PEER, TOKEN);
    let tokens = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        upstream(
            "grpc",
            &format!("http://127.0.0.1:{}", server.port),
            "h2c",
            &tokens.url("/oauth/token")
        )
    );
    let sidecar = Sidecar::start(&config).await;
    let got = peer(vec!["client".into(), target(&sidecar, "grpc")]).await;
    assert_eq!(got["unary"], "unary:hello");
    assert_eq!(got["unary_trailers"]["x-app-metadata"], "from-the-app");
    assert_eq!(
        got["server_stream"],
        serde_json::json!(["item-0", "item-1", "item-2", "item-3", "item-4"])
    );
    assert_eq!(got["client_stream"], "a+b+c");
    assert_eq!(got["bidi"], serde_json::json!(["ONE", "TWO", "THREE"]));
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs grpcio: make interop"]
async fn a_grpc_client_reads_the_status_of_every_failure() {
    let server = peer::Server::start(PEER, TOKEN);
    let tokens = token_endpoint(|_, _| async { token_ok(TOKEN, 3600) }).await;
    let refusing = token_endpoint(|_, _| async {
        support::json(
            http::StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "invalid_client", "error_description": "bad secret"}),
        )
    })
    .await;
    let grpc = format!("http://127.0.0.1:{}", server.port);
    // A port nothing listens on: bound, then closed.
    let closed = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", socket.local_addr().unwrap())
    };
    let good = tokens.url("/oauth/token");
    let config = [
        "[admin]\nlisten = \"127.0.0.1:0\"\n".to_owned(),
        upstream("grpc", &grpc, "h2c", &good),
        upstream("no-token", &grpc, "h2c", &refusing.url("/oauth/token")),
        upstream("down", &closed, "h2c", &good),
        upstream("old", &grpc, "http1", &good),
        format!(
            r#"
[[listener]]
listen = "127.0.0.1:0"
[[listener.route]]
name = "elsewhere"
path_prefix = "/other.Service"
url = "{grpc}"
protocol = "h2c"
[listener.route.token]
url = "{good}"
client_id = "app"
client_secret = "s3cret"
"#
        ),
    ]
    .concat();
    let sidecar = Sidecar::start(&config).await;
    let status = |upstream: &str, method: &str, timeout: &str| {
        peer(vec![
            "status".into(),
            target(&sidecar, upstream),
            method.into(),
            timeout.into(),
        ])
    };

    let ok = status("grpc", "Unary", "10").await;
    assert_eq!(ok["code"], "OK", "{ok}");
    // The upstream's own status passes through untouched.
    let upstream_says = status("grpc", "Fail", "10").await;
    assert_eq!(upstream_says["code"], "NOT_FOUND", "{upstream_says}");
    assert_eq!(upstream_says["details"], "no such thing: x");

    let no_token = status("no-token", "Unary", "10").await;
    assert_eq!(no_token["code"], "UNAVAILABLE", "{no_token}");
    let details = no_token["details"].as_str().unwrap();
    assert!(details.contains("token_unavailable"), "{details}");
    assert!(!details.contains("s3cret"), "{details}");

    let down = status("down", "Unary", "10").await;
    assert_eq!(down["code"], "UNAVAILABLE", "{down}");
    assert!(
        down["details"]
            .as_str()
            .unwrap()
            .contains("upstream_unreachable"),
        "{down}"
    );

    let old = status("old", "Unary", "10").await;
    assert_eq!(old["code"], "UNAVAILABLE", "{old}");
    assert!(
        old["details"]
            .as_str()
            .unwrap()
            .contains("protocol = \"h2c\""),
        "{old}"
    );

    let unknown = status("elsewhere", "Unary", "10").await;
    assert_eq!(unknown["code"], "UNIMPLEMENTED", "{unknown}");

    // The client's deadline travels as grpc-timeout; bearerd gives up waiting with it.
    let late = status("grpc", "Slow", "0.5").await;
    assert_eq!(late["code"], "DEADLINE_EXCEEDED", "{late}");
    sidecar.stop().await;
}
