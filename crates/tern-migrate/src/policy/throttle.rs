//! How hard to throttle a guest so that its remainder fits the downtime budget, and how
//! that translates into a cgroup v2 `cpu.max` line for the guest's vCPU threads.
//!
//! The next round sends what remains, taking about the predicted downtime `P`. For the
//! stop-and-copy after it to fit the budget `L`, the guest may dirty at most `L·B` bytes
//! during that round, i.e. at `L·B / P` bytes per second. Dirtying scales with the vCPU
//! time the guest gets, so the quota to keep is that rate over the guest's unthrottled
//! rate, and the throttle is the rest.

/// Throttle percent (share of vCPU time taken away) that should bring the remainder
/// within the budget, given the last round's figures. `current_percent` is the throttle
/// that was in effect while `dirty_rate` was measured; `margin` (0, 1] leaves headroom
/// because a measured distinct-page rate understates a saturated hot set.
/// Returns 0 when no throttle is needed, at most 99.
pub fn throttle_for(
    predicted_downtime_s: f64,
    downtime_limit_s: f64,
    bandwidth_bytes_per_s: f64,
    dirty_rate_bytes_per_s: f64,
    current_percent: u8,
    margin: f64,
) -> u8 {
    if predicted_downtime_s <= downtime_limit_s || dirty_rate_bytes_per_s <= 0.0 {
        return 0;
    }
    if bandwidth_bytes_per_s <= 0.0 || !bandwidth_bytes_per_s.is_finite() {
        return 99;
    }
    let kept = (100.0 - f64::from(current_percent.min(99))) / 100.0;
    let unthrottled_rate = dirty_rate_bytes_per_s / kept;
    let allowed_rate = margin * downtime_limit_s * bandwidth_bytes_per_s / predicted_downtime_s;
    let quota = (allowed_rate / unthrottled_rate).clamp(0.0, 1.0);
    let percent = (100.0 * (1.0 - quota)).ceil();
    percent.clamp(0.0, 99.0) as u8
}

/// vCPU share the guest keeps under a throttle of `percent`, in percent.
pub fn cpu_quota_percent(percent: u8) -> u8 {
    100 - percent.min(99)
}

/// The cgroup v2 `cpu.max` value ("QUOTA PERIOD", microseconds) that gives `vcpus`
/// vCPU threads together the share left by a throttle of `percent`; `"max PERIOD"`
/// when there is no throttle.
pub fn cpu_max(percent: u8, vcpus: u32, period_us: u64) -> String {
    if percent == 0 {
        return format!("max {period_us}");
    }
    let quota = period_us * u64::from(vcpus.max(1)) * u64::from(cpu_quota_percent(percent)) / 100;
    // The kernel refuses quotas below 1 ms.
    format!("{} {period_us}", quota.max(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_throttle_when_the_remainder_fits() {
        assert_eq!(throttle_for(0.2, 0.3, 1.25e8, 5e8, 0, 1.0), 0);
    }

    #[test]
    fn quota_is_limit_over_predicted_times_bandwidth_over_rate() {
        // P = 0.6 s, L = 0.3 s, B = 125 MB/s, r = 125 MB/s: quota 0.5 -> throttle 50 %.
        assert_eq!(throttle_for(0.6, 0.3, 1.25e8, 1.25e8, 0, 1.0), 50);
        // The same rate measured under a 50 % throttle means 250 MB/s unthrottled.
        assert_eq!(throttle_for(0.6, 0.3, 1.25e8, 1.25e8, 50, 1.0), 75);
        // A much faster dirtier saturates at the maximum.
        assert_eq!(throttle_for(10.0, 0.3, 1.25e8, 1e10, 0, 1.0), 99);
    }

    #[test]
    fn cpu_max_scales_with_vcpus() {
        assert_eq!(cpu_max(0, 2, 100_000), "max 100000");
        assert_eq!(cpu_max(75, 2, 100_000), "50000 100000");
        assert_eq!(cpu_max(99, 1, 10_000), "1000 10000");
    }
}
