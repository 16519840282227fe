//! How unevenly the load is spread: the balancer's `spread` score (population standard
//! deviation of CPU and of memory utilisation over the switched-on hosts, weighted as in
//! `tern_balance::metric::spread`) of the simulator's state, as the `spread` and
//! `balance` policies see it. The engine samples it every tick for the report.

use tern_balance::metric::spread::Spread;
use tern_balance::metric::{Metric, Stats};

use crate::state::State;

/// MIPS per "core" in the view handed to the balancer.
pub const MIPS_PER_CORE: f64 = 1000.0;

/// The CPU demand (cores) a running VM shows the balancer: what it asks for now, and
/// never exactly nothing, so an idle VM still counts as running.
pub fn cpu_cores(state: &State, vm: usize) -> f64 {
    (state.vm_requested[vm] / MIPS_PER_CORE).max(1e-6)
}

/// The `spread` score of where the VMs run now (a migrating VM counts on its source);
/// hosts with no VM are switched off and not counted.
pub fn spread_score(state: &State) -> f64 {
    let mut values = Vec::with_capacity(state.hosts());
    let mut online = Vec::with_capacity(state.hosts());
    for (h, vms) in state.host_vms.iter().enumerate() {
        let ht = state.spec.host(h);
        let cpu: f64 = vms.iter().map(|&v| cpu_cores(state, v as usize)).sum();
        let mem: f64 = vms.iter().map(|&v| state.spec.vm(v as usize).ram_mb).sum();
        values.push(vec![cpu / (ht.mips() / MIPS_PER_CORE), mem / ht.ram_mb]);
        online.push(!vms.is_empty());
    }
    Stats::new(Spread.components(), &values, &online).score()
}
