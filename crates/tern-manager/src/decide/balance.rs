//! One balancing round, pure: the snapshot becomes a `tern_model::Cluster`, the planner of
//! `tern-balance` proposes moves under the `spread` metric, and each move is then weighed
//! and limited here before it becomes a migration.
//!
//! What the planner never sees: pinned VMs, VMs in an affinity group (moving one alone
//! would split the group), VMs in their cooldown, VMs not running, and hosts that are not
//! active (offline to it). Anti-affinity groups become Ganeti exclusion tags, which the
//! planner honours.
//!
//! Each proposed move then passes, in order:
//! 1. the cost/benefit test: the peak CPU utilisation of the two hosts it removes, held
//!    for the cooldown, against the host time the migration itself burns (see
//!    [`MIGRATION_CORES`]); a move that costs more than it removes is skipped;
//! 2. the limits on concurrent migrations per host and in the cluster.

use std::collections::BTreeMap;

use serde::Serialize;
use tern_balance::{PlanOptions, Search};
use tern_migrate::policy::PolicyKind;
use tern_model::{
    AllocPolicy, Cluster, Demand, DiskTemplate, DynUtil, Group, IPolicy, InstId, Instance,
    InstanceStatus, Node, NodeId,
};

use super::health::in_flight;
use super::start_migration;
use crate::state::{Change, EventKind, HostState, MigrationReason, Millis, Snapshot, Vm, VmState};

/// Aggressiveness 1-5 as the planner's thresholds, in the spirit of VMware DRS: level 1
/// makes only mandatory moves (evacuation), higher levels act on ever smaller imbalance.
/// `(stop when the spread score is at or below, least score drop per move times the
/// number of active hosts)`.
///
/// The second is scaled by the host count because the score is a standard deviation over
/// hosts: one move changes it by about (moved utilisation × utilisation gap) / hosts, so a
/// fixed threshold would stop a large cluster long before a small one.
pub const AGGRESSIVENESS: [(f64, f64); 5] = [
    (f64::INFINITY, f64::INFINITY),
    (0.20, 0.05),
    (0.10, 0.02),
    (0.05, 0.005),
    (0.01, 0.001),
];

/// Cores a live migration keeps busy while it runs (copying and hashing pages on the
/// source, receiving on the destination: about one core each, as measured for tern's
/// engine).
pub const MIGRATION_CORES: f64 = 2.0;

/// Link bandwidth assumed between hosts when estimating a migration's duration
/// (1 Gbit/s, the lab's shaped links).
pub const LINK_BYTES_PER_S: f64 = 125e6;

/// Memory a guest dirties per core it keeps busy; CPU-heavy guests dirty more.
pub const DIRTY_BYTES_PER_CORE_S: f64 = 20e6;

/// Rounds that may plan more moves than this use the lazy many-moves search.
pub const LAZY_FROM_MOVES: usize = 64;

/// A move the round keeps.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlannedMove {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// Peak CPU utilisation of the two hosts removed, times the cooldown (host-seconds).
    pub gain: f64,
    /// Estimated migration time times the share of the two hosts it keeps busy
    /// (host-seconds).
    pub cost: f64,
}

/// A round's plan and what was left out.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BalancePlan {
    pub score_before: f64,
    pub score_after: f64,
    pub moves: Vec<PlannedMove>,
    /// Planner proposals dropped, by reason (`cost_exceeds_gain`, `host_limit`,
    /// `cluster_limit`), and planner refusals by its own reasons.
    pub skipped: BTreeMap<String, u64>,
    /// Wall time of planning, filled in by the caller (decisions have no clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub planning_ms: Option<f64>,
}

/// Exclusion-tag prefix for anti-affinity groups.
const ANTI_TAG: &str = "tern-anti:";

/// The planner's view of the snapshot, and the names behind its indices.
pub struct Model {
    pub cluster: Cluster,
    pub hosts: Vec<String>,
    pub vms: Vec<String>,
    /// VMs the planner must leave where they are.
    pub pinned: Vec<InstId>,
}

/// Builds the planner's cluster from the snapshot (see the module doc for what is pinned).
pub fn model(snap: &Snapshot, now: Millis) -> Model {
    let hosts: Vec<String> = snap.hosts.keys().cloned().collect();
    let index: BTreeMap<&str, NodeId> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.as_str(), NodeId::from_index(i)))
        .collect();
    let used = snap.memory_used();
    let nodes = snap
        .hosts
        .values()
        .map(|h| {
            let mem = h.capacity.memory_mib as i64;
            let free = mem - used.get(h.name.as_str()).copied().unwrap_or(0) as i64;
            Node::live(
                h.name.clone(),
                h.capacity.cpus,
                mem as f64,
                free,
                h.state != HostState::Active,
            )
        })
        .collect();
    let cooldown = snap.settings.cooldown_s.saturating_mul(1000);
    let mut vms = Vec::new();
    let mut instances = Vec::new();
    let mut pinned = Vec::new();
    for v in snap.vms.values() {
        let Some(node) = v.desired_host.as_deref().and_then(|h| index.get(h)) else {
            continue;
        };
        let id = InstId::from_index(instances.len());
        let on_active = snap.hosts[&hosts[node.index()]].state == HostState::Active;
        let cooling = v
            .last_moved
            .is_some_and(|t| now.saturating_sub(t) < cooldown);
        if v.spec.pinned
            || v.spec.affinity.is_some()
            || cooling
            || v.state != VmState::Running
            || !on_active
        {
            pinned.push(id);
        }
        vms.push(v.name.clone());
        instances.push(Instance {
            name: v.name.clone(),
            mem: v.spec.memory_mib as i64,
            disk: 0,
            vcpus: i64::from(v.spec.vcpus),
            status: InstanceStatus::Running,
            auto_balance: true,
            primary: *node,
            secondary: None,
            disk_template: DiskTemplate::Diskless,
            tags: v
                .spec
                .anti_affinity
                .iter()
                .map(|g| format!("{ANTI_TAG}{g}"))
                .collect(),
            spindle_use: 0,
            spindles: None,
            forthcoming: false,
            util: DynUtil::BASE,
            demand: Demand {
                // A VM seen running with no measured load counts as (almost) idle, not
                // as its vCPU count, which the planner assumes for unmeasured VMs.
                cpu_cores: if v.cpu_measured {
                    v.cpu_used.max(1e-6)
                } else {
                    0.0
                },
                mem_used_mib: v.spec.memory_mib as f64,
            },
        });
    }
    let cluster = Cluster {
        groups: vec![Group {
            name: "default".into(),
            uuid: "00000000-0000-0000-0000-000000000000".into(),
            alloc_policy: AllocPolicy::Preferred,
            tags: Vec::new(),
            networks: Vec::new(),
            ipolicy: IPolicy {
                // Memory is the hard limit; CPU is what the balancer spreads.
                vcpu_ratio: f64::MAX,
                ..IPolicy::default()
            },
        }],
        nodes,
        instances,
        tags: vec![format!("htools:iextags:{ANTI_TAG}")],
        ipolicy: IPolicy {
            vcpu_ratio: f64::MAX,
            ..IPolicy::default()
        },
    };
    Model {
        cluster,
        hosts,
        vms,
        pinned,
    }
}

/// Estimated seconds to live-migrate `v` under `policy` over [`LINK_BYTES_PER_S`].
pub fn migration_seconds(v: &Vm, policy: PolicyKind) -> f64 {
    let bytes = v.spec.memory_mib * 1024 * 1024;
    let dirty = v.cpu_used.max(0.0) * DIRTY_BYTES_PER_CORE_S;
    tern_migrate::model::estimate_duration(bytes, dirty, LINK_BYTES_PER_S, &policy)
        // The model refuses only impossible inputs; treat one as a move not worth making.
        .unwrap_or(f64::INFINITY)
}

/// Plans one round over `snap` at `now` (see the module doc).
pub fn plan(snap: &Snapshot, now: Millis) -> BalancePlan {
    let s = &snap.settings;
    let (min_score, gain_per_host) = AGGRESSIVENESS[usize::from(s.aggressiveness.clamp(1, 5)) - 1];
    let active = snap
        .hosts
        .values()
        .filter(|h| h.state == HostState::Active)
        .count();
    let min_gain = gain_per_host / active.max(1) as f64;
    let (busy, total) = in_flight(snap);
    let budget = s.max_per_cluster.saturating_sub(total) as usize;
    // Each migration takes a slot on two hosts.
    let host_slots = snap
        .hosts
        .values()
        .filter(|h| h.state == HostState::Active)
        .map(|h| {
            s.max_per_host
                .saturating_sub(busy.get(h.name.as_str()).copied().unwrap_or(0))
                as usize
        })
        .sum::<usize>()
        / 2;
    let m = model(snap, now);
    // Twice what the limits let through: some proposals fall to the per-host limit or the
    // cost test, and planning further would be wasted work.
    let max_moves = budget.min(host_slots).saturating_mul(2);
    let opts = PlanOptions {
        min_gain,
        min_gain_limit: f64::INFINITY,
        max_moves: Some(max_moves),
        min_score,
        n_plus_one: false,
        pinned: m.pinned.clone(),
        // Many moves per step where a round may plan many (a hard first round plans
        // thousands); a few moves cost less one at a time than the lazy search's set-up.
        search: if max_moves > LAZY_FROM_MOVES {
            Search::Lazy { width: 24 }
        } else {
            Search::Pruned { width: 24 }
        },
    };
    let mut out = BalancePlan::default();
    let planned = if budget == 0 || min_score.is_infinite() {
        let score = tern_balance::plan_spread(
            &m.cluster,
            &PlanOptions {
                max_moves: Some(0),
                ..opts
            },
        );
        out.score_before = score.plan.initial_score;
        out.score_after = score.plan.final_score;
        if budget == 0 {
            out.skipped.insert("cluster_limit".into(), 1);
        }
        return out;
    } else {
        tern_balance::plan_spread(&m.cluster, &opts)
    };
    out.score_before = planned.plan.initial_score;
    out.score_after = planned.plan.final_score;
    for (r, n) in planned.refusals.iter() {
        out.skipped.insert(r.as_str().to_owned(), n);
    }
    let policy: PolicyKind = s.default_policy.parse().unwrap_or(PolicyKind::Adaptive);
    // CPU load per host as the kept moves leave it.
    let mut load: Vec<f64> = vec![0.0; m.hosts.len()];
    for inst in &m.cluster.instances {
        load[inst.primary.index()] += cpu_of(inst);
    }
    let cap: Vec<f64> = m.cluster.nodes.iter().map(|n| n.pcpus.max(1e-9)).collect();
    // Free memory per host as the kept moves leave it: the planner checked room along its
    // whole sequence, and a dropped move can be the one that made room for a later one.
    let mut free_mem: Vec<i64> = m.cluster.nodes.iter().map(|n| n.free_mem).collect();
    let mut per_host: BTreeMap<String, u32> =
        busy.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let skip =
        |out: &mut BalancePlan, why: &str| *out.skipped.entry(why.to_owned()).or_default() += 1;
    let mut moved = vec![false; m.vms.len()];
    for mv in &planned.plan.moves {
        let (a, b) = (mv.from.index(), mv.to.index());
        let inst = &m.cluster.instances[mv.inst.index()];
        // A later proposal for a VM already moved this round, or from where it no longer
        // is, was planned on moves we dropped.
        if moved[mv.inst.index()] || inst.primary != mv.from {
            skip(&mut out, "superseded");
            continue;
        }
        let c = cpu_of(inst);
        let before = (load[a] / cap[a]).max(load[b] / cap[b]);
        let after = ((load[a] - c) / cap[a]).max((load[b] + c) / cap[b]);
        let vm = &snap.vms[&m.vms[mv.inst.index()]];
        let gain = (before - after) * s.cooldown_s.max(1) as f64;
        let cost =
            migration_seconds(vm, policy) * MIGRATION_CORES / 2.0 * (1.0 / cap[a] + 1.0 / cap[b]);
        if cost >= gain {
            skip(&mut out, "cost_exceeds_gain");
            continue;
        }
        if out.moves.len() >= budget {
            skip(&mut out, "cluster_limit");
            continue;
        }
        if free_mem[b] < inst.mem {
            skip(&mut out, "no_memory");
            continue;
        }
        let (from, to) = (&m.hosts[a], &m.hosts[b]);
        if [from, to]
            .iter()
            .any(|h| per_host.get(*h).copied().unwrap_or(0) >= s.max_per_host)
        {
            skip(&mut out, "host_limit");
            continue;
        }
        *per_host.entry(from.clone()).or_default() += 1;
        *per_host.entry(to.clone()).or_default() += 1;
        load[a] -= c;
        load[b] += c;
        free_mem[a] += inst.mem;
        free_mem[b] -= inst.mem;
        moved[mv.inst.index()] = true;
        out.moves.push(PlannedMove {
            vm: vm.name.clone(),
            from: from.clone(),
            to: to.clone(),
            gain,
            cost,
        });
    }
    out
}

fn cpu_of(inst: &Instance) -> f64 {
    if inst.demand.cpu_cores > 0.0 {
        inst.demand.cpu_cores
    } else {
        inst.vcpus as f64
    }
}

/// One round as changes: in dry-run mode only an event recording the plan; otherwise a
/// migration per kept move. Does nothing when the balancer is disabled.
pub fn round(snap: &Snapshot, now: Millis) -> (Vec<Change>, BalancePlan) {
    if !snap.settings.enabled {
        return (Vec::new(), BalancePlan::default());
    }
    commit(snap, now, plan(snap, now))
}

/// The changes that carry out `p`, planned on an earlier snapshot, against `snap` as it
/// is now (see [`round`]). A planned move is kept only while it still holds: its VM is
/// there, running on the host it was planned from and not migrating, and its
/// destination is active with room for it (counting the moves kept before it). Moves
/// dropped are counted under `stale`. Against the snapshot it was planned on, every
/// move holds.
pub fn commit(snap: &Snapshot, now: Millis, mut p: BalancePlan) -> (Vec<Change>, BalancePlan) {
    if !snap.settings.enabled {
        return (Vec::new(), BalancePlan::default());
    }
    let migrating: std::collections::BTreeSet<&str> =
        snap.running.values().map(|m| m.vm.as_str()).collect();
    let mut used: BTreeMap<String, u64> = snap
        .memory_used()
        .into_iter()
        .map(|(h, m)| (h.to_owned(), m))
        .collect();
    let planned = std::mem::take(&mut p.moves);
    let mut stale = 0;
    for mv in planned {
        let here = |h: &Option<String>| h.as_deref() == Some(mv.from.as_str());
        let vm = snap.vms.get(&mv.vm).filter(|v| {
            v.state == VmState::Running
                && here(&v.desired_host)
                && here(&v.observed_host)
                && !migrating.contains(v.name.as_str())
        });
        let dest = snap
            .hosts
            .get(&mv.to)
            .filter(|h| h.state == HostState::Active);
        let (Some(vm), Some(dest)) = (vm, dest) else {
            stale += 1;
            continue;
        };
        let mem = vm.spec.memory_mib;
        let to_used = used.get(&mv.to).copied().unwrap_or(0);
        if to_used + mem > dest.capacity.memory_mib {
            stale += 1;
            continue;
        }
        used.insert(mv.to.clone(), to_used + mem);
        if let Some(u) = used.get_mut(&mv.from) {
            *u = u.saturating_sub(mem);
        }
        p.moves.push(mv);
    }
    if stale > 0 {
        *p.skipped.entry("stale".into()).or_default() += stale;
    }
    let mut changes = Vec::new();
    if snap.settings.dry_run {
        if !p.moves.is_empty() {
            changes.push(Change::Event(EventKind::PlanRecorded {
                moves: p.moves.len(),
                score_before: p.score_before,
                score_after: p.score_after,
            }));
        }
        return (changes, p);
    }
    let mut next = snap.next_migration;
    for mv in &p.moves {
        let v = &snap.vms[&mv.vm];
        let at = Snapshot {
            next_migration: next,
            ..Snapshot::default()
        };
        if let Ok((c, m)) = start_migration(
            &at,
            now,
            v,
            &mv.to,
            &snap.settings.default_policy,
            MigrationReason::Balance,
        ) {
            next = m.id + 1;
            changes.extend(c);
        }
    }
    (changes, p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::testing::*;
    use crate::state::VmSpec;

    /// `per_host[i]` VMs of 1 core busy on host i (8 cores, 64 GiB each).
    fn uneven(per_host: &[usize]) -> Snapshot {
        let mut snap = cluster(&vec![8.0; per_host.len()], 65536);
        for (h, n) in per_host.iter().enumerate() {
            for i in 0..*n {
                let name = format!("v{h}-{i}");
                running(&mut snap, &name, &format!("h{h}"), spec(1, 512));
                snap.vms.get_mut(&name).unwrap().cpu_used = 1.0;
            }
        }
        snap.settings.max_per_host = 4;
        snap
    }

    #[test]
    fn an_overloaded_host_sheds_load_within_the_limits() {
        let snap = uneven(&[8, 0, 0, 0]);
        let p = plan(&snap, 0);
        assert!(p.score_after < p.score_before);
        assert!(!p.moves.is_empty());
        assert!(p.moves.iter().all(|m| m.from == "h0" && m.gain > m.cost));
        assert!(p.moves.len() <= 4, "max_per_host on h0: {:?}", p.moves);
    }

    #[test]
    fn aggressiveness_one_only_evacuates_and_a_balanced_cluster_stays() {
        let mut snap = uneven(&[8, 0, 0, 0]);
        snap.settings.aggressiveness = 1;
        assert!(plan(&snap, 0).moves.is_empty());
        let snap = uneven(&[2, 2, 2, 2]);
        assert!(plan(&snap, 0).moves.is_empty());
    }

    #[test]
    fn pinned_cooling_and_grouped_vms_stay() {
        let mut snap = uneven(&[4, 0]);
        for (i, v) in snap.vms.values_mut().enumerate() {
            match i {
                0 => v.spec.pinned = true,
                1 => v.last_moved = Some(1_000),
                2 => v.spec.affinity = Some("web".into()),
                _ => v.state = VmState::Pending,
            }
        }
        snap.settings.cooldown_s = 60;
        assert!(plan(&snap, 2_000).moves.is_empty());
    }

    #[test]
    fn a_move_whose_migration_costs_more_than_it_gains_is_skipped() {
        // One slightly busy host; moving a huge, busy VM would take minutes.
        let mut snap = cluster(&[8.0, 8.0], 1 << 20);
        running(&mut snap, "big", "h0", spec(4, 512 * 1024));
        running(&mut snap, "small", "h0", spec(1, 512));
        snap.vms.get_mut("big").unwrap().cpu_used = 4.0;
        snap.vms.get_mut("small").unwrap().cpu_used = 1.0;
        snap.settings.aggressiveness = 5;
        snap.settings.cooldown_s = 30;
        let p = plan(&snap, 0);
        assert!(p.moves.iter().all(|m| m.vm != "big"), "{p:?}");
        assert!(
            p.skipped.get("cost_exceeds_gain").copied().unwrap_or(0) >= 1,
            "{p:?}"
        );
    }

    #[test]
    fn anti_affinity_is_honoured() {
        let mut snap = uneven(&[0, 0]);
        for i in 0..4 {
            let name = format!("db{i}");
            running(
                &mut snap,
                &name,
                "h0",
                VmSpec {
                    anti_affinity: Some(format!("g{i}")),
                    ..spec(1, 512)
                },
            );
            snap.vms.get_mut(&name).unwrap().cpu_used = 1.0;
        }
        running(
            &mut snap,
            "other",
            "h1",
            VmSpec {
                anti_affinity: Some("g0".into()),
                ..spec(1, 512)
            },
        );
        let p = plan(&snap, 0);
        assert!(!p.moves.is_empty());
        assert!(p.moves.iter().all(|m| m.vm != "db0"), "{p:?}");
    }

    #[test]
    fn a_stale_plan_moves_no_vm_deleted_moved_or_migrating_since() {
        let snap = uneven(&[8, 0, 0, 0]);
        let p = plan(&snap, 0);
        assert!(p.moves.len() >= 3, "{p:?}");
        let (all, _) = commit(&snap, 0, p.clone());
        assert_eq!(
            all.iter()
                .filter(|c| matches!(c, Change::PutMigration(_)))
                .count(),
            p.moves.len(),
            "against its own snapshot every move holds"
        );
        // While the plan was computed: the first VM was deleted, the second moved
        // elsewhere, the third started migrating, and the fourth's target went down.
        let mut now = snap.clone();
        now.vms.remove(&p.moves[0].vm);
        let v = now.vms.get_mut(&p.moves[1].vm).unwrap();
        v.desired_host = Some("h3".into());
        v.observed_host = Some("h3".into());
        let (c, _) = start_migration(
            &now,
            0,
            &now.vms[&p.moves[2].vm].clone(),
            "h3",
            "adaptive",
            MigrationReason::Manual,
        )
        .unwrap();
        apply(&mut now, 0, &c);
        let (changes, kept) = commit(&now, 0, p.clone());
        let started: Vec<&str> = changes
            .iter()
            .filter_map(|c| match c {
                Change::PutMigration(m) => Some(m.vm.as_str()),
                _ => None,
            })
            .collect();
        for stale in &p.moves[..3] {
            assert!(
                !started.contains(&stale.vm.as_str()),
                "{} moved: {started:?}",
                stale.vm
            );
        }
        assert_eq!(started.len(), p.moves.len() - 3);
        assert_eq!(kept.skipped.get("stale"), Some(&3));
        // A destination that left the active hosts takes nothing.
        let mut down = snap.clone();
        for h in down.hosts.values_mut() {
            if h.name != "h0" {
                h.state = HostState::Maintenance;
            }
        }
        let (changes, _) = commit(&down, 0, p);
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn dry_run_records_a_plan_and_migrates_nothing() {
        let mut snap = uneven(&[8, 0]);
        snap.settings.dry_run = true;
        let (changes, p) = round(&snap, 0);
        assert!(!p.moves.is_empty());
        assert!(matches!(
            changes.as_slice(),
            [Change::Event(EventKind::PlanRecorded { .. })]
        ));
        snap.settings.dry_run = false;
        let (changes, p) = round(&snap, 0);
        apply(&mut snap, 0, &changes);
        assert_eq!(snap.running.len(), p.moves.len());
        assert!(snap
            .running
            .values()
            .all(|m| m.reason == MigrationReason::Balance));
        // The next round respects the migrations now under way on h0.
        assert!(plan(&snap, 0)
            .moves
            .iter()
            .all(|m| m.from != "h0" || p.moves.len() < 4));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::decide::testing::*;
    use crate::state::VmSpec;
    use proptest::prelude::*;

    /// A random running cluster: per VM (host, vCPUs, memory GiB, load, pinned, anti group).
    fn arb_cluster() -> impl Strategy<Value = Snapshot> {
        (
            2usize..8,
            prop::collection::vec(
                (
                    0usize..8,
                    1u32..4,
                    1u64..4,
                    0.0f64..1.0,
                    any::<bool>(),
                    0u8..6,
                ),
                1..60,
            ),
            1u32..4,
            1u32..10,
            1u8..=5,
        )
            .prop_map(|(hosts, vms, per_host, per_cluster, aggr)| {
                let mut snap = cluster(&vec![8.0; hosts], 64 * 1024);
                for (i, (h, vcpus, gib, load, pinned, anti)) in vms.into_iter().enumerate() {
                    let name = format!("v{i}");
                    let spec = VmSpec {
                        pinned: pinned && i % 3 == 0,
                        anti_affinity: (anti < 2).then(|| format!("g{anti}")),
                        ..spec(vcpus, gib * 1024)
                    };
                    running(&mut snap, &name, &format!("h{}", h % hosts), spec);
                    let v = snap.vms.get_mut(&name).unwrap();
                    v.cpu_used = load * f64::from(vcpus);
                    if i % 5 == 0 {
                        v.last_moved = Some(900);
                    }
                }
                snap.settings.max_per_host = per_host;
                snap.settings.max_per_cluster = per_cluster;
                snap.settings.aggressiveness = aggr;
                snap.settings.cooldown_s = 600;
                snap
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the cluster, a round keeps every limit and rule.
        #[test]
        fn a_round_keeps_limits_and_rules(snap in arb_cluster()) {
            let p = plan(&snap, 1_000);
            let s = &snap.settings;
            prop_assert!(p.moves.len() <= s.max_per_cluster as usize);
            let mut per_host: BTreeMap<&str, u32> = BTreeMap::new();
            let mut after = snap.clone();
            for m in &p.moves {
                *per_host.entry(&m.from).or_default() += 1;
                *per_host.entry(&m.to).or_default() += 1;
                let v = &snap.vms[&m.vm];
                prop_assert!(!v.spec.pinned, "{} is pinned", m.vm);
                prop_assert!(v.last_moved.is_none(), "{} is cooling down", m.vm);
                prop_assert!(m.gain > m.cost);
                prop_assert_eq!(v.observed_host.as_deref(), Some(m.from.as_str()));
                after.vms.get_mut(&m.vm).unwrap().desired_host = Some(m.to.clone());
            }
            prop_assert!(per_host.values().all(|n| *n <= s.max_per_host), "{per_host:?}");
            // The generated cluster may start over-committed; what a round must keep is
            // that every host it moves a VM onto has room for it.
            for (h, used) in after.memory_used() {
                if p.moves.iter().any(|m| m.to == *h) {
                    prop_assert!(used <= after.hosts[h].capacity.memory_mib, "{h}: {used} MiB");
                }
            }
            let mut groups: BTreeMap<(String, String), usize> = BTreeMap::new();
            let mut groups_before: BTreeMap<(String, String), usize> = BTreeMap::new();
            for (snapshot, g) in [(&after, &mut groups), (&snap, &mut groups_before)] {
                for v in snapshot.vms.values() {
                    if let (Some(a), Some(h)) = (&v.spec.anti_affinity, &v.desired_host) {
                        *g.entry((a.clone(), h.clone())).or_default() += 1;
                    }
                }
            }
            // No move puts a second member of an anti-affinity group on a host.
            for (k, n) in &groups {
                prop_assert!(*n <= 1 || groups_before.get(k) >= Some(n), "{k:?}: {n}");
            }
        }
    }
}
