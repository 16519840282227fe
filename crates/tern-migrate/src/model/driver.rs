//! The round loop shared by the analytic and the page-level model: ask the policy, send,
//! let the guest dirty for as long as sending took, record telemetry, repeat; then the
//! stop-and-copy. Only the guest's memory differs between the two models.

use super::MigrationParams;
use crate::fragment::{FragmentId, FragmentTracker};
use crate::policy::{decide, Decision, Policy, PolicyInput};
use crate::telemetry::{MigrationOutcome, RoundTelemetry};

/// Guest memory as a model sees it, in pages (fractional for the analytic model).
pub(super) trait ModelGuest {
    /// Pages that differ from the destination.
    fn remaining(&self) -> f64;
    /// Of those, pages in the given fragments.
    fn remaining_in(&self, fragments: &[FragmentId]) -> f64;
    /// Marks every differing page outside `hold_back` as sent; returns how many.
    fn send(&mut self, hold_back: &[FragmentId]) -> f64;
    /// Lets the guest run for `seconds` with its rates scaled by `rate_factor`, then
    /// feeds the tracker; returns the distinct pages changed meanwhile.
    fn run(&mut self, seconds: f64, rate_factor: f64) -> f64;
    fn tracker(&self) -> &FragmentTracker;
}

pub(super) fn drive(
    params: &MigrationParams,
    policy: &dyn Policy,
    guest: &mut dyn ModelGuest,
) -> MigrationOutcome {
    let limits = params.limits();
    let ps = params.page_size as f64;
    let bw = params.bandwidth_bytes_per_s;
    let mut history: Vec<RoundTelemetry> = Vec::new();
    let mut throttle = 0u8;
    let mut max_throttle = 0u8;
    let mut elapsed = 0.0;
    let mut pages_total = 0.0;
    loop {
        let input = PolicyInput {
            history: &history,
            fragments: guest.tracker(),
            limits: &limits,
        };
        let hold_back = match decide(policy, &input) {
            Decision::Continue { hold_back } => hold_back,
            Decision::Throttle { percent, hold_back } => {
                throttle = percent.min(99);
                max_throttle = max_throttle.max(throttle);
                hold_back
            }
            Decision::StopAndCopy { reason } => {
                let last_pages = guest.remaining();
                let downtime = last_pages * ps / bw + params.stop_overhead_s;
                pages_total += last_pages;
                return MigrationOutcome {
                    policy: policy.name().to_owned(),
                    total_time_s: elapsed + downtime,
                    downtime_s: downtime,
                    bytes_sent: (pages_total * ps).round() as u64,
                    rounds: history.len() as u32,
                    converged: reason.converged(),
                    stop_reason: reason,
                    max_throttle_percent: max_throttle,
                    telemetry: history,
                };
            }
        };
        let sent = guest.send(&hold_back);
        let duration = sent * ps / bw;
        let changed = guest.run(duration, 1.0 - f64::from(throttle) / 100.0);
        elapsed += duration;
        pages_total += sent;
        let remaining = guest.remaining();
        history.push(RoundTelemetry {
            round: history.len() as u32 + 1,
            pages_sent: sent.round() as u64,
            bytes_sent: (sent * ps).round() as u64,
            pages_changed: changed.round() as u64,
            dirty_rate_bytes_per_s: if duration > 0.0 {
                changed * ps / duration
            } else {
                0.0
            },
            bandwidth_bytes_per_s: bw,
            remaining_pages: remaining.round() as u64,
            held_back_pages: guest.remaining_in(&hold_back).round() as u64,
            predicted_downtime_s: remaining * ps / bw + params.stop_overhead_s,
            duration_s: duration,
            elapsed_s: elapsed,
            throttle_percent: throttle,
        });
    }
}
