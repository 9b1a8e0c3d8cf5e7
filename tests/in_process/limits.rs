//! Limits against misbehaving app clients, spoken to over raw TCP: slow request heads, idle
//! kept-alive connections, oversized heads, too many connections, and the shutdown grace.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::time::Duration;

use support::{echo, serve, token_endpoint, token_ok, Sidecar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on any wait here, so a broken limit fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(10);

async fn sidecar_with(server: &str) -> (Sidecar, support::TokenEndpoint, support::Server) {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let upstream = serve(echo).await;
    let config = format!(
        "[server]\n{server}\n{}",
        support::config(
            "api",
            &upstream.url(""),
            &endpoint.url("/token"),
            "client_id = \"app\"\nclient_secret = \"pw\"\n"
        )
    );
    (Sidecar::start(&config).await, endpoint, upstream)
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("the server did not close the connection")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Reads one response head and its `content-length` body from a kept-alive connection.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed early: {:?}",
            String::from_utf8_lossy(&buffer)
        );
        buffer.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buffer).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buffer.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n";

#[tokio::test]
async fn slow_request_head_is_cut_off() {
    let (sidecar, _endpoint, _upstream) =
        sidecar_with("header_read_timeout = \"200ms\"\nidle_timeout = \"30s\"").await;
    let mut stream = TcpStream::connect(sidecar.running().local_addr("api").unwrap())
        .await
        .unwrap();
    // Half a head, then nothing: the slowloris pattern.
    stream
        .write_all(b"GET /x HTTP/1.1\r\nHost: app\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut stream).await;
    assert_eq!(answer, "", "closed without an answer");
    sidecar.stop().await;
}

#[tokio::test]
async fn idle_kept_alive_connection_is_closed_after_idle_timeout_not_header_timeout() {
    let (sidecar, _endpoint, _upstream) =
        sidecar_with("header_read_timeout = \"100ms\"\nidle_timeout = \"800ms\"").await;
    let mut stream = TcpStream::connect(sidecar.running().local_addr("api").unwrap())
        .await
        .unwrap();
    stream.write_all(GET).await.unwrap();
    assert!(read_response(&mut stream)
        .await
        .starts_with("HTTP/1.1 200 OK"));
    // Idle for longer than the header timeout: still open, so the next request works.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(GET).await.unwrap();
    assert!(read_response(&mut stream)
        .await
        .starts_with("HTTP/1.1 200 OK"));
    // Then idle past the idle timeout: closed.
    let started = std::time::Instant::now();
    assert_eq!(read_to_close(&mut stream).await, "");
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn oversized_head_gets_431() {
    let (sidecar, _endpoint, _upstream) = sidecar_with("max_header_bytes = 8192").await;
    let mut stream = TcpStream::connect(sidecar.running().local_addr("api").unwrap())
        .await
        .unwrap();
    let big = format!(
        "GET /x HTTP/1.1\r\nHost: app\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    // The server may close before reading it all; what it answered is what counts.
    let _ = stream.write_all(big.as_bytes()).await;
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");
    sidecar.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_get_503_and_are_closed() {
    let (sidecar, _endpoint, _upstream) = sidecar_with("max_connections = 2").await;
    let addr = sidecar.running().local_addr("api").unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // A full exchange proves the connection holds a slot before the next connects.
        stream.write_all(GET).await.unwrap();
        assert!(read_response(&mut stream)
            .await
            .starts_with("HTTP/1.1 200 OK"));
        held.push(stream);
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    let answer = read_to_close(&mut third).await;
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{answer}"
    );
    assert!(
        answer.contains("\"error\":\"too_many_connections\""),
        "{answer}"
    );

    // A slot freed is a slot given again.
    drop(held.pop());
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let mut again = TcpStream::connect(addr).await.unwrap();
        again.write_all(GET).await.unwrap();
        let mut first = [0u8; 12];
        tokio::time::timeout(PATIENCE, again.read_exact(&mut first))
            .await
            .unwrap()
            .unwrap();
        if &first == b"HTTP/1.1 200" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot never freed");
        tokio::task::yield_now().await;
    }
    sidecar.stop().await;
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let endpoint = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    // An upstream that never answers: only the grace period ends the drain.
    let upstream = serve(|_| std::future::pending()).await;
    let config = format!(
        "[server]\nshutdown_grace = \"300ms\"\n{}",
        support::config(
            "api",
            &upstream.url(""),
            &endpoint.url("/token"),
            "client_id = \"app\"\nclient_secret = \"pw\"\n"
        )
    );
    let mut sidecar = Sidecar::start(&config).await;
    let addr = sidecar.running().local_addr("api").unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(GET).await.unwrap();
    // The request is in flight once the gauge says so.
    let in_flight = r#"bearerd_requests_in_flight{upstream="api"} 1"#;
    let deadline = std::time::Instant::now() + PATIENCE;
    while !sidecar
        .running()
        .metrics()
        .render()
        .unwrap()
        .contains(in_flight)
    {
        assert!(std::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    let running = sidecar.running.take().unwrap();
    tokio::time::timeout(PATIENCE, running.shutdown())
        .await
        .expect("shutdown waited past its grace period");
    assert_eq!(read_to_close(&mut stream).await, "");
}
