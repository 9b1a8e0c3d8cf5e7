//! A `bearerd` binary run as a child process, with its log captured.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_bearerd");
/// Bound on waits for the child process, so a broken build fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running `bearerd` child, killed by its PID if the test ends early.
pub struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line logged so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn start(config_path: &str) -> Self {
        Self::start_with(config_path, &[("RUST_LOG", "info")])
    }

    /// Starts bearerd with extra environment variables.
    pub fn start_with(config_path: &str, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .args(["--config", config_path])
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Self { child, lines, log }
    }

    /// The address bearerd logged for `upstream` ("listening ... listen=ADDR"), or for its
    /// admin listener when `upstream` is `admin`.
    pub fn listen_addr(&self, upstream: &str) -> SocketAddr {
        let deadline = Instant::now() + PATIENCE;
        loop {
            // Search everything logged so far: the lines may come in any order.
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find_map(|line| listening_addr(line, upstream));
            if let Some(addr) = found {
                return addr;
            }
            // Wait for the next line.
            if self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_err()
            {
                panic!(
                    "no listening line for {upstream}; log: {:?}",
                    self.log.lock().unwrap()
                );
            }
        }
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Peak resident memory (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "bearerd did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The address in a "listening" log line for `upstream` (or "admin listening" for `admin`),
/// in the text or the JSON format.
fn listening_addr(line: &str, upstream: &str) -> Option<SocketAddr> {
    let wanted_message = if upstream == "admin" {
        "admin listening"
    } else {
        "listening"
    };
    if line.starts_with('{') {
        let event: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = &event["fields"];
        let matches = fields["message"] == wanted_message
            && (upstream == "admin" || fields["upstream"] == upstream);
        return if matches {
            fields["listen"].as_str()?.parse().ok()
        } else {
            None
        };
    }
    let matches = line.contains(&format!(" {wanted_message} "))
        && (upstream == "admin" || line.contains(&format!("upstream={upstream} ")));
    if !matches {
        return None;
    }
    line.split("listen=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
