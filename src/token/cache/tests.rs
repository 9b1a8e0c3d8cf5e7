//! Tests of the cache in front of a scripted fetcher, with the file backend: the restart it
//! serves, and what a directory that someone else writes in can do (issue 22).

use super::*;
use crate::jose::unix_now;
use base64::Engine;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::sync::atomic::AtomicUsize;
use std::time::SystemTime;

/// Issues `t1`, `t2`, ... of its type, each valid for an hour, and counts them.
struct Counting(AtomicUsize, TokenType);

impl Counting {
    fn bearer() -> Arc<Self> {
        Arc::new(Self(AtomicUsize::new(0), TokenType::Bearer))
    }

    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Fetch for Counting {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Token, FetchError>> + Send + '_>> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        let kind = self.1;
        Box::pin(async move {
            Ok(Token::issue(
                &format!("t{n}"),
                kind,
                Duration::from_secs(3600),
                super::super::LifetimeSource::ExpiresIn,
                None,
            )
            .unwrap())
        })
    }
}

/// A source whose tokens live an hour at most.
fn settings() -> TokenSettings {
    let secret = crate::secret::SecretSource::Inline(crate::secret::Secret::new("s"));
    TokenSettings {
        max_lifetime: Duration::from_secs(3600),
        ..TokenSettings::for_tests(crate::config::ClientAuth::Basic { secret })
    }
}

fn file_settings(dir: &Path, key_file: Option<&Path>) -> config::Cache {
    config::Cache::File {
        dir: dir.to_owned(),
        key_file: key_file.map(Path::to_owned),
    }
}

fn store(settings: &config::Cache) -> Arc<Store> {
    let gauge = IntGauge::new("up", "up").unwrap();
    Arc::new(Store::new(prepare(settings).unwrap(), gauge))
}

fn cached_with(
    store: Arc<Store>,
    inner: Arc<Counting>,
    dpop_thumbprint: Option<&str>,
) -> CachedFetch {
    CachedFetch::new(
        inner,
        store,
        &settings(),
        dpop_thumbprint,
        SharedObservers::default(),
        None,
    )
}

fn cached(dir: &Path, inner: Arc<Counting>) -> CachedFetch {
    cached_with(store(&file_settings(dir, None)), inner, None)
}

/// The entry file of `fetch`'s source in `dir`.
fn entry_path(dir: &Path, fetch: &CachedFetch) -> PathBuf {
    dir.join(format!("{}.json", fetch.digest))
}

/// An entry in clear for `fetch`'s source: `token` of `kind`, fetched now, expiring in
/// `expires_in` seconds.
fn planted(fetch: &CachedFetch, token: &str, kind: &str, expires_in: u64) -> String {
    let now = unix_now();
    serde_json::json!({
        "v": 1,
        "source": fetch.digest,
        "access_token": token,
        "token_type": kind,
        "scope": null,
        "fetched_at": now,
        "expires_at": now + expires_in,
    })
    .to_string()
}

/// A directory of mode 0700 for the cache, inside a temporary one.
fn cache_dir() -> (tempfile::TempDir, PathBuf) {
    let outer = tempfile::tempdir().unwrap();
    let dir = outer.path().join("cache");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    (outer, dir)
}

#[tokio::test]
async fn a_restart_takes_the_stored_token_and_a_refresh_fetches_anew() {
    let (_outer, dir) = cache_dir();
    let inner = Counting::bearer();
    let first = cached(&dir, Arc::clone(&inner));
    assert_eq!(first.fetch().await.unwrap().authorization(), "Bearer t1");
    assert_eq!(inner.count(), 1);
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(files.len(), 1, "no temporary file left: {files:?}");
    let file = files[0].as_ref().unwrap().metadata().unwrap();
    assert!(file.is_file());
    assert_eq!(file.permissions().mode() & 0o777, 0o600);

    // The restarted process finds it: no token request, and a lifetime from the cache.
    let restarted = cached(&dir, Arc::clone(&inner));
    let token = restarted.fetch().await.unwrap();
    assert_eq!(token.authorization(), "Bearer t1");
    assert_eq!(token.lifetime_source, super::super::LifetimeSource::Cached);
    assert_eq!(inner.count(), 1);

    // Its refresh does not take the token it holds for a new one.
    assert_eq!(
        restarted.fetch().await.unwrap().authorization(),
        "Bearer t2"
    );
    assert_eq!(inner.count(), 2);

    // A rejected token is dropped from the store.
    restarted.rejected(&token).await;
    let again = cached(&dir, Arc::clone(&inner));
    assert_eq!(again.fetch().await.unwrap().authorization(), "Bearer t2");
}

#[tokio::test]
async fn a_corrupt_or_foreign_file_is_a_miss() {
    let (_outer, dir) = cache_dir();
    let inner = Counting::bearer();
    let fetch = cached(&dir, Arc::clone(&inner));
    std::fs::write(entry_path(&dir, &fetch), "{not json").unwrap();
    assert_eq!(fetch.fetch().await.unwrap().authorization(), "Bearer t1");
    // A file of another source, renamed to this one's name, is not taken.
    let mut foreign: serde_json::Value =
        serde_json::from_slice(&std::fs::read(entry_path(&dir, &fetch)).unwrap()).unwrap();
    foreign["source"] = "another".into();
    foreign["access_token"] = "stolen".into();
    std::fs::write(entry_path(&dir, &fetch), foreign.to_string()).unwrap();
    let restarted = cached(&dir, Arc::clone(&inner));
    assert_eq!(
        restarted.fetch().await.unwrap().authorization(),
        "Bearer t2"
    );
}

#[tokio::test]
async fn an_unreadable_file_is_reported_without_quoting_it() {
    let (_outer, dir) = cache_dir();
    let store = store(&file_settings(&dir, None));
    // A value of the wrong type: serde's own message would quote it.
    std::fs::write(
        dir.join("src.json"),
        r#"{"v":"tok-do-not-print","source":"src"}"#,
    )
    .unwrap();
    let Err(CacheError::Unreadable(message)) = store.get("src").await else {
        panic!("a wrong-typed file must be unreadable")
    };
    assert!(message.contains("src.json"), "{message}");
    assert!(!message.contains("tok-do-not-print"), "{message}");
}

// ---------------------------------------------------------------------------------------
// Issue 22, part 2: the directory is not trusted
// ---------------------------------------------------------------------------------------

/// The temporary file's old name was `.<entry>.<pid>.tmp`, opened with O_CREAT|O_TRUNC: a
/// link planted there received the next token. Now the name is random and the file is made
/// new (O_EXCL|O_NOFOLLOW): the link's target stays untouched, and the entry is a file.
#[tokio::test]
async fn a_link_planted_at_the_temporary_name_receives_nothing() {
    let (outer, dir) = cache_dir();
    let inner = Counting::bearer();
    let fetch = cached(&dir, Arc::clone(&inner));
    let target = outer.path().join("stolen");
    std::fs::write(&target, "").unwrap();
    let old_name = format!(".{}.json.{}.tmp", fetch.digest, std::process::id());
    symlink(&target, dir.join(&old_name)).unwrap();

    assert_eq!(fetch.fetch().await.unwrap().authorization(), "Bearer t1");
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "",
        "the token went through the link"
    );
    let entry = std::fs::symlink_metadata(entry_path(&dir, &fetch)).unwrap();
    assert!(entry.is_file(), "the entry is a regular file: {entry:?}");
    assert_eq!(entry.permissions().mode() & 0o777, 0o600);
    // The planted link is left alone, and no temporary file is left beside it.
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected = vec![format!("{}.json", fetch.digest), old_name];
    expected.sort();
    assert_eq!(names, expected);
}

/// An entry that is a link to a file holding a valid entry is not followed: a miss, and the
/// link is replaced by a file of bearerd's, the target untouched.
#[tokio::test]
async fn a_link_planted_at_the_entry_is_not_followed() {
    let (outer, dir) = cache_dir();
    let inner = Counting::bearer();
    let fetch = cached(&dir, Arc::clone(&inner));
    let target = outer.path().join("elsewhere.json");
    let text = planted(&fetch, "planted", "Bearer", 600);
    std::fs::write(&target, &text).unwrap();
    symlink(&target, entry_path(&dir, &fetch)).unwrap();

    assert_eq!(fetch.fetch().await.unwrap().authorization(), "Bearer t1");
    assert_eq!(inner.count(), 1, "the link's token was taken");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), text);
    assert!(std::fs::symlink_metadata(entry_path(&dir, &fetch))
        .unwrap()
        .is_file());
}

/// A plain entry planted with a ten-year lifetime: without a key it cannot be told from
/// bearerd's own, but its lifetime is clamped to `max_lifetime` (1 h here).
#[tokio::test]
async fn a_planted_lifetime_is_clamped_to_max_lifetime() {
    let (_outer, dir) = cache_dir();
    let inner = Counting::bearer();
    let fetch = cached(&dir, Arc::clone(&inner));
    std::fs::write(
        entry_path(&dir, &fetch),
        planted(&fetch, "planted", "Bearer", 10 * 365 * 86_400),
    )
    .unwrap();
    let token = fetch.fetch().await.unwrap();
    assert_eq!(token.authorization(), "Bearer planted");
    assert!(
        token.lifetime <= Duration::from_secs(3600),
        "a cached lifetime of {:?} beats max_lifetime",
        token.lifetime
    );
    let left = token
        .expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(left <= Duration::from_secs(3600), "{left:?}");
}

/// With `key_file`, file entries are sealed: a planted entry in clear is a miss, and what
/// bearerd writes does not hold the token in clear.
#[tokio::test]
async fn with_a_key_planted_entries_are_misses() {
    let (outer, dir) = cache_dir();
    let key = outer.path().join("key");
    std::fs::write(
        &key,
        base64::engine::general_purpose::STANDARD.encode([9u8; 32]),
    )
    .unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let settings = file_settings(&dir, Some(&key));
    let inner = Counting::bearer();
    let fetch = cached_with(store(&settings), Arc::clone(&inner), None);
    std::fs::write(
        entry_path(&dir, &fetch),
        planted(&fetch, "planted", "Bearer", 600),
    )
    .unwrap();
    assert_eq!(fetch.fetch().await.unwrap().authorization(), "Bearer t1");
    let written = std::fs::read_to_string(entry_path(&dir, &fetch)).unwrap();
    // base64 of nonce, ciphertext and tag: no JSON, no field name (a token as short as "t1"
    // may appear in base64 by chance).
    assert!(
        !written.contains('{') && !written.contains("access_token"),
        "sealed: {written}"
    );

    // A restart with the key takes it.
    let restarted = cached_with(store(&settings), Arc::clone(&inner), None);
    assert_eq!(
        restarted.fetch().await.unwrap().authorization(),
        "Bearer t1"
    );
    assert_eq!(inner.count(), 1);
    let described = prepare(&settings).unwrap().describe().to_owned();
    assert!(described.contains("sealed (AES-256-GCM)"), "{described}");
    assert!(!described.contains("WARNING"), "{described}");
}

/// A Bearer entry is not sent by a DPoP source (nor a DPoP one by a Bearer source).
#[tokio::test]
async fn a_bearer_entry_is_not_taken_by_a_dpop_source() {
    let (_outer, dir) = cache_dir();
    let inner = Arc::new(Counting(AtomicUsize::new(0), TokenType::DPoP));
    let fetch = cached_with(
        store(&file_settings(&dir, None)),
        Arc::clone(&inner),
        Some("thumbprint"),
    );
    std::fs::write(
        entry_path(&dir, &fetch),
        planted(&fetch, "planted", "Bearer", 600),
    )
    .unwrap();
    assert_eq!(fetch.fetch().await.unwrap().authorization(), "DPoP t1");
    assert_eq!(inner.count(), 1);

    let bearer = Counting::bearer();
    let plain = cached(&dir, Arc::clone(&bearer));
    std::fs::write(
        entry_path(&dir, &plain),
        planted(&plain, "planted", "DPoP", 600),
    )
    .unwrap();
    assert_eq!(plain.fetch().await.unwrap().authorization(), "Bearer t1");
}

/// A FIFO as the entry: opened without blocking and refused as not a regular file, at once.
/// (Read as a file, it waits for a writer for ever: the bound turns that into a failure, and
/// a writer is then opened so that the stuck read ends.)
#[tokio::test]
async fn a_fifo_as_the_entry_does_not_hang() {
    let (_outer, dir) = cache_dir();
    let inner = Counting::bearer();
    let fetch = cached(&dir, Arc::clone(&inner));
    let fifo = entry_path(&dir, &fetch);
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    let outcome = tokio::time::timeout(Duration::from_secs(10), fetch.fetch()).await;
    let Ok(token) = outcome else {
        let _writer = std::fs::OpenOptions::new().write(true).open(&fifo);
        panic!("a FIFO as the entry hung the fetch");
    };
    assert_eq!(token.unwrap().authorization(), "Bearer t1");
    assert!(
        std::fs::symlink_metadata(&fifo).unwrap().is_file(),
        "replaced"
    );
}

/// A link to /dev/zero as the entry is not followed (it would be read without end), and a
/// regular file over the cap is not read: both are misses.
#[tokio::test]
async fn an_endless_or_oversized_entry_is_not_read() {
    let (_outer, dir) = cache_dir();
    let inner = Counting::bearer();
    let fetch = cached(&dir, Arc::clone(&inner));
    symlink("/dev/zero", entry_path(&dir, &fetch)).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), fetch.fetch()).await;
    assert_eq!(outcome.unwrap().unwrap().authorization(), "Bearer t1");

    // A valid entry whose token is too large for an entry: refused unread.
    let restarted = cached(&dir, Arc::clone(&inner));
    let large = "x".repeat(MAX_ENTRY_BYTES);
    std::fs::write(
        entry_path(&dir, &restarted),
        planted(&restarted, &large, "Bearer", 600),
    )
    .unwrap();
    let Err(CacheError::Unreadable(why)) = restarted.store.get(&restarted.digest).await else {
        panic!("an entry over the cap is read")
    };
    assert!(why.contains(&MAX_ENTRY_BYTES.to_string()), "{why}");
    assert_eq!(
        restarted.fetch().await.unwrap().authorization(),
        "Bearer t2"
    );
}

/// An entry of another user is not taken (root can hand a file to another uid; elsewhere
/// the test has nothing to check).
#[tokio::test]
async fn an_entry_of_another_user_is_a_miss() {
    let (_outer, dir) = cache_dir();
    let inner = Counting::bearer();
    let fetch = cached(&dir, Arc::clone(&inner));
    let path = entry_path(&dir, &fetch);
    std::fs::write(&path, planted(&fetch, "planted", "Bearer", 600)).unwrap();
    if std::os::unix::fs::chown(&path, Some(4242), None).is_err() {
        return;
    }
    assert_eq!(fetch.fetch().await.unwrap().authorization(), "Bearer t1");
}

/// A missing directory is made, mode 0700; one that others may write in, or that belongs to
/// someone else, is refused with the reason.
#[test]
fn the_directory_is_made_or_checked() {
    let outer = tempfile::tempdir().unwrap();
    let dir = outer.path().join("made/tokens");
    let prepared = prepare(&file_settings(&dir, None)).unwrap();
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    let described = prepared.describe();
    assert!(described.contains("created, mode 0700"), "{described}");
    assert!(described.contains("in clear"), "{described}");

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let Err(error) = prepare(&file_settings(&dir, None)) else {
        panic!("a 0777 directory is refused")
    };
    let error = error.to_string();
    assert!(
        error.contains("tokens") && error.contains("writable by others") && error.contains("0777"),
        "{error}"
    );

    // Group-writable: only for bearerd's own group.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    prepare(&file_settings(&dir, None)).unwrap();
    if std::os::unix::fs::chown(&dir, None, Some(4242)).is_ok() {
        let Err(error) = prepare(&file_settings(&dir, None)) else {
            panic!("writable by a group not bearerd's")
        };
        assert!(error.to_string().contains("group 4242"), "{error}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&dir, Some(4242), None).unwrap();
        let Err(error) = prepare(&file_settings(&dir, None)) else {
            panic!("another user's directory")
        };
        assert!(error.to_string().contains("uid 4242"), "{error}");
    }
}

/// A key file others may read is said by `--check` (and warned of at start).
#[test]
fn a_loose_cache_key_file_is_warned_of() {
    let (outer, dir) = cache_dir();
    let key = outer.path().join("key");
    std::fs::write(
        &key,
        base64::engine::general_purpose::STANDARD.encode([9u8; 32]),
    )
    .unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let prepared = prepare(&file_settings(&dir, Some(&key))).unwrap();
    assert_eq!(prepared.loose_key_files(), [key]);
}

#[test]
fn a_redis_url_is_shown_without_credentials() {
    assert_eq!(
        redacted("redis://u:p@host:6379/0?x=1"),
        "redis://host:6379/0"
    );
    assert_eq!(redacted("rediss://host"), "rediss://host");
}

/// `[cache] key_file` is taken by the file backend too (issue 22); Redis's own keys are not.
#[test]
fn the_file_backend_takes_a_key_file() {
    let upstream = "[[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nurl = \"https://api.example.com\"\n[upstream.token]\nurl = \"https://auth.example.com/t\"\nclient_id = \"app\"\nclient_secret = \"s\"\n";
    let parse = |cache: &str| {
        crate::config::Config::parse(
            Path::new("/etc/bearerd/x.toml"),
            &format!("{upstream}[cache]\n{cache}"),
        )
    };
    let config = parse("backend = \"file\"\ndir = \"cache\"\nkey_file = \"key\"\n").unwrap();
    assert_eq!(
        config.cache,
        Some(config::Cache::File {
            dir: "/etc/bearerd/cache".into(),
            key_file: Some("/etc/bearerd/key".into()),
        })
    );
    let Err(error) = parse("backend = \"file\"\ndir = \"cache\"\nurl = \"redis://r/0\"\n") else {
        panic!("url with the file backend")
    };
    assert!(error.to_string().contains("cache.url"), "{error}");
}

/// The file backend's lock on spending a refresh token: one holder at a time, across
/// processes (two handles on the directory stand for two), let go when dropped; a link or a
/// FIFO planted at its name is refused, not followed or waited on.
#[tokio::test]
async fn the_refresh_lock_has_one_holder_and_refuses_what_is_planted() {
    let (_outer, dir) = cache_dir();
    let open = || file::FileStore::open(&dir).unwrap().0;
    let (first, second) = (open(), open());
    let held = first.lock("source").await.unwrap().expect("free");
    assert!(second.lock("source").await.unwrap().is_none(), "held");
    assert!(
        second.lock("other").await.unwrap().is_some(),
        "another source's lock is another"
    );
    drop(held);
    assert!(second.lock("source").await.unwrap().is_some(), "let go");
    let lock_file = dir.join("source.lock");
    assert_eq!(
        std::fs::metadata(&lock_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let target = dir.join("elsewhere");
    symlink(&target, dir.join("linked.lock")).unwrap();
    let refused = first.lock("linked").await.err().expect("a link is refused");
    assert!(matches!(refused, CacheError::Unreadable(_)), "{refused}");
    assert!(!target.exists(), "the link was not followed");

    let fifo = dir.join("fifo.lock");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let refused = first.lock("fifo").await.err().expect("a FIFO is refused");
    assert!(
        refused.to_string().contains("not a regular file"),
        "{refused}"
    );
}

/// A running source of a refresh token chain on the file backend spends nothing while
/// another process (`--fetch-token`) holds the lock, and fetches once it is let go.
#[tokio::test]
async fn a_refresh_token_is_not_spent_while_another_process_holds_the_lock() {
    let (outer, dir) = cache_dir();
    let file = outer.path().join("refresh_token");
    std::fs::write(&file, "rt-0").unwrap();
    let settings = TokenSettings {
        grant: config::Grant::RefreshToken(config::RefreshToken { file }),
        ..settings()
    };
    let inner = Counting::bearer();
    let fetch = CachedFetch::new(
        Arc::clone(&inner) as Arc<dyn Fetch>,
        store(&file_settings(&dir, None)),
        &settings,
        None,
        SharedObservers::default(),
        Some(Arc::new(RefreshChain::default())),
    );
    let other = file::FileStore::open(&dir).unwrap().0;
    let held = other.lock(&fetch.digest).await.unwrap().unwrap();
    let Err(refused) = fetch.fetch().await else {
        panic!("fetched while another process held the lock");
    };
    assert!(
        refused.to_string().contains("another process holds"),
        "{refused}"
    );
    assert_eq!(inner.count(), 0, "nothing spent");
    drop(held);
    assert_eq!(fetch.fetch().await.unwrap().authorization(), "Bearer t1");
    assert_eq!(inner.count(), 1);
}
