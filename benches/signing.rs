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
//! `floor`: the work no CA can skip per CreateCertificate call, each part
//! alone and all four in a row (`total`): the CSR's signature checked
//! (ring ECDSA P-256, the CSR already parsed), a Kubernetes-shaped token's
//! signature checked (ring RS256, 2048-bit key from its JWK components),
//! the leaf signed and DER-encoded (rcgen `signed_by`, P-256 CA key, the
//! leaf profile's fields), and the leaf PEM-encoded. The server's CPU per
//! certificate is judged against `total`.
//!
//! Run: `cargo bench --bench signing` (`-- floor` for the floor alone).

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

/// The unavoidable work of one call, part by part (see the module docs).
fn floor(c: &mut Criterion) {
    use ring::signature::{
        self as sig, ECDSA_P256_SHA256_ASN1, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents,
    };
    use x509_parser::prelude::FromDer;

    let now = SystemTime::now();
    let td = TrustDomain::new("cluster.local").unwrap();
    let files = Authority::generate_root(
        &td,
        KeyAlgorithm::EcdsaP256,
        Duration::from_secs(86_400 * 365),
        now,
    )
    .unwrap();
    let ca_kp = rcgen::KeyPair::from_pem(&files.ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&files.ca_cert, ca_kp).unwrap();

    // A P-256 CSR, parsed once: what is timed is the signature check.
    let leaf_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let leaf_kp = rcgen::KeyPair::from_pem(&leaf_key.to_pem()).unwrap();
    let mut req = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    req.distinguished_name = rcgen::DistinguishedName::new();
    let csr_der = req.serialize_request(&leaf_kp).unwrap().der().to_vec();
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&csr_der).unwrap();
    let tbs = csr.certification_request_info.raw.to_vec();
    let csr_sig = csr.signature_value.data.to_vec();
    let point = csr
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    let spki_der = csr.certification_request_info.subject_pki.raw.to_vec();
    let spki = rcgen::SubjectPublicKeyInfo::from_der(&spki_der).unwrap();

    // An RS256 token of the size Kubernetes mints (about 1 KB), signed by
    // a 2048-bit key known by its JWK components (n, e).
    let rsa_key = PrivateKey::generate(KeyAlgorithm::Rsa2048).unwrap();
    let pkcs8 = pem::parse(rsa_key.to_pem()).unwrap().into_contents();
    let rsa = sig::RsaKeyPair::from_pkcs8(&pkcs8).unwrap();
    let components: RsaPublicKeyComponents<Vec<u8>> = rsa.public().into();
    let signing_input = format!("{}.{}", "h".repeat(60), "c".repeat(640));
    let mut token_sig = vec![0; rsa.public().modulus_len()];
    rsa.sign(
        &sig::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut token_sig,
    )
    .unwrap();

    let id = "spiffe://cluster.local/ns/prod/sa/web";
    let leaf_params = || {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x42; 20]));
        p.use_authority_key_identifier_extension = true;
        p.not_before = time::OffsetDateTime::from(now);
        p.not_after = time::OffsetDateTime::from(now + Duration::from_secs(86_400));
        p
    };
    let params = leaf_params();
    let leaf_der = params.signed_by(&spki, &issuer).unwrap().der().to_vec();

    let csr_verify = || {
        sig::UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &point)
            .verify(&tbs, &csr_sig)
            .unwrap()
    };
    let token_verify = || {
        components
            .verify(
                &RSA_PKCS1_2048_8192_SHA256,
                signing_input.as_bytes(),
                &token_sig,
            )
            .unwrap()
    };
    let sign = || params.signed_by(&spki, &issuer).unwrap();
    let encode = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der));

    let mut group = c.benchmark_group("floor");
    group.bench_function("csr_verify", |b| b.iter(csr_verify));
    group.bench_function("token_verify", |b| b.iter(token_verify));
    group.bench_function("sign", |b| b.iter(|| std::hint::black_box(sign())));
    group.bench_function("encode", |b| {
        b.iter(|| std::hint::black_box(encode(&leaf_der)))
    });
    group.bench_function("total", |b| {
        b.iter(|| {
            csr_verify();
            token_verify();
            let cert = sign();
            std::hint::black_box(encode(cert.der()))
        })
    });
    group.finish();
}

criterion_group!(benches, signing, floor);
criterion_main!(benches);
