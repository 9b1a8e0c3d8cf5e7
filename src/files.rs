//! The one reader of credential files (client secrets, assertions, private keys, certificates,
//! CA bundles): bounded in what it opens, in how much it reads, and, on the request path, in
//! how long a caller waits.
//!
//! A credential file is whatever the path names when it is read: a FIFO, a device such as
//! `/dev/zero`, a huge file, or a file on a network or FUSE mount that stops answering. So a
//! read here
//! - opens with `O_NONBLOCK` (a FIFO without a writer does not block the open) and `O_NOCTTY`,
//!   after a `stat` that already refuses anything but a regular file, so that a device is
//!   never opened at all; symlinks are followed (a Kubernetes Secret's file is a symlink into
//!   `..data`) and the target is what is checked, again with `fstat` on what was opened;
//! - refuses a file over its cap ([`Content::cap`]) and reads at most cap + 1 bytes, so that
//!   a file that grows, or reports no size (`/proc`), cannot make it allocate more;
//! - on the request path ([`read`]), runs on tokio's blocking pool under the caller's
//!   deadline (the token `timeout`), with at most one read per file in flight: a read that
//!   hangs in the kernel is not started again, later callers wait on the same one, and the
//!   runtime's only thread never waits for a file. At start and for `--check`,
//!   [`read_sync`] does the same checks on the calling thread.
//!
//! This module is a leaf: `secret`, `tls` and `token` read through it; it knows none of them.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use zeroize::Zeroizing;

/// Cap of a secret, token, assertion or key file. Such files are bytes to a few KiB (an RSA
/// 4096-bit key in PEM is about 3.3 KiB); a larger one is a mistake or an attack.
pub(crate) const CREDENTIAL_CAP: u64 = 64 * 1024;
/// Cap of a certificate chain or CA bundle. The Mozilla bundle in PEM is about 220 KiB.
pub(crate) const CERTIFICATE_CAP: u64 = 1024 * 1024;

/// What a file holds: it sets the file's size cap and how messages name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Content {
    /// A client secret.
    Secret,
    /// A client assertion (a JWT) or a token.
    Assertion,
    /// A PEM private key.
    Key,
    /// A PEM certificate or certificate chain.
    Certificate,
    /// A PEM bundle of trust anchors (`ca_file`).
    CaBundle,
    /// A subject, actor or refresh token.
    Token,
    /// A Google service-account JSON key.
    ServiceAccount,
}

impl Content {
    /// The largest file of this kind that is read.
    pub(crate) fn cap(self) -> u64 {
        match self {
            Self::Secret | Self::Assertion | Self::Key | Self::Token | Self::ServiceAccount => {
                CREDENTIAL_CAP
            }
            Self::Certificate | Self::CaBundle => CERTIFICATE_CAP,
        }
    }

    /// How messages name a file of this kind.
    fn what(self) -> &'static str {
        match self {
            Self::Secret => "client secret file",
            Self::Assertion => "assertion file",
            Self::Key => "key file",
            Self::Certificate => "certificate file",
            Self::CaBundle => "ca_file",
            Self::Token => "token file",
            Self::ServiceAccount => "service-account key file",
        }
    }
}

/// What a file held; wiped when dropped, since most of these files hold credentials.
pub(crate) type Contents = Zeroizing<Vec<u8>>;

/// A size in the unit a person would write it in: `64 KiB`, `1 MiB`.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * 1024;
        match self.0 {
            n if n >= MIB && n % MIB == 0 => write!(f, "{} MiB", n / MIB),
            n if n >= KIB && n % KIB == 0 => write!(f, "{} KiB", n / KIB),
            n => write!(f, "{n} bytes"),
        }
    }
}

/// A credential file that was not read. Each variant names the file, and those about what the
/// file is name the limit; none holds any of the file's content.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FileError {
    /// The file is missing, unreadable, or the read failed.
    #[error("cannot read {what} {}: {source}", path.display())]
    Io {
        /// How the file is named in messages (`secret file`, `ca_file`, ...).
        what: &'static str,
        /// The configured path.
        path: PathBuf,
        /// The system's reason (shared: one failed read may answer several callers).
        source: Arc<std::io::Error>,
    },
    /// A FIFO, a device, a directory or a socket: never read, so that it cannot block or
    /// stream without end.
    #[error("{what} {} is {kind}, not a regular file: it must be a regular file of at most {}", path.display(), Size(*cap))]
    NotRegular {
        /// How the file is named in messages.
        what: &'static str,
        /// The configured path.
        path: PathBuf,
        /// What it is instead (`a FIFO`, `a character device`, ...).
        kind: &'static str,
        /// The cap of its kind.
        cap: u64,
    },
    /// Larger than the cap of its kind.
    #[error("{what} {} is larger than its limit of {}", path.display(), Size(*cap))]
    TooLarge {
        /// How the file is named in messages.
        what: &'static str,
        /// The configured path.
        path: PathBuf,
        /// The cap of its kind.
        cap: u64,
    },
    /// A file that must be text is not UTF-8.
    #[error("{what} {} is not UTF-8 text", path.display())]
    NotText {
        /// How the file is named in messages.
        what: &'static str,
        /// The configured path.
        path: PathBuf,
    },
    /// A read started earlier has not ended by the caller's deadline: the file system does not
    /// answer. The read is not started again while it hangs.
    #[error("still reading {what} {} since {:.1}s: its file system does not answer (a stalled network or FUSE mount?); bearerd starts no other read of it until this one ends", path.display(), since.as_secs_f64())]
    Stuck {
        /// How the file is named in messages.
        what: &'static str,
        /// The configured path.
        path: PathBuf,
        /// How long the read has been going.
        since: Duration,
    },
    /// The read on the blocking pool ended without an outcome (the runtime is shutting down).
    #[error("reading {what} {} did not finish: {reason}", path.display())]
    Abandoned {
        /// How the file is named in messages.
        what: &'static str,
        /// The configured path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Reads the file at `path` on the calling thread: for start, `--check`, and rustls's
/// certificate callback. It cannot block on a FIFO or stream a device; only a file system that
/// stops answering can hold it.
pub(crate) fn read_sync(path: &Path, content: Content) -> Result<Contents, FileError> {
    let io = |source: std::io::Error| FileError::Io {
        what: content.what(),
        path: path.to_owned(),
        source: Arc::new(source),
    };
    // Checked before the open, so that a device is never opened (opening some has effects),
    // and again on what was opened, in case the path was swapped in between.
    check(path, content, &std::fs::metadata(path).map_err(io)?)?;
    let file = open(path).map_err(io)?;
    let metadata = file.metadata().map_err(io)?;
    check(path, content, &metadata)?;
    let cap = content.cap();
    // Room for the whole file and the byte that tells it is not over, so that the buffer is
    // not grown (a grown buffer leaves an unwiped copy behind) unless the file grew.
    let room = usize::try_from(metadata.len().min(cap).saturating_add(1)).unwrap_or(0);
    let mut contents = Zeroizing::new(Vec::with_capacity(room));
    file.take(cap.saturating_add(1))
        .read_to_end(&mut contents)
        .map_err(io)?;
    if contents.len() as u64 > cap {
        return Err(too_large(path, content));
    }
    Ok(contents)
}

/// Opens for reading without blocking on a FIFO and without taking a terminal as the
/// controlling one.
fn open(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    options.open(path)
}

/// A regular file within the cap of `content`, or the error that says why not.
fn check(path: &Path, content: Content, metadata: &Metadata) -> Result<(), FileError> {
    let file_type = metadata.file_type();
    if !file_type.is_file() {
        return Err(FileError::NotRegular {
            what: content.what(),
            path: path.to_owned(),
            kind: kind_of(&file_type),
            cap: content.cap(),
        });
    }
    if metadata.len() > content.cap() {
        return Err(too_large(path, content));
    }
    Ok(())
}

fn too_large(path: &Path, content: Content) -> FileError {
    FileError::TooLarge {
        what: content.what(),
        path: path.to_owned(),
        cap: content.cap(),
    }
}

/// What a file that is not a regular one is, for messages.
fn kind_of(file_type: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else {
        "something else"
    }
}

/// The contents as text, for files that must be UTF-8 (a secret, an assertion).
pub(crate) fn text<'a>(
    contents: &'a [u8],
    path: &Path,
    content: Content,
) -> Result<&'a str, FileError> {
    std::str::from_utf8(contents).map_err(|_| FileError::NotText {
        what: content.what(),
        path: path.to_owned(),
    })
}

/// What one read ends with; shared by every caller that waited on it.
type Outcome = Option<Result<Arc<Contents>, FileError>>;

/// A read in flight.
struct InFlight {
    started: Instant,
    outcome: watch::Receiver<Outcome>,
}

/// The reads in flight, one per file (and kind), process-wide: two token sources that share a
/// secret file share its read.
type Reads = Mutex<HashMap<(PathBuf, Content), InFlight>>;

fn in_flight() -> &'static Reads {
    static READS: OnceLock<Reads> = OnceLock::new();
    READS.get_or_init(Reads::default)
}

/// Reads the file at `path` off the runtime's thread, waiting until `deadline` at most: for
/// the request path (each token request reads its credentials again, so that a rotated
/// Secret is used).
///
/// If a read of the file is already in flight, this waits on that one rather than starting
/// another; a read that hangs therefore holds one blocking thread, however often it is asked
/// for, and callers get [`FileError::Stuck`] at their deadline. The process does not wait for
/// it at exit (`main` drops the runtime with `shutdown_background`).
pub(crate) async fn read(
    path: &Path,
    content: Content,
    deadline: tokio::time::Instant,
) -> Result<Arc<Contents>, FileError> {
    let owned = path.to_owned();
    read_with(path, content, deadline, move || read_sync(&owned, content)).await
}

/// [`read`] with the blocking work given, so that tests can make one that hangs.
async fn read_with(
    path: &Path,
    content: Content,
    deadline: tokio::time::Instant,
    work: impl FnOnce() -> Result<Contents, FileError> + Send + 'static,
) -> Result<Arc<Contents>, FileError> {
    let (started, mut outcome) = join_or_start(path, content, work);
    let waited = tokio::time::timeout_at(deadline, async {
        match outcome.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            Err(_) => None,
        }
    })
    .await;
    match waited {
        Ok(Some(outcome)) => outcome,
        Ok(None) => Err(FileError::Abandoned {
            what: content.what(),
            path: path.to_owned(),
            reason: "the read ended without an outcome (is bearerd shutting down?)".into(),
        }),
        Err(_elapsed) => Err(FileError::Stuck {
            what: content.what(),
            path: path.to_owned(),
            since: started.elapsed(),
        }),
    }
}

/// The read of `path` in flight, started now with `work` if there is none.
fn join_or_start(
    path: &Path,
    content: Content,
    work: impl FnOnce() -> Result<Contents, FileError> + Send + 'static,
) -> (Instant, watch::Receiver<Outcome>) {
    let key = (path.to_owned(), content);
    let mut reads = in_flight().lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(read) = reads.get(&key) {
        return (read.started, read.outcome.clone());
    }
    let started = Instant::now();
    let (tx, outcome) = watch::channel(None);
    reads.insert(
        key.clone(),
        InFlight {
            started,
            outcome: outcome.clone(),
        },
    );
    drop(reads);
    // The entry goes when the read ends, however it ends (a panic included), and before its
    // outcome is sent, so that a caller that comes after the outcome reads the file afresh
    // rather than getting an old outcome.
    let mut done = Done(Some(key));
    // The handle is not kept: nothing waits for the thread itself, only for its outcome.
    drop(tokio::task::spawn_blocking(move || {
        let outcome = work().map(Arc::new);
        done.finish();
        tx.send_replace(Some(outcome));
    }));
    (started, outcome)
}

/// Removes a read's entry from [`in_flight`] when dropped.
struct Done(Option<(PathBuf, Content)>);

impl Done {
    /// Removes the entry, once: a later entry for the same file is another read's.
    fn finish(&mut self) {
        if let Some(key) = self.0.take() {
            in_flight()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&key);
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests;
