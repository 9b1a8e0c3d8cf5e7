//! TLS interception (issue 24) with client stacks nobody here wrote, configured as an
//! unchanged legacy app would be: Python `requests` with `HTTPS_PROXY` naming bearerd's
//! forward listener and `REQUESTS_CA_BUNDLE` the `ca_bundle_file` bearerd wrote (the system
//! roots and its CA); Node with undici 6's `EnvHttpProxyAgent` and `NODE_EXTRA_CA_CERTS`;
//! Java 17 (`java.net.http.HttpClient` and `HttpsURLConnection`) with `-Dhttps.proxyHost`,
//! `-Dhttps.proxyPort`, `-Dhttp.nonProxyHosts` and a PKCS12 truststore made by `keytool`;
//! Go's `net/http` default client with `HTTPS_PROXY` and `SSL_CERT_FILE` (HTTP/2 in the tunnel).
//! Ignored by a plain `cargo test`: `make interop` makes the virtualenv with requests
//! (tests/interop/requirements.txt), installs undici (tests/interop/oidc/package.json) and
//! names the JDK and Go (scripts/install-test-deps.sh installs Debian's `default-jdk-headless`
//! and `golang-go`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::config::{ConfigBuilder, Listener, Route, Table, Token};
use support::{echo, serve, serve_tls, token_endpoint, token_ok, Sidecar, TestCa};

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

/// Runs an app (its proxy and trust settings in `command`), which prints what it saw as JSON;
/// a failing app fails the test with its output.
async fn run_app(mut command: Command) -> serde_json::Value {
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The tunnels bearerd counted with `outcome`.
fn tunnels(sidecar: &Sidecar, outcome: &str) -> f64 {
    let scrape = sidecar.running().metrics().render().unwrap();
    support::metric(
        &scrape,
        &format!("bearerd_intercept_tunnels_total{{listener=\"payments\",outcome=\"{outcome}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Python requests: make interop"]
async fn python_requests_with_https_proxy_and_the_ca_bundle_gets_the_token() {
    let python = std::env::var_os("BEARERD_INTEROP_PYTHON")
        .expect("BEARERD_INTEROP_PYTHON is not set: run `make interop` (scripts/interop.sh)");
    let (sidecar, _servers) = sidecar("tok-requests").await;
    let addr = sidecar.running().local_addr("payments").unwrap();
    let bundle = sidecar.file("ca-bundle.pem");
    let mut app = Command::new(python);
    app.args(["-c", APP, &format!("https://{HOST}")])
        .env("HTTPS_PROXY", format!("http://{addr}"))
        .env("REQUESTS_CA_BUNDLE", bundle)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    let result = run_app(app).await;
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
    assert_eq!(tunnels(&sidecar, "intercepted"), 1.0);
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
    let mut app = Command::new(node);
    app.args([NODE_APP, &format!("https://{HOST}")])
        .env("HTTPS_PROXY", format!("http://{addr}"))
        .env("NODE_EXTRA_CA_CERTS", ca)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    let result = run_app(app).await;
    assert_eq!(result["status"], 200);
    assert_eq!(
        result["seen"]["headers"]["authorization"][0],
        "Bearer tok-undici"
    );
    assert_eq!(result["seen"]["uri"], "/v1/node?x=1");
    assert_eq!(result["refused"], true);
    sidecar.stop().await;
}

/// The Go app (tests/interop/go), run with `go run`.
const GO_APP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/go/intercept_app.go"
);

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Go (Debian's golang-go): make interop"]
async fn go_net_http_with_https_proxy_and_ssl_cert_file_gets_the_token_over_http2() {
    let go = std::env::var_os("BEARERD_INTEROP_GO")
        .expect("BEARERD_INTEROP_GO is not set: run `make interop` (scripts/interop.sh)");
    let (sidecar, _servers) = sidecar("tok-go").await;
    let addr = sidecar.running().local_addr("payments").unwrap();
    let bundle = sidecar.file("ca-bundle.pem");
    let cache = sidecar.file("go-cache");
    let mut app = Command::new(go);
    app.args(["run", GO_APP, &format!("https://{HOST}")])
        .env("HTTPS_PROXY", format!("http://{addr}"))
        .env("SSL_CERT_FILE", bundle)
        .env("GOCACHE", cache)
        .env("GO111MODULE", "off")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env_remove("SSL_CERT_DIR");
    let result = run_app(app).await;
    assert_eq!(result["status"], serde_json::json!([200, 200]));
    // Go's transport offers h2 by ALPN, and bearerd's leaf accepts it inside the tunnel.
    assert_eq!(result["proto"], serde_json::json!(["HTTP/2.0", "HTTP/2.0"]));
    for (seen, uri) in result["seen"]
        .as_array()
        .unwrap()
        .iter()
        .zip(["/v1/go?x=1", "/v1/two"])
    {
        assert_eq!(seen["headers"]["authorization"][0], "Bearer tok-go");
        assert_eq!(seen["uri"], uri);
    }
    assert_eq!(result["refused"], true, "{result}");
    assert_eq!(
        tunnels(&sidecar, "intercepted"),
        1.0,
        "both requests on one tunnel"
    );
    sidecar.stop().await;
}

/// The Java app (tests/interop/java), run as a single-file source program.
const JAVA_APP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/java/InterceptApp.java"
);

/// `java` of `BEARERD_INTEROP_JAVA` (scripts/interop.sh sets it), else the one on `PATH`;
/// and the `keytool` beside it.
fn jdk() -> (PathBuf, PathBuf) {
    let java =
        std::env::var_os("BEARERD_INTEROP_JAVA").map_or_else(|| "java".into(), PathBuf::from);
    let keytool = java
        .parent()
        .map(|bin| bin.join("keytool"))
        .filter(|keytool| keytool.is_file())
        .unwrap_or_else(|| "keytool".into());
    (java, keytool)
}

/// Adds the certificate at `pem` to the PKCS12 truststore `store` (made by the first call)
/// under `alias`, as an operator would with `keytool -importcert`.
fn import(keytool: &Path, store: &Path, alias: &str, pem: &Path) {
    let output = Command::new(keytool)
        .args(["-importcert", "-noprompt", "-alias", alias, "-file"])
        .arg(pem)
        .args(["-keystore"])
        .arg(store)
        .args(["-storetype", "PKCS12", "-storepass", "changeit"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", keytool.display()));
    assert!(
        output.status.success(),
        "keytool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a JDK (java with jdk.compiler, keytool): make interop"]
async fn java_with_proxy_properties_and_a_truststore_gets_the_token_and_bypasses_non_proxy_hosts() {
    let (java, keytool) = jdk();
    let (sidecar, _servers) = sidecar("tok-java").await;
    let addr = sidecar.running().local_addr("payments").unwrap();
    // A host the app reaches directly, named in http.nonProxyHosts (not in Java's default
    // `localhost|127.*|[::1]`): through bearerd, its CONNECT would be refused.
    let direct_ca = TestCa::with_names(&["direct.test"]);
    let direct = serve_tls(echo, &direct_ca).await;
    let dir = tempfile::tempdir().unwrap();
    let direct_pem = dir.path().join("direct-ca.pem");
    std::fs::write(&direct_pem, &direct_ca.ca_pem).unwrap();
    // The app resolves direct.test (and nothing else) from this file: loopback only. A
    // proxied host is never resolved by the app; bearerd gets its name in the CONNECT.
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 direct.test\n").unwrap();
    let store = dir.path().join("truststore.p12");
    let store_path = store.clone();
    let ca = sidecar.file("ca.pem");
    tokio::task::spawn_blocking(move || {
        import(&keytool, &store_path, "bearerd", &ca);
        import(&keytool, &store_path, "direct", &direct_pem);
    })
    .await
    .unwrap();
    let mut app = Command::new(java);
    app.arg("-Dhttps.proxyHost=127.0.0.1")
        .arg(format!("-Dhttps.proxyPort={}", addr.port()))
        .arg("-Dhttp.nonProxyHosts=direct.test")
        .arg(format!("-Djdk.net.hosts.file={}", hosts.display()))
        .arg(format!("-Djavax.net.ssl.trustStore={}", store.display()))
        .arg("-Djavax.net.ssl.trustStorePassword=changeit")
        .arg("-Djavax.net.ssl.trustStoreType=PKCS12")
        .args([
            JAVA_APP,
            &format!("https://{HOST}"),
            &format!("https://direct.test:{}", direct.addr.port()),
        ])
        .env_remove("JAVA_TOOL_OPTIONS")
        .env_remove("JDK_JAVA_OPTIONS");
    let result = run_app(app).await;
    assert_eq!(result["status"], serde_json::json!([200, 200, 200]));
    // HttpClient chose HTTP/2 by ALPN inside the tunnel.
    assert_eq!(result["version"], "HTTP_2");
    assert_eq!(result["legacy_proxied"], true);
    let seen = result["seen"].as_array().unwrap();
    for (seen, uri) in seen.iter().zip(["/v1/java?x=1", "/v1/legacy"]) {
        assert_eq!(seen["headers"]["authorization"][0], "Bearer tok-java");
        assert_eq!(seen["uri"], uri);
    }
    // The bypassed host got the app's request as sent: no token, not through bearerd.
    // (HTTP/2 to it too: hyper gives the echo the full `https://direct.test:port/direct`.)
    assert!(
        seen[2]["uri"].as_str().unwrap().ends_with("/direct"),
        "{}",
        seen[2]
    );
    assert!(
        seen[2]["headers"].get("authorization").is_none(),
        "{}",
        seen[2]
    );
    assert_eq!(result["refused"], true);
    // HttpClient's connection and HttpsURLConnection's: two tunnels; one refusal, the
    // unrouted host's; none for direct.test.
    assert_eq!(tunnels(&sidecar, "intercepted"), 2.0);
    assert_eq!(tunnels(&sidecar, "refused_not_served"), 1.0);
    sidecar.stop().await;
}
