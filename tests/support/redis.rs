//! A real Redis for the cache tests: Debian's `redis-server` (or the binary named by
//! `BEARERD_TEST_REDIS`) on a loopback port of its own, without persistence, and a tiny RESP
//! client over a `TcpStream` to look at and tamper with what bearerd stores.
//!
//! The server is stopped by its PID (SIGKILL), paused (SIGSTOP: it still accepts connections,
//! from the kernel's backlog, but never answers) and started again on the same port, so that
//! tests can take Redis away, make it slow, and bring it back. A missing binary fails the test
//! with a message saying how to install it: `make test` does, through
//! scripts/install-test-deps.sh.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::daemon::PATIENCE;

/// How long one raw command may take before the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Ports tried before giving up, for when another process takes the port between our probe
/// and redis-server's bind.
const PORT_ATTEMPTS: usize = 5;

/// The redis-server binary: `BEARERD_TEST_REDIS`, or `redis-server` on `PATH`. Fails the test
/// with a clear message if there is none.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BEARERD_TEST_REDIS") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "BEARERD_TEST_REDIS={} is not a file: point it at a redis-server binary",
            path.display()
        );
        return path;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "redis-server is not installed, and tests/spawned/cache.rs needs a real Redis: run \
             `bash scripts/install-test-deps.sh` (which `make test` runs; it installs Debian's \
             redis-server package), or set BEARERD_TEST_REDIS to a redis-server binary"
        )
    })
}

/// One value of the Redis protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:1`
    Integer(i64),
    /// `$n ...`, or `None` for `$-1`.
    Bulk(Option<Vec<u8>>),
    /// `*n ...`, or `None` for `*-1`.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The bytes of a bulk string, `None` for a nil.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        match self {
            Self::Bulk(bytes) => bytes.clone(),
            other => panic!("expected a bulk string, got {other:?}"),
        }
    }

    /// An integer reply.
    pub fn integer(&self) -> i64 {
        match self {
            Self::Integer(n) => *n,
            other => panic!("expected an integer, got {other:?}"),
        }
    }

    /// The elements of an array of bulk strings, as text.
    pub fn strings(&self) -> Vec<String> {
        match self {
            Self::Array(Some(items)) => items
                .iter()
                .map(|item| String::from_utf8(item.bytes().unwrap_or_default()).unwrap())
                .collect(),
            other => panic!("expected an array, got {other:?}"),
        }
    }
}

/// A `redis-server` child on `127.0.0.1:port`, killed when dropped.
pub struct Redis {
    pub port: u16,
    binary: PathBuf,
    /// Extra arguments, kept for a restart (`--requirepass ...`).
    extra: Vec<String>,
    child: Option<Child>,
    /// Its working directory and log file.
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts a server on a free loopback port and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`Redis::start`], with extra `redis-server` arguments (`["--requirepass", "pw"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let binary = binary();
        let dir = tempfile::tempdir().unwrap();
        let mut redis = Self {
            port: 0,
            binary,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
            dir,
        };
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            redis.port = free_port();
            match redis.launch() {
                Ok(()) => return redis,
                Err(why) => last = why,
            }
        }
        panic!("redis-server did not start in {PORT_ATTEMPTS} attempts: {last}");
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL, by its PID) and waits for it to be gone: connections reset,
    /// new ones refused. What it held is lost (no persistence).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty, and waits until it answers PING.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.launch() {
                Ok(()) => return,
                // The port may be in use for a moment; redis-server binds with SO_REUSEADDR,
                // so a TIME_WAIT is no obstacle, but another process could have it.
                Err(why) => assert!(
                    Instant::now() < deadline,
                    "redis-server did not start again on port {}: {why}",
                    self.port
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server without killing it (SIGSTOP): connections are still accepted by the
    /// kernel, but nothing is answered: a Redis that is "slow" forever.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.pid().expect("redis-server is not running");
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Runs one command and returns its reply; an error reply is returned, not raised.
    pub fn command(&self, args: &[&[u8]]) -> Reply {
        command_at(self.addr(), self.password().as_deref(), args)
    }

    /// Like [`Redis::command`], for text arguments.
    pub fn cmd(&self, args: &[&str]) -> Reply {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.command(&args)
    }

    /// The keys matching `pattern`, sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys = self.cmd(&["KEYS", pattern]).strings();
        keys.sort();
        keys
    }

    /// The value of `key`, `None` if it does not exist.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.command(&[b"GET", key.as_bytes()]).bytes()
    }

    /// Sets `key` to `value`, keeping its time to live.
    pub fn set_keep_ttl(&self, key: &str, value: &[u8]) {
        let reply = self.command(&[b"SET", key.as_bytes(), value, b"KEEPTTL"]);
        assert_eq!(reply, Reply::Simple("OK".into()), "SET {key}");
    }

    /// Time to live of `key` in milliseconds (-1: none, -2: no such key).
    pub fn pttl(&self, key: &str) -> i64 {
        self.cmd(&["PTTL", key]).integer()
    }

    /// Removes every key.
    pub fn flush(&self) {
        assert_eq!(self.cmd(&["FLUSHALL"]), Reply::Simple("OK".into()));
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The `--requirepass` given, if any.
    fn password(&self) -> Option<String> {
        let at = self.extra.iter().position(|a| a == "--requirepass")?;
        self.extra.get(at + 1).cloned()
    }

    /// Runs redis-server on `self.port` and waits for PONG; on failure the child is gone.
    fn launch(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            // No persistence: a restarted server is empty, and nothing is written anywhere
            // but this directory.
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.path().to_str().unwrap()])
            .args(["--daemonize", "no", "--logfile", ""])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.binary.display()));
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!(
                    "redis-server on port {} exited ({status}); its log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if ping(self.addr(), self.password().as_deref()) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {PATIENCE:?}; its log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused server dies of SIGKILL all the same.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port the OS had free a moment ago on 127.0.0.1 (bound to port 0, then released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Whether a Redis at `addr` answers a raw `PING` with `+PONG`.
fn ping(addr: SocketAddr, password: Option<&str>) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut request = Vec::new();
    if let Some(password) = password {
        request.extend(encode(&[b"AUTH", password.as_bytes()]));
    }
    request.extend_from_slice(b"PING\r\n");
    if stream.write_all(&request).is_err() {
        return false;
    }
    let mut reader = BufReader::new(stream);
    if password.is_some() && !matches!(read_reply(&mut reader), Ok(Reply::Simple(_))) {
        return false;
    }
    matches!(read_reply(&mut reader), Ok(Reply::Simple(pong)) if pong == "PONG")
}

/// Runs one command on a new connection to `addr` (after `AUTH password`, if given).
pub fn command_at(addr: SocketAddr, password: Option<&str>, args: &[&[u8]]) -> Reply {
    let mut stream = TcpStream::connect_timeout(&addr, COMMAND_TIMEOUT)
        .unwrap_or_else(|e| panic!("cannot connect to Redis at {addr}: {e}"));
    stream.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
    let mut request = Vec::new();
    if let Some(password) = password {
        request.extend(encode(&[b"AUTH", password.as_bytes()]));
    }
    request.extend(encode(args));
    stream.write_all(&request).unwrap();
    let mut reader = BufReader::new(stream);
    if password.is_some() {
        let auth = read_reply(&mut reader).unwrap();
        assert_eq!(auth, Reply::Simple("OK".into()), "AUTH");
    }
    read_reply(&mut reader).unwrap_or_else(|e| panic!("Redis at {addr}: {e}"))
}

/// A command as a RESP array of bulk strings.
fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend(format!("${}\r\n", arg.len()).into_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply.
fn read_reply(reader: &mut impl BufRead) -> std::io::Result<Reply> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let (kind, rest) = line.split_at_checked(1).ok_or_else(|| bad("empty line"))?;
    let number = || rest.parse::<i64>().map_err(|_| bad(line));
    Ok(match kind {
        "+" => Reply::Simple(rest.to_owned()),
        "-" => Reply::Error(rest.to_owned()),
        ":" => Reply::Integer(number()?),
        "$" => match usize::try_from(number()?) {
            Err(_) => Reply::Bulk(None),
            Ok(n) => {
                let mut bytes = vec![0u8; n + 2];
                reader.read_exact(&mut bytes)?;
                bytes.truncate(n);
                Reply::Bulk(Some(bytes))
            }
        },
        "*" => match usize::try_from(number()?) {
            Err(_) => Reply::Array(None),
            Ok(n) => Reply::Array(Some(
                (0..n)
                    .map(|_| read_reply(reader))
                    .collect::<std::io::Result<_>>()?,
            )),
        },
        _ => return Err(bad(line)),
    })
}
