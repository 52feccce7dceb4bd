//! The signing path against a bare rcgen/ring loop, in the same run.
//!
//! - `workload_ca`: what a CreateCertificate call does after authentication:
//!   `check_csr` (size, PEM, parse, key policy, signature) then
//!   `Authority::sign_leaf` (profile, random serial, sign, PEM chain).
//! - `workload_ca_set`: the same through the live authority set, as the
//!   server signs since root rotation: the set's snapshot, the whole bundle
//!   as the chain's last element, and the issuance ledger the rotation
//!   gates read.
//! - `bare_rcgen`: rcgen's own CSR parse + signature check, `signed_by`, PEM.
//!
//! Both take a P-256 CSR and sign with a P-256 CA key.
//!
//! The floor of unavoidable work per call is measured by `ca bench` in
//! every run (src/cli/bench/floor.rs).
//!
//! Run: `cargo bench --bench signing`.
// A benchmark: a panic is a failed run, not a fault of the CA.
#![allow(
    missing_docs, // criterion_group! defines an undocumented `pub fn`.
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use workload_ca::ca::{Authority, KeyAlgorithm, PrivateKey, check_csr};
use workload_ca::identity::{SpiffeId, TrustDomain};

fn signing(c: &mut Criterion) {
    let now = SystemTime::now();
    let td = TrustDomain::new("cluster.local").unwrap();
    let files = Authority::generate_root(
        &td,
        KeyAlgorithm::EcdsaP256,
        Duration::from_secs(86_400 * 365),
        now,
    )
    .unwrap();
    let authority = Authority::from_files(&files, &td, now).unwrap();
    let id = SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/web").unwrap();

    let leaf_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let leaf_kp = rcgen::KeyPair::from_pem(&leaf_key.to_pem()).unwrap();
    let mut req = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    req.distinguished_name = rcgen::DistinguishedName::new();
    let csr_pem = req.serialize_request(&leaf_kp).unwrap().pem().unwrap();

    let ca_kp = rcgen::KeyPair::from_pem(&files.ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&files.ca_cert, ca_kp).unwrap();

    let mut group = c.benchmark_group("sign_p256_leaf");
    group.bench_function("workload_ca", |b| {
        b.iter(|| {
            let csr = check_csr(csr_pem.as_bytes()).unwrap();
            let issued = authority
                .sign_leaf(&csr, &id, Duration::from_secs(3600), now)
                .unwrap();
            std::hint::black_box(issued.chain);
        })
    });
    let set = std::sync::Arc::new(
        workload_ca::ca::AuthoritySet::single_since(
            Authority::from_files(&files, &td, now).unwrap(),
            now,
        )
        .unwrap(),
    );
    let fleet = workload_ca::server::fleet::Fleet::new(Default::default(), 50, now);
    group.bench_function("workload_ca_set", |b| {
        b.iter(|| {
            let csr = check_csr(csr_pem.as_bytes()).unwrap();
            let snapshot = set.clone();
            let issued = snapshot
                .sign_leaf(&csr, &id, Duration::from_secs(3600), now)
                .unwrap();
            fleet.record_issued(
                snapshot.generation(),
                snapshot.active().id(),
                now,
                issued.not_after,
            );
            std::hint::black_box(issued.chain);
        })
    });
    group.bench_function("bare_rcgen", |b| {
        b.iter(|| {
            let params = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
            let cert = params.signed_by(&issuer).unwrap();
            std::hint::black_box(cert.pem());
        })
    });
    group.finish();
}

criterion_group!(benches, signing);
criterion_main!(benches);
