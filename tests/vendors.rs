//! The five token endpoints of `shared/seeds/`, each played by a fixture that checks the
//! request exactly as the vendor documents it and answers as the vendor documents, including
//! its errors. bearerd must get a token from each, and report each error clearly.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

mod support;

use http::StatusCode;
use support::vendors::*;
use support::{echo, get, serve, token_endpoint, Sidecar};

/// Starts bearerd against `token_url` with `[upstream.token]` lines `token` and an echo
/// upstream; returns the answer to one app request and the sidecar.
async fn one_request(token_url: &str, token: &str) -> (support::Answer, Sidecar) {
    let upstream = serve(echo).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), format!("{SECRET}\n")).unwrap();
    let config = support::config("vendor", &upstream.url("/api"), token_url, token);
    let sidecar = Sidecar::start_in(dir, &config).await;
    let answer = get(&sidecar.url("vendor", "/things?page=2")).await;
    drop(upstream);
    (answer, sidecar)
}

fn basic_config() -> String {
    format!("client_id = \"{ID}\"\nclient_secret_file = \"secret\"\n")
}

/// The failure as the app was told it (the 503's `detail`: status and error code only) and as
/// the log tells it (with what else the endpoint said), each without the endpoint's address,
/// so that expectations can be written down.
fn reported(answer: &support::Answer, sidecar: &Sidecar) -> (String, String) {
    let told = unavailable_detail(answer);
    let logged = sidecar
        .running()
        .token_source("vendor")
        .unwrap()
        .state()
        .last_error
        .unwrap()
        .to_string();
    (without_address(&told), without_address(&logged))
}

/// `token endpoint 127.0.0.1:4321 failed…` as `token endpoint failed…`.
fn without_address(text: &str) -> String {
    match text.strip_prefix("token endpoint ") {
        Some(rest) => format!(
            "token endpoint {}",
            rest.split_once(' ').map_or("", |(_, after)| after)
        ),
        None => text.to_owned(),
    }
}

/// The 503 bearerd gives the app when the token endpoint refused, and its `detail`.
fn unavailable_detail(answer: &support::Answer) -> String {
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.headers.contains_key("retry-after"));
    let body = answer.json();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(body["upstream"], "vendor");
    let detail = body["detail"].as_str().unwrap().to_owned();
    assert!(!detail.contains(SECRET), "{detail}");
    detail
}

// --- AT&T USM Anywhere: /api/2.0/oauth/token, Basic, {"result","location","error"} errors.

#[tokio::test]
async fn usm_anywhere_token_is_injected() {
    let endpoint = token_endpoint(usm_anywhere).await;
    let (answer, sidecar) =
        one_request(&endpoint.url("/api/2.0/oauth/token"), &basic_config()).await;
    let echoed = answer.echo();
    assert_eq!(echoed.header("authorization"), Some("Bearer xxx.yyy.zzz"));
    assert_eq!(echoed.uri, "/api/things?page=2");
    let token = sidecar
        .running()
        .token_source("vendor")
        .unwrap()
        .state()
        .token
        .unwrap();
    assert_eq!(token.lifetime.as_secs(), 899);
    assert_eq!(token.scope.as_deref(), Some("trust read write"));
    assert_eq!(endpoint.count(), 1);
    sidecar.stop().await;
}

#[tokio::test]
async fn usm_anywhere_401_is_reported() {
    let endpoint = token_endpoint(usm_anywhere).await;
    let config = format!("client_id = \"{ID}\"\nclient_secret = \"wrong\"\n");
    let (answer, sidecar) = one_request(&endpoint.url("/api/2.0/oauth/token"), &config).await;
    let (told, logged) = reported(&answer, &sidecar);
    assert_eq!(
        told,
        "token endpoint rejected the request: status 401 Unauthorized, error \"Bad credentials\""
    );
    assert_eq!(
        logged,
        "token endpoint rejected the request: status 401 Unauthorized, error \"Bad credentials\": Unauthorized; at /api/2.0/oauth/token"
    );
    sidecar.stop().await;
}

// --- Auth0: /oauth/token, credentials in the body, audience required.

#[tokio::test]
async fn auth0_sends_credentials_and_audience_in_the_body() {
    let endpoint = token_endpoint(auth0).await;
    let config = format!(
        "client_id = \"{ID}\"\nclient_secret_file = \"secret\"\nauth = \"post\"\naudience = \"https://api.example.com/\"\nparams = {{ organization = \"org_123\" }}\n"
    );
    let (answer, sidecar) = one_request(&endpoint.url("/oauth/token"), &config).await;
    assert_eq!(
        answer.echo().header("authorization"),
        Some("Bearer eyJz93a.k4laUWw.org_123")
    );
    let request = &endpoint.requests()[0];
    assert_eq!(request.form.len(), 5, "{:?}", request.form);
    sidecar.stop().await;
}

#[tokio::test]
async fn auth0_without_audience_is_a_403() {
    let endpoint = token_endpoint(auth0).await;
    let config =
        format!("client_id = \"{ID}\"\nclient_secret_file = \"secret\"\nauth = \"post\"\n");
    let (answer, sidecar) = one_request(&endpoint.url("/oauth/token"), &config).await;
    let (told, logged) = reported(&answer, &sidecar);
    assert_eq!(
        told,
        "token endpoint rejected the request: status 403 Forbidden, error \"access_denied\""
    );
    assert_eq!(
        logged,
        "token endpoint rejected the request: status 403 Forbidden, error \"access_denied\": No audience parameter was provided, and no default audience has been configured"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn auth0_rejects_basic_auth() {
    let endpoint = token_endpoint(auth0).await;
    let config = format!(
        "{}audience = \"https://api.example.com/\"\n",
        basic_config()
    );
    let (answer, sidecar) = one_request(&endpoint.url("/oauth/token"), &config).await;
    let (told, _) = reported(&answer, &sidecar);
    assert!(
        told.ends_with("status 401 Unauthorized, error \"access_denied\""),
        "{told}"
    );
    sidecar.stop().await;
}

// --- Alternative Payments: /oauth/token, Basic, 403 with a flat string map.

#[tokio::test]
async fn alternative_payments_token_is_injected() {
    let endpoint = token_endpoint(alternative_payments).await;
    let (answer, sidecar) = one_request(&endpoint.url("/oauth/token"), &basic_config()).await;
    assert_eq!(
        answer.echo().header("authorization"),
        Some("Bearer 580defdbe1d21e0001c67e5c2a0a6c98ba8b4a059dc5825388501574")
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn alternative_payments_403_flat_map_is_reported() {
    let endpoint = token_endpoint(alternative_payments).await;
    let config = format!("client_id = \"{ID}\"\nclient_secret = \"wrong\"\n");
    let (answer, sidecar) = one_request(&endpoint.url("/oauth/token"), &config).await;
    let (told, logged) = reported(&answer, &sidecar);
    assert_eq!(
        told,
        "token endpoint rejected the request: status 403 Forbidden"
    );
    assert_eq!(
        logged,
        "token endpoint rejected the request: status 403 Forbidden: Invalid credentials"
    );
    sidecar.stop().await;
}

// --- IBM Watson Work: /oauth/token, Basic, JWT token, 400/401/500 errors.

#[tokio::test]
async fn ibm_watson_work_jwt_exp_sets_the_lifetime() {
    let endpoint = token_endpoint(ibm_watson_work(false)).await;
    let (answer, sidecar) = one_request(&endpoint.url("/oauth/token"), &basic_config()).await;
    let authorization = answer.echo().header("authorization").unwrap().to_owned();
    assert!(authorization.starts_with("Bearer eyJ"), "{authorization}");
    let token = sidecar
        .running()
        .token_source("vendor")
        .unwrap()
        .state()
        .token
        .unwrap();
    let lifetime = token.lifetime.as_secs();
    assert!((7190..=7200).contains(&lifetime), "{lifetime}");
    sidecar.stop().await;
}

#[tokio::test]
async fn ibm_watson_work_401_and_500_are_reported() {
    let endpoint = token_endpoint(ibm_watson_work(false)).await;
    let config = format!("client_id = \"{ID}\"\nclient_secret = \"wrong\"\n");
    let (answer, sidecar) = one_request(&endpoint.url("/oauth/token"), &config).await;
    let (told, logged) = reported(&answer, &sidecar);
    assert_eq!(
        told,
        "token endpoint rejected the request: status 401 Unauthorized, error \"invalid_client\""
    );
    assert_eq!(
        logged,
        "token endpoint rejected the request: status 401 Unauthorized, error \"invalid_client\": Bad client credentials"
    );
    sidecar.stop().await;

    let endpoint = token_endpoint(ibm_watson_work(true)).await;
    let (answer, sidecar) = one_request(&endpoint.url("/oauth/token"), &basic_config()).await;
    let (told, logged) = reported(&answer, &sidecar);
    assert_eq!(
        told,
        "token endpoint failed: status 500 Internal Server Error, error \"server_error\""
    );
    assert_eq!(
        logged,
        "token endpoint failed: status 500 Internal Server Error, error \"server_error\": Internal error"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn ibm_watson_work_400_names_the_problem() {
    let endpoint = token_endpoint(ibm_watson_work(false)).await;
    // The wrong path is the fixture's only way to see a malformed request from bearerd.
    let (answer, sidecar) = one_request(&endpoint.url("/oauth/token/"), &basic_config()).await;
    let (told, logged) = reported(&answer, &sidecar);
    assert_eq!(
        told,
        "token endpoint rejected the request: status 400 Bad Request, error \"invalid_request\""
    );
    assert_eq!(
        logged,
        "token endpoint rejected the request: status 400 Bad Request, error \"invalid_request\": path /oauth/token/"
    );
    sidecar.stop().await;
}

// --- Standard Metrics (Django OAuth Toolkit): /o/token/ with the slash, Basic, scope back.

#[tokio::test]
async fn standard_metrics_token_is_injected() {
    let endpoint = token_endpoint(standard_metrics).await;
    let (answer, sidecar) = one_request(&endpoint.url("/o/token/"), &basic_config()).await;
    assert_eq!(
        answer.echo().header("authorization"),
        Some("Bearer ACCESS_TOKEN")
    );
    let token = sidecar
        .running()
        .token_source("vendor")
        .unwrap()
        .state()
        .token
        .unwrap();
    assert_eq!(token.scope.as_deref(), Some("read write"));
    sidecar.stop().await;
}

#[tokio::test]
async fn standard_metrics_invalid_client_is_reported() {
    let endpoint = token_endpoint(standard_metrics).await;
    let config = format!("client_id = \"{ID}\"\nclient_secret = \"wrong\"\n");
    let (answer, sidecar) = one_request(&endpoint.url("/o/token/"), &config).await;
    let (told, logged) = reported(&answer, &sidecar);
    assert_eq!(
        told,
        "token endpoint rejected the request: status 401 Unauthorized, error \"invalid_client\""
    );
    assert_eq!(
        logged,
        "token endpoint rejected the request: status 401 Unauthorized, error \"invalid_client\""
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn standard_metrics_without_trailing_slash_is_a_400() {
    let endpoint = token_endpoint(standard_metrics).await;
    let (answer, sidecar) = one_request(&endpoint.url("/o/token"), &basic_config()).await;
    let (told, logged) = reported(&answer, &sidecar);
    assert!(
        told.ends_with("status 400 Bad Request, error \"invalid_request\""),
        "{told}"
    );
    assert!(
        logged.ends_with("status 400 Bad Request, error \"invalid_request\": path /o/token"),
        "{logged}"
    );
    sidecar.stop().await;
}
