//! tern's adaptive policy. Fragments re-dirtied in each of the last rounds, and densely
//! in at least one of them, are hot: re-sending them only to see them dirtied again
//! wastes the link, so they wait for the stop-and-copy. A remainder that fits the budget
//! is still sent live while rounds shrink it and its transfer would take more than a
//! few tens of milliseconds; iteration stops once it is that small, or once a round no
//! longer shrinks it (under a throttle, once three rounds in a row have not: a
//! throttled guest writes in bursts). If it then still does not fit, the guest's vCPUs
//! are throttled (hot fragments released, since a slowed guest can no longer re-dirty
//! them at once) until it does, or until the throttle is at its maximum.
//!
//! ```text
//!  fits budget, small or not shrinking ─────────────────► StopAndCopy
//!  fits budget, still shrinking (or throttled, patient) ► Continue { hold_back: hot }
//!  still shrinking, guest slower than the link ─────────► Continue { hold_back: hot }
//!  not shrinking or guest outruns the link, can grow ───► Throttle { percent }
//!  not shrinking, throttle at maximum ──────────────────► StopAndCopy (not converged)
//! ```

use super::throttle::throttle_for;
use super::{Decision, Limits, Policy, PolicyInput, StopReason};
use crate::fragment::FragmentId;
use crate::telemetry::FirstRoundProbe;

/// Settings of the adaptive policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adaptive {
    /// Consecutive rounds a fragment must have been re-dirtied to be held back.
    pub hot_streak: u32,
    /// Share of its pages a fragment must have re-dirtied in one round of its streak to
    /// be held back: a fragment with a few stray writes shrinks when re-sent, a hot one
    /// is dirtied again at once. The peak, not the last round, because a short round
    /// (only cold pages sent) makes even a hot fragment look sparse.
    pub hot_density: f64,
    /// A round "shrinks" the remainder only if it cuts it by at least this share.
    pub min_shrink: f64,
    /// Upper bound of the throttle, in percent of vCPU time taken away.
    pub max_throttle_percent: u8,
    /// Smallest increase when the throttle has to grow again.
    pub throttle_step: u8,
    /// Headroom for the throttle computation, see [`super::throttle_for`].
    pub throttle_margin: f64,
    /// Throttle from the first round on when the guest dirties memory at this share of
    /// the link's rate or more: at a share s each round leaves s of the previous one, so
    /// above one half the rounds would take longer than the first copy. Measured part way
    /// into round 1 when the engine probes ([`Policy::first_round_throttle`]), else at
    /// its end.
    pub throttle_early_share: f64,
    /// A remainder that fits the budget is still sent live, a round more, while its
    /// transfer would take longer than this (seconds) and rounds still shrink it: the
    /// pause then ends near the guest's steady remainder instead of anywhere below the
    /// budget.
    pub settle_transfer_s: f64,
    /// Under a throttle, settling rounds in a row that may fail to shrink the remainder
    /// before the policy stops anyway: a throttled guest gets its CPU share once per
    /// quota period and writes in one burst then, so a round shorter than the period
    /// that caught a burst says little about the next, which may catch none.
    pub settle_patience: u32,
}

impl Default for Adaptive {
    fn default() -> Self {
        Adaptive {
            hot_streak: 2,
            hot_density: 0.5,
            min_shrink: 0.1,
            max_throttle_percent: 95,
            throttle_step: 10,
            throttle_margin: 0.8,
            throttle_early_share: 0.5,
            settle_transfer_s: 0.02,
            settle_patience: 2,
        }
    }
}

impl Adaptive {
    /// Fragments that count as hot in `input`'s tracker.
    pub fn hot_fragments(&self, input: &PolicyInput<'_>) -> Vec<FragmentId> {
        input
            .fragments
            .stats()
            .filter(|f| f.streak >= self.hot_streak && f.peak_density() >= self.hot_density)
            .map(|f| f.id)
            .collect()
    }
}

impl Policy for Adaptive {
    fn name(&self) -> &'static str {
        "adaptive"
    }

    fn decide(&self, input: &PolicyInput<'_>) -> Decision {
        let Some(last) = input.last() else {
            return Decision::Continue { hold_back: vec![] };
        };
        if last.remaining_pages == 0 {
            return Decision::StopAndCopy {
                reason: StopReason::NothingDirty,
            };
        }
        let limit = input.limits.downtime_limit_s;
        let fits = last.predicted_downtime_s <= limit;
        // The last round cut the remainder (round 1 always counts as doing so).
        let unshrunk = self.unshrunk_rounds(input);
        let shrinking = unshrunk == 0;
        let current = input.current_throttle();
        let ps = input.limits.page_size as f64;
        let transfer_s = if last.bandwidth_bytes_per_s > 0.0 {
            last.remaining_pages as f64 * ps / last.bandwidth_bytes_per_s
        } else {
            last.predicted_downtime_s
        };
        // Under a throttle the hot set is re-sent: that is what the throttle buys.
        let hold_back = || {
            if current > 0 {
                vec![]
            } else {
                self.hot_fragments(input)
            }
        };
        if fits {
            // One more round while rounds still shrink the remainder costs the guest
            // little and takes its pause from up to the whole budget down to a few tens
            // of milliseconds; stopping as soon as the remainder fits made the pause
            // jump between the budget (one round) and a fraction of it (two), by where
            // round 1 met the guest's writes.
            let patient = current > 0 && unshrunk <= self.settle_patience;
            if (shrinking || patient) && transfer_s > self.settle_transfer_s {
                return Decision::Continue {
                    hold_back: hold_back(),
                };
            }
            let reason = if shrinking {
                StopReason::FitsDowntime
            } else {
                StopReason::NoLongerShrinking
            };
            return Decision::StopAndCopy { reason };
        }
        // A guest that dirties a large share of what the link carries is caught, if at
        // all, only after many rounds each cutting the remainder by little: throttling
        // after the first round saves those rounds. Only the first round decides: it
        // copies all memory, so its distinct-page rate is the guest's; a later, short
        // round (hot set held back) would show the held pages as a huge rate.
        let fast_guest = input.history.len() == 1
            && last.dirty_rate_bytes_per_s
                >= self.throttle_early_share * last.bandwidth_bytes_per_s;
        if shrinking && current == 0 && !fast_guest {
            return Decision::Continue {
                hold_back: hold_back(),
            };
        }
        if current >= self.max_throttle_percent {
            if shrinking {
                return Decision::Continue {
                    hold_back: hold_back(),
                };
            }
            return Decision::StopAndCopy {
                reason: StopReason::ThrottleExhausted,
            };
        }
        // Only the transfer part of the predicted downtime shrinks with a throttle; the
        // rest (final scan, device state) is spent whatever the guest does.
        let fixed_s = (last.predicted_downtime_s - transfer_s).max(0.0);
        if fixed_s >= limit {
            return Decision::StopAndCopy {
                reason: StopReason::BudgetUnreachable,
            };
        }
        let wanted = throttle_for(
            transfer_s,
            limit - fixed_s,
            last.bandwidth_bytes_per_s,
            self.dirty_rate(input),
            current,
            self.throttle_margin,
        );
        if shrinking && wanted <= current {
            // The throttle in place is working; let it.
            return Decision::Continue {
                hold_back: hold_back(),
            };
        }
        // Stuck, or shrinking too slowly for the throttle in place: tighten it.
        let percent = wanted
            .max(current.saturating_add(self.throttle_step))
            .min(self.max_throttle_percent);
        Decision::Throttle {
            percent,
            hold_back: vec![],
        }
    }

    fn first_round_throttle(&self, probe: &FirstRoundProbe, limits: &Limits) -> u8 {
        self.early_throttle(probe, limits)
    }
}

impl Adaptive {
    /// Throttle for the rest of round 1. Everything the guest rewrites behind the copy
    /// while round 1 finishes is sent again in round 2; for a guest that dirties at least
    /// [`Adaptive::throttle_early_share`] of the link's rate, that is most of its working
    /// set, so it is throttled now, hard enough that what it dirties in the rest of round
    /// 1 would fit the budget, instead of after round 1 has let it re-dirty everything.
    fn early_throttle(&self, probe: &FirstRoundProbe, limits: &Limits) -> u8 {
        let bw = probe.bandwidth_bytes_per_s;
        let rate = probe.dirty_rate_bytes_per_s(limits.page_size);
        if bw <= 0.0 || rate < self.throttle_early_share * bw {
            return 0;
        }
        let rest_s = probe.bytes_left as f64 / bw;
        let memory = (limits.memory_pages * limits.page_size) as f64;
        let redirtied_s = (rate * rest_s).min(memory) / bw;
        // When stopping alone costs the budget, no throttle makes the stop fit, but a
        // slower guest still leaves round 2 less to send: the smallest budget then.
        let budget = (limits.downtime_limit_s - probe.stop_cost_s).max(0.01);
        throttle_for(redirtied_s, budget, bw, rate, 0, self.throttle_margin)
            .min(self.max_throttle_percent)
    }

    /// Rounds at the end of the history, in a row, that did not cut the remainder of the
    /// round before by [`Adaptive::min_shrink`].
    fn unshrunk_rounds(&self, input: &PolicyInput<'_>) -> u32 {
        input
            .history
            .windows(2)
            .rev()
            .take_while(|w| {
                w[1].remaining_pages as f64 >= w[0].remaining_pages as f64 * (1.0 - self.min_shrink)
            })
            .count() as u32
    }

    /// The guest's dirty rate in the last round, in bytes per second: the larger of the
    /// distinct-page rate and the write rate inferred from the fragments, because the
    /// distinct rate of a saturated hot set says little about how fast it is written.
    fn dirty_rate(&self, input: &PolicyInput<'_>) -> f64 {
        let Some(last) = input.last() else {
            return 0.0;
        };
        let inferred = if last.duration_s > 0.0 {
            input.fragments.estimated_writes() * input.limits.page_size as f64 / last.duration_s
        } else {
            0.0
        };
        last.dirty_rate_bytes_per_s.max(inferred)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::round;
    use super::super::PolicyKind;
    use super::*;
    use crate::fragment::FragmentTracker;
    use crate::RoundTelemetry;

    /// A round whose predicted downtime is all transfer: `remaining` pages over the
    /// test rounds' 125 MB/s.
    fn on_link(n: u32, remaining: u64) -> RoundTelemetry {
        round(n, remaining, remaining as f64 * 4096.0 / 1.25e8)
    }

    fn decide(history: &[RoundTelemetry], tracker: &FragmentTracker) -> Decision {
        let limits = Limits::new(tracker.total_pages(), 4096);
        Adaptive::default().decide(&PolicyInput {
            history,
            fragments: tracker,
            limits: &limits,
        })
    }

    #[test]
    fn holds_back_fragments_densely_dirtied_every_round() {
        let mut t = FragmentTracker::new(4 * 512, 512);
        // Fragment 0 fully rewritten, then a few pages (a short round); fragment 1 only
        // in the last round; fragment 2 a stray page twice; fragment 3 never.
        t.observe_counts(&[512, 0, 1, 0]);
        t.observe_counts(&[20, 512, 1, 0]);
        let h = [round(1, 4000, 5.0), round(2, 1200, 1.0)];
        assert_eq!(decide(&h, &t), Decision::Continue { hold_back: vec![0] });
    }

    #[test]
    fn throttles_after_the_first_round_only_when_the_guest_is_fast_for_the_link() {
        let t = FragmentTracker::new(32768, 512);
        // 100 MB/s of distinct pages on a 125 MB/s link: the rounds would barely shrink.
        let fast = [on_link(1, 30000)];
        assert!(matches!(decide(&fast, &t), Decision::Throttle { percent, .. } if percent > 0));
        // 30 MB/s: rounds shrink the remainder fast enough without slowing the guest.
        let mut slow = on_link(1, 30000);
        slow.dirty_rate_bytes_per_s = 3e7;
        assert!(matches!(decide(&[slow], &t), Decision::Continue { .. }));
        // After a short second round the rate says nothing about the guest.
        let later = [on_link(1, 30000), on_link(2, 20000)];
        assert!(matches!(decide(&later, &t), Decision::Continue { .. }));
    }

    fn probe(pages_changed: u64, bytes_left: u64) -> FirstRoundProbe {
        FirstRoundProbe {
            pages_changed,
            window_s: 0.2,
            bandwidth_bytes_per_s: 1.25e8,
            bytes_left,
            stop_cost_s: 0.05,
            writer_seen: None,
        }
    }

    #[test]
    fn throttles_during_the_first_round_a_guest_that_outruns_the_link() {
        let limits = Limits::new(131_072, 4096);
        let a = Adaptive::default();
        // 188 MB/s (150 % of the link) with 150 MB of round 1 to go: it would re-dirty
        // its whole working set behind the copy: 0.8 * 0.25 s * 125 / 1.8 s / 188 MB/s
        // leaves it 7 % of its vCPU time.
        let fast = probe(9180, 150_000_000);
        assert_eq!(a.first_round_throttle(&fast, &limits), 93);
        // 94 MB/s (75 %): throttled, but less.
        let p = a.first_round_throttle(&probe(4590, 150_000_000), &limits);
        assert!((50..95).contains(&p), "{p}");
        // 31 MB/s (25 %): later rounds catch it up; no throttle.
        assert_eq!(
            a.first_round_throttle(&probe(1514, 150_000_000), &limits),
            0
        );
        // Fast, but round 1 is almost through: what it re-dirties meanwhile fits.
        assert_eq!(a.first_round_throttle(&probe(9180, 4_000_000), &limits), 0);
        // Other policies never throttle during round 1.
        for k in [PolicyKind::Qemu, PolicyKind::Xen, PolicyKind::StopCopy] {
            assert_eq!(k.first_round_throttle(&fast, &limits), 0);
        }
        assert_eq!(
            PolicyKind::Adaptive.first_round_throttle(&fast, &limits),
            93
        );
    }

    #[test]
    fn stops_when_the_remainder_fits_or_stops_shrinking() {
        let t = FragmentTracker::new(2048, 512);
        assert_eq!(
            decide(&[round(1, 2000, 2.0), round(2, 100, 0.1)], &t),
            Decision::StopAndCopy {
                reason: StopReason::FitsDowntime
            }
        );
        assert_eq!(
            decide(&[round(1, 100, 0.29), round(2, 99, 0.28)], &t),
            Decision::StopAndCopy {
                reason: StopReason::NoLongerShrinking
            }
        );
    }

    #[test]
    fn keeps_sending_a_remainder_that_fits_while_rounds_shrink_it() {
        let t = FragmentTracker::new(32768, 512);
        // 3000 pages fit the budget (98 ms on the link) but another round shrinks them.
        let h = [on_link(1, 20_000), on_link(2, 3000)];
        assert_eq!(decide(&h, &t), Decision::Continue { hold_back: vec![] });
        // 500 pages (16 ms): small enough to stop.
        let h = [on_link(1, 20_000), on_link(2, 3000), on_link(3, 500)];
        assert_eq!(
            decide(&h, &t),
            Decision::StopAndCopy {
                reason: StopReason::FitsDowntime
            }
        );
        // 2900 after 3000: no longer shrinking, so the pause is what it is.
        let h = [on_link(1, 20_000), on_link(2, 3000), on_link(3, 2900)];
        assert_eq!(
            decide(&h, &t),
            Decision::StopAndCopy {
                reason: StopReason::NoLongerShrinking
            }
        );
    }

    #[test]
    fn under_a_throttle_settling_outlasts_rounds_that_caught_a_burst() {
        let t = FragmentTracker::new(32768, 512);
        let throttled = |rounds: &[u64]| -> Vec<RoundTelemetry> {
            rounds
                .iter()
                .enumerate()
                .map(|(i, &r)| {
                    let mut t = on_link(i as u32 + 1, r);
                    t.throttle_percent = 95;
                    t
                })
                .collect()
        };
        // 1000 pages after 900 (33 ms): a burst, maybe; the next round may catch none.
        let h = throttled(&[20_000, 3000, 900, 1000]);
        assert_eq!(decide(&h, &t), Decision::Continue { hold_back: vec![] });
        let h = throttled(&[20_000, 3000, 900, 1000, 950]);
        assert_eq!(decide(&h, &t), Decision::Continue { hold_back: vec![] });
        // A third such round in a row: the pause is what it is.
        let h = throttled(&[20_000, 3000, 900, 1000, 950, 990]);
        assert_eq!(
            decide(&h, &t),
            Decision::StopAndCopy {
                reason: StopReason::NoLongerShrinking
            }
        );
        // A round that caught none leaves little: stop.
        let h = throttled(&[20_000, 3000, 900, 1000, 100]);
        assert_eq!(
            decide(&h, &t),
            Decision::StopAndCopy {
                reason: StopReason::FitsDowntime
            }
        );
    }

    #[test]
    fn gives_up_at_once_when_the_fixed_stop_cost_exceeds_the_budget() {
        let t = FragmentTracker::new(2048, 512);
        // 10 pages left (0.3 ms on the link) but 0.4 s predicted: the scan dominates.
        let h = [round(1, 11, 0.4), round(2, 10, 0.4)];
        assert_eq!(
            decide(&h, &t),
            Decision::StopAndCopy {
                reason: StopReason::BudgetUnreachable
            }
        );
        assert!(!StopReason::BudgetUnreachable.converged());
    }

    #[test]
    fn throttle_is_sized_on_the_transfer_part_of_the_downtime() {
        let t = FragmentTracker::new(100_000, 512);
        // 18311 pages = 0.6 s on the link, plus 0.1 s fixed: the transfer has to fit
        // 0.2 s, not 0.3 s, which asks for a harder throttle than without the fixed part.
        let mut h = [round(1, 20_000, 0.8), round(2, 18_311, 0.7)];
        let with_fixed = decide(&h, &t);
        h[1].predicted_downtime_s = 0.6;
        let without = decide(&h, &t);
        match (with_fixed, without) {
            (Decision::Throttle { percent: a, .. }, Decision::Throttle { percent: b, .. }) => {
                assert!(a > b, "{a} vs {b}")
            }
            other => panic!("expected two throttles, got {other:?}"),
        }
    }

    #[test]
    fn under_a_throttle_tightens_only_if_it_is_not_enough() {
        let t = FragmentTracker::new(2048, 512);
        let mut h = [on_link(1, 20_000), on_link(2, 9460)];
        h[1].throttle_percent = 50;
        // 100 MB/s at 50 % means 200 MB/s unthrottled; 0.31 s left needs < 97 MB/s:
        // 52 % wanted, but a tightening is at least 10 points.
        assert_eq!(
            decide(&h, &t),
            Decision::Throttle {
                percent: 60,
                hold_back: vec![]
            }
        );
        // A guest already slow enough keeps its throttle and its hot set is re-sent.
        h[1].dirty_rate_bytes_per_s = 2e7;
        assert_eq!(decide(&h, &t), Decision::Continue { hold_back: vec![] });
    }

    #[test]
    fn throttles_when_stuck_above_the_budget_then_escalates_then_gives_up() {
        let t = FragmentTracker::new(2048, 512);
        let h = [on_link(1, 18_500), on_link(2, 18_310)];
        // round(): 100 MB/s dirtying, 125 MB/s link, P = 0.6 s, L = 0.3 s, margin 0.8:
        // quota = 0.8 * 0.3 * 125 / 0.6 / 100 = 0.5 -> 50 %.
        assert_eq!(
            decide(&h, &t),
            Decision::Throttle {
                percent: 50,
                hold_back: vec![]
            }
        );
        let mut throttled = h.clone();
        throttled[1].throttle_percent = 90;
        assert_eq!(
            decide(&throttled, &t),
            Decision::Throttle {
                percent: 95,
                hold_back: vec![]
            }
        );
        throttled[1].throttle_percent = 95;
        assert_eq!(
            decide(&throttled, &t),
            Decision::StopAndCopy {
                reason: StopReason::ThrottleExhausted
            }
        );
    }
}
