//! CPU time and memory of a local process, from /proc (Linux).

/// Clock ticks per second of /proc's CPU times (`_SC_CLK_TCK`): 100 on
/// every Linux architecture we build for.
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU time of a process (every thread), in seconds;
/// `None` when it cannot be read (not Linux, not ours, gone).
pub(super) fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may hold spaces: fields count from after its ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    #[allow(clippy::cast_precision_loss)]
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// A `/proc/<pid>/status` memory field (`VmRSS`, `VmHWM`) in bytes.
pub(super) fn memory_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let v = l.strip_prefix(field)?.strip_prefix(':')?.trim();
        let kib: u64 = v.strip_suffix("kB")?.trim().parse().ok()?;
        kib.checked_mul(1024)
    })
}

/// Open file descriptors of a process (entries of `/proc/<pid>/fd`).
pub(super) fn open_fds(pid: u32) -> Option<u64> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    u64::try_from(entries.count()).ok()
}

/// The soft limit on open files of this process.
pub(super) fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    match line.split_whitespace().nth(3)? {
        "unlimited" => Some(u64::MAX),
        soft => soft.parse().ok(),
    }
}

/// The 1-minute load average.
pub(super) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(cpu_seconds(None).is_some());
        let rss = memory_bytes(std::process::id(), "VmRSS").unwrap();
        assert!(rss > 100_000, "{rss}");
        assert!(open_files_limit().unwrap() > 0);
        assert!(open_fds(std::process::id()).unwrap() >= 3);
        assert_eq!(memory_bytes(std::process::id(), "NoSuchField"), None);
    }
}
