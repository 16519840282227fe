//! Parsers for the `/proc` files behind `status`; pure, so they are tested on text.

/// Seconds since boot from `/proc/uptime`.
pub fn parse_uptime(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    Some([it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?])
}

/// `MemTotal` and `MemAvailable` in KiB from `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Seconds since the guest booted (0 where `/proc` is missing).
pub fn uptime() -> f64 {
    parse_uptime(&read("/proc/uptime")).unwrap_or(0.0)
}

/// Load averages (zeros where `/proc` is missing).
pub fn loadavg() -> [f64; 3] {
    parse_loadavg(&read("/proc/loadavg")).unwrap_or([0.0; 3])
}

/// Total and available memory in KiB (zeros where `/proc` is missing).
pub fn meminfo() -> (u64, u64) {
    parse_meminfo(&read("/proc/meminfo")).unwrap_or((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(parse_uptime("12.34 40.00\n"), Some(12.34));
        assert_eq!(
            parse_loadavg("0.50 0.25 0.10 1/80 123\n"),
            Some([0.5, 0.25, 0.1])
        );
        let mi = "MemTotal:         497000 kB\nMemFree:          400000 kB\nMemAvailable:     450000 kB\n";
        assert_eq!(parse_meminfo(mi), Some((497_000, 450_000)));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_loadavg("x"), None);
    }
}
