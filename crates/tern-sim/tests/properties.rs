//! Invariants of whole runs over random small scenarios.

use std::path::Path;

use proptest::prelude::*;
use tern_sim::migration::{CloudSimTiming, MigrationTiming, PreCopyTiming};
use tern_sim::policy::by_name;
use tern_sim::scenario::Scenario;
use tern_sim::state::NO_HOST;
use tern_sim::{SimConfig, Simulation};

fn scenario(hosts: usize, vms: usize, mean: f64, seed: u64) -> Scenario {
    Scenario::parse(&format!(
        r#"
        seed = {seed}
        hours = 6
        [[hosts]]
        count = {hosts}
        cores = 2
        core_mips = 2660
        ram_mb = 8192
        power = "hp-ml110-g5"
        [[vms]]
        count = {vms}
        mips = 1000
        ram_mb = 1024
        bw_mbps = 10
        load = {{ kind = "synthetic", mean = {mean}, noise = 0.1 }}
        "#
    ))
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn every_vm_ends_on_one_host_within_memory(
        hosts in 4usize..20,
        per_host in 1usize..4,
        mean in 0.05f64..0.6,
        seed in 0u64..1000,
        policy in prop::sample::select(vec!["none", "thr-mmt", "spread"]),
        shared in any::<bool>(),
    ) {
        let sc = scenario(hosts, hosts * per_host, mean, seed);
        let (spec, traces) = sc.build(Path::new(".")).unwrap();
        let qemu = PreCopyTiming::new("qemu".parse().unwrap());
        let timing: &dyn MigrationTiming = if shared { &qemu } else { &CloudSimTiming };
        let cfg = SimConfig { intervals: sc.intervals(), ..SimConfig::default() };
        let sim = Simulation::new(spec, &traces, timing, cfg).unwrap();
        let (report, state) = sim.run_keeping_state(by_name(policy, 0.8).unwrap().as_mut(), &mut |_, _| {});
        let mut seen = vec![0u32; state.vms()];
        for h in 0..state.hosts() {
            for &v in &state.host_vms[h] {
                seen[v as usize] += 1;
                prop_assert_eq!(state.vm_host[v as usize] as usize, h);
            }
            prop_assert!(state.host_ram_used[h] <= state.spec.host(h).ram_mb + 1e-9);
        }
        prop_assert!(seen.iter().all(|&n| n == 1));
        prop_assert!(state.vm_host.iter().all(|&h| h != NO_HOST));
        prop_assert!(report.energy_kwh > 0.0);
        prop_assert!((0.0..=1.0).contains(&report.slatah));
        prop_assert!((0.0..=1.0).contains(&report.pdm));
        prop_assert_eq!(report.migrations, report.migrations_completed + report.migrations_failed
            + (0..state.vms()).filter(|&v| state.is_migrating(v)).count() as u64);
        if policy == "none" {
            prop_assert_eq!(report.migrations, 0);
        }
    }
}
