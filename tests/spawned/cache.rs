//! The token cache (`[cache]`, issue 14) against a real Redis (Debian's redis-server, started
//! by tests/support/redis.rs on a loopback port of its own) and real bearerd processes
//! (tests/support/daemon.rs), with an in-process token endpoint that names every token it
//! issues (`tok-<scope>-<n>`) and an echo upstream that records every token it is sent.
//!
//! What is asserted, besides each test's own claim: the upstream never sees a token the
//! endpoint did not issue for that upstream's scope, and no app request fails.
//!
//! Redis must be installed: without it these tests fail, saying how to install it
//! (`make test` does, through scripts/install-test-deps.sh). The tests print what they measured
//! on lines starting with `cache-measure:` (`cargo test --test spawned cache:: -- --nocapture`), for the
//! table in docs/cache.md.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use support::config::{string, ConfigBuilder, Log, Table, Token, Upstream};
use support::daemon::{Daemon, PATIENCE};
use support::redis::{free_port, Redis};
use support::{echo, get, json, serve, token_endpoint, token_ok, Echo, Server, TokenEndpoint};

/// How long the token endpoint takes to answer: long enough that processes started together
/// all ask the cache before the first token is stored.
const TOKEN_DELAY: Duration = Duration::from_millis(200);
/// `[cache] timeout` where a test takes Redis away, so that it waits little for it.
const CACHE_TIMEOUT: &str = "200ms";
/// A token lifetime that outlives every test that does not wait for one to pass.
const LONG_LIFETIME: u64 = 3600;

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

/// Runs blocking work (a process's start or exit, a raw Redis command) without stalling the
/// runtime's other tasks: the token endpoint and the upstream run on it.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// A token endpoint that issues `tok-<scope>-<n>` after [`TOKEN_DELAY`], with a lifetime the
/// test may change, and remembers what it issued and when.
struct Issuer {
    endpoint: TokenEndpoint,
    /// (token, scope, when it was sent).
    issued: Arc<Mutex<Vec<(String, String, Instant)>>>,
    expires_in: Arc<AtomicU64>,
}

impl Issuer {
    async fn start(expires_in: u64) -> Self {
        let issued = Arc::new(Mutex::new(Vec::new()));
        let lifetime = Arc::new(AtomicU64::new(expires_in));
        let (record, seconds) = (Arc::clone(&issued), Arc::clone(&lifetime));
        let endpoint = token_endpoint(move |n, request| {
            let record = Arc::clone(&record);
            let seconds = seconds.load(Ordering::SeqCst);
            async move {
                let scope = request.form.get("scope").cloned().unwrap_or_default();
                let token = format!("tok-{scope}-{n}");
                tokio::time::sleep(TOKEN_DELAY).await;
                record
                    .lock()
                    .unwrap()
                    .push((token.clone(), scope, Instant::now()));
                token_ok(&token, seconds)
            }
        })
        .await;
        Self {
            endpoint,
            issued,
            expires_in: lifetime,
        }
    }

    fn url(&self) -> String {
        self.endpoint.url("/token")
    }

    /// Token requests received so far.
    fn count(&self) -> usize {
        self.endpoint.count()
    }

    /// The scope each token was issued for.
    fn scopes(&self) -> BTreeMap<String, String> {
        self.issued
            .lock()
            .unwrap()
            .iter()
            .map(|(token, scope, _)| (token.clone(), scope.clone()))
            .collect()
    }

    /// When each token was sent, in order.
    fn times(&self) -> Vec<Instant> {
        self.issued.lock().unwrap().iter().map(|i| i.2).collect()
    }

    fn set_expires_in(&self, seconds: u64) {
        self.expires_in.store(seconds, Ordering::SeqCst);
    }

    /// Waits until `n` token requests have arrived.
    async fn wait_for(&self, n: usize, within: Duration) {
        if tokio::time::timeout(within, self.endpoint.wait_for_requests(n))
            .await
            .is_err()
        {
            panic!(
                "{} token requests after {within:?}, waited for {n}",
                self.count()
            );
        }
    }
}

/// Each request's path and Authorization, in order.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// The upstream: echoes every request, remembers its path and Authorization, and answers 401
/// to the tokens in `revoked`.
struct Recorder {
    server: Server,
    seen: Seen,
    revoked: Arc<Mutex<BTreeSet<String>>>,
}

impl Recorder {
    async fn start() -> Self {
        let seen: Seen = Arc::default();
        let revoked = Arc::new(Mutex::new(BTreeSet::new()));
        let (record, refuse) = (Arc::clone(&seen), Arc::clone(&revoked));
        let server = serve(move |request: Request<Incoming>| {
            let record = Arc::clone(&record);
            let refuse = Arc::clone(&refuse);
            async move {
                let path = request.uri().path().to_owned();
                let authorization = request
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                record.lock().unwrap().push((path, authorization.clone()));
                let rejected = authorization
                    .as_ref()
                    .is_some_and(|a| refuse.lock().unwrap().contains(a));
                if rejected {
                    return json(
                        StatusCode::UNAUTHORIZED,
                        serde_json::json!({"error": "invalid_token"}),
                    );
                }
                echo(request).await
            }
        })
        .await;
        Self {
            server,
            seen,
            revoked,
        }
    }

    /// The upstream URL of bearerd's upstream `name`: requests arrive under `/<name>`.
    fn url(&self, name: &str) -> String {
        self.server.url(&format!("/{name}"))
    }

    /// From now on, answers 401 to `Bearer <token>`.
    fn revoke(&self, token: &str) {
        self.revoked
            .lock()
            .unwrap()
            .insert(format!("Bearer {token}"));
    }

    /// Every request so far carried a token `issuer` issued for the scope of the upstream it
    /// came through (the first segment of its path).
    fn assert_only_issued_tokens(&self, issuer: &Issuer) {
        let scopes = issuer.scopes();
        let seen = self.seen.lock().unwrap();
        assert!(!seen.is_empty(), "the upstream saw no request");
        for (path, authorization) in seen.iter() {
            let upstream = path.trim_start_matches('/').split('/').next().unwrap();
            let token = authorization
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "))
                .unwrap_or_else(|| panic!("{path} came with {authorization:?}"));
            assert_eq!(
                scopes.get(token).map(String::as_str),
                Some(upstream),
                "{path} came with {token:?}, which the token endpoint did not issue for scope \
                 {upstream:?}; it issued {scopes:?}"
            );
        }
    }
}

/// 32 bytes for `[cache] key_file`, base64 with a newline, as `openssl rand -base64 32`
/// writes them; `seed` tells keys apart.
fn write_key(path: &Path, seed: u8) {
    let bytes: Vec<u8> = (0..32u8)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i))
        .collect();
    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
    write_private(path, format!("{text}\n").as_bytes());
}

/// Writes `bytes` to `path`, mode 0600.
fn write_private(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `[cache]` for Redis at `url`, with the key in `key_file`.
fn redis_cache(url: &str, key_file: &Path) -> Table {
    Table::new()
        .set("backend", string("redis"))
        .set("url", string(url))
        .set("key_file", string(key_file.to_str().unwrap()))
}

/// `[cache]` for files in `dir`.
fn file_cache(dir: &Path) -> Table {
    Table::new()
        .set("backend", string("file"))
        .set("dir", string(dir.to_str().unwrap()))
}

/// A config with JSON logs, one upstream per name in `upstreams` (each asking for the scope
/// of its name, so each is a token source of its own), and `cache`.
fn config_text(issuer: &Issuer, upstream: &Recorder, upstreams: &[&str], cache: Table) -> String {
    let mut builder = ConfigBuilder::new().log(Log::new().format("json"));
    for name in upstreams {
        builder = builder.upstream(
            Upstream::new(name, &upstream.url(name))
                .token(Token::new(&issuer.url(), "app").secret("pw").scope(name)),
        );
    }
    builder.table("cache", cache).render()
}

/// Writes `text` as `name` in `dir`; returns its path.
fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A bearerd process and its addresses.
struct Node {
    daemon: Daemon,
    admin: SocketAddr,
    proxies: BTreeMap<String, SocketAddr>,
}

impl Node {
    /// The address of the listener of upstream `name`.
    fn proxy(&self, name: &str) -> SocketAddr {
        self.proxies[name]
    }

    /// The Authorization bearerd adds to a request through upstream `name`.
    async fn authorization(&self, name: &str) -> String {
        let answer = get(&format!("http://{}/x", self.proxy(name))).await;
        answer
            .echo()
            .header("authorization")
            .unwrap_or_else(|| panic!("no authorization through {name}"))
            .to_owned()
    }

    async fn scrape(&self) -> String {
        let answer = get(&format!("http://{}/metrics", self.admin)).await;
        assert_eq!(answer.status, StatusCode::OK);
        String::from_utf8(answer.body.to_vec()).unwrap()
    }

    /// SIGTERM, then the exit, which must be 0.
    fn stop(mut self) {
        blocking(|| {
            self.daemon.signal("TERM");
            let status = self.daemon.wait_exit();
            assert_eq!(
                status.code(),
                Some(0),
                "log: {:?}",
                self.daemon.log.lock().unwrap()
            );
        });
    }

    /// Log lines at `level` that speak of the cache.
    fn cache_lines(&self, level: &str) -> Vec<String> {
        self.daemon
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .is_ok_and(|event| event["level"] == level)
                    && line.to_lowercase().contains("cache")
            })
            .cloned()
            .collect()
    }

    /// Every line logged at ERROR: there should be none.
    fn errors(&self) -> Vec<String> {
        self.daemon
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains("\"level\":\"ERROR\"") || line.contains("panicked"))
            .cloned()
            .collect()
    }
}

/// Starts `n` bearerd processes on `config` at once, then waits for each one's listeners.
fn start_nodes(config: &str, n: usize, upstreams: &[&str]) -> Vec<Node> {
    let daemons: Vec<Daemon> = (0..n).map(|_| Daemon::start(config)).collect();
    blocking(|| {
        daemons
            .into_iter()
            .map(|daemon| Node {
                admin: daemon.listen_addr("admin"),
                proxies: upstreams
                    .iter()
                    .map(|name| ((*name).to_owned(), daemon.listen_addr(name)))
                    .collect(),
                daemon,
            })
            .collect()
    })
}

fn start_node(config: &str, upstreams: &[&str]) -> Node {
    start_nodes(config, 1, upstreams).pop().unwrap()
}

/// The Authorization each node adds through upstream `name`, asked of all at once.
async fn authorizations(nodes: &[Node], name: &str) -> Vec<String> {
    let asked: Vec<_> = nodes
        .iter()
        .map(|node| {
            let url = format!("http://{}/x", node.proxy(name));
            tokio::spawn(support::get_owned(url))
        })
        .collect();
    let mut seen = Vec::new();
    for answer in asked {
        let answer = answer.await.unwrap();
        seen.push(answer.echo().header("authorization").unwrap().to_owned());
    }
    seen
}

/// `bearerd_token_cache_operations_total` of one upstream, backend, op and outcome.
fn op(upstream: &str, backend: &str, op: &str, outcome: &str) -> String {
    format!(
        r#"bearerd_token_cache_operations_total{{backend="{backend}",op="{op}",outcome="{outcome}",upstream="{upstream}"}}"#
    )
}

/// `bearerd_token_cache_up` of `backend`.
fn cache_up(backend: &str) -> String {
    format!(r#"bearerd_token_cache_up{{backend="{backend}"}}"#)
}

/// `bearerd_token_fetch_total{outcome="success"}` of upstream `name`: the tokens this process
/// obtained. Whether a token taken from the cache counts there is the implementation's choice,
/// so the tests count token requests at the endpoint, and read this only where no token can
/// have come from the cache.
fn fetched(name: &str) -> String {
    format!(r#"bearerd_token_fetch_total{{outcome="success",upstream="{name}"}}"#)
}

/// The value of a counter series, 0 when it is not (yet) in the scrape.
fn counter(scrape: &str, series: &str) -> f64 {
    support::metric(scrape, series).unwrap_or(0.0)
}

/// The value of a series that must be in the scrape.
fn gauge(scrape: &str, series: &str) -> f64 {
    support::metric(scrape, series).unwrap_or_else(|| panic!("{series} missing from:\n{scrape}"))
}

/// Polls `condition` every 50 ms until it holds; fails with `what` after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// App requests sent through a set of listeners, one loop per listener, until stopped: what
/// failed, and the token each listener's last answer carried.
struct Traffic {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<TrafficState>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    every: Duration,
}

#[derive(Default)]
struct TrafficState {
    answered: usize,
    failures: Vec<String>,
    /// The Authorization of each listener's last answer.
    last: Vec<Option<String>>,
}

impl Traffic {
    fn new(every: Duration) -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            state: Arc::new(Mutex::new(TrafficState::default())),
            tasks: Vec::new(),
            every,
        }
    }

    /// Starts a loop on `addr`; returns its index.
    fn add(&mut self, addr: SocketAddr) -> usize {
        let index = {
            let mut state = self.state.lock().unwrap();
            state.last.push(None);
            state.last.len() - 1
        };
        let (stop, state, every) = (Arc::clone(&self.stop), Arc::clone(&self.state), self.every);
        self.tasks.push(tokio::spawn(async move {
            let client = support::app_client();
            let url = format!("http://{addr}/x");
            while !stop.load(Ordering::SeqCst) {
                let request = Request::get(&url).body(Full::new(Bytes::new())).unwrap();
                let outcome = match client.request(request).await {
                    Ok(response) => {
                        let status = response.status();
                        match response.into_body().collect().await {
                            Ok(body) if status == StatusCode::OK => {
                                serde_json::from_slice::<Echo>(&body.to_bytes())
                                    .map(|echo| echo.header("authorization").map(str::to_owned))
                                    .map_err(|e| format!("{addr}: not an echo: {e}"))
                            }
                            Ok(body) => Err(format!(
                                "{addr}: {status} {:?}",
                                String::from_utf8_lossy(&body.to_bytes())
                            )),
                            Err(e) => Err(format!("{addr}: {status}, body failed: {e}")),
                        }
                    }
                    Err(e) => Err(format!("{addr}: {e}")),
                };
                {
                    let mut state = state.lock().unwrap();
                    match outcome {
                        Ok(authorization) => {
                            state.answered += 1;
                            state.last[index] = authorization;
                        }
                        Err(failure) => state.failures.push(failure),
                    }
                }
                tokio::time::sleep(every).await;
            }
        }));
        index
    }

    fn last(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap().last.clone()
    }

    fn answered(&self) -> usize {
        self.state.lock().unwrap().answered
    }

    fn assert_no_failure(&self) {
        let state = self.state.lock().unwrap();
        assert!(
            state.failures.is_empty(),
            "{} of {} app requests failed: {:?}",
            state.failures.len(),
            state.failures.len() + state.answered,
            &state.failures[..state.failures.len().min(10)]
        );
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

/// A Redis, a token endpoint, an upstream and a directory for configs and keys.
struct Setup {
    redis: Redis,
    issuer: Issuer,
    upstream: Recorder,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new(expires_in: u64) -> Self {
        Self {
            redis: blocking(Redis::start),
            issuer: Issuer::start(expires_in).await,
            upstream: Recorder::start().await,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A config for upstreams `upstreams` with `cache`, written as `name`.
    fn config(&self, name: &str, upstreams: &[&str], cache: Table) -> String {
        let text = config_text(&self.issuer, &self.upstream, upstreams, cache);
        write_config(self.dir.path(), name, &text)
    }

    /// A config with this Redis and a key of `seed`, written as `name`.
    fn redis_config(&self, name: &str, upstreams: &[&str], seed: u8) -> String {
        let key = self.path(&format!("key-{seed}"));
        write_key(&key, seed);
        self.config(name, upstreams, redis_cache(&self.redis.url(), &key))
    }
}

// ---------------------------------------------------------------------------------------
// The harness itself
// ---------------------------------------------------------------------------------------

/// tests/support/redis.rs: a server that answers, keeps nothing across a restart on the same
/// port, refuses connections while killed, and answers nothing while paused.
#[test]
fn the_redis_harness_starts_kills_restarts_and_pauses() {
    use support::redis::{command_at, Reply};
    let mut redis = Redis::start();
    let port = redis.port;
    redis.set_keep_ttl("k", b"v");
    assert_eq!(
        redis.cmd(&["SET", "t", "w", "PX", "60000"]),
        Reply::Simple("OK".into())
    );
    assert_eq!(redis.get("k"), Some(b"v".to_vec()));
    assert_eq!(redis.keys("*"), ["k", "t"]);
    assert!((1..=60_000).contains(&redis.pttl("t")));
    assert_eq!(redis.pttl("k"), -1);
    assert_eq!(redis.pttl("nothing"), -2);

    redis.kill();
    assert!(
        std::net::TcpStream::connect(redis.addr()).is_err(),
        "killed"
    );
    redis.restart();
    assert_eq!(redis.port, port);
    assert!(redis.keys("*").is_empty(), "nothing persisted");

    redis.pause();
    let mut stream = std::net::TcpStream::connect(redis.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    std::io::Write::write_all(&mut stream, b"PING\r\n").unwrap();
    let mut buffer = [0u8; 16];
    assert!(
        std::io::Read::read(&mut stream, &mut buffer).is_err(),
        "a paused server answers nothing"
    );
    redis.resume();
    assert_eq!(redis.cmd(&["PING"]), Reply::Simple("PONG".into()));

    let guarded = Redis::start_with(&["--requirepass", "pw"]);
    assert_eq!(guarded.cmd(&["PING"]), Reply::Simple("PONG".into()));
    assert!(matches!(
        command_at(guarded.addr(), None, &[b"GET", b"k"]),
        Reply::Error(e) if e.starts_with("NOAUTH")
    ));
}

// ---------------------------------------------------------------------------------------
// Many processes, one Redis
// ---------------------------------------------------------------------------------------

/// The lease: of 20 processes that start at once and all find Redis empty, one fetches (the
/// endpoint takes 200 ms) and the others wait for what it stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_processes_started_at_once_on_one_redis_make_one_token_request() {
    const PROCESSES: usize = 20;
    let setup = Setup::new(LONG_LIFETIME).await;
    let config = setup.redis_config("bearerd.toml", &["api"], 1);

    let started = Instant::now();
    let nodes = start_nodes(&config, PROCESSES, &["api"]);
    let seen = authorizations(&nodes, "api").await;
    let elapsed = started.elapsed();

    println!(
        "cache-measure: herd: {PROCESSES} processes started at once on one Redis: {} token \
         request(s) (without a cache: {PROCESSES}); all served after {elapsed:?}",
        setup.issuer.count()
    );
    assert_eq!(setup.issuer.count(), 1, "token requests");
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(
        distinct.into_iter().collect::<Vec<_>>(),
        ["Bearer tok-api-0"],
        "every process injects the one token"
    );
    setup.upstream.assert_only_issued_tokens(&setup.issuer);
    for node in &nodes {
        assert!(node.errors().is_empty(), "{:?}", node.errors());
    }
}

// ---------------------------------------------------------------------------------------
// Restarts
// ---------------------------------------------------------------------------------------

/// The file backend: a restarted process takes the token the last one stored, one file per
/// source, mode 0600, no temporary file left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_file_cache_makes_no_token_request() {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let issuer = Issuer::start(LONG_LIFETIME).await;
    let upstream = Recorder::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&cache)
        .unwrap();
    let text = config_text(&issuer, &upstream, &["api"], file_cache(&cache));
    let config = write_config(dir.path(), "bearerd.toml", &text);

    let first = start_node(&config, &["api"]);
    assert_eq!(first.authorization("api").await, "Bearer tok-api-0");
    let scrape = first.scrape().await;
    assert_eq!(counter(&scrape, &op("api", "file", "get", "miss")), 1.0);
    assert_eq!(counter(&scrape, &op("api", "file", "put", "stored")), 1.0);
    assert_eq!(gauge(&scrape, &cache_up("file")), 1.0);
    first.stop();

    let files: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(
        files.len(),
        1,
        "one file per source, nothing else: {files:?}"
    );
    let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", files[0].display());

    let second = start_node(&config, &["api"]);
    assert_eq!(second.authorization("api").await, "Bearer tok-api-0");
    let scrape = second.scrape().await;
    println!(
        "cache-measure: restart: file cache: {} token request(s) after the restart",
        issuer.count() - 1
    );
    assert_eq!(issuer.count(), 1, "no token request after the restart");
    assert_eq!(counter(&scrape, &op("api", "file", "get", "hit")), 1.0);
    upstream.assert_only_issued_tokens(&issuer);
    second.stop();
}

/// The Redis backend: a restarted process takes the stored token. The entry is sealed (the
/// token is not in Redis in clear), lives as long as the token, and the lease is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_redis_makes_no_token_request() {
    let setup = Setup::new(LONG_LIFETIME).await;
    let config = setup.redis_config("bearerd.toml", &["api"], 1);

    let first = start_node(&config, &["api"]);
    assert_eq!(first.authorization("api").await, "Bearer tok-api-0");
    let redis = &setup.redis;
    let keys = blocking(|| redis.keys("bearerd:token:*"));
    assert_eq!(keys.len(), 1, "{keys:?}");
    let (value, ttl) = blocking(|| (redis.get(&keys[0]).unwrap(), redis.pttl(&keys[0])));
    assert!(
        !String::from_utf8_lossy(&value).contains("tok-api"),
        "the token is in Redis in clear: {:?}",
        String::from_utf8_lossy(&value)
    );
    assert!(
        ttl > 0 && ttl <= 3_600_000,
        "{}: PTTL {ttl}, for a token of 3600 s",
        keys[0]
    );
    // Released by its holder, not left to expire (it would last the token timeout and more).
    eventually(Duration::from_secs(2), "the lease released", || async {
        blocking(|| redis.keys("bearerd:lease:*")).is_empty()
    })
    .await;
    first.stop();

    let second = start_node(&config, &["api"]);
    assert_eq!(second.authorization("api").await, "Bearer tok-api-0");
    println!(
        "cache-measure: restart: Redis: {} token request(s) after the restart",
        setup.issuer.count() - 1
    );
    assert_eq!(
        setup.issuer.count(),
        1,
        "no token request after the restart"
    );
    let scrape = second.scrape().await;
    assert_eq!(counter(&scrape, &op("api", "redis", "get", "hit")), 1.0);
    assert_eq!(
        counter(&scrape, &op("api", "redis", "lease", "acquired")),
        0.0
    );
    setup.upstream.assert_only_issued_tokens(&setup.issuer);
    second.stop();
}

// ---------------------------------------------------------------------------------------
// Redis away, slow, wrong
// ---------------------------------------------------------------------------------------

/// Redis killed while traffic flows: no app request fails; when its token is due each
/// process fetches for itself (one token each); the outage is logged once per process; once
/// Redis is back, new processes share one token again, and the old ones come back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_traffic_fails_no_request_and_each_process_fetches_for_itself() {
    const PROCESSES: usize = 5;
    const NEWCOMERS: usize = 3;
    const LIFETIME: u64 = 8;
    let mut setup = Setup::new(LIFETIME).await;
    let key = setup.path("key");
    write_key(&key, 1);
    let config = setup.config(
        "bearerd.toml",
        &["api"],
        redis_cache(&setup.redis.url(), &key).set("timeout", string(CACHE_TIMEOUT)),
    );

    let old = start_nodes(&config, PROCESSES, &["api"]);
    let mut traffic = Traffic::new(Duration::from_millis(50));
    for node in &old {
        traffic.add(node.proxy("api"));
    }
    eventually(PATIENCE, "every process answered", || async {
        traffic.last().iter().all(Option::is_some)
    })
    .await;
    assert_eq!(setup.issuer.count(), 1, "one token for the fleet");

    blocking(|| setup.redis.kill());
    let killed = Instant::now();
    // Each process's token is due 70-80% into its lifetime: then each fetches for itself.
    let within = Duration::from_secs(LIFETIME) + Duration::from_secs(5);
    setup.issuer.wait_for(1 + PROCESSES, within).await;
    eventually(
        Duration::from_secs(5),
        "each process injects a token of its own",
        || async {
            let last = traffic.last();
            let distinct: BTreeSet<_> = last.iter().flatten().collect();
            distinct.len() == PROCESSES && !distinct.contains(&"Bearer tok-api-0".to_owned())
        },
    )
    .await;
    let during_outage = setup.issuer.count();
    println!(
        "cache-measure: outage: {PROCESSES} processes, Redis killed: {} token request(s) in the \
         {:?} after (one per process)",
        during_outage - 1,
        killed.elapsed()
    );
    assert_eq!(
        during_outage,
        1 + PROCESSES,
        "one token request per process"
    );
    traffic.assert_no_failure();
    for node in &old {
        assert_eq!(gauge(&node.scrape().await, &cache_up("redis")), 0.0);
    }

    blocking(|| setup.redis.restart());
    let back = Instant::now();
    let before = setup.issuer.count();
    let newcomers = start_nodes(&config, NEWCOMERS, &["api"]);
    let seen = authorizations(&newcomers, "api").await;
    let shared: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(shared.len(), 1, "the new processes share a token: {seen:?}");
    // The old processes' tokens, fetched during the outage, are not due for seconds yet: what
    // was asked for meanwhile, the newcomers asked for. (Should an old process refresh all the
    // same, through the cache, the newcomers would take its token: still not more than one.)
    let asked = setup.issuer.count() - before;
    println!(
        "cache-measure: outage: Redis back: {NEWCOMERS} new processes: {asked} token request(s)"
    );
    assert!(
        asked <= 1,
        "{asked} token requests by {NEWCOMERS} processes started on the Redis that came back"
    );
    for node in &newcomers {
        traffic.add(node.proxy("api"));
    }

    // The old processes go back to the cache at their next refresh (the first call after the
    // outage may still fail): within a few refresh intervals the whole fleet holds one token.
    eventually(
        Duration::from_secs(3 * LIFETIME),
        "old and new processes share one token",
        || async {
            let last = traffic.last();
            let distinct: BTreeSet<_> = last.iter().flatten().collect();
            last.iter().all(Option::is_some) && distinct.len() == 1
        },
    )
    .await;
    println!(
        "cache-measure: outage: Redis back: {} token request(s) until all {} processes shared \
         one token again, after {:?}",
        setup.issuer.count() - before,
        PROCESSES + NEWCOMERS,
        back.elapsed()
    );
    traffic.assert_no_failure();
    println!(
        "cache-measure: outage: {} app requests before, during and after the outage, 0 failed",
        traffic.answered()
    );
    traffic.finish().await;
    setup.upstream.assert_only_issued_tokens(&setup.issuer);

    for node in &old {
        let warned = node.cache_lines("WARN");
        assert_eq!(warned.len(), 1, "the outage is logged once: {warned:?}");
        assert_eq!(gauge(&node.scrape().await, &cache_up("redis")), 1.0);
        assert!(node.errors().is_empty(), "{:?}", node.errors());
    }
    for node in &newcomers {
        assert!(node.cache_lines("WARN").is_empty());
    }
}

/// Redis away, stalled or not Redis at all when bearerd starts: bearerd starts all the same,
/// fetches its own token after at most a few cache timeouts, and says so once. A Redis with a
/// password, given right, is shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_stalled_or_wrong_at_start_costs_only_a_token_request() {
    let setup = Setup::new(LONG_LIFETIME).await;
    let key = setup.path("key");
    write_key(&key, 1);
    let password = setup.path("password");
    write_private(&password, b"s3cret\n");
    let wrong_password = setup.path("wrong-password");
    write_private(&wrong_password, b"guess\n");

    let stalled = blocking(Redis::start);
    blocking(|| stalled.pause());
    let guarded = blocking(|| Redis::start_with(&["--requirepass", "s3cret"]));
    let not_redis = serve(echo).await;

    let nobody = format!("redis://127.0.0.1:{}/0", free_port());
    let http = format!("redis://{}/0", not_redis.addr);
    let cases: Vec<(&str, Table)> = vec![
        ("nothing listens", redis_cache(&nobody, &key)),
        ("stalled (SIGSTOP)", redis_cache(&stalled.url(), &key)),
        ("an HTTP server", redis_cache(&http, &key)),
        (
            "wrong password",
            redis_cache(&guarded.url(), &key)
                .set("password_file", string(wrong_password.to_str().unwrap())),
        ),
    ];
    let mut nodes = Vec::new();
    let started = Instant::now();
    for (n, (case, cache)) in cases.into_iter().enumerate() {
        let cache = cache.set("timeout", string(CACHE_TIMEOUT));
        let config = setup.config(&format!("case-{n}.toml"), &["api"], cache);
        nodes.push((case, start_node(&config, &["api"])));
    }
    for (case, node) in &nodes {
        let token = node.authorization("api").await;
        assert!(token.starts_with("Bearer tok-api-"), "{case}: {token}");
        let scrape = node.scrape().await;
        assert_eq!(gauge(&scrape, &cache_up("redis")), 0.0, "{case}");
        assert_eq!(counter(&scrape, &fetched("api")), 1.0, "{case}");
        let warned = node.cache_lines("WARN");
        assert_eq!(warned.len(), 1, "{case}: said once: {warned:?}");
        assert!(node.errors().is_empty(), "{case}: {:?}", node.errors());
    }
    let elapsed = started.elapsed();
    assert_eq!(setup.issuer.count(), nodes.len(), "one token each");
    // Four processes started one after the other, each kept from its token by a few cache
    // timeouts (200 ms) at most, not by the token timeout (10 s).
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
    println!(
        "cache-measure: down, stalled, HTTP, wrong password: 4 processes served in {elapsed:?}"
    );

    // The right password: two processes, one token.
    let config = setup.config(
        "password.toml",
        &["api"],
        redis_cache(&guarded.url(), &key).set("password_file", string(password.to_str().unwrap())),
    );
    let before = setup.issuer.count();
    let pair = start_nodes(&config, 2, &["api"]);
    let seen = authorizations(&pair, "api").await;
    assert_eq!(seen[0], seen[1]);
    assert_eq!(
        setup.issuer.count(),
        before + 1,
        "shared through the guarded Redis"
    );
    assert_eq!(gauge(&pair[0].scrape().await, &cache_up("redis")), 1.0);
    setup.upstream.assert_only_issued_tokens(&setup.issuer);
    blocking(|| stalled.resume());
}

// ---------------------------------------------------------------------------------------
// Entries that must not be used
// ---------------------------------------------------------------------------------------

/// Entries swapped between two sources, altered, or replaced by garbage: each is a miss (a
/// token request, a warning), never a token sent, never a crash. Also: `key_prefix`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_or_foreign_redis_entries_are_misses() {
    let setup = Setup::new(LONG_LIFETIME).await;
    let key = setup.path("key");
    write_key(&key, 1);
    let config = setup.config(
        "bearerd.toml",
        &["a", "b"],
        redis_cache(&setup.redis.url(), &key).set("key_prefix", string("team-a:")),
    );
    let redis = &setup.redis;

    let first = start_node(&config, &["a", "b"]);
    assert!(first.authorization("a").await.starts_with("Bearer tok-a-"));
    assert!(first.authorization("b").await.starts_with("Bearer tok-b-"));
    first.stop();
    let keys = blocking(|| redis.keys("team-a:token:*"));
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(blocking(|| redis.keys("bearerd:*")).is_empty());

    type Tamper = fn(&Redis, &[String]);
    let rounds: [(&str, Tamper); 4] = [
        ("swapped between the two sources", |redis, keys| {
            let (a, b) = (redis.get(&keys[0]).unwrap(), redis.get(&keys[1]).unwrap());
            redis.set_keep_ttl(&keys[0], &b);
            redis.set_keep_ttl(&keys[1], &a);
        }),
        ("one character changed", |redis, keys| {
            for key in keys {
                let mut value = redis.get(key).unwrap();
                let middle = value.len() / 2;
                value[middle] = if value[middle] == b'A' { b'B' } else { b'A' };
                redis.set_keep_ttl(key, &value);
            }
        }),
        ("garbage", |redis, keys| {
            redis.set_keep_ttl(&keys[0], b"not an entry \x00\xff");
            redis.set_keep_ttl(&keys[1], b"{\"v\":1}");
        }),
        ("empty", |redis, keys| {
            for key in keys {
                redis.set_keep_ttl(key, b"");
            }
        }),
    ];
    for (round, (what, tamper)) in rounds.into_iter().enumerate() {
        blocking(|| tamper(redis, &keys));
        let before = setup.issuer.count();
        let node = start_node(&config, &["a", "b"]);
        let (a, b) = (node.authorization("a").await, node.authorization("b").await);
        assert_eq!(
            setup.issuer.count(),
            before + 2,
            "{what}: a miss for each source"
        );
        assert!(a.starts_with("Bearer tok-a-"), "{what}: {a}");
        assert!(b.starts_with("Bearer tok-b-"), "{what}: {b}");
        assert!(
            !node.cache_lines("WARN").is_empty(),
            "{what}: no warning about the entries"
        );
        assert!(node.errors().is_empty(), "{what}: {:?}", node.errors());
        setup.upstream.assert_only_issued_tokens(&setup.issuer);
        node.stop();
        assert_eq!(
            blocking(|| redis.keys("team-a:token:*")),
            keys,
            "round {round}: stored again under the same keys"
        );
    }
}

/// A process with another key neither uses nor trusts what the first one stored, and the
/// first does not use what it stored in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_sealed_with_another_key_is_a_miss() {
    let setup = Setup::new(LONG_LIFETIME).await;
    let one = setup.redis_config("one.toml", &["api"], 1);
    let two = setup.redis_config("two.toml", &["api"], 2);

    for (n, config) in [&one, &two, &one].into_iter().enumerate() {
        let node = start_node(config, &["api"]);
        assert_eq!(
            node.authorization("api").await,
            format!("Bearer tok-api-{n}"),
            "start {n}: its own token"
        );
        assert_eq!(setup.issuer.count(), n + 1);
        if n > 0 {
            let warned = node.cache_lines("WARN");
            assert!(!warned.is_empty(), "start {n}: no warning");
        }
        assert!(node.errors().is_empty(), "{:?}", node.errors());
        node.stop();
    }
    setup.upstream.assert_only_issued_tokens(&setup.issuer);
}

/// Files swapped between two sources, cut short, replaced by garbage or empty, and files of
/// expired tokens: each is a miss with a warning, never a token sent, never a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_foreign_or_expired_files_are_misses() {
    let issuer = Issuer::start(LONG_LIFETIME).await;
    let upstream = Recorder::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let text = config_text(&issuer, &upstream, &["a", "b"], file_cache(&cache));
    let config = write_config(dir.path(), "bearerd.toml", &text);
    let files = || {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        files
    };

    let first = start_node(&config, &["a", "b"]);
    assert!(first.authorization("a").await.starts_with("Bearer tok-a-"));
    assert!(first.authorization("b").await.starts_with("Bearer tok-b-"));
    first.stop();
    let stored = files();
    assert_eq!(stored.len(), 2, "{stored:?}");

    type Tamper = fn(&[PathBuf]);
    let rounds: [(&str, Tamper); 4] = [
        ("swapped between the two sources", |files| {
            let (a, b) = (
                std::fs::read(&files[0]).unwrap(),
                std::fs::read(&files[1]).unwrap(),
            );
            write_private(&files[0], &b);
            write_private(&files[1], &a);
        }),
        ("cut short", |files| {
            for file in files {
                let bytes = std::fs::read(file).unwrap();
                write_private(file, &bytes[..bytes.len() / 2]);
            }
        }),
        ("garbage", |files| {
            write_private(&files[0], b"\x00\xffnot a token entry");
            write_private(&files[1], b"[1, 2, 3]");
        }),
        ("empty", |files| {
            for file in files {
                write_private(file, b"");
            }
        }),
    ];
    for (what, tamper) in rounds {
        tamper(&stored);
        let before = issuer.count();
        let node = start_node(&config, &["a", "b"]);
        let (a, b) = (node.authorization("a").await, node.authorization("b").await);
        assert_eq!(issuer.count(), before + 2, "{what}: a miss for each source");
        assert!(a.starts_with("Bearer tok-a-"), "{what}: {a}");
        assert!(b.starts_with("Bearer tok-b-"), "{what}: {b}");
        let warned = node.cache_lines("WARN");
        assert!(!warned.is_empty(), "{what}: no warning about the files");
        assert!(node.errors().is_empty(), "{what}: {:?}", node.errors());
        upstream.assert_only_issued_tokens(&issuer);
        node.stop();
        assert_eq!(files(), stored, "{what}: written again in place");
    }

    // Tokens of 3 s, stored, then left to expire.
    issuer.set_expires_in(3);
    std::fs::remove_file(&stored[0]).unwrap();
    std::fs::remove_file(&stored[1]).unwrap();
    let short = start_node(&config, &["a", "b"]);
    short.authorization("a").await;
    short.authorization("b").await;
    short.stop();
    assert_eq!(files(), stored);
    let stored_at = Instant::now();
    issuer.set_expires_in(LONG_LIFETIME);
    // Only time makes a token expire.
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(stored_at.elapsed())).await;
    let before = issuer.count();
    let node = start_node(&config, &["a", "b"]);
    node.authorization("a").await;
    node.authorization("b").await;
    assert_eq!(
        issuer.count(),
        before + 2,
        "expired: a miss for each source"
    );
    let warned = node.cache_lines("WARN");
    assert!(!warned.is_empty(), "expired: no warning about the files");
    upstream.assert_only_issued_tokens(&issuer);
    node.stop();
}

// ---------------------------------------------------------------------------------------
// A fleet through several token lifetimes
// ---------------------------------------------------------------------------------------

/// Proactive refresh through the shared cache: 20 processes with traffic for 3 token
/// lifetimes of 10 s.
///
/// The bound the design guarantees: a process refreshes when its token is 70-80% through its
/// lifetime (`schedule::refresh_delay`, never less than 70%: the 5 s floor does not bite at
/// 10 s); at its refresh point it takes a stored token newer than its own if there is one, and
/// otherwise fetches under the lease, while processes that find the lease taken wait for what
/// its holder stores. So the fleet fetches when its first member reaches the refresh point of
/// the newest token, and two of its fetches are at least 0.7·T apart, less up to 1 s because
/// entries carry whole seconds (a process that takes a token from the cache counts its
/// lifetime from the entry's expiry). Over a window W from the first token the fleet makes at
/// most 1 + ⌊W / (0.7·T − 1 s)⌋ token requests: what ONE process makes without a cache. And
/// at least W / T: a token lasts T. Without the cache each of the 20 would make its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_redis_refreshes_about_once_per_lifetime() {
    const PROCESSES: usize = 20;
    const LIFETIME: Duration = Duration::from_secs(10);
    const LIFETIMES: u32 = 3;
    let setup = Setup::new(LIFETIME.as_secs()).await;
    let config = setup.redis_config("bearerd.toml", &["api"], 1);

    let nodes = start_nodes(&config, PROCESSES, &["api"]);
    let mut traffic = Traffic::new(Duration::from_millis(200));
    for node in &nodes {
        traffic.add(node.proxy("api"));
    }
    eventually(PATIENCE, "the first token", || async {
        !setup.issuer.times().is_empty()
    })
    .await;
    let first = setup.issuer.times()[0];
    let window = LIFETIME * LIFETIMES;
    let mut most_tokens_at_once = 0;
    while first.elapsed() < window {
        // At any moment the fleet holds the newest token, or the one before while it moves on.
        let last = traffic.last();
        let at_once: BTreeSet<_> = last.iter().flatten().collect();
        most_tokens_at_once = most_tokens_at_once.max(at_once.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    traffic.assert_no_failure();
    traffic.finish().await;

    let requests = setup
        .issuer
        .times()
        .iter()
        .filter(|at| at.duration_since(first) <= window)
        .count();
    let spacing = LIFETIME.mul_f64(0.7) - Duration::from_secs(1);
    let most = 1 + (window.as_secs_f64() / spacing.as_secs_f64()).floor() as usize;
    let least = LIFETIMES as usize;
    println!(
        "cache-measure: refresh: {PROCESSES} processes, {LIFETIMES} lifetimes of {LIFETIME:?}: \
         {requests} token request(s) (bound {least}..={most}; without a cache about {} each, \
         {} in all); at most {most_tokens_at_once} tokens in use at once",
        1 + (window.as_secs_f64() / LIFETIME.mul_f64(0.75).as_secs_f64()).floor() as usize,
        PROCESSES * (1 + (window.as_secs_f64() / LIFETIME.mul_f64(0.75).as_secs_f64()) as usize)
    );
    let sent: Vec<String> = setup
        .issuer
        .times()
        .iter()
        .map(|at| format!("{:.2}s", at.duration_since(first).as_secs_f64()))
        .collect();
    println!("cache-measure: refresh: tokens sent at {sent:?} after the first");
    // The guarantee itself: no two fetches of the fleet closer than the spacing. (Two close
    // together are two processes fetching for one refresh: one took the lease just after the
    // other had stored its token and released it, without looking in Redis again.)
    let times = setup.issuer.times();
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= spacing,
            "two token requests {:?} apart, less than {spacing:?}; sent at {sent:?}",
            pair[1] - pair[0]
        );
    }
    assert!(
        (least..=most).contains(&requests),
        "{requests} token requests in {window:?}, expected {least}..={most}; sent at {sent:?}"
    );
    assert!(
        most_tokens_at_once <= 2,
        "{most_tokens_at_once} tokens at once: two fetches of the fleet for one refresh; \
         tokens sent at {sent:?}"
    );
    setup.upstream.assert_only_issued_tokens(&setup.issuer);
    for node in &nodes {
        assert!(node.errors().is_empty(), "{:?}", node.errors());
    }
}

// ---------------------------------------------------------------------------------------
// Metrics, and a token an upstream rejects
// ---------------------------------------------------------------------------------------

/// The operations counter and the up gauge through a miss, a hit, a 401 (the rejected token
/// is deleted from Redis, by compare-and-delete: a second process's 401 for the same old
/// token does not delete its replacement), and an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_metrics_and_a_rejected_token() {
    let mut setup = Setup::new(LONG_LIFETIME).await;
    let config = setup.redis_config("bearerd.toml", &["api"], 1);

    let a = start_node(&config, &["api"]);
    assert_eq!(a.authorization("api").await, "Bearer tok-api-0");
    let b = start_node(&config, &["api"]);
    assert_eq!(b.authorization("api").await, "Bearer tok-api-0");

    let scrape = a.scrape().await;
    // Two looks: before the lease, and once more with it (another process may have stored
    // a token in between).
    assert_eq!(counter(&scrape, &op("api", "redis", "get", "miss")), 2.0);
    assert_eq!(
        counter(&scrape, &op("api", "redis", "lease", "acquired")),
        1.0
    );
    assert_eq!(counter(&scrape, &op("api", "redis", "put", "stored")), 1.0);
    assert_eq!(counter(&scrape, &op("api", "redis", "get", "error")), 0.0);
    assert_eq!(gauge(&scrape, &cache_up("redis")), 1.0);
    let scrape = b.scrape().await;
    assert_eq!(counter(&scrape, &op("api", "redis", "get", "hit")), 1.0);
    assert_eq!(
        counter(&scrape, &op("api", "redis", "lease", "acquired")),
        0.0
    );
    assert_eq!(gauge(&scrape, &cache_up("redis")), 1.0);
    assert_eq!(setup.issuer.count(), 1, "B took A's token");

    // The upstream rejects tok-api-0: A replaces it and deletes it from Redis.
    setup.upstream.revoke("tok-api-0");
    assert_eq!(a.authorization("api").await, "Bearer tok-api-1");
    assert_eq!(setup.issuer.count(), 2);
    eventually(Duration::from_secs(5), "A's delete counted", || async {
        counter(&a.scrape().await, &op("api", "redis", "delete", "deleted")) == 1.0
    })
    .await;
    // What Redis holds now is A's new token: a new process takes it.
    let c = start_node(&config, &["api"]);
    assert_eq!(c.authorization("api").await, "Bearer tok-api-1");
    assert_eq!(setup.issuer.count(), 2);
    // B, still on tok-api-0, is rejected too: its delete finds another token and leaves it,
    // and B takes that one instead of fetching.
    assert_eq!(b.authorization("api").await, "Bearer tok-api-1");
    assert_eq!(setup.issuer.count(), 2, "B took the stored replacement");
    let scrape = b.scrape().await;
    assert_eq!(
        counter(&scrape, &op("api", "redis", "delete", "deleted")),
        0.0
    );
    let d = start_node(&config, &["api"]);
    assert_eq!(d.authorization("api").await, "Bearer tok-api-1");
    assert_eq!(setup.issuer.count(), 2, "the replacement was not deleted");

    // An outage: a process started now counts errors and reports the cache down.
    blocking(|| setup.redis.kill());
    let e = start_node(&config, &["api"]);
    assert!(e.authorization("api").await.starts_with("Bearer tok-api-"));
    let scrape = e.scrape().await;
    assert_eq!(gauge(&scrape, &cache_up("redis")), 0.0);
    assert!(counter(&scrape, &op("api", "redis", "get", "error")) >= 1.0);
    assert_eq!(setup.issuer.count(), 3, "E fetched for itself");
    let families: BTreeSet<&str> = scrape
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .collect();
    assert!(families.contains("bearerd_token_cache_operations_total counter"));
    assert!(families.contains("bearerd_token_cache_up gauge"));
    setup.upstream.assert_only_issued_tokens(&setup.issuer);
    for node in [a, b, c, d, e] {
        assert!(node.errors().is_empty(), "{:?}", node.errors());
        node.stop();
    }
}

// ---------------------------------------------------------------------------------------
// Issue 22: a directory, a file or a Redis value that someone else planted
// ---------------------------------------------------------------------------------------

/// `bearerd --check --config PATH`, run to its end.
fn check(config: &str) -> std::process::Output {
    blocking(|| {
        std::process::Command::new(support::daemon::BIN)
            .args(["--check", "--config", config])
            .env_remove("BEARERD_CONFIG")
            .output()
            .unwrap()
    })
}

/// The file backend's directory: a missing one is made 0700 (by `--check` as by start); one
/// that others may write in is refused by `--check` and at start, saying why; a cache
/// key_file that others may read gets the WARN that token key files get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_dir_others_may_write_in_is_refused_by_check_and_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let issuer = Issuer::start(LONG_LIFETIME).await;
    let upstream = Recorder::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("emptydir/tokens");
    let text = config_text(&issuer, &upstream, &["api"], file_cache(&cache));
    let config = write_config(dir.path(), "bearerd.toml", &text);

    let checked = check(&config);
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{checked:?}");
    assert!(said.contains("cache: file, dir"), "{said}");
    assert!(said.contains("in clear"), "{said}");
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "made by --check, 0700");

    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let checked = check(&config);
    let said = String::from_utf8_lossy(&checked.stderr);
    assert!(
        !checked.status.success(),
        "--check accepted a 0777 dir: {checked:?}"
    );
    assert!(
        said.contains("[cache]: dir") && said.contains("writable by others (mode 0777)"),
        "{said}"
    );

    let mut refused = Daemon::start(&config);
    let status = blocking(|| refused.wait_exit());
    assert!(!status.success(), "started with a 0777 cache dir");
    let log = refused.log.lock().unwrap().join("\n");
    assert!(log.contains("writable by others (mode 0777)"), "{log}");
    assert_eq!(issuer.count(), 0);

    // Back to 0700, sealed with a key that others may read: a WARN, as for token key files,
    // and a WARNING from --check.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    let key = dir.path().join("key");
    write_key(&key, 3);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = config_text(
        &issuer,
        &upstream,
        &["api"],
        file_cache(&cache).set("key_file", string(key.to_str().unwrap())),
    );
    let config = write_config(dir.path(), "sealed.toml", &text);
    let checked = check(&config);
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{checked:?}");
    assert!(
        said.contains("sealed (AES-256-GCM)")
            && said.contains(&format!("WARNING: key file {} is readable", key.display())),
        "{said}"
    );
    let node = start_node(&config, &["api"]);
    assert_eq!(node.authorization("api").await, "Bearer tok-api-0");
    let warned = node.daemon.log.lock().unwrap().iter().any(|line| {
        line.contains("\"level\":\"WARN\"")
            && line.contains(&format!(
                "key file {} is readable by group or others",
                key.display()
            ))
    });
    assert!(warned, "{:?}", node.daemon.log.lock().unwrap());
    node.stop();
}

/// A FIFO planted as a source's entry: the next bearerd started there reads nothing from it
/// (without O_NONBLOCK and the regular-file check, every request waited on it for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_planted_as_the_entry_does_not_hang_bearerd() {
    let issuer = Issuer::start(LONG_LIFETIME).await;
    let upstream = Recorder::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let text = config_text(&issuer, &upstream, &["api"], file_cache(&cache));
    let config = write_config(dir.path(), "bearerd.toml", &text);
    let first = start_node(&config, &["api"]);
    assert_eq!(first.authorization("api").await, "Bearer tok-api-0");
    first.stop();
    let entry = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&entry).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&entry)
        .status()
        .unwrap();
    assert!(made.success());

    let node = start_node(&config, &["api"]);
    let Ok(authorization) =
        tokio::time::timeout(Duration::from_secs(20), node.authorization("api")).await
    else {
        panic!("a FIFO as the cache entry held the request (and the token) up");
    };
    assert_eq!(authorization, "Bearer tok-api-1");
    assert_eq!(issuer.count(), 2);
    let warned = node.cache_lines("WARN");
    assert!(
        warned
            .iter()
            .any(|line| line.contains("not a regular file")),
        "{warned:?}"
    );
    assert!(
        std::fs::symlink_metadata(&entry).unwrap().is_file(),
        "replaced"
    );
    node.stop();
}

/// The digest of the one token source that `node` stored in Redis, from its key.
fn stored_digest(redis: &Redis) -> String {
    let keys = blocking(|| redis.keys("bearerd:token:*"));
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys[0].trim_start_matches("bearerd:token:").to_owned()
}

/// A large value planted under bearerd's Redis key: read 16 KiB of it at most (a miss, and a
/// new token), not the whole of it (30 MB grew the process to 114 MB, past the manifests' memory limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_value_under_bearerds_redis_key_is_not_read() {
    const PLANTED: usize = 64 * 1024 * 1024;
    let setup = Setup::new(LONG_LIFETIME).await;
    let config = setup.redis_config("bearerd.toml", &["api"], 1);
    // --check says where and how, without connecting.
    let checked = check(&config);
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{checked:?}");
    assert!(
        said.contains(&format!("cache: redis {}", setup.redis.url()))
            && said.contains("sealed (AES-256-GCM)"),
        "{said}"
    );
    let first = start_node(&config, &["api"]);
    assert_eq!(first.authorization("api").await, "Bearer tok-api-0");
    first.stop();
    let digest = stored_digest(&setup.redis);
    let key = format!("bearerd:token:{digest}");
    let large = vec![b'A'; PLANTED];
    blocking(|| setup.redis.set_keep_ttl(&key, &large));

    let node = start_node(&config, &["api"]);
    assert_eq!(node.authorization("api").await, "Bearer tok-api-1");
    let peak = blocking(|| node.daemon.peak_rss_kib());
    println!("cache-measure: large Redis value: {PLANTED} bytes planted, peak RSS {peak} KiB");
    let warned = node.cache_lines("WARN");
    assert!(
        warned
            .iter()
            .any(|line| line.contains("larger than 16384 bytes")),
        "{warned:?}"
    );
    // The reply alone would be the value's size; bearerd's own use is a fraction of it.
    assert!(
        peak < (PLANTED / 1024 / 2) as u64,
        "peak RSS {peak} KiB after a value of {PLANTED} bytes"
    );
    node.stop();
}

/// A lease on the source's fetch that bearerd could not have set: planted without a time to
/// live, with one far beyond the token timeout, or kept alive under the same value. Each is
/// treated as absent: the process fetches for itself after a Redis call or two, not after the
/// token timeout (60 s here; the bound below is a third of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_bearerd_could_not_have_set_is_treated_as_absent() {
    let setup = Setup::new(LONG_LIFETIME).await;
    let key = setup.path("key");
    write_key(&key, 1);
    let text = ConfigBuilder::new()
        .log(Log::new().format("json"))
        .upstream(
            Upstream::new("api", &setup.upstream.url("api")).token(
                Token::new(&setup.issuer.url(), "app")
                    .secret("pw")
                    .scope("api")
                    .timeout("60s"),
            ),
        )
        .table("cache", redis_cache(&setup.redis.url(), &key))
        .render();
    let config = write_config(setup.dir.path(), "bearerd.toml", &text);
    let first = start_node(&config, &["api"]);
    assert_eq!(first.authorization("api").await, "Bearer tok-api-0");
    first.stop();
    let digest = stored_digest(&setup.redis);
    let (token_key, lease_key) = (
        format!("bearerd:token:{digest}"),
        format!("bearerd:lease:{digest}"),
    );

    type Plant = fn(&Redis, &str);
    let cases: [(&str, Plant, f64); 3] = [
        (
            "without a time to live",
            |redis, lease| redis.set_keep_ttl(lease, b"planted"),
            0.0,
        ),
        (
            "for an hour",
            |redis, lease| {
                redis.cmd(&["SET", lease, "planted", "PX", "3600000"]);
            },
            0.0,
        ),
        (
            "kept alive, 1.5 s at a time",
            |redis, lease| {
                redis.cmd(&["SET", lease, "kept", "PX", "1500"]);
            },
            1.0,
        ),
    ];
    for (n, (case, plant, busy)) in cases.into_iter().enumerate() {
        blocking(|| {
            assert_eq!(setup.redis.cmd(&["DEL", &token_key]).integer(), 1, "{case}");
            plant(&setup.redis, &lease_key);
        });
        // The third case's lease is set again and again, as a stuck or hostile process would.
        let stop = Arc::new(AtomicBool::new(false));
        let keeper = (busy > 0.0).then(|| {
            let (stop, addr, lease) = (Arc::clone(&stop), setup.redis.addr(), lease_key.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    support::redis::command_at(
                        addr,
                        None,
                        &[b"SET", lease.as_bytes(), b"kept", b"PX", b"1500"],
                    );
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        });

        let before = setup.issuer.count();
        let node = start_node(&config, &["api"]);
        let served = tokio::time::timeout(Duration::from_secs(20), node.authorization("api")).await;
        stop.store(true, Ordering::SeqCst);
        if let Some(keeper) = keeper {
            keeper.join().unwrap();
        }
        let Ok(authorization) = served else {
            panic!("{case}: the lease held the first token up for the token timeout");
        };
        assert_eq!(authorization, format!("Bearer tok-api-{}", n + 1), "{case}");
        assert_eq!(
            setup.issuer.count(),
            before + 1,
            "{case}: one token request"
        );
        let scrape = node.scrape().await;
        assert_eq!(
            counter(&scrape, &op("api", "redis", "lease", "ignored")),
            1.0,
            "{case}"
        );
        assert_eq!(
            counter(&scrape, &op("api", "redis", "lease", "busy")),
            busy,
            "{case}"
        );
        assert_eq!(gauge(&scrape, &cache_up("redis")), 1.0, "{case}");
        assert!(node.errors().is_empty(), "{case}: {:?}", node.errors());
        node.stop();
        blocking(|| setup.redis.cmd(&["DEL", &lease_key]));
    }
    setup.upstream.assert_only_issued_tokens(&setup.issuer);
}

// ---------------------------------------------------------------------------------------
// The Kubernetes examples
// ---------------------------------------------------------------------------------------

/// deploy/kubernetes/components/cache-file and cache-redis: their conf.d files load with
/// bearerd's own loader beside the app's config, and name the paths their patches mount
/// (scripts/check-deploy.sh checks the mounts).
#[test]
fn the_kubernetes_cache_components_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    for (example, backend) in [("cache-file", "file"), ("cache-redis", "redis")] {
        let path = root.join("components").join(example).join("cache.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let main = std::fs::read_to_string(root.join("app/bearerd.toml")).unwrap();
        bearerd::config::Config::parse_files(vec![
            ("/etc/bearerd/bearerd.toml".into(), main),
            ("/etc/bearerd/conf.d/cache.toml".into(), text.clone()),
        ])
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let file: toml::Table = text.parse().unwrap();
        let cache = file["cache"].as_table().unwrap();
        assert_eq!(cache["backend"].as_str(), Some(backend), "{example}");
        match backend {
            // A subdirectory of the emptyDir: bearerd makes it 0700 (the emptyDir is not).
            "file" => assert_eq!(cache["dir"].as_str(), Some("/var/cache/bearerd/tokens")),
            _ => {
                for key in ["key_file", "password_file"] {
                    let file = cache[key].as_str().unwrap();
                    assert!(
                        file.starts_with("/var/run/secrets/"),
                        "{example}: {key} {file}"
                    );
                }
            }
        }
    }
}
