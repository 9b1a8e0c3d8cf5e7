//! `grant = "refresh_token"` with rotation, through a sidecar and the file cache, against an
//! in-process token endpoint that rotates like Xero or QuickBooks: each refresh token works
//! once, and the answer carries the next. (Against Django OAuth Toolkit and Authlib:
//! `tests/interop`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use http::StatusCode;
use serde_json::json;
use support::config::{string, ConfigBuilder, Table, Token, Upstream};
use support::{echo, get, json as answer, metric, serve, token_endpoint, Sidecar, TokenEndpoint};
use tokio::sync::Notify;

/// A token endpoint whose refresh tokens work once: `rt-0` first, each answer giving the
/// next (`rt-1`, …) with the access token `at-<n>`. A token spent or unknown gets
/// `invalid_grant`, as RFC 6749 §5.2 says. `valid` is the one it takes now.
async fn rotating(valid: Arc<Mutex<String>>) -> TokenEndpoint {
    rotating_held(valid, None).await
}

/// [`rotating`], its first answer held until `first` is notified: a refresh in flight, its
/// refresh token received and not yet answered.
async fn rotating_held(valid: Arc<Mutex<String>>, first: Option<Arc<Notify>>) -> TokenEndpoint {
    let issued = Arc::new(AtomicUsize::new(0));
    token_endpoint(move |n, request| {
        let valid = Arc::clone(&valid);
        let issued = Arc::clone(&issued);
        let first = first.clone().filter(|_| n == 0);
        async move {
            if let Some(first) = first {
                first.notified().await;
            }
            assert_eq!(request.form["grant_type"], "refresh_token");
            let mut current = valid.lock().unwrap();
            if request.form.get("refresh_token") != Some(&*current) {
                return answer(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "invalid_grant", "error_description": "refresh token spent"}),
                );
            }
            let n = issued.fetch_add(1, Ordering::SeqCst);
            *current = format!("rt-{}", n + 1);
            answer(
                StatusCode::OK,
                json!({
                    "access_token": format!("at-{n}"),
                    "token_type": "Bearer",
                    "expires_in": 1800,
                    "refresh_token": *current,
                }),
            )
        }
    })
    .await
}

/// A directory with the first refresh token and the cache's key.
fn prepared_dir(first: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("refresh_token"), format!("{first}\n")).unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    std::fs::write(dir.path().join("cache.key"), key).unwrap();
    dir
}

/// The refresh_token grant at `endpoint`, its first refresh token in `file`.
fn refresh_grant(endpoint: &TokenEndpoint, file: &str) -> Token {
    Token::new(&endpoint.url("/connect/token"), "app")
        .secret("s")
        .set("grant", string("refresh_token"))
        .set("refresh_token_file", string(file))
}

/// The sealed file cache in `tokens`, keyed by [`prepared_dir`]'s key.
fn file_cache() -> Table {
    Table::new()
        .set("backend", string("file"))
        .set("dir", string("tokens"))
        .set("key_file", string("cache.key"))
}

fn config(endpoint: &TokenEndpoint, upstream: &support::Server) -> String {
    ConfigBuilder::new()
        .upstream(
            Upstream::new("api", &upstream.url("/v1"))
                .token(refresh_grant(endpoint, "refresh_token")),
        )
        .table("cache", file_cache())
        .render()
}

/// A replica's config with the Redis cache; replicas' configs are the same, as in one
/// Deployment: the same `refresh_token_file` path (the chain's name), each its own key file
/// (of the same key, [`prepared_dir`]).
fn redis_config(
    endpoint: &TokenEndpoint,
    upstream: &support::Server,
    redis: &support::redis::Redis,
    file: &Path,
) -> String {
    ConfigBuilder::new()
        .upstream(
            Upstream::new("api", &upstream.url("/v1"))
                .token(refresh_grant(endpoint, file.to_str().unwrap())),
        )
        .table(
            "cache",
            Table::new()
                .set("backend", string("redis"))
                .set("url", string(&redis.url()))
                .set("key_file", string("cache.key")),
        )
        .render()
}

/// The refresh token entries of the cache directory.
fn refresh_entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("tokens"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().path())
                .filter(|p| p.to_string_lossy().ends_with("-refresh.json"))
                .collect()
        })
        .unwrap_or_default()
}

/// An upstream that answers 401 to its first request (bearerd then drops the token and
/// fetches another) and echoes the rest; it records, at each request, whether a refresh
/// token entry was already stored in `dir`.
async fn upstream_watching(
    dir: PathBuf,
    reject_first: bool,
) -> (support::Server, Arc<Mutex<Vec<bool>>>) {
    let stored_when_used = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&stored_when_used);
    let count = Arc::new(AtomicUsize::new(0));
    let server = serve(move |request| {
        let seen = Arc::clone(&seen);
        let dir = dir.clone();
        let count = Arc::clone(&count);
        async move {
            seen.lock().unwrap().push(!refresh_entries(&dir).is_empty());
            if reject_first && count.fetch_add(1, Ordering::SeqCst) == 0 {
                answer(StatusCode::UNAUTHORIZED, json!({"error": "invalid_token"}))
            } else {
                echo(request).await
            }
        }
    })
    .await;
    (server, stored_when_used)
}

#[tokio::test]
async fn a_rotated_refresh_token_is_stored_sealed_before_use_and_spent_after_a_restart() {
    let valid = Arc::new(Mutex::new("rt-0".to_owned()));
    let endpoint = rotating(Arc::clone(&valid)).await;
    let dir = prepared_dir("rt-0");
    let path = dir.path().to_owned();
    let (upstream, stored_when_used) = upstream_watching(path.clone(), false).await;
    let text = config(&endpoint, &upstream);
    let mut first = Sidecar::start_in(dir, &text).await;
    let seen = get(&first.url("api", "/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer at-0"));
    assert_eq!(*stored_when_used.lock().unwrap(), vec![true]);
    // Sealed: the entry never holds the refresh token in clear.
    let entries = refresh_entries(&path);
    assert_eq!(entries.len(), 1);
    let stored = std::fs::read_to_string(&entries[0]).unwrap();
    assert!(!stored.contains("rt-1"), "{stored}");
    // Keep the directory: the next process starts from it.
    let dir = std::mem::replace(&mut first.dir, tempfile::tempdir().unwrap());
    first.stop().await;

    // A restart whose upstream rejects the cached access token: the new fetch must spend
    // rt-1, the stored one, not rt-0 from the file (spent: invalid_grant).
    let (upstream, _) = upstream_watching(path.clone(), true).await;
    let text = config(&endpoint, &upstream);
    let second = Sidecar::start_in(dir, &text).await;
    let seen = get(&second.url("api", "/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer at-1"));
    let spent: Vec<String> = endpoint
        .requests()
        .iter()
        .map(|r| r.form["refresh_token"].clone())
        .collect();
    assert_eq!(spent, vec!["rt-0", "rt-1"]);
    assert_eq!(*valid.lock().unwrap(), "rt-2");
    second.stop().await;
}

#[tokio::test]
async fn a_refresh_token_file_written_since_the_chain_began_wins() {
    let valid = Arc::new(Mutex::new("rt-0".to_owned()));
    let endpoint = rotating(Arc::clone(&valid)).await;
    let dir = prepared_dir("rt-0");
    let path = dir.path().to_owned();
    let (upstream, _) = upstream_watching(path.clone(), false).await;
    let mut first = Sidecar::start_in(dir, &config(&endpoint, &upstream)).await;
    assert_eq!(
        get(&first.url("api", "/x"))
            .await
            .echo()
            .header("authorization"),
        Some("Bearer at-0")
    );
    let dir = std::mem::replace(&mut first.dir, tempfile::tempdir().unwrap());
    first.stop().await;

    // The account is authorised again: a new chain, and the stored rt-1 is spent no more.
    *valid.lock().unwrap() = "rt-reauthorised".into();
    std::fs::write(path.join("refresh_token"), "rt-reauthorised").unwrap();
    let (upstream, _) = upstream_watching(path.clone(), true).await;
    let second = Sidecar::start_in(dir, &config(&endpoint, &upstream)).await;
    let seen = get(&second.url("api", "/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer at-1"));
    assert_eq!(
        endpoint.requests().last().unwrap().form["refresh_token"],
        "rt-reauthorised"
    );
    second.stop().await;
}

#[tokio::test]
async fn invalid_grant_is_authorisation_lost_and_the_token_is_not_sent_again() {
    let valid = Arc::new(Mutex::new("rt-elsewhere".to_owned()));
    let endpoint = rotating(valid).await;
    let dir = prepared_dir("rt-0");
    let upstream = serve(echo).await;
    let text = ConfigBuilder::new()
        .upstream(
            Upstream::new("api", &upstream.url("/v1")).token(
                refresh_grant(&endpoint, "refresh_token")
                    .set("backoff_base", string("50ms"))
                    .set("backoff_cap", string("100ms")),
            ),
        )
        .table("cache", file_cache())
        .render();
    let sidecar = Sidecar::start_in(dir, &text).await;
    let refused = get(&sidecar.url("api", "/x")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    let admin = sidecar.running().admin_addr();
    // The refresher tries again after its backoff: the attempt sends nothing (counted with
    // the requests not sent). Wait for that count, the signal that it happened.
    let scrape = loop {
        let scrape =
            String::from_utf8(get(&format!("http://{admin}/metrics")).await.body.to_vec()).unwrap();
        if metric(
            &scrape,
            r#"bearerd_token_secret_errors_total{upstream="api"}"#,
        )
        .unwrap_or(0.0)
            >= 2.0
        {
            break scrape;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(endpoint.count(), 1, "invalid_grant is never retried");
    assert_eq!(
        metric(
            &scrape,
            r#"bearerd_token_fetch_total{outcome="authorisation_lost",upstream="api"}"#
        ),
        Some(1.0)
    );
    let ready = get(&format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8(ready.body.to_vec()).unwrap();
    assert!(body.contains("authorisation lost"), "{body}");
    assert!(!body.contains("rt-0"), "{body}");
    sidecar.stop().await;
}

/// `--fetch-token` spends the refresh token through the store, as the running bearerd does:
/// the stored one (not the file's), and the rotated one stored before anything is printed;
/// `--check` spends none. A store that fails after the token was spent fails the command, and
/// nothing of the tokens is printed.
#[tokio::test]
async fn fetch_token_spends_the_refresh_token_through_the_store_and_check_spends_none() {
    let valid = Arc::new(Mutex::new("rt-0".to_owned()));
    let endpoint = rotating(Arc::clone(&valid)).await;
    let upstream = serve(echo).await;
    let dir = prepared_dir("rt-0");
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, config(&endpoint, &upstream)).unwrap();
    let config = bearerd::config::Config::load(&path).unwrap();
    let checked = bearerd::check::check(&config).unwrap();
    assert!(checked.contains("not spent by --check"), "{checked}");
    assert_eq!(endpoint.count(), 0);

    let out = bearerd::check::fetch_token(&config, "api", false)
        .await
        .unwrap();
    assert!(out.contains("token request to"), "{out}");
    assert!(!out.contains("at-0") && !out.contains("rt-"), "{out}");
    assert_eq!(refresh_entries(dir.path()).len(), 1, "rt-1 stored");
    // Again: rt-1 from the store, not rt-0 from the file (spent).
    bearerd::check::fetch_token(&config, "api", false)
        .await
        .unwrap();
    let spent: Vec<String> = endpoint
        .requests()
        .iter()
        .map(|r| r.form["refresh_token"].clone())
        .collect();
    assert_eq!(spent, vec!["rt-0", "rt-1"]);
    assert_eq!(*valid.lock().unwrap(), "rt-2");
}

#[tokio::test]
async fn fetch_token_fails_when_the_rotated_refresh_token_cannot_be_stored() {
    let valid = Arc::new(Mutex::new("rt-0".to_owned()));
    let answer_first = Arc::new(Notify::new());
    let endpoint = rotating_held(Arc::clone(&valid), Some(Arc::clone(&answer_first))).await;
    let upstream = serve(echo).await;
    let dir = prepared_dir("rt-0");
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, config(&endpoint, &upstream)).unwrap();
    let config = bearerd::config::Config::load(&path).unwrap();
    // The cache directory goes away while the refresh token is at the endpoint: storing the
    // rotated one fails.
    let (fetched, ()) = tokio::join!(bearerd::check::fetch_token(&config, "api", true), async {
        endpoint.wait_for_requests(1).await;
        std::fs::remove_dir_all(dir.path().join("tokens")).unwrap();
        answer_first.notify_one();
    });
    let error = fetched.unwrap_err();
    assert!(error.contains("could not be stored"), "{error}");
    assert!(error.contains("authorise again"), "{error}");
    assert!(
        !error.contains("at-0") && !error.contains("rt-1"),
        "{error}"
    );
    assert_eq!(*valid.lock().unwrap(), "rt-1", "spent");
}

/// Two replicas sharing a Redis: the second spends the refresh token the first stored, never
/// the file's (already spent), and the chain is kept without expiry beside the token entry.
#[tokio::test]
async fn replicas_sharing_redis_spend_the_newest_refresh_token() {
    let redis = support::redis::Redis::start();
    let valid = Arc::new(Mutex::new("rt-0".to_owned()));
    let endpoint = rotating(Arc::clone(&valid)).await;
    // The replicas' configs are the same, as in one Deployment: the same file path.
    let shared = tempfile::tempdir().unwrap();
    let file = shared.path().join("refresh_token");
    std::fs::write(&file, "rt-0").unwrap();
    let text = |upstream: &support::Server| redis_config(&endpoint, upstream, &redis, &file);
    let first_upstream = serve(echo).await;
    let first = Sidecar::start_in(prepared_dir("rt-0"), &text(&first_upstream)).await;
    assert_eq!(
        get(&first.url("api", "/x"))
            .await
            .echo()
            .header("authorization"),
        Some("Bearer at-0")
    );
    let chains: Vec<String> = redis
        .keys("*")
        .into_iter()
        .filter(|k| k.ends_with("-refresh"))
        .collect();
    assert_eq!(chains.len(), 1, "{:?}", redis.keys("*"));
    assert_eq!(redis.pttl(&chains[0]), -1, "the chain does not expire");
    let sealed = redis.get(&chains[0]).unwrap();
    assert!(!String::from_utf8_lossy(&sealed).contains("rt-1"));

    // The second replica starts from the same (spent) file; its upstream rejects the shared
    // access token, so it fetches under the lease, with the stored rt-1.
    let (second_upstream, _) = upstream_watching(PathBuf::from("/nonexistent"), true).await;
    let second = Sidecar::start_in(prepared_dir("rt-0"), &text(&second_upstream)).await;
    let seen = get(&second.url("api", "/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer at-1"));
    let spent: Vec<String> = endpoint
        .requests()
        .iter()
        .map(|r| r.form["refresh_token"].clone())
        .collect();
    assert_eq!(spent, vec!["rt-0", "rt-1"]);
    first.stop().await;
    second.stop().await;
}

/// A store that fails keeps the new refresh token in memory, and `/readyz` says degraded
/// (200); a chain the store lost goes on from the token held, not from the file's (spent).
#[tokio::test]
async fn a_failed_store_keeps_the_refresh_token_in_memory_and_readyz_degraded() {
    let valid = Arc::new(Mutex::new("rt-0".to_owned()));
    let endpoint = rotating(Arc::clone(&valid)).await;
    let dir = prepared_dir("rt-0");
    let path = dir.path().to_owned();
    let upstream = serve(echo).await;
    let sidecar = Sidecar::start_in(dir, &config(&endpoint, &upstream)).await;
    assert_eq!(
        get(&sidecar.url("api", "/x"))
            .await
            .echo()
            .header("authorization"),
        Some("Bearer at-0")
    );
    // The cache directory goes away under the running process: every write fails.
    std::fs::remove_dir_all(path.join("tokens")).unwrap();
    let source = sidecar.running().token_source("api").unwrap();
    let held = source.state().token.unwrap();
    let second = source.replacement_for(&held).await.unwrap();
    assert_eq!(second.authorization(), "Bearer at-1");
    let admin = sidecar.running().admin_addr();
    let ready = get(&format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK);
    let body = ready.json();
    assert_eq!(body["ready"], true);
    let detail = body["degraded"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("held in memory only"), "{detail}");
    assert!(!detail.contains("rt-2"), "{detail}");

    // (Which token the next fetch spends, memory or store or file, is
    // `rotation::tests`: the refresher lets one upstream rejection through per 5 s.)
    let spent: Vec<String> = endpoint
        .requests()
        .iter()
        .map(|r| r.form["refresh_token"].clone())
        .collect();
    assert_eq!(spent, vec!["rt-0", "rt-1"]);
    sidecar.stop().await;
}

/// The fleet lease held by another replica: the first replica's refresh is in flight (its
/// refresh token received by the endpoint, the answer held), and a second replica that starts
/// then must not send a refresh token of its own (it waits for what the holder stores); once
/// the holder's answer comes, the second takes the access token it stored and, when that is
/// rejected, spends the rotated refresh token the holder stored. Each refresh token the
/// endpoint saw was spent once, by one request.
#[tokio::test]
async fn a_replica_refused_the_fleet_lease_never_spends_the_refresh_token() {
    let redis = support::redis::Redis::start();
    let valid = Arc::new(Mutex::new("rt-0".to_owned()));
    let answer_first = Arc::new(Notify::new());
    let endpoint = rotating_held(Arc::clone(&valid), Some(Arc::clone(&answer_first))).await;
    let shared = tempfile::tempdir().unwrap();
    let file = shared.path().join("refresh_token");
    std::fs::write(&file, "rt-0").unwrap();

    let first_upstream = serve(echo).await;
    let first = Sidecar::start_in(
        prepared_dir("rt-0"),
        &redis_config(&endpoint, &first_upstream, &redis, &file),
    )
    .await;
    // The first replica's refresher fetches at start, under the lease: rt-0 has arrived.
    tokio::time::timeout(Duration::from_secs(10), endpoint.wait_for_requests(1))
        .await
        .expect("the first replica sent no token request");
    let leases = redis.keys("bearerd:lease:*");
    assert_eq!(leases.len(), 1, "the first replica holds the lease");

    // Its upstream rejects the first token it is sent, so that it must fetch again.
    let (second_upstream, _) = upstream_watching(PathBuf::from("/nonexistent"), true).await;
    let second = Sidecar::start_in(
        prepared_dir("rt-0"),
        &redis_config(&endpoint, &second_upstream, &redis, &file),
    )
    .await;
    // The signal that the second replica asked for the lease and was refused it.
    let admin = second.running().admin_addr();
    let busy = r#"bearerd_token_cache_operations_total{backend="redis",op="lease",outcome="busy",upstream="api"}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let scrape =
            String::from_utf8(get(&format!("http://{admin}/metrics")).await.body.to_vec()).unwrap();
        if metric(&scrape, busy).unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second replica never found the lease taken:\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        endpoint.count(),
        1,
        "the second replica sent a token request while the first held the lease"
    );
    assert_eq!(
        redis.keys("bearerd:lease:*"),
        leases,
        "the same lease, still held"
    );

    // The holder's answer comes: it stores rt-1 and at-0, the second replica takes at-0 from
    // Redis, and when its upstream rejects that, spends rt-1 under the lease.
    answer_first.notify_one();
    assert_eq!(
        get(&first.url("api", "/x"))
            .await
            .echo()
            .header("authorization"),
        Some("Bearer at-0")
    );
    let seen = get(&second.url("api", "/x")).await.echo();
    assert_eq!(seen.header("authorization"), Some("Bearer at-1"));
    let spent: Vec<String> = endpoint
        .requests()
        .iter()
        .map(|r| r.form["refresh_token"].clone())
        .collect();
    assert_eq!(spent, vec!["rt-0", "rt-1"], "each refresh token spent once");
    assert_eq!(*valid.lock().unwrap(), "rt-2");
    let scrape =
        String::from_utf8(get(&format!("http://{admin}/metrics")).await.body.to_vec()).unwrap();
    assert_eq!(
        metric(
            &scrape,
            r#"bearerd_token_cache_operations_total{backend="redis",op="lease",outcome="acquired",upstream="api"}"#
        ),
        Some(1.0),
        "the second replica fetched once, under the lease"
    );
    first.stop().await;
    second.stop().await;
}
