//! The report of `ca bench soak`: its figures, its memory and descriptor
//! series, and the verdict.

use std::collections::BTreeMap;

use serde::Serialize;

use super::agent_report::Machine;

/// What a soak saw, and whether it passed.
#[derive(Debug, Serialize)]
pub struct SoakReport {
    /// Always `soak`.
    pub mode: &'static str,
    /// Length of the run (load, agents and streams all running).
    pub seconds: f64,
    /// `ca agent` processes, in node mode.
    pub agents: usize,
    /// Workloads per agent; each has one SDS stream (`default` and `ROOTCA`).
    pub workloads_per_agent: usize,
    /// Lifetime of the agents' certificates (they renew at about half).
    pub cert_ttl_ms: u64,
    /// The background `CreateCertificate` load.
    pub load: LoadFigures,
    /// The SDS streams and the agents' renewals.
    pub sds: SdsFigures,
    /// The root rotation in the middle (`None`: `--soak-no-rotation`).
    pub root_rotation: Option<RotationFigures>,
    /// The agents' own counters at the end, summed over the agents.
    pub agent_metrics: AgentCounters,
    /// The CA's memory and descriptors.
    pub ca: ProcFigures,
    /// Each agent's memory and descriptors.
    pub agent_procs: Vec<ProcFigures>,
    /// What counts as growth.
    pub limits: Limits,
    /// Every error, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Their sum.
    pub error_total: u64,
    /// The first few errors in full.
    pub error_examples: Vec<String>,
    /// Why the run failed (errors, growth beyond the limits); empty when it
    /// passed.
    pub failures: Vec<String>,
    /// No error and no growth beyond the limits.
    pub passed: bool,
    /// The machine's cores and load (the run shares them with everything
    /// else on it).
    pub machine: Machine,
}

/// The background load.
#[derive(Debug, Serialize)]
pub struct LoadFigures {
    /// Calls per second asked for.
    pub rate: u32,
    /// Calls in flight, each worker on a connection of its own.
    pub concurrency: usize,
    /// Lifetime of the load's certificates (the CA's `--default-ttl`).
    pub cert_ttl_ms: u64,
    /// Calls made.
    pub requests: u64,
    /// Calls answered with a certificate.
    pub ok: u64,
    /// Answers decoded and checked (chain to the CA's bundle, SPIFFE ID,
    /// the CSR's key).
    pub verified: u64,
    /// `ok` per second of the run.
    pub certs_per_sec: f64,
}

/// The SDS streams.
#[derive(Debug, Serialize)]
pub struct SdsFigures {
    /// Streams held (one per workload).
    pub streams: usize,
    /// Responses received (each ACKed).
    pub pushes: u64,
    /// Certificates received and checked (SPIFFE ID, valid now, chain to
    /// the pushed `ROOTCA` and to the CA's bundle).
    pub certificates_checked: u64,
    /// New certificates after each stream's first: the rotations seen.
    pub rotations_seen: u64,
    /// Times a stream's certificate expired before a new one came.
    pub missed_rotations: u64,
    /// "certificate obtained" lines in the agents' logs during the run.
    pub renewals: u64,
}

/// The root rotation (`ca rotate-root`, every step on its gate).
#[derive(Debug, Serialize)]
pub struct RotationFigures {
    /// Seconds into the run it started.
    pub started_at_seconds: f64,
    /// Seconds from prepare to the end of retire.
    pub seconds: f64,
    /// It exited 0 having said "rotation complete".
    pub completed: bool,
    /// Its progress lines (each step, what it waited for).
    pub output: Vec<String>,
}

/// The agents' failure counters.
#[derive(Debug, Default, Serialize)]
pub struct AgentCounters {
    /// `workload_ca_agent_csr_failures_total`.
    pub csr_failures: f64,
    /// `workload_ca_agent_csr_retries_total`.
    pub csr_retries: f64,
    /// `workload_ca_agent_sds_nacks_total`.
    pub sds_nacks: f64,
    /// `workload_ca_agent_token_unusable_total`.
    pub token_unusable: f64,
    /// `workload_ca_agent_limit_refusals_total`.
    pub limit_refusals: f64,
    /// `workload_ca_agent_sds_pushes_total`.
    pub sds_pushes: f64,
}

/// One process's samples after the warm-up.
#[derive(Debug, Serialize)]
pub struct ProcFigures {
    /// `ca` or `agent-<k>`.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Samples taken after the warm-up.
    pub samples: usize,
    /// RSS at the start (median of the first three samples after the
    /// warm-up), at the end (median of the last three) and the largest.
    pub rss_start_bytes: u64,
    /// See `rss_start_bytes`.
    pub rss_end_bytes: u64,
    /// See `rss_start_bytes`.
    pub rss_max_bytes: u64,
    /// Least-squares slope of RSS over the samples, KiB per minute.
    pub rss_slope_kib_per_min: f64,
    /// Open descriptors, as the RSS.
    pub fds_start: u64,
    /// See `fds_start`.
    pub fds_end: u64,
    /// See `fds_start`.
    pub fds_max: u64,
}

/// The growth a soak tolerates, start to end, in every process.
#[derive(Debug, Serialize)]
pub struct Limits {
    /// RSS.
    pub rss_growth_bytes: u64,
    /// Open descriptors.
    pub fd_growth: u64,
}

impl ProcFigures {
    /// Its growth beyond `limits`, as text.
    pub(super) fn over(&self, limits: &Limits) -> Vec<String> {
        let mut out = Vec::new();
        if self.rss_end_bytes > self.rss_start_bytes + limits.rss_growth_bytes {
            out.push(format!(
                "{} RSS grew from {:.1} to {:.1} MiB (limit +{:.1} MiB)",
                self.name,
                mib(self.rss_start_bytes),
                mib(self.rss_end_bytes),
                mib(limits.rss_growth_bytes)
            ));
        }
        if self.fds_end > self.fds_start + limits.fd_growth {
            out.push(format!(
                "{} open descriptors grew from {} to {} (limit +{})",
                self.name, self.fds_start, self.fds_end, limits.fd_growth
            ));
        }
        out
    }
}

/// One sample of a process.
#[derive(Clone, Copy, Debug)]
pub(super) struct Sample {
    /// Seconds into the run.
    pub at: f64,
    pub rss: u64,
    pub fds: u64,
}

/// The figures of `samples` (those after the warm-up).
pub(super) fn figures(name: String, pid: u32, samples: &[Sample]) -> ProcFigures {
    let med = |s: &[Sample], f: fn(&Sample) -> u64| {
        let mut v: Vec<u64> = s.iter().map(f).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let first = samples.get(..3.min(samples.len())).unwrap_or(&[]);
    let last = samples
        .get(samples.len().saturating_sub(3)..)
        .unwrap_or(&[]);
    ProcFigures {
        name,
        pid,
        samples: samples.len(),
        rss_start_bytes: med(first, |s| s.rss),
        rss_end_bytes: med(last, |s| s.rss),
        rss_max_bytes: samples.iter().map(|s| s.rss).max().unwrap_or(0),
        rss_slope_kib_per_min: slope(samples) * 60.0 / 1024.0,
        fds_start: med(first, |s| s.fds),
        fds_end: med(last, |s| s.fds),
        fds_max: samples.iter().map(|s| s.fds).max().unwrap_or(0),
    }
}

/// Least-squares slope of RSS (bytes per second).
#[allow(clippy::cast_precision_loss)]
fn slope(samples: &[Sample]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let mt = samples.iter().map(|s| s.at).sum::<f64>() / n;
    let mr = samples.iter().map(|s| s.rss as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        num += (s.at - mt) * (s.rss as f64 - mr);
        den += (s.at - mt) * (s.at - mt);
    }
    if den > 0.0 { num / den } else { 0.0 }
}

#[allow(clippy::cast_precision_loss)]
fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl SoakReport {
    /// The report for a person.
    pub fn print_human(&self) {
        let l = &self.load;
        let s = &self.sds;
        println!(
            "ca bench soak: {:.0} s, {} agents x {} workloads ({} s certificates), load {} calls/s asked, {} in flight: {}",
            self.seconds,
            self.agents,
            self.workloads_per_agent,
            self.cert_ttl_ms as f64 / 1e3,
            l.rate,
            l.concurrency,
            if self.passed { "PASSED" } else { "FAILED" }
        );
        println!(
            "  load        : {} calls, {} certificates ({:.0}/s), {} answers verified, load certificates of {:.0} s",
            l.requests,
            l.ok,
            l.certs_per_sec,
            l.verified,
            l.cert_ttl_ms as f64 / 1e3
        );
        println!(
            "  sds         : {} streams, {} pushes ACKed, {} certificates checked, {} rotations seen, {} missed; {} agent renewals",
            s.streams,
            s.pushes,
            s.certificates_checked,
            s.rotations_seen,
            s.missed_rotations,
            s.renewals
        );
        match &self.root_rotation {
            Some(r) => {
                println!(
                    "  root rotation: started at {:.0} s, {} in {:.1} s (ca rotate-root: prepare, activate, retire, each on its gate)",
                    r.started_at_seconds,
                    if r.completed {
                        "completed"
                    } else {
                        "NOT completed"
                    },
                    r.seconds
                );
                for line in &r.output {
                    println!("      | {line}");
                }
            }
            None => println!("  root rotation: none (--soak-no-rotation)"),
        }
        let m = &self.agent_metrics;
        println!(
            "  agents say  : {} CSR failures, {} retries, {} NACKs, {} unusable tokens, {} limit refusals, {} SDS pushes",
            m.csr_failures,
            m.csr_retries,
            m.sds_nacks,
            m.token_unusable,
            m.limit_refusals,
            m.sds_pushes
        );
        println!(
            "  memory, fds : start = median of the first 3 samples after the warm-up, end = of the last 3; limits +{:.1} MiB RSS, +{} fds",
            mib(self.limits.rss_growth_bytes),
            self.limits.fd_growth
        );
        for p in std::iter::once(&self.ca).chain(&self.agent_procs) {
            println!(
                "    {:<8} RSS {:6.1} -> {:6.1} MiB (max {:6.1}, slope {:+7.1} KiB/min)  fds {:3} -> {:3} (max {:3})  {} samples",
                p.name,
                mib(p.rss_start_bytes),
                mib(p.rss_end_bytes),
                mib(p.rss_max_bytes),
                p.rss_slope_kib_per_min,
                p.fds_start,
                p.fds_end,
                p.fds_max,
                p.samples
            );
        }
        println!("  errors      : {}", self.error_total);
        for (kind, n) in &self.errors {
            println!("    {n:6}  {kind}");
        }
        for e in &self.error_examples {
            println!("    e.g. {e}");
        }
        println!(
            "  machine     : {} CPUs, 1-minute load average {:.2} at the start, {:.2} at the end",
            self.machine.cpus, self.machine.loadavg_start, self.machine.loadavg_end
        );
        for f in &self.failures {
            println!("  FAILED      : {f}");
        }
    }

    /// `Ok` when the run passed.
    ///
    /// # Errors
    /// Why it failed.
    pub fn verdict(&self) -> anyhow::Result<()> {
        if self.passed {
            Ok(())
        } else {
            anyhow::bail!("the soak failed: {}", self.failures.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at: f64, rss: u64, fds: u64) -> Sample {
        Sample { at, rss, fds }
    }

    #[test]
    fn start_end_and_slope() {
        let s: Vec<Sample> = (0..10)
            .map(|i| at(f64::from(i), 1000 + 10 * u64::from(i as u8), 20))
            .collect();
        let f = figures("ca".into(), 1, &s);
        assert_eq!(
            (f.rss_start_bytes, f.rss_end_bytes, f.rss_max_bytes),
            (1010, 1080, 1090)
        );
        assert!((f.rss_slope_kib_per_min - 10.0 * 60.0 / 1024.0).abs() < 1e-9);
        let limits = Limits {
            rss_growth_bytes: 100,
            fd_growth: 2,
        };
        assert!(f.over(&limits).is_empty());
        let limits = Limits {
            rss_growth_bytes: 50,
            fd_growth: 2,
        };
        assert_eq!(f.over(&limits).len(), 1);
        let mut s = s;
        for x in s.iter_mut().skip(7) {
            x.fds = 23;
        }
        assert!(
            figures("ca".into(), 1, &s)
                .over(&limits)
                .iter()
                .any(|m| m.contains("descriptors"))
        );
        assert_eq!(figures("x".into(), 1, &[]).samples, 0);
    }
}
