//! A Python peer script of the interop tests (`grpc_peer.py`, `ws_peer.py`): started as a
//! server that reports its port, or run once as a client that prints one JSON line, with the
//! virtualenv's interpreter (`BEARERD_INTEROP_PYTHON`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

fn python() -> std::ffi::OsString {
    std::env::var_os("BEARERD_INTEROP_PYTHON")
        .expect("BEARERD_INTEROP_PYTHON is not set: run `make interop` (scripts/interop.sh)")
}

/// `script server TOKEN`, killed by its PID when dropped; it ends too when its stdin closes.
pub struct Server {
    child: Child,
    _stdin: ChildStdin,
    pub port: u16,
}

impl Server {
    pub fn start(script: &str, token: &str) -> Self {
        let mut child = Command::new(python())
            .args([script, "server", token])
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = support::lines_of(child.stdout.take().unwrap());
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{script} server did not report its port: {e}"));
        let port = line.strip_prefix("port ").unwrap().parse().unwrap();
        Self {
            child,
            _stdin: stdin,
            port,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `script` with `args` in a blocking thread and parses its JSON line.
pub async fn run(script: &'static str, args: Vec<String>) -> serde_json::Value {
    tokio::task::spawn_blocking(move || {
        let output = Command::new(python())
            .arg(script)
            .args(&args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{script} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    })
    .await
    .unwrap()
}
