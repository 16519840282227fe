//! `spread`: tern's own balancer, the one the live manager runs. Every interval the
//! simulator state refreshes a `tern_model::Cluster` snapshot kept by the policy (CPU
//! in units of 1000 MIPS, memory in MB) and `tern_balance::plan_spread` proposes moves
//! that lower the spread score (weighted standard deviation of CPU and memory
//! utilisation across hosts).
//!
//! What it does and does not do: it balances load over the hosts that are switched on
//! (hosts with no running VM are offline in the snapshot and never receive VMs), so it
//! spreads instead of consolidating; it switches no host off and none on. VMs in
//! migration are pinned. At most `max_moves_per_interval` moves start per interval.

use tern_balance::{PlanOptions, Search};
use tern_model::{
    AllocPolicy, Cluster, Demand, DiskTemplate, DynUtil, Group, IPolicy, InstId, Instance,
    InstanceStatus, Node, NodeId,
};

use super::{Move, Policy};
use crate::state::State;

/// MIPS per "core" in the snapshot handed to the balancer.
const MIPS_PER_CORE: f64 = 1000.0;

pub struct Spread {
    /// Stop once the spread score is at or below this.
    pub min_score: f64,
    /// A move must lower the score by at least this much.
    pub min_gain: f64,
    pub max_moves_per_interval: usize,
    /// The balancer's snapshot, kept between intervals: hosts and VMs keep their
    /// names and sizes, so only placements, demands and free memory are refreshed.
    cluster: Option<Cluster>,
}

impl Spread {
    pub fn new() -> Spread {
        Spread {
            min_score: 0.02,
            min_gain: 0.001,
            max_moves_per_interval: 20,
            cluster: None,
        }
    }
}

impl Default for Spread {
    fn default() -> Self {
        Spread::new()
    }
}

impl Policy for Spread {
    fn name(&self) -> &'static str {
        "spread"
    }

    fn plan(&mut self, state: &State, _now: f64) -> Vec<Move> {
        let cluster = self.cluster.get_or_insert_with(|| shape(state));
        let pinned = refresh(cluster, state);
        let opts = PlanOptions {
            min_gain: self.min_gain,
            min_gain_limit: f64::INFINITY,
            max_moves: Some(self.max_moves_per_interval),
            min_score: self.min_score,
            n_plus_one: false,
            pinned,
            search: Search::Pruned { width: 24 },
        };
        let planned = tern_balance::plan_spread(cluster, &opts);
        planned
            .plan
            .moves
            .iter()
            .map(|m| Move {
                vm: m.inst.index() as u32,
                to: m.to.index() as u32,
            })
            .collect()
    }
}

/// The parts of the balancer's snapshot that never change: instance i is VM i and
/// node h is host h, with their names and sizes. [`refresh`] fills in the rest.
fn shape(state: &State) -> Cluster {
    let nodes = (0..state.hosts())
        .map(|h| {
            let ht = state.spec.host(h);
            let cores = ht.mips() / MIPS_PER_CORE;
            Node::live(format!("host-{h}"), cores, ht.ram_mb, 0, true)
        })
        .collect();
    let instances = (0..state.vms())
        .map(|v| {
            let vt = state.spec.vm(v);
            Instance {
                name: format!("vm-{v}"),
                mem: vt.ram_mb as i64,
                disk: 0,
                vcpus: 1,
                status: InstanceStatus::Running,
                auto_balance: true,
                primary: NodeId(0),
                secondary: None,
                disk_template: DiskTemplate::Diskless,
                tags: Vec::new(),
                spindle_use: 0,
                spindles: None,
                forthcoming: false,
                util: DynUtil::BASE,
                demand: Demand {
                    cpu_cores: 0.0,
                    mem_used_mib: vt.ram_mb,
                },
            }
        })
        .collect();
    let ipolicy = IPolicy {
        // Memory is the hard limit; CPU is what the balancer spreads.
        vcpu_ratio: f64::MAX,
        ..IPolicy::default()
    };
    Cluster {
        groups: vec![Group {
            name: "sim".into(),
            uuid: "00000000-0000-0000-0000-000000000000".into(),
            alloc_policy: AllocPolicy::Preferred,
            tags: Vec::new(),
            networks: Vec::new(),
            ipolicy: ipolicy.clone(),
        }],
        nodes,
        instances,
        tags: Vec::new(),
        ipolicy,
    }
}

/// Brings the snapshot up to the simulator's state: where each VM runs, its CPU
/// demand, each host's free memory, and which hosts are switched on (hosts with no
/// running VM are offline and receive none). Returns the VMs the planner must not
/// move (those migrating now).
fn refresh(cluster: &mut Cluster, state: &State) -> Vec<InstId> {
    for (h, node) in cluster.nodes.iter_mut().enumerate() {
        node.free_mem = (node.total_mem - state.host_ram_used[h]) as i64;
        node.offline = state.host_vms[h].is_empty();
    }
    let mut pinned = Vec::new();
    for (v, inst) in cluster.instances.iter_mut().enumerate() {
        if state.is_migrating(v) {
            pinned.push(InstId::from_index(v));
        }
        inst.primary = NodeId::from_index(state.vm_host[v] as usize);
        inst.demand.cpu_cores = (state.vm_requested[v] / MIPS_PER_CORE).max(1e-6);
    }
    pinned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planetlab;

    /// A snapshot refreshed after the placement changed equals one built afresh.
    #[test]
    fn refreshed_snapshot_equals_a_fresh_one() {
        let spec = planetlab::cluster(6, 8, planetlab::VmTypeOrder::Block);
        let mut state = State::new(spec.clone(), false);
        for v in 0..8 {
            state.place(v, v % 3, 0.0);
        }
        let mut kept = shape(&state);
        refresh(&mut kept, &state);
        state.begin_migration(0, 4, 1.0);
        state.end_migration(0, true, 2.0);
        state.begin_migration(1, 5, 3.0);
        let pinned = refresh(&mut kept, &state);
        let mut fresh = shape(&state);
        assert_eq!(refresh(&mut fresh, &state), pinned);
        assert_eq!(pinned, vec![InstId(1)]);
        assert_eq!(kept, fresh);
        assert_eq!(kept.instances[0].primary, NodeId(4));
        assert!(kept.nodes[3].offline && !kept.nodes[4].offline);
    }
}
