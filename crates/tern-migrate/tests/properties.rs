//! Properties of the model and the policies over random guests, links and workloads.

use proptest::prelude::*;
use tern_migrate::{
    decide, simulate, throttle_for, Decision, DirtyModel, FragmentTracker, Limits, MigrationParams,
    PolicyInput, PolicyKind, RoundTelemetry, StopReason, MIB,
};

fn policy() -> impl Strategy<Value = PolicyKind> {
    prop::sample::select(PolicyKind::ALL.to_vec())
}

/// A guest of 16 MiB to 16 GiB with any of the dirtying patterns, sized to fit.
fn params() -> impl Strategy<Value = MigrationParams> {
    let memory = (16u64..16 * 1024).prop_map(|m| m * MIB);
    let bandwidth = 1e6f64..2e9;
    let overhead = prop_oneof![Just(0.0), 0.0f64..0.4];
    (
        memory,
        bandwidth,
        0u8..4,
        0.0f64..1.0,
        0.0f64..1.0,
        0.0f64..2e9,
        0.0f64..1e8,
        overhead,
    )
        .prop_map(|(memory, bw, kind, a, b, hot_rate, cold_rate, overhead)| {
            let ws = |share: f64| ((memory as f64 * share) as u64).min(memory);
            let dirty = match kind {
                0 => DirtyModel::None,
                1 => DirtyModel::Uniform {
                    rate_bytes_per_s: hot_rate,
                    working_set_bytes: ws(a),
                },
                2 => DirtyModel::Sequential {
                    rate_bytes_per_s: hot_rate,
                    working_set_bytes: ws(a),
                },
                _ => {
                    let hot = ws(a * 0.5);
                    DirtyModel::HotCold {
                        hot_bytes: hot,
                        hot_rate_bytes_per_s: hot_rate,
                        cold_bytes: ws(b * 0.5),
                        cold_rate_bytes_per_s: cold_rate,
                    }
                }
            };
            let mut p = MigrationParams::new(memory, bw).with_dirty(dirty);
            p.max_rounds = 60;
            p.stop_overhead_s = overhead;
            p
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn outcomes_are_consistent(p in params(), policy in policy()) {
        let o = simulate(&p, &policy).unwrap();
        // Round 1 sends all of memory (or the stop-and-copy does).
        prop_assert!(o.bytes_sent >= p.memory_bytes - p.memory_bytes % p.page_size);
        prop_assert!(o.downtime_s >= 0.0);
        prop_assert!(o.total_time_s >= o.downtime_s);
        prop_assert!(o.total_time_s >= p.memory_bytes as f64 / p.bandwidth_bytes_per_s * 0.999_999);
        prop_assert!(o.downtime_s >= p.stop_overhead_s);
        prop_assert!(o.rounds <= p.max_rounds);
        prop_assert_eq!(o.telemetry.len(), o.rounds as usize);
        prop_assert_eq!(o.converged, o.stop_reason.converged());
        let live: f64 = o.telemetry.iter().map(|r| r.duration_s).sum();
        prop_assert!((live + o.downtime_s - o.total_time_s).abs() <= 1e-6 * o.total_time_s);
        for (i, r) in o.telemetry.iter().enumerate() {
            prop_assert_eq!(r.round as usize, i + 1);
            prop_assert!(r.held_back_pages <= r.remaining_pages);
            prop_assert!(r.remaining_pages <= p.memory_pages());
        }
    }

    #[test]
    fn converged_downtime_respects_the_budget(p in params()) {
        // qemu and adaptive only converge once the remainder fits the budget, or once
        // nothing is left to send (then the fixed stop cost alone is the downtime).
        for policy in [PolicyKind::Qemu, PolicyKind::Adaptive] {
            let o = simulate(&p, &policy).unwrap();
            if o.converged {
                // Half a page of slack: "nothing left" is fewer than half a page expected.
                let page_s = 0.5 * p.page_size as f64 / p.bandwidth_bytes_per_s;
                let bound = p.downtime_limit_s.max(p.stop_overhead_s);
                prop_assert!(o.downtime_s <= bound + page_s + 1e-9, "{:?}", o);
            }
        }
    }

    #[test]
    fn more_bandwidth_never_slows_an_idle_guest(
        mib in 1u64..65536, bw in 1e5f64..1e10, more in 1.0f64..100.0, policy in policy()
    ) {
        let slow = simulate(&MigrationParams::new(mib * MIB, bw), &policy).unwrap();
        let fast = simulate(&MigrationParams::new(mib * MIB, bw * more), &policy).unwrap();
        prop_assert!(fast.total_time_s <= slow.total_time_s);
        prop_assert!(slow.rounds <= 1);
    }

    #[test]
    fn a_faster_dirtier_never_shortens_a_qemu_migration(
        mib in 64u64..4096, bw in 1e7f64..2e9, rate in 0.0f64..1e9, more in 1.0f64..10.0,
    ) {
        let run = |r: f64| {
            let p = MigrationParams::new(mib * MIB, bw).with_dirty(DirtyModel::Sequential {
                rate_bytes_per_s: r,
                working_set_bytes: mib * MIB,
            });
            simulate(&p, &PolicyKind::Qemu).unwrap()
        };
        let (slow, fast) = (run(rate), run(rate * more));
        prop_assert!(fast.total_time_s >= slow.total_time_s * (1.0 - 1e-12));
    }

    #[test]
    fn sequential_writers_at_link_speed_never_converge_under_qemu(
        mib in 16u64..8192, bw in 1e6f64..2e9, factor in 1.0f64..5.0,
    ) {
        let mut p = MigrationParams::new(mib * MIB, bw).with_dirty(DirtyModel::Sequential {
            rate_bytes_per_s: bw * factor,
            working_set_bytes: mib * MIB,
        });
        p.max_rounds = 20;
        let o = simulate(&p, &PolicyKind::Qemu).unwrap();
        // Unless all of memory fits the budget, only the cap ends it.
        if p.memory_bytes as f64 / bw > p.downtime_limit_s {
            prop_assert!(!o.converged);
            prop_assert_eq!(o.stop_reason, StopReason::SafetyRounds);
        }
    }

    #[test]
    fn throttle_grows_with_the_excess_and_stays_in_range(
        p in 0.0f64..20.0, more in 1.0f64..10.0, bw in 1e6f64..1e10, rate in 1.0f64..1e10,
        current in 0u8..100,
    ) {
        let a = throttle_for(p, 0.3, bw, rate, current, 0.8);
        let b = throttle_for(p * more, 0.3, bw, rate, current, 0.8);
        prop_assert!(a <= 99 && b <= 99);
        prop_assert!(b >= a);
        if p <= 0.3 {
            prop_assert_eq!(a, 0);
        }
    }

    #[test]
    fn tracker_streaks_match_a_recount(
        rounds in prop::collection::vec(prop::collection::btree_set(0u64..1000, 0..200), 1..12),
        per in 1u64..300,
    ) {
        let mut t = FragmentTracker::new(1000, per);
        for r in &rounds {
            t.observe_pages(r.iter().copied());
        }
        for f in t.stats() {
            let range = t.page_range(f.id);
            let counts: Vec<u64> = rounds
                .iter()
                .map(|r| r.range(range.clone()).count() as u64)
                .collect();
            let streak = counts.iter().rev().take_while(|&&c| c > 0).count() as u32;
            let peak = counts.iter().rev().take_while(|&&c| c > 0).max().copied().unwrap_or(0);
            prop_assert_eq!(f.streak, streak);
            prop_assert_eq!(f.peak_changed, peak);
            prop_assert_eq!(f.changed, *counts.last().unwrap());
            prop_assert!(f.changed <= f.pages);
        }
    }
}

/// A plausible history: remainders and predicted downtimes that move at random, with
/// a tracker fed alongside.
fn history() -> impl Strategy<Value = (Vec<RoundTelemetry>, FragmentTracker)> {
    let round = (
        0u64..50_000,
        0.0f64..2.0,
        0u8..100,
        1e5f64..1e9,
        1e6f64..2e9,
        0.0f64..1.0,
    );
    (
        prop::collection::vec(round, 0..40),
        prop::collection::vec(prop::collection::vec(0u64..513, 8), 0..40),
    )
        .prop_map(|(rounds, counts)| {
            let mut tracker = FragmentTracker::new(8 * 512, 512);
            for c in &counts {
                tracker.observe_counts(c);
            }
            let mut elapsed = 0.0;
            let history = rounds
                .into_iter()
                .enumerate()
                .map(
                    |(i, (remaining, predicted, throttle, rate, bw, duration))| {
                        elapsed += duration;
                        RoundTelemetry {
                            round: i as u32 + 1,
                            pages_sent: remaining / 2 + 1,
                            bytes_sent: (remaining / 2 + 1) * 4096,
                            pages_changed: remaining,
                            dirty_rate_bytes_per_s: rate,
                            bandwidth_bytes_per_s: bw,
                            remaining_pages: remaining,
                            held_back_pages: 0,
                            predicted_downtime_s: predicted,
                            duration_s: duration,
                            elapsed_s: elapsed,
                            throttle_percent: throttle,
                        }
                    },
                )
                .collect();
            (history, tracker)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decisions_are_well_formed((history, tracker) in history(), policy in policy()) {
        let limits = Limits::new(tracker.total_pages(), 4096);
        let input = PolicyInput { history: &history, fragments: &tracker, limits: &limits };
        let d = decide(&policy, &input);
        prop_assert_eq!(&d, &decide(&policy, &input), "not deterministic");
        match &d {
            Decision::Continue { hold_back } | Decision::Throttle { hold_back, .. }
                if !matches!(policy, PolicyKind::Adaptive | PolicyKind::DependencyAware) =>
            {
                prop_assert!(hold_back.is_empty());
            }
            _ => {}
        }
        match &d {
            Decision::Continue { hold_back } => {
                prop_assert!(hold_back.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(hold_back.iter().all(|&f| (f as usize) < tracker.len()));
            }
            Decision::Throttle { percent, hold_back } => {
                prop_assert!(matches!(policy, PolicyKind::Adaptive | PolicyKind::DependencyAware));
                prop_assert!((1..=99).contains(percent));
                prop_assert!(*percent > input.current_throttle());
                prop_assert!(hold_back.is_empty());
            }
            Decision::StopAndCopy { .. } => {}
        }
        if policy == PolicyKind::Qemu {
            if let Some(last) = history.last() {
                let fits = last.remaining_pages == 0 || last.predicted_downtime_s <= 0.3;
                let capped = last.round >= limits.max_rounds;
                let stops = matches!(d, Decision::StopAndCopy { .. });
                prop_assert_eq!(stops, fits || capped);
            }
        }
    }
}
