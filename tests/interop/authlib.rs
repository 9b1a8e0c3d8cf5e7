//! bearerd against an Authlib authorization server (`tests/interop/authlib_server.py`): the
//! JWT bearer grant (Authlib verifies the assertion with the client's public key, its `aud`,
//! `exp` and `iss`) and the refresh-token grant with rotation (a spent refresh token is
//! revoked). Every token the upstream gets is checked by the server's introspection. Ignored
//! by a plain `cargo test`: they need the interop virtualenv (`make interop`), with
//! `BEARERD_INTEROP_PYTHON` naming its interpreter.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use http::{Request, StatusCode};
use support::{json, send, serve, Server, Sidecar};

const JWT_CLIENT: &str = "bearerd-jwt";
const RT_CLIENT: &str = "bearerd-rt";
const RT_SECRET: &str = "rt-s3cret";
const FIRST_REFRESH_TOKEN: &str = "authlib-first-refresh-token";
const PATIENCE: Duration = Duration::from_secs(60);

fn key() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/keys/ec-p256.pem"
    )
    .to_owned()
}

/// The Authlib server, killed when dropped.
struct Authlib {
    child: Child,
    _stdin: ChildStdin,
    port: u16,
}

impl Authlib {
    fn start() -> Self {
        let python = std::env::var_os("BEARERD_INTEROP_PYTHON")
            .expect("BEARERD_INTEROP_PYTHON is not set: run `make interop`");
        let mut child = Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/interop/authlib_server.py"
            ))
            .env("BEARERD_INTEROP_JWT_CLIENT", JWT_CLIENT)
            .env("BEARERD_INTEROP_JWT_KEY", key())
            .env(
                "BEARERD_INTEROP_RT_CLIENT",
                format!("{RT_CLIENT}:{RT_SECRET}"),
            )
            .env("BEARERD_INTEROP_RT_FIRST", FIRST_REFRESH_TOKEN)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = support::lines_of(child.stdout.take().unwrap());
        let port = loop {
            match lines.recv_timeout(PATIENCE) {
                Ok(line) => {
                    if let Some(port) = line.strip_prefix("listening on 127.0.0.1:") {
                        break port.parse().unwrap();
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("the Authlib server exited ({:?})", child.wait())
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("the Authlib server did not start"),
            }
        };
        Self {
            child,
            _stdin: stdin,
            port,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn token_requests(&self) -> serde_json::Value {
        support::get(&self.url("/stats")).await.json()["token_requests"].clone()
    }
}

impl Drop for Authlib {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An upstream that introspects every bearer token at the server and answers with what it
/// says, or 401 when the token is not active.
async fn upstream(server: &Authlib) -> (Server, Arc<Mutex<Vec<String>>>) {
    let introspect = server.url("/introspect");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let server = serve(move |request: Request<hyper::body::Incoming>| {
        let introspect = introspect.clone();
        let record = Arc::clone(&record);
        async move {
            let token = request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default()
                .to_owned();
            record.lock().unwrap().push(token.clone());
            let body = form_urlencoded::Serializer::new(String::new())
                .append_pair("token", &token)
                .finish();
            let answer = send(
                Request::post(&introspect)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .unwrap(),
            )
            .await;
            let said = answer.json();
            if said["active"] != true {
                return json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "invalid_token"}),
                );
            }
            json(StatusCode::OK, said)
        }
    })
    .await;
    (server, seen)
}

async fn bounded(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(PATIENCE, test)
        .await
        .expect("the test took too long");
}

#[tokio::test]
#[ignore = "needs the interop virtualenv: run `make interop`"]
async fn jwt_bearer_assertions_are_accepted_by_authlib() {
    bounded(async {
        let server = Authlib::start();
        let (upstream, _) = upstream(&server).await;
        let token = format!(
            "grant = \"jwt_bearer\"\nauth = \"none\"\nscope = \"read\"\n[upstream.token.jwt_bearer]\nprivate_key_file = \"{}\"\nissuer = \"{JWT_CLIENT}\"\nsubject = \"service-user\"\n",
            key()
        );
        let config = support::config("api", &upstream.url(""), &server.url("/token"), &token);
        let sidecar = Sidecar::start(&config).await;
        let answer = support::get(&sidecar.url("api", "/items")).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        let said = answer.json();
        assert_eq!(said["client_id"], JWT_CLIENT);
        assert_eq!(said["sub"], "service-user");
        assert_eq!(said["scope"], "read");
        assert_eq!(server.token_requests().await, serde_json::json!({"200": 1}));
        sidecar.stop().await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the interop virtualenv: run `make interop`"]
async fn refresh_tokens_rotated_by_authlib_are_spent_in_order() {
    bounded(async {
        let server = Authlib::start();
        let (upstream, seen) = upstream(&server).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("refresh_token"), FIRST_REFRESH_TOKEN).unwrap();
        let key = base64::engine::general_purpose::STANDARD.encode([3u8; 32]);
        std::fs::write(dir.path().join("cache.key"), key).unwrap();
        let token = format!(
            "client_id = \"{RT_CLIENT}\"\nclient_secret = \"{RT_SECRET}\"\ngrant = \"refresh_token\"\nrefresh_token_file = \"refresh_token\"\n\n[cache]\nbackend = \"file\"\ndir = \"tokens\"\nkey_file = \"cache.key\"\n"
        );
        let config = support::config("api", &upstream.url(""), &server.url("/token"), &token);
        let sidecar = Sidecar::start_in(dir, &config).await;
        let answer = support::get(&sidecar.url("api", "/items")).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert_eq!(answer.json()["sub"], "interop-user");

        let source = sidecar.running().token_source("api").unwrap();
        let held = source.state().token.unwrap();
        source.replacement_for(&held).await.unwrap();
        let answer = support::get(&sidecar.url("api", "/items")).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        let seen = seen.lock().unwrap().clone();
        assert_ne!(seen[0], seen[1]);
        // The first refresh token was revoked when spent: the second request spent the
        // rotated one, or it would have been refused.
        assert_eq!(server.token_requests().await, serde_json::json!({"200": 2}));
        sidecar.stop().await;
    })
    .await;
}
