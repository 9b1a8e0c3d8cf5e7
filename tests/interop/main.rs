//! bearerd against real authorization servers (Django OAuth Toolkit, node's oidc-provider),
//! ignored by a plain `cargo test`: `make interop` sets them up and runs them.

#[path = "../support/mod.rs"]
mod support;

mod django;
mod oidc;
