//! Tests of the cache in front of a scripted fetcher, with the file backend.

use super::*;
use std::sync::atomic::AtomicUsize;

/// Issues `t1`, `t2`, ... each valid for an hour, and counts them.
struct Counting(AtomicUsize);

impl Fetch for Counting {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Token, FetchError>> + Send + '_>> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            Ok(Token::issue(
                &format!("t{n}"),
                super::super::response::TokenType::Bearer,
                Duration::from_secs(3600),
                super::super::LifetimeSource::ExpiresIn,
                None,
            )
            .unwrap())
        })
    }
}

fn settings() -> TokenSettings {
    let text = "[[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nurl = \"https://api.example.com\"\n[upstream.token]\nurl = \"https://auth.example.com/t\"\nclient_id = \"app\"\nclient_secret = \"s\"\n";
    crate::config::Config::parse(std::path::Path::new("/x.toml"), text)
        .unwrap()
        .upstreams
        .remove(0)
        .token
}

fn cached(dir: &std::path::Path, inner: Arc<Counting>) -> CachedFetch {
    let gauge = IntGauge::new("up", "up").unwrap();
    let prepared = Prepared::new(&config::Cache::File {
        dir: dir.to_owned(),
    })
    .unwrap();
    let store = Store::new(prepared, gauge);
    CachedFetch::new(
        inner,
        Arc::new(store),
        &settings(),
        None,
        SharedObservers::default(),
    )
}

#[tokio::test]
async fn a_restart_takes_the_stored_token_and_a_refresh_fetches_anew() {
    let dir = tempfile::tempdir().unwrap();
    let inner = Arc::new(Counting(AtomicUsize::new(0)));
    let first = cached(dir.path(), Arc::clone(&inner));
    assert_eq!(first.fetch().await.unwrap().authorization(), "Bearer t1");
    assert_eq!(inner.0.load(Ordering::SeqCst), 1);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    }

    // The restarted process finds it: no token request, and a lifetime from the cache.
    let restarted = cached(dir.path(), Arc::clone(&inner));
    let token = restarted.fetch().await.unwrap();
    assert_eq!(token.authorization(), "Bearer t1");
    assert_eq!(token.lifetime_source, super::super::LifetimeSource::Cached);
    assert_eq!(inner.0.load(Ordering::SeqCst), 1);

    // Its refresh does not take the token it holds for a new one.
    assert_eq!(
        restarted.fetch().await.unwrap().authorization(),
        "Bearer t2"
    );
    assert_eq!(inner.0.load(Ordering::SeqCst), 2);

    // A rejected token is dropped from the store.
    restarted.rejected(&token).await;
    let again = cached(dir.path(), Arc::clone(&inner));
    assert_eq!(again.fetch().await.unwrap().authorization(), "Bearer t2");
}

#[tokio::test]
async fn a_corrupt_or_foreign_file_is_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let inner = Arc::new(Counting(AtomicUsize::new(0)));
    let fetch = cached(dir.path(), Arc::clone(&inner));
    std::fs::write(
        dir.path().join(format!("{}.json", fetch.digest)),
        "{not json",
    )
    .unwrap();
    assert_eq!(fetch.fetch().await.unwrap().authorization(), "Bearer t1");
    // A file of another source, renamed to this one's name, is not taken.
    let mut foreign: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join(format!("{}.json", fetch.digest))).unwrap(),
    )
    .unwrap();
    foreign["source"] = "another".into();
    foreign["access_token"] = "stolen".into();
    std::fs::write(
        dir.path().join(format!("{}.json", fetch.digest)),
        foreign.to_string(),
    )
    .unwrap();
    let restarted = cached(dir.path(), Arc::clone(&inner));
    assert_eq!(
        restarted.fetch().await.unwrap().authorization(),
        "Bearer t2"
    );
}

#[tokio::test]
async fn an_unreadable_file_is_reported_without_quoting_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = file::FileStore::new(dir.path().to_owned());
    // A value of the wrong type: serde's own message would quote it.
    std::fs::write(
        dir.path().join("src.json"),
        r#"{"v":"tok-do-not-print","source":"src"}"#,
    )
    .unwrap();
    let Err(CacheError::Unreadable(message)) = store.get("src").await else {
        panic!("a wrong-typed file must be unreadable")
    };
    assert!(message.contains("src.json"), "{message}");
    assert!(!message.contains("tok-do-not-print"), "{message}");
}
