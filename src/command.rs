//! The `bearerd` command: parse the command line, set up logging, load the config, and run
//! until SIGTERM or SIGINT.
//!
//! It lives in the library, not in `main.rs`, so that the whole program is one crate: an async
//! function of the library polled from the binary's crate (`start`, `--fetch-token`) is
//! compiled again there, with its own copy of each generic it reaches. hyper's HTTP/1.1 client
//! was in the binary twice, and LLVM then stopped inlining its response parser and request
//! encoder into the upstream connection's task: callgrind counted 180 to 360 more
//! instructions per proxied request (docs/benchmarks.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::{Config, LogFormat};
use clap::Parser;
use tokio::sync::mpsc;
use tracing_subscriber::EnvFilter;

/// OAuth2 client-credentials sidecar: forwards local plain-HTTP requests to their upstream
/// with `Authorization: Bearer <token>`, keeping the token fresh.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The TOML config file.
    #[arg(long, env = "BEARERD_CONFIG", value_name = "FILE")]
    config: PathBuf,

    /// Validate the config, read every secret and CA file, print what would run, and exit.
    #[arg(long)]
    check: bool,

    /// Perform one token request for UPSTREAM, print the outcome (type, scope, expiry; not the
    /// token), and exit.
    #[arg(long, value_name = "UPSTREAM", conflicts_with = "check")]
    fetch_token: Option<String>,

    /// With --fetch-token: print the access token too.
    #[arg(long, requires = "fetch_token")]
    show_token: bool,

    /// With --fetch-token, for an on-behalf-of upstream (subject_token_from): the file holding
    /// the subject token to exchange (never printed).
    #[arg(long, value_name = "PATH", requires = "fetch_token")]
    subject_token_file: Option<PathBuf>,

    /// Print the public keys of UPSTREAM (its private_key_jwt key, its DPoP key_file) as a
    /// JWK Set with `kid`, to register with the identity provider, and exit. Never prints
    /// private key material.
    #[arg(long, value_name = "UPSTREAM", conflicts_with_all = ["check", "fetch_token"])]
    public_jwk: Option<String>,
}

/// Runs the command with the process's arguments; the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config.log);

    if let Some(upstream) = &cli.public_jwk {
        return match crate::jwk::public_jwk(&config, upstream) {
            Ok(set) => {
                print!("{set}");
                ExitCode::SUCCESS
            }
            Err(problem) => {
                eprintln!("{problem}");
                ExitCode::from(1)
            }
        };
    }

    if cli.check {
        return match crate::check::check(&config) {
            Ok(description) => {
                print!("{description}");
                ExitCode::SUCCESS
            }
            Err(problems) => {
                for problem in problems {
                    eprintln!("{problem}");
                }
                ExitCode::from(1)
            }
        };
    }

    // One thread: a sidecar usually gets one core or less, and the work per request is small.
    // Measured on one core, it costs 7-10% less CPU per request than tokio's multi-thread
    // runtime with one worker, and more against two (docs/benchmarks.md).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = match &cli.fetch_token {
        Some(upstream) => {
            match runtime.block_on(crate::check::fetch_token_for(
                &config,
                upstream,
                cli.show_token,
                cli.subject_token_file.as_deref(),
            )) {
                Ok(description) => {
                    print!("{description}");
                    ExitCode::SUCCESS
                }
                Err(problem) => {
                    eprintln!("{problem}");
                    ExitCode::from(1)
                }
            }
        }
        None => runtime.block_on(serve(&cli.config, config)),
    };
    // Not a plain drop, which would wait for every thread of the blocking pool: a credential
    // file read that hangs in the kernel (a stalled NFS or FUSE mount) would keep bearerd from
    // exiting. Everything that must finish has finished inside `serve`.
    runtime.shutdown_background();
    code
}

/// Runs until SIGTERM or SIGINT, reloading the config on SIGHUP.
async fn serve(path: &Path, config: Config) -> ExitCode {
    // Listen for signals before anything starts, so that none finds bearerd deaf.
    let mut stops = stop_signals();
    let mut hangups = hangup_signals();
    let mut running = match crate::start(&config).await {
        Ok(running) => running,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    loop {
        tokio::select! {
            _ = stops.recv() => break,
            Some(()) = hangups.recv() => reload(path, &mut running).await,
        }
    }
    tracing::info!("shutting down: no new connections, letting requests in flight finish");
    tokio::select! {
        () = running.shutdown() => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        // A second signal while draining: the operator wants out now.
        Some(()) = stops.recv() => {
            tracing::warn!("second signal: exiting without waiting");
            ExitCode::from(130)
        }
    }
}

/// Re-reads the config; on any problem the running config stays, and the problem is logged.
async fn reload(path: &Path, running: &mut crate::Running) {
    tracing::info!(config = %path.display(), "SIGHUP: reloading the config");
    match Config::load(path) {
        Ok(config) => {
            if let Err(error) = running.reload(&config).await {
                tracing::error!(%error, "reload failed; the running config stays");
            }
        }
        Err(error) => {
            for line in error.to_string().lines() {
                tracing::error!(
                    problem = line,
                    "reload refused: invalid config; the running config stays"
                );
            }
        }
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` when set, else by `[log] level`; audit events
/// by `[log] audit` alone.
fn init_logging(log: &crate::config::Log) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new(crate::config::DEFAULT_LOG_LEVEL));
    // A directive naming the audit target is more specific than any level or any `bearerd=`
    // directive, so it decides for audit events whatever `level` or `RUST_LOG` says; added
    // last, it replaces one for the same target that `RUST_LOG` may have had.
    let audit = format!(
        "{}={}",
        crate::token::audit::TARGET,
        if log.audit { "info" } else { "off" }
    );
    let filter = match audit.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        // Colour codes only for a person at a terminal, never in a collected log.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// A stream with one `()` per signal of the given kinds, registered before this returns, so
/// that no signal sent after it can be missed.
#[cfg(unix)]
fn signals(kinds: &[(tokio::signal::unix::SignalKind, &'static str)]) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(4);
    for &(kind, name) in kinds {
        match tokio::signal::unix::signal(kind) {
            Ok(mut stream) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while stream.recv().await.is_some() {
                        // A full queue already holds a signal of this meaning.
                        let _ = tx.try_send(());
                    }
                });
            }
            Err(error) => tracing::warn!(%error, signal = name, "cannot listen for this signal"),
        }
    }
    rx
}

/// SIGTERM (Kubernetes) and SIGINT (Ctrl-C).
#[cfg(unix)]
fn stop_signals() -> mpsc::Receiver<()> {
    use tokio::signal::unix::SignalKind;
    signals(&[
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::interrupt(), "SIGINT"),
    ])
}

/// SIGHUP: reload the config.
#[cfg(unix)]
fn hangup_signals() -> mpsc::Receiver<()> {
    signals(&[(tokio::signal::unix::SignalKind::hangup(), "SIGHUP")])
}

/// Ctrl-C only, where there are no Unix signals.
#[cfg(not(unix))]
fn stop_signals() -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            let _ = tx.try_send(());
        }
    });
    rx
}

/// No reload signal where there are no Unix signals.
#[cfg(not(unix))]
fn hangup_signals() -> mpsc::Receiver<()> {
    mpsc::channel(1).1
}
