//! Serving connections under the limits of [`crate::limits`]: one accept
//! loop for TCP (with TLS) and Unix sockets, HTTP/2 connections for gRPC and
//! HTTP/1 for the operations endpoint, and a drain with one deadline.
//!
//! - [`Acceptor`] caps connections in all and per source address, and
//!   places in the admission pool in all and per source (so one source
//!   cannot take the pool): a connection holds a place through its TLS
//!   handshake (under a deadline) until its first answer, at most the
//!   admission hold after the handshake. A refused connection is closed at
//!   once, counted, and logged at a rate-limited pace. A full pool refuses
//!   nothing: accepting pauses, and connections wait in the listen backlog.
//! - [`serve_h2`] serves one HTTP/2 connection: concurrent streams and the
//!   header list size advertised and enforced by HTTP/2 (refusals seen on the
//!   wire and counted), a preface deadline, an idle timeout, a maximum age,
//!   and a deadline on every request that covers a body that never comes.
//! - [`serve_http1`] serves one HTTP/1 connection (the operations endpoint)
//!   with a header-read deadline and a deadline on the whole connection.
//!
//! On shutdown the accept loop stops and drops its listener, every
//! connection gets `GOAWAY` (in-flight calls finish), and every connection
//! task still running at the drain deadline is aborted; the acceptor's task
//! ends only once every connection task has. (A connection's calls are
//! polled by its own task, so they end with it at the latest.)

mod accept;
mod frames;
mod h2;
mod http1;

pub use accept::{
    Acceptor, Calls, LISTEN_BACKLOG, Listener, listen_tcp, open_files_limit, source_of,
    within_fd_limit,
};
pub use h2::{GrpcService, serve_h2};
pub use http1::{serve_http1, spawn_ops};
