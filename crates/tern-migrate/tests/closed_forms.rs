//! The model against the textbook closed forms, in both the analytic and the page-level
//! model, and the policies' caps as the model drives them.

use tern_migrate::{
    mbit_per_s, simulate, simulate_pages, DirtyModel, MigrationOutcome, MigrationParams, Policy,
    PolicyKind, StopReason, MIB,
};

fn both(params: &MigrationParams, policy: &dyn Policy) -> [MigrationOutcome; 2] {
    [
        simulate(params, policy).unwrap(),
        simulate_pages(params, policy, 1).unwrap(),
    ]
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[test]
fn idle_guest_takes_memory_over_bandwidth_in_one_round() {
    for (mib, mbit) in [(512, 1000.0), (64, 100.0), (4096, 10_000.0)] {
        let params = MigrationParams::new(mib * MIB, mbit_per_s(mbit));
        let expected = (mib * MIB) as f64 / mbit_per_s(mbit);
        for policy in [PolicyKind::Qemu, PolicyKind::Xen, PolicyKind::Adaptive] {
            for o in both(&params, &policy) {
                assert!(close(o.total_time_s, expected), "{policy}: {o:?}");
                assert_eq!(o.rounds, 1, "{policy}");
                assert_eq!(o.downtime_s, 0.0, "{policy}");
                assert_eq!(o.bytes_sent, mib * MIB, "{policy}");
                assert!(o.converged, "{policy}");
                assert_eq!(o.stop_reason, StopReason::NothingDirty, "{policy}");
            }
        }
    }
}

#[test]
fn stop_copy_pauses_for_the_whole_transfer() {
    let params =
        MigrationParams::new(512 * MIB, mbit_per_s(1000.0)).with_dirty(DirtyModel::Uniform {
            rate_bytes_per_s: 50e6,
            working_set_bytes: 128 * MIB,
        });
    for o in both(&params, &PolicyKind::StopCopy) {
        assert_eq!(o.rounds, 0);
        assert!(close(o.downtime_s, (512 * MIB) as f64 / 125e6));
        assert_eq!(o.total_time_s, o.downtime_s);
        assert_eq!(o.bytes_sent, 512 * MIB);
    }
}

#[test]
fn stop_overhead_adds_to_downtime_and_total() {
    let mut params = MigrationParams::new(256 * MIB, mbit_per_s(1000.0));
    params.stop_overhead_s = 0.04;
    let o = simulate(&params, &PolicyKind::Qemu).unwrap();
    assert!(close(o.downtime_s, 0.04));
    assert!(close(o.total_time_s, (256 * MIB) as f64 / 125e6 + 0.04));
}

#[test]
fn qemu_never_converges_when_a_sequential_writer_outruns_the_link() {
    // A writer walking all of memory at >= the link rate re-dirties at least as much as
    // each round sends, so the remainder never shrinks and only the cap ends it.
    // 64 MiB over 100 Mbit/s keeps the page-level runs quick; the rule is scale-free.
    for factor in [1.0, 1.5, 3.0] {
        let bw = mbit_per_s(100.0);
        let mut params = MigrationParams::new(64 * MIB, bw).with_dirty(DirtyModel::Sequential {
            rate_bytes_per_s: factor * bw,
            working_set_bytes: 64 * MIB,
        });
        params.max_rounds = 30;
        for o in both(&params, &PolicyKind::Qemu) {
            assert!(!o.converged, "factor {factor}: {o:?}");
            assert_eq!(o.stop_reason, StopReason::SafetyRounds);
            assert_eq!(o.rounds, 30);
            // Every round after the first still leaves all of memory to send.
            assert!(o
                .telemetry
                .iter()
                .all(|r| r.remaining_pages == 64 * MIB / 4096));
        }
    }
}

#[test]
fn qemu_never_converges_when_random_dirtying_outruns_the_link() {
    // Random writes at 1.5x the link over all of memory: the remainder settles at the
    // fixed point x = W(1 - exp(-1.5 x / W)) ~ 0.58 W, far above the 300 ms budget.
    let bw = mbit_per_s(100.0);
    let mut params = MigrationParams::new(64 * MIB, bw).with_dirty(DirtyModel::Uniform {
        rate_bytes_per_s: 1.5 * bw,
        working_set_bytes: 64 * MIB,
    });
    params.max_rounds = 30;
    for o in both(&params, &PolicyKind::Qemu) {
        assert!(!o.converged);
        assert_eq!(o.stop_reason, StopReason::SafetyRounds);
        let last = o.telemetry.last().unwrap();
        let share = last.remaining_pages as f64 / (64 * MIB / 4096) as f64;
        assert!((share - 0.583).abs() < 0.01, "remainder share {share}");
    }
}

#[test]
fn qemu_converges_when_the_link_outruns_the_dirtying() {
    let params =
        MigrationParams::new(512 * MIB, mbit_per_s(1000.0)).with_dirty(DirtyModel::Sequential {
            rate_bytes_per_s: 30e6,
            working_set_bytes: 128 * MIB,
        });
    for o in both(&params, &PolicyKind::Qemu) {
        assert!(o.converged, "{o:?}");
        assert_eq!(o.stop_reason, StopReason::FitsDowntime);
        assert!(o.downtime_s <= 0.3);
        // Geometric shrinking by 30/125 a round: 4.3 s -> 1.03 s -> 0.25 s fits.
        assert_eq!(o.rounds, 2);
    }
}

#[test]
fn xen_stops_on_its_caps() {
    let bw = mbit_per_s(1000.0);
    // Memory-wide sequential writer at the link rate: each round resends all of memory,
    // so the third round reaches 3x memory.
    let params = MigrationParams::new(64 * MIB, bw).with_dirty(DirtyModel::Sequential {
        rate_bytes_per_s: bw,
        working_set_bytes: 64 * MIB,
    });
    for o in both(&params, &PolicyKind::Xen) {
        assert_eq!(o.stop_reason, StopReason::VolumeCap);
        assert_eq!(o.rounds, 3);
        assert!(!o.converged);
    }
    // A small hot set re-dirtied every round never reaches 3x memory: 30 rounds.
    let params = MigrationParams::new(128 * MIB, bw).with_dirty(DirtyModel::Uniform {
        rate_bytes_per_s: 500e6,
        working_set_bytes: 8 * MIB,
    });
    for o in both(&params, &PolicyKind::Xen) {
        assert_eq!(o.stop_reason, StopReason::RoundCap);
        assert_eq!(o.rounds, 30);
    }
    // A tiny trickle leaves fewer than 50 pages after round 2.
    let params = MigrationParams::new(512 * MIB, bw).with_dirty(DirtyModel::Sequential {
        rate_bytes_per_s: 4096.0,
        working_set_bytes: MIB,
    });
    for o in both(&params, &PolicyKind::Xen) {
        assert_eq!(o.stop_reason, StopReason::FewDirtyPages);
        assert!(o.converged);
        assert_eq!(o.rounds, 1);
    }
}

#[test]
fn distinct_pages_saturate_at_the_working_set() {
    // 16 MiB written at random at 1 GB/s during a 4.3 s first round: every page is
    // dirty, none twice counted.
    let params =
        MigrationParams::new(512 * MIB, mbit_per_s(1000.0)).with_dirty(DirtyModel::Uniform {
            rate_bytes_per_s: 1e9,
            working_set_bytes: 16 * MIB,
        });
    for o in both(&params, &PolicyKind::Qemu) {
        let first = &o.telemetry[0];
        assert_eq!(first.pages_changed, 16 * MIB / 4096);
        assert_eq!(first.remaining_pages, 16 * MIB / 4096);
    }
}

#[test]
fn outcomes_serialize_to_json() {
    let params = MigrationParams::new(64 * MIB, mbit_per_s(1000.0));
    let o = simulate(&params, &PolicyKind::Adaptive).unwrap();
    let json = serde_json::to_value(&o).unwrap();
    assert_eq!(json["policy"], "adaptive");
    assert_eq!(json["stop_reason"], "nothing_dirty");
    assert_eq!(json["telemetry"][0]["round"], 1);
    let back: MigrationOutcome = serde_json::from_value(json).unwrap();
    assert_eq!(back, o);
}

#[test]
fn page_level_runs_are_reproducible_by_seed() {
    let params =
        MigrationParams::new(128 * MIB, mbit_per_s(1000.0)).with_dirty(DirtyModel::HotCold {
            hot_bytes: 16 * MIB,
            hot_rate_bytes_per_s: 100e6,
            cold_bytes: 64 * MIB,
            cold_rate_bytes_per_s: 3e6,
        });
    let a = simulate_pages(&params, &PolicyKind::Adaptive, 42).unwrap();
    let b = simulate_pages(&params, &PolicyKind::Adaptive, 42).unwrap();
    assert_eq!(a, b);
}

#[test]
fn adaptive_gives_up_when_the_stop_cost_alone_exceeds_the_budget() {
    let mut params =
        MigrationParams::new(512 * MIB, mbit_per_s(1000.0)).with_dirty(DirtyModel::HotCold {
            hot_bytes: 64 * MIB,
            hot_rate_bytes_per_s: 400e6,
            cold_bytes: 384 * MIB,
            cold_rate_bytes_per_s: 2e6,
        });
    params.stop_overhead_s = 0.35;
    let o = simulate(&params, &PolicyKind::Adaptive).unwrap();
    assert_eq!(o.stop_reason, StopReason::BudgetUnreachable);
    assert!(!o.converged);
    // It stops as soon as it is stuck instead of throttling for nothing.
    assert_eq!(o.max_throttle_percent, 0);
    assert!(o.rounds <= 3);
}
