//! The admission pool against a real `ca server` process: a source over its
//! share of the pool waits for its turn, rather than being refused.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use common::procs::*;
use workload_ca::limits::label;

#[tokio::test]
async fn a_source_over_its_share_waits_its_turn() {
    // One place per source: eight clients from one address at once.
    let ca = CaProc::start(&["--max-pending-handshakes-per-source", "1"]);
    let calls = (0..8).map(|_| ca.legit_issue());
    futures_util::future::join_all(calls).await;
    assert!(
        ca.refusals(label::PENDING_HANDSHAKES_PER_SOURCE).await >= 1.0,
        "the waits are counted"
    );
    assert_eq!(ca.refusals(label::CONNECTIONS_PER_SOURCE).await, 0.0);
}
