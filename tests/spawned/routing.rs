//! Routes by host and path, and the forward-proxy mode (issue 15): clients that honour a proxy
//! setting (curl, Python's urllib and requests, wget) against a forward listener of several
//! routes; host and path matching through a reverse listener; what a forward listener refuses
//! (nothing reaches an upstream, no token is taken); routes sharing a token source; a route
//! table reloaded in place; `--check`; and the forward-proxy Kubernetes example.
//!
//! Every socket is on loopback port 0; the route hosts (`api.one.test`, ...) do not resolve,
//! which is the point: a client with a proxy setting sends the absolute URL to the proxy
//! without resolving the host.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::config::{ConfigBuilder, Listener, Route, Tls, Token, Upstream};
use support::daemon::{Daemon, BIN, PATIENCE};
use support::raw::{exchange, status_of, RecordingUpstream};
use support::{echo, full, serve, token_endpoint, token_ok, Answer, Server, Sidecar};

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// Echo upstreams, one per route, each adding its label to what it echoes (`"route"` in the
/// JSON, `x-route` in the headers), and counting every request any of them gets.
struct Echoes {
    servers: Vec<(&'static str, Server)>,
    hits: Arc<AtomicUsize>,
}

impl Echoes {
    async fn start(labels: &[&'static str]) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let mut servers = Vec::new();
        for &label in labels {
            let counted = Arc::clone(&hits);
            let server = serve(move |request: Request<Incoming>| {
                counted.fetch_add(1, Ordering::SeqCst);
                labelled(label, request)
            })
            .await;
            servers.push((label, server));
        }
        Self { servers, hits }
    }

    /// `http://127.0.0.1:<port of label's echo><path>`
    fn url(&self, label: &str, path: &str) -> String {
        self.servers
            .iter()
            .find(|(l, _)| *l == label)
            .unwrap_or_else(|| panic!("no echo {label}"))
            .1
            .url(path)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// The echo's answer, with `label` in its JSON and an `x-route` header.
async fn labelled(label: &'static str, request: Request<Incoming>) -> Response<support::Body> {
    let (mut parts, body) = echo(request).await.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let mut value: Value = serde_json::from_slice(&bytes).unwrap();
    value["route"] = label.into();
    parts
        .headers
        .insert("x-route", HeaderValue::from_static(label));
    Response::from_parts(parts, full(value.to_string()))
}

/// A token endpoint answering `<prefix>-<n>` for its n-th request (from 0), valid an hour.
async fn tokens(prefix: &'static str) -> support::TokenEndpoint {
    token_endpoint(move |n, _| async move { token_ok(&format!("{prefix}-{n}"), 3600) }).await
}

/// The client `app` with the secret `pw`, at `url`.
fn app(url: &str) -> Token {
    Token::new(url, "app").secret("pw")
}

/// A raw HTTP/1.1 answer, read to the close.
#[derive(Debug)]
struct Raw {
    status: u16,
    /// The head, lowercase.
    head: String,
    body: String,
}

impl Raw {
    fn parse(answer: &str) -> Self {
        let status = status_of(answer);
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of head in {answer:?}"));
        let head = head.to_ascii_lowercase();
        assert!(
            !head.contains("transfer-encoding: chunked"),
            "a chunked answer; this parser wants content-length: {answer:?}"
        );
        Self {
            status,
            head,
            body: body.to_owned(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key == name).then(|| value.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Sends `request_line` (method and target), `Host: host` if given, and `Connection: close`;
/// reads the answer to the close.
async fn raw(addr: SocketAddr, request_line: &str, host: Option<&str>) -> Raw {
    let mut request = format!("{request_line} HTTP/1.1\r\n");
    if let Some(host) = host {
        request.push_str(&format!("Host: {host}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    Raw::parse(&exchange(addr, request.as_bytes()).await)
}

/// One kept-alive app connection: every request goes on the same TCP connection, and fails
/// if bearerd closed it.
struct AppConnection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    _task: tokio::task::JoinHandle<()>,
}

impl AppConnection {
    async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Self {
            sender,
            _task: task,
        }
    }

    /// `GET target` with `Host: host`, on this connection.
    async fn get(&mut self, host: &str, target: &str) -> Answer {
        self.sender.ready().await.unwrap_or_else(|e| {
            panic!("the app connection is gone before GET {target} (Host {host}): {e}")
        });
        let request = Request::get(target)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response =
            self.sender.send_request(request).await.unwrap_or_else(|e| {
                panic!("GET {target} (Host {host}) on the kept connection: {e}")
            });
        let (parts, body) = response.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// The label of the route that served `GET target` with `Host: host`, or the status and
    /// `error` of bearerd's refusal.
    async fn route_of(&mut self, host: &str, target: &str) -> String {
        let answer = self.get(host, target).await;
        describe(&answer)
    }
}

/// `route <label> <uri>` for an echo's answer, `<status> <error>` for bearerd's.
fn describe(answer: &Answer) -> String {
    let json = answer.json();
    if answer.status == StatusCode::OK {
        format!(
            "route {} {}",
            json["route"].as_str().unwrap(),
            json["uri"].as_str().unwrap()
        )
    } else {
        format!(
            "{} {}",
            answer.status.as_u16(),
            json["error"].as_str().unwrap_or("(no error)")
        )
    }
}

/// The variables by which clients choose a proxy: removed from every client's environment,
/// so that only what a test sets counts. (`REQUEST_METHOD` makes Python ignore `HTTP_PROXY`.)
const PROXY_VARIABLES: &[&str] = &[
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
    "REQUEST_METHOD",
];

/// Runs `program` with `args` and `env` (and no other proxy setting); its stdout, or a
/// failure that shows what it said.
fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = Command::new(program);
    command.args(args);
    for variable in PROXY_VARIABLES {
        command.env_remove(variable);
    }
    command.envs(env.iter().copied());
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program} {args:?} with {env:?}: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// [`run`] on a blocking thread, so that the in-process servers keep serving meanwhile.
async fn run_client(program: String, args: Vec<String>, env: Vec<(String, String)>) -> String {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run(&program, &args, &env)
    })
    .await
    .unwrap()
}

/// Every JSON value in `text`, one after another (curl prints one body per URL).
fn json_values(text: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("not JSON values ({e}): {text:?}"))
}

/// A Python that can `import requests`: python3's own; else the interop virtualenv's
/// (`make interop`); else target/routing-venv, made here from PyPI.
fn python_with_requests() -> PathBuf {
    let has_requests = |python: &Path| {
        Command::new(python)
            .args(["-c", "import requests"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let system = PathBuf::from("python3");
    if has_requests(&system) {
        return system;
    }
    let interop = target.join("interop-venv/bin/python");
    if has_requests(&interop) {
        return interop;
    }
    let venv = target.join("routing-venv");
    let python = venv.join("bin/python");
    if !has_requests(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(made.success(), "python3 -m venv {}", venv.display());
        let installed = Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--only-binary=:all:",
                "requests==2.32.3",
            ])
            .status()
            .unwrap();
        assert!(
            installed.success(),
            "pip install requests into {}",
            venv.display()
        );
    }
    python
}

// ---------------------------------------------------------------------------------------------
// Real clients against a forward listener
// ---------------------------------------------------------------------------------------------

/// A forward listener with three routes, each to its own echo upstream: `one` and `two` with
/// the same token settings at endpoint A, `three` at endpoint B.
struct Forward {
    sidecar: Sidecar,
    proxy: String,
    a: support::TokenEndpoint,
    b: support::TokenEndpoint,
    echoes: Echoes,
}

/// What each route's request must look like upstream: the URL the app asks for, the route,
/// the target the upstream sees, the token.
const FORWARD_CASES: &[(&str, &str, &str, &str)] = &[
    ("http://api.one.test/v1/x", "one", "/v1/x", "Bearer tok-a-0"),
    // strip_prefix, with a base path in `url` and a query.
    (
        "http://api.two.test/v2/users?id=7&q=a%2Fb",
        "two",
        "/base/users?id=7&q=a%2Fb",
        "Bearer tok-a-0",
    ),
    // A wildcard host, named in capitals.
    (
        "http://EU.three.test/items/9",
        "three",
        "/items/9",
        "Bearer tok-b-0",
    ),
];

impl Forward {
    async fn start() -> Self {
        let a = tokens("tok-a").await;
        let b = tokens("tok-b").await;
        let echoes = Echoes::start(&["one", "two", "three"]).await;
        let config = ConfigBuilder::new()
            .listener(
                Listener::new("forward")
                    .route(
                        Route::named("one")
                            .host("api.one.test")
                            .url(&echoes.url("one", ""))
                            .token(app(&a.url("/token"))),
                    )
                    .route(
                        Route::named("two")
                            .host("api.two.test")
                            .path_prefix("/v2")
                            .strip_prefix(true)
                            .url(&echoes.url("two", "/base"))
                            .token(app(&a.url("/token"))),
                    )
                    .route(
                        Route::named("three")
                            .host("*.three.test")
                            .url(&echoes.url("three", ""))
                            .token(Token::new(&b.url("/token"), "other").secret("pw2")),
                    ),
            )
            .render();
        let sidecar = Sidecar::start(&config).await;
        let proxy = format!("http://{}", sidecar.running().local_addr("one").unwrap());
        Self {
            sidecar,
            proxy,
            a,
            b,
            echoes,
        }
    }

    /// Runs `client` (program, arguments before the URL, environment; `{proxy}` in any of them
    /// is the proxy URL) once per case, then checks what each upstream got.
    async fn check_client(&self, name: &str, program: &str, args: &[&str], env: &[(&str, &str)]) {
        for &(url, route, uri, authorization) in FORWARD_CASES {
            let fill = |s: &str| s.replace("{proxy}", &self.proxy);
            let mut all_args: Vec<String> = args.iter().map(|s| fill(s)).collect();
            all_args.push(url.to_owned());
            let env = env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), fill(v)))
                .collect();
            let out = run_client(program.to_owned(), all_args, env).await;
            let values = json_values(&out);
            assert_eq!(values.len(), 1, "{name}: {out}");
            assert_echoed(name, url, &values[0], route, uri, authorization);
        }
    }
}

/// That the echo `seen` is route `route`'s, for `uri`, with `authorization` and nothing of
/// the proxy exchange.
fn assert_echoed(
    client: &str,
    url: &str,
    seen: &Value,
    route: &str,
    uri: &str,
    authorization: &str,
) {
    let context = format!("{client}, {url}: {seen}");
    assert_eq!(seen["route"], route, "{context}");
    assert_eq!(seen["uri"], uri, "{context}");
    assert_eq!(seen["method"], "GET", "{context}");
    assert_eq!(
        seen["headers"]["authorization"],
        serde_json::json!([authorization]),
        "{context}"
    );
    // Host is the upstream's (127.0.0.1:<port>), not the name the app asked for.
    let host = seen["headers"]["host"][0].as_str().unwrap();
    assert!(host.starts_with("127.0.0.1:"), "{context}");
    for hop in ["proxy-connection", "proxy-authorization", "keep-alive"] {
        assert!(
            seen["headers"].get(hop).is_none(),
            "{hop} reached the upstream: {context}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_a_proxy_setting_reach_each_route_with_its_token() {
    let forward = Forward::start().await;

    // curl -x, with the three URLs in one run: one app connection to bearerd (curl says how
    // many connections it opened for each URL), whose requests go to three upstreams in turn.
    let mut args = vec![
        "-q",
        "-sS",
        "--fail",
        "-w",
        "\n%{num_connects}\n",
        "-x",
        forward.proxy.as_str(),
    ];
    args.extend(FORWARD_CASES.iter().map(|case| case.0));
    let out = run_client(
        "curl".into(),
        args.iter().map(|s| (*s).to_owned()).collect(),
        vec![],
    )
    .await;
    let values = json_values(&out);
    assert_eq!(values.len(), 2 * FORWARD_CASES.len(), "{out}");
    let connects: Vec<&Value> = values.iter().skip(1).step_by(2).collect();
    assert_eq!(connects, [1, 0, 0], "one connection for the three: {out}");
    for (seen, &(url, route, uri, authorization)) in values.iter().step_by(2).zip(FORWARD_CASES) {
        assert_echoed("curl -x", url, seen, route, uri, authorization);
    }

    // curl reads the lowercase http_proxy only.
    forward
        .check_client(
            "http_proxy= curl",
            "curl",
            &["-q", "-sS", "--fail"],
            &[("http_proxy", "{proxy}")],
        )
        .await;

    // Python's urllib, with either spelling of the variable.
    let urllib = "import sys, urllib.request\n\
                  sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())";
    for variable in ["HTTP_PROXY", "http_proxy"] {
        forward
            .check_client(
                &format!("{variable}= python3 urllib"),
                "python3",
                &["-c", urllib],
                &[(variable, "{proxy}")],
            )
            .await;
    }

    // Python's requests (urllib3 underneath).
    let python = python_with_requests();
    let requests = "import sys, requests\n\
                    r = requests.get(sys.argv[1], timeout=20)\n\
                    r.raise_for_status()\n\
                    sys.stdout.write(r.text)";
    forward
        .check_client(
            &format!("HTTP_PROXY= {} requests", python.display()),
            python.to_str().unwrap(),
            &["-c", requests],
            &[("HTTP_PROXY", "{proxy}")],
        )
        .await;

    // GNU wget, its proxy set on the command line (and no ~/.wgetrc read).
    forward
        .check_client(
            "wget",
            "wget",
            &[
                "--no-config",
                "-q",
                "-O",
                "-",
                "-e",
                "use_proxy=yes",
                "-e",
                "http_proxy={proxy}",
            ],
            &[],
        )
        .await;

    // 1 + 3 + 6 + 3 + 3 requests, each to its route's upstream.
    assert_eq!(forward.echoes.hits(), 18);
    // `one` and `two` share a token source: one token request each endpoint.
    assert_eq!((forward.a.count(), forward.b.count()), (1, 1));
    forward.sidecar.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Host and path matching through a reverse listener
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn reverse_listener_matches_host_and_path_as_documented() {
    let endpoint = tokens("tok").await;
    let labels = [
        "exact",
        "v2",
        "v2-users",
        "wild",
        "ipv6",
        "strip",
        "dup-first",
        "dup-second",
        "root",
        "root-a",
    ];
    let echoes = Echoes::start(&labels).await;
    let route = |label: &str, host: &str| {
        Route::named(label)
            .host(host)
            .url(&echoes.url(label, ""))
            .token(app(&endpoint.url("/token")))
    };
    let config = ConfigBuilder::new()
        .listener(
            Listener::new("reverse")
                .route(route("exact", "api.example.test"))
                .route(route("v2", "api.example.test").path_prefix("/v2"))
                .route(
                    route("v2-users", "api.example.test")
                        .path_prefix("/v2/users")
                        .strip_prefix(true),
                )
                // After `exact`: for api.example.test both match with no prefix, the first wins.
                .route(route("wild", "*.example.test"))
                .route(route("ipv6", "[::1]"))
                .route(
                    route("strip", "strip.test")
                        .path_prefix("/api/")
                        .strip_prefix(true),
                )
                // Equal once normalised (case, trailing dot, trailing slash): the first wins.
                .route(route("dup-first", "dup.test").path_prefix("/p"))
                .route(route("dup-second", "DUP.test.").path_prefix("/p/"))
                .route(route("root", "root.test").path_prefix("/"))
                .route(route("root-a", "root.test").path_prefix("/a")),
        )
        .render();
    let sidecar = Sidecar::start(&config).await;
    let addr = sidecar.running().local_addr("exact").unwrap();

    let cases: &[(&str, &str, &str)] = &[
        // Host: port stripped, any case, the root's trailing dot ignored.
        ("api.example.test", "/x", "route exact /x"),
        ("api.example.test:8443", "/x", "route exact /x"),
        ("API.Example.TEST", "/x", "route exact /x"),
        ("api.example.test.", "/x", "route exact /x"),
        ("api.example.test.:80", "/x", "route exact /x"),
        // Longest prefix, on segment boundaries.
        ("api.example.test", "/v2", "route v2 /v2"),
        ("api.example.test", "/v2/", "route v2 /v2/"),
        ("api.example.test", "/v2?q=1", "route v2 /v2?q=1"),
        ("api.example.test", "/v2x", "route exact /v2x"),
        ("api.example.test", "/v2/usersx", "route v2 /v2/usersx"),
        ("api.example.test", "/V2/x", "route exact /V2/x"),
        // strip_prefix, with and without a query.
        ("api.example.test", "/v2/users", "route v2-users /"),
        ("api.example.test", "/v2/users/", "route v2-users /"),
        (
            "api.example.test",
            "/v2/users?id=7",
            "route v2-users /?id=7",
        ),
        (
            "api.example.test",
            "/v2/users/7?fields=a%2Fb&x=1",
            "route v2-users /7?fields=a%2Fb&x=1",
        ),
        (
            "strip.test",
            "/api/users?x=1&y=%2F",
            "route strip /users?x=1&y=%2F",
        ),
        ("strip.test", "/api?x=1", "route strip /?x=1"),
        ("strip.test", "/api", "route strip /"),
        ("strip.test", "/apix", "404 no_route"),
        ("strip.test", "/", "404 no_route"),
        // %2F is not a segment boundary, and is passed on as sent.
        ("api.example.test", "/v2%2Fusers", "route exact /v2%2Fusers"),
        (
            "api.example.test",
            "/v2%2fusers/7",
            "route exact /v2%2fusers/7",
        ),
        (
            "api.example.test",
            "/v2/users%2F7",
            "route v2 /v2/users%2F7",
        ),
        // One label for the wildcard.
        ("a.example.test", "/x", "route wild /x"),
        ("A-1.EXAMPLE.TEST:8080", "/x", "route wild /x"),
        ("a.b.example.test", "/x", "404 no_route"),
        ("example.test", "/x", "404 no_route"),
        (".example.test", "/x", "404 no_route"),
        ("aexample.test", "/x", "404 no_route"),
        // IPv6 literals, with and without a port.
        ("[::1]", "/x", "route ipv6 /x"),
        ("[::1]:8080", "/x", "route ipv6 /x"),
        ("[::2]:8080", "/x", "404 no_route"),
        // First among equals.
        ("dup.test", "/p/q", "route dup-first /p/q"),
        ("dup.test", "/p", "route dup-first /p"),
        // "/" takes every path; a longer prefix wins.
        ("root.test", "/", "route root /"),
        ("root.test", "/ab", "route root /ab"),
        ("root.test", "/a", "route root-a /a"),
        ("root.test", "/a/b", "route root-a /a/b"),
        ("unknown.test", "/x", "404 no_route"),
        // Dot segments, plain or percent-encoded, on every route and on none.
        ("api.example.test", "/v2/../admin", "400 bad_request"),
        ("api.example.test", "/v2/%2e%2e/admin", "400 bad_request"),
        ("api.example.test", "/v2/%2E%2e/admin", "400 bad_request"),
        ("api.example.test", "/v2/.%2E/admin", "400 bad_request"),
        (
            "api.example.test",
            "/v2/users/../../admin",
            "400 bad_request",
        ),
        ("api.example.test", "/v2/./x", "400 bad_request"),
        ("api.example.test", "/v2/%2e/x", "400 bad_request"),
        ("api.example.test", "/v2/..", "400 bad_request"),
        ("api.example.test", "/..", "400 bad_request"),
        ("api.example.test", "/a/../b?x=1", "400 bad_request"),
        ("strip.test", "/api/..", "400 bad_request"),
        ("unknown.test", "/../x", "400 bad_request"),
        // Not dot segments.
        ("api.example.test", "/v2/.../x", "route v2 /v2/.../x"),
        ("api.example.test", "/v2/..x/.y", "route v2 /v2/..x/.y"),
        (
            "api.example.test",
            "/v2/%2e%2e%2e",
            "route v2 /v2/%2e%2e%2e",
        ),
        ("api.example.test", "/v2/x?p=../y", "route v2 /v2/x?p=../y"),
    ];
    let mut failures = Vec::new();
    let mut forwarded = 0;
    for &(host, target, wanted) in cases {
        let answer = raw(addr, &format!("GET {target}"), Some(host)).await;
        let got = if answer.status == 200 {
            let json = answer.json();
            assert_eq!(
                answer.header("x-route"),
                json["route"].as_str(),
                "{answer:?}"
            );
            assert_eq!(json["headers"]["authorization"][0], "Bearer tok-0");
            format!(
                "route {} {}",
                json["route"].as_str().unwrap(),
                json["uri"].as_str().unwrap()
            )
        } else {
            format!(
                "{} {}",
                answer.status,
                answer.json()["error"].as_str().unwrap_or("")
            )
        };
        if got.starts_with("route ") {
            forwarded += 1;
        }
        if got != wanted {
            failures.push(format!(
                "Host {host:?}, GET {target}: got {got:?}, want {wanted:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // What was refused never reached an upstream.
    assert_eq!(echoes.hits(), forwarded);
    sidecar.stop().await;
}

// ---------------------------------------------------------------------------------------------
// What a forward listener refuses
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_listener_refuses_unserved_hosts_connect_and_origin_form_without_a_token() {
    let endpoint = tokens("tok").await;
    let recording = RecordingUpstream::start().await;
    let config = ConfigBuilder::new()
        .listener(
            Listener::new("forward").route(
                Route::named("rec")
                    .host("api.rec.test")
                    .url(&recording.url())
                    .token(app(&endpoint.url("/token"))),
            ),
        )
        .render();
    let sidecar = Sidecar::start(&config).await;
    let addr = sidecar.running().local_addr("rec").unwrap();
    // The source's first token, fetched at start; the refusals below must cause no other.
    endpoint.wait_for_requests(1).await;

    let cases: &[(&str, Option<&str>, u16, &str)] = &[
        (
            "GET http://unknown.test/x",
            Some("unknown.test"),
            403,
            "host_not_served",
        ),
        // A forward listener goes by the target, never by Host.
        (
            "GET http://evil.test/x",
            Some("api.rec.test"),
            403,
            "host_not_served",
        ),
        (
            "GET http://api.rec.test.evil.test/x",
            Some("api.rec.test.evil.test"),
            403,
            "host_not_served",
        ),
        ("GET http://rec.test/x", None, 403, "host_not_served"),
        ("POST http://127.0.0.1:9/x", None, 403, "host_not_served"),
        // Origin form: a forward listener has no host to go by.
        ("GET /x", Some("api.rec.test"), 400, "bad_request"),
        // CONNECT, to a served host or not: 405 before any route is looked at.
        (
            "CONNECT api.rec.test:443",
            Some("api.rec.test:443"),
            405,
            "method_not_allowed",
        ),
        (
            "CONNECT api.rec.test:80",
            Some("api.rec.test:80"),
            405,
            "method_not_allowed",
        ),
        (
            "CONNECT unknown.test:443",
            Some("unknown.test:443"),
            405,
            "method_not_allowed",
        ),
        (
            "TRACE http://api.rec.test/x",
            None,
            405,
            "method_not_allowed",
        ),
        // Dot segments, on the served host.
        (
            "GET http://api.rec.test/v1/../admin",
            None,
            400,
            "bad_request",
        ),
        (
            "GET http://api.rec.test/v1/%2e%2e/admin",
            None,
            400,
            "bad_request",
        ),
        ("GET http://api.rec.test/%2E", None, 400, "bad_request"),
    ];
    for &(line, host, status, error) in cases {
        let answer = raw(addr, line, host).await;
        assert_eq!(
            (answer.status, answer.json()["error"].as_str()),
            (status, Some(error)),
            "{line}: {answer:?}"
        );
        if line.starts_with("CONNECT") {
            let detail = answer.json()["detail"].as_str().unwrap().to_owned();
            assert!(
                detail.contains("TLS tunnel cannot carry an injected token")
                    && detail.contains("http://"),
                "{detail}"
            );
        }
        if status == 403 {
            assert!(
                answer.json()["detail"]
                    .as_str()
                    .unwrap()
                    .contains("hosts of its routes"),
                "{answer:?}"
            );
        }
    }

    // curl, as an app with HTTPS_PROXY set, would try CONNECT: it gets the 405.
    let proxy = format!("http://{addr}");
    let tunnel = tokio::task::spawn_blocking({
        let proxy = proxy.clone();
        move || {
            Command::new("curl")
                .args(["-q", "-sS", "-x", &proxy, "https://api.rec.test/x"])
                .env_remove("NO_PROXY")
                .env_remove("no_proxy")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&tunnel.stderr);
    assert!(
        !tunnel.status.success() && stderr.contains("405"),
        "{stderr}"
    );
    // And an unserved host through curl -x: 403 with the JSON.
    let out = run_client(
        "curl".into(),
        [
            "-q",
            "-sS",
            "-w",
            "\n%{http_code}",
            "-x",
            &proxy,
            "http://other.test/x",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect(),
        vec![],
    )
    .await;
    let (body, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "403", "{out}");
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap()["error"],
        "host_not_served"
    );

    assert_eq!(
        recording.received(),
        "",
        "a refused request reached the upstream"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        endpoint.count(),
        1,
        "a refused request caused a token request"
    );

    // The served host does get through, with the token.
    let answer = raw(addr, "GET http://api.rec.test/ok?x=1", None).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "ok"));
    let received = recording.received().to_ascii_lowercase();
    assert!(
        received.starts_with("get /ok?x=1 http/1.1\r\n"),
        "{received}"
    );
    assert!(
        received.contains("authorization: bearer tok-0\r\n"),
        "{received}"
    );
    sidecar.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Token sources shared between routes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn routes_with_equal_token_settings_share_one_source() {
    let endpoint = tokens("tok").await;
    let echoes = Echoes::start(&["solo", "a", "b", "c", "d"]).await;
    let token_url = endpoint.url("/token");
    let read = || app(&token_url).scope("read");
    let route = |label: &str| {
        Route::named(label)
            .host(&format!("{label}.test"))
            .url(&echoes.url(label, ""))
    };
    let config = ConfigBuilder::new()
        .upstream(Upstream::new("solo", &echoes.url("solo", "")).token(read()))
        .listener(
            Listener::new("reverse")
                .route(route("a").token(read()))
                .route(route("b").token(read()))
                // Another scope: another source.
                .route(route("c").token(app(&token_url).scope("write")))
                // The same settings in another order: the same source.
                .route(
                    route("d").token(
                        Token::empty()
                            .scope("read")
                            .secret("pw")
                            .client_id("app")
                            .url(&token_url),
                    ),
                ),
        )
        .render();
    let sidecar = Sidecar::start(&config).await;
    let addr = sidecar.running().local_addr("a").unwrap();
    let mut connection = AppConnection::open(addr).await;
    let mut token_of = std::collections::BTreeMap::new();
    for label in ["a", "b", "c", "d"] {
        let answer = connection.get(&format!("{label}.test"), "/x").await;
        assert_eq!(describe(&answer), format!("route {label} /x"));
        let json = answer.json();
        token_of.insert(label, json["headers"]["authorization"][0].clone());
    }
    let solo = support::get(&sidecar.url("solo", "/x")).await.echo();
    assert_eq!(
        (&token_of["a"], &token_of["b"], &token_of["d"]),
        (&token_of["a"], &token_of["a"], &token_of["a"]),
        "{token_of:?}"
    );
    assert_eq!(solo.header("authorization"), token_of["a"].as_str());
    assert_ne!(token_of["c"], token_of["a"]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let scopes: std::collections::BTreeSet<String> = endpoint
        .requests()
        .iter()
        .map(|r| r.form["scope"].clone())
        .collect();
    assert_eq!(endpoint.count(), 2, "one source per distinct settings");
    assert_eq!(scopes, ["read".to_owned(), "write".to_owned()].into());

    // Metrics and logs keep the label `upstream`, the route's name.
    let scrape = sidecar.running().metrics().render().unwrap();
    for label in ["solo", "a", "b", "c", "d"] {
        assert!(
            scrape
                .lines()
                .any(|line| line.starts_with("bearerd_requests_total{")
                    && line.contains(&format!("upstream=\"{label}\""))
                    && line.contains("code=\"200\"")
                    && line.ends_with(" 1")),
            "no bearerd_requests_total for {label}:\n{scrape}"
        );
    }
    sidecar.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------------

/// A reverse listener: `one` (host one.test), `two` (host two.test, path_prefix `two_prefix`),
/// and `three` (host three.test) if `with_three`.
fn reload_config(echoes: &Echoes, token_url: &str, two_prefix: &str, with_three: bool) -> Listener {
    let route = |label: &str| {
        Route::named(label)
            .host(&format!("{label}.test"))
            .url(&echoes.url(label, ""))
            .token(app(token_url))
    };
    let listener = Listener::new("reverse")
        .route(route("one"))
        .route(route("two").path_prefix(two_prefix));
    if with_three {
        listener.route(route("three"))
    } else {
        listener
    }
}

fn load(sidecar: &Sidecar, text: &str) -> Result<bearerd::config::Config, String> {
    let path = sidecar.file("bearerd.toml");
    std::fs::write(&path, text).unwrap();
    bearerd::config::Config::load(&path).map_err(|e| e.to_string())
}

#[tokio::test]
async fn reload_changes_the_route_table_in_place_on_the_same_connection() {
    let endpoint = tokens("tok").await;
    let echoes = Echoes::start(&["one", "two", "three"]).await;
    let token_url = endpoint.url("/token");
    let first = ConfigBuilder::new()
        .listener(reload_config(&echoes, &token_url, "/v1", false))
        .render();
    let mut sidecar = Sidecar::start(&first).await;
    let addr = sidecar.running().local_addr("one").unwrap();
    let mut conn = AppConnection::open(addr).await;
    assert_eq!(conn.route_of("one.test", "/x").await, "route one /x");
    assert_eq!(conn.route_of("two.test", "/v1/x").await, "route two /v1/x");
    assert_eq!(conn.route_of("two.test", "/v2/x").await, "404 no_route");
    assert_eq!(conn.route_of("three.test", "/x").await, "404 no_route");

    // `two` moves to /v2, `three` is added.
    let second = load(
        &sidecar,
        &ConfigBuilder::new()
            .listener(reload_config(&echoes, &token_url, "/v2", true))
            .render(),
    )
    .unwrap();
    sidecar
        .running
        .as_mut()
        .unwrap()
        .reload(&second)
        .await
        .unwrap();
    for route in ["one", "two", "three"] {
        assert_eq!(sidecar.running().local_addr(route), Some(addr), "{route}");
    }
    // The same app connection, kept across the reload, is served by the new table.
    assert_eq!(conn.route_of("two.test", "/v1/x").await, "404 no_route");
    assert_eq!(conn.route_of("two.test", "/v2/x").await, "route two /v2/x");
    assert_eq!(conn.route_of("three.test", "/x").await, "route three /x");
    assert_eq!(conn.route_of("one.test", "/x").await, "route one /x");

    // A table that validates but cannot be applied (a CA file missing) leaves the running
    // one whole: `two` stays at /v2, `four` does not appear.
    let broken = ConfigBuilder::new()
        .listener(
            reload_config(&echoes, &token_url, "/v3", true).route(
                Route::named("four")
                    .host("four.test")
                    .url(&echoes.url("one", ""))
                    .token(app(&token_url))
                    .tls(Tls::new().ca_file("missing-ca.pem")),
            ),
        )
        .render();
    let broken = load(&sidecar, &broken).unwrap();
    assert!(sidecar
        .running
        .as_mut()
        .unwrap()
        .reload(&broken)
        .await
        .is_err());
    assert_eq!(conn.route_of("two.test", "/v2/x").await, "route two /v2/x");
    assert_eq!(conn.route_of("two.test", "/v3/x").await, "404 no_route");
    assert_eq!(conn.route_of("four.test", "/x").await, "404 no_route");

    // A table with a route name twice does not even load.
    let duplicate = ConfigBuilder::new()
        .listener(
            reload_config(&echoes, &token_url, "/v2", true).route(
                Route::named("two")
                    .host("dup.test")
                    .url(&echoes.url("two", ""))
                    .token(app(&token_url)),
            ),
        )
        .render();
    let error = load(&sidecar, &duplicate).unwrap_err();
    assert!(error.contains("already the name of"), "{error}");

    // One token all along: the token settings never changed.
    assert_eq!(endpoint.count(), 1);
    sidecar.stop().await;
}

/// Waits until bearerd has logged `text` `times` times.
fn wait_for_log(daemon: &Daemon, text: &str, times: usize) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = daemon
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count();
        if found >= times {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} in {:?}",
            daemon.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_route_table_keeps_the_running_one() {
    let endpoint = tokens("tok").await;
    let echoes = Echoes::start(&["one", "two", "three"]).await;
    let token_url = endpoint.url("/token");
    let route = |label: &str, name: &str| {
        Route::named(name)
            .host(&format!("api.{label}.test"))
            .url(&echoes.url(label, ""))
            .token(app(&token_url))
    };
    let forward = |routes: Vec<Route>| {
        let listener = routes
            .into_iter()
            .fold(Listener::new("forward"), Listener::route);
        ConfigBuilder::new().listener(listener).render()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bearerd.toml");
    std::fs::write(
        &path,
        forward(vec![route("one", "one"), route("two", "two")]),
    )
    .unwrap();
    let daemon = Daemon::start(path.to_str().unwrap());
    let addr = daemon.listen_addr("one");
    let get = |url: &'static str| async move {
        let answer = raw(addr, &format!("GET {url}"), None).await;
        match answer.status {
            200 => format!("route {}", answer.json()["route"].as_str().unwrap()),
            status => format!("{status} {}", answer.json()["error"].as_str().unwrap()),
        }
    };
    assert_eq!(get("http://api.two.test/x").await, "route two");

    // `three` added, but under the name `one` again: refused whole.
    std::fs::write(
        &path,
        forward(vec![
            route("one", "one"),
            route("two", "two"),
            route("three", "one"),
        ]),
    )
    .unwrap();
    daemon.signal("HUP");
    wait_for_log(&daemon, "reload refused: invalid config", 1);
    wait_for_log(&daemon, "is already the name of listener[0].route[0]", 1);
    assert_eq!(get("http://api.one.test/x").await, "route one");
    assert_eq!(get("http://api.two.test/x").await, "route two");
    assert_eq!(get("http://api.three.test/x").await, "403 host_not_served");

    // Named `three`: applied, on the same listener.
    std::fs::write(
        &path,
        forward(vec![
            route("one", "one"),
            route("two", "two"),
            route("three", "three"),
        ]),
    )
    .unwrap();
    daemon.signal("HUP");
    wait_for_log(&daemon, "config reloaded", 1);
    assert_eq!(get("http://api.three.test/x").await, "route three");
    assert_eq!(get("http://api.one.test/x").await, "route one");
    assert_eq!(endpoint.count(), 1);
}

// ---------------------------------------------------------------------------------------------
// --check
// ---------------------------------------------------------------------------------------------

/// Runs `bearerd --check` on `config` (its secret in the file `secret`); its stdout.
fn check_output(config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "do-not-print-me\n").unwrap();
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(BIN)
        .args(["--check", "--config", path.to_str().unwrap()])
        .env_remove("BEARERD_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!stdout.contains("do-not-print-me"));
    stdout
}

/// The token table of every route `--check` is shown, its secret in the file `secret`.
fn check_token() -> Token {
    Token::new("https://auth.example.com/oauth/token", "abc").secret_file("secret")
}

/// A route `name` for `host` to `url`, with [`check_token`].
fn check_route(name: &str, host: &str, url: &str) -> Route {
    Route::named(name).host(host).url(url).token(check_token())
}

#[test]
fn check_prints_each_listeners_table_and_warns_about_routes_that_never_match() {
    let config = ConfigBuilder::new()
        .upstream(Upstream::new("solo", "https://solo.example").token(check_token()))
        .listener(
            Listener::new("forward")
                .listen("127.0.0.1:3128")
                .route(
                    check_route("one", "api.one.test", "https://api.one.example")
                        .path_prefix("/v1"),
                )
                .route(check_route(
                    "three",
                    "*.three.test",
                    "https://three.example/base",
                ))
                .route(
                    check_route("two", "api.two.test", "https://api.two.example")
                        .path_prefix("/v2/users/")
                        .strip_prefix(true),
                ),
        )
        .listener(
            Listener::new("reverse")
                .listen("127.0.0.1:8080")
                .route(check_route(
                    "wild",
                    "*.example.test",
                    "https://wild.example",
                ))
                // Shadowed: the wildcard takes api.example.test first, with the same (no) prefix.
                .route(check_route(
                    "api",
                    "api.example.test",
                    "https://api.example",
                ))
                .route(
                    check_route("dup-first", "dup.test", "https://dup.example").path_prefix("/p"),
                )
                // Shadowed: the same host and prefix once normalised.
                .route(
                    check_route("dup-second", "DUP.test.", "https://dup.example")
                        .path_prefix("/p/"),
                )
                // Not shadowed: a longer prefix.
                .route(
                    check_route("dup-longer", "dup.test", "https://dup.example")
                        .path_prefix("/p/q"),
                )
                .route(
                    Route::named("fallback")
                        .url("https://fallback.example")
                        .token(check_token()),
                ),
        )
        .render();
    let stdout = check_output(&config);
    let forward = "\
listener 127.0.0.1:3128 (forward proxy (HTTP_PROXY): the requested host and path), routes in match order:
  1. two: api.two.test, /v2/users (stripped) -> https://api.two.example/
  2. one: api.one.test, /v1 -> https://api.one.example/
  3. three: *.three.test, any path -> https://three.example/base
";
    let reverse = "\
listener 127.0.0.1:8080 (reverse proxy: Host and path), routes in match order:
  1. dup-longer: dup.test, /p/q -> https://dup.example/
  2. dup-first: dup.test, /p -> https://dup.example/
  3. dup-second: dup.test, /p -> https://dup.example/
  WARNING: route dup-second can never match: dup-first comes first and takes the same requests
  4. wild: *.example.test, any path -> https://wild.example/
  5. api: api.example.test, any path -> https://api.example/
  WARNING: route api can never match: wild comes first and takes the same requests
  6. fallback: any host, any path -> https://fallback.example/
";
    assert!(stdout.contains(forward), "wanted\n{forward}\nin\n{stdout}");
    assert!(stdout.contains(reverse), "wanted\n{reverse}\nin\n{stdout}");
    // An [[upstream]] is described as before, with no table.
    assert!(
        stdout.contains("upstream solo: listen 127.0.0.1:0 -> https://solo.example/"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("\nlistener ").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("WARNING").count(), 2, "{stdout}");
}

/// "routes in match order" lists a listener's routes in file order, but a request goes to the
/// longest matching prefix: here `/v2/users/7` goes to `users`, listed after `v2`. In the
/// order they are tried (the longest prefix first, file order among equals), the first route
/// that matches a request is the one that takes it.
#[test]
fn check_lists_routes_in_the_order_they_match() {
    let config = ConfigBuilder::new()
        .listener(
            Listener::new("reverse")
                .listen("127.0.0.1:8080")
                .route(
                    check_route("v2", "api.example.test", "https://v2.example").path_prefix("/v2"),
                )
                .route(
                    check_route("users", "api.example.test", "https://users.example")
                        .path_prefix("/v2/users"),
                ),
        )
        .render();
    let stdout = check_output(&config);
    let table = "\
listener 127.0.0.1:8080 (reverse proxy: Host and path), routes in match order:
  1. users: api.example.test, /v2/users -> https://users.example/
  2. v2: api.example.test, /v2 -> https://v2.example/
";
    assert!(stdout.contains(table), "wanted\n{table}\nin\n{stdout}");
}

// ---------------------------------------------------------------------------------------------
// The Kubernetes example
// ---------------------------------------------------------------------------------------------

/// deploy/kubernetes/components/forward-proxy loads with bearerd's loader beside the app's
/// config, and the forward-proxy example's app container's HTTP_PROXY names the forward
/// listener and its calls the hosts of the routes.
#[test]
fn forward_proxy_example_loads_and_matches_its_pod() {
    use bearerd::config::{Config, Mode};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let config = Config::parse_files(vec![
        ("/etc/bearerd/bearerd.toml".into(), read("app/bearerd.toml")),
        (
            "/etc/bearerd/conf.d/forward-proxy.toml".into(),
            read("components/forward-proxy/forward-proxy.toml"),
        ),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let [_, listener] = config.listeners.as_slice() else {
        panic!(
            "the app's listener and the forward one wanted: {:?}",
            config.listeners
        )
    };
    assert_eq!(listener.mode, Mode::Forward);
    assert_eq!(listener.listen.to_string(), "127.0.0.1:3128");
    assert_eq!(listener.routes.len(), 1);
    let patch = read("forward-proxy/app-patch.yaml");
    assert!(patch.contains("value: http://127.0.0.1:3128"), "{patch}");
    for upstream in config.upstreams.iter().filter(|u| u.route.host.is_some()) {
        let host = upstream.route.host.as_deref().unwrap();
        assert!(
            patch.contains(&format!("http://{host}/")),
            "the app never calls {host}"
        );
        assert_eq!(
            upstream.url.scheme_str(),
            Some("https"),
            "{}",
            upstream.name
        );
        let Some(bearerd::secret::SecretSource::File(secret)) = upstream.token.auth.secret() else {
            panic!(
                "{}: the secret should come from a mounted file",
                upstream.name
            )
        };
        assert!(
            secret.starts_with("/var/run/secrets/"),
            "{}",
            secret.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// The commented-out `[[listener]]` of config.example.toml, uncommented, is a valid config.
#[test]
fn config_example_listener_block_is_valid_once_uncommented() {
    use bearerd::config::{Config, Mode};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text
        .find("\n# [[listener]]\n")
        .expect("no # [[listener]] block")
        + 1;
    let end = start
        + text[start..]
            .find("\n\n")
            .expect("no blank line after the block");
    let block: String = text[start..end]
        .lines()
        .map(|line| {
            let line = line.strip_prefix('#').expect("a comment line");
            format!("{}\n", line.strip_prefix(' ').unwrap_or(line))
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bearerd.toml");
    std::fs::write(&file, &block).unwrap();
    let config = Config::load(&file).unwrap_or_else(|e| panic!("{e}\n{block}"));
    let [listener] = config.listeners.as_slice() else {
        panic!("{:?}", config.listeners)
    };
    assert_eq!(listener.mode, Mode::Forward);
    assert_eq!(listener.routes, ["payments", "ledger-v2"]);
    let ledger = &config.upstreams[1];
    assert_eq!(ledger.route.path_prefix.as_deref(), Some("/v2"));
    assert!(ledger.route.strip_prefix);
}

/// Route tables that must not load, each with the key its error names.
#[test]
fn invalid_route_tables_are_config_errors() {
    let token = || Token::new("https://auth.example.com/token", "app").secret("pw");
    let route = |name: &str| {
        Route::named(name)
            .host("api.example.com")
            .url("https://api.example.com")
            .token(token())
    };
    let cases: Vec<(&str, ConfigBuilder, &str)> = vec![
        (
            "a forward route without host",
            ConfigBuilder::new().listener(
                Listener::new("forward").route(
                    Route::named("a")
                        .url("https://api.example.com")
                        .token(token()),
                ),
            ),
            "listener[0].route[0].host",
        ),
        (
            "a route name twice",
            ConfigBuilder::new().listener(
                Listener::new("reverse")
                    .route(route("a"))
                    .route(route("a").path_prefix("/v2")),
            ),
            "listener[0].route[1].name",
        ),
        (
            "a route and an upstream of one name",
            ConfigBuilder::new()
                .upstream(Upstream::new("a", "https://api.example.com").token(token()))
                .listener(Listener::new("reverse").route(route("a"))),
            "listener[0].route[0].name",
        ),
        (
            "strip_prefix without path_prefix",
            ConfigBuilder::new()
                .listener(Listener::new("reverse").route(route("a").strip_prefix(true))),
            "listener[0].route[0].strip_prefix",
        ),
        (
            "a path_prefix with a dot segment",
            ConfigBuilder::new()
                .listener(Listener::new("reverse").route(route("a").path_prefix("/v2/../x"))),
            "listener[0].route[0].path_prefix",
        ),
        (
            "a wildcard of two labels",
            ConfigBuilder::new()
                .listener(Listener::new("reverse").route(route("a").host("*.*.example.com"))),
            "listener[0].route[0].host",
        ),
        (
            "listen on a route",
            ConfigBuilder::new().listener(
                Listener::new("reverse").route(route("a").set("listen", "\"127.0.0.1:1\"")),
            ),
            "listener[0].route[0].listen",
        ),
        (
            "host on an [[upstream]]",
            ConfigBuilder::new().upstream(
                Upstream::new("a", "https://api.example.com")
                    .token(token())
                    .set("host", "\"api.example.com\""),
            ),
            "upstream[0].host",
        ),
        (
            "a listener without routes",
            ConfigBuilder::new().listener(Listener::new("forward")),
            "listener[0].route",
        ),
        (
            "a forward listener off loopback without allow_from",
            ConfigBuilder::new().listener(
                Listener::new("forward")
                    .listen("0.0.0.0:3128")
                    .route(route("a")),
            ),
            "listener[0].listen",
        ),
    ];
    for (what, config, key) in cases {
        let text = config.render();
        let error = match bearerd::config::Config::parse(Path::new("bearerd.toml"), &text) {
            Ok(_) => panic!("{what}: loaded\n{text}"),
            Err(error) => error.to_string(),
        };
        assert!(
            error.contains(&format!(": {key}: ")),
            "{what}: {key} not named in\n{error}\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Dot segments in the forms upstream servers also resolve
// ---------------------------------------------------------------------------------------------

/// `..` followed by what common servers strip or read as a separator before they resolve dot
/// segments: a path parameter (`..;`: Tomcat, Jetty, Spring), an encoded slash (`..%2F`:
/// servers that decode it), a backslash (`..\`, `%5C`: IIS, some frameworks). Each would take
/// `/v2/..;/admin` to `/admin`, out of the route of `/v2` (and out of a `url`'s base path),
/// as `/v2/../admin` would: all are refused with 400, and nothing reaches the upstream. Paths
/// that only look alike pass.
#[tokio::test]
async fn dot_segments_in_the_forms_upstreams_resolve_are_refused_too() {
    let endpoint = tokens("tok").await;
    let recording = RecordingUpstream::start().await;
    let config = ConfigBuilder::new()
        .listener(
            Listener::new("reverse").route(
                Route::named("v2")
                    .host("api.example.test")
                    .path_prefix("/v2")
                    .url(&format!("{}/base", recording.url()))
                    .token(app(&endpoint.url("/token"))),
            ),
        )
        .render();
    let sidecar = Sidecar::start(&config).await;
    let addr = sidecar.running().local_addr("v2").unwrap();
    let mut forwarded = Vec::new();
    for target in [
        "/v2/..;/admin",
        "/v2/..;x=1/admin",
        "/v2/%2e%2e;/admin",
        "/v2/.;/admin",
        "/v2/..%2Fadmin",
        "/v2/..%2fadmin",
        "/v2/%2e%2e%2Fadmin",
        "/v2/..\\admin",
        "/v2/..%5Cadmin",
        "/v2/..%5cadmin",
        "/v2/..%3Badmin",
        "/v2/%2e%2e%5cadmin",
        "/v2/x/..\\..\\admin",
        "/v2\\..\\admin",
    ] {
        let answer = raw(addr, &format!("GET {target}"), Some("api.example.test")).await;
        if answer.status != 400 {
            forwarded.push(format!("{target}: {}", answer.status));
        }
    }
    assert!(
        forwarded.is_empty(),
        "not refused:\n{}\nthe upstream got:\n{}",
        forwarded.join("\n"),
        recording.received()
    );
    assert_eq!(recording.received(), "");
    // Alike, but no dot segment in any reading.
    for target in [
        "/v2/a;b/c",
        "/v2/..a;/x",
        "/v2/a..;/x",
        "/v2/...;/x",
        "/v2/a%2Fb",
        "/v2/%2e%2e%2e%2Fx",
        "/v2/.well-known;x",
    ] {
        let answer = raw(addr, &format!("GET {target}"), Some("api.example.test")).await;
        assert_eq!(answer.status, 200, "{target}: {answer:?}");
        assert!(
            recording
                .received()
                .contains(&format!("GET /base{target} HTTP/1.1\r\n")),
            "{target}: {}",
            recording.received()
        );
    }
    sidecar.stop().await;
}
