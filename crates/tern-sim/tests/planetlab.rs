//! The PlanetLab benchmark end to end on a real day of traces.

use std::path::Path;

use tern_sim::migration::{CloudSimTiming, MigrationTiming, PreCopyTiming};
use tern_sim::planetlab::{self, VmTypeOrder};
use tern_sim::policy::by_name;
use tern_sim::{Report, SimConfig, Simulation};

const DAY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/planetlab/20110303");

fn run(policy: &str, timing: &dyn MigrationTiming, strict_memory: bool) -> Report {
    run_for(288, policy, timing, strict_memory)
}

fn run_for(
    intervals: u32,
    policy: &str,
    timing: &dyn MigrationTiming,
    strict_memory: bool,
) -> Report {
    let (spec, traces) = planetlab::load(Path::new(DAY), 800, VmTypeOrder::Block).unwrap();
    let cfg = SimConfig {
        strict_memory,
        intervals,
        record_series: true,
        ..SimConfig::default()
    };
    let sim = Simulation::new(spec, &traces, timing, cfg).unwrap();
    sim.run(by_name(policy, 0.8).unwrap().as_mut(), &mut |_, _| {})
}

#[test]
fn thr_mmt_consolidates_and_is_deterministic() {
    let none = run("none", &CloudSimTiming, false);
    let a = run("thr-mmt", &CloudSimTiming, false);
    let b = run("thr-mmt", &CloudSimTiming, false);
    assert_eq!(a.vms, 1052);
    assert_eq!(none.migrations, 0);
    assert_eq!(none.pdm, 0.0);
    // Same inputs, same run, to the last bit.
    assert_eq!(a.energy_kwh.to_bits(), b.energy_kwh.to_bits());
    assert_eq!(a.migrations, b.migrations);
    assert_eq!(a.events, b.events);
    // Consolidation saves most of the energy of static placement ...
    assert!(
        a.energy_kwh < 0.3 * none.energy_kwh,
        "{} vs {}",
        a.energy_kwh,
        none.energy_kwh
    );
    // ... but cannot beat the whole day's demand packed on G5 hosts at 100 %:
    // the mean demand is about 194,000 MIPS, 36.5 G5 hosts at 135 W for 24 h.
    assert!(a.energy_kwh > 115.0, "{}", a.energy_kwh);
    assert!(a.migrations > 1000);
    assert!(a.slatah > 0.0 && a.slatah < 0.2, "{}", a.slatah);
    assert!(a.pdm > 0.0 && a.pdm < 0.01, "{}", a.pdm);
    assert!((a.slav - a.slatah * a.pdm).abs() < 1e-15);
    // CloudSim's delay: 613 to 1740 MB over 62.5 MB/s.
    assert!(a.mean_migration_s > 9.8 && a.mean_migration_s < 27.9);
    assert_eq!(a.series.len(), 289);
    let last = a.series.last().unwrap();
    assert!(last.active_hosts < 300);
}

#[test]
fn shared_links_slow_migrations_down() {
    // Six hours: the pre-copy model is unoptimised in test builds.
    let shared = run_for(
        72,
        "thr-mmt",
        &PreCopyTiming::new("qemu".parse().unwrap()),
        false,
    );
    let fixed = run_for(72, "thr-mmt", &CloudSimTiming, false);
    assert!(shared.migrations > 500);
    assert!(
        shared.mean_migration_s > fixed.mean_migration_s,
        "{} vs {}",
        shared.mean_migration_s,
        fixed.mean_migration_s
    );
    assert!(shared.pdm > fixed.pdm);
}

#[test]
fn strict_memory_keeps_far_more_hosts_on() {
    // Four 4 GB hosts' worth of RAM per 5 VMs: RAM, not CPU, bounds consolidation.
    let strict = run("thr-mmt", &CloudSimTiming, true);
    let loose = run("thr-mmt", &CloudSimTiming, false);
    assert!(strict.energy_kwh > 2.0 * loose.energy_kwh);
}

/// CloudSim 4.0's own PlanetLab runner on this day, trace files taken in name order
/// (bench/cloudsim/run): THR-MMT 0.8 gives 192.62 kWh, 26,711 migrations, SLATAH
/// 4.91 %, 532 VMs destroyed for having no load.
#[test]
fn cloudsim_setup_lands_near_cloudsim() {
    let (spec, traces) = planetlab::load(Path::new(DAY), 800, VmTypeOrder::Block).unwrap();
    let cfg = SimConfig {
        strict_memory: false,
        intervals: planetlab::INTERVALS,
        warm_up_intervals: planetlab::WARM_UP_INTERVALS,
        finish_idle_vms: true,
        ..SimConfig::default()
    };
    let sim = Simulation::new(spec, &traces, &CloudSimTiming, cfg).unwrap();
    let r = sim.run(by_name("thr-mmt", 0.8).unwrap().as_mut(), &mut |_, _| {});
    assert_eq!(r.vms_finished, 532);
    assert_eq!(r.dropped_vms, 0);
    assert!(
        (r.energy_kwh / 192.62 - 1.0).abs() < 0.05,
        "{}",
        r.energy_kwh
    );
    let migrations = r.migrations as f64 / 26_711.0;
    assert!(migrations > 0.85 && migrations < 1.1, "{}", r.migrations);
    assert!((r.slatah / 0.0491 - 1.0).abs() < 0.2, "{}", r.slatah);
}

#[test]
fn vms_that_fit_nowhere_are_left_out_and_counted() {
    // Half the VMs (2500 and 2000 MIPS) need a G5's core, and a G5 takes two of them at
    // most: 300 hosts (150 G5) leave many out.
    let (spec, traces) = planetlab::load(Path::new(DAY), 300, VmTypeOrder::Cycle).unwrap();
    let cfg = SimConfig {
        strict_memory: false,
        intervals: 12,
        ..SimConfig::default()
    };
    let sim = Simulation::new(spec, &traces, &CloudSimTiming, cfg).unwrap();
    let (r, state) =
        sim.run_keeping_state(by_name("thr-mmt", 0.8).unwrap().as_mut(), &mut |_, _| {});
    assert!(r.dropped_vms > 0);
    let placed = (0..state.vms()).filter(|&v| state.is_running(v)).count();
    assert_eq!(placed as u64 + r.dropped_vms, 1052);
    assert!(r.migrations > 0);
}
