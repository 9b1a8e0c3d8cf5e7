//! The `bearerd` command: parse the command line, set up logging, load the config, and run
//! until SIGTERM or SIGINT.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bearerd::config::{Config, LogFormat};
use clap::Parser;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config.log);

    if cli.check {
        return match bearerd::check::check(&config) {
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
    runtime.block_on(serve(&cli.config, config))
}

/// Runs until SIGTERM or SIGINT, reloading the config on SIGHUP.
async fn serve(path: &Path, config: Config) -> ExitCode {
    let mut running = match bearerd::start(&config).await {
        Ok(running) => running,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut hangups = hangup_signals();
    loop {
        tokio::select! {
            () = &mut stop => break,
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
        () = shutdown_signal() => {
            tracing::warn!("second signal: exiting without waiting");
            ExitCode::from(130)
        }
    }
}

/// Re-reads the config; on any problem the running config stays, and the problem is logged.
async fn reload(path: &Path, running: &mut bearerd::Running) {
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

/// SIGHUP, as a stream of `()`; never yields where there is no such signal.
fn hangup_signals() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hangup) => {
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        // A reload already pending covers this one too.
                        let _ = tx.try_send(());
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; reload needs a restart");
            }
        }
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}

/// Logs go to stderr, filtered by `RUST_LOG` when set, else by `[log] level`.
fn init_logging(log: &bearerd::config::Log) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new(bearerd::config::DEFAULT_LOG_LEVEL));
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

/// Completes on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops bearerd");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
