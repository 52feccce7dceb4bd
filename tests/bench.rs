//! `ca bench` itself, briefly, in each mode against a CA it starts: every
//! call succeeds, answers are verified, and the report is well formed. Not
//! timed: the figures are only checked for sanity.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ca"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("running ca bench");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let json = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| panic!("no JSON report; stdout:\n{stdout}\nstderr:\n{stderr}"));
    (out.status.success(), json, stderr)
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut at = v;
    for p in path {
        at = &at[*p];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v:#}"))
}

/// Zero errors, the counts add up, latencies ordered, the server's figures
/// read from /proc.
fn assert_clean(r: &Value, at_least: u64) {
    assert_eq!(r["errors"], serde_json::json!({}), "{r:#}");
    let ok = r["ok"].as_u64().unwrap();
    assert!(ok >= at_least, "{ok} < {at_least}: {r:#}");
    assert_eq!(r["requests"].as_u64().unwrap(), ok, "{r:#}");
    let l = |k| num(r, &["latency_ms", k]);
    assert!(
        0.0 < l("p50") && l("p50") <= l("p90") && l("p90") <= l("p99") && l("p99") <= l("max"),
        "{r:#}"
    );
    assert!(
        num(r, &["certs_per_sec"]) > 0.0 && num(r, &["seconds"]) > 0.0,
        "{r:#}"
    );
    assert!(num(r, &["server", "pid"]) > 0.0, "{r:#}");
    assert!(num(r, &["server", "peak_rss_bytes"]) > 1e6, "{r:#}");
    assert!(num(r, &["server", "cpu_us_per_cert"]) >= 0.0, "{r:#}");
}

#[test]
fn warm_reports_every_figure_and_verifies_answers() {
    let (ok, r, err) = bench(&[
        "warm",
        "--requests",
        "300",
        "--warmup",
        "0s",
        "--identities",
        "40",
        "--concurrency",
        "16",
        "--connections",
        "2",
        "--verify",
        "24",
    ]);
    assert!(ok, "{err}");
    assert_eq!(r["mode"], "warm");
    assert_clean(&r, 300);
    assert_eq!(r["verified"].as_u64(), Some(24), "{r:#}");
    assert_eq!(r["connections"].as_u64(), Some(2), "{r:#}");
    // The floor: every part measured, the total their sum, and the ratio.
    let parts: f64 = ["csr_verify_us", "token_verify_us", "sign_us", "encode_us"]
        .iter()
        .map(|k| {
            let v = num(&r, &["floor", k]);
            assert!(v > 0.0, "{k}: {r:#}");
            v
        })
        .sum();
    assert!(
        (num(&r, &["floor", "total_us"]) - parts).abs() < 1e-6,
        "{r:#}"
    );
    assert!(num(&r, &["floor_ratio"]) > 0.0, "{r:#}");
    assert!(
        r["floor"]["connection"].is_null(),
        "warm: no handshakes {r:#}"
    );
    assert!(num(&r, &["client_cpu_us_per_cert"]) >= 0.0, "{r:#}");
}

#[test]
fn cold_opens_a_connection_per_certificate_from_many_sources() {
    let (ok, r, err) = bench(&[
        "cold",
        "--requests",
        "200",
        "--warmup",
        "0s",
        "--identities",
        "40",
        "--concurrency",
        "8",
        "--verify",
        "8",
    ]);
    assert!(ok, "{err}");
    assert_eq!(r["mode"], "cold");
    assert_clean(&r, 200);
    assert_eq!(r["sources"].as_u64(), Some(16), "{r:#}");
    assert_eq!(r["verified"].as_u64(), Some(8), "{r:#}");
    // A new connection's floor: the handshake's key exchange and signature,
    // counted in the ratio.
    let kx = num(&r, &["floor", "connection", "key_exchange_us"]);
    let cv = num(&r, &["floor", "connection", "handshake_sign_us"]);
    assert!(kx > 0.0 && cv > 0.0, "{r:#}");
    assert!(
        (num(&r, &["floor", "connection", "total_us"]) - kx - cv).abs() < 1e-6,
        "{r:#}"
    );
    let per_cert = num(&r, &["floor", "total_us"]) + kx + cv;
    let cpu = num(&r, &["server", "cpu_us_per_cert"]);
    assert!(
        (num(&r, &["floor_ratio"]) - cpu / per_cert).abs() < 1e-6,
        "{r:#}"
    );
}

#[test]
fn burst_serves_every_identity_once() {
    let (ok, r, err) = bench(&[
        "burst",
        "--identities",
        "300",
        "--no-floor",
        "--verify",
        "16",
    ]);
    assert!(ok, "{err}");
    assert_eq!(r["mode"], "burst");
    assert_clean(&r, 300);
    assert_eq!(r["ok"].as_u64(), Some(300), "{r:#}");
    assert_eq!(r["identities"].as_u64(), Some(300), "{r:#}");
    // One source address per 48 identities, as pods come from many.
    assert_eq!(r["sources"].as_u64(), Some(7), "{r:#}");
}

#[test]
fn refused_calls_are_counted_by_status_and_fail_the_run() {
    // The CA accepts another audience than the tokens carry.
    let (ok, r, _) = bench(&[
        "warm",
        "--requests",
        "40",
        "--warmup",
        "0s",
        "--identities",
        "4",
        "--concurrency",
        "4",
        "--connections",
        "1",
        "--no-floor",
        "--server-arg=--jwt-audience=someone-else",
    ]);
    assert!(!ok, "a run with no success must fail: {r:#}");
    assert_eq!(r["ok"].as_u64(), Some(0), "{r:#}");
    let refused = r["errors"]["grpc Unauthenticated"]
        .as_u64()
        .unwrap_or_else(|| panic!("no Unauthenticated count: {r:#}"));
    assert!(refused >= 40, "{r:#}");
}

#[test]
fn bad_flags_are_refused_before_anything_runs() {
    let out = Command::new(env!("CARGO_BIN_EXE_ca"))
        .args(["bench", "warm", "--addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--root-cert"), "{err}");
}
