//! bearerd against real authorization servers (Django OAuth Toolkit, node's oidc-provider),
//! ignored by a plain `cargo test`: `make interop` sets them up and runs them.

// Test fixtures are `pub` for the modules of this crate, as test code usually writes them.
#![allow(unreachable_pub)]

#[path = "../support/mod.rs"]
mod support;

mod authlib;
mod django;
mod grpc;
mod http2_hostile;
mod intercept;
mod oidc;
mod peer;
mod telemetry;
mod websocket;
