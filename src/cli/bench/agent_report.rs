//! The report of `ca bench agent`: one JSON object, or text for a person.

use serde::Serialize;

/// The push-spread and memory targets of the agent (issue 10).
pub(super) const TARGET_PUSH_MS: f64 = 50.0;
pub(super) const TARGET_RSS_BYTES: u64 = 50 * 1000 * 1000;

/// The report of `ca bench agent`.
#[derive(Debug, Serialize)]
pub struct AgentReport {
    /// Always `agent`.
    pub mode: &'static str,
    /// How the streams sit on connections (`envoy`: one connection per
    /// proxy, one stream per resource name; `one-stream-per-connection`).
    pub shape: super::agent_streams::Shape,
    /// SDS streams held.
    pub streams: usize,
    /// Connections holding them.
    pub connections: usize,
    /// Streams subscribed to `default`: those each rotation must reach
    /// (`received` and `missed` count these).
    pub cert_streams: usize,
    /// Encoded size of the node in each stream's first request.
    pub node_bytes: usize,
    /// Rotations measured.
    pub rotations: usize,
    /// The lifetime asked of the agent's certificates, in milliseconds.
    pub cert_ttl_ms: u64,
    /// What each push time counts from: `agent_log` (the time stamped on
    /// the agent's "certificate obtained" log line, just before it hands
    /// the certificate to its streams) for every rotation, else
    /// `first_stream` for some (no such log line was seen).
    pub timing_from: &'static str,
    /// Per rotation, and the largest time to the last stream.
    pub push_ms: PushSummary,
    /// Streams that did not receive a rotation (within the push timeout).
    pub missed_pushes: usize,
    /// Streams that ended or could not open.
    pub stream_errors: usize,
    /// Opening the streams.
    pub open: OpenFigures,
    /// The agent process.
    pub agent: AgentFigures,
    /// The bench process.
    pub client: ClientFigures,
    /// Flags the bench gives the agent beyond its defaults (its per-socket
    /// connection and stream caps are raised to fit the streams).
    pub agent_flags: Vec<String>,
    /// The targets, and whether this run met them.
    pub targets: Targets,
    /// What else the machine was doing: the agent and the streams share
    /// its cores with everything else.
    pub machine: Machine,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    /// 1-minute load average at the start and at the end.
    pub loadavg_start: f64,
    pub loadavg_end: f64,
}

#[derive(Debug, Serialize)]
pub struct PushSummary {
    /// The largest `last_ms` of all rotations.
    pub max: f64,
    pub per_rotation: Vec<RotationFigures>,
}

#[derive(Debug, Serialize)]
pub struct RotationFigures {
    /// The new certificate's serial (the SDS version of `default`).
    pub serial: String,
    /// `agent_log` or `first_stream`.
    pub from: &'static str,
    pub received: usize,
    pub missed: usize,
    /// From the origin to the first, median, 99th percentile and last
    /// stream's receipt, in ms.
    pub first_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub last_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct OpenFigures {
    pub seconds: f64,
    /// Agent CPU spent while the streams opened (connections, first pushes).
    pub agent_cpu_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct AgentFigures {
    pub pid: u32,
    /// VmRSS with its first certificate and no stream.
    pub idle_rss_bytes: u64,
    /// VmRSS at the end (every stream still open).
    pub rss_bytes: u64,
    /// VmHWM: the peak.
    pub peak_rss_bytes: u64,
    /// (end RSS - idle RSS) / streams.
    pub rss_per_stream_bytes: u64,
    /// Agent CPU from the last stream opened to the last rotation
    /// measured: the rotations' key generation and CSRs, their pushes and
    /// ACKs, and whatever it did in between.
    pub cpu_ms_rotations: f64,
    pub rotation_phase_seconds: f64,
    pub cpu_ms_per_rotation: f64,
    /// From its own metrics page, read at the end.
    pub metrics: Option<AgentMetrics>,
}

#[derive(Debug, Serialize)]
pub struct AgentMetrics {
    /// `workload_ca_agent_sds_streams`.
    pub sds_streams: f64,
    /// Pushes ACKed (`..._sds_push_to_ack_seconds` count) and their mean
    /// time from the change to the ACK, as the agent measures it.
    pub pushes_acked: f64,
    pub push_to_ack_mean_ms: f64,
    /// `workload_ca_agent_limit_refusals_total` (all limits).
    pub limit_refusals: f64,
}

#[derive(Debug, Serialize)]
pub struct ClientFigures {
    /// Threads of the bench's own runtime holding the streams.
    pub threads: usize,
    /// The bench process's CPU over the rotation phase.
    pub cpu_ms_rotations: f64,
}

#[derive(Debug, Serialize)]
pub struct Targets {
    pub push_ms: f64,
    pub rss_bytes: u64,
    /// Every stream received every rotation within `push_ms`.
    pub push_met: bool,
    /// Peak RSS under `rss_bytes`.
    pub rss_met: bool,
}

/// First, median, 99th percentile and last of `ms` (sorted here).
pub(super) fn spread(mut ms: Vec<f64>) -> (f64, f64, f64, f64) {
    if ms.is_empty() {
        return (0.0, 0.0, 0.0, 0.0);
    }
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let i = ((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1;
        ms.get(i).copied().unwrap_or(0.0)
    };
    (at(0.0), at(0.5), at(0.99), at(1.0))
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

impl AgentReport {
    /// The report for a person, on stdout.
    pub fn print_human(&self) {
        let origin = match self.timing_from {
            "agent_log" => {
                "the time on the agent's \"certificate obtained\" log line (just before it hands the certificate to its streams)"
            }
            _ => "the agent's log line, or the first stream's receipt where there was none",
        };
        let shape = match self.shape {
            super::agent_streams::Shape::Envoy => format!(
                "shape envoy: {} proxies, each one connection with a stream for default and one for ROOTCA",
                self.connections
            ),
            super::agent_streams::Shape::OneStreamPerConnection => format!(
                "shape one-stream-per-connection: {} connections, each one stream subscribed to default and ROOTCA",
                self.connections
            ),
        };
        println!(
            "ca bench agent: {} SDS streams on one `ca agent` ({shape}; first request with a {} B node, ACKing as Envoy); {} rotations of {:.1} s certificates",
            self.streams,
            self.node_bytes,
            self.rotations,
            self.cert_ttl_ms as f64 / 1e3
        );
        println!(
            "  streams     : opened in {:.2} s (agent CPU {:.0} ms); agent flags raised: {}",
            self.open.seconds,
            self.open.agent_cpu_ms,
            self.agent_flags.join(" ")
        );
        println!("  push time   : from {origin}");
        println!("                to each stream's receipt of the new certificate, in ms:");
        for (i, r) in self.push_ms.per_rotation.iter().enumerate() {
            println!(
                "    rotation {:<2} first {:>7.2}  p50 {:>7.2}  p99 {:>7.2}  last {:>7.2}  received {}/{}{}",
                i + 1,
                r.first_ms,
                r.p50_ms,
                r.p99_ms,
                r.last_ms,
                r.received,
                self.cert_streams,
                if r.from == "agent_log" {
                    ""
                } else {
                    "  (from the first stream)"
                }
            );
        }
        println!(
            "  to the last stream: max {:.2} ms; missed pushes {}; stream errors {}",
            self.push_ms.max, self.missed_pushes, self.stream_errors
        );
        let a = &self.agent;
        println!(
            "  agent RSS   : {} at the end, peak {} (idle with no stream {}; {:.1} KB per stream)",
            mb(a.rss_bytes),
            mb(a.peak_rss_bytes),
            mb(a.idle_rss_bytes),
            a.rss_per_stream_bytes as f64 / 1e3
        );
        println!(
            "  agent CPU   : {:.0} ms over {:.1} s of rotations, {:.1} ms per rotation (key, CSR, pushes, ACKs)",
            a.cpu_ms_rotations, a.rotation_phase_seconds, a.cpu_ms_per_rotation
        );
        if let Some(m) = &a.metrics {
            println!(
                "  agent says  : {} SDS streams, {} pushes ACKed (mean change->ACK {:.2} ms), {} limit refusals",
                m.sds_streams, m.pushes_acked, m.push_to_ack_mean_ms, m.limit_refusals
            );
        }
        println!(
            "  client      : {} thread(s), CPU {:.0} ms over the rotations",
            self.client.threads, self.client.cpu_ms_rotations
        );
        println!(
            "  machine     : {} CPUs, 1-minute load average {:.2} at the start, {:.2} at the end",
            self.machine.cpus, self.machine.loadavg_start, self.machine.loadavg_end
        );
        println!(
            "  targets     : every stream within {:.0} ms: {} (max {:.2} ms); peak RSS under {}: {} ({})",
            self.targets.push_ms,
            yes(self.targets.push_met),
            self.push_ms.max,
            mb(self.targets.rss_bytes),
            yes(self.targets.rss_met),
            mb(a.peak_rss_bytes)
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn spread() {
        let v: Vec<f64> = (1..=100).map(f64::from).rev().collect();
        assert_eq!(super::spread(v), (1.0, 50.0, 99.0, 100.0));
        assert_eq!(super::spread(vec![3.0]), (3.0, 3.0, 3.0, 3.0));
        assert_eq!(super::spread(vec![]), (0.0, 0.0, 0.0, 0.0));
    }
}
