//! The engine's own rules for its live loop, outside any policy: its defaults, when a
//! round is big enough to measure the link, when round 1 is split for the probe, and how
//! the downtime of stopping now is predicted for the policy. `tern-agent`'s engine and
//! the model (`MigrationParams::engine`) both call these, so the model runs the rules
//! the engine runs instead of a copy that could drift from them.

/// Non-zero bytes round 1 sends before it probes the guest's dirty rate: 0.2 s on a
/// 1 Gbit/s link, long enough to see a fast guest's rate, early enough that most of
/// round 1 still runs under the throttle it leads to.
pub const PROBE_BYTES: u64 = 24 << 20;

/// Memory streams the engine sends a round on unless told otherwise: each takes one
/// contiguous slice of the round's pages, so the copy advances at that many places.
pub const STREAMS: u32 = 2;

/// The period of the engine's vCPU throttle (a cgroup CPU quota), microseconds: the
/// longest a throttled vCPU waits for its share. Shorter periods slow a TCG guest less:
/// at 20 ms a `memdirty` guest under a 95 % throttle still wrote 42-77 MB/s, at 100 ms
/// 20-41 MB/s.
pub const THROTTLE_PERIOD_US: u64 = 100_000;

/// Live rounds after which the engine stops iterating (not converged).
pub const MAX_ROUNDS: u32 = 60;

/// What the engine tells the policy the stop costs besides the final pass over memory
/// (device state and resume) when it predicts a stop's downtime. A budget, not a
/// measurement: the model's `stop_overhead_s` is what the stop really costs.
pub const STOP_COST_S: f64 = 0.03;

/// Rounds that send less than this are dominated by round trips and say nothing about
/// the link: the rate measured before them stays in use.
pub const MIN_MEASURED_ROUND_BYTES: u64 = 4 << 20;

/// The link rate a round of `bytes` sent in `seconds` measures, or `None` when the round
/// is too small to tell ([`MIN_MEASURED_ROUND_BYTES`]).
pub fn measured_bandwidth(bytes: u64, seconds: f64) -> Option<f64> {
    (bytes >= MIN_MEASURED_ROUND_BYTES && seconds > 0.0).then(|| bytes as f64 / seconds)
}

/// Downtime of stopping now, as the policy is told it: what still differs over the link
/// rate, one more pass over memory (as long as the last one took), and the fixed cost.
pub fn predicted_downtime_s(
    remaining_bytes: f64,
    bandwidth_bytes_per_s: f64,
    scan_s: f64,
    stop_cost_s: f64,
) -> f64 {
    let transfer = if bandwidth_bytes_per_s > 0.0 {
        remaining_bytes / bandwidth_bytes_per_s
    } else {
        f64::INFINITY
    };
    transfer + scan_s + stop_cost_s
}

/// Pages with data round 1 sends before its probe, out of `data_pages` to send: the
/// first `probe_bytes`, when at least as much again follows; `None` when round 1 runs
/// whole (too small to be worth a probe, or no probe asked).
pub fn probe_split_pages(data_pages: u64, probe_bytes: u64, page_size: u64) -> Option<u64> {
    let want = probe_bytes / page_size.max(1);
    (want > 0 && data_pages >= 2 * want).then_some(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_rounds_measure_no_link_rate() {
        assert_eq!(measured_bandwidth(4 << 20, 0.5), Some(8_388_608.0));
        assert_eq!(measured_bandwidth((4 << 20) - 1, 0.5), None);
        assert_eq!(measured_bandwidth(100 << 20, 0.0), None);
    }

    #[test]
    fn predicted_downtime_adds_transfer_scan_and_fixed_cost() {
        let d = predicted_downtime_s(125e6, 125e6, 0.02, STOP_COST_S);
        assert!((d - 1.05).abs() < 1e-12, "{d}");
        assert!(predicted_downtime_s(1.0, 0.0, 0.0, 0.0).is_infinite());
    }

    #[test]
    fn round_one_is_split_only_when_as_much_again_follows_the_probe() {
        assert_eq!(probe_split_pages(100, 40 * 4096, 4096), Some(40));
        assert_eq!(probe_split_pages(100, 50 * 4096, 4096), Some(50));
        assert_eq!(probe_split_pages(100, 60 * 4096, 4096), None);
        assert_eq!(probe_split_pages(100, 0, 4096), None);
    }
}
