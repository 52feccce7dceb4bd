//! The `ca agent` child of `ca bench agent`: its process, its JSON log (the
//! moment it obtained each certificate), its /proc figures and its metrics
//! page.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use tokio::sync::mpsc;

/// The agent obtained a certificate: its serial (the SDS version of
/// `default`) and the time stamped on the log line, written just before the
/// agent hands the certificate to its SDS streams.
#[derive(Debug)]
pub(super) struct Obtained {
    pub serial: String,
    pub at: SystemTime,
}

/// A running `ca agent`, killed when dropped.
pub(super) struct AgentProc {
    child: Child,
    pub pid: u32,
    pub ops: Option<SocketAddr>,
    /// Its last log lines, for an error message.
    tail: Arc<Mutex<VecDeque<String>>>,
}

const TAIL_LINES: usize = 30;

impl AgentProc {
    /// Starts `exe agent <args>` (with `--log-format json`), waits for its
    /// banner, and hands back the stream of certificates it obtains.
    pub(super) fn spawn(
        exe: &Path,
        args: &[String],
    ) -> anyhow::Result<(Self, mpsc::UnboundedReceiver<Obtained>)> {
        let mut cmd = Command::new(exe);
        cmd.arg("agent")
            .args(["--log-format", "json", "--log-level", "info"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Only our flags configure it, not the caller's CA_* environment.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CA_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} agent", exe.display()))?;
        let pid = child.id();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(stderr) = child.stderr.take() {
            let tail = tail.clone();
            std::thread::Builder::new()
                .name("agent-log".into())
                .spawn(move || read_log(stderr, &tx, &tail))
                .context("starting the log reader")?;
        }
        let banner = match child.stdout.take() {
            Some(stdout) => read_banner(stdout)?,
            None => Vec::new(),
        };
        let mut me = Self {
            child,
            pid,
            ops: None,
            tail,
        };
        if !banner.iter().any(|l| l.contains("agent is up")) {
            let _ = me.child.wait();
            bail!(
                "the agent did not start:\n{}\n{}",
                banner.join("\n"),
                me.tail_text()
            );
        }
        me.ops = banner.iter().find_map(|l| {
            let rest = l.split_once("http://")?.1;
            rest.split('/').next()?.parse().ok()
        });
        Ok((me, rx))
    }

    /// Its last log lines.
    pub(super) fn tail_text(&self) -> String {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// `Some(status)` once it has exited.
    pub(super) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The banner up to the metrics line (or its end), then the rest drained.
fn read_banner(stdout: std::process::ChildStdout) -> anyhow::Result<Vec<String>> {
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = Vec::new();
    for line in lines.by_ref() {
        let line = line.context("reading the agent's banner")?;
        let done = line.contains("metrics");
        banner.push(line);
        if done {
            break;
        }
    }
    std::thread::Builder::new()
        .name("agent-stdout".into())
        .spawn(move || lines.for_each(drop))
        .context("starting the banner reader")?;
    Ok(banner)
}

fn read_log(
    stderr: std::process::ChildStderr,
    tx: &mpsc::UnboundedSender<Obtained>,
    tail: &Mutex<VecDeque<String>>,
) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { return };
        if let Some(o) = obtained(&line) {
            let _ = tx.send(o);
        }
        if let Ok(mut t) = tail.lock() {
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    }
}

/// A `certificate obtained` line of the agent's JSON log.
fn obtained(line: &str) -> Option<Obtained> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("message")?.as_str()? != "certificate obtained" {
        return None;
    }
    Some(Obtained {
        serial: v.get("serial")?.as_str()?.to_owned(),
        at: parse_rfc3339_utc(v.get("timestamp")?.as_str()?)?,
    })
}

/// `2025-06-01T12:34:56.123456Z` (tracing-subscriber's JSON timestamps).
pub(super) fn parse_rfc3339_utc(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// The agent's metrics page (plain HTTP/1.1 on its loopback ops port).
pub(super) async fn metrics_page(ops: SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(ops).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .context("the agent's metrics page did not answer in 5 s")?
        .context("reading the agent's metrics page")
}

/// The sum of a metric's samples (every label set) on a Prometheus page.
pub(super) fn metric(page: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in page.lines() {
        if let Some(rest) = l.strip_prefix(name)
            && rest.starts_with([' ', '{'])
            && let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn log_timestamps() {
        let t = parse_rfc3339_utc("2025-06-01T12:34:56.123456Z").unwrap();
        let d = t.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(d.as_secs(), 1_748_781_296);
        assert_eq!(d.subsec_nanos(), 123_456_000);
        let t = parse_rfc3339_utc("2000-02-29T00:00:00Z").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 951_782_400);
        for bad in [
            "2025-06-01T12:34:56",
            "2025-13-01T00:00:00Z",
            "x",
            "2025-06-01",
        ] {
            assert!(parse_rfc3339_utc(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn obtained_lines() {
        let line = r#"{"timestamp":"2025-06-01T12:34:56.5Z","level":"INFO","message":"certificate obtained","workload":"default","serial":"0abc"}"#;
        let o = obtained(line).unwrap();
        assert_eq!(o.serial, "0abc");
        assert!(obtained(&line.replace("obtained", "renewed")).is_none());
        assert!(obtained("not json").is_none());
    }

    #[test]
    fn metrics_sum_label_sets() {
        let page = "# HELP x\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3\nx_total_other 9\ny 1.5\n";
        assert_eq!(metric(page, "x_total"), Some(5.0));
        assert_eq!(metric(page, "y"), Some(1.5));
        assert_eq!(metric(page, "z"), None);
    }
}
