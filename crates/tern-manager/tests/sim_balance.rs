//! The simulator's `balance` policy makes the manager's balancing decisions: the same
//! cluster, recent moves and migrations under way, given to the manager as its snapshot
//! and to the simulator as its state, give the same moves.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tern_manager::decide::balance;
use tern_manager::state::{
    BalancerSettings, Capacity, Host, HostState, Migration, MigrationReason, MigrationResult,
    Snapshot, Vm, VmSpec, VmState,
};
use tern_sim::planetlab::{self, VmTypeOrder};
use tern_sim::policy::{host_name, vm_name, Balance, Policy};
use tern_sim::state::State;

/// One VM of the generated cluster: host, load (share of its MIPS), whether it
/// finished a migration recently, whether it is migrating to the next host now.
type VmCase = (usize, f64, bool, bool);

/// Builds the simulator state and the manager snapshot of the same cluster at `now`.
fn both(hosts: usize, vms: &[VmCase], now: f64) -> (State, Snapshot) {
    let spec = planetlab::cluster(hosts, vms.len(), VmTypeOrder::Cycle);
    let mut state = State::new(spec, false);
    for (v, &(h, load, recent, migrating)) in vms.iter().enumerate() {
        let h = h % hosts;
        state.place(v, h, 0.0);
        state.vm_requested[v] = load * state.spec.vm(v).mips;
        if recent {
            state.vm_last_moved[v] = Some(now - 100.0);
        }
        if migrating {
            state.begin_migration(v, (h + 1) % hosts, now - 10.0);
        }
    }
    let mut snap = Snapshot::default();
    for h in 0..hosts {
        let ht = state.spec.host(h);
        let name = host_name(h);
        snap.hosts.insert(
            name.clone(),
            Host {
                name,
                address: "sim:".into(),
                capacity: Capacity {
                    cpus: ht.mips() / 1000.0,
                    memory_mib: ht.ram_mb as u64,
                },
                // A switched-off simulated host is one the manager may not use.
                state: if state.host_vms[h].is_empty() {
                    HostState::Maintenance
                } else {
                    HostState::Active
                },
                last_heartbeat: Some(now as u64 * 1000),
                cpu_used: None,
                cpu_smoothed: None,
                store_free_mib: None,
            },
        );
    }
    for v in 0..vms.len() {
        let migrating = state.is_migrating(v);
        let (from, to) = (host_name(state.vm_host[v] as usize), state.vm_dest[v]);
        let name = vm_name(v);
        let desired = if migrating {
            host_name(to as usize)
        } else {
            from.clone()
        };
        if migrating {
            let id = snap.running.len() as u64 + 1;
            snap.running.insert(
                id,
                Migration {
                    id,
                    vm: name.clone(),
                    from: from.clone(),
                    to: desired.clone(),
                    policy: tern_api::migration::PolicyKind::Adaptive,
                    reason: MigrationReason::Balance,
                    started: (now as u64 - 10) * 1000,
                    finished: None,
                    result: MigrationResult::Running,
                },
            );
        }
        snap.vms.insert(
            name.clone(),
            Vm {
                name,
                spec: VmSpec::sized(1, state.spec.vm(v).ram_mb as u64),
                desired_host: Some(desired),
                observed_host: Some(from),
                state: if migrating {
                    VmState::Migrating
                } else {
                    VmState::Running
                },
                cpu_used: (state.vm_requested[v] / 1000.0).max(1e-6),
                cpu_measured: true,
                last_moved: state.vm_last_moved[v].map(|t| (t * 1000.0).round() as u64),
                disks_made: false,
                guest: None,
                restarts: Default::default(),
                start_error: None,
            },
        );
    }
    (state, snap)
}

fn same_moves(
    hosts: usize,
    vms: &[VmCase],
    settings: BalancerSettings,
) -> Result<usize, TestCaseError> {
    let now = 3600.0;
    let (state, mut snap) = both(hosts, vms, now);
    snap.settings = settings.clone();
    let manager: BTreeMap<String, String> = balance::plan(&snap, now as u64 * 1000)
        .moves
        .into_iter()
        .map(|m| (m.vm, m.to))
        .collect();
    let sim: BTreeMap<String, String> = Balance::new(settings)
        .plan(&state, now)
        .into_iter()
        .map(|m| (vm_name(m.vm as usize), host_name(m.to as usize)))
        .collect();
    prop_assert_eq!(&manager, &sim);
    Ok(manager.len())
}

#[test]
fn a_piled_up_cluster_gets_the_same_moves() {
    // Ten busy VMs on host 0, an idle one on each other host (an empty host is switched
    // off); two busy ones moved recently, one is moving.
    let vms: Vec<VmCase> = (0..10)
        .map(|i| (0, 0.9, i == 3 || i == 4, i == 7))
        .chain((1..8).map(|h| (h, 0.05, false, false)))
        .collect();
    let settings = BalancerSettings {
        max_per_host: 2,
        aggressiveness: 5,
        ..BalancerSettings::default()
    };
    let moved = same_moves(8, &vms, settings).unwrap();
    assert!(moved > 0, "the case must make moves to compare");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_cluster_gets_the_same_moves(
        hosts in 2usize..12,
        vms in prop::collection::vec((0usize..12, 0.0f64..1.0, any::<bool>(), prop::bool::weighted(0.1)), 1..40),
        aggressiveness in 1u8..=5,
        max_per_host in 1u32..4,
        max_per_cluster in 1u32..10,
    ) {
        let settings = BalancerSettings {
            aggressiveness,
            max_per_host,
            max_per_cluster,
            ..BalancerSettings::default()
        };
        same_moves(hosts, &vms, settings)?;
    }
}
