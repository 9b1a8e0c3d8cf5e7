//! The file backend: one file per token source in a directory, written atomically
//! (temporary file, fsync, rename; mode 0600), so that a container restarted in the same pod
//! finds its token (an `emptyDir` survives the restart).
//!
//! The directory is checked and opened once, at start, and every entry is opened relative to
//! that handle (`openat`), so that what the path names later does not matter. Nothing in the
//! directory is trusted: entries are opened without following a symbolic link and without
//! blocking (`O_NOFOLLOW|O_NONBLOCK`), taken only when they are regular files of bearerd's own
//! user, and read up to [`MAX_ENTRY_BYTES`]; temporary files get random names and are created
//! new (`O_EXCL|O_NOFOLLOW`, mode 0600), so that nothing planted under their name receives a
//! token. Only the directory's owner can plant files in it, and that is checked at start: the
//! directory must be bearerd's user's, and writable by nobody else.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use super::entry::MAX_ENTRY_BYTES;
use super::CacheError;

/// Token files in one directory, reached through a handle opened at start.
pub(crate) struct FileStore {
    /// For messages only: files are reached through `handle`.
    dir: PathBuf,
    handle: Arc<OwnedFd>,
    /// bearerd's effective user, which every entry must belong to.
    owner: u32,
}

/// Why `dir` cannot hold bearerd's tokens; said at start and by `--check`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DirError {
    /// It could not be created or opened.
    #[error("cannot be opened as a directory: {0}")]
    Open(std::io::Error),
    /// Someone else owns it: they could plant entries or read tokens.
    #[error("belongs to uid {found}, not to bearerd's user (uid {own}): give bearerd a directory of its own (a subdirectory it creates, mode 0700)")]
    Owner {
        /// The directory's owner.
        found: u32,
        /// bearerd's effective uid.
        own: u32,
    },
    /// Others may write in it: they could plant entries, or symbolic links.
    #[error("is writable by {who} (mode {mode:04o}): a file planted there would be read as a token; use a subdirectory that bearerd creates (mode 0700), or chmod go-w")]
    Writable {
        /// "others", or the group that may.
        who: String,
        /// Its permission bits.
        mode: u32,
    },
}

impl FileStore {
    /// Creates `dir` (mode 0700, and its missing parents) if it does not exist, checks that
    /// it is bearerd's own and writable by no one else (group-writable only for bearerd's
    /// own group), and holds it open. Also says whether it was created.
    pub(crate) fn open(dir: &Path) -> Result<(Self, bool), DirError> {
        let created = match std::fs::symlink_metadata(dir) {
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(DirError::Open)?;
                true
            }
            Err(e) => return Err(DirError::Open(e)),
        };
        // The configured path may itself be a link (the admin's choice); what it leads to is
        // checked, and from here on only the handle is used.
        let handle = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| DirError::Open(e.into()))?;
        let handle = std::fs::File::from(handle);
        let metadata = handle.metadata().map_err(DirError::Open)?;
        let own = rustix::process::geteuid().as_raw();
        let own_group = rustix::process::getegid().as_raw();
        if metadata.uid() != own {
            return Err(DirError::Owner {
                found: metadata.uid(),
                own,
            });
        }
        let mode = metadata.mode() & 0o7777;
        if mode & 0o002 != 0 {
            return Err(DirError::Writable {
                who: "others".into(),
                mode,
            });
        }
        if mode & 0o020 != 0 && metadata.gid() != own_group {
            return Err(DirError::Writable {
                who: format!(
                    "group {} (bearerd's own group is {own_group})",
                    metadata.gid()
                ),
                mode,
            });
        }
        Ok((
            Self {
                dir: dir.to_owned(),
                handle: Arc::new(OwnedFd::from(handle)),
                owner: own,
            },
            created,
        ))
    }

    /// `<digest>.json`: the digest is base64url, a safe file name.
    fn name(digest: &str) -> String {
        format!("{digest}.json")
    }

    /// The path of the entry of `digest`, for messages.
    pub(crate) fn shown_entry(&self, digest: &str) -> String {
        self.shown(&Self::name(digest))
    }

    /// The path of `name`, for messages.
    fn shown(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The stored entry's bytes (at most [`MAX_ENTRY_BYTES`] and one more, so that the caller
    /// sees a larger file as too large), if there is an entry. What cannot be an entry of
    /// bearerd's (a link, a FIFO, a device, another user's file) is `Unreadable`: the caller
    /// counts a miss, warns, and overwrites it with its new token.
    pub(crate) async fn get(&self, digest: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let name = Self::name(digest);
        let shown = self.shown(&name);
        let (handle, owner) = (Arc::clone(&self.handle), self.owner);
        blocking(move || read_entry(&handle, &name, owner))
            .await
            .map_err(|e| e.at(&shown))
    }

    /// Writes `bytes` in place of the source's file, atomically.
    pub(crate) async fn put(
        &self,
        digest: &str,
        bytes: zeroize::Zeroizing<Vec<u8>>,
    ) -> Result<(), CacheError> {
        let name = Self::name(digest);
        let dir = self.dir.clone();
        let handle = Arc::clone(&self.handle);
        blocking(move || write_atomically(&handle, &dir, &name, &bytes)).await
    }

    /// Removes the source's file (the caller has read it and found the token to delete).
    pub(crate) async fn delete(&self, digest: &str) -> Result<bool, CacheError> {
        let name = Self::name(digest);
        let shown = self.shown(&name);
        let handle = Arc::clone(&self.handle);
        blocking(
            move || match rustix::fs::unlinkat(&*handle, &name, AtFlags::empty()) {
                Ok(()) => Ok(true),
                Err(Errno::NOENT) => Ok(false),
                Err(e) => Err(CacheError::Store(format!("{shown}: {e}"))),
            },
        )
        .await
    }
}

/// The lock on spending a source's refresh token (`grant = "refresh_token"`), the file
/// backend's counterpart of Redis's fleet lease: an exclusive `flock` on `<digest>.lock`,
/// held while this value lives. The kernel lets it go with the process, so a crash leaves no
/// lock behind; it keeps a running bearerd and `bearerd --fetch-token` (or a second process
/// wrongly given the same directory) from spending one refresh token twice.
pub(crate) struct FileLock {
    /// Closing it releases the lock.
    _file: OwnedFd,
}

impl FileStore {
    /// Takes the lock of `digest` without waiting; `None` when another process holds it.
    pub(crate) async fn lock(&self, digest: &str) -> Result<Option<FileLock>, CacheError> {
        let name = format!("{digest}.lock");
        let shown = self.shown(&name);
        let (handle, owner) = (Arc::clone(&self.handle), self.owner);
        blocking(move || take_lock(&handle, &name, owner))
            .await
            .map_err(|e| e.at(&shown))
    }
}

/// Opens (or creates, mode 0600) the lock file as an entry is opened, never following a link
/// nor blocking on a FIFO, checks that it is a regular file of bearerd's user, and locks it.
fn take_lock(dir: &OwnedFd, name: &str, owner: u32) -> Result<Option<FileLock>, ReadError> {
    let flags = OFlags::RDWR
        | OFlags::CREATE
        | OFlags::NOFOLLOW
        | OFlags::NONBLOCK
        | OFlags::NOCTTY
        | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o600)) {
        Ok(fd) => fd,
        Err(e @ (Errno::LOOP | Errno::NXIO | Errno::ACCESS | Errno::PERM | Errno::ISDIR)) => {
            return Err(ReadError::Unreadable(format!(
                "cannot be opened as a lock file: {e}"
            )))
        }
        Err(e) => return Err(ReadError::Store(e.to_string())),
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| ReadError::Store(e.to_string()))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile
        || stat.st_uid != owner
    {
        return Err(ReadError::Unreadable(format!(
            "is not a regular file of bearerd's user (uid {owner})"
        )));
    }
    match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(FileLock { _file: fd })),
        Err(Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(ReadError::Store(e.to_string())),
    }
}

/// A failure to read an entry, before its path is known to the message.
enum ReadError {
    Store(String),
    Unreadable(String),
}

impl ReadError {
    fn at(self, path: &str) -> CacheError {
        match self {
            Self::Store(why) => CacheError::Store(format!("{path}: {why}")),
            Self::Unreadable(why) => CacheError::Unreadable(format!("{path}: {why}")),
        }
    }
}

/// Opens `name` in `dir` without following a link or blocking (a FIFO would otherwise wait
/// for a writer for ever), checks what it is, and reads it under the cap.
fn read_entry(dir: &OwnedFd, name: &str, owner: u32) -> Result<Option<Vec<u8>>, ReadError> {
    let unreadable = |why: String| Err(ReadError::Unreadable(why));
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let file = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => std::fs::File::from(fd),
        Err(Errno::NOENT) => return Ok(None),
        Err(Errno::LOOP) => return unreadable("is a symbolic link, not an entry".into()),
        // A socket (ENXIO), a file bearerd may not read: planted, not an outage. (A directory
        // opens, and is refused below as not a regular file.)
        Err(e @ (Errno::NXIO | Errno::ACCESS | Errno::PERM | Errno::ISDIR)) => {
            return unreadable(format!("cannot be opened as an entry: {e}"))
        }
        Err(e) => return Err(ReadError::Store(e.to_string())),
    };
    let metadata = file
        .metadata()
        .map_err(|e| ReadError::Store(e.to_string()))?;
    if !metadata.file_type().is_file() {
        return unreadable("is not a regular file (a FIFO, a device, a directory?)".into());
    }
    if metadata.uid() != owner {
        return unreadable(format!(
            "belongs to uid {}, not to bearerd's user (uid {owner})",
            metadata.uid()
        ));
    }
    let cap = u64::try_from(MAX_ENTRY_BYTES).unwrap_or(u64::MAX);
    if metadata.len() > cap {
        return unreadable(format!(
            "is {} bytes, more than the {MAX_ENTRY_BYTES} an entry holds",
            metadata.len()
        ));
    }
    let mut bytes = Vec::new();
    // One byte over the cap, so that a file that grew since the check is still told apart.
    file.take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| ReadError::Store(e.to_string()))?;
    Ok(Some(bytes))
}

/// A new temporary file of a random name beside the entry (created here, mode 0600, never
/// an existing file or link), fsync, rename over the entry, fsync the directory: a reader sees
/// the old file or the new one, never half of one, even across a crash. A link planted at the
/// entry's name is replaced, not followed.
fn write_atomically(
    dir: &OwnedFd,
    shown_dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<(), CacheError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        CacheError::Store(format!("{}: {e}", shown_dir.join(what).display()))
    };
    let random = crate::jose::random_id().map_err(|e| failed(name, &e))?;
    let temporary = format!(".{name}.{random}.tmp");
    let flags = OFlags::WRONLY
        | OFlags::CREATE
        | OFlags::EXCL
        | OFlags::NOFOLLOW
        | OFlags::NOCTTY
        | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, &temporary, flags, Mode::from_raw_mode(0o600))
        .map_err(|e| failed(&temporary, &e))?;
    let mut file = std::fs::File::from(fd);
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| failed(&temporary, &e))
        .and_then(|()| {
            rustix::fs::renameat(dir, &temporary, dir, name).map_err(|e| failed(name, &e))
        });
    if written.is_err() {
        let _ = rustix::fs::unlinkat(dir, &temporary, AtFlags::empty());
    }
    written?;
    // The rename is durable once the directory is.
    let _ = rustix::fs::fsync(dir);
    Ok(())
}

async fn blocking<T, E>(work: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<TaskFailed> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(E::from(TaskFailed(e.to_string()))))
}

/// The blocking task of a file operation did not finish (it panicked, or the runtime is
/// shutting down).
struct TaskFailed(String);

impl From<TaskFailed> for CacheError {
    fn from(e: TaskFailed) -> Self {
        Self::Store(format!("file cache task failed: {}", e.0))
    }
}

impl From<TaskFailed> for ReadError {
    fn from(e: TaskFailed) -> Self {
        Self::Store(format!("file cache task failed: {}", e.0))
    }
}
