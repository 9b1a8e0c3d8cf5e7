//! Tests that run bearerd in this process (a `Sidecar` on port 0 beside in-process token
//! endpoints and upstreams), and the checks of files the repository ships (config example,
//! docs, deploy). One binary, so that the crate and the fixtures are linked once.

// Test fixtures are `pub` for the modules of this crate, as test code usually writes them.
#![allow(unreachable_pub)]

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod auth;
mod config;
mod deploy;
mod docs;
mod grants;
mod hostile_requests;
mod http2;
mod intercept;
mod limits;
mod on_behalf;
mod properties;
mod proxy;
mod recipes;
mod refresh;
mod reload;
mod status;
mod streams;
mod unauthorized;
mod upgrade;
mod vendors;
