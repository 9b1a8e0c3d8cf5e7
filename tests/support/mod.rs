//! In-process fixtures for the integration tests, all on loopback port 0: HTTP and HTTPS
//! servers with scripted handlers, a token endpoint that records and counts what it gets, an
//! echo upstream, a throwaway CA, and a bearerd sidecar started from a TOML snippet (which
//! `config::ConfigBuilder` writes). `redis` runs a real redis-server for the cache tests, `tinyproxy` a real HTTP proxy for
//! the `[egress]` tests.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

pub mod config;
pub mod daemon;
pub mod raw;
pub mod redis;
pub mod tinyproxy;
pub mod vendors;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Body type fixtures answer with.
pub type Body = BoxBody<Bytes, std::io::Error>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFuture<Response<Body>> + Send + Sync>;

/// The lines a child process writes to `output`, as they come, on a channel: a test waits
/// for a "ready" line without blocking on the pipe.
pub fn lines_of(output: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A JSON answer.
pub fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(value.to_string()))
        .unwrap()
}

/// A server running on its own task until dropped.
pub struct Server {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    pub fn https_url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }
}

/// Serves `handler` over plain HTTP/1.1 and HTTP/2 (prior knowledge) on 127.0.0.1:0, with
/// upgrades: a handler may answer 101 and take the connection (`hyper::upgrade::on`).
pub async fn serve<F, Fut>(handler: F) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with(handler, None).await
}

/// Serves `handler` over TLS with `ca`'s server certificate, offering h2 and http/1.1 by ALPN.
pub async fn serve_tls<F, Fut>(handler: F, ca: &TestCa) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with(handler, Some(ca.acceptor())).await
}

async fn serve_with<F, Fut>(handler: F, tls: Option<tokio_rustls::TlsAcceptor>) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let handler: Handler = Arc::new(move |request| Box::pin(handler(request)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepted = Arc::clone(&connections);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let handler = Arc::clone(&handler);
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let handler = Arc::clone(&handler);
                    async move { Ok::<_, Infallible>(handler(request).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    Server {
        addr,
        connections,
        task,
    }
}

/// A token request as the endpoint saw it.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub method: http::Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: String,
    pub form: BTreeMap<String, String>,
}

impl TokenRequest {
    /// The Basic credentials, decoded as RFC 6749 §2.3.1 says: base64, then form-urlencoding.
    pub fn basic(&self) -> Option<(String, String)> {
        let value = self.headers.get("authorization")?.to_str().ok()?;
        let encoded = value.strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (id, secret) = decoded.split_once(':')?;
        let unescape = |s: &str| {
            form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        Some((unescape(id), unescape(secret)))
    }

    pub fn content_type(&self) -> Option<&str> {
        self.headers.get("content-type")?.to_str().ok()
    }
}

/// A token endpoint that records every request and answers with `respond`.
pub struct TokenEndpoint {
    pub server: Server,
    requests: Arc<Mutex<Vec<TokenRequest>>>,
    count: watch::Receiver<usize>,
}

impl TokenEndpoint {
    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().unwrap().clone()
    }
    pub fn count(&self) -> usize {
        *self.count.borrow()
    }
    /// Waits until at least `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut count = self.count.clone();
        count.wait_for(|c| *c >= n).await.unwrap();
    }
}

/// Starts a token endpoint; `respond` gets each request (the n-th, from 0) and answers it.
pub async fn token_endpoint<F, Fut>(respond: F) -> TokenEndpoint
where
    F: Fn(usize, TokenRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    token_endpoint_with(respond, None).await
}

/// Like [`token_endpoint`], over TLS.
pub async fn token_endpoint_tls<F, Fut>(respond: F, ca: &TestCa) -> TokenEndpoint
where
    F: Fn(usize, TokenRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    token_endpoint_with(respond, Some(ca)).await
}

async fn token_endpoint_with<F, Fut>(respond: F, ca: Option<&TestCa>) -> TokenEndpoint
where
    F: Fn(usize, TokenRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (count_tx, count) = watch::channel(0usize);
    let count_tx = Arc::new(count_tx);
    let respond = Arc::new(respond);
    let recorded = Arc::clone(&requests);
    let handler = move |request: Request<Incoming>| {
        let recorded = Arc::clone(&recorded);
        let respond = Arc::clone(&respond);
        let count_tx = Arc::clone(&count_tx);
        async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let body = String::from_utf8_lossy(&body).into_owned();
            let form = form_urlencoded::parse(body.as_bytes())
                .into_owned()
                .collect();
            let request = TokenRequest {
                method: parts.method,
                path: parts.uri.path().to_owned(),
                headers: parts.headers,
                body,
                form,
            };
            let n = {
                let mut all = recorded.lock().unwrap();
                all.push(request.clone());
                // Sent under the lock: two requests at once would otherwise send their counts
                // in either order, and the count could go down (7 after 8) for a while.
                count_tx.send_replace(all.len());
                all.len() - 1
            };
            respond(n, request).await
        }
    };
    let server = match ca {
        Some(ca) => serve_tls(handler, ca).await,
        None => serve(handler).await,
    };
    TokenEndpoint {
        server,
        requests,
        count,
    }
}

/// A successful token answer.
pub fn token_ok(token: &str, expires_in: u64) -> Response<Body> {
    json(
        StatusCode::OK,
        serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in}),
    )
}

/// What the echo upstream saw, as it reports it back.
#[derive(Debug, serde::Deserialize)]
pub struct Echo {
    pub method: String,
    pub uri: String,
    pub version: String,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_bytes: usize,
}

impl Echo {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|values| values.first())
            .map(String::as_str)
    }
}

/// The echo upstream's handler: it answers 200 with the request it received, as JSON.
pub async fn echo(request: Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    json(
        StatusCode::OK,
        serde_json::json!({
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_bytes": body.len(),
        }),
    )
}

/// A CA made for one test run, and a server certificate it signed for 127.0.0.1/localhost.
pub struct TestCa {
    pub ca_pem: String,
    server_cert: rustls::pki_types::CertificateDer<'static>,
    server_key: rustls::pki_types::PrivatePkcs8KeyDer<'static>,
}

impl TestCa {
    pub fn new() -> Self {
        Self::with_names(&["127.0.0.1", "localhost"])
    }

    /// A CA whose server certificate names `names` (DNS names or addresses).
    pub fn with_names(names: &[&str]) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "bearerd test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let server_key = KeyPair::generate().unwrap();
        let server_params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
        Self {
            ca_pem: ca_cert.pem(),
            server_cert: server_cert.der().clone(),
            server_key: rustls::pki_types::PrivatePkcs8KeyDer::from(server_key.serialize_der()),
        }
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.server_cert.clone()],
                self.server_key.clone_key().into(),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// A bearerd started in-process from a config snippet written to a temporary directory.
pub struct Sidecar {
    pub running: Option<bearerd::Running>,
    pub dir: tempfile::TempDir,
}

impl Sidecar {
    /// Writes `config` to `bearerd.toml` in a new directory (files named in it are relative to
    /// that directory), loads it and starts bearerd.
    pub async fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, config).await
    }

    pub async fn start_in(dir: tempfile::TempDir, config: &str) -> Self {
        let path = dir.path().join("bearerd.toml");
        std::fs::write(&path, config).unwrap();
        let config = bearerd::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let running = bearerd::start(&config).await.unwrap();
        Self {
            running: Some(running),
            dir,
        }
    }

    pub fn running(&self) -> &bearerd::Running {
        self.running.as_ref().unwrap()
    }

    /// `http://<listener of upstream>/<path>`
    pub fn url(&self, upstream: &str, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.running().local_addr(upstream).unwrap()
        )
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

/// A config for one upstream named `name`, with `token` the body of its `[upstream.token]`
/// table after `url`, and `extra` appended to the file.
pub fn config(name: &str, upstream_url: &str, token_url: &str, token: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[upstream]]
name = "{name}"
listen = "127.0.0.1:0"
url = "{upstream_url}"

[upstream.token]
url = "{token_url}"
{token}
"#
    )
}

/// The plain HTTP client an app would be.
pub fn app_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A request's answer, read whole.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn echo(&self) -> Echo {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "{:?}",
            String::from_utf8_lossy(&self.body)
        );
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Sends `request` and reads the whole answer.
pub async fn send(request: Request<Full<Bytes>>) -> Answer {
    let response = app_client().request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// `GET url`
pub async fn get(url: &str) -> Answer {
    send(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await
}

/// `GET url`, owning its argument (for spawned tasks).
pub async fn get_owned(url: String) -> Answer {
    get(&url).await
}

/// The value of a series in a Prometheus scrape, if present.
pub fn metric(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// An echo upstream that holds every request until released: a request "in flight".
pub struct Holding {
    pub server: Server,
    arrived: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<()>>,
    release: Arc<tokio::sync::Notify>,
}

impl Holding {
    pub async fn start() -> Self {
        let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel::<()>();
        let release = Arc::new(tokio::sync::Notify::new());
        let hold = Arc::clone(&release);
        let server = serve(move |request| {
            let arrived_tx = arrived_tx.clone();
            let hold = Arc::clone(&hold);
            async move {
                let _ = arrived_tx.send(());
                hold.notified().await;
                echo(request).await
            }
        })
        .await;
        Self {
            server,
            arrived: tokio::sync::Mutex::new(arrived),
            release,
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    /// Waits until a request has reached the upstream.
    pub async fn arrived(&self) {
        self.arrived.lock().await.recv().await.unwrap();
    }

    /// Lets one held request (or the next to arrive) be answered.
    pub fn release(&self) {
        self.release.notify_one();
    }
}
