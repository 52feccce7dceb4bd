//! `ca bench soak`, shortened: a CA, two agents renewing every couple of
//! seconds with SDS streams checking every certificate, a paced load, and a
//! root rotation in the middle. The run must end with no error, the
//! rotation complete, and every figure in its report. Not timed: the
//! figures are only checked for sanity.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

fn soak(args: &[&str]) -> (bool, Option<Value>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ca"))
        .args(["bench", "soak", "--json"])
        .args(args)
        .output()
        .expect("running ca bench soak");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let json = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok());
    (out.status.success(), json, format!("{stdout}\n{stderr}"))
}

fn n(v: &Value, path: &[&str]) -> u64 {
    let mut at = v;
    for p in path {
        at = &at[*p];
    }
    at.as_u64()
        .unwrap_or_else(|| panic!("{path:?} is not a count in {v:#}"))
}

#[test]
fn a_short_soak_with_a_root_rotation_has_no_error() {
    let started = Instant::now();
    let (ok, r, out) = soak(&[
        "--duration",
        "24s",
        "--identities",
        "40",
        "--soak-agents",
        "2",
        "--soak-workloads",
        "2",
        "--soak-cert-ttl",
        "4s",
        "--soak-rate",
        "100",
        "--soak-concurrency",
        "4",
        "--soak-load-ttl",
        "3s",
        "--soak-warmup",
        "4s",
        "--soak-sample",
        "1s",
        // Tolerant limits: a short run is no leak test.
        "--soak-max-rss-growth",
        "64",
        "--soak-max-fd-growth",
        "16",
    ]);
    let r = r.unwrap_or_else(|| panic!("no JSON report:\n{out}"));
    assert!(ok, "the soak failed:\n{r:#}");
    assert_eq!(r["mode"], "soak");
    assert_eq!(r["passed"], true, "{r:#}");
    assert_eq!(n(&r, &["error_total"]), 0, "{r:#}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r:#}");
    // The rotation ran every step, each on its gate.
    let rot = &r["root_rotation"];
    assert_eq!(rot["completed"], true, "{r:#}");
    let said = rot["output"].to_string();
    for step in ["prepare: done", "activate: done", "retire: done"] {
        assert!(said.contains(step), "{step} missing: {r:#}");
    }
    // Streams saw rotations and checked every certificate.
    assert_eq!(n(&r, &["sds", "streams"]), 4, "{r:#}");
    assert!(n(&r, &["sds", "rotations_seen"]) >= 8, "{r:#}");
    assert!(
        n(&r, &["sds", "certificates_checked"]) > n(&r, &["sds", "rotations_seen"]),
        "{r:#}"
    );
    assert_eq!(n(&r, &["sds", "missed_rotations"]), 0, "{r:#}");
    assert!(n(&r, &["sds", "renewals"]) >= 8, "{r:#}");
    // The load ran and some answers were checked.
    assert!(n(&r, &["load", "ok"]) > 500, "{r:#}");
    assert_eq!(
        n(&r, &["load", "ok"]),
        n(&r, &["load", "requests"]),
        "{r:#}"
    );
    assert!(n(&r, &["load", "verified"]) >= 5, "{r:#}");
    // Memory and descriptors of the CA and of each agent.
    let procs: Vec<&Value> = std::iter::once(&r["ca"])
        .chain(r["agent_procs"].as_array().unwrap())
        .collect();
    assert_eq!(procs.len(), 3, "{r:#}");
    for p in procs {
        assert!(n(p, &["samples"]) >= 10, "{p:#}");
        assert!(n(p, &["rss_start_bytes"]) > 1_000_000, "{p:#}");
        assert!(
            n(p, &["rss_max_bytes"]) >= n(p, &["rss_end_bytes"]),
            "{p:#}"
        );
        assert!(n(p, &["fds_start"]) > 3, "{p:#}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(240),
        "the soak stops by itself"
    );
}

#[test]
fn soak_refuses_a_ca_it_did_not_start() {
    let (ok, _, out) = soak(&[
        "--addr",
        "127.0.0.1:1",
        "--root-cert",
        "/nonexistent",
        "--tokens",
        "/nonexistent",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("--addr") || out.contains("nonexistent"),
        "{out}"
    );
}
