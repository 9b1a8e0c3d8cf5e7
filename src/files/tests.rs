//! The reader's refusals, each naming the file and, for what a file is, the limit; and the
//! one-read-per-file rule on the request path.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(30)
}

#[test]
fn a_regular_file_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, "s3cr3t\n").unwrap();
    assert_eq!(&read_sync(&path, Content::Secret).unwrap()[..], b"s3cr3t\n");
}

#[test]
fn a_fifo_is_refused_without_waiting_for_a_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    mkfifo(&path);
    let message = read_sync(&path, Content::Secret).unwrap_err().to_string();
    assert!(
        message.contains("is a FIFO, not a regular file"),
        "{message}"
    );
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("at most 64 KiB"), "{message}");
}

#[test]
fn a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let message = read_sync(dir.path(), Content::Key).unwrap_err().to_string();
    assert!(message.contains("key file"), "{message}");
    assert!(message.contains("is a directory"), "{message}");
}

#[test]
fn a_device_is_refused_even_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("assertion");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    let message = read_sync(&link, Content::Assertion)
        .unwrap_err()
        .to_string();
    assert!(message.contains("is a character device"), "{message}");
    assert!(message.contains("at most 64 KiB"), "{message}");
    assert!(message.contains("assertion"), "{message}");
}

#[test]
fn a_kubernetes_secret_symlink_into_data_is_followed() {
    // The kubelet's layout: `secret -> ..data/secret`, `..data -> ..2024_01_01_00_00_00.1`.
    let dir = tempfile::tempdir().unwrap();
    let version = dir.path().join("..2024_01_01_00_00_00.1");
    std::fs::create_dir(&version).unwrap();
    std::fs::write(version.join("secret"), "rotated").unwrap();
    std::os::unix::fs::symlink("..2024_01_01_00_00_00.1", dir.path().join("..data")).unwrap();
    let file = dir.path().join("secret");
    std::os::unix::fs::symlink("..data/secret", &file).unwrap();
    assert_eq!(&read_sync(&file, Content::Secret).unwrap()[..], b"rotated");
}

#[test]
fn the_cap_is_read_and_one_byte_more_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key.pem");
    let cap = usize::try_from(CREDENTIAL_CAP).unwrap();
    std::fs::write(&path, vec![b'k'; cap]).unwrap();
    assert_eq!(read_sync(&path, Content::Key).unwrap().len(), cap);
    std::fs::write(&path, vec![b'k'; cap + 1]).unwrap();
    let message = read_sync(&path, Content::Key).unwrap_err().to_string();
    assert!(
        message.contains("is larger than its limit of 64 KiB"),
        "{message}"
    );

    // Certificates get more room.
    let bundle = dir.path().join("ca.pem");
    std::fs::write(&bundle, vec![b'c'; cap + 1]).unwrap();
    assert!(read_sync(&bundle, Content::CaBundle).is_ok());
    let file = std::fs::File::create(&bundle).unwrap();
    file.set_len(CERTIFICATE_CAP + 1).unwrap();
    let message = read_sync(&bundle, Content::CaBundle)
        .unwrap_err()
        .to_string();
    assert!(message.contains("ca_file"), "{message}");
    assert!(message.contains("limit of 1 MiB"), "{message}");
}

#[test]
fn a_missing_file_is_named() {
    let message = read_sync(Path::new("/nonexistent/bearerd/secret"), Content::Secret)
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("cannot read client secret file /nonexistent/bearerd/secret: "),
        "{message}"
    );
}

#[test]
fn text_must_be_utf8() {
    let path = Path::new("/x/secret");
    assert_eq!(text(b"ok", path, Content::Secret).unwrap(), "ok");
    let message = text(&[0xff, 0xfe], path, Content::Secret)
        .unwrap_err()
        .to_string();
    assert_eq!(message, "client secret file /x/secret is not UTF-8 text");
}

#[tokio::test]
async fn the_async_read_refuses_a_fifo_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("assertion");
    mkfifo(&path);
    let error = read(&path, Content::Assertion, far()).await.unwrap_err();
    assert!(
        matches!(error, FileError::NotRegular { kind: "a FIFO", .. }),
        "{error}"
    );
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, "a.b.c").unwrap();
    let contents = read(&path, Content::Assertion, far()).await.unwrap();
    assert_eq!(&contents[..], b"a.b.c");
}

#[tokio::test]
async fn a_hanging_read_is_waited_on_not_started_again() {
    let path = Path::new("/bearerd-test/hanging");
    let started = Arc::new(AtomicUsize::new(0));
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Arc::new(Mutex::new(released));
    // A read that hangs until released, as one on a stalled mount would.
    let hanging = || {
        let started = Arc::clone(&started);
        let released = Arc::clone(&released);
        move || {
            started.fetch_add(1, Ordering::SeqCst);
            let _ = released.lock().unwrap().recv();
            Ok(Zeroizing::new(b"late".to_vec()))
        }
    };
    let soon = || tokio::time::Instant::now() + Duration::from_millis(100);

    let first = read_with(path, Content::Secret, soon(), hanging()).await;
    let message = first.unwrap_err().to_string();
    assert!(
        message.starts_with("still reading client secret file /bearerd-test/hanging since "),
        "{message}"
    );
    let second = read_with(path, Content::Secret, soon(), hanging()).await;
    assert!(
        matches!(second, Err(FileError::Stuck { since, .. }) if since >= Duration::from_millis(100))
    );
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "the read was started again"
    );

    // Once it ends, a caller still waiting gets its outcome, and the next read is a new one.
    let waiting = read_with(path, Content::Secret, far(), hanging());
    let (outcome, ()) = tokio::join!(waiting, async {
        release.send(()).unwrap();
    });
    assert_eq!(&outcome.unwrap()[..], b"late");
    assert_eq!(started.load(Ordering::SeqCst), 1);
    // The entry went before the outcome was sent.
    assert!(!in_flight()
        .lock()
        .unwrap()
        .contains_key(&(path.to_owned(), Content::Secret)));
    release.send(()).unwrap();
    let again = read_with(path, Content::Secret, far(), hanging()).await;
    assert_eq!(&again.unwrap()[..], b"late");
    assert_eq!(started.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn under_one_deadline_the_reader_says_which_file_before_the_outer_timeout_fires() {
    // A token request bounds its file reads and its exchange by one deadline; the reader's
    // error, which names the file, must be the one that comes out (tokio's `Timeout` polls
    // its future before its own timer).
    let path = Path::new("/bearerd-test/one-deadline");
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
    let hanging = move || {
        let _ = released.lock().unwrap().recv();
        Ok(Zeroizing::new(Vec::new()))
    };
    let outer = tokio::time::timeout_at(
        deadline,
        read_with(path, Content::Assertion, deadline, hanging),
    )
    .await;
    assert!(
        matches!(outer, Ok(Err(FileError::Stuck { .. }))),
        "{outer:?}"
    );
    drop(release);
}
