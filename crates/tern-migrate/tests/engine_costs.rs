//! The engine's costs (`MigrationParams::engine`) in closed form: what each parameter
//! adds to an idle guest's migration, how a throttle slows a guest that needs only part
//! of its CPU, and what sending a round in memory order leaves behind.

use tern_migrate::{mbit_per_s, simulate, Adaptive, DirtyModel, MigrationParams, PolicyKind, MIB};

fn near(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs()
}

#[test]
fn an_idle_guest_costs_its_data_over_the_achieved_rate_plus_setup_scans_and_stop() {
    let p = MigrationParams::engine(1024 * MIB, 112 * MIB, mbit_per_s(1000.0));
    let o = simulate(&p, &PolicyKind::Adaptive).unwrap();
    let transfer = (112 * MIB) as f64 / (p.bandwidth_bytes_per_s * p.link_efficiency);
    // One scan ends round 1, another is the stop-and-copy's final pass.
    let downtime = p.scan_s() + p.stop_overhead_s;
    assert!(near(o.downtime_s, downtime, 1e-9), "{o:?}");
    assert!(
        near(
            o.total_time_s,
            p.setup_s + transfer + p.scan_s() + downtime,
            1e-9
        ),
        "{o:?}"
    );
    assert_eq!(o.bytes_sent, 112 * MIB);
    // Zero pages cost nothing: a guest twice the size with the same data takes as long.
    let bigger = MigrationParams::engine(2048 * MIB, 112 * MIB, mbit_per_s(1000.0));
    let b = simulate(&bigger, &PolicyKind::Adaptive).unwrap();
    assert!(near(b.total_time_s, o.total_time_s, 1e-9));
}

#[test]
fn a_throttle_slows_a_guest_by_the_cpu_share_its_writes_need() {
    let mut p = MigrationParams::new(512 * MIB, 125e6).with_dirty(DirtyModel::Sequential {
        rate_bytes_per_s: 188e6,
        working_set_bytes: 128 * MIB,
    });
    assert!(near(p.throttle_factor(95), 0.05, 1e-12));
    p.write_cpu_share = Some(0.31);
    p.throttle_floor_bytes_per_s = 14e6;
    assert_eq!(p.throttle_factor(0), 1.0);
    // 95 %: 5 % of the CPU over the 31 % it needs, plus the floor.
    let kept = p.throttle_factor(95) * 188e6;
    assert!(near(kept, 188e6 * 0.05 / 0.31 + 14e6, 1e-9), "{kept}");
    // A throttle that leaves more CPU than the writes need does not slow them.
    assert_eq!(p.throttle_factor(60), 1.0);
}

#[test]
fn sending_in_memory_order_counts_only_writes_after_the_working_set_went_out() {
    // Working set first in memory, 96 MiB after it; no probe, no scan: round 1 sends
    // all of memory in T, the working set in its first W/B, so it counts as sent at
    // W/(2B) and the writes after that are what round 1 leaves.
    let (w, m, r, bw) = (128 * MIB, 224 * MIB, 31e6, 125e6);
    let mut p = MigrationParams::new(m, bw).with_dirty(DirtyModel::Sequential {
        rate_bytes_per_s: r,
        working_set_bytes: w,
    });
    let at_start = simulate(&p, &PolicyKind::Qemu).unwrap().telemetry[0].remaining_pages;
    p.sent_in_order = true;
    let in_order = simulate(&p, &PolicyKind::Qemu).unwrap().telemetry[0].remaining_pages;
    let t = m as f64 / bw;
    let pages = |s: f64| r * s / 4096.0;
    assert!(near(at_start as f64, pages(t), 1e-3), "{at_start}");
    assert!(
        near(in_order as f64, pages(t - w as f64 / (2.0 * bw)), 1e-3),
        "{in_order}"
    );
}

#[test]
fn the_policy_is_told_the_stop_cost_the_engine_assumes_not_the_one_it_pays() {
    // The engine predicts a stop's downtime for its policy with a 30 ms budget for
    // device state and resume, while the stop really costs 12 ms: the model tells its
    // policy the same 30 ms and pays the 12 ms.
    let link = mbit_per_s(1000.0);
    let mut p =
        MigrationParams::engine(512 * MIB, 224 * MIB, link).with_dirty(DirtyModel::Sequential {
            rate_bytes_per_s: 30e6,
            working_set_bytes: 128 * MIB,
        });
    p.max_elapsed_s = Some(40.0);
    let told = simulate(&p, &PolicyKind::Adaptive).unwrap();
    let last = told.telemetry.last().unwrap();
    let remainder_s = last.remaining_pages as f64 * 4096.0 / last.bandwidth_bytes_per_s;
    assert!(near(
        last.predicted_downtime_s,
        remainder_s + p.scan_s() + tern_migrate::precopy::STOP_COST_S,
        1e-3
    ));
    assert!(near(
        told.downtime_s,
        remainder_s + p.scan_s() + p.stop_overhead_s,
        1e-3
    ));
    // It stopped once the remainder was small enough to settle, or stopped shrinking.
    let n = told.telemetry.len();
    let before = told.telemetry[n - 2].remaining_pages as f64;
    assert!(
        remainder_s <= Adaptive::default().settle_transfer_s
            || last.remaining_pages as f64 >= 0.9 * before,
        "{last:?}"
    );
    // Told the real cost instead, the policy stops no later.
    p.policy_stop_cost_s = None;
    let real = simulate(&p, &PolicyKind::Adaptive).unwrap();
    assert!(real.rounds <= told.rounds);
}

#[test]
fn round_one_throttle_starts_only_after_the_probe_scan() {
    // The engine's probe scans memory beside the rest of round 1 and throttles only
    // once the scan is done: a slower scan lets a fast guest dirty more unthrottled,
    // and round 1 leaves more behind.
    let rate = 188e6;
    let run = |scan_s_per_gib: f64| {
        let mut p = MigrationParams::engine(512 * MIB, 216 * MIB, mbit_per_s(1000.0)).with_dirty(
            DirtyModel::Sequential {
                rate_bytes_per_s: rate,
                working_set_bytes: 128 * MIB,
            },
        );
        p.scan_s_per_gib = scan_s_per_gib;
        p.max_elapsed_s = Some(40.0);
        simulate(&p, &PolicyKind::Adaptive).unwrap()
    };
    let (quick, slow) = (run(0.0), run(1.0));
    assert_eq!(quick.telemetry[0].throttle_percent, 95);
    assert_eq!(slow.telemetry[0].throttle_percent, 95);
    let left = |o: &tern_migrate::MigrationOutcome| o.telemetry[0].remaining_pages;
    assert!(
        left(&slow) > left(&quick),
        "{} vs {}",
        left(&slow),
        left(&quick)
    );
    // Round 1's rate is the throttled guest's, measured after the probe's scan.
    let throttled = rate * quick_factor(95);
    assert!(near(
        quick.telemetry[0].dirty_rate_bytes_per_s,
        throttled,
        0.05
    ));
}

fn quick_factor(percent: u8) -> f64 {
    MigrationParams::engine(512 * MIB, 216 * MIB, 1.0)
        .with_dirty(DirtyModel::Sequential {
            rate_bytes_per_s: 188e6,
            working_set_bytes: 128 * MIB,
        })
        .throttle_factor(percent)
}

#[test]
fn round_one_ends_no_sooner_than_its_probe_scan() {
    // Round 1 of 48 MiB of data: 24 MiB, then the probe's scan beside the other 24 MiB.
    // With a scan slower than that stretch, the engine's round waits for the scan and
    // then scans once more to end the round.
    let mut p = MigrationParams::engine(256 * MIB, 48 * MIB, mbit_per_s(1000.0));
    p.scan_s_per_gib = 10.0;
    let o = simulate(&p, &PolicyKind::Adaptive).unwrap();
    let stretch_s = (24 * MIB) as f64 / p.effective_bandwidth();
    let scan_s = p.scan_s();
    assert!(scan_s > stretch_s, "{scan_s} vs {stretch_s}");
    let round = &o.telemetry[0];
    assert!(
        near(round.duration_s, stretch_s + scan_s + scan_s, 1e-9),
        "{round:?}"
    );
}
