//! The file backend: one file per token source in a directory, written atomically
//! (temporary file, fsync, rename; mode 0600), so that a container restarted in the same pod
//! finds its token (an `emptyDir` survives the restart).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::entry::Entry;
use super::CacheError;

/// Token files in `dir`.
pub(crate) struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// `<digest>.json`: the digest is base64url, a safe file name.
    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.json"))
    }

    /// The stored entry, if the file is there; a file that is not an entry is an error (the
    /// caller counts a miss and warns).
    pub(crate) async fn get(&self, digest: &str) -> Result<Option<Entry>, CacheError> {
        let path = self.path(digest);
        blocking(move || match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                // Where, not what: serde's message may quote a value of the file, a token.
                CacheError::Unreadable(format!(
                    "{}: not a token entry ({:?} error at line {} column {})",
                    path.display(),
                    e.classify(),
                    e.line(),
                    e.column()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::Store(format!("{}: {e}", path.display()))),
        })
        .await
    }

    /// Writes `entry` in place of the source's file, atomically.
    pub(crate) async fn put(&self, digest: &str, entry: &Entry) -> Result<(), CacheError> {
        let bytes = zeroize::Zeroizing::new(
            serde_json::to_vec(entry).map_err(|e| CacheError::Store(e.to_string()))?,
        );
        let (dir, path) = (self.dir.clone(), self.path(digest));
        blocking(move || write_atomically(&dir, &path, &bytes)).await
    }

    /// Removes the source's file if it still holds the token `token_hash`.
    pub(crate) async fn delete_if(
        &self,
        digest: &str,
        token_hash: &str,
    ) -> Result<bool, CacheError> {
        if !self
            .get(digest)
            .await?
            .is_some_and(|entry| entry.token_hash() == token_hash)
        {
            return Ok(false);
        }
        let path = self.path(digest);
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CacheError::Store(format!("{}: {e}", path.display()))),
        })
        .await
    }
}

/// Temporary file beside the target, fsync, rename over the target, fsync the directory: a
/// reader sees the old file or the new one, never half of one, even across a crash.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let failed =
        |what: &Path, e: std::io::Error| CacheError::Store(format!("{}: {e}", what.display()));
    std::fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
    let temporary = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("token"),
        std::process::id()
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&temporary)
        .map_err(|e| failed(&temporary, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| failed(&temporary, e))?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(|e| failed(path, e))?;
    // The rename is durable once the directory is.
    if let Ok(directory) = std::fs::File::open(dir) {
        let _ = directory.sync_all();
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(CacheError::Store(format!("file cache task failed: {e}"))))
}
