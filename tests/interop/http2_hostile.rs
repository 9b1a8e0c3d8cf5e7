//! Hostile HTTP/2 peers against bearerd's h2c listener (`tests/interop/h2_hostile.py`, frames
//! from the h2 package's hyperframe): rapid reset, CONTINUATION flood, SETTINGS and PING
//! floods, and streams that never read their answers. Each must end or throttle that one
//! connection while the listener goes on serving others. Ignored by a plain `cargo test`:
//! `make interop` makes the virtualenv with h2.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::process::Command;

use http::StatusCode;
use support::{echo, serve, token_endpoint, token_ok, Sidecar};

const ATTACKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/h2_hostile.py");
#[derive(Debug, serde::Deserialize)]
struct Outcome {
    sent: u64,
    /// The most frames the attack would send (h2_hostile.py's LIMIT or FLOOD_LIMIT).
    limit: u64,
    /// A send waited seconds: bearerd stopped reading the connection.
    stalled: bool,
    goaway: Option<u32>,
    closed: bool,
}

async fn attack(kind: &'static str, addr: std::net::SocketAddr) -> Outcome {
    let python = std::env::var_os("BEARERD_INTEROP_PYTHON")
        .expect("BEARERD_INTEROP_PYTHON is not set: run `make interop`");
    tokio::task::spawn_blocking(move || {
        let output = Command::new(python)
            .args([
                ATTACKER,
                kind,
                &addr.ip().to_string(),
                &addr.port().to_string(),
                &addr.to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    })
    .await
    .unwrap()
}

/// Runs `kind` against a fresh bearerd while another app connection makes a request, then
/// makes one more: both must be answered.
async fn survives(kind: &'static str) -> Outcome {
    let upstream = serve(echo).await;
    let tokens = token_endpoint(|_, _| async { token_ok("tok", 3600) }).await;
    let sidecar = Sidecar::start(&support::config(
        "api",
        &upstream.url(""),
        &tokens.url("/oauth/token"),
        "client_id = \"app\"\nclient_secret = \"s3cret\"",
    ))
    .await;
    let addr = sidecar.running().local_addr("api").unwrap();
    let during = tokio::spawn(support::get_owned(sidecar.url("api", "/during")));
    let outcome = attack(kind, addr).await;
    assert_eq!(during.await.unwrap().status, StatusCode::OK, "{kind}");
    let after = support::get(&sidecar.url("api", "/after")).await;
    assert_eq!(after.status, StatusCode::OK, "{kind}: {outcome:?}");
    sidecar.stop().await;
    eprintln!("{kind}: {outcome:?}");
    outcome
}

/// GOAWAY's ENHANCE_YOUR_CALM (RFC 9113 §7).
const ENHANCE_YOUR_CALM: u32 = 0xb;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the h2 package: make interop"]
async fn rapid_reset_ends_the_connection() {
    let outcome = survives("rapid_reset").await;
    assert!(outcome.sent < outcome.limit, "{outcome:?}");
    assert!(
        outcome.goaway == Some(ENHANCE_YOUR_CALM) || outcome.closed,
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the h2 package: make interop"]
async fn a_continuation_flood_ends_at_the_header_list_limit() {
    let outcome = survives("continuation").await;
    // 64 KiB of header list (max_header_bytes) in 73-byte fragments is about 900 frames; the
    // connection ends soon after, not at the attacker's limit.
    assert!(outcome.sent < 10_000, "{outcome:?}");
    assert!(outcome.goaway.is_some() || outcome.closed, "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the h2 package: make interop"]
async fn settings_and_ping_floods_are_held_back_by_the_peer_not_read() {
    for kind in ["settings", "ping"] {
        let outcome = survives(kind).await;
        // bearerd stops reading a peer that does not read its answers: the flood stalls in
        // the socket buffers (a few MiB), long before the attacker's 150 MB are out.
        assert!(outcome.stalled || outcome.closed, "{kind}: {outcome:?}");
        assert!(outcome.sent < outcome.limit, "{kind}: {outcome:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the h2 package: make interop"]
async fn streams_that_never_read_their_answers_do_not_stop_the_listener() {
    let outcome = survives("no_read").await;
    assert!(outcome.sent <= 200, "{outcome:?}");
}
