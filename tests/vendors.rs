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
use support::{echo, get, json, serve, token_endpoint, Body, Sidecar, TokenRequest};

const ID: &str = "client-1";
const SECRET: &str = "s3cret/with+chars";

/// What a fixture found wrong with a request, if anything: checks shared by every vendor.
fn form_post_problem(request: &TokenRequest, path: &str) -> Option<String> {
    if request.method != http::Method::POST {
        return Some(format!("method {}", request.method));
    }
    if request.path != path {
        return Some(format!("path {}", request.path));
    }
    if request.content_type() != Some("application/x-www-form-urlencoded") {
        return Some(format!("content-type {:?}", request.content_type()));
    }
    if request.form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return Some(format!("grant_type {:?}", request.form.get("grant_type")));
    }
    None
}

fn basic_is_right(request: &TokenRequest) -> bool {
    request.basic() == Some((ID.to_owned(), SECRET.to_owned()))
        && !request.form.contains_key("client_secret")
}

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

fn usm_anywhere(_: usize, request: TokenRequest) -> std::future::Ready<http::Response<Body>> {
    let path = "/api/2.0/oauth/token";
    let answer = if let Some(problem) = form_post_problem(&request, path) {
        json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"result": "Bad Request", "location": path, "error": problem}),
        )
    } else if !basic_is_right(&request) || request.form.len() != 1 {
        json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"result": "Unauthorized", "location": path, "error": "Bad credentials"}),
        )
    } else {
        json(
            StatusCode::OK,
            serde_json::json!({
                "access_token": "xxx.yyy.zzz",
                "token_type": "bearer",
                "expires_in": 899,
                "scope": "trust read write",
                "jti": "3b4cc123-2164-44cb-ae34-9c76d7c429ab"
            }),
        )
    };
    std::future::ready(answer)
}

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
    assert_eq!(
        unavailable_detail(&answer),
        "token endpoint rejected the request: status 401 Unauthorized, error \"Bad credentials\": Unauthorized; at /api/2.0/oauth/token"
    );
    sidecar.stop().await;
}

// --- Auth0: /oauth/token, credentials in the body, audience required.

fn auth0(_: usize, request: TokenRequest) -> std::future::Ready<http::Response<Body>> {
    let form = &request.form;
    let answer = if let Some(problem) = form_post_problem(&request, "/oauth/token") {
        json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "invalid_request", "error_description": problem}),
        )
    } else if request.headers.contains_key("authorization")
        || form.get("client_id").map(String::as_str) != Some(ID)
        || form.get("client_secret").map(String::as_str) != Some(SECRET)
    {
        json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "access_denied", "error_description": "Unauthorized"}),
        )
    } else if form.get("audience").map(String::as_str) != Some("https://api.example.com/") {
        json(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": "access_denied", "error_description": "No audience parameter was provided, and no default audience has been configured"}),
        )
    } else {
        let organization = form.get("organization").cloned().unwrap_or_default();
        json(
            StatusCode::OK,
            serde_json::json!({
                "access_token": format!("eyJz93a.k4laUWw.{organization}"),
                "token_type": "Bearer",
                "expires_in": 86400
            }),
        )
    };
    std::future::ready(answer)
}

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
    assert_eq!(
        unavailable_detail(&answer),
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
    assert!(
        unavailable_detail(&answer).contains("status 401 Unauthorized, error \"access_denied\"")
    );
    sidecar.stop().await;
}

// --- Alternative Payments: /oauth/token, Basic, 403 with a flat string map.

fn alternative_payments(
    _: usize,
    request: TokenRequest,
) -> std::future::Ready<http::Response<Body>> {
    let answer =
        if form_post_problem(&request, "/oauth/token").is_some() || !basic_is_right(&request) {
            json(
                StatusCode::FORBIDDEN,
                serde_json::json!({"message": "Invalid credentials", "code": "forbidden"}),
            )
        } else {
            json(
                StatusCode::OK,
                serde_json::json!({
                    "access_token": "580defdbe1d21e0001c67e5c2a0a6c98ba8b4a059dc5825388501574",
                    "expires_in": 3600,
                    "token_type": "bearer"
                }),
            )
        };
    std::future::ready(answer)
}

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
    assert_eq!(
        unavailable_detail(&answer),
        "token endpoint rejected the request: status 403 Forbidden: Invalid credentials"
    );
    sidecar.stop().await;
}

// --- IBM Watson Work: /oauth/token, Basic, JWT token, 400/401/500 errors.

fn jwt_expiring_in(seconds: u64) -> String {
    use base64::Engine;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + seconds;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(r#"{"alg":"RS256","typ":"JWT"}"#),
        b64(&format!(r#"{{"sub":"app","exp":{exp}}}"#))
    )
}

fn ibm_error(status: StatusCode, error: &str, description: &str) -> http::Response<Body> {
    json(
        status,
        serde_json::json!({
            "error": error,
            "error_description": description,
            "message": format!("{error}: {description}"),
            "path": "/oauth/token",
            "status": status.as_str(),
            "timestamp": "2026-11-23T10:00:00.000Z"
        }),
    )
}

/// `mode` picks the answer: normal, or a forced server error.
fn ibm_watson_work(
    server_error: bool,
) -> impl Fn(usize, TokenRequest) -> std::future::Ready<http::Response<Body>> {
    move |_, request| {
        let answer = if server_error {
            ibm_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "Internal error",
            )
        } else if let Some(problem) = form_post_problem(&request, "/oauth/token") {
            ibm_error(StatusCode::BAD_REQUEST, "invalid_request", &problem)
        } else if !basic_is_right(&request) {
            ibm_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "Bad client credentials",
            )
        } else {
            // expires_in is optional in IBM's schema: here it is left out, so the JWT's exp rules.
            json(
                StatusCode::OK,
                serde_json::json!({
                    "access_token": jwt_expiring_in(7200),
                    "token_type": "bearer",
                    "id": "d2a1b1e4-0000-4000-8000-000000000001",
                    "jti": "0d8e9a5c-0000-4000-8000-000000000002",
                    "scope": "ibm openid"
                }),
            )
        };
        std::future::ready(answer)
    }
}

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
    assert_eq!(
        unavailable_detail(&answer),
        "token endpoint rejected the request: status 401 Unauthorized, error \"invalid_client\": Bad client credentials"
    );
    sidecar.stop().await;

    let endpoint = token_endpoint(ibm_watson_work(true)).await;
    let (answer, sidecar) = one_request(&endpoint.url("/oauth/token"), &basic_config()).await;
    assert_eq!(
        unavailable_detail(&answer),
        "token endpoint failed: status 500 Internal Server Error, error \"server_error\": Internal error"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn ibm_watson_work_400_names_the_problem() {
    let endpoint = token_endpoint(ibm_watson_work(false)).await;
    // The wrong path is the fixture's only way to see a malformed request from bearerd.
    let (answer, sidecar) = one_request(&endpoint.url("/oauth/token/"), &basic_config()).await;
    assert_eq!(
        unavailable_detail(&answer),
        "token endpoint rejected the request: status 400 Bad Request, error \"invalid_request\": path /oauth/token/"
    );
    sidecar.stop().await;
}

// --- Standard Metrics (Django OAuth Toolkit): /o/token/ with the slash, Basic, scope back.

fn standard_metrics(_: usize, request: TokenRequest) -> std::future::Ready<http::Response<Body>> {
    let answer = if let Some(problem) = form_post_problem(&request, "/o/token/") {
        json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "invalid_request", "error_description": problem}),
        )
    } else if !basic_is_right(&request) {
        json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "invalid_client"}),
        )
    } else {
        json(
            StatusCode::OK,
            serde_json::json!({
                "access_token": "ACCESS_TOKEN",
                "expires_in": 3600,
                "token_type": "Bearer",
                "scope": "read write"
            }),
        )
    };
    std::future::ready(answer)
}

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
    assert_eq!(
        unavailable_detail(&answer),
        "token endpoint rejected the request: status 401 Unauthorized, error \"invalid_client\""
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn standard_metrics_without_trailing_slash_is_a_400() {
    let endpoint = token_endpoint(standard_metrics).await;
    let (answer, sidecar) = one_request(&endpoint.url("/o/token"), &basic_config()).await;
    assert!(unavailable_detail(&answer)
        .contains("status 400 Bad Request, error \"invalid_request\": path /o/token"));
    sidecar.stop().await;
}
