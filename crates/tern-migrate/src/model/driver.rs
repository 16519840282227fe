//! The round loop shared by the analytic and the page-level model: ask the policy, send,
//! let the guest dirty for as long as sending took, record telemetry, repeat; then the
//! stop-and-copy. Only the guest's memory differs between the two models. With
//! `probe_bytes` set, both models run round 1 in two stretches with the policy's
//! first-round throttle between them (the analytic one cuts its classes of memory at
//! the probe's page for that). What the engine measures and tells the policy is
//! measured and told here by the engine's own rules ([`crate::precopy`]): the predicted
//! downtime with the stop cost the engine assumes, the probe's window up to the end of
//! its scan, the throttle only once that scan is done, and round 1's rate over the time
//! after it.

use super::{DirtyModel, MigrationParams};
use crate::fragment::{FragmentId, FragmentTracker};
use crate::policy::{decide, Decision, Policy, PolicyInput};
use crate::precopy::{self as rules, predicted_downtime_s, probe_split_pages, CatchUp};
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
    // What the policy is told the stop costs besides the transfer.
    let told_stop_s = params.policy_stop_cost_s.unwrap_or(params.stop_overhead_s);
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
                // From the last round to the pause.
                let mut wait_s = 0.0;
                if throttle > 0 && params.throttle_period_s > 0.0 {
                    // The engine's own rule, from what its rounds told it.
                    let share = rules::share_pages(&history, throttle, params.page_size);
                    let told = history.last().map_or(0.0, |t| t.remaining_pages as f64);
                    let plan = rules::catch_up(throttle, told, share, params.page_size, bw, scan_s);
                    if let Some(plan) = plan.filter(|_| reason.converged()) {
                        max_throttle = max_throttle.max(plan.throttle_percent);
                        let (sent, spent_s) = catch_up(guest, params, elapsed, plan);
                        pages_total += sent;
                        wait_s += spent_s;
                    }
                    wait_s += THROTTLED_PAUSE_S;
                }
                let last_pages = guest.remaining();
                let downtime = last_pages * ps / bw + stop_cost_s;
                pages_total += last_pages;
                return MigrationOutcome {
                    policy: policy.name().to_owned(),
                    total_time_s: elapsed + wait_s + downtime,
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
        // A burst of a throttled guest's writes after the round's scan passed its pages.
        let mut behind_scan: Option<f64> = None;
        let split = if history.is_empty() {
            let data = guest.remaining().round() as u64;
            probe_split_pages(data, params.probe_bytes, params.page_size)
                .and_then(|p| guest.send_prefix(p))
        } else {
            None
        };
        let (sent, duration, changed, rate) = match split {
            // Round 1 as the engine runs it: a first stretch; then the rest is sent while
            // a scan beside it measures the guest's rate so far; once that scan is done,
            // the throttle the policy asks for holds for the rest of the round.
            Some((first, next)) => {
                let first_s = first * ps / bw;
                let bytes_left = (guest.remaining_from(next) * ps).round() as u64;
                // The baseline scan runs beside the first stretch, and the probe rates
                // the guest from its end while counting changes from each page's
                // reading, on average its middle: the rate it sees is that much high.
                let baseline_s = params.baseline_scan_s.min(first_s);
                guest.run_part(baseline_s / 2.0, factor(throttle));
                let mut probed = guest.run_part(first_s - baseline_s / 2.0, factor(throttle));
                let rest = guest.send_from(next);
                let rest_send_s = rest * ps / bw;
                // The probe's scan runs on the guest's time, unthrottled.
                probed += guest.run_part(scan_s, factor(throttle));
                // A probe measured on the engine stands for the model's own.
                let probe = params
                    .measured_probe
                    .clone()
                    .unwrap_or_else(|| FirstRoundProbe {
                        pages_changed: probed.round() as u64,
                        window_s: first_s - baseline_s + scan_s,
                        bandwidth_bytes_per_s: bw,
                        bytes_left,
                        stop_cost_s: scan_s + told_stop_s,
                        writer_seen: None,
                    });
                let wanted = policy.first_round_throttle(&probe, &limits);
                if wanted > 0 {
                    throttle = wanted.min(99);
                    max_throttle = max_throttle.max(throttle);
                }
                // The round ends when both the sending and the probe are done, then the
                // scan that ends every round; the round's rate is over the time since
                // the probe's scan, the rate the policy must size against.
                let after_s = (rest_send_s - scan_s).max(0.0) + scan_s;
                let later = guest.run_part(after_s, factor(throttle));
                let changed = guest.end_round();
                let rate = if after_s > 0.0 {
                    later * ps / after_s
                } else {
                    0.0
                };
                (first + rest, first_s + scan_s + after_s, changed, rate)
            }
            None => {
                let sent = guest.send(&hold_back);
                let duration = sent * ps / bw + scan_s;
                let changed = if throttle > 0 && params.throttle_period_s > 0.0 {
                    let (changed, behind) =
                        run_in_bursts(guest, params, elapsed, duration, factor(throttle), scan_s);
                    behind_scan = behind;
                    changed
                } else {
                    guest.run(duration, factor(throttle))
                };
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
            predicted_downtime_s: predicted_downtime_s(remaining * ps, bw, scan_s, told_stop_s),
            duration_s: duration,
            elapsed_s: elapsed,
            throttle_percent: throttle,
        });
        // Writes the round's scan missed are no part of what it told the policy; they
        // are there for the next round, or for the pause.
        if let Some(factor) = behind_scan {
            guest.run_part(BURST_S, factor);
        }
    }
}

/// How long a throttled guest's burst of writes lasts in the model: its writes land
/// within it.
const BURST_S: f64 = 0.001;

/// A round of `seconds` from `at_s` into the migration by a guest under a throttle with
/// periods: it writes nothing but a period's worth at `rate_factor` in one burst at the
/// start of its share of each period (at [`MigrationParams::throttle_phase`] of the
/// period), so a round shorter than the period catches one burst or none. Round 1 runs
/// smooth: it spans many periods. A round that ends with a scan of `scan_s` (the
/// engine's, after each round) has it read the writer's pages [`writer_scan_share`] of
/// the way through: a burst after that is behind it, seen by neither the round's count
/// nor the policy, and returned (as the rate factor to write it at) for the caller to
/// write once the round is told.
fn run_in_bursts(
    guest: &mut dyn ModelGuest,
    params: &MigrationParams,
    at_s: f64,
    seconds: f64,
    rate_factor: f64,
    scan_s: f64,
) -> (f64, Option<f64>) {
    let period = params.throttle_period_s;
    let end = at_s + seconds;
    let passed_writer = end - scan_s * (1.0 - writer_scan_share(params));
    let factor = rate_factor * period / BURST_S;
    let mut now = at_s;
    let mut behind = None;
    let mut burst =
        ((at_s / period - params.throttle_phase).ceil() + params.throttle_phase) * period;
    while burst + BURST_S <= end {
        if burst >= passed_writer {
            behind = Some(factor);
            break;
        }
        guest.run_part(burst - now, 0.0);
        guest.run_part(BURST_S, factor);
        now = burst + BURST_S;
        burst += period;
    }
    guest.run_part(end - now, 0.0);
    (guest.end_round(), behind)
}

/// How long the engine's stop of a throttled guest takes: it lifts the quota 2 ms after
/// asking, when the stop waits for a vCPU held off the CPU, which then stops within
/// about 1.5 ms.
const THROTTLED_PAUSE_S: f64 = 0.0035;

/// The engine's stop under a throttle with periods, from `at_s` into the migration
/// ([`rules::CatchUp`]), at the plan's throttle: a live pass first when the plan says
/// so, then a wait until the guest is held off the CPU with the room the plan needs
/// before its next share, and a pass while it is (the model's guest is held as the plan
/// has it: one pass). The guest writes in its bursts meanwhile. Returns the pages sent
/// and the time from `at_s` to the pause.
fn catch_up(
    guest: &mut dyn ModelGuest,
    params: &MigrationParams,
    at_s: f64,
    plan: CatchUp,
) -> (f64, f64) {
    let throttle = plan.throttle_percent;
    let period = params.throttle_period_s;
    let phase = params.throttle_phase;
    let factor = params.throttle_factor(throttle);
    let pass_s = |pages: f64| {
        params.scan_s() + pages * params.page_size as f64 / params.effective_bandwidth()
    };
    let mut now = at_s;
    let mut sent = 0.0;
    if plan.live_first {
        let pages = guest.send(&[]);
        let took = pass_s(pages);
        run_in_bursts(guest, params, now, took, factor, 0.0);
        now += took;
        sent += pages;
    }
    let room = plan.room_s;
    let held_after = rules::held_after_s(throttle);
    let last_burst = ((now / period - phase).floor() + phase) * period;
    let mut from = now.max(last_burst + held_after);
    if last_burst + period - from < room {
        from = last_burst + period + held_after;
    }
    if from > now {
        run_in_bursts(guest, params, now, from - now, factor, 0.0);
    }
    let pages = guest.send(&[]);
    sent += pages;
    (sent, from + pass_s(pages) - at_s)
}

/// Where in a pass over memory the engine's scan reads the writer's pages, as a share
/// of the pass: the middle of the working set among the pages with data (the pass skips
/// holes), after `data_before_working_sets_bytes`. A guest without a working set: the
/// middle of its data.
fn writer_scan_share(params: &MigrationParams) -> f64 {
    let data = (params.nonzero_pages() * params.page_size) as f64;
    let set = match params.dirty {
        DirtyModel::Uniform {
            working_set_bytes, ..
        }
        | DirtyModel::Sequential {
            working_set_bytes, ..
        } => working_set_bytes as f64,
        _ => data,
    };
    if data <= 0.0 {
        return 0.5;
    }
    ((params.data_before_working_sets_bytes as f64 + set / 2.0) / data).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that only notes when it was let write.
    struct Writes {
        now: f64,
        bursts: Vec<f64>,
        tracker: FragmentTracker,
    }

    impl ModelGuest for Writes {
        fn remaining(&self) -> f64 {
            0.0
        }
        fn remaining_in(&self, _: &[FragmentId]) -> f64 {
            0.0
        }
        fn send(&mut self, _: &[FragmentId]) -> f64 {
            0.0
        }
        fn run_part(&mut self, seconds: f64, rate_factor: f64) -> f64 {
            if rate_factor > 0.0 {
                self.bursts.push(self.now);
            }
            self.now += seconds;
            0.0
        }
        fn end_round(&mut self) -> f64 {
            self.bursts.len() as f64
        }
        fn tracker(&self) -> &FragmentTracker {
            &self.tracker
        }
    }

    #[test]
    fn a_burst_after_the_scan_passed_the_writer_is_left_for_the_next_round() {
        let mut p = MigrationParams::engine(512 << 20, 220 << 20, 125e6);
        p.dirty = DirtyModel::Sequential {
            rate_bytes_per_s: 94e6,
            working_set_bytes: 128 << 20,
        };
        p.data_before_working_sets_bytes = 32 << 20;
        // The scan reaches the middle of the set ((32 + 64) / 220 of its pass).
        let share = writer_scan_share(&p);
        assert!((share - 96.0 / 220.0).abs() < 1e-9, "{share}");
        let scan_s = p.scan_s();
        let run = |phase: f64| {
            let mut p = p.clone();
            p.throttle_phase = phase;
            let mut g = Writes {
                now: 0.0,
                bursts: vec![],
                tracker: FragmentTracker::new(8, 4),
            };
            // A 50 ms round: sending, then the scan over its last `scan_s`.
            let (seen, behind) = run_in_bursts(&mut g, &p, 0.0, 0.05, 0.3, scan_s);
            (seen, behind.is_some())
        };
        // A burst while the round sends, or early in its scan: counted.
        assert_eq!(run(0.2), (1.0, false));
        assert_eq!(run((0.05 - scan_s * 0.9) / 0.1), (1.0, false));
        // Late in the scan, after it read the writer's pages: left behind it.
        assert_eq!(run((0.05 - scan_s * 0.3) / 0.1), (0.0, true));
        // Without a scan at the end every burst counts.
        let mut g = Writes {
            now: 0.0,
            bursts: vec![],
            tracker: FragmentTracker::new(8, 4),
        };
        let mut late = p.clone();
        late.throttle_phase = 0.48;
        assert_eq!(
            run_in_bursts(&mut g, &late, 0.0, 0.05, 0.3, 0.0),
            (1.0, None)
        );
    }
}
