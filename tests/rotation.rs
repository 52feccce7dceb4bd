//! `ca rotate-root` against real `ca` processes: each step through the
//! admin socket with its gate, the same on a state directory with no
//! server, a plugged-in CA replaced by one under another root, restarts,
//! and `kill -9`-like crashes at every write of every step.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::cacerts::{make_intermediate, make_root_named};
use common::procs::CaProc;
use common::*;

/// `ca rotate-root ARGS --state-dir STATE`, with `env`.
fn rotate(state: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ca"))
        .arg("rotate-root")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(state: &Path, args: &[&str]) -> String {
    let out = rotate(state, args, &[]);
    assert!(out.status.success(), "rotate-root {args:?}: {}", text(&out));
    text(&out)
}

fn refused(state: &Path, args: &[&str]) -> String {
    let out = rotate(state, args, &[]);
    assert!(
        !out.status.success(),
        "rotate-root {args:?} should be refused: {}",
        text(&out)
    );
    text(&out)
}

/// `status --json`.
fn status(state: &Path) -> serde_json::Value {
    let out = rotate(state, &["status", "--json"], &[]);
    assert!(out.status.success(), "status: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// (id, state) of each authority.
fn members(s: &serde_json::Value) -> Vec<(String, String)> {
    s["authorities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_owned(),
                a["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn active_id(s: &serde_json::Value) -> String {
    members(s)
        .into_iter()
        .find(|(_, st)| st == "active")
        .unwrap()
        .0
}

/// Waits until `root-cert.pem` holds `n` roots.
async fn roots_on_disk(state: &Path, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pem = fs::read_to_string(state.join("root-cert.pem")).unwrap_or_default();
        if ders(&pem).len() == n {
            return pem;
        }
        assert!(
            Instant::now() < deadline,
            "root-cert.pem never held {n} roots: {pem}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A leaf from `ca`, checked by openssl against `root_pem` alone.
async fn leaf_verifies_under(ca: &CaProc, root_pem: &str) -> Vec<String> {
    let mut chain = ca.issue_chain().await;
    *chain.last_mut().unwrap() = root_pem.to_owned();
    openssl_verify(&chain);
    chain
}

fn key_bytes(state: &Path, id: &str) -> Vec<u8> {
    fs::read(state.join("ca").join(id).join("ca-key.pem")).unwrap()
}

#[tokio::test]
async fn each_step_through_the_admin_socket_is_gated_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let ca = CaProc::start_at(&state, &["--auto-rotate", "off"], &[]);
    let socket = state.join("admin.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600,
        "only the operator reaches the admin socket"
    );
    let s = status(&state);
    assert_eq!(s["generation"], 1);
    let old = active_id(&s);
    let old_root = roots_on_disk(&state, 1).await;
    // A client that is not one of our agents (it learns the bundle only
    // from its next answer) holds a leaf of the old authority.
    leaf_verifies_under(&ca, &old_root).await;

    let out = ok(&state, &["prepare"]);
    assert!(out.contains("prepare: done"), "{out}");
    let s = status(&state);
    assert_eq!(s["generation"], 2);
    let new = members(&s)
        .into_iter()
        .find(|(_, st)| st == "prepared")
        .unwrap()
        .0;
    let both = roots_on_disk(&state, 2).await;
    assert!(both.contains(old_root.trim()), "the old root stays trusted");
    let new_root: String = both.replace(old_root.trim(), "").trim().to_owned() + "\n";
    assert_eq!(ders(&new_root).len(), 1);

    // Activation waits for that client's leaf (issued before the prepare).
    let why = refused(&state, &["activate"]);
    assert!(
        why.contains("not workload-ca agents") && why.contains("--force"),
        "{why}"
    );
    assert_eq!(
        status(&state)["generation"],
        2,
        "a refused step changes nothing"
    );
    ok(&state, &["activate", "--force"]);
    let s = status(&state);
    assert_eq!(
        (s["generation"].as_u64(), active_id(&s)),
        (Some(3), new.clone())
    );
    // New leaves chain to the new root alone.
    leaf_verifies_under(&ca, &new_root).await;

    // Retirement waits for the old authority's leaves.
    let why = refused(&state, &["retire"]);
    assert!(why.contains(&format!("authority {old}")), "{why}");
    ok(&state, &["retire", "--force"]);
    assert_eq!(status(&state)["generation"], 4);
    let left = roots_on_disk(&state, 1).await;
    assert_eq!(ders(&left), ders(&new_root), "the old root left the bundle");
    assert!(
        !state.join("ca").join(&old).exists(),
        "the old key is deleted"
    );
    let new_key = key_bytes(&state, &new);

    // A restart comes back where it was, with the same keys.
    ca.kill9();
    let ca = CaProc::start_at(&state, &["--auto-rotate", "off"], &[]);
    let s = status(&state);
    assert_eq!(
        (s["generation"].as_u64(), active_id(&s)),
        (Some(4), new.clone())
    );
    assert_eq!(key_bytes(&state, &new), new_key);
    leaf_verifies_under(&ca, &new_root).await;
}

#[tokio::test]
async fn with_no_server_the_state_directory_changes_under_its_lock_and_a_server_follows() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    // Created by a server, which then stops.
    CaProc::start_at(&state, &["--auto-rotate", "off"], &[]).kill9();
    let s = status(&state);
    let old = active_id(&s);
    let out = ok(&state, &["prepare"]);
    assert!(out.contains("no server is running"), "{out}");
    let why = refused(&state, &["activate"]);
    assert!(why.contains("no server is running"), "{why}");
    ok(&state, &["activate", "--force"]);
    let s = status(&state);
    assert_eq!(s["generation"], 3);
    assert_ne!(active_id(&s), old);

    // A server started now signs with the new authority, and follows a
    // change made beside it (its admin socket off, so the command works
    // on the directory).
    let ca = CaProc::start_at(
        &state,
        &["--auto-rotate", "off", "--admin-socket", "off"],
        &[],
    );
    let both = roots_on_disk(&state, 2).await;
    let new_root =
        fs::read_to_string(state.join("ca").join(active_id(&s)).join("root-cert.pem")).unwrap();
    assert!(both.contains(new_root.trim()));
    leaf_verifies_under(&ca, &new_root).await;
    // The command sees the server it cannot reach, and changes its state
    // directory only when forced.
    let why = refused(&state, &["retire"]);
    assert!(
        why.contains("does not answer") && why.contains("--force"),
        "{why}"
    );
    ok(&state, &["retire", "--force"]);
    roots_on_disk(&state, 1).await;
    let chain = ca.issue_chain().await;
    assert_eq!(
        ders(chain.last().unwrap()),
        ders(&new_root),
        "the server followed the retirement"
    );
}

/// Whether `step` reaches crash point `point`: only prepare writes a new
/// authority; a swap sweeps when something is to be deleted (a retired
/// authority, or what an earlier crash left behind).
fn reaches(step: &str, point: &str, leftovers: bool) -> bool {
    match point {
        "cacerts-partial" => step == "prepare",
        "sweeping" => step == "retire" || leftovers,
        _ => true,
    }
}

/// Entries of the store that its manifest does not name.
fn leftovers(state: &Path) -> Vec<String> {
    let s = status(state);
    let ids: Vec<String> = members(&s).into_iter().map(|(id, _)| id).collect();
    fs::read_dir(state.join("ca"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "authorities.json" && n != ".lock" && n != ".server" && !ids.contains(n))
        .collect()
}

#[tokio::test]
async fn a_crash_at_any_write_of_any_step_leaves_the_state_before_or_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    CaProc::start_at(&state, &["--auto-rotate", "off"], &[]).kill9();
    let points = [
        "cacerts-partial",
        "members-written",
        "manifest-temp",
        "manifest-written",
        "sweeping",
    ];
    let mut crashes = 0;
    // A whole rotation per crash point, each step crashed there once.
    for point in points {
        for step in ["prepare", "activate", "retire"] {
            let before = status(&state);
            let g = before["generation"].as_u64().unwrap();
            let keys: Vec<(String, Vec<u8>)> = members(&before)
                .into_iter()
                .map(|(id, _)| (id.clone(), key_bytes(&state, &id)))
                .collect();
            let args: &[&str] = if step == "prepare" {
                &[step]
            } else {
                &[step, "--force"]
            };
            let left = !leftovers(&state).is_empty();
            let out = rotate(&state, args, &[("WORKLOAD_CA_CRASH_AT", point)]);
            let crashed = !out.status.success();
            assert_eq!(
                crashed,
                reaches(step, point, left),
                "{step} at {point}: {}",
                text(&out)
            );
            crashes += usize::from(crashed);
            // Readable, before or after the step, with every key it had.
            let after = status(&state);
            let ga = after["generation"].as_u64().unwrap();
            assert!(
                ga == g || ga == g + 1,
                "{step} at {point}: generation {ga} from {g}"
            );
            for (id, key) in &keys {
                if members(&after).iter().any(|(m, _)| m == id) {
                    assert_eq!(
                        &key_bytes(&state, id),
                        key,
                        "{step} at {point}: key of {id} changed"
                    );
                }
            }
            if ga == g {
                assert_eq!(members(&after), members(&before), "{step} at {point}");
                ok(&state, args);
            }
            assert_eq!(status(&state)["generation"].as_u64(), Some(g + 1));
            if step == "retire" && point == "manifest-written" {
                // The retired key outlived the crash; the next start deletes it.
                assert!(!leftovers(&state).is_empty());
                CaProc::start_at(&state, &["--auto-rotate", "off"], &[]).kill9();
                assert_eq!(leftovers(&state), Vec::<String>::new(), "tidied at start");
            }
        }
    }
    assert!(
        crashes >= 11,
        "every point on each step's path was hit: {crashes}"
    );
    // The state still serves: a server starts on it and issues leaves that
    // verify under the bundle on disk.
    let ca = CaProc::start_at(&state, &["--auto-rotate", "off"], &[]);
    let pem = roots_on_disk(&state, 1).await;
    let chain = ca.issue_chain().await;
    assert_eq!(ders(chain.last().unwrap()), ders(&pem));
    openssl_verify(&chain);
    // Nothing left behind: the manifest, the lock, one authority.
    let mut names: Vec<String> = fs::read_dir(state.join("ca"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want = vec![
        ".lock".to_string(),
        ".server".into(),
        "authorities.json".into(),
        active_id(&status(&state)),
    ];
    want.sort();
    assert_eq!(names, want);
}

#[tokio::test]
async fn a_plugged_in_ca_moves_to_one_under_another_root() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    make_root_named(&a, 3650, "/O=Example Org/CN=Old Root CA");
    make_intermediate(&a, &a, false, true);
    make_root_named(&b, 3650, "/O=Example Org/CN=New Root CA");
    make_intermediate(&b, &b, true, true);
    let state = tmp.path().join("state");
    let cacerts_a = a.to_str().unwrap().to_owned();
    let ca = CaProc::start_at(&state, &["--cacerts", &cacerts_a], &[]);
    let root_a = fs::read_to_string(a.join("root-cert.pem")).unwrap();
    let root_b = fs::read_to_string(b.join("root-cert.pem")).unwrap();
    leaf_verifies_under(&ca, &root_a).await;

    // The whole flow in one command; --force because the leaf above was
    // issued to a client that is not one of our agents.
    let out = ok(&state, &["--from", b.to_str().unwrap(), "--force"]);
    assert!(out.contains("rotation complete"), "{out}");
    let pem = roots_on_disk(&state, 1).await;
    assert_eq!(ders(&pem), ders(&root_b));
    let chain = leaf_verifies_under(&ca, &root_b).await;
    assert_eq!(chain.len(), 3, "leaf, the new intermediate, the root");

    // A restart with the old --cacerts is refused with what to do.
    ca.kill9();
    let out = Command::new(env!("CARGO_BIN_EXE_ca"))
        .args([
            "server",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "off",
            "--cacerts",
            &cacerts_a,
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .unwrap();
    let why = text(&out);
    assert!(!out.status.success());
    assert!(
        why.contains("not one of this CA's authorities") && why.contains("rotate-root"),
        "{why}"
    );
    // With the new one it starts.
    let ca = CaProc::start_at(&state, &["--cacerts", b.to_str().unwrap()], &[]);
    leaf_verifies_under(&ca, &root_b).await;
}

#[tokio::test]
async fn a_server_killed_inside_a_step_comes_back_before_or_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    CaProc::start_at(&state, &["--auto-rotate", "off"], &[]).kill9();
    // The server itself dies between the new manifest and the sweep.
    let ca = CaProc::start_at(
        &state,
        &["--auto-rotate", "off"],
        &[("WORKLOAD_CA_CRASH_AT", "manifest-written")],
    );
    let old = active_id(&status(&state));
    let out = rotate(&state, &["prepare"], &[]);
    assert!(
        !out.status.success(),
        "the server died mid-step: {}",
        text(&out)
    );
    let mut ca = ca;
    let code = ca.child.wait().unwrap();
    assert!(!code.success(), "aborted: {code:?}");
    drop(ca);
    // Restarted: the step happened (the manifest was written), same keys.
    let old_key = key_bytes(&state, &old);
    let ca = CaProc::start_at(&state, &["--auto-rotate", "off"], &[]);
    let s = status(&state);
    assert_eq!(s["generation"], 2);
    assert_eq!(active_id(&s), old);
    assert_eq!(key_bytes(&state, &old), old_key);
    roots_on_disk(&state, 2).await;
    ok(&state, &["activate", "--force"]);
    leaf_verifies_under(
        &ca,
        &fs::read_to_string(
            state
                .join("ca")
                .join(active_id(&status(&state)))
                .join("root-cert.pem"),
        )
        .unwrap(),
    )
    .await;
}

/// `kill -9` at arbitrary instants of real steps (no injected crash point):
/// every time, the store reads as a whole set, before or after the step.
#[tokio::test]
async fn kill_9_at_arbitrary_instants_never_leaves_a_half_step() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    CaProc::start_at(&state, &["--auto-rotate", "off"], &[]).kill9();
    let mut changed = 0;
    for i in 0..30u64 {
        let before = status(&state);
        let g = before["generation"].as_u64().unwrap();
        let step = match Step::of(&before) {
            "prepare" => vec!["prepare"],
            s => vec![s, "--force"],
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_ca"))
            .arg("rotate-root")
            .args(&step)
            .arg("--state-dir")
            .arg(&state)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Spread over 0.5-40 ms: before, during and after a step's writes.
        std::thread::sleep(Duration::from_micros(500 + (i * 7919) % 40_000));
        let _ = child.kill();
        let _ = child.wait();
        let after = status(&state);
        let ga = after["generation"].as_u64().unwrap();
        assert!(ga == g || ga == g + 1, "generation {ga} from {g}");
        if ga == g {
            assert_eq!(members(&after), members(&before));
        } else {
            changed += 1;
        }
    }
    eprintln!("{changed} of 30 killed steps had completed");
    // The kills landed on both sides of the writes (else this test would
    // not be testing what its name says).
    assert!(
        changed > 0 && changed < 30,
        "{changed} of 30 killed steps completed"
    );
    let ca = CaProc::start_at(&state, &["--auto-rotate", "off"], &[]);
    let n = members(&status(&state)).len();
    let pem = roots_on_disk(&state, n).await;
    let chain = ca.issue_chain().await;
    assert_eq!(ders(chain.last().unwrap()), ders(&pem));
}

/// The next step of a status.
struct Step;

impl Step {
    fn of(s: &serde_json::Value) -> &'static str {
        let states: Vec<String> = members(s).into_iter().map(|(_, st)| st).collect();
        if states.iter().any(|s| s == "retiring") {
            "retire"
        } else if states.iter().any(|s| s == "prepared") {
            "activate"
        } else {
            "prepare"
        }
    }
}
