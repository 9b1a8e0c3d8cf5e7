//! Raw-socket fixtures for hostile-input tests: an app client that writes exactly the bytes
//! given and reads every byte back, and an upstream that records every byte it receives.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::daemon::PATIENCE;

/// Writes `request` to `addr` as it is, then reads until the peer closes (bounded by
/// [`PATIENCE`]). Returns everything read, as text.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_to_close(&mut stream).await
}

/// Everything the peer sends until it closes, bounded by [`PATIENCE`]. A reset counts as a
/// close.
pub async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the peer did not close within {PATIENCE:?}");
    String::from_utf8_lossy(&received).into_owned()
}

/// The status code of a raw HTTP/1.1 answer.
pub fn status_of(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 answer: {answer:?}"))
}

/// An upstream that records every byte each connection sends, and answers `200 ok` (closing
/// the connection) once a request has arrived whole: its head, and as many body bytes as its
/// `content-length` says.
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&received);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let mut buffer = [0u8; 4096];
                    let mut head = Vec::new();
                    loop {
                        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
                            .await
                        {
                            Ok(Ok(n)) if n > 0 => {
                                record.lock().unwrap().extend_from_slice(&buffer[..n]);
                                head.extend_from_slice(&buffer[..n]);
                                if is_whole(&head) {
                                    let _ = stream
                                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                                        .await;
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                });
            }
        });
        Self {
            addr,
            received,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every byte received so far, from all connections, as text.
    pub fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }
}

/// Whether `request` holds a whole head and the body its `content-length` announces.
fn is_whole(request: &[u8]) -> bool {
    let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    request.len() >= end + 4 + length
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
