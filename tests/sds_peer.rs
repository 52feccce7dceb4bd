//! Node mode's socket binding: an SDS socket bound to one peer uid (and gid)
//! refuses every other process, checked by the kernel's `SO_PEERCRED`, even
//! when the socket's file permissions would let that process connect.
#![allow(missing_docs, unreachable_pub, clippy::restriction)] // Test crate: a panic fails a test.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::sds::served;
use common::*;
use workload_ca::agent::sds::PeerRule;
use workload_ca::agent::{self, Agent};
use workload_ca::limits::label::PEER_CREDENTIALS;

/// An unprivileged uid and gid other than ours, with no account (not
/// `nobody`, 65534: that is the kernel's overflow id, which no rule may
/// name and no peer reporting it is admitted under).
const OTHER: u32 = 4242;

async fn start(ca: &TestServer, dir: &std::path::Path, peer: Option<PeerRule>) -> Agent {
    std::fs::write(dir.join("token"), ca.token("prod", "web")).unwrap();
    let mut config = agent_config(ca, dir);
    config.workloads[0].peer = peer;
    let agent = agent::start(config).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.ready() {
        assert!(Instant::now() < deadline, "no certificate");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent
}

fn our_ids() -> (u32, u32) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u32 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

#[tokio::test]
async fn a_bound_socket_serves_its_peer_and_refuses_any_other_uid_or_gid() {
    let ca = TestServer::start().await;
    let (uid, gid) = our_ids();
    let cases = [
        (None, true),
        (Some(PeerRule { uid, gid: None }), true),
        (
            Some(PeerRule {
                uid,
                gid: Some(gid),
            }),
            true,
        ),
        (
            Some(PeerRule {
                uid: uid + 1,
                gid: None,
            }),
            false,
        ),
        (
            Some(PeerRule {
                uid,
                gid: Some(gid + 1),
            }),
            false,
        ),
    ];
    for (rule, admitted) in cases {
        let dir = tempfile::tempdir().unwrap();
        let agent = start(&ca, dir.path(), rule).await;
        let got = served(&dir.path().join("web.sock"), Duration::from_secs(5)).await;
        let refusals = agent.metrics.refusals.get(PEER_CREDENTIALS);
        if admitted {
            let served = got.unwrap_or_else(|e| panic!("{rule:?}: {e}"));
            assert_eq!(served.chain.len(), 2, "{rule:?}");
            assert_eq!(refusals, 0, "{rule:?}");
        } else {
            assert!(
                got.is_err(),
                "{rule:?}: a process of another uid/gid was served"
            );
            assert!(refusals >= 1, "{rule:?}: refusal not counted");
        }
        agent.shutdown().await;
    }
}

/// What a process running as `uid`/`gid` reads after sending the HTTP/2
/// preface to `socket`: the server's SETTINGS frame when admitted, nothing
/// (the connection closed) when refused.
fn first_bytes_as(socket: &std::path::Path, uid: u32, gid: u32) -> Vec<u8> {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    data = s.recv(9)
except (BrokenPipeError, ConnectionResetError):
    data = b""
sys.stdout.buffer.write(data)
"#;
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(socket)
        .uid(uid)
        .gid(gid)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "the client as uid {uid} failed: {err}");
    out
}

#[tokio::test]
async fn another_user_with_file_access_is_refused_and_the_bound_one_served() {
    let ca = TestServer::start().await;
    let (uid, _) = our_ids();
    assert_eq!(uid, 0, "this test runs as root, to act as another uid");
    for (rule, admitted) in [
        (PeerRule { uid, gid: None }, false),
        (
            PeerRule {
                uid: OTHER,
                gid: Some(OTHER),
            },
            true,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let agent = start(&ca, dir.path(), Some(rule)).await;
        let socket = dir.path().join("web.sock");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let meta = std::fs::metadata(&socket).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        if admitted {
            // The socket is the bound peer's: it connects without any
            // loosening of the file's permissions.
            use std::os::unix::fs::MetadataExt;
            assert_eq!((meta.uid(), meta.gid()), (OTHER, OTHER));
        } else {
            // File permissions that let any user in: only the peer check
            // stands between the other user and the keys.
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        let sock = socket.clone();
        let got = tokio::task::spawn_blocking(move || first_bytes_as(&sock, OTHER, OTHER))
            .await
            .unwrap();
        if admitted {
            // A frame header: 24-bit length, then type 4 (SETTINGS).
            assert_eq!(got.len(), 9, "{rule}: {got:?}");
            assert_eq!(got[3], 4, "{rule}: not a SETTINGS frame: {got:?}");
            assert_eq!(agent.metrics.refusals.get(PEER_CREDENTIALS), 0);
        } else {
            assert!(got.is_empty(), "{rule}: uid {OTHER} was answered: {got:?}");
            assert_eq!(agent.metrics.refusals.get(PEER_CREDENTIALS), 1);
        }
        agent.shutdown().await;
    }
}
