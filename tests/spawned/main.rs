//! Tests that run the `bearerd` binary as a process (flags, `--check`, signals, a real Redis,
//! real HTTP clients, chaos under load), one binary so that the crate is linked once; they
//! are kept apart from the in-process tests, whose timings they would disturb.

// Test fixtures are `pub` for the modules of this crate, as test code usually writes them.
#![allow(unreachable_pub)]

#[path = "../support/mod.rs"]
mod support;

mod audit;
mod cache;
mod chaos;
mod cli;
mod credential_files;
mod egress;
mod hostile;
mod observability;
mod routing;
mod status_page;
