//! workload-ca: a certificate authority for workload identity.
//!
//! Module dependencies flow one way: [`identity`] <- [`ca`] <- [`server`] <- [`cli`].
#![forbid(unsafe_code)]

pub mod agent;
pub mod ca;
pub mod cli;
pub mod identity;
pub mod proto;
pub mod server;
