//! `ca bench agent` end to end: the real binary starts a CA and an agent,
//! holds SDS streams through rotations and reports one JSON object. Not
//! timed: only that every stream got every rotation and the report holds.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs `ca bench agent <args>`, killed after `limit`.
fn bench(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ca"))
        .args(["bench", "agent"])
        .args(args)
        .env_remove("CA_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ca bench agent ran past {limit:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

fn num(v: &Value, path: &str) -> f64 {
    let mut at = v;
    for key in path.split('.') {
        at = &at[key];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v}"))
}

/// The default shape: Envoy's (10 proxies, each one connection with a
/// stream for `default` and one for `ROOTCA`, a ~61 KB node first).
#[test]
fn streams_get_every_rotation_and_the_report_holds() {
    let r = run_and_check(&[], 20, 10);
    assert_eq!(r["shape"], "envoy", "{r}");
    assert_eq!(num(&r, "connections"), 10.0, "{r}");
    assert_eq!(num(&r, "node_bytes"), 61000.0, "{r}");
}

/// The worst case for connections: each stream its own, subscribed to
/// both names; an odd count in the Envoy shape leaves the last proxy
/// with one stream.
#[test]
fn the_other_shape_and_odd_counts() {
    let r = run_and_check(
        &[
            "--shape",
            "one-stream-per-connection",
            "--node-bytes",
            "1000",
        ],
        7,
        7,
    );
    assert_eq!(r["shape"], "one-stream-per-connection", "{r}");
    assert_eq!(num(&r, "connections"), 7.0, "{r}");
    assert_eq!(num(&r, "node_bytes"), 1000.0, "{r}");
    let r = run_and_check(&["--node-bytes", "0"], 7, 4);
    assert_eq!(num(&r, "connections"), 4.0, "{r}");
}

/// Runs the bench with `streams` streams, 2 rotations of 3 s certificates
/// and `extra` flags, checks that the `cert_streams` streams subscribed to
/// `default` got every rotation and that the report holds, and returns it.
fn run_and_check(extra: &[&str], streams: usize, cert_streams: usize) -> Value {
    let n = streams.to_string();
    let mut args = vec![
        "--json",
        "--streams",
        n.as_str(),
        "--rotations",
        "2",
        "--cert-ttl",
        "3s",
    ];
    args.extend_from_slice(extra);
    let out = bench(&args, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "one JSON object: {stdout}"
    );
    let r: Value = serde_json::from_str(stdout.trim()).unwrap();

    assert_eq!(r["mode"], "agent");
    assert_eq!(num(&r, "streams"), streams as f64);
    assert_eq!(num(&r, "cert_streams"), cert_streams as f64, "{r}");
    let want = cert_streams as f64;
    assert_eq!(num(&r, "rotations"), 2.0);
    assert_eq!(num(&r, "cert_ttl_ms"), 3000.0);
    assert_eq!(num(&r, "missed_pushes"), 0.0, "{r}");
    assert_eq!(num(&r, "stream_errors"), 0.0, "{r}");
    assert_eq!(r["timing_from"], "agent_log", "{r}");

    let rotations = r["push_ms"]["per_rotation"].as_array().unwrap();
    assert_eq!(rotations.len(), 2);
    let mut serials = std::collections::HashSet::new();
    let mut max: f64 = 0.0;
    for rot in rotations {
        assert_eq!(num(rot, "received"), want, "{rot}");
        assert_eq!(num(rot, "missed"), 0.0, "{rot}");
        assert_eq!(rot["from"], "agent_log");
        let serial = rot["serial"].as_str().unwrap();
        assert!(
            !serial.is_empty() && serial.bytes().all(|b| b.is_ascii_hexdigit()),
            "{rot}"
        );
        assert!(
            serials.insert(serial.to_owned()),
            "two rotations, two certificates"
        );
        let (first, p50, p99, last) = (
            num(rot, "first_ms"),
            num(rot, "p50_ms"),
            num(rot, "p99_ms"),
            num(rot, "last_ms"),
        );
        assert!(
            0.0 <= first && first <= p50 && p50 <= p99 && p99 <= last && last < 5000.0,
            "{rot}"
        );
        max = max.max(last);
    }
    assert_eq!(num(&r, "push_ms.max"), max);

    let idle = num(&r, "agent.idle_rss_bytes");
    let rss = num(&r, "agent.rss_bytes");
    let peak = num(&r, "agent.peak_rss_bytes");
    assert!(idle > 1e6 && rss > 1e6 && peak >= rss && rss < 1e9, "{r}");
    assert!(num(&r, "agent.pid") > 0.0);
    assert!(num(&r, "agent.rotation_phase_seconds") > 0.0);
    assert!(num(&r, "agent.cpu_ms_rotations") >= 0.0);
    assert!(num(&r, "open.seconds") > 0.0);
    // The agent's own view: every stream connected, nothing refused.
    assert_eq!(num(&r, "agent.metrics.sds_streams"), streams as f64, "{r}");
    assert_eq!(num(&r, "agent.metrics.limit_refusals"), 0.0, "{r}");
    // Each rotation's push to the streams subscribed to `default`.
    assert!(num(&r, "agent.metrics.pushes_acked") >= 2.0 * want, "{r}");
    let flags: Vec<&str> = r["agent_flags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        flags
            .iter()
            .any(|f| f.starts_with("--sds-max-connections=")),
        "{flags:?}"
    );
    assert!(r["targets"]["push_met"].is_boolean() && r["targets"]["rss_met"].is_boolean());
    r
}

#[test]
fn too_many_streams_for_the_open_files_limit_is_a_clear_error() {
    let out = bench(&["--streams", "100000000"], Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("open files") && stderr.contains("ulimit -n"),
        "{stderr}"
    );
}
