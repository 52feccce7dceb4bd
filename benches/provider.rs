//! ring (the crypto provider of the whole tree) against aws-lc-rs, on the
//! operations a certificate costs the CA, measured side by side in one
//! command, and what a provider switch would change per certificate with an
//! RSA-2048 CA key.
//!
//! Run: `cargo bench --bench provider --features provider-compare`
//! (options after `--`: `--seconds S` per operation and provider, default 1;
//! `--duration D` of each server run, default 15; `--no-server`).
//!
//! aws-lc-rs is an optional dependency behind the non-default feature
//! `provider-compare`, used only here: the default build, the server and
//! the agent stay on ring.
//!
//! Per certificate the server does (see src/server/tls.rs: the serving key
//! is always ECDSA P-256, whatever the CA key):
//! - warm (renewal on a live connection): the CSR's signature check
//!   (P-256 verify), the token's check (ES256: P-256 verify; a cluster's
//!   RS256 service-account token: RSA-2048 verify) and the leaf's signature
//!   with the CA key (RSA-2048 PKCS#1 or P-256);
//! - cold (new connection): warm, plus the TLS 1.3 handshake's X25519 and
//!   CertificateVerify (P-256 sign; RSA-PSS with an RSA serving key, which
//!   this server never has).
// A benchmark: a panic is a failed run, not a fault of the CA.
#![allow(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::hint::black_box;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A 400-byte message: about the size of a leaf's TBSCertificate.
const MSG: [u8; 400] = [0x5a; 400];

type Op = (&'static str, Box<dyn FnMut()>);

/// The operations, written once for both providers: aws-lc-rs keeps ring's
/// API except where `$glue` bridges it.
macro_rules! ops {
    ($c:ident, $glue:ident) => {
        pub fn ops(rsa_pkcs8: &[u8], p256_pkcs8: &[u8]) -> Vec<super::Op> {
            use super::{MSG, black_box};
            use $c::rand::SystemRandom;
            use $c::signature::{self as sig, KeyPair};
            let rng = SystemRandom::new();
            let rsa = std::rc::Rc::new(sig::RsaKeyPair::from_pkcs8(rsa_pkcs8).unwrap());
            let p256 = std::rc::Rc::new($glue::ecdsa(p256_pkcs8, &rng));
            let mut rsa_sig = vec![0; 2048 / 8];
            rsa.sign(&sig::RSA_PKCS1_SHA256, &rng, &MSG, &mut rsa_sig)
                .unwrap();
            let rsa_pub = rsa.public_key().as_ref().to_vec();
            let p256_sig = p256.sign(&rng, &MSG).unwrap().as_ref().to_vec();
            let p256_pub = p256.public_key().as_ref().to_vec();
            let (r1, r2) = (rsa.clone(), rsa.clone());
            let (g1, g2, g3, g4) = (rng.clone(), rng.clone(), rng.clone(), rng.clone());
            let mut out1 = rsa_sig.clone();
            let mut out2 = rsa_sig.clone();
            vec![
                (
                    "RSA-2048 PKCS#1 SHA-256 sign",
                    Box::new(move || {
                        r1.sign(&sig::RSA_PKCS1_SHA256, &g1, black_box(&MSG), &mut out1)
                            .unwrap()
                    }),
                ),
                (
                    "RSA-2048 PSS SHA-256 sign",
                    Box::new(move || {
                        r2.sign(&sig::RSA_PSS_SHA256, &g2, black_box(&MSG), &mut out2)
                            .unwrap()
                    }),
                ),
                (
                    "RSA-2048 PKCS#1 SHA-256 verify",
                    Box::new(move || {
                        sig::UnparsedPublicKey::new(&sig::RSA_PKCS1_2048_8192_SHA256, &rsa_pub)
                            .verify(black_box(&MSG), &rsa_sig)
                            .unwrap()
                    }),
                ),
                (
                    "ECDSA P-256 SHA-256 sign",
                    Box::new(move || {
                        black_box(p256.sign(&g3, black_box(&MSG)).unwrap());
                    }),
                ),
                (
                    "ECDSA P-256 SHA-256 verify",
                    Box::new(move || {
                        sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_ASN1, &p256_pub)
                            .verify(black_box(&MSG), &p256_sig)
                            .unwrap()
                    }),
                ),
                (
                    "X25519 keygen + agree",
                    Box::new(move || {
                        black_box($glue::x25519(&g4));
                    }),
                ),
            ]
        }
    };
}

mod with_ring {
    mod glue {
        use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
        use ring::rand::SystemRandom;
        use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};

        pub fn ecdsa(pkcs8: &[u8], rng: &SystemRandom) -> EcdsaKeyPair {
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, rng).unwrap()
        }

        /// One side of a key exchange: an ephemeral key, its public half,
        /// and the agreement with a peer's (a fixed point stands in).
        pub fn x25519(rng: &SystemRandom) -> u8 {
            let key = EphemeralPrivateKey::generate(&X25519, rng).unwrap();
            let public = key.compute_public_key().unwrap();
            let peer = UnparsedPublicKey::new(&X25519, [9u8; 32]);
            public.as_ref()[0] ^ agreement::agree_ephemeral(key, &peer, |k: &[u8]| k[0]).unwrap()
        }
    }
    ops!(ring, glue);
}

mod with_aws_lc {
    mod glue {
        use aws_lc_rs::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
        use aws_lc_rs::rand::SystemRandom;
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};

        pub fn ecdsa(pkcs8: &[u8], _rng: &SystemRandom) -> EcdsaKeyPair {
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8).unwrap()
        }

        pub fn x25519(rng: &SystemRandom) -> u8 {
            let key = EphemeralPrivateKey::generate(&X25519, rng).unwrap();
            let public = key.compute_public_key().unwrap();
            let peer = UnparsedPublicKey::new(&X25519, [9u8; 32]);
            public.as_ref()[0]
                ^ agreement::agree_ephemeral(key, peer, (), |k: &[u8]| Ok(k[0])).unwrap()
        }
    }
    ops!(aws_lc_rs, glue);
}

/// CPU time of the calling thread, in nanoseconds (the scheduler's own
/// account, /proc/thread-self/schedstat): other processes on a busy machine
/// do not count, as they would in wall time.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Microseconds of this thread's CPU per call of `f`: batches of about
/// 50 ms over `total`, the median batch.
fn time(f: &mut dyn FnMut(), total: Duration) -> f64 {
    let mut n = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        if t.elapsed() >= Duration::from_millis(20) {
            break;
        }
        n *= 2;
    }
    let t = thread_cpu_ns();
    for _ in 0..n {
        f();
    }
    let n = ((n as f64 * 50e6 / (thread_cpu_ns() - t).max(1) as f64) as u64).max(1);
    let mut batches = Vec::new();
    let end = Instant::now() + total;
    while Instant::now() < end || batches.len() < 5 {
        let t = thread_cpu_ns();
        for _ in 0..n {
            f();
        }
        batches.push((thread_cpu_ns() - t) as f64 / 1e3 / n as f64);
    }
    batches.sort_by(f64::total_cmp);
    batches[batches.len() / 2]
}

/// The server's figures from `ca bench <mode> --json --ca-key <key>`.
struct Server {
    certs_per_sec: f64,
    server_cpu_us: f64,
    client_cpu_us: f64,
    p99_ms: f64,
}

fn ca_bench(mode: &str, ca_key: &str, duration: u64) -> Option<Server> {
    let ca = env!("CARGO_BIN_EXE_ca");
    let mut cmd = Command::new(ca);
    cmd.args(["bench", mode, "--json", "--ca-key", ca_key])
        .args(["--duration", &format!("{duration}s")])
        .stderr(Stdio::null());
    let out = cmd.output().ok()?;
    if !out.status.success() {
        println!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stdout));
        return None;
    }
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(Server {
        certs_per_sec: j["certs_per_sec"].as_f64()?,
        server_cpu_us: j["server"]["cpu_us_per_cert"].as_f64()?,
        client_cpu_us: j["client_cpu_us_per_cert"].as_f64().unwrap_or(0.0),
        p99_ms: j["latency_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
    })
}

fn main() {
    let mut seconds = 1.0f64;
    let mut duration = 15u64;
    let mut server = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--seconds" => seconds = args.next().unwrap().parse().unwrap(),
            "--duration" => duration = args.next().unwrap().trim_end_matches('s').parse().unwrap(),
            "--no-server" => server = false,
            other => panic!("unknown option {other:?}"),
        }
    }
    let total = Duration::from_secs_f64(seconds);

    // Keys made by neither provider: an RSA-2048 key from the `rsa` crate
    // (ring cannot generate RSA keys), a P-256 key from ring.
    let rsa_pkcs8 = {
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        key.to_pkcs8_der().unwrap().as_bytes().to_vec()
    };
    let p256_pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &ring::rand::SystemRandom::new(),
    )
    .unwrap()
    .as_ref()
    .to_vec();

    let mut ring_ops = with_ring::ops(&rsa_pkcs8, &p256_pkcs8);
    let mut aws_ops = with_aws_lc::ops(&rsa_pkcs8, &p256_pkcs8);
    println!(
        "CPU time of one thread, median of ~50 ms batches over {seconds} s per operation and provider; load {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "{:<34} {:>10} {:>13} {:>14}",
        "operation", "ring us", "aws-lc-rs us", "ring/aws-lc"
    );
    let mut us = std::collections::HashMap::new();
    for ((name, r), (_, a)) in ring_ops.iter_mut().zip(aws_ops.iter_mut()) {
        // Interleaved, so a change of machine load falls on both.
        let tr = time(r.as_mut(), total);
        let ta = time(a.as_mut(), total);
        println!("{name:<34} {tr:>10.1} {ta:>13.1} {:>13.2}x", tr / ta);
        us.insert(*name, (tr, ta));
    }
    let op = |n: &str| us[n];
    let (rsa_sign, p256_sign, p256_verify, rsa_verify, x25519) = (
        op("RSA-2048 PKCS#1 SHA-256 sign"),
        op("ECDSA P-256 SHA-256 sign"),
        op("ECDSA P-256 SHA-256 verify"),
        op("RSA-2048 PKCS#1 SHA-256 verify"),
        op("X25519 keygen + agree"),
    );
    let sum = |parts: &[(f64, f64)]| {
        parts
            .iter()
            .fold((0.0, 0.0), |acc, p| (acc.0 + p.0, acc.1 + p.1))
    };
    // Public-key work per certificate. `ca bench` signs RS256 tokens with
    // an RSA-2048 issuer key, as a cluster's service-account issuer; the
    // server checks each one (no cache) and each CSR's P-256 signature.
    let warm = sum(&[rsa_sign, p256_verify, rsa_verify]);
    let warm_es256 = sum(&[rsa_sign, p256_verify, p256_verify]);
    let cold = sum(&[rsa_sign, p256_verify, rsa_verify, p256_sign, x25519]);
    let warm_p256 = sum(&[p256_sign, p256_verify, rsa_verify]);
    let cold_p256 = sum(&[p256_sign, p256_verify, rsa_verify, p256_sign, x25519]);
    println!();
    println!("public-key work per certificate, ring vs aws-lc-rs (us of CPU):");
    for (name, (r, a)) in [
        ("warm, RSA-2048 CA, RS256 token", warm),
        ("warm, RSA-2048 CA, ES256 token", warm_es256),
        ("cold, RSA-2048 CA, RS256 token", cold),
        ("warm, P-256 CA, RS256 token", warm_p256),
        ("cold, P-256 CA, RS256 token", cold_p256),
    ] {
        println!(
            "  {name:<32} ring {r:>7.1}  aws-lc-rs {a:>7.1}  saved {:>7.1}",
            r - a
        );
    }

    if !server {
        return;
    }
    println!();
    for (mode, (r, a)) in [("warm", warm), ("cold", cold)] {
        // Only the public-key operations change here; hashing, AES-GCM and
        // the rest of a certificate's CPU are left as they are.
        let Some(s) = ca_bench(mode, "rsa-2048", duration) else {
            println!("`ca bench {mode} --ca-key rsa-2048` not available in this build: skipped");
            continue;
        };
        let saved = r - a;
        // Client and server share the machine's two cores and the run is
        // CPU-bound: the rate follows the CPU both spend per certificate.
        let both = s.server_cpu_us + s.client_cpu_us;
        println!(
            "ca bench {mode} --ca-key rsa-2048 ({duration}s): {:.0} certs/s, p99 {:.1} ms, \
             server CPU {:.0} us/cert, client {:.0} us/cert",
            s.certs_per_sec, s.p99_ms, s.server_cpu_us, s.client_cpu_us
        );
        println!(
            "  with aws-lc-rs: server CPU {:.0} -> {:.0} us/cert ({:+.1}%); \
             certs/s {:.0} -> ~{:.0} here (client sharing the cores), \
             a core of server alone {:.0} -> {:.0} certs/s",
            s.server_cpu_us,
            s.server_cpu_us - saved,
            -saved / s.server_cpu_us * 100.0,
            s.certs_per_sec,
            s.certs_per_sec * both / (both - saved),
            1e6 / s.server_cpu_us,
            1e6 / (s.server_cpu_us - saved)
        );
    }
}
