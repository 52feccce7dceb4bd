//! Tests of [`super`]: who may speak for an agent, what counts, what is
//! remembered.

use super::*;
use crate::ca::KeyAlgorithm;

fn set() -> AuthoritySet {
    let a = crate::ca::testing::authority("td", 3600);
    AuthoritySet::single_since(a, SystemTime::now()).unwrap()
}

fn report(agent: &str, acked: u64) -> AgentReport {
    AgentReport {
        agent: agent.into(),
        bundle_generation: acked,
        acked_generation: acked,
        proxies: 1,
        leaves: Vec::new(),
    }
}

fn acked_of(fleet: &Fleet, name: &str) -> Vec<(bool, u64)> {
    fleet
        .evidence(SystemTime::now())
        .agents
        .iter()
        .filter(|a| a.name.starts_with(name))
        .map(|a| (a.connected, a.acked_generation))
        .collect()
}

#[test]
fn a_report_speaks_only_for_its_own_identity_and_never_above_what_it_was_sent() {
    let (set, now) = (set(), SystemTime::now());
    let fleet = Fleet::new(Saved::default(), 50, now);
    let node = fleet.open(None);
    fleet.sent(node, 3);
    assert!(fleet.report(
        node,
        "spiffe://td/ns/kube-system/sa/agent",
        &report("node-17", 3),
        &set,
        now
    ));
    // A workload claiming node-17's name is another agent (its own
    // identity), and claims no more than it was sent.
    let forger = fleet.open(None);
    fleet.sent(forger, 3);
    assert!(fleet.report(
        forger,
        "spiffe://td/ns/evil/sa/x",
        &report("node-17", u64::MAX),
        &set,
        now
    ));
    let evidence = fleet.evidence(now);
    assert_eq!(evidence.agents.len(), 2);
    assert!(
        evidence.agents.iter().all(|a| a.acked_generation == 3),
        "{evidence:?}"
    );
    // A later report cannot change the stream's name.
    assert!(fleet.report(
        forger,
        "spiffe://td/ns/evil/sa/x",
        &report("node-18", 3),
        &set,
        now
    ));
    assert!(acked_of(&fleet, "node-18").is_empty());
}

#[test]
fn two_streams_of_one_agent_count_their_lowest_ack_and_a_closed_one_is_remembered() {
    let (set, now) = (set(), SystemTime::now());
    let fleet = Fleet::new(Saved::default(), 50, now);
    let id = "spiffe://td/ns/a/sa/b";
    let (a, b) = (fleet.open(None), fleet.open(None));
    fleet.sent(a, 5);
    fleet.sent(b, 5);
    fleet.report(a, id, &report("n", 5), &set, now);
    fleet.report(b, id, &report("n", 4), &set, now);
    assert_eq!(acked_of(&fleet, "n"), [(true, 4)]);
    assert_eq!(
        fleet.evidence(now).confirmed(5),
        (0, 1, vec!["n (spiffe://td/ns/a/sa/b)".to_string()])
    );
    fleet.close(b);
    assert_eq!(acked_of(&fleet, "n"), [(true, 5)]);
    // With no leaf reported, a closed agent holds nothing and is gone.
    fleet.close(a);
    assert!(acked_of(&fleet, "n").is_empty());
}

#[test]
fn a_disconnected_agent_with_a_valid_leaf_is_counted_and_saved() {
    let (set, now) = (set(), SystemTime::now());
    let fleet = Fleet::new(Saved::default(), 50, now);
    let key = crate::ca::PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = {
        let p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        crate::ca::check_csr(
            p.serialize_request(key.key_pair())
                .unwrap()
                .pem()
                .unwrap()
                .as_bytes(),
        )
        .unwrap()
    };
    let id = crate::identity::SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
    let leaf = set
        .sign_leaf(&csr, &id, Duration::from_secs(600), now)
        .unwrap();
    let s = fleet.open(None);
    fleet.sent(s, 1);
    let mut r = report("n", 1);
    r.leaves = vec![leaf.leaf_der.clone(), b"not a certificate".to_vec()];
    fleet.report(s, id.as_str(), &r, &set, now);
    fleet.close(s);
    let e = fleet.evidence(now);
    assert_eq!(e.agents.len(), 1);
    assert!(!e.agents[0].connected);
    assert!(e.agents[0].leaves.contains_key(set.active().id()));
    assert_eq!(e.confirmed(2).1, 1, "it still counts against activation");
    assert_eq!(fleet.agents()[0].leaves, 1, "only verified leaves count");
    // Saved, and known again after a restart.
    let saved = fleet.to_save(now, true).unwrap();
    let text = serde_json::to_string(&saved).unwrap();
    let again = Fleet::new(serde_json::from_str(&text).unwrap(), 50, now);
    assert_eq!(acked_of(&again, "n"), [(false, 1)]);
}

fn signed(set: &AuthoritySet) -> crate::ca::Issued {
    let key = crate::ca::PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let pem = p.serialize_request(key.key_pair()).unwrap().pem().unwrap();
    let csr = crate::ca::check_csr(pem.as_bytes()).unwrap();
    let id = crate::identity::SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
    set.sign_leaf(&csr, &id, Duration::from_secs(600), SystemTime::now())
        .unwrap()
}

#[test]
fn a_claim_is_cleared_only_by_a_watch_on_the_connection_it_went_out_on() {
    let (set, now) = (set(), SystemTime::now());
    let fleet = Fleet::new(Saved::default(), 50, now);
    let issued = signed(&set);
    let (p1, p2) = (
        Some("127.0.0.1:1000".parse().unwrap()),
        Some("127.0.0.2:2000".parse().unwrap()),
    );
    fleet.claim(
        &issued.serial_hex,
        p1,
        1,
        set.active().id(),
        now,
        issued.not_after,
    );
    let claimed = |f: &Fleet| {
        f.evidence(now)
            .ledger
            .issued_by(set.active().id(), now)
            .is_some()
    };
    assert!(
        claimed(&fleet),
        "unreported: counted as held by a client that does not report"
    );
    let mut r = report("other", 1);
    r.leaves = vec![issued.leaf_der.clone()];
    let elsewhere = fleet.open(p2);
    fleet.sent(elsewhere, 1);
    fleet.report(elsewhere, "spiffe://td/ns/x/sa/y", &r, &set, now);
    fleet.close(elsewhere);
    assert!(claimed(&fleet), "someone else's report does not clear it");
    let own = fleet.open(p1);
    fleet.sent(own, 1);
    r.agent = "node".into();
    fleet.report(own, "spiffe://td/ns/a/sa/b", &r, &set, now);
    assert!(!claimed(&fleet), "its own watch does");
    // Not reported within the window: folded into the ledger.
    fleet.claim("0abc", p1, 1, set.active().id(), now, issued.not_after);
    let later = now + CLAIM_WINDOW;
    assert!(
        fleet
            .to_save(later, false)
            .unwrap()
            .ledger
            .issued_by(set.active().id(), now)
            .is_some()
    );
}

#[test]
fn what_was_saved_above_the_stores_generation_counts_as_unconfirmed() {
    let now = SystemTime::now();
    let mut ledger = Ledger::default();
    ledger.record(9, "a", now, now + Duration::from_secs(60));
    let held = Held {
        acked_generation: 7,
        bundle_generation: 7,
        ..Held::default()
    };
    let key = AgentKey {
        identity: "i".into(),
        name: "n".into(),
    };
    let saved = Saved {
        ledger,
        agents: vec![(key, held)],
        clean: true,
    }
    .clamped(3);
    assert_eq!(saved.agents[0].1.acked_generation, 0);
    assert!(
        saved.ledger.issued_before(1, now).is_some(),
        "before every generation"
    );
}

#[test]
fn gates_stay_closed_while_the_server_settles() {
    let now = SystemTime::now();
    let fleet = Fleet::new(Saved::default(), 50, now + Duration::from_secs(10));
    assert!(fleet.evidence(now).settle_until.is_some());
    assert!(
        fleet
            .evidence(now + Duration::from_secs(11))
            .settle_until
            .is_none()
    );
}
