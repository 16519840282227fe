//! The round loop shared by the analytic and the page-level model: ask the policy, send,
//! let the guest dirty for as long as sending took, record telemetry, repeat; then the
//! stop-and-copy. Only the guest's memory differs between the two models. With
//! `probe_bytes` set, both models run round 1 in two stretches with the policy's
//! first-round throttle between them (the analytic one cuts its classes of memory at
//! the probe's page for that).

use super::MigrationParams;
use crate::fragment::{FragmentId, FragmentTracker};
use crate::policy::{decide, Decision, Policy, PolicyInput};
use crate::telemetry::{FirstRoundProbe, MigrationOutcome, RoundTelemetry};

/// Guest memory as a model sees it, in pages (fractional for the analytic model).
pub(super) trait ModelGuest {
    /// Pages that differ from the destination.
    fn remaining(&self) -> f64;
    /// Of those, pages in the given fragments.
    fn remaining_in(&self, fragments: &[FragmentId]) -> f64;
    /// Marks every differing page outside `hold_back` as sent; returns how many.
    fn send(&mut self, hold_back: &[FragmentId]) -> f64;
    /// Lets the guest run for `seconds` with its rates scaled by `rate_factor`, within
    /// the current round; returns the pages first changed in this round meanwhile.
    fn run_part(&mut self, seconds: f64, rate_factor: f64) -> f64;
    /// Ends the round: feeds the tracker; returns the distinct pages changed in it.
    fn end_round(&mut self) -> f64;
    /// A whole round's running: [`ModelGuest::run_part`], then [`ModelGuest::end_round`].
    fn run(&mut self, seconds: f64, rate_factor: f64) -> f64 {
        self.run_part(seconds, rate_factor);
        self.end_round()
    }
    /// Sends the first `pages` differing pages in memory order; returns how many and
    /// the page after the last one, or `None` when the model cannot split a round.
    fn send_prefix(&mut self, _pages: u64) -> Option<(f64, u64)> {
        None
    }
    /// Differing pages from page `first` on.
    fn remaining_from(&self, _first: u64) -> f64 {
        0.0
    }
    /// Sends the differing pages from page `first` on; returns how many.
    fn send_from(&mut self, _first: u64) -> f64 {
        0.0
    }
    fn tracker(&self) -> &FragmentTracker;
}

pub(super) fn drive(
    params: &MigrationParams,
    policy: &dyn Policy,
    guest: &mut dyn ModelGuest,
) -> MigrationOutcome {
    let limits = params.limits();
    let ps = params.page_size as f64;
    let bw = params.effective_bandwidth();
    // The engine's pass over memory after every round and in the stop-and-copy.
    let scan_s = params.scan_s();
    let stop_cost_s = scan_s + params.stop_overhead_s;
    let mut history: Vec<RoundTelemetry> = Vec::new();
    let mut throttle = 0u8;
    let mut max_throttle = 0u8;
    let mut elapsed = params.setup_s;
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
                let downtime = last_pages * ps / bw + stop_cost_s;
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
        let factor = |t: u8| params.throttle_factor(t);
        let probe_pages = params.probe_bytes / params.page_size.max(1);
        // As in the engine, a round 1 too small to leave as much again after the probe
        // runs whole.
        let split = if history.is_empty()
            && probe_pages > 0
            && guest.remaining() >= 2.0 * probe_pages as f64
        {
            guest.send_prefix(probe_pages)
        } else {
            None
        };
        let (sent, duration, changed, rate) = match split {
            // Round 1 as the engine runs it: a first stretch, a probe of the guest's
            // rate, a throttle if the policy asks, then the rest under it.
            Some((first, next)) => {
                let first_s = first * ps / bw;
                let probed = guest.run_part(first_s, factor(throttle));
                let probe = FirstRoundProbe {
                    pages_changed: probed.round() as u64,
                    window_s: first_s,
                    bandwidth_bytes_per_s: bw,
                    bytes_left: (guest.remaining_from(next) * ps).round() as u64,
                    stop_cost_s,
                };
                let wanted = policy.first_round_throttle(&probe, &limits);
                if wanted > 0 {
                    throttle = wanted.min(99);
                    max_throttle = max_throttle.max(throttle);
                }
                let rest = guest.send_from(next);
                // The scan that ends the round runs on the guest's time too.
                let rest_s = rest * ps / bw + scan_s;
                let later = guest.run_part(rest_s, factor(throttle));
                let changed = guest.end_round();
                let rate = if rest_s > 0.0 {
                    later * ps / rest_s
                } else {
                    0.0
                };
                (first + rest, first_s + rest_s, changed, rate)
            }
            None => {
                let sent = guest.send(&hold_back);
                let duration = sent * ps / bw + scan_s;
                let changed = guest.run(duration, factor(throttle));
                let rate = if duration > 0.0 {
                    changed * ps / duration
                } else {
                    0.0
                };
                (sent, duration, changed, rate)
            }
        };
        elapsed += duration;
        pages_total += sent;
        let remaining = guest.remaining();
        history.push(RoundTelemetry {
            round: history.len() as u32 + 1,
            pages_sent: sent.round() as u64,
            bytes_sent: (sent * ps).round() as u64,
            pages_changed: changed.round() as u64,
            dirty_rate_bytes_per_s: rate,
            bandwidth_bytes_per_s: bw,
            remaining_pages: remaining.round() as u64,
            held_back_pages: guest.remaining_in(&hold_back).round() as u64,
            predicted_downtime_s: remaining * ps / bw + stop_cost_s,
            duration_s: duration,
            elapsed_s: elapsed,
            throttle_percent: throttle,
        });
    }
}
