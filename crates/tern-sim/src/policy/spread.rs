//! `spread`: tern's own balancer, the one the live manager runs. Every interval the
//! simulator state refreshes a `tern_model::Cluster` snapshot kept by the policy (CPU
//! in units of 1000 MIPS, memory in MB) and `tern_balance::plan_spread` proposes moves
//! that lower the spread score (weighted standard deviation of CPU and memory
//! utilisation across hosts).
//!
//! What it does and does not do: it balances load over the hosts that are switched on
//! (hosts with no running VM are offline in the snapshot and never receive VMs), so it
//! spreads instead of consolidating; it switches no host off and none on. VMs in
//! migration are pinned; VMs on no host (left out at the start, or finished) are not in
//! the snapshot. At most `max_moves_per_interval` moves start per interval.

use tern_balance::{PlanOptions, Search};
use tern_model::{
    AllocPolicy, Cluster, Demand, DiskTemplate, DynUtil, Group, IPolicy, InstId, Instance,
    InstanceStatus, Node, NodeId,
};

use super::{Move, Policy};
use crate::imbalance::{cpu_cores, MIPS_PER_CORE};
use crate::state::State;

pub struct Spread {
    /// Stop once the spread score is at or below this.
    pub min_score: f64,
    /// A move must lower the score by at least this much.
    pub min_gain: f64,
    pub max_moves_per_interval: usize,
    /// The balancer's snapshot, kept between intervals: hosts and VMs keep their
    /// names and sizes, so only placements, demands and free memory are refreshed.
    snapshot: Option<Snapshot>,
}

/// A cluster snapshot and the VM each of its instances stands for.
struct Snapshot {
    cluster: Cluster,
    /// Instance i is VM `vms[i]`: the running VMs, in VM order.
    vms: Vec<u32>,
}

impl Spread {
    pub fn new() -> Spread {
        Spread {
            min_score: 0.02,
            min_gain: 0.001,
            max_moves_per_interval: 20,
            snapshot: None,
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
        let snap = self.snapshot.get_or_insert_with(|| Snapshot {
            cluster: shape(state),
            vms: Vec::new(),
        });
        let pinned = refresh(snap, state);
        let opts = PlanOptions {
            min_gain: self.min_gain,
            min_gain_limit: f64::INFINITY,
            max_moves: Some(self.max_moves_per_interval),
            min_score: self.min_score,
            n_plus_one: false,
            pinned,
            search: Search::Pruned { width: 24 },
        };
        let planned = tern_balance::plan_spread(&snap.cluster, &opts);
        planned
            .plan
            .moves
            .iter()
            .map(|m| Move {
                vm: snap.vms[m.inst.index()],
                to: m.to.index() as u32,
            })
            .collect()
    }
}

/// The hosts of the balancer's snapshot, which never change but for free memory and
/// whether they are on (node h is host h); [`refresh`] fills in those and the VMs.
fn shape(state: &State) -> Cluster {
    let nodes = (0..state.hosts())
        .map(|h| {
            let ht = state.spec.host(h);
            let cores = ht.mips() / MIPS_PER_CORE;
            Node::live(format!("host-{h}"), cores, ht.ram_mb, 0, true)
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
        instances: Vec::new(),
        tags: Vec::new(),
        ipolicy,
    }
}

/// VM `v` as an instance of the snapshot; [`refresh`] sets where it runs and its CPU
/// demand.
fn instance(state: &State, v: usize) -> Instance {
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
}

/// Brings the snapshot up to the simulator's state: which VMs run (those on a host's
/// list; the instances are rebuilt only when that set changed), where each runs, its
/// CPU demand, each host's free memory, and which hosts are switched on (hosts with no
/// running VM are offline and receive none). Returns the instances the planner must
/// not move (VMs migrating now).
fn refresh(snap: &mut Snapshot, state: &State) -> Vec<InstId> {
    let mut running: Vec<u32> = state.host_vms.iter().flatten().copied().collect();
    running.sort_unstable();
    if running != snap.vms {
        snap.cluster.instances = running
            .iter()
            .map(|&v| instance(state, v as usize))
            .collect();
        snap.vms = running;
    }
    for (h, node) in snap.cluster.nodes.iter_mut().enumerate() {
        node.free_mem = (node.total_mem - state.host_ram_used[h]) as i64;
        node.offline = state.host_vms[h].is_empty();
    }
    let mut pinned = Vec::new();
    for (i, (inst, &v)) in snap.cluster.instances.iter_mut().zip(&snap.vms).enumerate() {
        let v = v as usize;
        if state.is_migrating(v) {
            pinned.push(InstId::from_index(i));
        }
        inst.primary = NodeId::from_index(state.vm_host[v] as usize);
        inst.demand.cpu_cores = cpu_cores(state, v);
    }
    pinned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planetlab;

    fn fresh(state: &State) -> Snapshot {
        let mut snap = Snapshot {
            cluster: shape(state),
            vms: Vec::new(),
        };
        refresh(&mut snap, state);
        snap
    }

    /// A snapshot refreshed after the placement changed equals one built afresh, and
    /// VMs on no host are left out of it.
    #[test]
    fn refreshed_snapshot_equals_a_fresh_one() {
        let spec = planetlab::cluster(6, 8, planetlab::VmTypeOrder::Block);
        let mut state = State::new(spec.clone(), false);
        // VM 7 is never placed.
        for v in 0..7 {
            state.place(v, v % 3, 0.0);
        }
        let mut kept = fresh(&state);
        assert_eq!(kept.vms, (0..7).collect::<Vec<u32>>());
        // The same VMs run: refreshed in place.
        state.begin_migration(0, 4, 1.0);
        state.end_migration(0, true, 2.0);
        state.begin_migration(1, 5, 3.0);
        let pinned = refresh(&mut kept, &state);
        let again = fresh(&state);
        assert_eq!(pinned, vec![InstId(1)]);
        assert_eq!((&kept.cluster, &kept.vms), (&again.cluster, &again.vms));
        assert_eq!(kept.cluster.instances[0].primary, NodeId(4));
        // One more runs: the instances are rebuilt.
        state.place(7, 2, 4.0);
        refresh(&mut kept, &state);
        let again = fresh(&state);
        assert_eq!((&kept.cluster, &kept.vms), (&again.cluster, &again.vms));
        assert_eq!(kept.vms.len(), 8);
        assert!(kept.cluster.nodes[3].offline && !kept.cluster.nodes[4].offline);
    }

    /// The imbalance the engine reports is the planner's score of this snapshot.
    #[test]
    fn reported_imbalance_is_the_planners_spread_score() {
        let spec = planetlab::cluster(6, 12, planetlab::VmTypeOrder::Cycle);
        let mut state = State::new(spec, false);
        for v in 0..12 {
            state.place(v, v % 4, 0.0);
            state.vm_requested[v] = 150.0 * v as f64;
        }
        state.begin_migration(5, 5, 1.0);
        let planner = tern_balance::score(
            &fresh(&state).cluster,
            &tern_balance::metric::spread::Spread,
        );
        let reported = crate::imbalance::spread_score(&state);
        assert!(planner > 0.1, "{planner}");
        assert!((planner - reported).abs() < 1e-9, "{planner} vs {reported}");
    }
}
