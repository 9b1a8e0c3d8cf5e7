//! TLS interception (issue 24) with client stacks nobody here wrote, configured as an
//! unchanged legacy app would be: Python `requests` with `HTTPS_PROXY` naming bearerd's
//! forward listener and `REQUESTS_CA_BUNDLE` the `ca_bundle_file` bearerd wrote (the system
//! roots and its CA); Node with undici 6's `EnvHttpProxyAgent` and `NODE_EXTRA_CA_CERTS`.
//! Ignored by a plain `cargo test`: `make interop` makes the virtualenv with requests
//! (tests/interop/requirements.txt) and installs undici (tests/interop/oidc/package.json).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::process::Command;

use support::config::{ConfigBuilder, Listener, Route, Table, Token};
use support::{echo, serve, token_endpoint, token_ok, Sidecar};

const HOST: &str = "api.payments.test";

/// What the app runs: two GETs on one session (one kept-alive tunnel), then one to a host
/// without a route, which must fail at the proxy.
const APP: &str = r#"
import json, sys, requests
url = sys.argv[1]
with requests.Session() as s:
    first = s.get(url + "/v1/one?x=1", timeout=10)
    second = s.get(url + "/v1/two", timeout=10)
    try:
        s.get("https://unrouted.example/", timeout=10)
        refused = False
    except requests.exceptions.ProxyError:
        refused = True
print(json.dumps({"status": [first.status_code, second.status_code],
                  "seen": [first.json(), second.json()], "refused": refused}))
"#;

/// A Node app using undici (tests/interop/oidc, where its node_modules are).
const NODE_APP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/oidc/intercept_app.mjs"
);

/// bearerd intercepting `HOST` for an echo upstream whose token is `token`, and the servers it
/// needs kept alive.
async fn sidecar(token: &'static str) -> (Sidecar, impl Sized) {
    let upstream = serve(echo).await;
    let tokens = token_endpoint(move |_, _| async move { token_ok(token, 3600) }).await;
    let config = ConfigBuilder::new()
        .listener(
            Listener::new("forward")
                .table(
                    "intercept",
                    Table::new()
                        .set("ca_cert_file", "\"ca.pem\"")
                        .set("ca_key_file", "\"ca.key\"")
                        .set("ca_bundle_file", "\"ca-bundle.pem\""),
                )
                .route(
                    Route::named("payments")
                        .host(HOST)
                        .url(&upstream.url(""))
                        .allow_plain_http(true)
                        .token(Token::new(&tokens.url("/token"), "app").secret("pw")),
                ),
        )
        .render();
    (Sidecar::start(&config).await, (upstream, tokens))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Python requests: make interop"]
async fn python_requests_with_https_proxy_and_the_ca_bundle_gets_the_token() {
    let python = std::env::var_os("BEARERD_INTEROP_PYTHON")
        .expect("BEARERD_INTEROP_PYTHON is not set: run `make interop` (scripts/interop.sh)");
    let (sidecar, _servers) = sidecar("tok-requests").await;
    let addr = sidecar.running().local_addr("payments").unwrap();
    let bundle = sidecar.file("ca-bundle.pem");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-c", APP, &format!("https://{HOST}")])
            .env("HTTPS_PROXY", format!("http://{addr}"))
            .env("REQUESTS_CA_BUNDLE", bundle)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["status"], serde_json::json!([200, 200]));
    for (seen, uri) in result["seen"]
        .as_array()
        .unwrap()
        .iter()
        .zip(["/v1/one?x=1", "/v1/two"])
    {
        assert_eq!(seen["headers"]["authorization"][0], "Bearer tok-requests");
        assert_eq!(seen["uri"], uri);
    }
    assert_eq!(result["refused"], true);
    // Both requests went through one tunnel: requests keeps its connection alive.
    let scrape = sidecar.running().metrics().render().unwrap();
    assert_eq!(
        support::metric(
            &scrape,
            "bearerd_intercept_tunnels_total{listener=\"payments\",outcome=\"intercepted\"}"
        ),
        Some(1.0)
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs node and undici: make interop"]
async fn node_undici_with_env_proxy_agent_and_extra_ca_certs_gets_the_token() {
    let node = std::env::var_os("BEARERD_INTEROP_NODE")
        .expect("BEARERD_INTEROP_NODE is not set: run `make interop` (scripts/interop.sh)");
    let (sidecar, _servers) = sidecar("tok-undici").await;
    let addr = sidecar.running().local_addr("payments").unwrap();
    let ca = sidecar.file("ca.pem");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(node)
            .args([NODE_APP, &format!("https://{HOST}")])
            .env("HTTPS_PROXY", format!("http://{addr}"))
            .env("NODE_EXTRA_CA_CERTS", ca)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["status"], 200);
    assert_eq!(
        result["seen"]["headers"]["authorization"][0],
        "Bearer tok-undici"
    );
    assert_eq!(result["seen"]["uri"], "/v1/node?x=1");
    assert_eq!(result["refused"], true);
    sidecar.stop().await;
}
