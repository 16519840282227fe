//! The engine's own rules for its live loop, outside any policy: its defaults, when a
//! round is big enough to measure the link, when round 1 is split for the probe, and how
//! the downtime of stopping now is predicted for the policy. `tern-agent`'s engine and
//! the model (`MigrationParams::engine`) both call these, so the model runs the rules
//! the engine runs instead of a copy that could drift from them.

use crate::telemetry::RoundTelemetry;

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

/// The longest the engine's stop waits for a throttled guest to be held off the CPU
/// with the room it needs: two periods (a share spent too late in one period is
/// followed by the next).
pub const CATCH_UP_WAIT_US: u64 = 2 * THROTTLE_PERIOD_US;

/// How long a vCPU's run time must stand still before the engine takes it as held off
/// the CPU: longer than a scheduler tick (4 ms at 250 Hz), at which the kernel brings a
/// running thread's clock up to date.
pub const HELD_AFTER_STILL_US: u64 = 6_000;

/// What a catch-up pass needs beyond its scan and transfer: the round trip that ends
/// it and asking QEMU to stop.
const CATCH_UP_MARGIN_S: f64 = 0.005;

/// How the engine's stop catches up with a throttled guest before pausing it, so that
/// the pause carries nothing the guest wrote: a throttled guest writes only in its
/// share of each period, just after the period begins, and the last round's scan may
/// have passed its pages before the latest share or not. The stop waits until the
/// guest is held off the CPU with `room_s` left before its next share, then scans and
/// sends what differs while it is; a pass the guest ran during (its hold misjudged, or
/// the pass too long) is followed by another, needing `again_s`, up to
/// [`CATCH_UP_PASSES`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CatchUp {
    /// The throttle the catch-up holds the guest at: the policy's, tightened to
    /// [`CATCH_UP_THROTTLE_PERCENT`] (a short share leaves a long stretch held).
    pub throttle_percent: u8,
    /// Send what differs live first: the remainder and a share's writes do not fit
    /// one held stretch, a share's writes do.
    pub live_first: bool,
    /// The room the first held pass needs: a scan, and sending the remainder (unless
    /// sent live first) and a share's writes.
    pub room_s: f64,
    /// The room a later pass needs: a scan and a share's writes.
    pub again_s: f64,
}

/// The least throttle a catch-up holds the guest at: under a looser one the guest's
/// share, stretched by the engine's own work on the host's cores, left no stretch held
/// long enough for a pass (at 82-89 % the stop found none in 3 of 5 runs).
pub const CATCH_UP_THROTTLE_PERCENT: u8 = 95;

/// Held passes a catch-up makes at most.
pub const CATCH_UP_PASSES: u32 = 3;

/// How much longer than its CPU time a throttled guest's share takes on the clock: the
/// guest shares its host's cores with the engine (a share of 5 ms was spent 10-18 ms
/// into the period on a 2-core host).
const SHARE_STRETCH_S: f64 = 0.010;

/// How long into a period a guest throttled at `percent` is seen held off the CPU:
/// its share on the clock, the scheduler's tick (4 ms at 250 Hz; the kernel enforces
/// the quota at the next one) and [`HELD_AFTER_STILL_US`].
pub fn held_after_s(percent: u8) -> f64 {
    let period_s = THROTTLE_PERIOD_US as f64 / 1e6;
    let share_s = period_s * f64::from(crate::cpu_quota_percent(percent)) / 100.0;
    share_s + SHARE_STRETCH_S + 0.004 + HELD_AFTER_STILL_US as f64 / 1e6
}

/// The catch-up for a guest throttled at `percent`, with `remaining_pages` left at the
/// stop, writing about `share_pages` in a period's share under that throttle, or
/// `None` (no throttle, or not even a share's writes fit the stretch the guest is held;
/// the pause then carries what is left).
pub fn catch_up(
    percent: u8,
    remaining_pages: f64,
    share_pages: f64,
    page_size: u64,
    bandwidth_bytes_per_s: f64,
    scan_s: f64,
) -> Option<CatchUp> {
    if percent == 0 || bandwidth_bytes_per_s <= 0.0 {
        return None;
    }
    let throttle_percent = percent.max(CATCH_UP_THROTTLE_PERCENT);
    // A guest writes in proportion to the CPU time it gets.
    let share_pages = share_pages * f64::from(crate::cpu_quota_percent(throttle_percent))
        / f64::from(crate::cpu_quota_percent(percent));
    let held_s = THROTTLE_PERIOD_US as f64 / 1e6 - held_after_s(throttle_percent);
    let pass_s = |pages: f64| {
        scan_s + pages.max(0.0) * page_size as f64 / bandwidth_bytes_per_s + CATCH_UP_MARGIN_S
    };
    let whole = pass_s(remaining_pages + share_pages);
    let again_s = pass_s(share_pages);
    if again_s > held_s {
        return None;
    }
    let live_first = whole > held_s;
    let room_s = if live_first { again_s } else { whole };
    Some(CatchUp {
        throttle_percent,
        live_first,
        room_s,
        again_s,
    })
}

/// Pages a guest throttled at `percent` writes in a period's share, from the rounds
/// under that throttle after round 1: the most of the last two, each the lesser of its
/// changed pages and its rate over a period (a round shorter than the period caught
/// one share or none; a longer one, several).
pub fn share_pages(history: &[RoundTelemetry], percent: u8, page_size: u64) -> f64 {
    let period_s = THROTTLE_PERIOD_US as f64 / 1e6;
    history
        .iter()
        .skip(1)
        .filter(|r| r.throttle_percent == percent)
        .rev()
        .take(2)
        .map(|r| {
            let over_period = r.dirty_rate_bytes_per_s * period_s / page_size.max(1) as f64;
            (r.pages_changed as f64).min(over_period)
        })
        .fold(0.0, f64::max)
}

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
    fn the_stop_catches_up_in_one_held_stretch_or_after_a_live_pass() {
        let (bw, ps) = (120e6, 4096);
        let pass = |pages: f64, scan_s: f64| scan_s + pages * 4096.0 / bw + 0.005;
        assert_eq!(catch_up(0, 0.0, 0.0, ps, bw, 0.01), None);
        // 95 %: held 75 ms a period. 600 + 800 pages and a 13 ms scan: 65.8 ms.
        let c = catch_up(95, 600.0, 800.0, ps, bw, 0.013).expect("a catch-up");
        assert!(!c.live_first);
        assert!((c.room_s - pass(1400.0, 0.013)).abs() < 1e-9, "{c:?}");
        assert!((c.again_s - pass(800.0, 0.013)).abs() < 1e-9, "{c:?}");
        // 2,000 more pages do not fit; the share's writes alone do.
        let c = catch_up(95, 2600.0, 800.0, ps, bw, 0.013).expect("a catch-up");
        assert!(c.live_first && c.room_s == c.again_s, "{c:?}");
        // At 87 % the guest is held at 95 % for the catch-up: a share of 1,300 pages
        // at 87 % is one of 500 then.
        let c = catch_up(87, 0.0, 1300.0, ps, bw, 0.015).expect("a catch-up");
        assert_eq!(c.throttle_percent, 95);
        assert!((c.again_s - pass(500.0, 0.015)).abs() < 1e-9, "{c:?}");
        // Nor is a harder throttle loosened.
        assert_eq!(
            catch_up(99, 0.0, 100.0, ps, bw, 0.015)
                .unwrap()
                .throttle_percent,
            99
        );
        // A share that does not fit even at 95 %: 2,600 pages at 95 %.
        assert_eq!(catch_up(95, 0.0, 2600.0, ps, bw, 0.015), None);
        assert_eq!(catch_up(95, 0.0, 0.0, ps, 0.0, 0.01), None);
    }

    #[test]
    fn a_share_is_what_the_last_two_throttled_rounds_wrote_in_a_period() {
        let round = |n: u32, throttle: u8, changed: u64, rate: f64| RoundTelemetry {
            round: n,
            pages_sent: 0,
            bytes_sent: 0,
            pages_changed: changed,
            dirty_rate_bytes_per_s: rate,
            bandwidth_bytes_per_s: 120e6,
            remaining_pages: 0,
            held_back_pages: 0,
            predicted_downtime_s: 0.0,
            duration_s: 0.0,
            elapsed_s: 0.0,
            throttle_percent: throttle,
        };
        assert_eq!(share_pages(&[], 95, 4096), 0.0);
        let h = [
            round(1, 95, 50_000, 200e6),
            // 3 periods at 40.96 MB/s: 1,000 pages a period.
            round(2, 95, 3000, 40.96e6),
            // A 50 ms round that caught one share of 800 pages, one that caught none.
            round(3, 95, 800, 65.5e6),
            round(4, 95, 0, 0.0),
        ];
        assert_eq!(share_pages(&h, 95, 4096), 800.0);
        assert_eq!(share_pages(&h[..3], 95, 4096), 1000.0);
        // Round 1, and rounds under another throttle, say nothing.
        assert_eq!(share_pages(&h[..1], 95, 4096), 0.0);
        assert_eq!(share_pages(&h, 90, 4096), 0.0);
    }

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
