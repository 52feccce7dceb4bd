//! The state directory read-only, full, or with a corrupted file, at start
//! and in the middle of each step of `ca rotate-root`, against real `ca`
//! processes: a clear error naming the file and the cause, the last good
//! state kept (on disk, and in the running server, which keeps issuing),
//! never a new root made in its place, and the same step taken once the
//! fault is gone.
//!
//! Read-only is a read-only bind mount of the directory over itself, full
//! is a small tmpfs that a filler file fills (as root, file modes stop no
//! write). Every mount is undone when its guard drops (`umount -l`).
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;
#[path = "common/mounts.rs"]
mod mounts;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::procs::CaProc;
use common::*;
use mounts::{Filler, Mount, PAGE};

const NO_AUTO: &[&str] = &["--auto-rotate", "off"];

/// `ca rotate-root ARGS --state-dir STATE`.
fn rotate(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ca"))
        .arg("rotate-root")
        .args(args)
        .arg("--state-dir")
        .arg(state)
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

/// `status --json`.
fn status(state: &Path) -> serde_json::Value {
    let out = rotate(state, &["status", "--json"]);
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

fn with_state(s: &serde_json::Value, state: &str) -> String {
    members(s)
        .into_iter()
        .find(|(_, st)| st == state)
        .unwrap_or_else(|| panic!("no {state} authority: {s}"))
        .0
}

fn generation(s: &serde_json::Value) -> u64 {
    s["generation"].as_u64().unwrap()
}

/// The step after `s`, with `--force` past the gates (what is tested here
/// is the state directory, not the gates).
fn next_step(s: &serde_json::Value) -> Vec<&'static str> {
    let states: Vec<String> = members(s).into_iter().map(|(_, st)| st).collect();
    if states.iter().any(|s| s == "retiring") {
        vec!["retire", "--force"]
    } else if states.iter().any(|s| s == "prepared") {
        vec!["activate", "--force"]
    } else {
        vec!["prepare"]
    }
}

/// Every file and directory under `dir`, by path relative to it, with the
/// files' bytes (sockets and lock files left out).
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(base).unwrap().display().to_string();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                walk(base, &path, out);
            } else if meta.is_file() && !rel.ends_with(".lock") && !rel.ends_with(".server") {
                out.insert(rel, fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// What interrupted or failed atomic writes left anywhere under `dir`.
fn temp_leftovers(dir: &Path) -> Vec<String> {
    snapshot(dir)
        .into_keys()
        .filter(|k| k.contains(".tmp-"))
        .collect()
}

/// The root certificate of authority `id` as stored.
fn root_of(state: &Path, id: &str) -> String {
    fs::read_to_string(state.join("ca").join(id).join("root-cert.pem")).unwrap()
}

/// A leaf from `ca`, verified by openssl under `root_pem` alone: the root
/// of the authority that must have signed it.
async fn issues_under(ca: &CaProc, root_pem: &str) {
    let mut chain = ca.issue_chain().await;
    *chain.last_mut().unwrap() = root_pem.to_owned();
    openssl_verify(&chain);
}

/// `ca server` on `state`, which must refuse to start: what it printed.
/// Bounded: a server still running after 30 s started, and fails the test.
fn refused_start(state: &Path, case: &str) -> String {
    let logs = tempfile::tempdir().unwrap();
    let (out, err) = (logs.path().join("out"), logs.path().join("err"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ca"))
        .args(["server", "--dev", "--listen", "127.0.0.1:0"])
        .args(["--ops-listen", "off", "--auto-rotate", "off", "--state-dir"])
        .arg(state)
        .stdout(Stdio::from(fs::File::create(&out).unwrap()))
        .stderr(Stdio::from(fs::File::create(&err).unwrap()))
        .spawn()
        .unwrap();
    let printed =
        || fs::read_to_string(&out).unwrap_or_default() + &fs::read_to_string(&err).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(code) = child.try_wait().unwrap() {
            assert!(
                !code.success(),
                "{case}: exit status {code:?}: {}",
                printed()
            );
            return printed();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{case}: the CA started on a faulty state directory {}: {}",
                state.display(),
                printed()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cp_a(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(ok.success(), "cp -a {} {}", from.display(), to.display());
}

/// Puts `backup` back as `dir`.
fn restore(backup: &Path, dir: &Path) {
    if dir.exists() {
        fs::remove_dir_all(dir).unwrap();
    }
    cp_a(backup, dir);
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Cut to half its length.
    Truncate,
    /// Zero bytes.
    Empty,
    /// The case of eight letters from the middle on swapped: still base64
    /// in a PEM file (so the decoder gets garbage, not a syntax error),
    /// other names in JSON.
    Flip,
    Remove,
    /// A directory where the file was: unreadable as a file.
    Unreadable,
    /// A PEM block that is not base64 (for a file that may be empty: a
    /// generated root's `cert-chain.pem` is).
    Garbage,
}

fn corrupt(path: &Path, fault: Fault) {
    match fault {
        Fault::Truncate => {
            let b = fs::read(path).unwrap();
            fs::write(path, &b[..b.len() / 2]).unwrap();
        }
        Fault::Empty => fs::write(path, b"").unwrap(),
        Fault::Flip => {
            let mut b = fs::read(path).unwrap();
            let mut left = 8;
            let mid = b.len() / 2;
            for c in b[mid..].iter_mut() {
                if left > 0 && c.is_ascii_alphabetic() {
                    *c ^= 0x20;
                    left -= 1;
                }
            }
            assert_eq!(left, 0, "{} has letters to flip", path.display());
            fs::write(path, b).unwrap();
        }
        Fault::Remove if path.is_dir() => fs::remove_dir_all(path).unwrap(),
        Fault::Remove => fs::remove_file(path).unwrap(),
        Fault::Unreadable => {
            fs::remove_file(path).unwrap();
            fs::create_dir(path).unwrap();
        }
        Fault::Garbage => fs::write(
            path,
            "-----BEGIN CERTIFICATE-----\n@@not base64@@\n-----END CERTIFICATE-----\n",
        )
        .unwrap(),
    }
}

/// A state directory made by a real server (which is then killed) and
/// taken to generation 2 by `ca rotate-root prepare`: an active and a
/// prepared authority.
fn mid_rotation_state(state: &Path) -> serde_json::Value {
    CaProc::start_at(state, NO_AUTO, &[]).kill9();
    let out = rotate(state, &["prepare"]);
    assert!(out.status.success(), "{}", text(&out));
    let s = status(state);
    assert_eq!(generation(&s), 2);
    s
}

/// Each kind of state file corrupted (one case per kind and fault) before
/// a start: a server refuses to start, naming the file and the cause, and
/// writes nothing (no new root); `ca rotate-root` refuses too. Restored,
/// the server starts on the same authorities. The files the server derives
/// (the published bundle, the issuance ledger) are rewritten instead.
#[tokio::test]
async fn a_corrupt_state_file_refuses_the_start_and_is_never_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let s = mid_rotation_state(&state);
    let (a, p) = (with_state(&s, "active"), with_state(&s, "prepared"));
    let backup = tmp.path().join("backup");
    cp_a(&state, &backup);
    let good = snapshot(&state.join("ca"));
    let key = |id: &str| format!("ca/{id}/ca-key.pem");
    let file = |id: &str, f: &str| format!("ca/{id}/{f}");
    // (file, fault, what the refusal must say).
    let refused: Vec<(String, Fault, Vec<&str>)> = vec![
        (
            "ca/authorities.json".into(),
            Fault::Truncate,
            vec!["authorities.json", "not valid"],
        ),
        (
            "ca/authorities.json".into(),
            Fault::Empty,
            vec!["authorities.json", "not valid"],
        ),
        (
            "ca/authorities.json".into(),
            Fault::Flip,
            vec!["authorities.json", "not valid"],
        ),
        (
            "ca/authorities.json".into(),
            Fault::Remove,
            vec!["authorities.json is missing"],
        ),
        (
            "ca/authorities.json".into(),
            Fault::Unreadable,
            vec!["authorities.json", "Is a directory"],
        ),
        (key(&a), Fault::Truncate, vec![&a, "ca-key.pem"]),
        (key(&a), Fault::Empty, vec![&a, "ca-key.pem"]),
        (key(&a), Fault::Flip, vec![&a, "ca-key.pem"]),
        (key(&a), Fault::Remove, vec![&a, "missing ca-key.pem"]),
        (
            key(&a),
            Fault::Unreadable,
            vec![&a, "ca-key.pem", "Is a directory"],
        ),
        (
            file(&a, "ca-cert.pem"),
            Fault::Truncate,
            vec![&a, "ca-cert.pem"],
        ),
        (
            file(&a, "ca-cert.pem"),
            Fault::Flip,
            vec![&a, "ca-cert.pem"],
        ),
        (
            file(&a, "cert-chain.pem"),
            Fault::Garbage,
            vec![&a, "cert-chain.pem"],
        ),
        (
            file(&a, "root-cert.pem"),
            Fault::Truncate,
            vec![&a, "root-cert.pem"],
        ),
        (
            file(&a, "root-cert.pem"),
            Fault::Flip,
            vec![&a, "root-cert.pem"],
        ),
        (
            format!("ca/{a}"),
            Fault::Remove,
            vec![&a, "directory is missing"],
        ),
        (key(&p), Fault::Truncate, vec![&p, "ca-key.pem"]),
        (
            file(&p, "ca-cert.pem"),
            Fault::Flip,
            vec![&p, "ca-cert.pem"],
        ),
        (
            "dev-issuer-key.pem".into(),
            Fault::Truncate,
            vec!["dev-issuer-key.pem"],
        ),
    ];
    for (rel, fault, says) in &refused {
        let case = format!("{rel} {fault:?}");
        corrupt(&state.join(rel), *fault);
        let faulty = snapshot(&state.join("ca"));
        let why = refused_start(&state, &case);
        for s in says {
            assert!(why.contains(s), "{case}: the refusal names {s:?}: {why}");
        }
        assert_eq!(
            snapshot(&state.join("ca")),
            faulty,
            "{case}: nothing written, no new root"
        );
        if rel.starts_with("ca/") {
            let out = rotate(&state, &["activate", "--force"]);
            assert!(!out.status.success(), "{case}: rotate-root refuses");
            assert!(text(&out).contains(says[0]), "{case}: {}", text(&out));
            assert_eq!(snapshot(&state.join("ca")), faulty, "{case}");
        }
        restore(&backup, &state);
    }
    // Derived files: rewritten from the authorities at start.
    for (rel, fault) in [
        ("root-cert.pem", Fault::Flip),
        ("root-cert.pem", Fault::Remove),
        ("issued.json", Fault::Truncate),
    ] {
        corrupt(&state.join(rel), fault);
        let ca = CaProc::start_at(&state, NO_AUTO, &[]);
        let bundle = ders(&ca.root_pem());
        assert_eq!(
            bundle,
            [ders(&root_of(&state, &a)), ders(&root_of(&state, &p))].concat(),
            "{rel} {fault:?}: the bundle is rewritten whole"
        );
        issues_under(&ca, &root_of(&state, &a)).await;
        ca.kill9();
        assert_eq!(snapshot(&state.join("ca")), good, "{rel} {fault:?}");
        restore(&backup, &state);
    }
    // Back to the last good state: the same authorities, issuing.
    let ca = CaProc::start_at(&state, NO_AUTO, &[]);
    assert_eq!(members(&status(&state)), members(&s));
    assert_eq!(snapshot(&state.join("ca")), good);
    issues_under(&ca, &root_of(&state, &a)).await;
}

/// Read-only and full before a start: refused with the cause, nothing
/// written; `status` still reads a read-only directory; an empty full one
/// creates no CA (and leaves nothing half-made), and does once there is
/// room (a first start may generate).
#[tokio::test]
async fn a_read_only_or_full_state_directory_refuses_the_start_and_keeps_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _fs = Mount::tmpfs(&state, 4 << 20);
    CaProc::start_at(&state, NO_AUTO, &[]).kill9();
    let s = status(&state);
    let a = with_state(&s, "active");
    let good = snapshot(&state.join("ca"));

    {
        let _ro = Mount::read_only(&state);
        let why = refused_start(&state, "read-only");
        assert!(why.contains("Read-only file system"), "{why}");
        assert!(why.contains(".lock"), "names the file: {why}");
        assert_eq!(members(&status(&state)), members(&s), "status reads it");
        let out = rotate(&state, &["prepare"]);
        let why = text(&out);
        assert!(!out.status.success(), "{why}");
        assert!(
            why.contains("prepare failed") && why.contains("Read-only file system"),
            "{why}"
        );
    }
    assert_eq!(snapshot(&state.join("ca")), good);

    {
        let _full = Filler::new(&state, 0);
        let why = refused_start(&state, "full");
        assert!(why.contains("No space left on device"), "{why}");
        assert!(why.contains("root-cert.pem"), "names the file: {why}");
        assert_eq!(temp_leftovers(&state), Vec::<String>::new());
    }
    assert_eq!(snapshot(&state.join("ca")), good);

    // An empty directory on a full disk: no CA, nothing half-made.
    let fresh = tmp.path().join("fresh");
    let _fresh_fs = Mount::tmpfs(&fresh, 1 << 20);
    {
        let _full = Filler::new(&fresh, 0);
        let why = refused_start(&fresh, "empty and full");
        assert!(why.contains("No space left on device"), "{why}");
        assert!(why.contains("ca-key.pem"), "names the file: {why}");
        let left: Vec<String> = snapshot(&fresh.join("ca")).into_keys().collect();
        assert_eq!(left, Vec::<String>::new(), "no key, no temporary file");
    }
    let first = CaProc::start_at(&fresh, NO_AUTO, &[]);
    first.legit_issue().await;
    drop(first);

    let ca = CaProc::start_at(&state, NO_AUTO, &[]);
    assert_eq!(members(&status(&state)), members(&s));
    assert_eq!(snapshot(&state.join("ca")), good);
    issues_under(&ca, &root_of(&state, &a)).await;
}

/// What each step must leave when it fails: the authorities of `before`,
/// on disk as they were, no temporary file, and the server (if any)
/// still issuing under the root of the authority active before.
async fn unchanged(
    state: &Path,
    ca: Option<&CaProc>,
    before: &serde_json::Value,
    disk: &BTreeMap<String, Vec<u8>>,
    case: &str,
) {
    assert_eq!(&snapshot(&state.join("ca")), disk, "{case}: the store");
    assert_eq!(temp_leftovers(state), Vec::<String>::new(), "{case}");
    assert_eq!(members(&status(state)), members(before), "{case}");
    if let Some(ca) = ca {
        issues_under(ca, &root_of(state, &with_state(before, "active"))).await;
    }
}

/// Through a running server's admin socket, each step of a rotation with
/// the state directory made read-only, then full, right before it: the
/// step fails saying why, nothing changes on disk or in the server, which
/// keeps issuing; the fault gone, the same step is taken. A restart then
/// comes up on the last state.
#[tokio::test]
async fn each_step_through_the_server_fails_cleanly_on_a_read_only_or_full_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _fs = Mount::tmpfs(&state, 8 << 20);
    let ca = CaProc::start_at(&state, NO_AUTO, &[]);
    let first = with_state(&status(&state), "active");
    for _ in 0..3 {
        let before = status(&state);
        let step = next_step(&before);
        let disk = snapshot(&state.join("ca"));
        {
            let _ro = Mount::read_only(&state);
            let out = rotate(&state, &step);
            let why = text(&out);
            assert!(!out.status.success(), "{step:?} on read-only: {why}");
            assert!(
                why.contains(&format!("{} failed", step[0]))
                    && why.contains("Read-only file system")
                    && why.contains(".lock"),
                "{step:?}: {why}"
            );
            unchanged(&state, Some(&ca), &before, &disk, "read-only").await;
        }
        {
            let _full = Filler::new(&state, 0);
            let out = rotate(&state, &step);
            let why = text(&out);
            assert!(!out.status.success(), "{step:?} on full: {why}");
            assert!(
                why.contains(&format!("{} failed", step[0]))
                    && why.contains("No space left on device"),
                "{step:?}: {why}"
            );
            unchanged(&state, Some(&ca), &before, &disk, "full").await;
        }
        let out = rotate(&state, &step);
        assert!(
            out.status.success(),
            "{step:?} once the fault is gone: {}",
            text(&out)
        );
        assert_eq!(generation(&status(&state)), generation(&before) + 1);
    }
    let s = status(&state);
    let new = with_state(&s, "active");
    assert_ne!(new, first);
    assert_eq!(members(&s).len(), 1);
    issues_under(&ca, &root_of(&state, &new)).await;
    ca.kill9();
    let ca = CaProc::start_at(&state, NO_AUTO, &[]);
    assert_eq!(members(&status(&state)), members(&s));
    issues_under(&ca, &root_of(&state, &new)).await;
}

/// Through a running server, each step with a state file corrupted under
/// it (the manifest, and each member's key and certificate): refused
/// naming the file, never a manifest naming a corrupt authority; the
/// server keeps issuing; the file restored, the step is taken.
#[tokio::test]
async fn each_step_through_the_server_refuses_a_corrupted_state_file() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let ca = CaProc::start_at(&state, NO_AUTO, &[]);
    let backup = tmp.path().join("backup");
    let mut refusals = 0;
    for _ in 0..3 {
        let before = status(&state);
        let step = next_step(&before);
        let disk = snapshot(&state.join("ca"));
        let mut faults: Vec<(String, Fault, String)> = vec![
            (
                "ca/authorities.json".into(),
                Fault::Truncate,
                "authorities.json".into(),
            ),
            (
                "ca/authorities.json".into(),
                Fault::Remove,
                "authorities.json is missing".into(),
            ),
        ];
        // The members the step keeps (retire deletes the retiring one,
        // corrupt or not).
        for (id, _) in members(&before)
            .into_iter()
            .filter(|(_, st)| st != "retiring")
        {
            for (f, fault) in [
                ("ca-key.pem", Fault::Truncate),
                ("ca-cert.pem", Fault::Truncate),
                ("cert-chain.pem", Fault::Garbage),
                ("root-cert.pem", Fault::Truncate),
            ] {
                faults.push((format!("ca/{id}/{f}"), fault, format!("{id}/{f}")));
            }
            faults.push((
                format!("ca/{id}/ca-key.pem"),
                Fault::Flip,
                format!("{id}/ca-key.pem"),
            ));
        }
        for (rel, fault, says) in &faults {
            let case = format!("{step:?} with {rel} {fault:?}");
            fs::remove_dir_all(&backup).ok();
            cp_a(&state.join("ca"), &backup);
            corrupt(&state.join(rel), *fault);
            let faulty = snapshot(&state.join("ca"));
            let out = rotate(&state, &step);
            let why = text(&out);
            assert!(!out.status.success(), "{case}: {why}");
            assert!(why.contains(says.as_str()), "{case}: names {says}: {why}");
            refusals += 1;
            assert_eq!(
                snapshot(&state.join("ca")),
                faulty,
                "{case}: nothing written"
            );
            assert_eq!(temp_leftovers(&state), Vec::<String>::new(), "{case}");
            // Still issuing, from memory, while the file is corrupt.
            let active = with_state(&before, "active");
            let root = fs::read_to_string(backup.join(&active).join("root-cert.pem")).unwrap();
            issues_under(&ca, &root).await;
            restore(&backup, &state.join("ca"));
            unchanged(&state, Some(&ca), &before, &disk, &case).await;
        }
        let out = rotate(&state, &step);
        assert!(
            out.status.success(),
            "{step:?} once restored: {}",
            text(&out)
        );
    }
    assert!(refusals >= 3 * 7, "{refusals}");
    let s = status(&state);
    ca.kill9();
    let ca = CaProc::start_at(&state, NO_AUTO, &[]);
    assert_eq!(members(&status(&state)), members(&s));
    issues_under(&ca, &root_of(&state, &with_state(&s, "active"))).await;
}

/// With no server, `ca rotate-root` on the state directory itself: each
/// step tried with every amount of free space from none up to what it
/// needs (so every write of the step in turn is the one that fails), and
/// read-only. Each failure says why and leaves the store as it was, with
/// no temporary file and no directory of a key that no manifest names;
/// with room, the step is taken.
#[tokio::test]
async fn each_step_without_a_server_fails_cleanly_at_every_write() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _fs = Mount::tmpfs(&state, 4 << 20);
    CaProc::start_at(&state, NO_AUTO, &[]).kill9();
    let mut failed_with_room = 0;
    for _ in 0..3 {
        let before = status(&state);
        let step = next_step(&before);
        let disk = snapshot(&state.join("ca"));
        {
            let _ro = Mount::read_only(&state);
            let out = rotate(&state, &step);
            let why = text(&out);
            assert!(!out.status.success(), "{step:?}: {why}");
            assert!(why.contains("Read-only file system"), "{why}");
        }
        unchanged(&state, None, &before, &disk, "read-only").await;
        let mut taken = false;
        for free in 0..16u64 {
            let out = {
                let _full = Filler::new(&state, free);
                rotate(&state, &step)
            };
            let case = format!("{step:?} with {free} free pages of {PAGE} bytes");
            if out.status.success() {
                taken = true;
                break;
            }
            let why = text(&out);
            assert!(
                why.contains(&format!("{} failed", step[0]))
                    && why.contains("No space left on device"),
                "{case}: {why}"
            );
            unchanged(&state, None, &before, &disk, &case).await;
            failed_with_room += usize::from(free > 0);
        }
        assert!(taken, "{step:?} taken with room");
        assert_eq!(generation(&status(&state)), generation(&before) + 1);
    }
    // Prepare writes three pages of files (a generated root's cert-chain.pem
    // is empty) and a manifest: it failed with room for one, two and all
    // three of them (a key written, then the manifest refused).
    assert!(failed_with_room >= 3, "{failed_with_room}");
    let s = status(&state);
    let ca = CaProc::start_at(&state, NO_AUTO, &[]);
    issues_under(&ca, &root_of(&state, &with_state(&s, "active"))).await;
}

/// `root-cert.pem` (the bundle the server publishes beside its state)
/// cannot be written when a step changes the bundle: the step still lands,
/// the failure is logged, and the file is written by a retry once the
/// fault is gone, with no further change to the authorities. (A directory
/// in the file's place makes the rename fail, as a full disk makes the
/// write fail, without disturbing the step's own writes.)
#[tokio::test]
async fn the_published_bundle_is_written_again_once_a_failed_write_can_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let ca = CaProc::start_at(&state, NO_AUTO, &[]);
    let published = state.join("root-cert.pem");
    let roots = |pem: &str| pem.matches("BEGIN CERTIFICATE").count();
    assert_eq!(roots(&fs::read_to_string(&published).unwrap()), 1);

    fs::remove_file(&published).unwrap();
    fs::create_dir(&published).unwrap();
    fs::write(published.join("in-the-way"), b"x").unwrap();
    let out = rotate(&state, &["prepare"]);
    assert!(out.status.success(), "prepare: {}", text(&out));
    let logged = Instant::now();
    while !ca.log_text().contains("writing the trust bundle failed") {
        assert!(
            logged.elapsed() < Duration::from_secs(10),
            "no failure logged: {}",
            ca.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(published.is_dir(), "the obstacle is still there");

    fs::remove_dir_all(&published).unwrap();
    let freed = Instant::now();
    let pem = loop {
        if let Ok(pem) = fs::read_to_string(&published) {
            break pem;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(15),
            "root-cert.pem was not written again: {}",
            ca.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(roots(&pem), 2, "the bundle with the prepared root: {pem}");
    println!(
        "root-cert.pem written again {:?} after the obstacle went",
        freed.elapsed()
    );
}

/// A corrupt issuance ledger (`issued.json`) does not stop the start, and
/// is not silently dropped: the log says so and what is assumed instead.
#[tokio::test]
async fn a_corrupt_issuance_ledger_is_reported_and_the_safe_assumption_made() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let ca = CaProc::start_at(&state, NO_AUTO, &[]);
    drop(ca);
    fs::write(state.join("issued.json"), b"{\"clean\": tru").unwrap();
    let ca = CaProc::start_at(&state, NO_AUTO, &[]);
    let log = ca.log_text();
    assert!(
        log.contains("the issuance ledger is corrupt") && log.contains("issued.json"),
        "{log}"
    );
    issues_under(
        &ca,
        &root_of(&state, &with_state(&status(&state), "active")),
    )
    .await;
}
