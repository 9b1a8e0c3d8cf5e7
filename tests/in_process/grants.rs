//! Grants beyond client credentials, end to end through a sidecar against in-process token
//! endpoints: JWT bearer assertions (a PEM key, a Google service-account file) verified with
//! ring, token exchange with subject and actor tokens, and where the token goes upstream
//! (`header`, `prefix`). The refresh-token grant has its own file, `refresh.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use ring::signature::{self, KeyPair, UnparsedPublicKey};
use serde_json::{json, Value};
use support::config::{string, ConfigBuilder, Table, Token, Upstream};
use support::{echo, get, json as answer, send, serve, token_endpoint, token_ok, Sidecar};

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// A compact JWS's header, claims, signed part and signature.
fn jws(text: &str) -> (Value, Value, String, Vec<u8>) {
    let parts: Vec<&str> = text.split('.').collect();
    assert_eq!(parts.len(), 3, "not a compact JWS");
    let decode = |s: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap();
    (
        decode(parts[0]),
        decode(parts[1]),
        format!("{}.{}", parts[0], parts[1]),
        URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
    )
}

/// The DER of a PKCS#8 PEM.
fn pkcs8(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

/// The public key of the RSA fixture, as ring verifies with it.
fn rsa_public_key() -> Vec<u8> {
    let pem = std::fs::read_to_string(fixture("keys/rsa-2048.pem")).unwrap();
    signature::RsaKeyPair::from_pkcs8(&pkcs8(&pem))
        .unwrap()
        .public_key()
        .as_ref()
        .to_vec()
}

/// An upstream that answers 401 to its first request (so that bearerd fetches a new token and
/// sends the request again) and echoes every other.
async fn rejecting_once() -> support::Server {
    let seen = Arc::new(AtomicUsize::new(0));
    serve(move |request| {
        let seen = Arc::clone(&seen);
        async move {
            if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                answer(StatusCode::UNAUTHORIZED, json!({"error": "invalid_token"}))
            } else {
                echo(request).await
            }
        }
    })
    .await
}

async fn sidecar_with(token: Token, upstream: &support::Server, dir: tempfile::TempDir) -> Sidecar {
    let config = ConfigBuilder::new()
        .upstream(Upstream::new("api", &upstream.url("/v1")).token(token))
        .render();
    Sidecar::start_in(dir, &config).await
}

#[tokio::test]
async fn a_custom_header_carries_the_token_and_the_apps_authorization_passes_as_sent() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok-1", 3600) }).await;
    let upstream = serve(echo).await;
    let token = Token::new(&endpoint.url("/token"), "app")
        .secret("s")
        .set("header", string("X-Auth-Token"))
        .set("prefix", string(""));
    let sidecar = sidecar_with(token, &upstream, tempfile::tempdir().unwrap()).await;
    let request = Request::get(sidecar.url("api", "/x"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .header("x-auth-token", "the-apps-own")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let seen = send(request).await.echo();
    assert_eq!(seen.header("x-auth-token"), Some("tok-1"));
    assert_eq!(
        seen.headers["x-auth-token"].len(),
        1,
        "the app's value is replaced"
    );
    assert_eq!(seen.header("authorization"), Some("Basic dXNlcjpwYXNz"));
}

#[tokio::test]
async fn a_prefix_replaces_bearer_in_authorization() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok-1", 3600) }).await;
    let upstream = serve(echo).await;
    let token = Token::new(&endpoint.url("/token"), "app")
        .secret("s")
        .set("prefix", string("Token"));
    let sidecar = sidecar_with(token, &upstream, tempfile::tempdir().unwrap()).await;
    let request = Request::get(sidecar.url("api", "/x"))
        .header("authorization", "Bearer the-apps-own")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let seen = send(request).await.echo();
    assert_eq!(seen.header("authorization"), Some("Token tok-1"));
    assert_eq!(seen.headers["authorization"].len(), 1);
}

#[tokio::test]
async fn jwt_bearer_signs_a_fresh_assertion_for_each_fetch() {
    let endpoint = token_endpoint(|n, request| async move {
        assert_eq!(
            request.form["grant_type"],
            "urn:ietf:params:oauth:grant-type:jwt-bearer"
        );
        token_ok(&format!("jwt-{n}"), 3600)
    })
    .await;
    let upstream = rejecting_once().await;
    let token_url = endpoint.url("/oauth/token");
    let token = Token::empty()
        .url(&token_url)
        .set("grant", string("jwt_bearer"))
        .auth("none")
        .scope("api:read")
        .table(
            "jwt_bearer",
            Table::new()
                .set(
                    "private_key_file",
                    string(fixture("keys/ec-p256.pem").to_str().unwrap()),
                )
                .set("issuer", string("3MVG9-consumer-key"))
                .set("subject", string("integration@example.com"))
                .set("key_id", string("k1"))
                .set("lifetime", string("3m")),
        );
    let sidecar = sidecar_with(token, &upstream, tempfile::tempdir().unwrap()).await;
    let seen = get(&sidecar.url("api", "/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer jwt-1"));

    let requests = endpoint.requests();
    assert_eq!(requests.len(), 2, "the upstream's 401 made a second fetch");
    let mut jtis = Vec::new();
    for request in &requests {
        let (header, claims, _, _) = jws(&request.form["assertion"]);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], "k1");
        assert_eq!(claims["iss"], "3MVG9-consumer-key");
        assert_eq!(claims["sub"], "integration@example.com");
        assert_eq!(claims["aud"], token_url.as_str());
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            180
        );
        jtis.push(claims["jti"].as_str().unwrap().to_owned());
        // scope_in defaults to the form; auth = "none" sends no client credentials.
        assert_eq!(request.form["scope"], "api:read");
        assert!(!request.form.contains_key("client_assertion"));
        assert!(!request.form.contains_key("client_id"));
        assert!(request.headers.get("authorization").is_none());
    }
    assert_ne!(jtis[0], jtis[1], "every assertion has a fresh jti");
}

#[tokio::test]
async fn a_google_service_account_file_names_the_issuer_key_audience_and_token_url() {
    let public = rsa_public_key();
    let google = std::fs::read(fixture("google/token-response.json")).unwrap();
    let endpoint = token_endpoint(move |_, request| {
        let public = public.clone();
        let google = google.clone();
        async move {
            let (header, claims, signed, sig) = jws(&request.form["assertion"]);
            assert_eq!(header["alg"], "RS256");
            assert_eq!(header["kid"], "3f1c0e2a9b7d4c5e8f6a1b2c3d4e5f6a7b8c9d0e");
            UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &public)
                .verify(signed.as_bytes(), &sig)
                .expect("the assertion verifies with the service account's key");
            assert_eq!(
                claims["iss"],
                "bearerd-test@bearerd-tests.iam.gserviceaccount.com"
            );
            // Google wants the scope in the assertion, and no sub unless delegating.
            assert_eq!(
                claims["scope"],
                "https://www.googleapis.com/auth/cloud-platform"
            );
            assert!(claims.get("sub").is_none());
            assert!(!request.form.contains_key("scope"));
            http::Response::builder()
                .status(200)
                .header("content-type", "application/json; charset=utf-8")
                .body(support::full(google))
                .unwrap()
        }
    })
    .await;
    let token_uri = endpoint.url("/token");
    let dir = tempfile::tempdir().unwrap();
    // The fixture as Google shapes it, pointed at the loopback endpoint.
    let mut key: Value =
        serde_json::from_slice(&std::fs::read(fixture("google/service-account.json")).unwrap())
            .unwrap();
    key["token_uri"] = json!(token_uri);
    std::fs::write(dir.path().join("sa.json"), key.to_string()).unwrap();
    let upstream = serve(echo).await;
    // No url and no client_id: the file names them.
    let token = Token::empty()
        .set("grant", string("jwt_bearer"))
        .auth("none")
        .scope("https://www.googleapis.com/auth/cloud-platform")
        .table(
            "jwt_bearer",
            Table::new().set("service_account_file", string("sa.json")),
        );
    let sidecar = sidecar_with(token, &upstream, dir).await;
    let seen = get(&sidecar.url("api", "/x")).await.echo();
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer ya29.c.b0AXv0zTOFixtureTokenNotReal")
    );
    let request = &endpoint.requests()[0];
    assert_eq!(request.path, "/token");
    let (_, claims, _, _) = jws(&request.form["assertion"]);
    assert_eq!(claims["aud"], token_uri.as_str());
}

#[tokio::test]
async fn token_exchange_sends_subject_and_actor_and_reads_the_subject_file_again() {
    let endpoint = token_endpoint(|n, _| async move { token_ok(&format!("sts-{n}"), 3600) }).await;
    let upstream = rejecting_once().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("subject"), "subject-one\n").unwrap();
    std::fs::write(dir.path().join("actor"), "actor-token").unwrap();
    let token = Token::empty()
        .url(&endpoint.url("/v1/token"))
        .set("grant", string("token_exchange"))
        .auth("none")
        .set("subject_token_file", string("subject"))
        .set(
            "subject_token_type",
            string("urn:ietf:params:oauth:token-type:id_token"),
        )
        .set("actor_token_file", string("actor"))
        .audience("//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k8s")
        .scope("https://www.googleapis.com/auth/cloud-platform");
    let sidecar = sidecar_with(token, &upstream, dir).await;
    // The projected token is rotated before the first token is rejected upstream.
    endpoint.wait_for_requests(1).await;
    std::fs::write(sidecar.file("subject"), "subject-two").unwrap();
    let seen = get(&sidecar.url("api", "/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer sts-1"));

    let requests = endpoint.requests();
    assert_eq!(requests.len(), 2);
    let form = &requests[0].form;
    assert_eq!(
        form["grant_type"],
        "urn:ietf:params:oauth:grant-type:token-exchange"
    );
    assert_eq!(form["subject_token"], "subject-one");
    assert_eq!(
        form["subject_token_type"],
        "urn:ietf:params:oauth:token-type:id_token"
    );
    assert_eq!(form["actor_token"], "actor-token");
    assert_eq!(
        form["actor_token_type"],
        "urn:ietf:params:oauth:token-type:jwt"
    );
    assert!(form["audience"].starts_with("//iam.googleapis.com/"));
    assert!(!form.contains_key("requested_token_type"));
    assert_eq!(requests[1].form["subject_token"], "subject-two");
}

#[tokio::test]
async fn token_type_n_a_is_taken_only_when_no_access_token_was_asked_for() {
    let endpoint = token_endpoint(|_, _| async {
        answer(
            StatusCode::OK,
            json!({
                "access_token": "an-id-token",
                "issued_token_type": "urn:ietf:params:oauth:token-type:id_token",
                "token_type": "N_A",
                "expires_in": 600,
            }),
        )
    })
    .await;
    let upstream = serve(echo).await;
    let token = |requested: Option<&str>| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("subject"), "s").unwrap();
        let mut token = Token::new(&endpoint.url("/token"), "app")
            .secret("s")
            .set("grant", string("token_exchange"))
            .set("subject_token_file", string("subject"));
        if let Some(requested) = requested {
            token = token.set("requested_token_type", string(requested));
        }
        (token, dir)
    };
    let (asked, dir) = token(Some("urn:ietf:params:oauth:token-type:id_token"));
    let sidecar = sidecar_with(asked, &upstream, dir).await;
    let seen = get(&sidecar.url("api", "/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer an-id-token"));

    let (default, dir) = token(None);
    let refused = sidecar_with(default, &upstream, dir).await;
    let answer = get(&refused.url("api", "/x")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn grants_ask_for_their_own_keys_and_say_why_a_combination_is_refused() {
    let check = |token: Token, cache: bool| {
        let mut config = ConfigBuilder::new()
            .upstream(Upstream::new("api", "https://api.example.com").token(token));
        if cache {
            config = config.table(
                "cache",
                Table::new()
                    .set("backend", string("file"))
                    .set("dir", string("/var/cache/bearerd"))
                    .set("key_file", string("/etc/bearerd/cache.key")),
            );
        }
        match bearerd::config::Config::parse(Path::new("/etc/bearerd.toml"), &config.render()) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let url = "https://auth.example.com/token";
    let sa = fixture("google/service-account.json");
    let sa = sa.to_str().unwrap();
    let cases = [
        (
            Token::new(url, "app").auth("none"),
            "auth = \"none\" with grant = \"client_credentials\": that grant is the client's own credentials",
        ),
        (
            Token::new(url, "app").secret("s").set("dpop", true).set("header", string("X-Token")),
            "upstream[0].token.header: is not allowed with dpop = true: RFC 9449 §7.1",
        ),
        (
            Token::new(url, "app").secret("s").set("header", string("Host")),
            "upstream[0].token.header: \"host\" is a header bearerd sets",
        ),
        (
            Token::new(url, "app").secret("s").set("prefix", string("Bearer x")),
            "upstream[0].token.prefix: must be one word",
        ),
        (
            Token::new(url, "app").auth("none").set("grant", string("jwt_bearer")),
            "upstream[0].token.jwt_bearer: missing: grant = \"jwt_bearer\" needs a [upstream[0].token.jwt_bearer] table",
        ),
        (
            Token::new(url, "app").secret("s").set("subject_token_file", string("t")),
            "upstream[0].token.subject_token_file: is used by grant = \"token_exchange\" only, and this table's grant is \"client_credentials\"",
        ),
        (
            Token::new(url, "app").secret("s").set("grant", string("token_exchange")),
            "upstream[0].token.subject_token_file: missing: grant = \"token_exchange\" needs subject_token_file",
        ),
        (
            Token::new(url, "app")
                .secret("s")
                .set("grant", string("refresh_token"))
                .set("refresh_token_file", string("rt")),
            "upstream[0].token.grant: grant = \"refresh_token\" needs a [cache] with key_file: the server rotates the refresh token",
        ),
        (
            Token::new(url, "app").auth("none").set("grant", string("jwt_bearer")).table(
                "jwt_bearer",
                Table::new().set("service_account_file", string(sa)),
            ),
            "upstream[0].token.url: differs from the service-account file's token_uri (https://oauth2.googleapis.com/token)",
        ),
        (
            Token::empty().auth("none").set("grant", string("jwt_bearer")).table(
                "jwt_bearer",
                Table::new()
                    .set("service_account_file", string(sa))
                    .set("issuer", string("me")),
            ),
            "upstream[0].token.jwt_bearer.issuer: is set by service_account_file",
        ),
        (
            Token::new(url, "app").auth("none").set("grant", string("jwt_bearer")).table(
                "jwt_bearer",
                Table::new().set("private_key_file", string("k.pem")).set("isuer", string("x")),
            ),
            "did you mean `issuer`?",
        ),
    ];
    for (token, expected) in cases {
        let message = check(token, false);
        assert!(
            message.contains(expected),
            "expected {expected:?} in:\n{message}"
        );
    }
    // What each grant needs, and no more, is valid.
    let valid = [
        Token::empty()
            .auth("none")
            .set("grant", string("jwt_bearer"))
            .table(
                "jwt_bearer",
                Table::new().set("service_account_file", string(sa)),
            ),
        Token::empty()
            .url("https://oauth2.googleapis.com/token")
            .auth("none")
            .set("grant", string("jwt_bearer"))
            .table(
                "jwt_bearer",
                Table::new().set("service_account_file", string(sa)),
            ),
        Token::new(url, "app")
            .auth("private_key_jwt")
            .set("private_key_file", string("client.pem"))
            .set("grant", string("jwt_bearer"))
            .table(
                "jwt_bearer",
                Table::new().set("private_key_file", string("grant.pem")),
            ),
        Token::empty()
            .url(url)
            .auth("none")
            .set("grant", string("token_exchange"))
            .set("subject_token_file", string("/var/run/secrets/tokens/gcp")),
        Token::new(url, "app")
            .auth("none")
            .set("header", string("X-Auth-Token"))
            .set("prefix", string(""))
            .set("grant", string("token_exchange"))
            .set("subject_token_file", string("t")),
    ];
    for token in valid {
        assert_eq!(check(token, false), "");
    }
    let refresh = || {
        Token::new(url, "app")
            .secret("s")
            .set("grant", string("refresh_token"))
            .set("refresh_token_file", string("rt"))
    };
    assert_eq!(check(refresh(), true), "");
    // The chain is stored under the DPoP key: one made at each start would lose it.
    let message = check(refresh().set("dpop", true), true);
    assert!(
        message.contains("upstream[0].token.dpop_key_file: missing: grant = \"refresh_token\" with dpop needs dpop_key_file: the rotated refresh token is stored under the DPoP key, and a key made at each start would lose the chain at the next restart"),
        "{message}"
    );
    // Both reasons at once, when both are missing.
    let message = check(refresh().set("dpop", true), false);
    assert!(
        message.contains("needs a [cache] with key_file"),
        "{message}"
    );
    assert!(
        message.contains("with dpop needs dpop_key_file"),
        "{message}"
    );
    assert_eq!(
        check(
            refresh()
                .set("dpop", true)
                .set("dpop_key_file", string("dpop.pem")),
            true
        ),
        ""
    );
    assert_eq!(check(refresh().set("dpop", false), true), "");
}
