//! Parsers for the `/proc` files the metrics come from. The parsers are pure; the readers
//! only open files.

use crate::error::{HvError, Result};
use std::path::Path;

/// Linux reports `utime`/`stime` in USER_HZ ticks, which the kernel ABI fixes at 100 on
/// x86-64 whatever the kernel's own HZ is.
const NS_PER_TICK: u64 = 10_000_000;

/// CPU time (user + system) in nanoseconds from the text of a `/proc/.../stat` file.
pub fn parse_stat_cpu_ns(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: skip to the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name come field 3 (state) onward; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * NS_PER_TICK)
}

/// A `kB` value (e.g. `VmRSS`, `MemTotal`) from a `/proc/.../status` or `/proc/meminfo` text, in bytes.
pub fn parse_kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = v.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// CPU time of one thread of a process.
pub fn thread_cpu_ns(pid: u32, tid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/task/{tid}/stat");
    let text = std::fs::read_to_string(&path).map_err(HvError::io(format!("reading {path}")))?;
    parse_stat_cpu_ns(&text).ok_or_else(|| HvError::Protocol(format!("cannot parse {path}")))
}

/// Resident memory of a process in bytes.
pub fn process_rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(HvError::io(format!("reading {path}")))?;
    Ok(parse_kb_field(&text, "VmRSS").unwrap_or(0))
}

/// Total memory of the host in bytes, from `meminfo` under `proc_root`.
pub fn host_memory_bytes(proc_root: &Path) -> Result<u64> {
    let path = proc_root.join("meminfo");
    let text = std::fs::read_to_string(&path)
        .map_err(HvError::io(format!("reading {}", path.display())))?;
    parse_kb_field(&text, "MemTotal")
        .ok_or_else(|| HvError::Protocol(format!("no MemTotal in {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_in_name() {
        let stat = "4242 (CPU 0/TCG) S 1 2 3 0 -1 4194368 100 0 0 0 250 50 0 0 20 0 3 0 1234 1 2";
        assert_eq!(parse_stat_cpu_ns(stat), Some(300 * NS_PER_TICK));
        let weird = "7 (a) b (c)) R 1 2 3 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0";
        assert_eq!(parse_stat_cpu_ns(weird), Some(3 * NS_PER_TICK));
        assert_eq!(parse_stat_cpu_ns("garbage"), None);
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(text in ".{0,300}") {
            let _ = parse_stat_cpu_ns(&text);
            let _ = parse_kb_field(&text, "VmRSS");
        }
    }

    #[test]
    fn kb_fields() {
        let t = "Name:\tqemu\nVmRSS:\t  2048 kB\nMemTotal:  10 kB\n";
        assert_eq!(parse_kb_field(t, "VmRSS"), Some(2048 * 1024));
        assert_eq!(parse_kb_field(t, "MemTotal"), Some(10 * 1024));
        assert_eq!(parse_kb_field(t, "VmRS"), None);
    }

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(process_rss_bytes(pid).unwrap() > 0);
        thread_cpu_ns(pid, pid).unwrap();
        assert!(host_memory_bytes(Path::new("/proc")).unwrap() > 0);
    }
}
