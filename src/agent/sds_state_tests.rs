//! The side effects of the stream state machines (what they send is
//! pinned in `tests/properties.rs` and fuzzed in `fuzz/`).

use super::*;
use crate::proto::google::rpc::Status as RpcStatus;

const ID: &str = "spiffe://cluster.local/ns/prod/sa/web";

struct World {
    id: SpiffeId,
    version: String,
    roots_version: String,
    generation: Option<u64>,
}

impl World {
    fn new() -> Self {
        Self {
            id: SpiffeId::parse(ID).unwrap(),
            version: "1".into(),
            roots_version: "7".into(),
            generation: Some(7),
        }
    }

    fn snap(&self) -> Snapshot<'_> {
        Snapshot {
            cert: Some(CertView {
                identity: &self.id,
                version: &self.version,
                chain_pem: "chain",
                key_pem: "key",
            }),
            roots: Some(RootsView {
                version: &self.roots_version,
                pem: "roots",
                generation: self.generation,
            }),
        }
    }
}

fn sotw(names: &[&str], nonce: &str, nack: bool) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        response_nonce: nonce.to_owned(),
        error_detail: nack.then(|| RpcStatus {
            code: 13,
            message: "bad".into(),
            details: vec![],
        }),
        ..Default::default()
    }
}

fn sent<R: Clone, At>(step: &Step<R, At>) -> R {
    match &step.action {
        Action::Send(r) => r.clone(),
        other => panic!("nothing sent: {:?}", matches!(other, Action::Nothing)),
    }
}

#[test]
fn sotw_reports_acks_nacks_bundle_subscription_and_the_change_an_ack_acknowledges() {
    let mut w = World::new();
    let nonces = Nonces::new();
    let mut s = SotwStream::<u32>::new(8);
    let step = s.request(&sotw(&["ROOTCA", "default"], "", false), &w.snap(), &nonces);
    assert_eq!(step.effects.subscribed_to_bundle, Some(true));
    let first = sent(&step);
    // The first response answered a request: no ACK latency to report.
    let step = s.request(
        &sotw(&["ROOTCA", "default"], &first.nonce, false),
        &w.snap(),
        &nonces,
    );
    assert_eq!(step.action, Action::Nothing);
    assert_eq!(step.effects.acked_generation, Some(7));
    assert_eq!(step.effects.ack_latency_since, None);
    // A rotation at 5 (and another at 6 before the push) is ACKed: the
    // latency counts from the first.
    w.version = "2".into();
    s.changed(5, &Snapshot::default(), &nonces);
    let pushed = sent(&s.changed(6, &w.snap(), &nonces));
    let step = s.request(
        &sotw(&["ROOTCA", "default"], "999", true),
        &w.snap(),
        &nonces,
    );
    assert_eq!(step.action, Action::Nothing, "a stale NACK");
    assert_eq!(
        step.effects.nacked,
        Some(vec!["ROOTCA".to_owned(), "default".to_owned()])
    );
    assert_eq!(step.effects.acked_generation, None);
    let step = s.request(
        &sotw(&["ROOTCA", "default"], &pushed.nonce, false),
        &w.snap(),
        &nonces,
    );
    assert_eq!(step.effects.ack_latency_since, Some(5));
    assert_eq!(step.effects.acked_generation, Some(7));
    // Unsubscribing from the bundle is reported; a NACK ACKs nothing.
    let step = s.request(
        &sotw(&["default"], &pushed.nonce, false),
        &w.snap(),
        &nonces,
    );
    assert_eq!(step.effects.subscribed_to_bundle, Some(false));
    let only_cert = sent(&step);
    let step = s.request(
        &sotw(&["default"], &only_cert.nonce, true),
        &w.snap(),
        &nonces,
    );
    assert_eq!(step.effects.acked_generation, None);
    assert_eq!(step.action, Action::Nothing, "a NACK is not answered again");
}

#[test]
fn sotw_pushes_nothing_when_the_other_watch_fires() {
    let w = World::new();
    let nonces = Nonces::new();
    let mut s = SotwStream::<()>::new(8);
    sent(&s.request(&sotw(&["default"], "", false), &w.snap(), &nonces));
    assert_eq!(s.changed((), &w.snap(), &nonces).action, Action::Nothing);
}

#[test]
fn a_refused_name_ends_a_sotw_stream_even_while_another_resource_is_missing() {
    let w = World::new();
    let nonces = Nonces::new();
    let no_roots = Snapshot {
        roots: None,
        ..w.snap()
    };
    let mut s = SotwStream::<()>::new(8);
    let step = s.request(&sotw(&["ROOTCA", "garbage"], "", false), &no_roots, &nonces);
    assert!(matches!(
        step.action,
        Action::End(Refusal::UnknownName { .. })
    ));
    let mut s = SotwStream::<()>::new(8);
    let other = "spiffe://cluster.local/ns/prod/sa/db";
    let step = s.request(&sotw(&["ROOTCA", other], "", false), &no_roots, &nonces);
    assert!(matches!(
        step.action,
        Action::End(Refusal::OtherIdentity { .. })
    ));
    let mut s = SotwStream::<()>::new(1);
    let step = s.request(&sotw(&["ROOTCA", "default"], "", false), &w.snap(), &nonces);
    assert_eq!(
        step.action,
        Action::End(Refusal::TooManyNames {
            requested: 2,
            max: 1
        })
    );
}

#[test]
fn delta_acks_the_generation_of_the_response_acked() {
    let mut w = World::new();
    let nonces = Nonces::new();
    let mut d = DeltaStream::new(8);
    let req = DeltaDiscoveryRequest {
        resource_names_subscribe: vec!["ROOTCA".into()],
        ..Default::default()
    };
    let step = d.request(&req, &w.snap(), &nonces);
    assert_eq!(step.effects.subscribed_to_bundle, Some(true));
    let first = sent(&step);
    w.roots_version = "8".into();
    w.generation = Some(8);
    let second = sent(&d.changed(&w.snap(), &nonces));
    let ack = |nonce: &str, nack: bool| DeltaDiscoveryRequest {
        response_nonce: nonce.to_owned(),
        error_detail: nack.then(RpcStatus::default),
        ..Default::default()
    };
    let step = d.request(&ack(&second.nonce, true), &w.snap(), &nonces);
    assert_eq!(step.effects.nacked, Some(vec![]));
    assert_eq!(step.effects.acked_generation, None);
    let step = d.request(&ack(&second.nonce, false), &w.snap(), &nonces);
    assert_eq!(step.effects.acked_generation, Some(8));
    // The older response was dropped with it.
    let step = d.request(&ack(&first.nonce, false), &w.snap(), &nonces);
    assert_eq!(step.effects.acked_generation, None);
}
