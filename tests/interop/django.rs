//! bearerd against a real Django OAuth Toolkit server (the kind Standard Metrics runs; token
//! path `/o/token/`), with `auth = "basic"` and `auth = "post"`.
//!
//! Each test starts its own DOT server (`tests/interop/serve.py`: a minimal Django project,
//! SQLite in a temporary directory, waitress on a loopback port the kernel picks), bearerd
//! in-process, and an upstream that checks every bearer token it gets at DOT's introspection
//! endpoint (RFC 7662) as a resource server would, answering 401 `invalid_token` when DOT says
//! the token is not active. The tests are ignored by a plain `cargo test`: they need the
//! Python virtualenv that `make interop` (`scripts/interop.sh`) makes, which then runs them
//! with `BEARERD_INTEROP_PYTHON` naming its interpreter.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::{json, send, serve, Answer, Body, Server, Sidecar};

/// bearerd's application at DOT. The secret holds characters that form-urlencoding changes
/// (space, `+`, `/`, `:`, `%`, `&`, `=`, non-ASCII), so both client authentication methods
/// are checked for encoding them as DOT decodes them.
const CLIENT_ID: &str = "bearerd-interop";
const CLIENT_SECRET: &str = "s3cr3t +/:%&=é";
/// The resource server's application, which the upstream introspects tokens as.
const RS_CLIENT_ID: &str = "resource-server";
const RS_CLIENT_SECRET: &str = "rs-s3cr3t";

/// Bound on starting DOT, and on each test as a whole.
const PATIENCE: Duration = Duration::from_secs(60);

/// A DOT server, run as a child process and killed by its PID when dropped.
struct Dot {
    child: Child,
    /// Held open: the server exits by itself when it closes (the test process is gone).
    _stdin: ChildStdin,
    port: u16,
    dir: tempfile::TempDir,
}

impl Dot {
    /// Creates the database and the two applications, starts the server and waits for the
    /// port it reports.
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// The same, with more of the setup command's environment (a refresh token to issue).
    fn start_with(extra: &[(&str, &str)]) -> Self {
        let python = std::env::var_os("BEARERD_INTEROP_PYTHON").unwrap_or_else(|| {
            panic!(
                "BEARERD_INTEROP_PYTHON is not set: these tests need the Django OAuth Toolkit \
                 virtualenv; run `make interop` (scripts/interop.sh), which makes it and sets \
                 BEARERD_INTEROP_PYTHON to its python"
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("dot.log")).unwrap();
        let mut child = Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/interop/serve.py"
            ))
            .env("BEARERD_INTEROP_DB_DIR", dir.path())
            .env("BEARERD_INTEROP_CLIENT_ID", CLIENT_ID)
            .env("BEARERD_INTEROP_CLIENT_SECRET", CLIENT_SECRET)
            .env("BEARERD_INTEROP_RS_CLIENT_ID", RS_CLIENT_ID)
            .env("BEARERD_INTEROP_RS_CLIENT_SECRET", RS_CLIENT_SECRET)
            .envs(extra.iter().copied())
            // No __pycache__ in the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python:?} (BEARERD_INTEROP_PYTHON): {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = support::lines_of(stdout);
        let mut dot = Self {
            child,
            _stdin: stdin,
            port: 0,
            dir,
        };
        let deadline = std::time::Instant::now() + PATIENCE;
        dot.port = loop {
            match lines.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            {
                Ok(line) => {
                    if let Some(port) = line.strip_prefix("listening on 127.0.0.1:") {
                        break port.parse().unwrap();
                    }
                }
                // Dropping `dot` prints its log.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = dot.child.wait().unwrap();
                    panic!("DOT exited ({status}) before it reported its port")
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("DOT did not report its port within {PATIENCE:?}")
                }
            }
        };
        dot
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dot.log")).unwrap_or_default()
    }

    /// Requests DOT's token endpoint answered so far, by status (`/interop/stats/`).
    async fn token_requests(&self) -> serde_json::Value {
        let answer = support::get(&self.url("/interop/stats/")).await;
        assert_eq!(answer.status, StatusCode::OK);
        answer.json()["token_requests"].clone()
    }

    /// Access tokens DOT holds (revoked ones are deleted).
    async fn access_tokens(&self) -> u64 {
        let answer = support::get(&self.url("/interop/stats/")).await;
        answer.json()["access_tokens"].as_u64().unwrap()
    }

    /// Revokes `token` at `/o/revoke_token/` (RFC 7009) as bearerd's client, which DOT
    /// requires: a client may revoke only its own tokens.
    async fn revoke(&self, token: &str) {
        let answer = send(form_post(
            &self.url("/o/revoke_token/"),
            (CLIENT_ID, CLIENT_SECRET),
            &[("token", token), ("token_type_hint", "access_token")],
        ))
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", text(&answer));
    }
}

impl Drop for Dot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("DOT's log:\n{}", self.log());
        }
    }
}

/// A form POST with HTTP Basic client authentication, the id and secret form-urlencoded
/// first (RFC 6749 §2.3.1).
fn form_post(url: &str, (id, secret): (&str, &str), form: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        encode(id),
        encode(secret)
    ));
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    Request::post(url)
        .header("authorization", format!("Basic {basic}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn text(answer: &Answer) -> String {
    String::from_utf8_lossy(&answer.body).into_owned()
}

/// A resource server: it introspects each bearer token at DOT and answers 200 with what DOT
/// said (`active`, `scope`, `client_id`), or 401 `invalid_token` when the token is not active.
/// It keeps every token it was sent, in order.
struct Upstream {
    server: Server,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    async fn start(dot: &Dot) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let introspect_url = dot.url("/o/introspect/");
        let record = Arc::clone(&seen);
        let server = serve(move |request: Request<hyper::body::Incoming>| {
            let introspect_url = introspect_url.clone();
            let record = Arc::clone(&record);
            async move {
                let token = request
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_owned);
                let Some(token) = token else {
                    return invalid_token();
                };
                record.lock().unwrap().push(token.clone());
                let answer = send(form_post(
                    &introspect_url,
                    (RS_CLIENT_ID, RS_CLIENT_SECRET),
                    &[("token", &token)],
                ))
                .await;
                if answer.status != StatusCode::OK {
                    let failed = serde_json::json!({
                        "introspection_status": answer.status.as_u16(),
                        "body": text(&answer),
                    });
                    return json(StatusCode::BAD_GATEWAY, failed);
                }
                let introspection = answer.json();
                if introspection["active"] != true {
                    return invalid_token();
                }
                json(
                    StatusCode::OK,
                    serde_json::json!({
                        "active": true,
                        "scope": introspection["scope"],
                        "client_id": introspection["client_id"],
                        "path": request.uri().path(),
                    }),
                )
            }
        })
        .await;
        Self { server, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// RFC 6750 §3.1.
fn invalid_token() -> Response<Body> {
    let mut response = json(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({"error": "invalid_token"}),
    );
    response.headers_mut().insert(
        "www-authenticate",
        http::HeaderValue::from_static(r#"Bearer error="invalid_token""#),
    );
    response
}

/// bearerd for one upstream `api` in front of `upstream`, getting tokens from `token_url` as
/// `CLIENT_ID` with `secret`; `token` is appended to `[upstream.token]`.
async fn sidecar(upstream: &Upstream, token_url: &str, secret: &str, token: &str) -> Sidecar {
    let token = format!("client_id = \"{CLIENT_ID}\"\nclient_secret = \"{secret}\"\n{token}\n");
    Sidecar::start(&support::config(
        "api",
        &upstream.server.url(""),
        token_url,
        &token,
    ))
    .await
}

/// Runs a test body, failing it if it takes longer than [`PATIENCE`].
async fn bounded(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(PATIENCE, test)
        .await
        .expect("the test took too long");
}

/// Requests go through with a token DOT issued to bearerd's client; one token request serves
/// them all.
async fn end_to_end(auth: &str) {
    let dot = Dot::start();
    let upstream = Upstream::start(&dot).await;
    let sidecar = sidecar(
        &upstream,
        &dot.url("/o/token/"),
        CLIENT_SECRET,
        &format!("auth = \"{auth}\""),
    )
    .await;

    for path in ["/items", "/items/1?expand=all"] {
        let answer = support::get(&sidecar.url("api", path)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", text(&answer));
        let body = answer.json();
        assert_eq!(body["active"], true);
        assert_eq!(body["client_id"], CLIENT_ID);
        // Without `scope`, DOT grants every scope the server knows.
        assert_eq!(body["scope"], "read write");
        assert_eq!(body["path"], path.split('?').next().unwrap());
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0], seen[1], "both requests carried the one token");
    assert_eq!(
        dot.token_requests().await,
        serde_json::json!({"200": 1}),
        "one token request, accepted"
    );
    let state = sidecar.running().token_source("api").unwrap().state();
    let token = state.token.unwrap();
    // DOT's `expires_in` (ACCESS_TOKEN_EXPIRE_SECONDS in tests/interop/dotserver/settings.py).
    assert_eq!(token.lifetime, Duration::from_secs(3600));
    assert_eq!(token.scope.as_deref(), Some("read write"));
    sidecar.stop().await;
}

#[tokio::test]
#[ignore = "needs the Django OAuth Toolkit virtualenv: run `make interop`"]
async fn basic_auth_end_to_end() {
    bounded(end_to_end("basic")).await;
}

#[tokio::test]
#[ignore = "needs the Django OAuth Toolkit virtualenv: run `make interop`"]
async fn post_auth_end_to_end() {
    bounded(end_to_end("post")).await;
}

/// A wrong secret: DOT answers 401 `{"error": "invalid_client"}` (whichever way the client
/// authenticates), bearerd reports it, and the app gets 503 without the upstream being asked.
#[tokio::test]
#[ignore = "needs the Django OAuth Toolkit virtualenv: run `make interop`"]
async fn wrong_secret_is_reported_as_invalid_client() {
    bounded(async {
        let dot = Dot::start();
        let upstream = Upstream::start(&dot).await;
        for auth in ["basic", "post"] {
            let sidecar = sidecar(
                &upstream,
                &dot.url("/o/token/"),
                "not-the-secret",
                &format!("auth = \"{auth}\""),
            )
            .await;
            let answer = support::get(&sidecar.url("api", "/items")).await;
            assert_eq!(
                answer.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "auth {auth}: {}",
                text(&answer)
            );
            let body = answer.json();
            assert_eq!(body["error"], "token_unavailable");
            assert_eq!(body["upstream"], "api");
            let detail = body["detail"].as_str().unwrap();
            assert!(
                detail.contains("status 401 Unauthorized") && detail.contains("\"invalid_client\""),
                "auth {auth}: {detail}"
            );
            assert!(!detail.contains("not-the-secret"), "{detail}");
            sidecar.stop().await;
        }
        assert!(upstream.seen().is_empty(), "no request went upstream");
        let requests = dot.token_requests().await;
        assert!(requests.get("200").is_none(), "{requests}");
        assert!(requests["401"].as_u64().unwrap() >= 2, "{requests}");
    })
    .await;
}

/// `scope = "read"`: DOT grants it, says so in the token response (bearerd's token source
/// keeps it) and in introspection.
#[tokio::test]
#[ignore = "needs the Django OAuth Toolkit virtualenv: run `make interop`"]
async fn requested_scope_is_granted() {
    bounded(async {
        let dot = Dot::start();
        let upstream = Upstream::start(&dot).await;
        let sidecar = sidecar(
            &upstream,
            &dot.url("/o/token/"),
            CLIENT_SECRET,
            "scope = \"read\"",
        )
        .await;
        let answer = support::get(&sidecar.url("api", "/items")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", text(&answer));
        assert_eq!(answer.json()["scope"], "read");
        let state = sidecar.running().token_source("api").unwrap().state();
        assert_eq!(state.token.unwrap().scope.as_deref(), Some("read"));
        sidecar.stop().await;
    })
    .await;
}

/// A scope outside DOT's `SCOPES`: 400 `invalid_scope`, reported to the app in the 503.
#[tokio::test]
#[ignore = "needs the Django OAuth Toolkit virtualenv: run `make interop`"]
async fn unknown_scope_is_reported_as_invalid_scope() {
    bounded(async {
        let dot = Dot::start();
        let upstream = Upstream::start(&dot).await;
        let sidecar = sidecar(
            &upstream,
            &dot.url("/o/token/"),
            CLIENT_SECRET,
            "scope = \"read admin\"",
        )
        .await;
        let answer = support::get(&sidecar.url("api", "/items")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        let detail = answer.json()["detail"].as_str().unwrap().to_owned();
        assert!(
            detail.contains("status 400 Bad Request") && detail.contains("\"invalid_scope\""),
            "{detail}"
        );
        assert!(upstream.seen().is_empty());
        sidecar.stop().await;
    })
    .await;
}

/// A token revoked at DOT: introspection says inactive, the upstream answers 401, bearerd
/// fetches one new token and replays the request, which succeeds.
#[tokio::test]
#[ignore = "needs the Django OAuth Toolkit virtualenv: run `make interop`"]
async fn revoked_token_is_replaced_and_the_request_replayed() {
    bounded(async {
        let dot = Dot::start();
        let upstream = Upstream::start(&dot).await;
        let sidecar = sidecar(&upstream, &dot.url("/o/token/"), CLIENT_SECRET, "").await;

        let answer = support::get(&sidecar.url("api", "/before")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", text(&answer));
        let first = upstream.seen()[0].clone();
        assert_eq!(dot.token_requests().await, serde_json::json!({"200": 1}));

        dot.revoke(&first).await;
        assert_eq!(dot.access_tokens().await, 0, "DOT deletes a revoked token");

        let post = Request::post(sidecar.url("api", "/after"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
            .unwrap();
        let answer = send(post).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", text(&answer));
        assert_eq!(answer.json()["path"], "/after");

        let seen = upstream.seen();
        assert_eq!(
            seen.len(),
            3,
            "first request, then the rejected try and its replay"
        );
        assert_eq!(seen[1], first, "the revoked token was tried");
        assert_ne!(seen[2], first, "the replay carried a new token");
        assert_eq!(
            dot.token_requests().await,
            serde_json::json!({"200": 2}),
            "exactly one more token request"
        );
        assert_eq!(dot.access_tokens().await, 1);

        let scrape = sidecar.running().metrics().render().unwrap();
        assert_eq!(
            support::metric(
                &scrape,
                r#"bearerd_upstream_unauthorized_retries_total{upstream="api"}"#
            ),
            Some(1.0)
        );
        // The next request uses the new token without asking DOT again.
        let answer = support::get(&sidecar.url("api", "/later")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", text(&answer));
        assert_eq!(upstream.seen()[3], seen[2]);
        assert_eq!(dot.token_requests().await, serde_json::json!({"200": 2}));
        sidecar.stop().await;
    })
    .await;
}

/// `/o/token` without the trailing slash: Django's CommonMiddleware answers 301 to
/// `/o/token/`, which bearerd does not follow; the app's 503 says so, and the log says where
/// it pointed.
#[tokio::test]
#[ignore = "needs the Django OAuth Toolkit virtualenv: run `make interop`"]
async fn token_path_without_trailing_slash_is_a_redirect() {
    bounded(async {
        let dot = Dot::start();
        let upstream = Upstream::start(&dot).await;
        let sidecar = sidecar(&upstream, &dot.url("/o/token"), CLIENT_SECRET, "").await;
        let answer = support::get(&sidecar.url("api", "/items")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        let detail = answer.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains("301"), "{detail}");
        assert!(detail.contains("a redirect"), "{detail}");
        // Where it points is the endpoint's word: the log has it, the app does not.
        assert!(!detail.contains("/o/token/"), "{detail}");
        let logged = sidecar
            .running()
            .token_source("api")
            .unwrap()
            .state()
            .last_error
            .unwrap()
            .to_string();
        assert!(logged.contains("Location \"/o/token/\""), "{logged}");
        assert_eq!(dot.token_requests().await, serde_json::json!({}));
        sidecar.stop().await;
    })
    .await;
}

/// The refresh token the setup command issues to bearerd's client for a user, as if the user
/// had authorised it once.
const FIRST_REFRESH_TOKEN: &str = "interop-first-refresh-token";

/// `grant = "refresh_token"` against DOT, which rotates refresh tokens (its default,
/// ROTATE_REFRESH_TOKEN) and revokes the old access token with the old refresh token: the
/// first fetch spends the issued refresh token and stores the next one sealed; once the
/// upstream's introspection says the access token is revoked, the second fetch spends the
/// rotated one, which DOT accepts (the spent one would be `invalid_grant`).
#[tokio::test]
#[ignore = "needs the Django OAuth Toolkit virtualenv: run `make interop`"]
async fn refresh_token_rotation_end_to_end() {
    bounded(async {
        let dot = Dot::start_with(&[("BEARERD_INTEROP_REFRESH_TOKEN", FIRST_REFRESH_TOKEN)]);
        let upstream = Upstream::start(&dot).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("refresh_token"), FIRST_REFRESH_TOKEN).unwrap();
        let key = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        std::fs::write(dir.path().join("cache.key"), key).unwrap();
        let token = format!(
            "client_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\ngrant = \"refresh_token\"\nrefresh_token_file = \"refresh_token\"\n\n[cache]\nbackend = \"file\"\ndir = \"tokens\"\nkey_file = \"cache.key\"\n"
        );
        let config = support::config("api", &upstream.server.url(""), &dot.url("/o/token/"), &token);
        let sidecar = Sidecar::start_in(dir, &config).await;

        let answer = support::get(&sidecar.url("api", "/items")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}\n{}", text(&answer), dot.log());
        let first = upstream.seen()[0].clone();
        let stored: Vec<_> = std::fs::read_dir(sidecar.file("tokens"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with("-refresh.json"))
            .collect();
        assert_eq!(stored.len(), 1, "the rotated refresh token is stored");

        // The token is rejected (as an upstream's 401 would): bearerd fetches again, with the
        // rotated refresh token. (Revoking the access token at DOT instead would leave its
        // refresh token without scopes: DOT takes them from the access token.)
        let source = sidecar.running().token_source("api").unwrap();
        let held = source.state().token.unwrap();
        let replacement = source.replacement_for(&held).await.unwrap();
        assert_ne!(replacement.authorization(), held.authorization());
        let answer = support::get(&sidecar.url("api", "/items")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}\n{}", text(&answer), dot.log());
        assert_ne!(upstream.seen().last().unwrap(), &first, "a new access token");
        assert_eq!(
            dot.token_requests().await,
            serde_json::json!({"200": 2}),
            "two refreshes, each with the newest refresh token, both accepted"
        );
        sidecar.stop().await;
    })
    .await;
}
