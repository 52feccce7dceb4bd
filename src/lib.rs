//! workload-ca: a certificate authority for workload identity.
//!
//! Module dependencies flow one way: [`identity`] <- [`ca`] <- {[`server`],
//! [`agent`]} <- [`cli`]. [`proto`] (generated types) and [`ops`] (the
//! health and metrics endpoint) are leaves used by both.
// Lints (unsafe forbidden, docs, no unwrap/expect/indexing outside tests):
// Cargo.toml's [lints] table and clippy.toml.

// Also in Cargo.toml's [lints]; kept here so any build of this source
// forbids it.
#![forbid(unsafe_code)]

pub mod agent;
pub mod ca;
pub mod cli;
pub mod drain;
pub mod identity;
pub mod k8s;
pub mod limits;
pub mod logsafe;
pub mod net;
pub mod ops;
pub mod proto;
pub mod server;
pub mod sync;
