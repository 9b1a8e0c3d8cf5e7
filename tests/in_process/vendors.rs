//! The five token endpoints of `shared/seeds/`, each played by a fixture that checks the
//! request exactly as the vendor documents it and answers as the vendor documents, including
//! its errors. bearerd must get a token from each, and report each error clearly.
//!
//! The cases are one table, [`vendor_cases!`]: per case the vendor, its fixture, the token
//! path, the `[upstream.token]` settings and what must come of them. Each case is a test of
//! its own, and every message it fails with starts with the vendor's name.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::ops::RangeInclusive;

use http::StatusCode;
use support::config::{ConfigBuilder, Token, Upstream};
use support::vendors::*;
use support::{echo, get, serve, token_endpoint, Body, Sidecar, TokenRequest};

/// A vendor's token endpoint, as `token_endpoint` serves it.
type Fixture = fn(usize, TokenRequest) -> std::future::Ready<http::Response<Body>>;

/// One request from an app through bearerd to a vendor's token endpoint.
struct Case {
    vendor: &'static str,
    fixture: Fixture,
    /// The token endpoint's path, as configured.
    path: &'static str,
    /// The `[upstream.token]` settings after `url` and `client_id`.
    token: fn(Token) -> Token,
    expect: Expect,
}

/// What must come of a [`Case`].
enum Expect {
    /// The app's request reached the upstream with the token; bearerd asked for it once.
    Injected {
        authorization: Text,
        /// The lifetime bearerd took from the grant, in seconds.
        lifetime: RangeInclusive<u64>,
        scope: Option<&'static str>,
        /// How many form fields the token request had.
        form_fields: usize,
    },
    /// The token endpoint refused: the 503's `detail` the app is told and the error that is
    /// logged, both without the endpoint's address.
    Reported { told: Text, logged: Text },
}

/// An expected text.
#[derive(Clone, Copy, Debug)]
enum Text {
    Is(&'static str),
    StartsWith(&'static str),
    EndsWith(&'static str),
}

impl Text {
    fn check(self, vendor: &str, what: &str, actual: &str) {
        let matches = match self {
            Text::Is(expected) => actual == expected,
            Text::StartsWith(prefix) => actual.starts_with(prefix),
            Text::EndsWith(suffix) => actual.ends_with(suffix),
        };
        assert!(matches, "{vendor}: {what}: {actual:?}, expected {self:?}");
    }
}

use Expect::{Injected, Reported};
use Text::{EndsWith, Is, StartsWith};

/// The secret in the file `secret`, sent with Basic (the default).
fn basic(token: Token) -> Token {
    token.secret_file("secret")
}

/// A wrong secret.
fn wrong_secret(token: Token) -> Token {
    token.secret("wrong")
}

/// Starts the case's fixture and bearerd in front of an echo upstream, sends one app request
/// and checks what came of it.
async fn run(case: Case) {
    let vendor = case.vendor;
    let endpoint = token_endpoint(case.fixture).await;
    let upstream = serve(echo).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), format!("{SECRET}\n")).unwrap();
    let token = (case.token)(Token::new(&endpoint.url(case.path), ID));
    let config =
        ConfigBuilder::new().upstream(Upstream::new("vendor", &upstream.url("/api")).token(token));
    let sidecar = Sidecar::start_in(dir, &config.render()).await;
    let answer = get(&sidecar.url("vendor", "/things?page=2")).await;
    drop(upstream);
    match case.expect {
        Injected {
            authorization,
            lifetime,
            scope,
            form_fields,
        } => {
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "{vendor}: {:?}",
                String::from_utf8_lossy(&answer.body)
            );
            let echoed = answer.echo();
            let sent = echoed.header("authorization").unwrap_or_default();
            authorization.check(vendor, "authorization", sent);
            assert_eq!(echoed.uri, "/api/things?page=2", "{vendor}");
            let token = sidecar
                .running()
                .token_source("vendor")
                .unwrap()
                .state()
                .token
                .unwrap();
            let seconds = token.lifetime.as_secs();
            assert!(
                lifetime.contains(&seconds),
                "{vendor}: lifetime {seconds} s, expected {lifetime:?}"
            );
            assert_eq!(token.scope.as_deref(), scope, "{vendor}: scope");
            assert_eq!(endpoint.count(), 1, "{vendor}: token requests");
            let form = &endpoint.requests()[0].form;
            assert_eq!(form.len(), form_fields, "{vendor}: {form:?}");
        }
        Reported { told, logged } => {
            let (told_text, logged_text) = reported(vendor, &answer, &sidecar);
            told.check(vendor, "told the app", &told_text);
            logged.check(vendor, "logged", &logged_text);
        }
    }
    sidecar.stop().await;
}

/// The failure as the app was told it (the 503's `detail`: status and error code only) and as
/// the log tells it (with what else the endpoint said), each without the endpoint's address,
/// so that expectations can be written down.
fn reported(vendor: &str, answer: &support::Answer, sidecar: &Sidecar) -> (String, String) {
    let told = unavailable_detail(vendor, answer);
    let logged = sidecar
        .running()
        .token_source("vendor")
        .unwrap()
        .state()
        .last_error
        .unwrap_or_else(|| panic!("{vendor}: no error kept"))
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
fn unavailable_detail(vendor: &str, answer: &support::Answer) -> String {
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{vendor}: {:?}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(answer.headers.contains_key("retry-after"), "{vendor}");
    let body = answer.json();
    assert_eq!(body["error"], "token_unavailable", "{vendor}");
    assert_eq!(body["upstream"], "vendor", "{vendor}");
    let detail = body["detail"].as_str().unwrap().to_owned();
    assert!(!detail.contains(SECRET), "{vendor}: {detail}");
    detail
}

/// One `#[tokio::test]` per case, named by the case.
macro_rules! vendor_cases {
    ($($test:ident: $case:expr;)*) => {
        $(
            #[tokio::test]
            async fn $test() {
                run($case).await;
            }
        )*
    };
}

vendor_cases! {
    // --- AT&T USM Anywhere: /api/2.0/oauth/token, Basic, {"result","location","error"} errors.
    usm_anywhere_token_is_injected: Case {
        vendor: "USM Anywhere",
        fixture: usm_anywhere,
        path: "/api/2.0/oauth/token",
        token: basic,
        expect: Injected {
            authorization: Is("Bearer xxx.yyy.zzz"),
            lifetime: 899..=899,
            scope: Some("trust read write"),
            form_fields: 1,
        },
    };
    usm_anywhere_401_is_reported: Case {
        vendor: "USM Anywhere",
        fixture: usm_anywhere,
        path: "/api/2.0/oauth/token",
        token: wrong_secret,
        expect: Reported {
            told: Is("token endpoint rejected the request: status 401 Unauthorized, error \"Bad credentials\""),
            logged: Is("token endpoint rejected the request: status 401 Unauthorized, error \"Bad credentials\": Unauthorized; at /api/2.0/oauth/token"),
        },
    };

    // --- Auth0: /oauth/token, credentials in the body, audience required.
    auth0_sends_credentials_and_audience_in_the_body: Case {
        vendor: "Auth0",
        fixture: auth0,
        path: "/oauth/token",
        token: |token| {
            basic(token)
                .auth("post")
                .audience("https://api.example.com/")
                .params(&[("organization", "org_123")])
        },
        expect: Injected {
            authorization: Is("Bearer eyJz93a.k4laUWw.org_123"),
            lifetime: 86400..=86400,
            scope: None,
            form_fields: 5,
        },
    };
    auth0_without_audience_is_a_403: Case {
        vendor: "Auth0",
        fixture: auth0,
        path: "/oauth/token",
        token: |token| basic(token).auth("post"),
        expect: Reported {
            told: Is("token endpoint rejected the request: status 403 Forbidden, error \"access_denied\""),
            logged: Is("token endpoint rejected the request: status 403 Forbidden, error \"access_denied\": No audience parameter was provided, and no default audience has been configured"),
        },
    };
    auth0_rejects_basic_auth: Case {
        vendor: "Auth0",
        fixture: auth0,
        path: "/oauth/token",
        token: |token| basic(token).audience("https://api.example.com/"),
        expect: Reported {
            told: EndsWith("status 401 Unauthorized, error \"access_denied\""),
            logged: EndsWith("status 401 Unauthorized, error \"access_denied\": Unauthorized"),
        },
    };

    // --- Alternative Payments: /oauth/token, Basic, 403 with a flat string map.
    alternative_payments_token_is_injected: Case {
        vendor: "Alternative Payments",
        fixture: alternative_payments,
        path: "/oauth/token",
        token: basic,
        expect: Injected {
            authorization: Is("Bearer 580defdbe1d21e0001c67e5c2a0a6c98ba8b4a059dc5825388501574"),
            lifetime: 3600..=3600,
            scope: None,
            form_fields: 1,
        },
    };
    alternative_payments_403_flat_map_is_reported: Case {
        vendor: "Alternative Payments",
        fixture: alternative_payments,
        path: "/oauth/token",
        token: wrong_secret,
        expect: Reported {
            told: Is("token endpoint rejected the request: status 403 Forbidden"),
            logged: Is("token endpoint rejected the request: status 403 Forbidden: Invalid credentials"),
        },
    };

    // --- IBM Watson Work: /oauth/token, Basic, JWT token, 400/401/500 errors.
    ibm_watson_work_jwt_exp_sets_the_lifetime: Case {
        vendor: "IBM Watson Work",
        fixture: |n, request| ibm_watson_work(false)(n, request),
        path: "/oauth/token",
        token: basic,
        expect: Injected {
            authorization: StartsWith("Bearer eyJ"),
            lifetime: 7190..=7200,
            scope: Some("ibm openid"),
            form_fields: 1,
        },
    };
    ibm_watson_work_401_is_reported: Case {
        vendor: "IBM Watson Work",
        fixture: |n, request| ibm_watson_work(false)(n, request),
        path: "/oauth/token",
        token: wrong_secret,
        expect: Reported {
            told: Is("token endpoint rejected the request: status 401 Unauthorized, error \"invalid_client\""),
            logged: Is("token endpoint rejected the request: status 401 Unauthorized, error \"invalid_client\": Bad client credentials"),
        },
    };
    ibm_watson_work_500_is_reported: Case {
        vendor: "IBM Watson Work",
        fixture: |n, request| ibm_watson_work(true)(n, request),
        path: "/oauth/token",
        token: basic,
        expect: Reported {
            told: Is("token endpoint failed: status 500 Internal Server Error, error \"server_error\""),
            logged: Is("token endpoint failed: status 500 Internal Server Error, error \"server_error\": Internal error"),
        },
    };
    // The wrong path is the fixture's only way to see a malformed request from bearerd.
    ibm_watson_work_400_names_the_problem: Case {
        vendor: "IBM Watson Work",
        fixture: |n, request| ibm_watson_work(false)(n, request),
        path: "/oauth/token/",
        token: basic,
        expect: Reported {
            told: Is("token endpoint rejected the request: status 400 Bad Request, error \"invalid_request\""),
            logged: Is("token endpoint rejected the request: status 400 Bad Request, error \"invalid_request\": path /oauth/token/"),
        },
    };

    // --- Standard Metrics (Django OAuth Toolkit): /o/token/ with the slash, Basic, scope back.
    standard_metrics_token_is_injected: Case {
        vendor: "Standard Metrics",
        fixture: standard_metrics,
        path: "/o/token/",
        token: basic,
        expect: Injected {
            authorization: Is("Bearer ACCESS_TOKEN"),
            lifetime: 3600..=3600,
            scope: Some("read write"),
            form_fields: 1,
        },
    };
    standard_metrics_invalid_client_is_reported: Case {
        vendor: "Standard Metrics",
        fixture: standard_metrics,
        path: "/o/token/",
        token: wrong_secret,
        expect: Reported {
            told: Is("token endpoint rejected the request: status 401 Unauthorized, error \"invalid_client\""),
            logged: Is("token endpoint rejected the request: status 401 Unauthorized, error \"invalid_client\""),
        },
    };
    standard_metrics_without_trailing_slash_is_a_400: Case {
        vendor: "Standard Metrics",
        fixture: standard_metrics,
        path: "/o/token",
        token: basic,
        expect: Reported {
            told: EndsWith("status 400 Bad Request, error \"invalid_request\""),
            logged: EndsWith("status 400 Bad Request, error \"invalid_request\": path /o/token"),
        },
    };
}
