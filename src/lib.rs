//! bearerd: a sidecar that adds OAuth2 client-credentials tokens to an app's requests.
//!
//! The app sends plain HTTP to a local port; bearerd forwards it to that port's upstream with
//! `Authorization: Bearer <token>`, fetching the token by the client-credentials grant
//! (RFC 6749 §4.4) and refreshing it before it expires.
//!
//! Modules, in the order data flows through them:
//! - [`config`]: the TOML file, validated into runtime types (`config/file.rs` is the raw
//!   form); [`secret`]: the client secret, redacted everywhere, and the redactor that removes
//!   it, in every encoding, from what a token endpoint says;
//! - [`tls`]: trust anchors and the pooled HTTPS client used for every outbound request;
//! - [`token`]: fetch (`fetch`, `response`), refresh timing (`schedule`), and the refresher
//!   task, its supervisor and the handle requests read tokens through (`source`);
//! - [`proxy`]: the local listeners (and who may use them), what is refused before a token is
//!   attached, request rewriting and forwarding, the app's body under its deadline, error
//!   answers;
//! - [`metrics`] and [`admin`]: Prometheus metrics, `/metrics`, `/healthz`, `/readyz`;
//! - [`sidecar`]: all of the above started from a config, reloaded, and shut down;
//! - [`check`]: what `bearerd --check` prints.
//!
//! [`start`] returns a [`Running`] sidecar; tests start one in-process on port 0 and read its
//! addresses from it, and `main.rs` drives it with signals.

pub mod admin;
pub mod check;
pub mod config;
mod errors;
mod listener;
pub mod metrics;
pub mod proxy;
pub mod secret;
pub mod sidecar;
pub mod tls;
pub mod token;

use std::future::Future;

pub use sidecar::{start, Running, StartError};

/// Runs `config` until `shutdown` completes, then shuts down gracefully.
pub async fn run(
    config: &config::Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let running = start(config).await?;
    shutdown.await;
    tracing::info!("shutting down: no new connections, letting requests in flight finish");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
