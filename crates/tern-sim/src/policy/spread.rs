//! `spread`: tern's own balancer, the one the live manager runs. Every interval the
//! simulator state becomes a `tern_model::Cluster` snapshot (CPU in units of 1000 MIPS,
//! memory in MB) and `tern_balance::plan_spread` proposes moves that lower the spread
//! score (weighted standard deviation of CPU and memory utilisation across hosts).
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
}

impl Spread {
    pub fn new() -> Spread {
        Spread {
            min_score: 0.02,
            min_gain: 0.001,
            max_moves_per_interval: 20,
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
        let (cluster, pinned) = snapshot(state);
        let opts = PlanOptions {
            min_gain: self.min_gain,
            min_gain_limit: f64::INFINITY,
            max_moves: Some(self.max_moves_per_interval),
            min_score: self.min_score,
            n_plus_one: false,
            pinned,
            search: Search::Pruned { width: 24 },
        };
        let planned = tern_balance::plan_spread(&cluster, &opts);
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

/// The simulator state as the balancer's cluster snapshot; instance i is VM i and node
/// h is host h. Returns the VMs the planner must not move (those migrating now).
pub fn snapshot(state: &State) -> (Cluster, Vec<InstId>) {
    let nodes = (0..state.hosts())
        .map(|h| {
            let ht = state.spec.host(h);
            let cores = ht.mips() / MIPS_PER_CORE;
            Node::live(
                format!("host-{h}"),
                cores,
                ht.ram_mb,
                (ht.ram_mb - state.host_ram_used[h]) as i64,
                state.host_vms[h].is_empty(),
            )
        })
        .collect();
    let mut pinned = Vec::new();
    let instances = (0..state.vms())
        .map(|v| {
            if state.is_migrating(v) {
                pinned.push(InstId::from_index(v));
            }
            let vt = state.spec.vm(v);
            Instance {
                name: format!("vm-{v}"),
                mem: vt.ram_mb as i64,
                disk: 0,
                vcpus: 1,
                status: InstanceStatus::Running,
                auto_balance: true,
                primary: NodeId::from_index(state.vm_host[v] as usize),
                secondary: None,
                disk_template: DiskTemplate::Diskless,
                tags: Vec::new(),
                spindle_use: 0,
                spindles: None,
                forthcoming: false,
                util: DynUtil::BASE,
                demand: Demand {
                    cpu_cores: (state.vm_requested[v] / MIPS_PER_CORE).max(1e-6),
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
    let cluster = Cluster {
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
    };
    (cluster, pinned)
}
