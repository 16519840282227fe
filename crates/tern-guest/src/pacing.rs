//! Steady-rate pacing for workloads: how many units (pages) are due after some time,
//! worked out in small slices so that the rate is even, not bursty.
//!
//! Pure: the caller passes the elapsed time; nothing here reads a clock.

use std::time::Duration;

/// The time slice workloads sleep in between bursts: short enough that a 1 s window
/// sees an even rate, long enough that sleeping costs little under TCG.
pub const SLICE: Duration = Duration::from_millis(5);

/// Counts units due at a fixed rate. After a stall (the guest was paused, e.g. at the
/// stop-and-copy of a migration) it does not catch up with a burst: at most
/// `max_backlog` units are owed at any time, and the rest of the debt is forgiven.
#[derive(Debug, Clone)]
pub struct Pacer {
    per_sec: f64,
    max_backlog: u64,
    /// Time at which `done` units were exactly on schedule.
    base: Duration,
    done_since_base: u64,
}

impl Pacer {
    /// A pacer for `per_sec` units per second that owes at most `max_backlog` units.
    pub fn new(per_sec: f64, max_backlog: u64) -> Pacer {
        Pacer {
            per_sec: per_sec.max(0.0),
            max_backlog: max_backlog.max(1),
            base: Duration::ZERO,
            done_since_base: 0,
        }
    }

    /// A pacer that owes at most what 2 slices' worth of work is (at least one unit).
    pub fn with_slices(per_sec: f64) -> Pacer {
        let backlog = (per_sec * SLICE.as_secs_f64() * 2.0).ceil() as u64;
        Pacer::new(per_sec, backlog)
    }

    /// Units due now, `elapsed` after the start. The caller does them and calls
    /// [`Pacer::done`].
    pub fn due(&mut self, elapsed: Duration) -> u64 {
        let since = elapsed.saturating_sub(self.base).as_secs_f64();
        let owed_total = (since * self.per_sec).floor() as u64;
        let owed = owed_total.saturating_sub(self.done_since_base);
        if owed > self.max_backlog {
            // Forgive the debt: restart the schedule so exactly max_backlog is owed now.
            let owed_span = Duration::from_secs_f64(self.max_backlog as f64 / self.per_sec);
            self.base = elapsed.saturating_sub(owed_span);
            self.done_since_base = 0;
            let since = elapsed.saturating_sub(self.base).as_secs_f64();
            return ((since * self.per_sec).floor() as u64).min(self.max_backlog);
        }
        owed
    }

    /// Records that `n` units were done.
    pub fn done(&mut self, n: u64) {
        self.done_since_base += n;
    }

    /// How long until at least one more unit is due (bounded by one slice).
    pub fn wait(&self, elapsed: Duration) -> Duration {
        if self.per_sec <= 0.0 {
            return SLICE;
        }
        let next =
            self.base + Duration::from_secs_f64((self.done_since_base + 1) as f64 / self.per_sec);
        next.saturating_sub(elapsed)
            .clamp(Duration::from_micros(200), SLICE)
    }
}

/// Busy and idle parts of one `period` for a CPU load of `percent`.
pub fn duty_cycle(percent: f64, period: Duration) -> (Duration, Duration) {
    let busy = period.mul_f64((percent / 100.0).clamp(0.0, 1.0));
    (busy, period - busy)
}

/// Pages per second for a rate given in MB/s (10^6 bytes) of 4 KiB pages.
pub fn pages_per_sec(mbps: f64) -> f64 {
    mbps * 1e6 / crate::PAGE_SIZE as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Drives a pacer in `tick` steps for `total`, doing all that is due each time.
    fn simulate(p: &mut Pacer, tick: Duration, total: Duration) -> u64 {
        let mut t = Duration::ZERO;
        let mut sum = 0;
        while t < total {
            t += tick;
            let n = p.due(t);
            p.done(n);
            sum += n;
        }
        sum
    }

    #[test]
    fn steady_rate_over_a_second() {
        let mut p = Pacer::with_slices(pages_per_sec(50.0));
        let n = simulate(&mut p, Duration::from_millis(5), Duration::from_secs(1));
        let want = pages_per_sec(50.0);
        assert!(
            (n as f64 - want).abs() <= want * 0.01 + 2.0,
            "{n} vs {want}"
        );
    }

    #[test]
    fn no_burst_after_a_pause() {
        let mut p = Pacer::with_slices(10_000.0);
        simulate(&mut p, Duration::from_millis(5), Duration::from_secs(1));
        // The guest stood still for 5 s: only the backlog cap is owed, not 50 000 units.
        let n = p.due(Duration::from_secs(6));
        assert!(n <= 100, "{n}");
        p.done(n);
        // And the rate afterwards is the same.
        let mut later = 0;
        let mut t = Duration::from_secs(6);
        while t < Duration::from_secs(7) {
            t += Duration::from_millis(5);
            let n = p.due(t);
            p.done(n);
            later += n;
        }
        assert!((later as i64 - 10_000).abs() <= 110, "{later}");
    }

    #[test]
    fn zero_rate_owes_nothing() {
        let mut p = Pacer::with_slices(0.0);
        assert_eq!(
            simulate(&mut p, Duration::from_millis(5), Duration::from_secs(3)),
            0
        );
        assert_eq!(p.wait(Duration::from_secs(3)), SLICE);
    }

    #[test]
    fn duty_cycle_splits_the_period() {
        let (b, i) = duty_cycle(30.0, Duration::from_millis(100));
        assert_eq!(b, Duration::from_millis(30));
        assert_eq!(i, Duration::from_millis(70));
        assert_eq!(
            duty_cycle(150.0, Duration::from_millis(10)).1,
            Duration::ZERO
        );
    }

    proptest! {
        /// Whatever the tick pattern, the count never runs ahead of the schedule and
        /// no single call owes more than the backlog cap.
        #[test]
        fn never_ahead_never_bursty(rate in 1.0f64..100_000.0, ticks in proptest::collection::vec(1u64..2000, 1..300)) {
            let mut p = Pacer::with_slices(rate);
            let cap = (rate * SLICE.as_secs_f64() * 2.0).ceil() as u64;
            let mut t = Duration::ZERO;
            let mut sum = 0u64;
            for ms in ticks {
                t += Duration::from_millis(ms);
                let n = p.due(t);
                prop_assert!(n <= cap.max(1), "{n} > {cap}");
                p.done(n);
                sum += n;
                prop_assert!(sum as f64 <= t.as_secs_f64() * rate + 1.0);
            }
        }

        /// Ticks no longer than the backlog window keep the count on schedule.
        #[test]
        fn short_ticks_stay_on_schedule(rate in 1.0f64..100_000.0, ticks in proptest::collection::vec(1u64..=10, 1..300)) {
            let mut p = Pacer::with_slices(rate);
            let mut t = Duration::ZERO;
            let mut sum = 0u64;
            for ms in ticks {
                t += Duration::from_millis(ms);
                let n = p.due(t);
                p.done(n);
                sum += n;
                let behind = t.as_secs_f64() * rate - sum as f64;
                prop_assert!(behind <= 1.0 + 1e-6, "behind {behind}");
            }
        }
    }
}
