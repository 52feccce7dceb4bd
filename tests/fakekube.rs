//! The fake Kubernetes API server (tests/common/fakekube), checked against
//! the real API server's documented behaviour with the real kube client
//! (and, when the machine has it, kubectl).
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

#[path = "fakekube/apply.rs"]
mod apply;
#[path = "fakekube/certificates.rs"]
mod certificates;
#[path = "fakekube/crud.rs"]
mod crud;
#[path = "fakekube/events.rs"]
mod events;
#[path = "fakekube/faults.rs"]
mod faults;
#[path = "fakekube/gc.rs"]
mod gc;
#[path = "fakekube/tokens.rs"]
mod tokens;
#[path = "fakekube/watches.rs"]
mod watches;

use kube::core::Status;

/// The Status of an API error.
pub fn status(e: kube::Error) -> Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Awaits with a bound, so no test can hang.
pub async fn within<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(std::time::Duration::from_secs(secs), f)
        .await
        .expect("timed out")
}

pub fn secret(name: &str, data: &[(&str, &str)]) -> k8s_openapi::api::core::v1::Secret {
    use k8s_openapi::ByteString;
    k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}
