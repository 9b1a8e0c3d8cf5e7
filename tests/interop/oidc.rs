//! bearerd against a real authorization server, node's `oidc-provider`, one test per client
//! authentication method: `private_key_jwt` (RS256, PS256, ES256, EdDSA), `client_secret_jwt`,
//! `client_assertion_file`, `tls_client_auth` (and a certificate-bound token sent upstream over
//! mutual TLS), DPoP with nonces required by both the token endpoint and the upstream, and the
//! secret methods `basic` and `post`; and the token-exchange grant (RFC 8693), which the
//! server registers itself (subject and actor JWTs verified with jose, `act` for the actor),
//! from a file and on behalf of each caller (`subject_token_from`).
//!
//! Each test starts its own server (`tests/interop/oidc/server.mjs`: every key, the CA and the
//! certificates made at start, one client per method, loopback ports the kernel picks), then
//! bearerd in-process in front of the server's resource endpoint. That endpoint introspects
//! every token as a resource server would, verifies DPoP proofs (RFC 9449 §4.3) and
//! certificate binding (RFC 8705 §3), and reports what it checked; the test then introspects
//! the token itself. The tests are ignored by a plain `cargo test`: they need the npm packages
//! that `make interop` (`scripts/interop.sh`) installs, which then runs them with
//! `BEARERD_INTEROP_NODE` naming node and `BEARERD_INTEROP_OIDC_SERVER` the server script.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use support::config::{string, ConfigBuilder, Tls, Token, Upstream};
use support::{send, Answer, Sidecar};

/// Bound on starting the server, and on each test as a whole.
const PATIENCE: Duration = Duration::from_secs(60);
/// The scope bearerd asks for; the server's resource has `api:read api:write`.
const SCOPE: &str = "api:read";

/// The oidc-provider server, run as a child process and killed by its PID when dropped.
struct Oidc {
    child: Child,
    /// Held open: the server exits by itself when it closes (the test process is gone).
    _stdin: ChildStdin,
    dir: tempfile::TempDir,
    /// What the server wrote at start: its URLs, files, clients and keys.
    conf: Value,
}

impl Oidc {
    /// Starts the server and waits for its ready line.
    fn start() -> Self {
        let node = std::env::var_os("BEARERD_INTEROP_NODE").unwrap_or_else(|| {
            panic!(
                "BEARERD_INTEROP_NODE is not set: these tests need node and the npm packages of \
                 tests/interop/oidc; run `make interop` (scripts/interop.sh), which installs them \
                 and sets BEARERD_INTEROP_NODE"
            )
        });
        let server = std::env::var_os("BEARERD_INTEROP_OIDC_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/oidc/server.mjs")
            });
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("oidc.json");
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut child = Command::new(&node)
            .arg(&server)
            .arg(&out)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {node:?} (BEARERD_INTEROP_NODE): {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = support::lines_of(stdout);
        let mut oidc = Self {
            child,
            _stdin: stdin,
            dir,
            conf: Value::Null,
        };
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            match lines.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            {
                Ok(line) if line.starts_with("ready ") => break,
                Ok(_) => {}
                // Dropping `oidc` prints its log.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = oidc.child.wait().unwrap();
                    panic!("server.mjs exited ({status}) before it was ready")
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("server.mjs was not ready within {PATIENCE:?}")
                }
            }
        }
        oidc.conf = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        oidc
    }

    /// A string the server wrote, by JSON pointer (`/clients/dpop/client_secret`).
    fn s(&self, pointer: &str) -> &str {
        self.conf
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("oidc.json has no string at {pointer}: {}", self.conf))
    }

    /// The string `field` of client `id`.
    fn client(&self, id: &str, field: &str) -> &str {
        self.s(&format!("/clients/{id}/{field}"))
    }

    fn token_endpoint(&self) -> &str {
        self.s("/token_endpoint")
    }

    fn resource(&self) -> &str {
        self.s("/resource")
    }

    /// The resource server's base URL for bearerd's upstream: `…/resource`.
    fn upstream_url(&self) -> String {
        format!("{}/resource", self.s("/resource_server"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// What the server saw: `token_requests`, `resource_requests`, `dpop`, `tokens_seen`.
    async fn stats(&self) -> Value {
        let answer = support::get(&format!("{}/stats", self.s("/resource_server"))).await;
        assert_eq!(answer.status, StatusCode::OK);
        answer.json()
    }

    /// The token requests of client `id`, in order.
    async fn token_requests(&self, id: &str) -> Vec<Value> {
        self.stats().await["token_requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["client_id"] == id)
            .cloned()
            .collect()
    }

    /// The access tokens the resource server was sent, in order.
    async fn tokens_seen(&self) -> Vec<String> {
        let stats = self.stats().await;
        stats["tokens_seen"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_owned())
            .collect()
    }

    /// RFC 7662 introspection of `token`, as the resource server's client.
    async fn introspect(&self, token: &str) -> Value {
        let answer = send(form_post(
            self.s("/introspection_endpoint"),
            Some((
                self.s("/introspector/client_id"),
                self.s("/introspector/client_secret"),
            )),
            &[("token", token)],
        ))
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", text(&answer));
        answer.json()
    }

    /// A fresh client assertion for private_key_jwt client `id`, from the server's helper,
    /// with `aud` the plain-HTTP token endpoint.
    async fn assertion(&self, id: &str) -> String {
        let answer = support::get(&format!("{}/assertion/{id}", self.s("/resource_server"))).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", text(&answer));
        text(&answer)
    }

    /// Revokes `token` (RFC 7009) as the `assertion` client, whose token it must be (a client
    /// may revoke only its own).
    async fn revoke_as_assertion_client(&self, token: &str) {
        let assertion = self.assertion("assertion").await;
        let answer = send(form_post(
            &format!("{}/token/revocation", self.s("/issuer")),
            None,
            &[
                ("token", token),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &assertion),
            ],
        ))
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", text(&answer));
    }
}

impl Drop for Oidc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("server.mjs's log:\n{}", self.log());
        }
    }
}

/// A form POST, with HTTP Basic client authentication when `basic` is given (RFC 6749
/// §2.3.1: id and secret form-urlencoded first).
fn form_post(
    url: &str,
    basic: Option<(&str, &str)>,
    form: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let mut request =
        Request::post(url).header("content-type", "application/x-www-form-urlencoded");
    if let Some((id, secret)) = basic {
        let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let credentials = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            encode(id),
            encode(secret)
        ));
        request = request.header("authorization", format!("Basic {credentials}"));
    }
    request.body(Full::new(Bytes::from(body))).unwrap()
}

fn text(answer: &Answer) -> String {
    String::from_utf8_lossy(&answer.body).into_owned()
}

/// `[upstream.token]` for client `id` at `url`, asking for [`SCOPE`] at the server's resource.
fn token(oidc: &Oidc, url: &str, id: &str) -> Token {
    Token::new(url, id).scope(SCOPE).resource(oidc.resource())
}

/// bearerd for one upstream `api` in front of `upstream_url`.
async fn sidecar(
    dir: tempfile::TempDir,
    upstream_url: &str,
    token: Token,
    tls: Option<Tls>,
) -> Sidecar {
    let mut upstream = Upstream::new("api", upstream_url).token(token);
    if let Some(tls) = tls {
        upstream = upstream.tls(tls);
    }
    Sidecar::start_in(dir, &ConfigBuilder::new().upstream(upstream).render()).await
}

/// Runs a test body, failing it if it takes longer than [`PATIENCE`].
async fn bounded(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(PATIENCE, test)
        .await
        .expect("the test took too long");
}

/// What a test expects of the requests it sends through bearerd.
struct Expect<'a> {
    client_id: &'a str,
    /// `Bearer` or `DPoP`.
    scheme: &'a str,
    /// The grant bearerd used.
    grant_type: &'a str,
}

/// Sends the app's requests through `sidecar` (a GET, a GET with a query, a POST with a body)
/// and checks each succeeded with a token of `expect.client_id` that the resource server
/// found active for its resource; then that one token served them all, that introspection
/// from here says it is active, and what bearerd's token source holds. Returns the resource
/// server's answers.
async fn requests_go_through(oidc: &Oidc, sidecar: &Sidecar, expect: &Expect<'_>) -> Vec<Value> {
    let mut answers = Vec::new();
    let requests = [
        ("GET", "/items", None),
        ("GET", "/items/1?expand=all", None),
        ("POST", "/items", Some("{\"a\":1}")),
    ];
    for (method, path, body) in requests {
        let request = Request::builder()
            .method(method)
            .uri(sidecar.url("api", path))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        let answer = send(request).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{method} {path}: {}",
            text(&answer)
        );
        let body = answer.json();
        assert_eq!(body["active"], true, "{body}");
        assert_eq!(body["client_id"], expect.client_id, "{body}");
        assert_eq!(body["scheme"], expect.scheme, "{body}");
        assert_eq!(body["scope"], SCOPE, "{body}");
        assert_eq!(body["aud"], oidc.resource(), "{body}");
        assert_eq!(body["method"], method, "{body}");
        let (bare, query) = path.split_once('?').unwrap_or((path, ""));
        assert_eq!(body["path"], format!("/resource{bare}"), "{body}");
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        assert_eq!(body["query"], query, "{body}");
        answers.push(body);
    }

    let seen = oidc.tokens_seen().await;
    let token = seen.last().unwrap().clone();
    assert!(
        seen.iter().all(|t| *t == token),
        "one token for all: {seen:?}"
    );
    let introspection = oidc.introspect(&token).await;
    assert_eq!(introspection["active"], true, "{introspection}");
    assert_eq!(introspection["client_id"], expect.client_id);
    assert_eq!(introspection["aud"], oidc.resource());
    assert_eq!(introspection["scope"], SCOPE);
    assert_eq!(introspection["token_type"], expect.scheme);

    let granted: Vec<Value> = oidc
        .token_requests(expect.client_id)
        .await
        .into_iter()
        .filter(|r| r["status"] == 200)
        .collect();
    assert_eq!(granted.len(), 1, "one token request granted: {granted:?}");
    assert_eq!(granted[0]["resource"], oidc.resource());
    assert_eq!(granted[0]["scope"], SCOPE);
    assert_eq!(granted[0]["grant_type"], expect.grant_type);

    let state = sidecar.running().token_source("api").unwrap().state();
    let held = state.token.unwrap();
    assert_eq!(
        held.lifetime,
        Duration::from_secs(oidc.conf["token_ttl"].as_u64().unwrap())
    );
    assert_eq!(held.scope.as_deref(), Some(SCOPE));
    answers
}

/// The one granted token request of `id`, and its client assertion's claims and header.
async fn granted_assertion(oidc: &Oidc, id: &str) -> Value {
    let requests = oidc.token_requests(id).await;
    let granted: Vec<&Value> = requests.iter().filter(|r| r["status"] == 200).collect();
    assert_eq!(granted.len(), 1, "{requests:?}");
    let assertion = granted[0]["client_assertion"].clone();
    assert!(assertion.is_object(), "no client assertion: {requests:?}");
    assert_eq!(granted[0]["basic"], false);
    assert_eq!(granted[0]["client_secret"], false);
    assert_eq!(assertion["iss"], id, "{assertion}");
    assert_eq!(assertion["sub"], id, "{assertion}");
    assert!(assertion["jti"].as_str().is_some_and(|j| !j.is_empty()));
    // Short-lived (bearerd's default assertion_lifetime is 60 s); iat is optional (RFC 7523).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = assertion["exp"].as_u64().unwrap();
    assert!(
        exp > now.saturating_sub(60) && exp <= now + 300,
        "a short-lived assertion at {now}: {assertion}"
    );
    if let Some(iat) = assertion["iat"].as_u64() {
        assert!(iat < exp && iat <= now + 5, "{assertion}");
    }
    assertion
}

/// private_key_jwt with client `id`'s key: the assertion is signed with `alg` (the key's
/// default when `assertion_alg` is not set), names the key by `kid` when `key_id` is set, and
/// is for the token URL (bearerd's default audience).
async fn private_key_jwt(id: &str, key_file: &str, alg: Option<&str>, key_id: bool) {
    let oidc = Oidc::start();
    let mut token = token(&oidc, oidc.token_endpoint(), id)
        .auth("private_key_jwt")
        .set("private_key_file", string(oidc.client(id, key_file)));
    if let Some(alg) = alg {
        token = token.set("assertion_alg", string(alg));
    }
    if key_id {
        token = token.set("key_id", string(oidc.client(id, "key_id")));
    }
    let sidecar = sidecar(
        tempfile::tempdir().unwrap(),
        &oidc.upstream_url(),
        token,
        None,
    )
    .await;
    requests_go_through(
        &oidc,
        &sidecar,
        &Expect {
            client_id: id,
            scheme: "Bearer",
            grant_type: "client_credentials",
        },
    )
    .await;
    let assertion = granted_assertion(&oidc, id).await;
    assert_eq!(assertion["alg"], oidc.client(id, "alg"), "{assertion}");
    assert_eq!(assertion["aud"], oidc.token_endpoint(), "{assertion}");
    if key_id {
        assert_eq!(assertion["kid"], oidc.client(id, "key_id"), "{assertion}");
    }
    sidecar.stop().await;
}

#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn private_key_jwt_rs256() {
    // No assertion_alg: RS256 is the default for an RSA key.
    bounded(private_key_jwt(
        "pkjwt-rs256",
        "private_key_file",
        None,
        true,
    ))
    .await;
}

#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn private_key_jwt_ps256_pkcs1_key() {
    // The server insists on PS256 for this client; the key file is PKCS#1.
    bounded(private_key_jwt(
        "pkjwt-ps256",
        "private_key_pkcs1_file",
        Some("PS256"),
        true,
    ))
    .await;
}

#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn private_key_jwt_es256_without_key_id() {
    bounded(private_key_jwt(
        "pkjwt-es256",
        "private_key_file",
        None,
        false,
    ))
    .await;
}

#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn private_key_jwt_eddsa() {
    bounded(private_key_jwt(
        "pkjwt-eddsa",
        "private_key_file",
        Some("EdDSA"),
        true,
    ))
    .await;
}

/// Another client's key: oidc-provider answers 401 `invalid_client`, the app gets 503.
#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn private_key_jwt_with_the_wrong_key_is_invalid_client() {
    bounded(async {
        let oidc = Oidc::start();
        let token = token(&oidc, oidc.token_endpoint(), "pkjwt-es256")
            .auth("private_key_jwt")
            .set(
                "private_key_file",
                string(oidc.client("assertion", "private_key_file")),
            );
        let sidecar = sidecar(
            tempfile::tempdir().unwrap(),
            &oidc.upstream_url(),
            token,
            None,
        )
        .await;
        let answer = support::get(&sidecar.url("api", "/items")).await;
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            text(&answer)
        );
        let detail = answer.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains("\"invalid_client\""), "{detail}");
        assert!(oidc.tokens_seen().await.is_empty());
        let requests = oidc.token_requests("pkjwt-es256").await;
        assert!(!requests.is_empty() && requests.iter().all(|r| r["status"] == 401));
        sidecar.stop().await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn client_secret_jwt_hs256() {
    bounded(async {
        let oidc = Oidc::start();
        let id = "secret-jwt";
        let token = token(&oidc, oidc.token_endpoint(), id)
            .auth("client_secret_jwt")
            .secret(oidc.client(id, "client_secret"));
        let sidecar = sidecar(
            tempfile::tempdir().unwrap(),
            &oidc.upstream_url(),
            token,
            None,
        )
        .await;
        requests_go_through(
            &oidc,
            &sidecar,
            &Expect {
                client_id: id,
                scheme: "Bearer",
                grant_type: "client_credentials",
            },
        )
        .await;
        let assertion = granted_assertion(&oidc, id).await;
        assert_eq!(assertion["alg"], "HS256", "{assertion}");
        assert_eq!(assertion["aud"], oidc.token_endpoint(), "{assertion}");
        sidecar.stop().await;
    })
    .await;
}

/// `client_assertion_file` without `client_id`: bearerd sends the assertion the file holds
/// (made by the server's helper with the `assertion` client's key), and reads the file again
/// at its next fetch: after the first token is revoked, a new assertion in the file gets the
/// replacement.
#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn client_assertion_file() {
    bounded(async {
        let oidc = Oidc::start();
        let id = "assertion";
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("assertion.jwt");
        let first = oidc.assertion(id).await;
        std::fs::write(&file, &first).unwrap();
        let token = Token::empty()
            .url(oidc.token_endpoint())
            .auth("client_assertion_file")
            .set("assertion_file", string(file.to_str().unwrap()))
            .scope(SCOPE)
            .resource(oidc.resource());
        let sidecar = sidecar(dir, &oidc.upstream_url(), token, None).await;
        requests_go_through(
            &oidc,
            &sidecar,
            &Expect {
                client_id: id,
                scheme: "Bearer",
                grant_type: "client_credentials",
            },
        )
        .await;
        let requests = oidc.token_requests(id).await;
        assert_eq!(requests.len(), 1, "{requests:?}");
        // The very assertion of the file (its jti: each helper assertion has its own).
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(first.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(requests[0]["client_assertion"]["jti"], claims["jti"]);

        // Revoked: the upstream answers 401, bearerd fetches again with what the file now
        // holds (the first assertion's jti is spent), and replays the request.
        let old = oidc.tokens_seen().await.last().unwrap().clone();
        oidc.revoke_as_assertion_client(&old).await;
        let second = oidc.assertion(id).await;
        std::fs::write(&file, &second).unwrap();
        let answer = support::get(&sidecar.url("api", "/after")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", text(&answer));
        let seen = oidc.tokens_seen().await;
        let new = seen.last().unwrap();
        assert_ne!(*new, old);
        assert_eq!(oidc.introspect(new).await["active"], true);
        let requests = oidc.token_requests(id).await;
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert_eq!(requests[1]["status"], 200, "{requests:?}");
        assert_ne!(requests[1]["client_assertion"]["jti"], claims["jti"]);
        sidecar.stop().await;
    })
    .await;
}

/// tls_client_auth at the HTTPS token endpoint, trusting the server's CA through
/// `[upstream.tls] ca_file` (which bearerd applies to the token endpoint too); the token is
/// not certificate-bound, and the upstream is plain HTTP.
#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn tls_client_auth() {
    bounded(async {
        let oidc = Oidc::start();
        let id = "tls";
        let token = token(&oidc, oidc.s("/token_endpoint_https"), id)
            .auth("tls_client_auth")
            .set("cert_file", string(oidc.client(id, "cert_file")))
            .set("key_file", string(oidc.client(id, "key_file")));
        let tls = Tls::new().ca_file(oidc.s("/ca_file"));
        let sidecar = sidecar(
            tempfile::tempdir().unwrap(),
            &oidc.upstream_url(),
            token,
            Some(tls),
        )
        .await;
        requests_go_through(
            &oidc,
            &sidecar,
            &Expect {
                client_id: id,
                scheme: "Bearer",
                grant_type: "client_credentials",
            },
        )
        .await;
        let requests = oidc.token_requests(id).await;
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(requests[0]["listener"], "https");
        assert_eq!(requests[0]["client_certificate"], true);
        assert_eq!(requests[0]["basic"], false);
        assert_eq!(requests[0]["client_secret"], false);
        assert!(requests[0]["client_assertion"].is_null());
        sidecar.stop().await;
    })
    .await;
}

/// tls_client_auth for a certificate-bound token (cnf x5t#S256, RFC 8705 §3), sent to the
/// HTTPS upstream with the same client certificate (`[upstream.tls] cert_file`/`key_file`),
/// where the resource server checks the binding.
#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn tls_client_auth_certificate_bound_token_over_mutual_tls() {
    bounded(async {
        let oidc = Oidc::start();
        let id = "tls-bound";
        let (cert, key) = (oidc.client(id, "cert_file"), oidc.client(id, "key_file"));
        let token = token(&oidc, oidc.s("/token_endpoint_https"), id)
            .auth("tls_client_auth")
            .set("cert_file", string(cert))
            .set("key_file", string(key));
        let tls = Tls::new()
            .ca_file(oidc.s("/ca_file"))
            .set("cert_file", string(cert))
            .set("key_file", string(key));
        let upstream = format!("{}/resource", oidc.s("/resource_server_https"));
        let sidecar = sidecar(tempfile::tempdir().unwrap(), &upstream, token, Some(tls)).await;
        let answers = requests_go_through(
            &oidc,
            &sidecar,
            &Expect {
                client_id: id,
                scheme: "Bearer",
                grant_type: "client_credentials",
            },
        )
        .await;
        let x5t = oidc.client(id, "x5t_s256");
        for answer in answers {
            assert_eq!(answer["cnf"]["x5t#S256"], x5t, "{answer}");
            assert_eq!(answer["certificate"]["x5t_s256"], x5t, "{answer}");
            let checked = answer["checked"].as_array().unwrap();
            assert!(checked.contains(&Value::from("cnf.x5t#S256")), "{answer}");
        }
        let token = oidc.tokens_seen().await.last().unwrap().clone();
        assert_eq!(oidc.introspect(&token).await["cnf"]["x5t#S256"], x5t);
        sidecar.stop().await;
    })
    .await;
}

/// DPoP (RFC 9449) with nonces required by both servers: the token endpoint answers the first
/// token request `use_dpop_nonce` and bearerd sends it again with the nonce; the upstream
/// answers the first proxied request 401 `use_dpop_nonce` and bearerd replays it with a new
/// proof carrying that nonce, then keeps using it. Every proof that reached the resource
/// server with its nonce verified, and the token's cnf.jkt is the proof key's thumbprint.
/// `key` is the `dpop_keys` entry of the server's key given as `dpop_key_file`, or None for
/// the key bearerd makes itself.
async fn dpop(key: Option<&str>) {
    let oidc = Oidc::start();
    let id = "dpop";
    let mut token = token(&oidc, oidc.token_endpoint(), id)
        .secret(oidc.client(id, "client_secret"))
        .set("dpop", true);
    if let Some(alg) = key {
        token = token
            .set(
                "dpop_key_file",
                string(oidc.s(&format!("/dpop_keys/{alg}/private_key_file"))),
            )
            .set("dpop_alg", string(alg));
    }
    let sidecar = sidecar(
        tempfile::tempdir().unwrap(),
        &oidc.upstream_url(),
        token,
        None,
    )
    .await;
    let answers = requests_go_through(
        &oidc,
        &sidecar,
        &Expect {
            client_id: id,
            scheme: "DPoP",
            grant_type: "client_credentials",
        },
    )
    .await;

    // The token endpoint: a nonce challenge, then the token.
    let requests = oidc.token_requests(id).await;
    let outcomes: Vec<(Value, Value)> = requests
        .iter()
        .map(|r| (r["status"].clone(), r["error"].clone()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (Value::from(400), Value::from("use_dpop_nonce")),
            (Value::from(200), Value::Null)
        ],
        "{requests:?}"
    );
    assert!(requests.iter().all(|r| r["dpop"] == true));
    assert_eq!(requests[1]["token_type"], "DPoP");

    // The upstream: the first request challenged, every other one verified.
    let stats = oidc.stats().await;
    let resource = stats["resource_requests"].as_array().unwrap();
    assert_eq!(
        resource.len(),
        4,
        "three requests and one replay: {resource:?}"
    );
    assert_eq!(resource[0]["status"], 401, "{resource:?}");
    assert_eq!(resource[0]["error"], "use_dpop_nonce", "{resource:?}");
    assert!(resource
        .iter()
        .all(|r| r["scheme"] == "DPoP" && r["dpop_header"] == true));
    assert!(
        resource[1..].iter().all(|r| r["status"] == 200),
        "{resource:?}"
    );
    assert_eq!(
        stats["dpop"],
        serde_json::json!({"proofs_verified": 3, "nonce_challenges": 1, "rejected": 0}),
        "the nonce is asked for once, then remembered; no proof was rejected"
    );

    let token = oidc.tokens_seen().await.last().unwrap().clone();
    let jkt = oidc.introspect(&token).await["cnf"]["jkt"].clone();
    assert!(jkt.is_string(), "the token is DPoP-bound");
    let origin = oidc.s("/resource_server");
    for answer in &answers {
        let proof = &answer["dpop"];
        assert_eq!(proof["jkt"], jkt, "cnf.jkt is the proof key's: {answer}");
        assert_eq!(answer["cnf"]["jkt"], jkt, "{answer}");
        assert_eq!(proof["htm"], answer["method"], "{answer}");
        let path = answer["path"].as_str().unwrap();
        assert_eq!(proof["htu"], format!("{origin}{path}"), "{answer}");
        assert_eq!(proof["htu_had_query"], false, "{answer}");
        let checked = answer["checked"].as_array().unwrap();
        assert!(checked.contains(&Value::from("dpop_proof")), "{answer}");
        assert!(checked.contains(&Value::from("cnf.jkt")), "{answer}");
        if let Some(alg) = key {
            assert_eq!(proof["alg"], alg, "{answer}");
        }
    }
    if let Some(alg) = key {
        assert_eq!(jkt, oidc.s(&format!("/dpop_keys/{alg}/jkt")));
    }
    sidecar.stop().await;
}

#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn dpop_with_nonces() {
    bounded(dpop(None)).await;
}

#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn dpop_with_an_ed25519_key_file() {
    bounded(dpop(Some("EdDSA"))).await;
}

/// The secret methods, which bearerd had before: the harness end to end.
async fn secret(id: &str) {
    let oidc = Oidc::start();
    let token = token(&oidc, oidc.token_endpoint(), id)
        .auth(id)
        .secret(oidc.client(id, "client_secret"));
    let sidecar = sidecar(
        tempfile::tempdir().unwrap(),
        &oidc.upstream_url(),
        token,
        None,
    )
    .await;
    requests_go_through(
        &oidc,
        &sidecar,
        &Expect {
            client_id: id,
            scheme: "Bearer",
            grant_type: "client_credentials",
        },
    )
    .await;
    let requests = oidc.token_requests(id).await;
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0]["basic"], id == "basic");
    assert_eq!(requests[0]["client_secret"], id == "post");
    sidecar.stop().await;
}

#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn client_secret_basic() {
    bounded(secret("basic")).await;
}

#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn client_secret_post() {
    bounded(secret("post")).await;
}

/// `grant = "token_exchange"` against oidc-provider with a registered token-exchange grant:
/// the subject and actor tokens are JWTs of a workload issuer, verified by the server with
/// jose; the token it issues is active for the resource, with the subject as `sub` and the
/// actor in `act`. A subject token signed by another key is refused (`invalid_grant`).
#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn token_exchange_with_subject_and_actor() {
    bounded(async {
        let oidc = Oidc::start();
        let exchange = |subject: &str| {
            token(&oidc, oidc.token_endpoint(), "exchange")
                .secret(oidc.client("exchange", "client_secret"))
                .set("grant", string("token_exchange"))
                .set("subject_token_file", string(subject))
                .set(
                    "actor_token_file",
                    string(oidc.s("/token_exchange/actor_token_file")),
                )
                .set(
                    "requested_token_type",
                    string("urn:ietf:params:oauth:token-type:access_token"),
                )
        };
        let token = exchange(oidc.s("/token_exchange/subject_token_file"));
        let sidecar = sidecar(
            tempfile::tempdir().unwrap(),
            &oidc.upstream_url(),
            token,
            None,
        )
        .await;
        let answers = requests_go_through(
            &oidc,
            &sidecar,
            &Expect {
                client_id: "exchange",
                scheme: "Bearer",
                grant_type: "urn:ietf:params:oauth:grant-type:token-exchange",
            },
        )
        .await;
        assert!(!answers.is_empty());
        let seen = oidc.tokens_seen().await;
        let introspection = oidc.introspect(seen.last().unwrap()).await;
        assert_eq!(introspection["active"], true, "{introspection}");
        assert_eq!(introspection["sub"], "workload:payments", "{introspection}");
        assert_eq!(
            introspection["act"]["sub"], "agent:ledger",
            "{introspection}"
        );
        let requests = oidc.token_requests("exchange").await;
        assert_eq!(
            requests[0]["grant_type"],
            "urn:ietf:params:oauth:grant-type:token-exchange"
        );
        sidecar.stop().await;

        // A subject token the server cannot verify: refused, and bearerd answers 503.
        let forged = exchange(oidc.s("/token_exchange/forged_subject_token_file"));
        let refused = sidecar_for_refusal(&oidc, forged).await;
        let answer = support::get(&refused.url("api", "/items")).await;
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            text(&answer)
        );
        let last = oidc.token_requests("exchange").await.pop().unwrap();
        assert_eq!(last["error"], "invalid_grant", "{last}");
        refused.stop().await;
    })
    .await;
}

/// On-behalf-of (`subject_token_from = "header:Authorization"`) against the same registered
/// grant: the app sends each caller's JWT as its `Authorization`; the server verifies it with
/// jose and issues a token naming it in `sub`; the resource server sees that token, never
/// the subject, and introspection confirms it. A second caller gets an exchange of its own; a
/// caller seen before does not cause another; a subject the server cannot verify is 401
/// `subject_token_rejected`.
#[tokio::test]
#[ignore = "needs node and tests/interop/oidc's npm packages: run `make interop`"]
async fn token_exchange_on_behalf_of_each_callers_subject() {
    bounded(async {
        let oidc = Oidc::start();
        let token = token(&oidc, oidc.token_endpoint(), "exchange")
            .secret(oidc.client("exchange", "client_secret"))
            .set("grant", string("token_exchange"))
            .set("subject_token_from", string("header:Authorization"))
            .set(
                "requested_token_type",
                string("urn:ietf:params:oauth:token-type:access_token"),
            );
        let sidecar = sidecar(
            tempfile::tempdir().unwrap(),
            &oidc.upstream_url(),
            token,
            None,
        )
        .await;
        let read = |pointer: &str| {
            std::fs::read_to_string(oidc.s(pointer))
                .unwrap()
                .trim()
                .to_owned()
        };
        // Two callers: the workload issuer's tokens for `workload:payments` and
        // `agent:ledger`, both subjects the server verifies.
        let payments = read("/token_exchange/subject_token_file");
        let ledger = read("/token_exchange/actor_token_file");
        let as_caller = |subject: &str| {
            Request::get(sidecar.url("api", "/items"))
                .header("authorization", format!("Bearer {subject}"))
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        let check = |answer: &Answer| {
            assert_eq!(answer.status, StatusCode::OK, "{}", text(answer));
            let body = answer.json();
            assert_eq!(body["active"], true, "{body}");
            assert_eq!(body["client_id"], "exchange", "{body}");
            assert_eq!(body["scheme"], "Bearer", "{body}");
        };
        check(&send(as_caller(&payments)).await);
        check(&send(as_caller(&payments)).await);
        check(&send(as_caller(&ledger)).await);

        let seen = oidc.tokens_seen().await;
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[0], seen[1], "the caller's token is held");
        assert_ne!(seen[0], seen[2]);
        for token in &seen {
            assert!(
                *token != payments && *token != ledger,
                "a subject went upstream"
            );
        }
        for (token, sub) in [(&seen[0], "workload:payments"), (&seen[2], "agent:ledger")] {
            let introspection = oidc.introspect(token).await;
            assert_eq!(introspection["active"], true, "{introspection}");
            assert_eq!(introspection["sub"], sub, "{introspection}");
            assert_eq!(introspection["client_id"], "exchange");
            assert_eq!(introspection["aud"], oidc.resource());
            assert_eq!(introspection["scope"], SCOPE);
        }
        let granted: Vec<Value> = oidc
            .token_requests("exchange")
            .await
            .into_iter()
            .filter(|r| r["status"] == 200)
            .collect();
        assert_eq!(granted.len(), 2, "one exchange per caller: {granted:?}");
        for request in &granted {
            assert_eq!(
                request["grant_type"],
                "urn:ietf:params:oauth:grant-type:token-exchange"
            );
        }

        // A subject the server cannot verify: refused, nothing sent upstream.
        let forged = read("/token_exchange/forged_subject_token_file");
        let refused = send(as_caller(&forged)).await;
        assert_eq!(
            refused.status,
            StatusCode::UNAUTHORIZED,
            "{}",
            text(&refused)
        );
        assert_eq!(refused.json()["error"], "subject_token_rejected");
        let last = oidc.token_requests("exchange").await.pop().unwrap();
        assert_eq!(last["error"], "invalid_grant", "{last}");
        assert_eq!(oidc.tokens_seen().await.len(), 3);
        // Without a caller's token: 401 before any request.
        let missing = support::get(&sidecar.url("api", "/items")).await;
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        assert_eq!(missing.json()["error"], "subject_token_missing");
        sidecar.stop().await;
    })
    .await;
}

async fn sidecar_for_refusal(oidc: &Oidc, token: Token) -> Sidecar {
    sidecar(
        tempfile::tempdir().unwrap(),
        &oidc.upstream_url(),
        token,
        None,
    )
    .await
}
