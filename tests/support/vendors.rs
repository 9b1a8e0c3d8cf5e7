//! The five vendors of `shared/seeds/` as token endpoints: each checks the request exactly as
//! the vendor documents it (path, Basic or body credentials, audience, form encoding) and
//! answers as the vendor documents, including its errors. Used by `vendors.rs` and by
//! `recipes.rs`, which runs `docs/vendors.md` against them.

use http::StatusCode;

use super::{json, Body, TokenRequest};

pub const ID: &str = "client-1";
pub const SECRET: &str = "s3cret/with+chars";

/// What a fixture found wrong with a request, if anything: checks shared by every vendor.
pub fn form_post_problem(request: &TokenRequest, path: &str) -> Option<String> {
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

pub fn basic_is_right(request: &TokenRequest) -> bool {
    request.basic() == Some((ID.to_owned(), SECRET.to_owned()))
        && !request.form.contains_key("client_secret")
}

pub fn usm_anywhere(_: usize, request: TokenRequest) -> std::future::Ready<http::Response<Body>> {
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

pub fn auth0(_: usize, request: TokenRequest) -> std::future::Ready<http::Response<Body>> {
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

pub fn alternative_payments(
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

pub fn jwt_expiring_in(seconds: u64) -> String {
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

pub fn ibm_error(status: StatusCode, error: &str, description: &str) -> http::Response<Body> {
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
pub fn ibm_watson_work(
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

pub fn standard_metrics(
    _: usize,
    request: TokenRequest,
) -> std::future::Ready<http::Response<Body>> {
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
