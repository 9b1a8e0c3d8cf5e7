//! bearerd: a sidecar that adds OAuth2 client-credentials tokens to an app's requests.
//!
//! The app sends plain HTTP to a local port; bearerd forwards it to that port's upstream with
//! `Authorization: Bearer <token>`, fetching the token by the client-credentials grant
//! (RFC 6749 §4.4) and refreshing it before it expires.
//!
//! Modules, in the order data flows through them:
//! - [`config`]: the TOML file, validated into plain runtime types (`config/file.rs` is the
//!   raw form); [`secret`]: the client secret, redacted everywhere, and the redactor that
//!   removes it, in every encoding, from what a token endpoint says (which it first brings to
//!   a normal form, `secret/normal.rs`); `files`: the bounded reader every credential file
//!   goes through (regular files only, capped, and off the runtime's thread under the token
//!   timeout when a token request reads them); `jose`: JWS signing, JWK thumbprints and
//!   hashes, the leaf that `token` and `tls` both use;
//! - `tls`: trust anchors and the pooled HTTPS client used for every outbound request;
//! - `egress`: the TCP layer under `tls`, direct or through the `[egress]` proxy's CONNECT
//!   tunnel;
//! - [`token`]: client authentication (`client_auth`), fetch (`fetch`, `response`), refresh
//!   timing (`schedule`), the refresher task and its supervisor (`refresher`), the handle
//!   requests read tokens through (`source`, which also starts a source: fetcher, cache and
//!   refresher), and a route's `credential` (the token, and with DPoP its proof); upstreams
//!   with equal settings share one source ([`token::SourceKey`]); an on-behalf-of source
//!   (`on_behalf`) has no refresher: it exchanges the subject token each request carries,
//!   on demand, a token per subject;
//! - [`proxy`]: the local listeners (and who may use them), each serving a table of routes
//!   that build themselves from their config; what is refused before a token is attached,
//!   request rewriting and forwarding, the app's body under its deadline, error answers;
//! - [`metrics`] and [`admin`]: the Prometheus registry (each part registers the families it
//!   owns), `/metrics`, `/healthz`, `/readyz`, and `/status` for people (`admin/status.rs`);
//!   audit events are the token sources' own ([`token::audit`]);
//! - `telemetry`: OpenTelemetry traces of requests, upstream attempts and token fetches,
//!   exported over OTLP/HTTP in the background (`[telemetry]`; absent, nothing is traced);
//! - [`sidecar`]: one preparation step ([`sidecar::prepare`]: every file read, every key
//!   built, every problem found) shared by start and `--check`; then all of the above started
//!   from a config, reloaded by a plan (what to keep, start and stop), and shut down;
//! - [`check`]: what `bearerd --check` prints of the preparation; [`jwk`]: what
//!   `bearerd --public-jwk` prints.
//!
//! [`start`] returns a [`Running`] sidecar; tests start one in-process on port 0 and read its
//! addresses from it, and [`command`] (the `bearerd` binary) drives it with signals.

pub mod admin;
pub mod check;
pub mod command;
pub mod config;
mod egress;
mod errors;
mod files;
mod jose;
pub mod jwk;
mod listener;
pub mod metrics;
pub mod proxy;
pub mod secret;
pub mod sidecar;
mod telemetry;
mod tls;
pub mod token;

pub use sidecar::{start, Running, StartError};
