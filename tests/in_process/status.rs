//! `GET /status` on the admin listener: the JSON and HTML forms over a real socket, with a
//! request in flight, a shared token source, a route table and a token endpoint whose error
//! code is hostile HTML; and who may read it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use support::{echo, json, send, serve, token_endpoint, token_ok, Holding, Sidecar};

const ACCESS_TOKEN: &str = "access-token-Ux81";
const CLIENT_SECRET: &str = "client-secret-Hq3";
/// What a hostile token endpoint says as its error code: valid by RFC 6749 §5.2's character
/// set, and HTML that would run script if the page did not escape it.
const HOSTILE_CODE: &str = "<img src=x onerror=alert(1)>";

async fn status(admin: std::net::SocketAddr, accept: Option<&str>) -> support::Answer {
    let mut request = Request::get(format!("http://{admin}/status"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    send(request.body(Full::new(Bytes::new())).unwrap()).await
}

// One thread, as bearerd runs (main.rs): on a multi-thread runtime a source's first fetch can
// end before the sidecar points its metrics at its upstreams, and go uncounted.
#[tokio::test]
async fn the_status_page_in_json_and_html_shows_state_and_no_secret() {
    let good = token_endpoint(|_, _| async { token_ok(ACCESS_TOKEN, 3600) }).await;
    let hostile = token_endpoint(|_, _| async {
        json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": HOSTILE_CODE, "error_description": "<b>bold</b>"}),
        )
    })
    .await;
    let holding = Holding::start().await;
    let plain = serve(echo).await;
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[upstream]]
name = "api"
listen = "127.0.0.1:0"
url = "{held}"
[upstream.token]
url = "{good}"
client_id = "app"
client_secret = "{CLIENT_SECRET}"

[[upstream]]
name = "broken"
listen = "127.0.0.1:0"
url = "{plain}"
[upstream.token]
url = "{hostile}"
client_id = "app"
client_secret = "{CLIENT_SECRET}"
auth = "post"

[[listener]]
listen = "127.0.0.1:0"
[[listener.route]]
name = "short"
path_prefix = "/v1"
url = "{plain}"
[listener.route.token]
url = "{good}"
client_id = "app"
client_secret = "{CLIENT_SECRET}"
[[listener.route]]
name = "long"
host = "api.example.com"
path_prefix = "/v1/admin"
strip_prefix = true
url = "{plain}"
[listener.route.token]
url = "{good}"
client_id = "app"
client_secret = "{CLIENT_SECRET}"
"#,
        held = holding.url(""),
        good = good.url("/token"),
        hostile = hostile.url("/token"),
        plain = plain.url("/base"),
    );
    let sidecar = Sidecar::start(&config).await;
    let admin = sidecar.running().admin_addr();
    // The broken source has failed (its handle answers once the fetch is over); a request to
    // api is held at the upstream: one in flight.
    let broken = sidecar.running().token_source("broken").unwrap().clone();
    assert!(broken.token().await.is_err());
    let in_flight = tokio::spawn(support::get_owned(sidecar.url("api", "/slow")));
    holding.arrived().await;

    let answer = status(admin, Some("application/json")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["content-type"], "application/json");
    assert_eq!(answer.headers["cache-control"], "no-store");
    let page = answer.json();
    assert_eq!(page["version"], env!("CARGO_PKG_VERSION"));
    assert!(page["config_file"]
        .as_str()
        .unwrap()
        .ends_with("bearerd.toml"));
    assert_eq!(page["ready"], false, "broken has no token");
    let sources = page["token_sources"].as_array().unwrap();
    // api, short and long share one source (equal token settings): one entry.
    assert_eq!(sources.len(), 2, "{page:#}");
    let shared = &sources[0];
    assert_eq!(
        shared["upstreams"],
        serde_json::json!(["api", "short", "long"])
    );
    assert_eq!(shared["grant"], "client_credentials");
    assert_eq!(shared["client_auth"], "basic");
    assert_eq!(shared["state"], "ready");
    assert_eq!(shared["phase"], "scheduled");
    assert_eq!(shared["fetches"]["success"], 1);
    assert_eq!(shared["last_error"], serde_json::Value::Null);
    let token = &shared["token"];
    assert!(token["age_seconds"].as_u64().unwrap() < 60, "{token}");
    let expires_in = token["expires_in_seconds"].as_u64().unwrap();
    assert!((3500..=3600).contains(&expires_in), "{token}");
    assert_eq!(token["lifetime_from"], "expires_in");
    let failing = &sources[1];
    assert_eq!(failing["upstreams"], serde_json::json!(["broken"]));
    assert_eq!(failing["client_auth"], "post");
    assert_eq!(failing["state"], "not_ready");
    assert_eq!(failing["phase"], "backing_off");
    assert_eq!(failing["fetches"]["rejected"], 1, "{failing:#}");
    assert_eq!(failing["failures"], 1);
    assert_eq!(failing["token"], serde_json::Value::Null);
    // Summarised as /readyz does: the status and the code, not the description.
    let last_error = failing["last_error"].as_str().unwrap();
    assert!(last_error.contains("status 400"), "{last_error}");
    assert!(last_error.contains(HOSTILE_CODE), "{last_error}");
    assert_eq!(page["cache"], serde_json::Value::Null);
    let listeners = page["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 3);
    assert_eq!(listeners[0]["mode"], "reverse");
    assert_eq!(
        listeners[0]["listen"],
        sidecar.running().local_addr("api").unwrap().to_string()
    );
    assert_eq!(listeners[0]["in_flight"], 1);
    assert_eq!(listeners[0]["routes"][0]["in_flight"], 1);
    assert_eq!(listeners[1]["in_flight"], 0);
    // Match order: the longer prefix first, whatever the file order.
    let table = &listeners[2]["routes"];
    assert_eq!(table[0]["name"], "long");
    assert_eq!(table[0]["host"], "api.example.com");
    assert_eq!(table[0]["path_prefix"], "/v1/admin");
    assert_eq!(table[0]["strip_prefix"], true);
    assert_eq!(table[0]["upstream"], plain.url("/base"));
    assert_eq!(table[1]["name"], "short");
    assert_eq!(table[1]["host"], serde_json::Value::Null);
    let text = String::from_utf8_lossy(&answer.body).into_owned();
    assert!(!text.contains("bold"), "the endpoint's description: {text}");

    // A browser's Accept gets the HTML form.
    let answer = status(
        admin,
        Some("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(
        answer.headers["content-security-policy"],
        "default-src 'none'; style-src 'unsafe-inline'"
    );
    let html = String::from_utf8(answer.body.to_vec()).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
    assert!(html.contains("<h1>bearerd status</h1>"), "{html}");
    assert!(
        html.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "the hostile code, escaped: {html}"
    );
    assert!(!html.contains("<img"), "{html}");
    assert!(!html.contains("<script"), "{html}");
    assert!(!html.contains("bold"), "{html}");
    assert!(html.contains("<td>api<br>short<br>long</td>"), "{html}");
    assert!(html.contains("1 in flight"), "{html}");
    // No Accept at all: HTML too.
    let answer = status(admin, None).await;
    assert!(answer.body.starts_with(b"<!DOCTYPE html>"));

    for body in [text, html] {
        for secret in [ACCESS_TOKEN, CLIENT_SECRET] {
            assert!(!body.contains(secret), "{secret} on the page: {body}");
        }
    }
    holding.release();
    in_flight.await.unwrap().echo();
    sidecar.stop().await;
}

#[tokio::test]
async fn the_status_page_answers_loopback_and_status_from_peers_only() {
    let good = token_endpoint(|_, _| async { token_ok(ACCESS_TOKEN, 3600) }).await;
    let plain = serve(echo).await;
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
status_from = ["192.0.2.0/24"]

[[upstream]]
name = "api"
listen = "127.0.0.1:0"
url = "{plain}"
[upstream.token]
url = "{good}"
client_id = "app"
client_secret = "{CLIENT_SECRET}"
"#,
        plain = plain.url(""),
        good = good.url("/token"),
    );
    let sidecar = Sidecar::start(&config).await;
    let running = sidecar.running();
    let headers = http::HeaderMap::new();
    let status_from = &["192.0.2.0/24".parse().unwrap()];
    let from = |peer: &str, method: Method| {
        running
            .admin()
            .status(&method, &headers, peer.parse().unwrap(), status_from)
    };
    // The admin listener passes each peer and `[admin] status_from` on as these.
    assert_eq!(from("192.0.2.9", Method::GET).status(), StatusCode::OK);
    assert_eq!(
        from("::ffff:192.0.2.9", Method::GET).status(),
        StatusCode::OK
    );
    assert_eq!(from("::1", Method::GET).status(), StatusCode::OK);
    let refused = from("198.51.100.7", Method::GET);
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let body = http_body_util::BodyExt::collect(refused.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(
        &body[..],
        b"/status answers loopback peers and [admin] status_from only\n"
    );
    assert_eq!(
        from("10.0.0.1", Method::GET).status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        from("192.0.2.9", Method::POST).status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
    // Over the socket from loopback, without status_from saying so.
    assert_eq!(
        status(running.admin_addr(), None).await.status,
        StatusCode::OK
    );
    let parsed = bearerd::config::Config::load(&sidecar.file("bearerd.toml")).unwrap();
    assert_eq!(parsed.admin.status_from, status_from.to_vec());
    sidecar.stop().await;
}
