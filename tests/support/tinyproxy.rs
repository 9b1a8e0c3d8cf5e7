//! A real HTTP proxy for the `[egress]` tests: Debian's `tinyproxy` (or the binary named by
//! `BEARERD_TEST_TINYPROXY`), run in the foreground on a loopback port of its own with a
//! config written to a temporary directory, and its log read back to see which tunnels it
//! was asked for.
//!
//! tinyproxy will not listen on port 0, so a free port is found by binding 127.0.0.1:0 and
//! closing the socket; if another process takes it before tinyproxy binds, tinyproxy exits
//! and another port is tried. A missing binary fails the test with a message saying how to
//! install it: `make test` does, through scripts/install-test-deps.sh.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::daemon::PATIENCE;
use super::redis::free_port;

/// Ports tried before giving up.
const PORT_ATTEMPTS: usize = 5;

/// The tinyproxy binary: `BEARERD_TEST_TINYPROXY`, or `tinyproxy` on `PATH` or in
/// `/usr/bin` (Debian installs it there, and some `PATH`s lack `/usr/sbin`-style dirs).
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BEARERD_TEST_TINYPROXY") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("tinyproxy"))
            .find(|candidate| candidate.is_file())
    });
    on_path
        .or_else(|| {
            ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "tinyproxy is not installed, and tests/spawned/egress.rs needs a real proxy: run \
                 `bash scripts/install-test-deps.sh` (which `make test` runs; it installs \
                 Debian's tinyproxy package), or set BEARERD_TEST_TINYPROXY to a tinyproxy binary"
            )
        })
}

/// What the proxy allows.
#[derive(Default)]
pub struct Settings {
    /// `ConnectPort` lines: the only ports `CONNECT` may reach (none: every port).
    pub connect_ports: Vec<u16>,
    /// `BasicAuth user password`.
    pub basic_auth: Option<(String, String)>,
}

/// A running tinyproxy, killed by its PID when dropped.
pub struct Tinyproxy {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Tinyproxy {
    pub fn start(settings: &Settings) -> Self {
        let binary = binary();
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            match launch(&binary, dir, port, settings) {
                Ok(proxy) => return proxy,
                Err(why) => last = why,
            }
        }
        panic!("tinyproxy did not start in {PORT_ATTEMPTS} attempts: {last}");
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default()
    }

    /// The requests it logged (`CONNECT 127.0.0.1:443 HTTP/1.1`), in order.
    pub fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|line| {
                line.split_once("): ")
                    .filter(|_| line.contains("Request ("))
            })
            .map(|(_, request)| request.to_owned())
            .collect()
    }

    /// Waits until its log holds a request containing `needle` (tinyproxy writes each line as
    /// it happens), failing the test after [`PATIENCE`].
    pub fn wait_for_request(&self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.requests().iter().any(|r| r.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "tinyproxy logged no request with {needle:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn launch(
    binary: &PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    settings: &Settings,
) -> Result<Tinyproxy, String> {
    let log = dir.path().join("tinyproxy.log");
    let mut config = format!(
        "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 50\nLogFile \"{}\"\nLogLevel Connect\nAllow 127.0.0.1\nDisableViaHeader Yes\n",
        log.display()
    );
    for port in &settings.connect_ports {
        config.push_str(&format!("ConnectPort {port}\n"));
    }
    if let Some((user, password)) = &settings.basic_auth {
        config.push_str(&format!("BasicAuth {user} {password}\n"));
    }
    let path = dir.path().join("tinyproxy.conf");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(binary)
        .arg("-d")
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    let deadline = Instant::now() + PATIENCE;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!(
                "tinyproxy on port {port} exited ({status}); its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        // A connection it accepts is only logged as "Connect", never as a request.
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(Tinyproxy { port, child, dir });
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "tinyproxy on port {port} did not listen within {PATIENCE:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
